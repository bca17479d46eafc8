"""Owner-only directories and files for what gpuctld and the agent keep on disk: the store, rank
logs, and the launch files that hold each job's environment. Modes are set explicitly, so they
hold whatever umask the process was started with.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
# Others may pass through to a path they know, never list: how a rank's account reaches its own
# working directory inside the root agent's state directory.
TRAVERSE_ONLY_DIR_MODE = 0o711
PRIVATE_FILE_MODE = 0o600
_OWNER = 0o700


def make_private_dirs(path: Path, mode: int = PRIVATE_DIR_MODE) -> None:
    """Create `path` and each missing parent with exactly `mode` (`mkdir -p -m`, for every
    level it creates); directories that exist are left as they are: they may be shared ones."""
    missing: list[Path] = []
    level = path
    while not level.exists():
        missing.append(level)
        if level.parent == level:
            break
        level = level.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:  # another thread or process made it first
            continue
        # The umask only takes bits away, but it may take the 0o011 of TRAVERSE_ONLY too.
        os.chmod(directory, mode)


def private_state_dir(path: Path, mode: int = PRIVATE_DIR_MODE) -> Path:
    """A state directory open to no one but its owner beyond `mode`: created with it, or
    tightened to it (with one warning) when it exists with more bits for group or others.
    Raises OSError when it can be neither (not ours to chmod, a file in the way)."""
    make_private_dirs(path, mode)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    current = stat.S_IMODE(path.stat().st_mode)
    tightened = current & ~(0o077 & ~mode)  # special bits (setgid) are the owner's call
    if tightened != current:
        path.chmod(tightened)
        log.warning(
            "state directory %s was mode %04o, open to other accounts: tightened to %04o",
            path,
            current,
            tightened,
        )
    return path


def private_opener(path: str | os.PathLike[str], flags: int) -> int:
    """`open(..., opener=private_opener)`: a file it creates is 0600, and one it finds open to
    group or others (left by an older version) is tightened to 0600."""
    fd = os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & ~_OWNER:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd

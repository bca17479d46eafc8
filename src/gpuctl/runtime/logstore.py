"""Rank logs on the daemon: agents push appends by offset, `gpuctl logs` reads them back.

One file per rank and attempt under `<state_dir>/logs/<job>/<attempt>/rank-<n>.log`. Appends
are idempotent by offset, so an agent that resends after a lost answer never duplicates bytes.
Jobs print their secrets too: the files are 0600 and the directories 0700, the daemon's alone.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from gpuctl.runtime.private import make_private_dirs, private_opener

TRUNCATED = b"\n[gpuctl: log limit reached; further output dropped]\n"


class LogStore:
    def __init__(self, root: Path, *, max_bytes_per_rank: int) -> None:
        self.root = root
        self.max_bytes = max_bytes_per_rank
        self._lock = threading.Lock()
        # What each agent has sent, which may exceed what was kept once the limit is hit.
        self._accepted: dict[Path, int] = {}

    def path(self, job_id: int, attempt: int, rank: int) -> Path:
        return self.root / str(job_id) / str(attempt) / f"rank-{rank}.log"

    def append(self, job_id: int, attempt: int, rank: int, offset: int, data: bytes) -> int:
        """Append `data` that starts at `offset` of the rank's output; return the next offset
        expected (a caller whose offset is off resends from there)."""
        path = self.path(job_id, attempt, rank)
        with self._lock:
            accepted = self._accepted.get(path)
            if accepted is None:
                accepted = path.stat().st_size if path.exists() else 0
            if offset != accepted:
                self._accepted[path] = accepted
                return accepted
            make_private_dirs(path.parent)
            size = path.stat().st_size if path.exists() else 0
            room = self.max_bytes - size
            with open(path, "ab", opener=private_opener) as f:
                if len(data) <= room:
                    f.write(data)
                elif room > 0:
                    f.write(data[:room])
                    f.write(TRUNCATED)
            self._accepted[path] = accepted + len(data)
            return accepted + len(data)

    def read(
        self, job_id: int, attempt: int, rank: int, offset: int, limit: int = 1 << 20
    ) -> bytes:
        path = self.path(job_id, attempt, rank)
        try:
            with path.open("rb") as f:
                if offset >= os.fstat(f.fileno()).st_size:
                    return b""  # nothing there yet (an offset past any file seek() allows too)
                f.seek(offset)
                return f.read(limit)
        except FileNotFoundError:
            return b""

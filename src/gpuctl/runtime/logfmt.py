"""How gpuctld and the agent write their logs: one event a line on stderr, as JSON (for the
journal and log shippers) or as plain text (for people at a terminal).

A JSON line has `time` (UTC, ISO 8601), `level`, `logger`, `message`, and the fields the
line was logged with (`extra={"job_id": 7}`: job_id, node_id, ...); a traceback, where one
was logged, goes in `traceback`, never across lines. Under systemd (stderr is the journal's
stream) each line starts with its syslog priority, `<3>` for errors to `<7>` for debug,
which the journal records as the entry's level and strips.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TextIO

# The attributes every LogRecord has: anything else on a record came from `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}
PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _Journal(logging.Formatter):
    """`inner`'s line with the syslog priority prefix the journal reads."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        priority = _PRIORITY.get(record.levelname, 6)
        # A plain traceback spans lines: each gets the prefix, or the journal logs it at
        # its default level.
        return "\n".join(f"<{priority}>{part}" for part in line.split("\n"))


def to_journal(stream: TextIO, env: Mapping[str, str]) -> bool:
    """Whether `stream` is the journal's (systemd sets JOURNAL_STREAM=device:inode)."""
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def formatter(fmt: str, stream: TextIO, env: Mapping[str, str]) -> logging.Formatter:
    """The formatter for `fmt` ("auto", "json" or "plain") on `stream`."""
    if fmt == "auto":
        fmt = "plain" if stream.isatty() else "json"
    chosen = JsonLines() if fmt == "json" else logging.Formatter(PLAIN)
    return _Journal(chosen) if to_journal(stream, env) else chosen


class _Ours(logging.StreamHandler):
    """The handler `setup` installs (and replaces when called again; others stay)."""


def setup(level: str, fmt: str = "auto", *, stream: TextIO | None = None) -> None:
    """The root logger writes to `stream` (stderr) at `level`, in `fmt`; unless the program
    that called set up handlers of its own (a test runner), which are left as they are."""
    root = logging.getLogger()
    if any(not isinstance(h, _Ours) for h in root.handlers):
        return  # the host program set logging up (as logging.basicConfig, leave it be)
    stream = stream or sys.stderr
    handler = _Ours(stream)
    handler.setFormatter(formatter(fmt, stream, os.environ))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("apscheduler").setLevel(logging.WARNING)

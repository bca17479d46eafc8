"""Rank logs on the daemon: agents push appends by offset, `gpuctl logs` reads them back.

One file per rank and attempt under `<state_dir>/logs/<job>/<attempt>/rank-<n>.log`. Appends
are idempotent by offset, so an agent that resends after a lost answer never duplicates bytes.
Jobs print their secrets too: the files are 0600 and the directories 0700, the daemon's alone.

Beside each log, `rank-<n>.times` says when its bytes arrived: a record (offset, time) for an
append that starts at least a second after the last recorded one (16 bytes a second at most,
counted in the caps like the log), so `gpuctl logs --timestamps` can date every line to within
a second of its arrival.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
from datetime import UTC, datetime
from pathlib import Path

from gpuctl.runtime.private import make_private_dirs, private_opener

TRUNCATED = b"\n[gpuctl: log limit reached; further output dropped]\n"
_TIME = struct.Struct("<Qd")  # an offset in the log, and when its byte arrived (Unix seconds)
TIME_RESOLUTION_S = 1.0


class LogStore:
    """Rank logs with three caps: per rank, per job (all its ranks and attempts) and for the
    whole store, so that no job, and no agent pushing for it, can fill the daemon's disk."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes_per_rank: int,
        max_bytes_per_job: int = 0,  # 0: no cap
        max_bytes_total: int = 0,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes_per_rank
        self.max_job_bytes = max_bytes_per_job
        self.max_total_bytes = max_bytes_total
        self._lock = threading.Lock()
        # What each agent has sent, which may exceed what was kept once the limit is hit.
        self._accepted: dict[Path, int] = {}
        self._job_bytes: dict[int, int] = {}  # kept, per job: summed from disk on first use
        self._total: int | None = None  # kept in all: summed from disk on first append

    def path(self, job_id: int, attempt: int, rank: int) -> Path:
        return self.root / str(job_id) / str(attempt) / f"rank-{rank}.log"

    def append(
        self,
        job_id: int,
        attempt: int,
        rank: int,
        offset: int,
        data: bytes,
        now: datetime | None = None,
    ) -> int:
        """Append `data` that starts at `offset` of the rank's output, which arrived at `now`;
        return the next offset expected (a caller whose offset is off resends from there)."""
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
            if self.max_job_bytes:
                job = self._job_bytes.setdefault(job_id, _du(self.root / str(job_id)))
                room = min(room, self.max_job_bytes - job)
            if self.max_total_bytes:
                if self._total is None:
                    self._total = _du(self.root)
                room = min(room, self.max_total_bytes - self._total)
            kept = len(data) if len(data) <= room else max(0, room)
            if kept or (room > 0 and data):
                with open(path, "ab", opener=private_opener) as f:
                    f.write(data[:kept])
                    if kept < len(data):
                        f.write(TRUNCATED)
                        kept += len(TRUNCATED)
                if now is not None and kept and room - kept >= _TIME.size:
                    kept += self._note_time(path, size, now)
            if job_id in self._job_bytes:
                self._job_bytes[job_id] += kept
            if self._total is not None:
                self._total += kept
            self._accepted[path] = accepted + len(data)
            return accepted + len(data)

    def _note_time(self, path: Path, offset: int, now: datetime) -> int:
        """Record that the byte at `offset` arrived at `now`, unless the last record is
        under a second older; the bytes written."""
        times = path.with_suffix(".times")
        at = now.timestamp()
        try:
            with times.open("rb") as f:
                f.seek(-_TIME.size, os.SEEK_END)
                last = _TIME.unpack(f.read(_TIME.size))[1]
            if at - last < TIME_RESOLUTION_S:
                return 0
        except (FileNotFoundError, OSError, struct.error):  # none yet, or a torn last record
            pass
        with open(times, "ab", opener=private_opener) as f:
            f.write(_TIME.pack(offset, at))
        return _TIME.size

    def times(self, job_id: int, attempt: int, rank: int) -> list[tuple[int, datetime]]:
        """When the rank's output arrived: (offset, time) in offset order; [] when unknown."""
        path = self.path(job_id, attempt, rank).with_suffix(".times")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        whole = len(raw) - len(raw) % _TIME.size  # a torn last record is left out
        return [
            (offset, datetime.fromtimestamp(at, UTC))
            for offset, at in _TIME.iter_unpack(raw[:whole])
        ]

    def read_stamped(
        self, job_id: int, attempt: int, rank: int, offset: int, limit: int = 1 << 20
    ) -> tuple[bytes, datetime | None]:
        """`read`, cut where a later arrival begins, with the arrival time of its first byte
        (None for output older than this record). The record is searched, not read whole: a
        follower polling an idle log reads nothing of it."""
        data = self.read(job_id, attempt, rank, offset, limit)
        if not data:
            return b"", None
        try:
            f = self.path(job_id, attempt, rank).with_suffix(".times").open("rb")
        except FileNotFoundError:
            return data, None
        with f:
            count = os.fstat(f.fileno()).st_size // _TIME.size

            def record(i: int) -> tuple[int, float]:
                f.seek(i * _TIME.size)
                return _TIME.unpack(f.read(_TIME.size))

            lo, hi = 0, count  # the first record past `offset`
            while lo < hi:
                mid = (lo + hi) // 2
                if record(mid)[0] <= offset:
                    lo = mid + 1
                else:
                    hi = mid
            when = datetime.fromtimestamp(record(lo - 1)[1], UTC) if lo else None
            if lo < count:
                data = data[: record(lo)[0] - offset]
        return data, when

    def remove(self, job_id: int) -> None:
        """Forget a job's logs (retention): every attempt and rank of it."""
        directory = self.root / str(job_id)
        with self._lock:
            freed = _du(directory)
            shutil.rmtree(directory, ignore_errors=True)
            self._job_bytes.pop(job_id, None)
            if self._total is not None:
                self._total = max(0, self._total - freed)
            for path in [p for p in self._accepted if p.is_relative_to(directory)]:
                del self._accepted[path]

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


def _du(directory: Path) -> int:
    """Bytes in the files below `directory` (0 where there is none)."""
    total = 0
    for dirpath, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total

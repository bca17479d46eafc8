"""Ships each rank's log file to the daemon: new bytes in chunks of at most 1 MiB, resumed from
the offset the daemon says it holds, so a lost or repeated push is repaired by the next one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gpuctl.agent.runner import RankKey

CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default message limit
CHUNKS_PER_SHIP = 8  # per rank per tick, so one chatty rank cannot delay the heartbeat

# (rank, offset, data) -> the daemon's next_offset; raises grpc.RpcError when the call fails.
Push = Callable[[RankKey, int, bytes], int]


class LogShipper:
    """Remembers, per rank, how much of its log the daemon holds."""

    def __init__(
        self, push: Push, *, chunk_bytes: int = CHUNK_BYTES, chunks_per_ship: int = CHUNKS_PER_SHIP
    ) -> None:
        self._push = push
        self._chunk_bytes = chunk_bytes
        self._chunks_per_ship = chunks_per_ship
        self._offsets: dict[RankKey, int] = {}
        self._stalls: dict[RankKey, int] = {}

    def offset(self, key: RankKey) -> int:
        return self._offsets.get(key, 0)

    def stalls(self, key: RankKey) -> int:
        """Consecutive `ship` calls in which the daemon accepted a push but did not advance."""
        return self._stalls.get(key, 0)

    def ship(self, key: RankKey, path: Path) -> bool:
        """Push what the daemon lacks of `path` (up to `chunks_per_ship` chunks); True when
        it then holds the whole file. RPC errors propagate; the offset stays where it was."""
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return True  # no log was ever written: nothing to ship
        offset = self.offset(key)
        if offset >= size:
            return True
        with open(path, "rb") as f:
            for _ in range(self._chunks_per_ship):
                f.seek(offset)
                data = f.read(self._chunk_bytes)
                if not data:
                    break
                next_offset = self._push(key, offset, data)
                if next_offset == offset:
                    # Accepted nothing: asking again at once would get the same answer.
                    self._stalls[key] = self.stalls(key) + 1
                    break
                self._stalls[key] = 0
                offset = self._offsets[key] = max(0, next_offset)
                if offset >= size:
                    break
        return offset >= size

    def forget(self, key: RankKey) -> None:
        self._offsets.pop(key, None)
        self._stalls.pop(key, None)

"""Job mapping files for NVIDIA's DCGM exporter, so its per-GPU metrics carry gpuctl job ids.

dcgm-exporter, started with `--hpc-job-mapping-dir DIR`, reads every file of DIR named after a
GPU's index (`0`, `1`, ...) and labels that GPU's metrics `hpc_job="<id>"` for each job id the
file lists, one a line. The agent keeps DIR in step with the ranks it runs: a GPU a rank of job
7 holds has a file `7`; an idle GPU has none. Each file is replaced whole (written aside, then
renamed), so the exporter never reads half a file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Set
from pathlib import Path

log = logging.getLogger(__name__)


class JobMapping:
    """The mapping directory of one node."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._written: dict[int, tuple[int, ...]] | None = None  # None: not yet in step

    def update(self, jobs_by_gpu: Mapping[int, Set[int]]) -> None:
        """Make the directory say which jobs hold each GPU (a GPU missing holds none)."""
        wanted = {gpu: tuple(sorted(jobs)) for gpu, jobs in jobs_by_gpu.items() if jobs}
        if wanted == self._written:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for gpu, jobs in wanted.items():
                if self._written is not None and self._written.get(gpu) == jobs:
                    continue
                path = self.directory / str(gpu)
                tmp = self.directory / f".{gpu}.tmp"
                tmp.write_text("".join(f"{j}\n" for j in jobs))
                os.chmod(tmp, 0o644)  # the exporter runs as an account of its own
                tmp.replace(path)
            for entry in self.directory.iterdir():
                # Only GPU files (a name that is an index), and only those no longer held.
                if entry.name.isdigit() and int(entry.name) not in wanted:
                    entry.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot write DCGM job mapping in %s: %s", self.directory, e.strerror)
            self._written = None  # try it all again next time
            return
        self._written = wanted

"""API workers (`[server] api_workers`): processes that serve gpuctld's TCP listener beside it,
so that the API uses more than the one core a Python process has.

Each binds the same port (SO_REUSEPORT: the kernel spreads new connections over gpuctld and
its workers, and lets only the same user bind it), opens the store itself and serves what reads
the store or only inserts into it (`api.forward.SERVED_HERE`: submits, job reads) through the
same servicers and checks as gpuctld; every other call goes to gpuctld as it came, over a
private socket in the state directory (`api.forward`). A worker's writes are fenced with the
epoch gpuctld leads under, so a worker of a leader that lost the lease writes nothing. A worker
tells gpuctld on its stdout, a JSON line at a time, that a submit wants a cycle and which calls
it answered (for gpuctld's metrics; the calls it passed on gpuctld counts itself). gpuctld starts them when it starts to lead,
starts one again that died (after a pause that doubles, to 30 s), and stops them before itself:
they drain when their stdin closes, which also happens when gpuctld dies.

`python -m gpuctl.runtime.apiworkers` is the worker; gpuctld hands it its orders on stdin.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import pickle
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpuctl.runtime.config import DaemonConfig

if TYPE_CHECKING:
    from gpuctl.api.server import CallObserver

log = logging.getLogger("gpuctld.api-workers")
RESTART_PAUSE_S = (0.5, 30.0)  # the first pause before starting a dead worker again, the most
HEALTHY_S = 60.0  # a worker that ran this long before it died starts again after the first pause
REPORT_EVERY_S = 0.5  # how often a worker reports the calls it answered (a wake goes at once)
MAX_REPORTED = 100_000  # calls a report holds at most (bounded memory): past it, uncounted


@dataclass(frozen=True, slots=True, kw_only=True)
class _Orders:
    """What a worker is told on its stdin (not on its command line, which anyone may read)."""

    config: DaemonConfig
    env: Mapping[str, str]
    port: int
    epoch: int
    socket: str
    secret: str
    index: int


class ApiWorkers:
    """gpuctld's side: starts, restarts and stops `config.api_workers` workers."""

    def __init__(
        self,
        config: DaemonConfig,
        env: Mapping[str, str],
        *,
        wake: Callable[[], None],
        observer: CallObserver | None = None,
    ) -> None:
        self._config = config
        self._env = dict(env)
        self._wake = wake
        self._observer = observer
        self.socket = config.resolved_state_dir(env) / "api-workers.sock"
        self.secret = secrets.token_urlsafe(32)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._procs: dict[int, subprocess.Popen] = {}
        self._threads: list[threading.Thread] = []

    def start(self, epoch: int, port: int) -> None:
        """Start the workers, fenced at `epoch`, on gpuctld's TCP `port` (bound already)."""
        for index in range(self._config.api_workers):
            t = threading.Thread(
                target=self._keep,
                args=(index, epoch, port),
                name=f"api-worker-{index}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)

    def _keep(self, index: int, epoch: int, port: int) -> None:
        pause = RESTART_PAUSE_S[0]
        while not self._stopping.is_set():
            started = time.monotonic()
            proc = self._spawn(index, epoch, port)
            if proc is None:
                return
            for report in _reports(proc):
                if report.get("wake"):  # a submit: a cycle soon
                    self._wake()
                if self._observer is not None:
                    self._count(proc, report.get("calls", ()))
            code = proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > HEALTHY_S:
                pause = RESTART_PAUSE_S[0]
            log.error(
                "API worker %d (pid %d) exited with %s; starting it again in %g s",
                index,
                proc.pid,
                code,
                pause,
            )
            self._stopping.wait(pause)
            pause = min(pause * 2, RESTART_PAUSE_S[1])

    def _count(self, proc: subprocess.Popen, calls: object) -> None:
        assert self._observer is not None
        try:
            for method, code, seconds in calls:  # type: ignore[attr-defined]
                self._observer.call(str(method), str(code), float(seconds))
        except (TypeError, ValueError):  # a report not of our making: skipped, not fatal
            log.warning("API worker (pid %d) reported calls gpuctld cannot read", proc.pid)

    def _spawn(self, index: int, epoch: int, port: int) -> subprocess.Popen | None:
        orders = _Orders(
            config=self._config,
            env=self._env,
            port=port,
            epoch=epoch,
            socket=str(self.socket),
            secret=self.secret,
            index=index,
        )
        with self._lock:
            if self._stopping.is_set():
                return None
            proc = subprocess.Popen(
                [sys.executable, "-m", "gpuctl.runtime.apiworkers"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self._procs[index] = proc
        assert proc.stdin is not None
        try:
            proc.stdin.write(pickle.dumps(orders))
            proc.stdin.flush()  # and kept open: its end tells the worker to stop
        except OSError:
            pass  # it died already; `_keep` sees it exit
        return proc

    def stop(self, grace_s: float) -> None:
        """Tell every worker to drain (its in-flight calls get `grace_s`), and wait for them."""
        with self._lock:
            self._stopping.set()
            procs = list(self._procs.values())
        for proc in procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        deadline = time.monotonic() + grace_s + 5.0
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("API worker (pid %d) did not stop in time: killed", proc.pid)
                proc.kill()
                proc.wait()
        for t in self._threads:
            t.join(5.0)


def _reports(proc: subprocess.Popen) -> Iterator[dict]:
    """What a worker says until it exits: one JSON object a line."""
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            report = json.loads(line)
        except ValueError:
            log.warning("API worker (pid %d) said something not JSON: %.80r", proc.pid, line)
            continue
        if isinstance(report, dict):
            yield report


class _Reporter:
    """The worker's side: a thread writes what gpuctld should know, at once for a wake, else
    every REPORT_EVERY_S (the metrics of the calls answered since)."""

    def __init__(self, out: int) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._calls: list[tuple[str, str, float]] = []
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="reporter", daemon=True).start()

    def wake(self) -> None:
        self._wake.set()

    def call(self, method: str, code: str, seconds: float) -> None:
        with self._lock:
            if len(self._calls) < MAX_REPORTED:
                self._calls.append((method, code, round(seconds, 6)))

    def stream(self, method: str, code: str) -> None:
        """Streams are gpuctld's: a worker passes them on."""

    def _run(self) -> None:
        while True:
            woken = self._wake.wait(REPORT_EVERY_S)
            self._wake.clear()
            with self._lock:
                calls, self._calls = self._calls, []
            if not (woken or calls):
                continue
            line = json.dumps({"wake": woken, "calls": calls}, separators=(",", ":")) + "\n"
            data = memoryview(line.encode())
            try:
                while data:  # blocking: gpuctld reads at once
                    data = data[os.write(self._out, data) :]
            except OSError:
                return  # gpuctld is gone; stdin ends too, and the worker with it


def _serve(orders: _Orders) -> int:
    from gpuctl.api.auth import SessionBook
    from gpuctl.api.forward import Forwarder
    from gpuctl.api.server import MAX_MESSAGE_BYTES, ApiServer, Listeners
    from gpuctl.runtime import daemon
    from gpuctl.store.sql import open_store

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    reporter = _Reporter(sys.stdout.fileno())

    def watch_stdin() -> None:
        while sys.stdin.buffer.read(4096):
            pass
        stop.set()

    config, env = orders.config, dict(orders.env)
    state_dir = config.resolved_state_dir(env)
    store = open_store(config.resolved_store_url(env))
    store.fence(orders.epoch)
    controller = daemon.build_controller(config, store, state_dir, wake=reporter.wake)
    own, authority = daemon.build_listeners(config, env, state_dir, quiet=True)
    host = config.listen.rsplit(":", 1)[0]
    listeners = Listeners(
        tcp=f"{host}:{orders.port}", tls_cert=own.tls_cert, tls_key=own.tls_key, reuse_port=True
    )
    guard = daemon.build_guard(
        config, store, sessions=SessionBook(), now=controller.clock.now, authority=authority
    )
    server = ApiServer(
        controller,
        guard,
        listeners,
        inline_reads=store.local and guard.auth.jwt is None,
        observer=reporter,
        forward=Forwarder(Path(orders.socket), orders.secret, max_message_bytes=MAX_MESSAGE_BYTES),
    )
    server.start()
    gc.freeze()  # as gpuctld does: see runtime.daemon
    threading.Thread(target=watch_stdin, name="lifeline", daemon=True).start()
    log.info("API worker %d serving port %d (pid %d)", orders.index, orders.port, os.getpid())
    stop.wait()
    server.drain(config.drain_grace_s)
    store.close()
    return 0


def main() -> int:
    orders = pickle.load(sys.stdin.buffer)  # from gpuctld, our parent, over a pipe
    from gpuctl.core.errors import GpuctlError
    from gpuctl.runtime import logfmt

    logfmt.setup(orders.config.log_level, orders.config.log_format)
    try:
        return _serve(orders)
    except (GpuctlError, OSError) as e:
        log.error("API worker %d cannot start: %s", orders.index, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())

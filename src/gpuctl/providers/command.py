"""The command provider: operator scripts acquire, renew, release and list nodes, one JSON request
on stdin and one JSON response on stdout per call, in the spirit of Slurm's ResumeProgram and
SuspendProgram. Any cloud CLI or in-house API can be put behind it.

The contract (version 1)
------------------------
Each call runs the action's configured argv with one JSON object on stdin:

    {"version": 1, "provider": NAME, "action": "acquire", "sku": SKU, "count": INT,
     "fabric": STR | null, "now": TIME}
    {"version": 1, "provider": NAME, "action": "renew",   "lease_id": STR, "now": TIME}
    {"version": 1, "provider": NAME, "action": "release", "lease_id": STR, "now": TIME}
    {"version": 1, "provider": NAME, "action": "list"}

and the script must exit 0 having printed one JSON object on stdout:

    acquire -> {"leases": [LEASE, ...]}      exactly `count` leases, or a refusal: all or nothing
    renew   -> {"expires_at": TIME | null}   the new expiry; null = the lease does not expire
    release -> {}                            also for a lease it does not know (idempotent)
    list    -> {"leases": [LEASE, ...]}      every lease the provider holds for us

    LEASE = {"lease_id": STR, "sku": STR, "node": STR, "address": STR, "fabric": STR,
             "price_per_hour": NUMBER, "acquired_at": TIME | null, "expires_at": TIME | null}
        lease_id is required. sku defaults to the requested one in acquire (required in list).
        price_per_hour defaults to the SKU's configured price and is required when there is none.
        node, address and fabric may be "" or left out while the provider does not know them.
    TIME  = ISO 8601 with a UTC offset, e.g. "2026-01-01T08:00:00Z"

An expected refusal is still exit 0, with {"error": {"code": CODE, "message": STR}}:
"capacity_unavailable" (acquire: not now; the daemon tries another SKU or provider),
"not_found" (renew: no such lease; release: treated as done), anything else: a failure.

A non-zero exit, stdout that is not one JSON object, a missing or mistyped field, or a call that
outlives `timeout_s` is the script misbehaving (ProviderMisbehaved, naming the action, the field,
and the last lines of the script's stderr). On timeout the script's whole process group gets
SIGTERM, then SIGKILL `kill_grace_s` later. stderr is for people: its tail goes into the error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gpuctl.core.errors import FieldViolation
from gpuctl.providers.base import (
    Acquired,
    CapacityUnavailable,
    Held,
    LeaseNotHeld,
    ProviderError,
    ProviderMisbehaved,
    ProviderMisconfigured,
    Sku,
    UnknownSku,
    check_count,
    check_now,
)
from gpuctl.providers.settings import SKU_FIELDS, Fields, raise_if, sku_from

CONTRACT_VERSION = 1
SETTINGS = (
    "name",
    "kind",
    "acquire",
    "release",
    "list",
    "renew",
    "timeout_s",
    "kill_grace_s",
    "sku",
)
STDERR_TAIL_LINES = 5
_MAX_LINE = 200  # per stderr line quoted in an error: enough for a message, not a stack dump
_DRAIN_S = 1.0  # after the kill, how long to wait for pipes held open by escaped processes


@dataclass(frozen=True, slots=True, kw_only=True)
class Commands:
    acquire: tuple[str, ...]
    release: tuple[str, ...]
    list: tuple[str, ...]
    renew: tuple[str, ...] = ()  # none: leases cannot be extended
    timeout_s: float = 60.0
    kill_grace_s: float = 2.0


@dataclass(frozen=True, slots=True)
class _Run:
    returncode: int | None  # None: killed on timeout
    stdout: str
    stderr_tail: tuple[str, ...]


class _Shape(Exception):
    """A response field is missing or mistyped; `path` names it, e.g. "leases[1].lease_id"."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path} {problem}")


def _tail(stderr: str) -> tuple[str, ...]:
    lines = [line.rstrip()[:_MAX_LINE] for line in stderr.splitlines() if line.strip()]
    return tuple(lines[-STDERR_TAIL_LINES:])


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it: while it stays a zombie its process
    group id cannot be reused, so signalling the group cannot hit an unrelated process."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(pgid, sig)


class CommandProvider:
    def __init__(self, commands: Commands, *, name: str = "command", skus: Iterable[Sku] = ()):
        self._name = name
        self._commands = commands
        self._skus = tuple(skus)

    @classmethod
    def from_settings(cls, settings: Mapping[str, object]) -> CommandProvider:
        """From a `[[provider]]` table of kind "command" (see config/providers.toml)."""
        out: list[FieldViolation] = []
        f = Fields(settings, "", out)
        f.only(SETTINGS)
        name = f.text("name", required=True, default="command")
        commands = Commands(
            acquire=f.argv("acquire", required=True),
            release=f.argv("release", required=True),
            list=f.argv("list", required=True),
            renew=f.argv("renew"),
            timeout_s=f.number("timeout_s", default=60.0, lo=0.001),
            kill_grace_s=f.number("kill_grace_s", default=2.0),
        )
        raw_skus = settings.get("sku", [])
        if not isinstance(raw_skus, list):
            out.append(FieldViolation("sku", "must be a list of [[provider.sku]] tables"))
            raw_skus = []
        skus = []
        for i, raw in enumerate(raw_skus):
            g = Fields(raw, f"sku[{i}]", out)
            g.only(("name", *SKU_FIELDS))
            skus.append(sku_from(g, provider=name, name=g.text("name", required=True)))
        raise_if(out)
        return cls(commands, name=name, skus=skus)

    @property
    def name(self) -> str:
        return self._name

    def skus(self) -> tuple[Sku, ...]:
        return self._skus

    @property
    def can_renew(self) -> bool:
        """Whether a renew command is configured: without one, a lease ends when it expires."""
        return bool(self._commands.renew)

    def inventory(self) -> tuple[str, ...]:
        return ()

    # -- the four actions ----------------------------------------------------------------------

    def acquire(
        self, sku: str, count: int, *, fabric: str | None = None, now: datetime
    ) -> tuple[Acquired, ...]:
        check_count(count)
        check_now(now)
        if self._skus and not any(s.name == sku for s in self._skus):
            raise UnknownSku(self._name, sku)
        request = {"sku": sku, "count": count, "fabric": fabric, "now": now.isoformat()}
        response = self._call("acquire", request)
        self._refusal("acquire", response)
        try:
            leases = tuple(
                self._lease(raw, f"leases[{i}]", sku=sku, now=now)
                for i, raw in enumerate(_items(response, "leases"))
            )
            if len(leases) != count or len({lease.lease_id for lease in leases}) != count:
                raise _Shape("leases", f"holds {len(leases)} leases; {count} distinct were asked")
        except _Shape as e:
            # Whatever it did hand out is ours to pay for: give it back before failing.
            named = self._give_back(response, now)
            raise ProviderMisbehaved(
                self._name,
                f"acquire response: {e} (all or nothing){named}",
            ) from None
        return leases

    def renew(self, lease_id: str, *, now: datetime) -> datetime | None:
        check_now(now)
        if not self._commands.renew:
            raise ProviderMisconfigured(
                self._name, f"lease {lease_id} cannot be renewed: no renew command is configured"
            )
        response = self._call("renew", {"lease_id": lease_id, "now": now.isoformat()})
        if _error_code(response) == "not_found":
            raise LeaseNotHeld(self._name, lease_id, _error_message(response) or "not found")
        self._refusal("renew", response)
        try:
            if "expires_at" not in response:
                raise _Shape("expires_at", "is missing (null if the lease does not expire)")
            return _time(response["expires_at"], "expires_at")
        except _Shape as e:
            raise ProviderMisbehaved(self._name, f"renew response: {e}") from None

    def release(self, lease_id: str, *, now: datetime) -> None:
        check_now(now)
        response = self._call("release", {"lease_id": lease_id, "now": now.isoformat()})
        if _error_code(response) == "not_found":
            return  # already gone: releasing is idempotent
        self._refusal("release", response)

    def held(self) -> tuple[Held, ...]:
        response = self._call("list", {})
        self._refusal("list", response)
        try:
            return tuple(
                self._lease(raw, f"leases[{i}]", sku=None, now=None)
                for i, raw in enumerate(_items(response, "leases"))
            )
        except _Shape as e:
            raise ProviderMisbehaved(self._name, f"list response: {e}") from None

    # -- responses -----------------------------------------------------------------------------

    def _lease(self, raw: object, path: str, *, sku: str | None, now: datetime | None) -> Acquired:
        if not isinstance(raw, dict):
            raise _Shape(path, f"must be an object, got {_kind(raw)}")
        lease_id = _text(raw, "lease_id", path, required=True)
        got_sku = _text(raw, "sku", path, required=sku is None) or sku or ""
        price = raw.get("price_per_hour")
        if price is None:
            known = next((s for s in self._skus if s.name == got_sku), None)
            if known is None:
                raise _Shape(f"{path}.price_per_hour", f"is missing and sku {got_sku} has no price")
            price = known.price_per_hour
        elif isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            raise _Shape(f"{path}.price_per_hour", f"must be a number >= 0, got {price!r}")
        acquired_at = _time(raw.get("acquired_at"), f"{path}.acquired_at")
        return Acquired(
            lease_id=lease_id,
            sku=got_sku,
            node=_text(raw, "node", path),
            address=_text(raw, "address", path),
            fabric=_text(raw, "fabric", path),
            price_per_hour=float(price),
            acquired_at=acquired_at or now,
            expires_at=_time(raw.get("expires_at"), f"{path}.expires_at"),
        )

    def _refusal(self, action: str, response: dict[str, Any]) -> None:
        if "error" not in response:
            return
        code, message = _error_code(response), _error_message(response)
        if code is None:
            raise ProviderMisbehaved(
                self._name, f"{action} response: error must be {{'code': str, 'message': str}}"
            )
        if code == "capacity_unavailable":
            raise CapacityUnavailable(self._name, message or "no capacity now")
        raise ProviderError(self._name, f"{action} failed ({code}): {message or 'no message'}")

    def _give_back(self, response: dict[str, Any], now: datetime) -> str:
        """Releases every lease id a bad acquire response names; says how that went."""
        raw = response.get("leases")
        ids = [
            x["lease_id"]
            for x in (raw if isinstance(raw, list) else [])
            if isinstance(x, dict) and isinstance(x.get("lease_id"), str) and x["lease_id"]
        ]
        failed = []
        for lease_id in ids:
            try:
                self.release(lease_id, now=now)
            except ProviderError:
                failed.append(lease_id)
        if not ids:
            return ""
        if failed:
            return f"; released {len(ids) - len(failed)} of the leases it named, NOT {failed}"
        return f"; released the {len(ids)} leases it named"

    # -- running the script --------------------------------------------------------------------

    def _call(self, action: str, fields: dict[str, object]) -> dict[str, Any]:
        argv = getattr(self._commands, action)
        request = {"version": CONTRACT_VERSION, "provider": self._name, "action": action, **fields}
        run = self._run(action, argv, json.dumps(request))
        script = argv[0]
        if run.returncode is None:
            raise ProviderMisbehaved(
                self._name,
                f"{action} command {script} did not finish within {self._commands.timeout_s:g}s;"
                f" killed its process group{_quoted(run.stderr_tail)}",
                run.stderr_tail,
            )
        if run.returncode != 0:
            how = (
                f"was killed by signal {-run.returncode}"
                if run.returncode < 0
                else f"exited {run.returncode}"
            )
            raise ProviderMisbehaved(
                self._name,
                f"{action} command {script} {how}{_quoted(run.stderr_tail)}",
                run.stderr_tail,
            )
        try:
            response = json.loads(run.stdout)
        except json.JSONDecodeError:
            shown = run.stdout.strip()[:60]
            what = f"printed {shown!r}" if shown else "printed nothing"
            raise ProviderMisbehaved(
                self._name,
                f"{action} command {script} {what} on stdout, not a JSON object",
                run.stderr_tail,
            ) from None
        if not isinstance(response, dict):
            raise ProviderMisbehaved(
                self._name,
                f"{action} command {script} printed a JSON {_kind(response)}, not an object",
                run.stderr_tail,
            )
        return response

    def _run(self, action: str, argv: tuple[str, ...], stdin: str) -> _Run:
        try:
            # A session of its own: on timeout the script and everything it started go together.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError:
            raise ProviderMisconfigured(
                self._name,
                f"{action} command {argv[0]} does not exist; fix the provider's {action}",
            ) from None
        except PermissionError:
            raise ProviderMisconfigured(
                self._name, f"{action} command {argv[0]} is not executable (chmod +x it?)"
            ) from None
        except OSError as e:
            raise ProviderMisconfigured(
                self._name, f"{action} command {argv[0]} cannot run: {e.strerror or e}"
            ) from None
        try:
            out, err = proc.communicate(stdin.encode(), timeout=self._commands.timeout_s)
        except subprocess.TimeoutExpired:
            self._kill_group(proc)
            try:
                out, err = proc.communicate(timeout=_DRAIN_S)
            except subprocess.TimeoutExpired:
                # Something left the group (setsid) and holds the pipes: stop reading.
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
                proc.wait()
                out, err = b"", b""
            return _Run(None, out.decode(errors="replace"), _tail(err.decode(errors="replace")))
        return _Run(
            proc.returncode, out.decode(errors="replace"), _tail(err.decode(errors="replace"))
        )

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the script's process group, SIGKILL after the grace; the script itself is
        not reaped until then, so its group id stays ours throughout."""
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._commands.kill_grace_s
        while time.monotonic() < deadline and not _exited(proc.pid):
            time.sleep(0.01)
        _signal_group(proc.pid, signal.SIGKILL)


# -- response fields ---------------------------------------------------------------------------


def _kind(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )


def _quoted(tail: tuple[str, ...]) -> str:
    return f"; stderr: {' | '.join(tail)}" if tail else "; stderr was empty"


def _items(response: dict[str, Any], key: str) -> list[object]:
    if key not in response:
        raise _Shape(key, "is missing")
    value = response[key]
    if not isinstance(value, list):
        raise _Shape(key, f"must be an array, got {_kind(value)}")
    return value


def _text(raw: dict[str, Any], key: str, path: str, *, required: bool = False) -> str:
    value = raw.get(key)
    if value is None:
        if required:
            raise _Shape(f"{path}.{key}", "is missing")
        return ""
    if not isinstance(value, str) or (required and not value):
        what = "a non-empty string" if required else "a string"
        raise _Shape(f"{path}.{key}", f"must be {what}, got {value!r}")
    return value


def _time(value: object, path: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Shape(path, f"must be an ISO 8601 time or null, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Shape(path, f"must be an ISO 8601 time, got {value!r}") from None
    if parsed.tzinfo is None:
        raise _Shape(path, f"must carry a UTC offset (e.g. 'Z'), got {value!r}")
    return parsed


def _error_code(response: dict[str, Any]) -> str | None:
    error = response.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code else None


def _error_message(response: dict[str, Any]) -> str:
    error = response.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return " ".join(message.split())[:_MAX_LINE] if isinstance(message, str) else ""

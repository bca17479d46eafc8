"""The command provider against real scripts written to tmp_path: good ones, and every way a
script can go wrong (non-zero exit, garbage, wrong shape, hang, missing, not executable)."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpuctl.core.errors import InvalidArgument
from gpuctl.providers.base import (
    CapacityUnavailable,
    LeaseNotHeld,
    ProviderError,
    ProviderMisbehaved,
    ProviderMisconfigured,
    Sku,
    UnknownSku,
)
from gpuctl.providers.command import CommandProvider, Commands

T0 = datetime(2026, 1, 1, tzinfo=UTC)
H100 = Sku(
    provider="burst",
    name="gpu_8x_h100_sxm5",
    gpu_model="H100 SXM",
    gpu_count=8,
    price_per_hour=31.92,
)

# A small provider with room for two nodes, its state in a JSON file named by argv[1]. Every
# request it was sent is kept in the state's "calls", so tests can read what went over stdin.
GOOD = """
import json, sys
from datetime import datetime, timedelta

state_path = sys.argv[1]
req = json.load(sys.stdin)
try:
    with open(state_path) as f:
        state = json.load(f)
except FileNotFoundError:
    state = {"leases": {}, "seq": 0, "calls": []}
state["calls"].append(req)
CAPACITY = 2
action = req["action"]
if action == "acquire":
    left = CAPACITY - len(state["leases"])
    if req["count"] > left:
        out = {"error": {"code": "capacity_unavailable", "message": f"only {left} nodes left"}}
    else:
        out = {"leases": []}
        for _ in range(req["count"]):
            state["seq"] += 1
            n = state["seq"]
            lease = {"lease_id": f"i-{n:04d}", "sku": req["sku"], "node": f"burst-{n}",
                     "address": f"10.9.0.{n}", "fabric": req["fabric"] or "",
                     "acquired_at": req["now"], "expires_at": None}
            state["leases"][lease["lease_id"]] = lease
            out["leases"].append(lease)
elif action == "renew":
    if req["lease_id"] in state["leases"]:
        expires = datetime.fromisoformat(req["now"]) + timedelta(hours=1)
        out = {"expires_at": expires.isoformat()}
    else:
        out = {"error": {"code": "not_found", "message": "no such instance"}}
elif action == "release":
    state["leases"].pop(req["lease_id"], None)
    out = {}
elif action == "list":
    out = {"leases": list(state["leases"].values())}
with open(state_path, "w") as f:
    json.dump(state, f)
print(json.dumps(out))
"""


def write_script(tmp_path: Path, name: str, body: str, *, shell: bool = False) -> Path:
    path = tmp_path / name
    shebang = "#!/bin/sh" if shell else f"#!{sys.executable}"
    path.write_text(f"{shebang}\n{body.lstrip()}")
    path.chmod(0o755)
    return path


def good_provider(tmp_path: Path, *, skus: tuple[Sku, ...] = (H100,), **kw) -> CommandProvider:
    script = str(write_script(tmp_path, "burst", GOOD))
    argv = (script, str(tmp_path / "state.json"))
    commands = Commands(acquire=argv, release=argv, list=argv, renew=argv, **kw)
    return CommandProvider(commands, name="burst", skus=skus)


def calls(tmp_path: Path) -> list[dict[str, object]]:
    return json.loads((tmp_path / "state.json").read_text())["calls"]


def one_shot(tmp_path: Path, body: str, *, shell: bool = False, **kw) -> CommandProvider:
    """A provider whose every action runs the same script."""
    argv = (str(write_script(tmp_path, "script", body, shell=shell)),)
    return CommandProvider(
        Commands(acquire=argv, release=argv, list=argv, renew=argv, **kw),
        name="burst",
        skus=(H100,),
    )


# -- a good script -------------------------------------------------------------------------------


def test_acquire_sends_the_request_and_reads_the_leases(tmp_path: Path) -> None:
    p = good_provider(tmp_path)
    got = p.acquire("gpu_8x_h100_sxm5", 2, fabric="ib-7", now=T0)
    assert [(a.lease_id, a.node, a.address, a.fabric) for a in got] == [
        ("i-0001", "burst-1", "10.9.0.1", "ib-7"),
        ("i-0002", "burst-2", "10.9.0.2", "ib-7"),
    ]
    # The script gave no price: the SKU's configured one is what the lease costs.
    assert {(a.price_per_hour, a.acquired_at, a.expires_at) for a in got} == {(31.92, T0, None)}
    assert calls(tmp_path) == [
        {
            "version": 1,
            "provider": "burst",
            "action": "acquire",
            "sku": "gpu_8x_h100_sxm5",
            "count": 2,
            "fabric": "ib-7",
            "now": "2026-01-01T00:00:00+00:00",
        }
    ]


def test_renew_release_and_list(tmp_path: Path) -> None:
    p = good_provider(tmp_path)
    a, b = p.acquire("gpu_8x_h100_sxm5", 2, now=T0)
    assert p.held() == (a, b)
    assert p.renew(a.lease_id, now=T0 + timedelta(hours=2)) == T0 + timedelta(hours=3)
    p.release(a.lease_id, now=T0)
    p.release(a.lease_id, now=T0)  # the script answers {} for an unknown lease: quiet
    assert p.held() == (b,)
    with pytest.raises(LeaseNotHeld, match="lease i-0001: no such instance"):
        p.renew(a.lease_id, now=T0)
    assert [c["action"] for c in calls(tmp_path)] == [
        "acquire", "list", "renew", "release", "release", "list", "renew",
    ]  # fmt: skip
    assert calls(tmp_path)[-1] == {
        "version": 1, "provider": "burst", "action": "renew", "lease_id": "i-0001",
        "now": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip


def test_capacity_refusal_is_capacity_unavailable(tmp_path: Path) -> None:
    p = good_provider(tmp_path)
    with pytest.raises(CapacityUnavailable) as e:
        p.acquire("gpu_8x_h100_sxm5", 3, now=T0)
    assert str(e.value) == "provider burst: only 2 nodes left"
    assert p.held() == ()


def test_an_unknown_sku_is_refused_before_running_anything(tmp_path: Path) -> None:
    p = good_provider(tmp_path)
    with pytest.raises(UnknownSku):
        p.acquire("gpu_1x_a10", 1, now=T0)
    assert not (tmp_path / "state.json").exists()


def test_without_configured_skus_any_sku_goes_but_needs_a_price(tmp_path: Path) -> None:
    p = good_provider(tmp_path, skus=())
    with pytest.raises(ProviderMisbehaved) as e:
        p.acquire("whatever", 1, now=T0)
    assert "leases[0].price_per_hour is missing and sku whatever has no price" in str(e.value)
    assert "released the 1 leases it named" in str(e.value)  # not paid for unknowingly
    assert p.held() == ()


# -- scripts that go wrong -----------------------------------------------------------------------

FAILS = """
import sys
sys.stdin.read()
for i in range(8):
    print(f"trace line {i}", file=sys.stderr)
print("ERROR: quota exceeded for H100 in us-east-1", file=sys.stderr)
sys.exit(3)
"""


def test_non_zero_exit_quotes_the_end_of_stderr(tmp_path: Path) -> None:
    p = one_shot(tmp_path, FAILS)
    with pytest.raises(ProviderMisbehaved) as e:
        p.acquire("gpu_8x_h100_sxm5", 1, now=T0)
    message = str(e.value)
    assert message.startswith(
        f"provider burst: acquire command {tmp_path / 'script'} exited 3; stderr: "
    )
    assert message.endswith("trace line 7 | ERROR: quota exceeded for H100 in us-east-1")
    assert "trace line 3" not in message  # only the last lines: the end says what happened
    assert e.value.stderr_tail == (
        "trace line 4", "trace line 5", "trace line 6", "trace line 7",
        "ERROR: quota exceeded for H100 in us-east-1",
    )  # fmt: skip
    assert "\n" not in message


# fmt: off
BAD_OUTPUT = [
    # id,               what the script prints,                                 action,    the error says
    ("garbage",         "hello, world",                                         "acquire", "printed 'hello, world' on stdout, not a JSON object"),
    ("nothing",         "",                                                     "list",    "printed nothing on stdout, not a JSON object"),
    ("array",           "[]",                                                   "list",    "printed a JSON array, not an object"),
    ("no-leases",       '{"lease": []}',                                        "acquire", "acquire response: leases is missing"),
    ("leases-object",   '{"leases": {}}',                                       "list",    "list response: leases must be an array, got object"),
    ("no-lease-id",     '{"leases": [{"node": "n1"}]}',                         "acquire", "acquire response: leases[0].lease_id is missing"),
    ("lease-not-obj",   '{"leases": ["i-1"]}',                                  "acquire", "leases[0] must be an object, got string"),
    ("price-text",      '{"leases": [{"lease_id": "i-1", "price_per_hour": "3"}]}', "acquire", "leases[0].price_per_hour must be a number >= 0, got '3'"),
    ("naive-time",      '{"leases": [{"lease_id": "i-1", "expires_at": "2026-01-02T00:00:00"}]}', "acquire", "leases[0].expires_at must carry a UTC offset"),
    ("bad-time",        '{"leases": [{"lease_id": "i-1", "expires_at": "tomorrow"}]}', "acquire", "leases[0].expires_at must be an ISO 8601 time, got 'tomorrow'"),
    ("node-number",     '{"leases": [{"lease_id": "i-1", "node": 7}]}',         "acquire", "leases[0].node must be a string, got 7"),
    ("list-no-sku",     '{"leases": [{"lease_id": "i-1", "price_per_hour": 1}]}', "list",  "list response: leases[0].sku is missing"),
    ("renew-empty",     "{}",                                                   "renew",   "renew response: expires_at is missing"),
    ("bad-error",       '{"error": "boom"}',                                    "renew",   "renew response: error must be"),
]
# fmt: on


def _call(p: CommandProvider, action: str) -> object:
    if action == "acquire":
        return p.acquire("gpu_8x_h100_sxm5", 1, now=T0)
    if action == "renew":
        return p.renew("i-1", now=T0)
    return p.held()


@pytest.mark.parametrize(
    ("printed", "action", "says"), [c[1:] for c in BAD_OUTPUT], ids=[c[0] for c in BAD_OUTPUT]
)
def test_bad_output_names_what_is_wrong(
    tmp_path: Path, printed: str, action: str, says: str
) -> None:
    p = one_shot(tmp_path, f"import sys\nsys.stdin.read()\nprint({printed!r})\n")
    with pytest.raises(ProviderMisbehaved) as e:
        _call(p, action)
    assert says in str(e.value)


def test_a_short_acquire_gives_back_what_it_got(tmp_path: Path) -> None:
    # Asked for two, the script hands out one: the contract is all or nothing, so gpuctl
    # releases the one rather than paying for a node it does not track.
    body = """
import json, sys
req = json.load(sys.stdin)
with open(sys.argv[0] + ".log", "a") as f:
    f.write(json.dumps(req) + "\\n")
print(json.dumps({"leases": [{"lease_id": "i-9", "price_per_hour": 2.5}]} if req["action"] == "acquire" else {}))
"""
    p = one_shot(tmp_path, body)
    with pytest.raises(ProviderMisbehaved) as e:
        p.acquire("gpu_8x_h100_sxm5", 2, now=T0)
    assert "holds 1 leases; 2 distinct were asked" in str(e.value)
    assert "released the 1 leases it named" in str(e.value)
    log = [json.loads(line) for line in (tmp_path / "script.log").read_text().splitlines()]
    assert [(r["action"], r.get("lease_id")) for r in log] == [
        ("acquire", None),
        ("release", "i-9"),
    ]


# fmt: off
REFUSALS = [
    # id,                   error code,             action,    raises
    ("release-not-found",   "not_found",            "release", None),
    ("renew-not-found",     "not_found",            "renew",   LeaseNotHeld),
    ("acquire-capacity",    "capacity_unavailable", "acquire", CapacityUnavailable),
    ("acquire-other",       "quota_exceeded",       "acquire", ProviderError),
    ("release-other",       "api_down",             "release", ProviderError),
]
# fmt: on


@pytest.mark.parametrize(
    ("code", "action", "raises"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
def test_refusals(tmp_path: Path, code: str, action: str, raises: type[Exception] | None) -> None:
    answer = json.dumps({"error": {"code": code, "message": "said  the\nscript"}})
    p = one_shot(tmp_path, f"import sys\nsys.stdin.read()\nprint({answer!r})\n")
    run = {
        "acquire": lambda: p.acquire("gpu_8x_h100_sxm5", 1, now=T0),
        "renew": lambda: p.renew("i-1", now=T0),
        "release": lambda: p.release("i-1", now=T0),
    }[action]
    if raises is None:
        run()
        return
    with pytest.raises(raises) as e:
        run()
    assert "said the script" in str(e.value)  # one line, whitespace folded
    assert not isinstance(e.value, ProviderMisbehaved)  # a refusal is an answer, not garbage


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended; only its entry is left


def test_a_hanging_script_is_killed_with_its_whole_process_group(tmp_path: Path) -> None:
    # It ignores SIGTERM (so SIGKILL must follow), and leaves a child behind in its group.
    body = f"""
trap '' TERM
sleep 60 &
echo "$$ $!" > {tmp_path / "pids"}
echo "waiting for the cloud API" >&2
sleep 60
"""
    p = one_shot(tmp_path, body, shell=True, timeout_s=0.5, kill_grace_s=0.2)
    start = time.monotonic()
    with pytest.raises(ProviderMisbehaved) as e:
        p.acquire("gpu_8x_h100_sxm5", 1, now=T0)
    assert time.monotonic() - start < 5
    assert "did not finish within 0.5s; killed its process group" in str(e.value)
    assert "waiting for the cloud API" in str(e.value)
    pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 2  # SIGKILL is delivered at once; the kernel may lag a little
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [pid for pid in pids if _alive(pid)], "the script or its child is still running"


def test_a_missing_script_is_a_configuration_error(tmp_path: Path) -> None:
    argv = (str(tmp_path / "nope"),)
    p = CommandProvider(Commands(acquire=argv, release=argv, list=argv), name="burst")
    with pytest.raises(ProviderMisconfigured) as e:
        p.held()
    assert (
        str(e.value)
        == f"provider burst: list command {tmp_path / 'nope'} does not exist; fix the provider's list"
    )


def test_a_script_that_is_not_executable_is_a_configuration_error(tmp_path: Path) -> None:
    path = write_script(tmp_path, "burst", GOOD)
    path.chmod(0o644)
    argv = (str(path),)
    p = CommandProvider(Commands(acquire=argv, release=argv, list=argv), name="burst")
    with pytest.raises(ProviderMisconfigured, match=r"is not executable \(chmod \+x it\?\)"):
        p.release("i-1", now=T0)


def test_renew_without_a_renew_command(tmp_path: Path) -> None:
    argv = (str(write_script(tmp_path, "burst", GOOD)), str(tmp_path / "state.json"))
    p = CommandProvider(Commands(acquire=argv, release=argv, list=argv), name="burst")
    with pytest.raises(ProviderMisconfigured, match="no renew command is configured"):
        p.renew("i-1", now=T0)


def test_from_settings(tmp_path: Path) -> None:
    settings = {
        "name": "burst",
        "kind": "command",
        "acquire": ["/bin/true"],
        "release": ["/bin/true"],
        "list": ["/bin/true"],
        "timeout_s": 5,
        "sku": [{"name": "big", "gpu_model": "H200 SXM", "gpu_count": 8, "price_per_hour": 20}],
    }
    p = CommandProvider.from_settings(settings)
    (sku,) = p.skus()
    assert (sku.provider, sku.name, sku.gpu_memory_gb, sku.nvlink_gbps, sku.price_per_hour) == (
        "burst", "big", 141, 900, 20,
    )  # fmt: skip
    with pytest.raises(InvalidArgument) as e:
        CommandProvider.from_settings(
            {
                **settings,
                "acquire": "/bin/true",
                "list": None,
                "timeout": 3,
                "sku": [{"gpu_count": 1}],
            }
        )
    assert sorted(v.field for v in e.value.violations) == [
        "acquire",
        "list",
        "sku[0].name",
        "timeout",
    ]

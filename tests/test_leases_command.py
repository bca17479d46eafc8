"""The command provider driven through the lease keeper, with real scripts written to tmp_path:
a job's node is acquired, used and released by the scripts; a refusal fails over to the next
SKU; a script that prints garbage or hangs fails the lease with the script's own words; a
lease only the script knows of is found at start and given back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gpuctl.core.errors import FailedPrecondition
from gpuctl.core.model import JobState, LeaseState
from gpuctl.runtime.leases import LeaseSettings, build_providers
from tests.lease_rig import Rig, agent_node, training

# A cloud in a JSON file (argv[1]): `capacity` nodes per sku, every request kept in "calls".
CLOUD = """
import json, sys

state_path = sys.argv[1]
req = json.load(sys.stdin)
with open(state_path) as f:
    state = json.load(f)
state["calls"].append(req)
action = req["action"]
if action == "acquire":
    used = sum(1 for x in state["leases"].values() if x["sku"] == req["sku"])
    left = state["capacity"].get(req["sku"], 0) - used
    if req["count"] > left:
        out = {"error": {"code": "capacity_unavailable",
                         "message": f"{req['sku']}: {max(left, 0)} left"}}
    else:
        out = {"leases": []}
        for _ in range(req["count"]):
            state["seq"] += 1
            n = state["seq"]
            lease = {"lease_id": f"i-{n:04d}", "sku": req["sku"], "node": f"burst-{n}",
                     "address": f"10.9.0.{n}", "fabric": "ib-burst/s1/l1",
                     "acquired_at": req["now"], "expires_at": None}
            state["leases"][lease["lease_id"]] = lease
            out["leases"].append(lease)
elif action == "renew":
    out = {"expires_at": None}
elif action == "release":
    state["leases"].pop(req["lease_id"], None)
    out = {}
elif action == "list":
    out = {"leases": list(state["leases"].values())}
with open(state_path, "w") as f:
    json.dump(state, f)
print(json.dumps(out))
"""


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body.lstrip()}")
    path.chmod(0o755)
    return str(path)


def cloud(tmp_path: Path, capacity: dict[str, int], leases: dict | None = None) -> Path:
    state = tmp_path / "cloud.json"
    state.write_text(
        json.dumps({"leases": leases or {}, "seq": 100, "calls": [], "capacity": capacity})
    )
    return state


def table(tmp_path: Path, state: Path, *, acquire: str | None = None, timeout_s: float = 30.0):
    argv = [script(tmp_path, "cloud", CLOUD), str(state)]
    sku = {"gpu_model": "H100 SXM", "gpu_count": 8, "network_kind": "infiniband",
           "network_gbps": 3200}  # fmt: skip
    return {
        "name": "burst",
        "kind": "command",
        "acquire": [acquire] if acquire else argv,
        "release": argv,
        "list": argv,
        "timeout_s": timeout_s,
        "kill_grace_s": 0.2,
        "sku": [
            {"name": "h100-spot", "price_per_hour": 12.0, **sku},
            {"name": "h100-ondemand", "price_per_hour": 31.92, **sku},
        ],
    }


def rig_for(tmp_path: Path, tables: list[dict]) -> Rig:
    return Rig(tmp_path, list(build_providers(tables, base_dir=tmp_path)), LeaseSettings())


def calls(state: Path) -> list[tuple[str, str]]:
    return [
        (c["action"], c.get("sku") or c.get("lease_id") or "")
        for c in json.loads(state.read_text())["calls"]
    ]


def test_scripts_acquire_fail_over_and_release_a_jobs_node(tmp_path):
    state = cloud(tmp_path, {"h100-spot": 0, "h100-ondemand": 2})
    rig = rig_for(tmp_path, [table(tmp_path, state)])
    job = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()  # the spot SKU is cheapest
    rig.keeper.tick()  # ... and refused
    (failed,) = rig.lease_of(job.id)
    assert failed.state is LeaseState.FAILED
    assert "h100-spot: 0 left" in rig.store.get_job(job.id).reason
    (request,) = rig.ctl.run_cycle().lease_requests
    assert request.sku == "h100-ondemand"
    rig.keeper.tick()
    lease = next(x for x in rig.lease_of(job.id) if x.state is LeaseState.REQUESTED)
    assert (lease.provider_lease_id, lease.node_id, lease.price_per_hour) == (
        "i-0101",
        "burst-101",
        31.92,  # the SKU's configured price: the script gave none
    )
    rig.ctl.register_node(agent_node("burst-101"))
    rig.ctl.run_cycle()
    rig.run(job.id)
    rig.ctl.run_cycle()
    rig.keeper.tick()
    assert next(x for x in rig.lease_of(job.id) if x.id == lease.id).state is LeaseState.RELEASED
    assert json.loads(state.read_text())["leases"] == {}  # the cloud holds nothing
    with pytest.raises(FailedPrecondition, match=r"its lease \S+ is released; it joins again"):
        rig.ctl.register_node(agent_node("burst-101"))  # an agent outliving its machine's lease
    assert calls(state) == [
        ("list", ""),  # reconciling on the first tick
        ("acquire", "h100-spot"),
        ("acquire", "h100-ondemand"),
        ("release", "i-0101"),
    ]


def test_a_script_printing_garbage_fails_the_lease_with_what_it_printed(tmp_path):
    state = cloud(tmp_path, {"h100-spot": 2})
    garbage = script(tmp_path, "garbage", "print('Traceback: boom')\n")
    rig = rig_for(tmp_path, [table(tmp_path, state, acquire=garbage)])
    job = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    (lease,) = rig.lease_of(job.id)
    assert lease.state is LeaseState.FAILED
    reason = rig.store.get_job(job.id).reason
    assert "printed 'Traceback: boom' on stdout, not a JSON object" in reason
    assert rig.store.get_job(job.id).state is JobState.PENDING


def test_a_hanging_script_is_killed_and_the_lease_fails(tmp_path):
    state = cloud(tmp_path, {"h100-spot": 2})
    hang = script(tmp_path, "hang", "import time\ntime.sleep(60)\n")
    rig = rig_for(tmp_path, [table(tmp_path, state, acquire=hang, timeout_s=0.3)])
    job = rig.ctl.submit(training(nodes=1))
    rig.ctl.run_cycle()
    rig.keeper.tick()
    assert rig.lease_of(job.id)[0].state is LeaseState.FAILED
    assert "did not finish within 0.3s; killed its process group" in (
        rig.store.get_job(job.id).reason
    )


def test_a_lease_only_the_script_knows_is_found_at_start_and_given_back(tmp_path):
    orphan = {"lease_id": "i-0042", "sku": "h100-spot", "node": "burst-42", "address": "",
              "fabric": "", "price_per_hour": 12.0, "acquired_at": None, "expires_at": None}  # fmt: skip
    state = cloud(tmp_path, {"h100-spot": 2}, leases={"i-0042": orphan})
    rig = rig_for(tmp_path, [table(tmp_path, state)])
    rig.keeper.tick()
    assert json.loads(state.read_text())["leases"] == {}
    (recorded,) = rig.leases()
    assert (recorded.provider_lease_id, recorded.state) == ("i-0042", LeaseState.RELEASED)
    rig.keeper.tick()
    assert calls(state) == [("list", ""), ("release", "i-0042")]  # once

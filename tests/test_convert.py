"""Model <-> protobuf conversion loses nothing: every field set, round-tripped, equal."""

from __future__ import annotations

from dataclasses import fields, replace

from gpuctl.api import convert
from gpuctl.core.model import JobKind, JobSpec, NodeState, OnNodeLost
from tests.test_store_contract import h100_profile, node


def test_node_round_trips_through_protobuf():
    original = replace(node("n1"), state=NodeState.DEGRADED)
    original = replace(original, labels=tuple(sorted(original.labels)))  # a proto map is unordered
    back = convert.node_from_pb(convert.node_to_pb(original))
    assert back == original


def test_every_gpu_field_is_set_in_the_fixture():
    # A field added to Gpu without a conversion would pass the round trip at its default.
    gpus = h100_profile().gpus
    defaults = type(gpus[0])(index=0, uuid="", model="", memory_mib=0, hbm_gbps=0.0)
    unset = [
        f.name
        for f in fields(defaults)
        if all(getattr(g, f.name) == getattr(defaults, f.name) for g in gpus)
    ]
    assert unset == []


def test_spec_round_trips_through_protobuf():
    spec = JobSpec(
        kind=JobKind.INFERENCE,
        command=("python", "serve.py"),
        name="chat",
        owner="alice",
        queue="prod",
        priority=5,
        env=(("A", "1"), ("B", "2")),
        working_dir="/srv",
        time_limit_s=3600,
        replicas=3,
        gpu_milli=500,
        gpu_memory_mib=20_000,
        gpu_model="L40S",
        cpu_milli=4000,
        memory_mib=16_000,
        min_nvlink_gbps=1.0,
        min_net_gbps=2.0,
        on_node_lost=OnNodeLost.FAIL,
        preemptible=True,
        target_tokens_per_s=40.0,
        weights_gb=14.0,
    )
    assert convert.spec_from_pb(convert.spec_to_pb(spec), owner="alice") == spec


def test_every_spec_field_round_trips_through_protobuf():
    from tests.test_store_contract import assert_every_field_set, full_spec

    spec = full_spec()
    spec = replace(spec, env=tuple(sorted(spec.env)))  # the wire's map comes back sorted
    assert_every_field_set(spec)
    assert convert.spec_from_pb(convert.spec_to_pb(spec), owner=spec.owner) == spec

"""`python -m gpuctl.fuzz`: a bounded RPC fuzzer against a gpuctld of its own on loopback. It owns
the requests (random, mutated from valid ones, or raw bytes; all from the protobuf descriptors and
one seeded RNG), the credentials they carry, and the report: codes per method, crashes,
INTERNAL/UNKNOWN with examples, hangs, RSS, and whether the stored data still reads back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pwd
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import psutil
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2

from gpuctl.agent.probe import fake_profile, parse_fake_gpus, parse_network
from gpuctl.api import convert
from gpuctl.api._pb.agent.v1 import agent_pb2
from gpuctl.api._pb.v1 import auth_pb2, jobs_pb2, leases_pb2, nodes_pb2
from gpuctl.api.auth import auth_socket_path, bearer, fetch_session
from gpuctl.api.client import Client
from gpuctl.core.model import JobKind, JobSpec, Node
from gpuctl.core.trust import ROLE_PERMISSIONS, Permission, Role
from gpuctl.core.validation import MAX_NODE_GPUS, MAX_PRICE_PER_HOUR
from gpuctl.testbed import FAST_CONFIG, LocalCluster

NODE = "node-x"  # the one node the fuzzer's node token speaks for
MAX_DEPTH = 4  # nested messages below this stay unset
STREAM_WINDOW_S = 0.3  # a watch or log follow is cancelled after this, or after STREAM_READS
STREAM_READS = 3
SLOW_S = 1.0  # a unary call slower than this is counted as slow (a hang is the deadline)
EXAMPLES = 5  # kept per method and kind of failure
# An error message longer than this echoes what the caller sent: past 8 KiB of headers, gRPC
# clients at their defaults get RESOURCE_EXHAUSTED instead of the daemon's answer.
LONG_DETAILS = 2048

# -- values --------------------------------------------------------------------------------

_I32 = (0, 1, -1, 2, 8, 2**31 - 1, -(2**31), 2**31 - 2)
_I64 = (0, 1, -1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, -(2**63))
_U32 = (0, 1, 2**32 - 1)
_U64 = (0, 1, 2**63, 2**64 - 1)
_DOUBLE = (0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 1e-300)
_FLOAT = (0.0, -0.0, 1.0, math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45)
# type -> (extremes, lowest, highest)
_INTS = {
    FD.TYPE_INT32: (_I32, -(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (_I32, -(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (_I32, -(2**31), 2**31 - 1),
    FD.TYPE_INT64: (_I64, -(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (_I64, -(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (_I64, -(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (_U32, 0, 2**32 - 1),
    FD.TYPE_FIXED32: (_U32, 0, 2**32 - 1),
    FD.TYPE_UINT64: (_U64, 0, 2**64 - 1),
    FD.TYPE_FIXED64: (_U64, 0, 2**64 - 1),
}
# Timestamps and Durations at and past the ends of what protobuf, datetime and gpuctl accept.
_SECONDS = (0, 1, -1, 1_700_000_000, 7_258_118_400, 253_402_300_799, 253_402_300_800)
_SECONDS += (-62_135_596_800, -62_135_596_801, 315_576_000_000, -315_576_000_001)
_SECONDS += (2**63 - 1, -(2**63))
_NANOS = (0, 1, -1, 999_999_999, 1_000_000_000, 2**31 - 1, -(2**31))
# Never NODE: CreateNodeToken for it would revoke the credential the fuzzer's agent calls with.
_WORDS = (
    "", "node-y", "fuzzer", "fuzz-operator", "default", "root", "*", "jobs/1", "1",
    "nodes/node-y", "jobs/0", "jobs/-1", "jobs/99999999999999999999", "jobs/1 ", "jobs/²",
    "../../etc/passwd", "%s%n%x{0}{}", "' OR 1=1 --", "a\x00b", "\x00", "\t\n\r", "\x1b[2J",
    "é日本語🚀", "\u202egnp.exe", "e\u0301", "\ufeff", "\uffff\U0010ffff", "١٢٣", "\u00a0",
    "H100 SXM", "gpuctl.0123456789abcdef.x", "gpuctl-session.x", "MTAw", "LTE=", "-1",
)  # fmt: skip
_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./: "
    "\x00\x01\x7f\n\"'\\%{}éßΩжあ日🚀\u200b\u202e\ufffd\U0010ffff"
)
_HUGE = (256, 1025, 4097, 8193, 16385, 65536)
_BAD_WIRE = (
    b"\x0f",  # field 1, wire type 7: there is none
    b"\x0b\x0c",  # field 1 as a group
    b"\x08" + b"\xff" * 10 + b"\x01",  # a varint of 11 bytes
    b"\x0a\xff\xff\xff\xff\x0f",  # a length of 4 GiB, and nothing after it
    b"\x0a\x02\xc3\x28",  # field 1: two bytes that are not UTF-8
    b"\x12\x03\xed\xa0\x80",  # field 2: an encoded UTF-16 surrogate
    b"\x00",  # field number 0
    b"\xfa\xff\xff\xff\x0f\x00",  # field 2^29 - 1, beyond every message's
)
_TIME_TYPES = ("google.protobuf.Timestamp", "google.protobuf.Duration")


def _is_map(f: FD) -> bool:
    return f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


class Requests:
    """Request messages and bytes from one seeded RNG: random, mutated from a valid request, or
    raw bytes that may not be protobuf at all."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def message(self, cls: type[Message]) -> Message:
        return self.fill(cls(), 0, small=False)

    def fill(self, msg: Message, depth: int, small: bool) -> Message:
        if msg.DESCRIPTOR.full_name in _TIME_TYPES:
            msg.seconds = self.rng.choice(_SECONDS)
            msg.nanos = self.rng.choice(_NANOS)
            return msg
        for f in msg.DESCRIPTOR.fields:
            if self.rng.random() < 0.6:
                self.assign(msg, f, depth, small)
        return msg

    def draw(
        self, method: Method, valid: Callable[[random.Random], Message] | None
    ) -> tuple[Message | None, bytes, str, str]:
        """(message, its bytes, mode, change) for one call: 40 % random, 40 % mutated from
        `valid`'s, 20 % raw bytes (message None)."""
        pick = self.rng.random()
        if pick < 0.4 or valid is None:
            msg, mode, change = self.message(method.request), "random", ""
        else:
            (msg, change), mode = self.mutate(valid(self.rng)), "mutated"
        payload = msg.SerializeToString()
        if pick >= 0.8:
            return None, self.garbage(payload), "raw", ""
        return msg, payload, mode, change

    def mutate(self, valid: Message) -> tuple[Message, str]:
        """A copy of `valid` with one to three fields, anywhere in it, set to extreme values,
        and what was changed ("profile.gpus[2].hbm_gbps = nan")."""
        out = type(valid)()
        out.CopyFrom(valid)
        slots = list(self._slots(out, "", 0))
        changes = []
        for _ in range(self.rng.choice((1, 1, 1, 2, 3)) if slots else 0):
            msg, f, path, depth = self.rng.choice(slots)
            self.assign(msg, f, depth, small=False, extreme=True)
            changes.append(f"{path} = {_show(msg, f)}")
        return out, "; ".join(changes)

    def garbage(self, valid: bytes) -> bytes:
        """Bytes for a request that are mostly not a valid encoding of it."""
        rng = self.rng
        pick = rng.randrange(5)
        if pick == 0 or not valid:
            return rng.randbytes(rng.choice((1, 3, 16, 200, 4096)))
        if pick == 1:  # a few bytes flipped
            out = bytearray(valid)
            for _ in range(rng.choice((1, 2, 4))):
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
            return bytes(out)
        if pick == 2:
            return valid[: rng.randrange(len(valid))]
        if pick == 3:
            return rng.choice(_BAD_WIRE)
        return valid + rng.choice(_BAD_WIRE)

    def assign(self, msg: Message, f: FD, depth: int, small: bool, extreme: bool = False) -> None:
        msg.ClearField(f.name)
        target = getattr(msg, f.name)
        if _is_map(f):
            key_f, value_f = (
                f.message_type.fields_by_name["key"],
                f.message_type.fields_by_name["value"],
            )
            n = self._count(small)
            for _ in range(n):
                key = self.scalar(key_f, True, extreme)
                if value_f.type == FD.TYPE_MESSAGE:
                    if depth < MAX_DEPTH:
                        self.fill(target[key], depth + 1, True)
                else:
                    target[key] = self.scalar(value_f, small or n > 8, extreme)
        elif f.is_repeated:
            n = self._count(small)
            if f.type != FD.TYPE_MESSAGE:
                target.extend(self.scalar(f, small or n > 8, extreme) for _ in range(n))
            elif depth < MAX_DEPTH:
                for _ in range(min(n, 1025)):
                    self.fill(target.add(), depth + 1, small or n > 8)
        elif f.type == FD.TYPE_MESSAGE:
            if depth < MAX_DEPTH:
                target.SetInParent()
                self.fill(target, depth + 1, small)
        else:
            setattr(msg, f.name, self.scalar(f, small, extreme))

    def scalar(self, f: FD, small: bool, extreme: bool):
        rng = self.rng
        if f.type in _INTS:
            extremes, lo, hi = _INTS[f.type]
            pick = 0 if extreme else rng.randrange(4)
            if pick <= 1:
                return rng.choice(extremes)
            return rng.randint(lo, hi) if pick == 2 else min(max(rng.randint(-3, 100), lo), hi)
        if f.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            values = _DOUBLE if f.type == FD.TYPE_DOUBLE else _FLOAT
            return rng.choice(values) if extreme or rng.random() < 0.6 else rng.uniform(-1e6, 1e6)
        if f.type == FD.TYPE_BOOL:
            return rng.random() < 0.5
        if f.type == FD.TYPE_ENUM:
            known = [v.number for v in f.enum_type.values]
            unknown = [len(known), 99, -1, 2**31 - 1, -(2**31)]
            return rng.choice(unknown if extreme or rng.random() < 0.3 else known)
        if f.type == FD.TYPE_STRING:
            return self.text(small, extreme)
        if f.type == FD.TYPE_BYTES:
            return self.text(small, extreme).encode()
        raise TypeError(f"no values for field {f.full_name} of type {f.type}")

    def text(self, small: bool, extreme: bool) -> str:
        rng = self.rng
        pick = rng.random()
        if not small and (pick < 0.12 or (extreme and pick < 0.5)):
            n = rng.choice(_HUGE)
            if rng.random() < 0.5:
                return rng.choice(("a", "é", "🚀", "\x00", "/", "9")) * n
            return "".join(rng.choices(_ALPHABET, k=n))
        if pick < 0.6:
            return rng.choice(_WORDS)
        return "".join(rng.choices(_ALPHABET, k=rng.randint(1, 24)))

    def _count(self, small: bool) -> int:
        if not small and self.rng.random() < 0.03:
            return self.rng.choice((65, 257, 1025, 4097, 20000))
        return self.rng.choice((0, 0, 1, 1, 2, 3, 5))

    def _slots(self, msg: Message, prefix: str, depth: int) -> Iterator[tuple]:
        """(message, field, path, depth) for every field of `msg` and the messages in it."""
        for f in msg.DESCRIPTOR.fields:
            yield msg, f, prefix + f.name, depth
            if f.type != FD.TYPE_MESSAGE or _is_map(f):
                continue
            if f.is_repeated:
                for i, element in enumerate(getattr(msg, f.name)):
                    yield from self._slots(element, f"{prefix}{f.name}[{i}].", depth + 1)
            elif msg.HasField(f.name):
                yield from self._slots(getattr(msg, f.name), f"{prefix}{f.name}.", depth + 1)


def _show(msg: Message, f: FD) -> str:
    """A field's value, short."""
    value = getattr(msg, f.name)
    if _is_map(f) or f.is_repeated:
        first = f", first {_short(next(iter(value)))}" if len(value) else ""
        return f"{len(value)} elements{first}"
    if f.type == FD.TYPE_MESSAGE:
        return "{" + text_format.MessageToString(value, as_one_line=True)[:120] + "}"
    if f.type == FD.TYPE_ENUM:
        known = f.enum_type.values_by_number.get(value)
        return known.name if known else f"{value} (no such {f.enum_type.name})"
    return _short(value)


def _short(value) -> str:
    if isinstance(value, str | bytes) and len(value) > 40:
        return f"{value[:24]!r}... ({len(value)} long)"
    return repr(value) if not isinstance(value, Message) else "{...}"


# -- what is fuzzed ------------------------------------------------------------------------

_SERVICE_MODULES = (jobs_pb2, nodes_pb2, leases_pb2, auth_pb2, agent_pb2, health_pb2)


@dataclass(frozen=True, slots=True)
class Method:
    key: str  # "JobService.CreateJob"
    path: str  # "/gpuctl.v1.JobService/CreateJob"
    request: type[Message]
    streaming: bool


def methods() -> tuple[Method, ...]:
    """Every method of gpuctld's services, and grpc.health.v1's Check, in descriptor order."""
    out = []
    for module in _SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                if service.name == "Health" and m.name != "Check":
                    continue  # Watch streams forever by design; List is not gpuctl's
                out.append(
                    Method(
                        key=f"{service.name}.{m.name}",
                        path=f"/{service.full_name}/{m.name}",
                        request=GetMessageClass(m.input_type),
                        streaming=m.server_streaming,
                    )
                )
    return tuple(out)


# The permission each method's @rpc decorator (api/servicers.py) names: an OK for a role without
# it is a breach. None: any authenticated caller; "anyone": no credentials at all.
PERMISSIONS: dict[str, Permission | str | None] = {
    "JobService.CreateJob": Permission.JOBS_SUBMIT,
    "JobService.GetJob": Permission.JOBS_OWN,
    "JobService.ListJobs": Permission.JOBS_OWN,
    "JobService.CancelJob": Permission.JOBS_OWN,
    "JobService.ScaleJob": Permission.JOBS_OWN,
    "JobService.UpdateJob": Permission.JOBS_OWN,
    "JobService.WatchJobs": Permission.JOBS_OWN,
    "JobService.StreamJobLogs": Permission.JOBS_OWN,
    "NodeService.ListNodes": Permission.NODES_READ,
    "NodeService.GetNode": Permission.NODES_READ,
    "NodeService.DrainNode": Permission.NODES_MANAGE,
    "NodeService.UndrainNode": Permission.NODES_MANAGE,
    "LeaseService.ListLeases": Permission.LEASES_READ,
    "LeaseService.GetCost": Permission.COST_ALL,
    "AuthService.WhoAmI": None,
    "AuthService.CreateToken": Permission.TOKENS_OWN,
    "AuthService.ListTokens": Permission.TOKENS_OWN,
    "AuthService.RevokeToken": Permission.TOKENS_OWN,
    "AuthService.CreateNodeToken": Permission.NODES_MANAGE,
    "AuthService.CreateJoinToken": Permission.NODES_MANAGE,
    "AuthService.ListAudit": Permission.AUDIT_READ,
    "AgentService.JoinNode": Permission.JOIN,
    "AgentService.RegisterNode": Permission.AGENT,
    "AgentService.Heartbeat": Permission.AGENT,
    "AgentService.ReportRankStatus": Permission.AGENT,
    "AgentService.PushLogs": Permission.AGENT,
    "Health.Check": "anyone",
}


def may_succeed(method: str, role: Role | None) -> bool:
    """Whether a caller of `role` (None: not authenticated) may get an answer from `method`."""
    needs = PERMISSIONS.get(method, "anyone")
    if needs == "anyone":
        return True
    if role is None:
        return False
    return needs is None or needs in ROLE_PERMISSIONS[role]


@dataclass(frozen=True, slots=True, kw_only=True)
class Seeds:
    """What valid requests are made of: jobs that exist, the node the node token is for."""

    job_ids: tuple[int, ...] = (1, 2, 3)
    revoked_id: str = "0123456789abcdef"


SINCE = Timestamp(seconds=1_700_000_000)  # fixed, so that a seed gives the same bytes
# A signing request for "system:node:node-x" (EC P-256), fixed for the same reason.
CSR = b"""-----BEGIN CERTIFICATE REQUEST-----
MIHXMH8CAQAwHTEbMBkGA1UEAwwSc3lzdGVtOm5vZGU6bm9kZS14MFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAET5TBWsuEAbHrm+OhcuWS4FfmAAlKNLYoDUMXvcnR
ci3dgQOsyA7gLuMC5zDhKw6DeMNjBHuw/2OB9ibpDIp1QqAAMAoGCCqGSM49BAMC
A0gAMEUCIBsuG+9VkZRsIWu7q9zlQ9ZZlTE6guEF9BBsLke1tjSlAiEAtojXl906
3mQOfJdIxjD6mSHi550M9m4tZuGWt1Cr21A=
-----END CERTIFICATE REQUEST-----
"""


def valid_specs() -> tuple[jobs_pb2.JobSpec, ...]:
    training = JobSpec(
        kind=JobKind.TRAINING,
        command=("python", "-c", "print('fuzz')"),
        name="fuzz-train",
        num_nodes=1,
        gpus_per_node=1,
        env=(("A", "1"), ("TOKEN", "s3cret")),
        secret_env=("TOKEN",),
        time_limit_s=600,
        cpu_milli=1000,
        memory_mib=1024,
    )
    inference = JobSpec(
        kind=JobKind.INFERENCE,
        command=("sleep", "30"),
        name="fuzz-serve",
        replicas=2,
        gpu_milli=500,
        gpu_memory_mib=16384,
        target_tokens_per_s=50.0,
        weights_gb=10.0,
        preemptible=True,
    )
    return convert.spec_to_pb(training), convert.spec_to_pb(inference)


def valid_node() -> nodes_pb2.Node:
    profile = fake_profile(
        parse_fake_gpus("h100-sxm:8"), node_name=NODE, network=parse_network("infiniband:8x400")
    )
    node = Node(
        id=NODE,
        address="127.0.0.1",
        fabric="ib-fuzz/spine-1/leaf-1",
        sku="8x H100 SXM",
        labels=(("zone", "a"),),
        cpu_milli=64_000,
        memory_mib=512 * 1024,
        profile=profile,
        price_per_hour=23.92,
    )
    return convert.node_to_pb(node)


def valid_requests(seeds: Seeds) -> dict[str, Callable[[random.Random], Message]]:
    """A valid request per method, for mutation (the rest of the fields at their defaults)."""
    specs, node = valid_specs(), valid_node()

    def job(rng: random.Random) -> str:
        return f"jobs/{rng.choice(seeds.job_ids)}"

    def ref(rng: random.Random) -> agent_pb2.RankRef:
        return agent_pb2.RankRef(job_id=rng.choice(seeds.job_ids), rank=0, attempt=0)

    hour = Duration(seconds=3600)
    return {
        "JobService.CreateJob": lambda rng: jobs_pb2.CreateJobRequest(
            spec=rng.choice(specs),
            request_id=f"fuzz-{rng.getrandbits(64):016x}",
            validate_only=rng.random() < 0.5,
        ),
        "JobService.GetJob": lambda rng: jobs_pb2.GetJobRequest(name=job(rng)),
        "JobService.ListJobs": lambda rng: jobs_pb2.ListJobsRequest(
            page_size=rng.choice((1, 10, 100)), states=[jobs_pb2.JOB_STATE_PENDING]
        ),
        "JobService.CancelJob": lambda rng: jobs_pb2.CancelJobRequest(name=job(rng)),
        "JobService.UpdateJob": lambda rng: jobs_pb2.UpdateJobRequest(
            name=job(rng),
            spec=jobs_pb2.JobSpec(
                kind=jobs_pb2.JOB_KIND_INFERENCE,
                command=["serve", "--v2"],
                gpus_per_node=rng.choice((0, 1, 99)),
                max_unavailable=rng.choice((0, 1, -1)),
            ),
        ),
        "JobService.ScaleJob": lambda rng: jobs_pb2.ScaleJobRequest(
            name=job(rng), replicas=rng.choice((-1, 0, 1, 3, 10_001, 2**31 - 1))
        ),
        "JobService.WatchJobs": lambda rng: jobs_pb2.WatchJobsRequest(
            name=rng.choice(("", job(rng)))
        ),
        "JobService.StreamJobLogs": lambda rng: jobs_pb2.StreamJobLogsRequest(
            name=job(rng), follow=rng.random() < 0.5
        ),
        "NodeService.ListNodes": lambda rng: nodes_pb2.ListNodesRequest(page_size=10),
        "NodeService.GetNode": lambda rng: nodes_pb2.GetNodeRequest(name=NODE),
        "NodeService.DrainNode": lambda rng: nodes_pb2.DrainNodeRequest(name=NODE, reason="fuzz"),
        "NodeService.UndrainNode": lambda rng: nodes_pb2.UndrainNodeRequest(name=NODE),
        "LeaseService.ListLeases": lambda rng: leases_pb2.ListLeasesRequest(
            page_size=10, include_released=True
        ),
        "LeaseService.GetCost": lambda rng: leases_pb2.GetCostRequest(
            since=SINCE, group_by=rng.choice((1, 2, 3))
        ),
        "AuthService.WhoAmI": lambda rng: auth_pb2.WhoAmIRequest(),
        "AuthService.CreateToken": lambda rng: auth_pb2.CreateTokenRequest(
            user=rng.choice(("", "fuzzer")), description="fuzz", ttl=hour
        ),
        "AuthService.ListTokens": lambda rng: auth_pb2.ListTokensRequest(
            user=rng.choice(("", "*"))
        ),
        "AuthService.RevokeToken": lambda rng: auth_pb2.RevokeTokenRequest(id=seeds.revoked_id),
        # Not NODE: a new credential for it may revoke the one the fuzzer calls with.
        "AuthService.CreateNodeToken": lambda rng: auth_pb2.CreateNodeTokenRequest(
            node="node-y", ttl=hour
        ),
        "AuthService.CreateJoinToken": lambda rng: auth_pb2.CreateNodeTokenRequest(
            node="node-y", ttl=hour
        ),
        "AuthService.ListAudit": lambda rng: auth_pb2.ListAuditRequest(since=SINCE, limit=10),
        "AgentService.JoinNode": lambda rng: agent_pb2.JoinNodeRequest(csr_pem=CSR),
        "AgentService.RegisterNode": lambda rng: agent_pb2.RegisterNodeRequest(
            node=node, running=[ref(rng)]
        ),
        "AgentService.Heartbeat": lambda rng: agent_pb2.HeartbeatRequest(
            node_name=NODE,
            running=[ref(rng)],
            health_issues=rng.choice(((), ("GPU 3: NVLink 2/18 down",))),
            profile=node.profile if rng.random() < 0.5 else None,
        ),
        "AgentService.ReportRankStatus": lambda rng: agent_pb2.ReportRankStatusRequest(
            node_name=NODE,
            ref=ref(rng),
            state=jobs_pb2.RANK_STATE_EXITED,
            exit_code=rng.choice((0, 1, -9)),
            message="exited",
            time=SINCE,
        ),
        "AgentService.PushLogs": lambda rng: agent_pb2.PushLogsRequest(
            node_name=NODE, ref=ref(rng), data=b"step 1: loss 0.5\n"
        ),
        "Health.Check": lambda rng: health_pb2.HealthCheckRequest(
            service=rng.choice(("", "gpuctl.v1.JobService"))
        ),
    }


# -- credentials ---------------------------------------------------------------------------

_GARBAGE_AUTH = (
    "Bearer gpuctl.0123456789abcdef.notthesecret",
    "Bearer gpuctl-session.notasession",
    "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJyb290In0.",
    "Bearer " + "A" * 8193,
    "Basic cm9vdDpyb290",
    "Bearer",
    "bearer   gpuctl..",
    "Bearer gpuctl.x.y.z",
)


@dataclass(frozen=True, slots=True)
class Credential:
    name: str
    role: Role | None  # None: the daemon must not accept it
    channel: grpc.Channel
    metadata: Callable[[random.Random], tuple[tuple[str, str], ...]]


def _bearer(token: str) -> Callable[[random.Random], tuple[tuple[str, str], ...]]:
    return lambda rng: bearer(token)


def _garbage_auth(rng: random.Random) -> tuple[tuple[str, str], ...]:
    if rng.random() < 0.1:  # two headers: the daemon must not pick one
        return (("authorization", "Bearer a"), ("authorization", "Bearer b"))
    return (("authorization", rng.choice(_GARBAGE_AUTH)),)


# -- the report ----------------------------------------------------------------------------


@dataclass(slots=True)
class Example:
    method: str
    credential: str
    mode: str  # random | mutated | raw
    change: str  # for a mutated request: the fields changed from a valid one
    code: str
    details: str
    request: str
    log: str = ""  # what the daemon logged during the call


@dataclass(slots=True)
class MethodStats:
    calls: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    said: dict[str, str] = field(default_factory=dict)  # the first details seen with each code
    max_ms: float = 0.0
    slow: int = 0


@dataclass(slots=True)
class Report:
    seed: int
    messages: int
    sent: int = 0
    wall_s: float = 0.0
    methods: dict[str, MethodStats] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    internal: int = 0
    undecodable: int = 0  # of the INTERNALs: gRPC's own "Exception deserializing request!"
    unknown: int = 0
    hangs: int = 0
    breaches: int = 0  # OK for a credential whose role may not call the method
    long_details: int = 0  # errors whose message is over LONG_DETAILS characters (not failures)
    crashes: int = 0
    examples: dict[str, list[Example]] = field(default_factory=dict)
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    log_tracebacks: int = 0
    store_problems: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return (
            self.crashes
            + self.internal
            + self.unknown
            + self.hangs
            + self.breaches
            + len(self.store_problems)
        )

    def count(self, method: Method, cred: Credential, code: str, details: str, seconds: float):
        """Count one call; the kind of failure it is (for an example), or None."""
        stats = self.methods.setdefault(method.key, MethodStats())
        stats.calls += 1
        stats.codes[code] = stats.codes.get(code, 0) + 1
        stats.said.setdefault(code, details[:160])
        stats.max_ms = max(stats.max_ms, round(seconds * 1000, 1))
        self.codes[code] = self.codes.get(code, 0) + 1
        if not method.streaming and seconds > SLOW_S:
            stats.slow += 1
        if code == "INTERNAL":
            self.internal += 1
            if details == "Exception deserializing request!":
                self.undecodable += 1
                return "undecodable"
            return "INTERNAL"
        if code == "UNKNOWN":
            self.unknown += 1
            return "UNKNOWN"
        if code == "DEADLINE_EXCEEDED":  # open-ended streams are cancelled before it
            self.hangs += 1
            return "hang"
        if code in ("OK", "STREAMED") and not may_succeed(method.key, cred.role):
            self.breaches += 1
            return "breach"
        if len(details) > LONG_DETAILS:
            self.long_details += 1
            return "long details"
        return None

    def wants(self, kind: str, method: str) -> bool:
        """Up to EXAMPLES of each kind per method; of requests gRPC could not decode, in all."""
        kept = self.examples.get(kind, ())
        return sum(kind == "undecodable" or e.method == method for e in kept) < EXAMPLES

    def to_json(self) -> dict:
        out = asdict(self)
        out["failures"] = self.failures
        return out


def _describe(msg: Message | None, payload: bytes, limit: int = 2000) -> str:
    if msg is None:
        return f"<{len(payload)} raw bytes> {payload[:64].hex()}"
    text = text_format.MessageToString(msg, as_utf8=True, as_one_line=True)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# -- the run -------------------------------------------------------------------------------


def _config(api_workers: int = 0) -> str:
    user = pwd.getpwuid(os.geteuid()).pw_name
    text = FAST_CONFIG.replace("{user}", user) + '\n[auth]\noperators = ["fuzz-operator"]\n'
    return text + (f"\n[server]\napi_workers = {api_workers}\n" if api_workers else "")


class Fuzzer:
    """Sends the requests, one at a time, and keeps the report."""

    def __init__(
        self,
        cluster: LocalCluster,
        credentials: tuple[Credential, ...],
        seeds: Seeds,
        *,
        seed: int,
        deadline_s: float,
        check: Callable[[], list[str]],
    ) -> None:
        self.cluster = cluster
        self.credentials = credentials
        self.rng = random.Random(seed)
        self.requests = Requests(self.rng)
        self.valid = valid_requests(seeds)
        self.methods = methods()
        self.deadline_s = deadline_s
        self.check = check
        self.log_path = cluster.root / "gpuctld.log"

    def run(self, report: Report, check_every: int) -> None:
        proc = self.cluster.procs["gpuctld"]
        per_round = len(self.methods)
        seen: set[str] = set()
        for i in range(report.messages):
            method = self.methods[i % per_round]
            cred = self.credentials[(i // per_round) % len(self.credentials)]
            msg, payload, mode, change = self.requests.draw(method, self.valid.get(method.key))
            log_at = self.log_path.stat().st_size
            code, details, seconds = self._call(method, cred, msg, payload)
            report.sent += 1
            kind = report.count(method, cred, code, details, seconds)
            if proc.poll() is not None:
                kind, code = "crash", f"exit {proc.returncode}"
            if kind is not None and report.wants(kind, method.key):
                if len(details) > 300:
                    details = f"{details[:300]}... ({len(details)} characters)"
                example = Example(
                    method.key, cred.name, mode, change, code, details, _describe(msg, payload)
                )
                example.log = self._log_since(log_at)
                report.examples.setdefault(kind, []).append(example)
            if kind == "crash":
                report.crashes += 1
                return
            if (i + 1) % check_every == 0 or i + 1 == report.messages:
                for problem in self.check():
                    if problem not in seen and len(seen) < EXAMPLES * 10:
                        seen.add(problem)
                        report.store_problems.append(f"after {i + 1} messages: {problem}")

    def _call(
        self, method: Method, cred: Credential, msg: Message | None, payload: bytes
    ) -> tuple[str, str, float]:
        metadata = cred.metadata(self.rng)
        start = time.monotonic()
        try:
            if method.streaming:
                code = self._stream(method, cred, msg, payload, metadata)
            else:
                cred.channel.unary_unary(method.path)(
                    payload, timeout=self.deadline_s, metadata=metadata
                )
                code = "OK"
            return code, "", time.monotonic() - start
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", time.monotonic() - start

    def _stream(self, method: Method, cred: Credential, msg, payload, metadata) -> str:
        """Read up to STREAM_READS messages, then cancel. A watch or a log follow may rightly
        wait for changes: it is cancelled after STREAM_WINDOW_S, as STREAMED when something
        came and OPEN when nothing did."""
        call = cred.channel.unary_stream(method.path)(
            payload, timeout=self.deadline_s, metadata=metadata
        )
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            call.cancel()

        timer = None
        if _open_ended(method, msg, payload):
            timer = threading.Timer(STREAM_WINDOW_S, stop)
            timer.start()
        reads = 0
        try:
            for _ in call:
                reads += 1
                if reads >= STREAM_READS:
                    stop()
                    break
        except grpc.RpcError as e:
            if not (stopped.is_set() and e.code() is grpc.StatusCode.CANCELLED):
                raise
        finally:
            if timer is not None:
                timer.cancel()
        if not stopped.is_set():
            return "OK"
        return "STREAMED" if reads else "OPEN"

    def _log_since(self, offset: int, limit: int = 6000) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return text if len(text) <= limit else "..." + text[-limit:]


def _open_ended(method: Method, msg: Message | None, payload: bytes) -> bool:
    """Whether a stream may rightly stay open: any watch, and a log follow."""
    if method.key == "JobService.WatchJobs":
        return True
    if method.key != "JobService.StreamJobLogs":
        return False
    if msg is None:
        try:
            msg = method.request.FromString(payload)
        except DecodeError:
            return False
    return bool(msg.follow)


def check_store(client: Client) -> list[str]:
    """What is wrong with the stored data as the admin reads it back; empty when all reads."""
    problems = []
    reads: dict[str, Callable[[], object]] = {
        "jobs": lambda: list(client.list()),
        "nodes": client.nodes,
        "leases": lambda: client.leases(include_released=True),
        "tokens": lambda: client.tokens("*"),
        "audit": lambda: client.audit(limit=1000),
        "cost": client.cost,
        "whoami": client.whoami,
        "health": client.health,
    }
    got: dict[str, object] = {}
    for name, read in reads.items():
        try:
            got[name] = read()
        except Exception as e:  # an error, or a reply the client cannot decode: a finding
            problems.append(f"{name}: {type(e).__name__}: {e}")
    for job in list(got.get("jobs", ()))[:50]:
        try:
            client.get(job.id)
        except Exception as e:
            problems.append(f"GetJob {job.name}: {type(e).__name__}: {e}")
    for node in got.get("nodes", ()):
        price = node.price_per_hour
        if not math.isfinite(price) or not 0 <= price <= MAX_PRICE_PER_HOUR:
            problems.append(f"node {node.name!r:.80}: price_per_hour {price}")
        if not 0 <= len(node.profile.gpus) <= MAX_NODE_GPUS:
            problems.append(f"node {node.name!r:.80}: {len(node.profile.gpus)} GPUs")
        if node.cpu_milli < 0 or node.memory_mib < 0:
            problems.append(
                f"node {node.name!r:.80}: cpu {node.cpu_milli}, memory {node.memory_mib}"
            )
        for gpu in node.profile.gpus:
            numbers = (gpu.hbm_gbps, gpu.nvlink_gbps)
            if gpu.index < 0 or gpu.memory_mib < 0 or not all(map(math.isfinite, numbers)):
                problems.append(
                    f"node {node.name!r:.80}: GPU index {gpu.index}, memory_mib {gpu.memory_mib}, "
                    f"hbm_gbps {gpu.hbm_gbps}, nvlink_gbps {gpu.nvlink_gbps}"
                )
    if got.get("health", "SERVING") != "SERVING":
        problems.append(f"health is {got['health']}")
    return problems


def _rss_mib(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def run(
    messages: int = 10_000,
    seed: int = 0,
    *,
    deadline_s: float = 5.0,
    check_every: int = 1000,
    root: Path | None = None,
    api_workers: int = 0,
) -> Report:
    """Start a gpuctld of its own under `root` (a temporary directory by default), fuzz it with
    `messages` requests, read what it stored back every `check_every` and at the end, stop it
    and remove `root`."""
    started = time.monotonic()
    report = Report(seed=seed, messages=messages)
    cluster = LocalCluster(root or Path(tempfile.mkdtemp(prefix="gpuctl-fuzz-")))
    # Big enough to read any answer whole, an error echoing a huge field included: the report
    # shows the daemon's code, and flags the echo (LONG_DETAILS).
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_metadata_size", 4 << 20),
        ("grpc.absolute_max_metadata_size", 4 << 20),
        ("grpc.enable_retries", 0),
    ]
    try:
        cluster.root.mkdir(parents=True, exist_ok=True)
        (cluster.root / "gpuctld.toml").write_text(_config(api_workers))
        cluster.start_daemon()
        with (
            grpc.insecure_channel(cluster.target, options=options) as tcp,
            grpc.insecure_channel(cluster.local, options=options) as unix,
            Client(cluster.local, timeout=30) as admin,
        ):
            credentials, seeds = _enrol(admin, cluster, tcp, unix)
            pid = cluster.procs["gpuctld"].pid
            report.rss_before_mib = _rss_mib(pid)
            fuzzer = Fuzzer(
                cluster, credentials, seeds, seed=seed, deadline_s=deadline_s,
                check=lambda: check_store(admin),
            )  # fmt: skip
            fuzzer.run(report, check_every)
            if not report.crashes:
                report.rss_after_mib = _rss_mib(pid)
        report.log_tracebacks = sum(
            line.startswith("Traceback") for line in cluster.log("gpuctld").splitlines()
        )
    finally:
        cluster.remove()
    report.wall_s = round(time.monotonic() - started, 1)
    return report


def _enrol(
    admin: Client, cluster: LocalCluster, tcp: grpc.Channel, unix: grpc.Channel
) -> tuple[tuple[Credential, ...], Seeds]:
    """Every kind of caller, and what valid requests name: jobs, node NODE, a revoked token."""
    session = fetch_session(auth_socket_path(cluster.socket))["token"]
    user = admin.create_token(user="fuzzer", description="fuzz").secret
    operator = admin.create_token(user="fuzz-operator", description="fuzz").secret
    node = admin.create_node_token(NODE).secret
    revoked = admin.create_token(user="fuzz-revoked", description="fuzz")
    admin.revoke_token(revoked.token.id)
    training, inference = valid_specs()
    job_ids = tuple(admin.submit(spec).id for spec in (training, inference, training))
    admin.cancel(job_ids[-1])
    _run_node(tcp, bearer(node))
    credentials = (
        Credential("admin", Role.ADMIN, unix, _bearer(session)),  # the kernel vouches
        Credential("user", Role.USER, tcp, _bearer(user)),
        Credential("operator", Role.OPERATOR, tcp, _bearer(operator)),
        Credential("node", Role.NODE, tcp, _bearer(node)),
        Credential("revoked", None, tcp, _bearer(revoked.secret)),
        Credential("garbage", None, tcp, _garbage_auth),
        Credential("anonymous", None, tcp, lambda rng: ()),
    )
    return credentials, Seeds(job_ids=job_ids, revoked_id=revoked.token.id)


def _run_node(tcp: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
    """Register NODE and take its first assignment, with some output, so that requests find a
    placed rank whose log has something to read."""

    def agent(name: str, request: type[Message], reply: type[Message]):
        return tcp.unary_unary(
            f"/gpuctl.agent.v1.AgentService/{name}",
            request_serializer=request.SerializeToString,
            response_deserializer=reply.FromString,
        )

    agent("RegisterNode", agent_pb2.RegisterNodeRequest, agent_pb2.RegisterNodeResponse)(
        agent_pb2.RegisterNodeRequest(node=valid_node()), metadata=metadata, timeout=10
    )
    heartbeat = agent("Heartbeat", agent_pb2.HeartbeatRequest, agent_pb2.HeartbeatResponse)
    push = agent("PushLogs", agent_pb2.PushLogsRequest, agent_pb2.PushLogsResponse)
    deadline = time.monotonic() + 5.0  # the test bed's scheduler runs every second
    while time.monotonic() < deadline:
        reply = heartbeat(agent_pb2.HeartbeatRequest(node_name=NODE), metadata=metadata, timeout=10)
        for a in reply.assignments:
            data = b"step 1: loss 0.5\n"
            request = agent_pb2.PushLogsRequest(node_name=NODE, ref=a.ref, data=data)
            push(request, metadata=metadata, timeout=10)
        if reply.assignments:
            return
        time.sleep(0.2)


# -- the command ---------------------------------------------------------------------------

_SHORT = {
    "OK": "ok", "STREAMED": "streamed", "INVALID_ARGUMENT": "invalid", "NOT_FOUND": "notfound",
    "ALREADY_EXISTS": "exists", "FAILED_PRECONDITION": "precond", "PERMISSION_DENIED": "denied",
    "UNAUTHENTICATED": "unauth", "RESOURCE_EXHAUSTED": "exhaust", "OUT_OF_RANGE": "range",
    "UNAVAILABLE": "unavail", "CANCELLED": "cancel", "DEADLINE_EXCEEDED": "DEADLINE",
}  # fmt: skip


def render(report: Report) -> str:
    codes = sorted(report.codes, key=report.codes.__getitem__, reverse=True)
    heads = [_SHORT.get(c, c) for c in codes]
    width = max(len(k) for k in report.methods) if report.methods else 10
    lines = [
        f"{'method':<{width}} {'calls':>6} " + " ".join(f"{h:>8}" for h in heads) + "  max ms  slow"
    ]
    for key, s in report.methods.items():
        cells = " ".join(f"{s.codes.get(c, 0):>8}" for c in codes)
        lines.append(f"{key:<{width}} {s.calls:>6} {cells} {s.max_ms:>7.0f} {s.slow:>5}")
    lines.append(
        f"{'total':<{width}} {report.sent:>6} " + " ".join(f"{report.codes[c]:>8}" for c in codes)
    )
    lines += [
        "",
        f"messages {report.sent} of {report.messages} (seed {report.seed}), wall {report.wall_s}s",
        f"crashes {report.crashes}, INTERNAL {report.internal} "
        f"(of which gRPC could not decode the request: {report.undecodable}), "
        f"UNKNOWN {report.unknown}, hangs {report.hangs}, permission breaches {report.breaches}; "
        f"errors over {LONG_DETAILS} characters {report.long_details}",
        f"daemon RSS {report.rss_before_mib} MiB before, {report.rss_after_mib} MiB after; "
        f"'Traceback' lines in its log: {report.log_tracebacks}",
        "stored data: "
        + ("reads back" if not report.store_problems else "; ".join(report.store_problems)),
    ]
    for kind, examples in report.examples.items():
        for e in examples:
            head = f"[{kind}] {e.method} as {e.credential} ({e.mode}): {e.code}"
            if kind == "long details":  # the details are the echo: one line is enough
                lines.append(f"{head} {e.details[:60]!r}... changed: {e.change[:100]}")
                continue
            lines += ["", f"{head} {e.details[:200]!r}"]
            if e.change:
                lines.append(f"  changed: {e.change}")
            lines.append(f"  request: {e.request[:400]}")
            trace = e.log[e.log.find("Traceback") :] if "Traceback" in e.log else ""
            lines += [f"  | {line}" for line in trace.splitlines()[:30]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuctl.fuzz", description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000, help="requests to send")
    parser.add_argument(
        "--seed", type=int, default=0, help="the RNG seed (same seed, same requests)"
    )
    parser.add_argument("--deadline", type=float, default=5.0, help="seconds each call may take")
    parser.add_argument("--json", type=Path, help="write the whole report here as JSON")
    parser.add_argument(
        "--api-workers", type=int, default=0,
        help="gpuctld's [server] api_workers (TCP calls then land on one of them or gpuctld)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    report = run(args.messages, args.seed, deadline_s=args.deadline, api_workers=args.api_workers)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())

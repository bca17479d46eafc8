"""The agent's failover stub against several fake gpuctld (real gRPC servers on 127.0.0.1): a
call refused by a standby or an unreachable address is sent once more, to the leader named
first; a timed-out call is not, but the next call goes elsewhere.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from gpuctl.agent.failover import FailoverStub
from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api.status import to_status
from gpuctl.core.errors import NotLeader

HEARTBEAT = agent_pb2.HeartbeatRequest(node_name="gpu-01")


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class Head(agent_pb2_grpc.AgentServiceServicer):
    """One gpuctld's agent API: the leader answers; a standby names the leader it knows
    (`leader`, `leader_agent`); `code`, when set, ends every call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.leader = False
        self.hints = ("", "")  # (leader, leader_agent)
        self.code: grpc.StatusCode | None = None
        self.calls = 0
        self.lock = threading.Lock()
        self.address = ""

    def Heartbeat(self, request, context):
        with self.lock:
            self.calls += 1
        if self.code is not None:
            context.abort(self.code, f"injected {self.code.name}")
        if not self.leader:
            leader, leader_agent = self.hints
            context.abort_with_status(to_status(NotLeader(leader, leader_agent)))
        return agent_pb2.HeartbeatResponse(assignments=[agent_pb2.Assignment(job_name=self.name)])


class Heads:
    """Fake gpuctld started on demand, and failover stubs over their addresses."""

    def __init__(self) -> None:
        self.servers: list[grpc.Server] = []
        self.channels: list[grpc.Channel] = []

    def __call__(self, *names: str) -> list[Head]:
        out = []
        for name in names:
            head = Head(name)
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            agent_pb2_grpc.add_AgentServiceServicer_to_server(head, server)
            head.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
            server.start()
            self.servers.append(server)
            out.append(head)
        return out

    def stub(self, *addresses: str) -> FailoverStub:
        channels = [grpc.insecure_channel(a) for a in addresses]
        self.channels.extend(channels)
        return FailoverStub(
            {
                a: agent_pb2_grpc.AgentServiceStub(c)
                for a, c in zip(addresses, channels, strict=True)
            }
        )

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        for server in self.servers:
            server.stop(None)


@pytest.fixture
def heads() -> Iterator[Heads]:
    started = Heads()
    yield started
    started.close()


def answered_by(stub: FailoverStub) -> str:
    return stub.Heartbeat(HEARTBEAT, timeout=5).assignments[0].job_name


def test_a_call_goes_on_from_a_standby_to_the_leader_and_stays_there(heads) -> None:
    standby, leader = heads("standby", "leader")
    leader.leader = True
    stub = heads.stub(standby.address, leader.address)

    assert answered_by(stub) == "leader"
    assert answered_by(stub) == "leader"
    assert (standby.calls, leader.calls) == (1, 2)
    assert stub.address == leader.address


@pytest.mark.parametrize(
    "hints",
    [("", "LEADER"), ("LEADER", ""), ("head9:50051", "LEADER")],
    ids=["agent-listener", "main-listener", "the-one-that-is-ours"],
)
def test_the_leader_a_standby_names_comes_before_the_next_in_the_list(heads, hints) -> None:
    first, second, leader = heads("first", "second", "leader")
    leader.leader = True
    first.hints = tuple(leader.address if h == "LEADER" else h for h in hints)
    stub = heads.stub(first.address, second.address, leader.address)

    assert answered_by(stub) == "leader"
    assert (first.calls, second.calls) == (1, 0)


def test_an_unreachable_address_is_passed_over(heads) -> None:
    [leader] = heads("leader")
    leader.leader = True
    stub = heads.stub(dead_address(), leader.address)

    assert answered_by(stub) == "leader"
    assert stub.address == leader.address


def test_a_call_is_sent_once_more_at_most_and_the_next_goes_on(heads) -> None:
    [leader] = heads("leader")
    leader.leader = True
    stub = heads.stub(dead_address(), dead_address(), leader.address)

    with pytest.raises(grpc.RpcError) as e:
        stub.Heartbeat(HEARTBEAT, timeout=5)  # the two dead ones

    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    assert leader.calls == 0
    assert answered_by(stub) == "leader"  # the next call starts where this one stopped


def test_a_timed_out_call_is_not_sent_again_but_the_next_goes_on(heads) -> None:
    hung, leader = heads("hung", "leader")
    hung.code = grpc.StatusCode.DEADLINE_EXCEEDED
    leader.leader = True
    stub = heads.stub(hung.address, leader.address)

    with pytest.raises(grpc.RpcError) as e:
        stub.Heartbeat(HEARTBEAT, timeout=5)

    assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert leader.calls == 0
    assert answered_by(stub) == "leader"
    assert hung.calls == 1


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE], ids=lambda c: c.name
)
def test_an_answer_of_the_calls_own_is_not_sent_elsewhere(heads, code) -> None:
    # NOT_FOUND: the daemon does not know the node; UNAVAILABLE without NOT_LEADER: its store
    # is down. Both answered: the agent's loop decides what to do.
    first, second = heads("first", "second")
    first.code = code
    second.leader = True
    stub = heads.stub(first.address, second.address)

    with pytest.raises(grpc.RpcError) as e:
        stub.Heartbeat(HEARTBEAT, timeout=5)

    assert e.value.code() is code
    assert (first.calls, second.calls) == (1, 0)
    assert stub.address == first.address


def test_one_address_is_called_once(heads) -> None:
    [standby] = heads("standby")
    stub = heads.stub(standby.address)

    with pytest.raises(grpc.RpcError):
        stub.Heartbeat(HEARTBEAT, timeout=5)

    assert standby.calls == 1

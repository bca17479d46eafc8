"""The SDK against several gpuctld (real gRPC servers on 127.0.0.1): a call goes on from an
unreachable address or a standby to the leader, keeps to it, and tries each address once.
"""

from __future__ import annotations

import socket
import threading
import types
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest

from gpuctl.api import client as sdk
from gpuctl.api._pb.v1 import jobs_pb2, jobs_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from gpuctl.api.client import next_address, split_target
from gpuctl.api.status import NOT_LEADER, to_status
from gpuctl.client import Client, UnavailableError
from gpuctl.core.errors import NotLeader


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head(nodes_pb2_grpc.NodeServiceServicer, jobs_pb2_grpc.JobServiceServicer):
    """One gpuctld: reads are served by any; writes by the leader, while a standby answers
    NOT_LEADER naming `hint` as the leader."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.leader = False
        self.hint = ""
        self.lock = threading.Lock()
        self.calls: list[str] = []
        self.watch_fails_after_first = False

    def _count(self, method: str) -> None:
        with self.lock:
            self.calls.append(method)

    def DrainNode(self, request, context):
        self._count("DrainNode")
        if not self.leader:
            context.abort_with_status(to_status(NotLeader(leader=self.hint)))
        return nodes_pb2.Node(name=request.name, state_reason=f"drained by {self.name}")

    def GetNode(self, request, context):
        self._count("GetNode")
        return nodes_pb2.Node(name=request.name, state_reason=f"read from {self.name}")

    def WatchJobs(self, request, context):
        self._count("WatchJobs")
        yield jobs_pb2.WatchJobsResponse(job=jobs_pb2.Job(name="jobs/1", reason=self.name))
        if self.watch_fails_after_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "going away")


def serve(head: Head, port: int = 0) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    nodes_pb2_grpc.add_NodeServiceServicer_to_server(head, server)
    jobs_pb2_grpc.add_JobServiceServicer_to_server(head, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def heads() -> Iterator[Callable[..., list[Head]]]:
    """heads("a", "b"): a started Head for each name, its address in `.address`."""
    servers: list[grpc.Server] = []

    def start(*names: str) -> list[Head]:
        out = []
        for name in names:
            head = Head(name)
            server, head.address = serve(head)  # type: ignore[attr-defined]
            servers.append(server)
            out.append(head)
        return out

    yield start
    for server in servers:
        server.stop(None)


def connect(*addresses: str, timeout: float = 5) -> Client:
    return Client(",".join(addresses), token="token-of-alice", timeout=timeout)


# -- the address list ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "addresses"),
    [
        ("head1:50051", ("head1:50051",)),
        ("head1:50051,head2:50051", ("head1:50051", "head2:50051")),
        (" head1:50051 , head2:50051 ,", ("head1:50051", "head2:50051")),
        ("head1:50051,head1:50051", ("head1:50051",)),
        ("unix:/run/a,b.sock", ("unix:/run/a,b.sock",)),
        (",", ()),
    ],
    ids=["one", "two", "spaces", "twice", "unix", "none"],
)
def test_a_target_splits_into_its_addresses(target: str, addresses: tuple[str, ...]) -> None:
    assert split_target(target) == addresses


@pytest.mark.parametrize(
    ("current", "hints", "tried", "expected"),
    [
        (0, (), (), 1),  # the next in the list
        (2, (), (), 0),  # ... wrapping around
        (0, ("c",), (), 2),  # the hint first
        (0, ("x:1", "c"), (), 2),  # the first hint that is one of ours
        (0, ("a",), (), 1),  # the one that refused is no hint
        (0, ("c",), (2,), 1),  # nor one tried already
        (0, (), (1, 2), None),  # all tried
    ],
)
def test_next_address(current, hints, tried, expected) -> None:
    assert next_address(("a", "b", "c"), current, hints, tried) == expected


def test_one_address_has_no_next() -> None:
    assert next_address(("a",), 0, ("a",)) is None


def test_an_empty_target_is_refused() -> None:
    with pytest.raises(ValueError, match="no gpuctld address"):
        Client(",")


# -- unary calls --------------------------------------------------------------------------


def test_a_write_goes_on_from_a_standby_to_the_leader_and_stays_there(heads) -> None:
    standby, leader = heads("standby", "leader")
    leader.leader = True

    with connect(standby.address, leader.address) as c:
        assert c.drain("gpu-01").state_reason == "drained by leader"
        assert c.drain("gpu-02").state_reason == "drained by leader"
        assert c.node("gpu-01").state_reason == "read from leader"  # sticky, reads too
        assert c.target == f"{standby.address},{leader.address}"

    assert standby.calls == ["DrainNode"]
    assert leader.calls == ["DrainNode", "DrainNode", "GetNode"]


def test_the_leader_a_standby_names_comes_before_the_next_in_the_list(heads) -> None:
    first, second, leader = heads("first", "second", "leader")
    leader.leader = True
    first.hint = leader.address

    with connect(first.address, second.address, leader.address) as c:
        assert c.drain("gpu-01").state_reason == "drained by leader"

    assert (first.calls, second.calls) == (["DrainNode"], [])


def test_a_leader_that_is_not_in_the_list_is_not_followed(heads) -> None:
    first, leader = heads("first", "leader")
    leader.leader = True
    first.hint = "head9.example.internal:50051"

    with connect(first.address, leader.address) as c:
        assert c.drain("gpu-01").state_reason == "drained by leader"


def test_each_address_is_tried_once_then_the_last_error_is_raised(heads) -> None:
    a, b = heads("a", "b")
    a.hint, b.hint = b.address, a.address  # each names the other: no loop

    # A 0.8 s deadline: the standbys' "retry in 0.5 s" does not fit twice, so it is not waited
    with connect(a.address, b.address, timeout=0.8) as c, pytest.raises(UnavailableError) as e:
        c.drain("gpu-01")

    assert (a.calls, b.calls) == (["DrainNode"], ["DrainNode"])
    assert (e.value.reason, e.value.leader) == (NOT_LEADER, a.address)
    assert e.value.metadata == {"leader": a.address, "leader_agent": ""}
    assert e.value.retry_delay == 0.5


def test_standbys_only_are_waited_out_once_as_they_ask(heads, monkeypatch) -> None:
    # No daemon holds the lease (a takeover): both say "no leader, retry in 0.5 s".
    a, b = heads("a", "b")
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the takeover ends while the client waits
        slept.append(seconds)
        b.leader, a.hint = True, b.address

    monkeypatch.setattr(sdk, "time", types.SimpleNamespace(monotonic=lambda: 0.0, sleep=sleep))

    with connect(a.address, b.address) as c:
        assert c.drain("gpu-01").state_reason == "drained by b"

    assert len(slept) == 1 and 0.5 <= slept[0] <= 0.75  # what it asked, with jitter
    assert (a.calls, b.calls) == (["DrainNode"] * 2, ["DrainNode"] * 2)


def test_standbys_only_are_waited_out_no_more_than_once(heads, monkeypatch) -> None:
    a, b = heads("a", "b")
    slept: list[float] = []
    monkeypatch.setattr(
        sdk, "time", types.SimpleNamespace(monotonic=lambda: 0.0, sleep=slept.append)
    )

    with connect(a.address, b.address) as c, pytest.raises(UnavailableError) as e:
        c.drain("gpu-01")

    assert len(slept) == 1 and 0.5 <= slept[0] <= 0.75  # what it asked, with jitter
    assert (a.calls, b.calls) == (["DrainNode"] * 2, ["DrainNode"] * 2)
    assert e.value.reason == NOT_LEADER and e.value.leader == ""


def test_an_unreachable_address_is_passed_over(heads) -> None:
    [leader] = heads("leader")
    leader.leader = True

    with connect(f"127.0.0.1:{free_port()}", leader.address) as c:
        assert c.drain("gpu-01").state_reason == "drained by leader"
        assert c.drain("gpu-02").state_reason == "drained by leader"

    assert leader.calls == ["DrainNode", "DrainNode"]


def test_a_read_goes_on_from_an_unreachable_address(heads) -> None:
    # gRPC retries the read where it is (about 1.5 s) before the client moves on.
    [standby] = heads("standby")
    with connect(f"127.0.0.1:{free_port()}", standby.address) as c:
        assert c.node("gpu-01").state_reason == "read from standby"


def test_no_address_reachable_names_them_all() -> None:
    dead = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    with connect(*dead) as c, pytest.raises(UnavailableError) as e:
        c.drain("gpu-01")

    assert str(e.value) == f"cannot reach gpuctld at {dead[0]},{dead[1]} (is it running?)"


# -- streams ------------------------------------------------------------------------------


def test_a_stream_goes_on_from_an_unreachable_address_before_its_first_message(heads) -> None:
    [head] = heads("head")
    with connect(f"127.0.0.1:{free_port()}", head.address) as c:
        assert next(c.watch(1)).reason == "head"


def test_a_stream_that_fails_after_its_first_message_does_not_move(heads) -> None:
    a, b = heads("a", "b")
    a.watch_fails_after_first = True

    with connect(a.address, b.address) as c:
        updates = c.watch(1)
        assert next(updates).reason == "a"
        with pytest.raises(UnavailableError, match="going away"):
            next(updates)

    assert b.calls == []


def test_after_a_call_times_out_on_a_hung_head_the_next_call_goes_on(heads) -> None:
    """A head whose machine died: connections hang instead of being refused. The call that
    timed out is not sent again (it may have been done), but the next one goes elsewhere."""
    [leader] = heads("leader")
    leader.leader = True
    with socket.socket() as hung:  # accepts connections (the kernel's backlog), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        with connect(f"127.0.0.1:{hung.getsockname()[1]}", leader.address, timeout=0.5) as c:
            with pytest.raises(sdk.DeadlineExceededError):
                c.drain("gpu-01")
            assert c.drain("gpu-02").state_reason == "drained by leader"
    assert leader.calls == ["DrainNode"]

"""The agent's way to the leader among several gpuctld: a stub with AgentService's methods over
one stub per address, which keeps to the address that answered and moves on from one that
cannot be reached, is a standby, or does not answer in time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from gpuctl.api._pb.agent.v1 import agent_pb2
from gpuctl.api.client import could_not_connect, next_address, not_leader


class FailoverStub:
    """AgentService over `stubs` (address -> that address's stub), for `AgentLoop`.

    A call goes to the address that answered last. Where no connection could be made or a
    standby answered NOT_LEADER, it is sent once more: to the leader the standby names
    (`leader_agent`, else `leader`) if that is one of ours, else to the next address. Every
    agent call is safe to send again then: nothing reached the leader. A call that timed out
    is not sent again (the daemon may have done it), but the next one goes to the next
    address: a leader whose machine died lets connections hang rather than refusing them.
    """

    def __init__(self, stubs: Mapping[str, Any]) -> None:
        if not stubs:
            raise ValueError("no gpuctld address")
        self._addresses = tuple(stubs)
        self._stubs = tuple(stubs.values())
        self._current = 0

    @property
    def address(self) -> str:
        """Where the next call goes first."""
        return self._addresses[self._current]

    def RegisterNode(
        self, request: agent_pb2.RegisterNodeRequest, **kwargs: Any
    ) -> agent_pb2.RegisterNodeResponse:
        return self._call("RegisterNode", request, kwargs)

    def Heartbeat(
        self, request: agent_pb2.HeartbeatRequest, **kwargs: Any
    ) -> agent_pb2.HeartbeatResponse:
        return self._call("Heartbeat", request, kwargs)

    def ReportRankStatus(
        self, request: agent_pb2.ReportRankStatusRequest, **kwargs: Any
    ) -> agent_pb2.ReportRankStatusResponse:
        return self._call("ReportRankStatus", request, kwargs)

    def PushLogs(
        self, request: agent_pb2.PushLogsRequest, **kwargs: Any
    ) -> agent_pb2.PushLogsResponse:
        return self._call("PushLogs", request, kwargs)

    def JoinNode(
        self, request: agent_pb2.JoinNodeRequest, **kwargs: Any
    ) -> agent_pb2.JoinNodeResponse:
        return self._call("JoinNode", request, kwargs)

    def _call(self, method: str, request: Any, kwargs: Mapping[str, Any]) -> Any:
        for attempt in range(2):
            index = self._current
            try:
                return getattr(self._stubs[index], method)(request, **kwargs)
            except grpc.RpcError as e:
                hints = not_leader(e)
                refused = hints is not None or could_not_connect(e)
                if not refused and e.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise  # it answered: the error is the call's own
                hinted = (hints.get("leader_agent", ""), hints.get("leader", "")) if hints else ()
                following = next_address(self._addresses, index, hinted)
                if following is None:
                    raise
                self._current = following
                if not refused or attempt == 1:
                    raise
        raise AssertionError("unreachable")

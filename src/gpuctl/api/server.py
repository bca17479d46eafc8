"""Builds the gRPC server: the gpuctl services, standard health checking and reflection."""

from __future__ import annotations

from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api._pb.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
)
from gpuctl.api.servicers import AgentServicer, JobServicer, LeaseServicer, NodeServicer

if TYPE_CHECKING:
    from gpuctl.runtime.controller import Controller

SERVICE_NAMES = (
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    nodes_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
    leases_pb2.DESCRIPTOR.services_by_name["LeaseService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)


class ApiServer:
    """The daemon's gRPC server; `health` flips to NOT_SERVING when draining."""

    def __init__(
        self,
        controller: Controller,
        listen: str,
        *,
        max_workers: int = 32,
        watch_poll_s: float = 0.5,
    ) -> None:
        # Streams (WatchJobs, logs -f) hold a worker each: size the pool for them.
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        jobs_pb2_grpc.add_JobServiceServicer_to_server(
            JobServicer(controller, poll_s=watch_poll_s), self.server
        )
        nodes_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(controller), self.server)
        leases_pb2_grpc.add_LeaseServiceServicer_to_server(LeaseServicer(controller), self.server)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(controller), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}: address in use or not valid")

    def start(self) -> None:
        self.server.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def drain(self, grace_s: float) -> None:
        """Stop taking new RPCs, let in-flight ones finish within `grace_s`, then stop."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace_s).wait(grace_s + 1)

    def _set_health(self, status: int) -> None:
        self.health.set("", status)
        for name in SERVICE_NAMES:
            self.health.set(name, status)

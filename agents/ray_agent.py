"""The agent as a Ray actor pinned to its node: pushes reports to the controller found by name."""

from __future__ import annotations

import logging

import ray

from herdsman import CONTROLLER_NAME, RAY_NAMESPACE
from herdsman.config import HerdsmanConfig
from herdsman.events import AgentReport
from agents.agent import NodeAgent

log = logging.getLogger("herdsman.agent")


def agent_name(host: str) -> str:
    return f"herdsman-agent-{host}"


class AgentService:
    def __init__(self, host: str, config: HerdsmanConfig):
        self._controller = None
        self.agent = NodeAgent(host, config, sink=self._send)
        self.agent.start_metrics()
        self.agent.start()

    def _send(self, report: AgentReport) -> None:
        if self._controller is None:
            try:
                self._controller = ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE)
            except ValueError:
                return  # no controller yet: the next cycle tries again
        try:
            self._controller.report.remote(report)
        except Exception:  # controller gone: look it up again next time
            self._controller = None

    def ready(self, job: str = "") -> str:
        if job:
            self.agent.follow(job)
        return self.agent.metrics_url

    def collect_now(self) -> AgentReport:
        return self.agent.collect_now()

    def health_check(self) -> list[str]:
        return self.agent.health_check()

    def flight_recorder(self, attempt: int):
        return self.agent.flight_recorder(attempt)

    def inject(self, fault: str, gpu: int = 0, **args) -> str:
        return self.agent.inject(fault, gpu, **args)

    def stop(self) -> None:
        self.agent.stop()


AgentActor = ray.remote(num_cpus=0, max_concurrency=4)(AgentService)

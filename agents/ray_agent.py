"""The agent as a Ray actor pinned to its node: pushes reports to the controller found by name."""

from __future__ import annotations

import logging

import ray

from herdsman import RAY_NAMESPACE, controller_name
from herdsman.config import HerdsmanConfig
from herdsman.events import AgentReport
from agents.agent import NodeAgent

log = logging.getLogger("herdsman.agent")


def agent_name(host: str) -> str:
    return f"herdsman-agent-{host}"


class AgentService:
    def __init__(self, host: str, config: HerdsmanConfig):
        self._controller = None
        self._job = ""
        self.agent = NodeAgent(host, config, sink=self._send)
        self.agent.start_metrics()
        self.agent.start()

    def _send(self, report: AgentReport) -> None:
        if self._controller is None or self._job != self.agent.job:
            try:  # the controller of the job this host serves
                self._job = self.agent.job
                self._controller = ray.get_actor(controller_name(self._job), namespace=RAY_NAMESPACE)
            except ValueError:
                self._controller = None
                return  # no controller yet: the next cycle tries again
        try:
            self._controller.report.remote(report)
        except Exception:  # controller gone: look it up again next time
            self._controller = None

    def ready(self, job: str = "", run_dir: str = "") -> str:
        if job:
            self.agent.follow(job, run_dir or None)
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

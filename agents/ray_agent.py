"""The agent as a Ray actor pinned to its node: pushes reports to the controller found by name."""

from __future__ import annotations

import logging
import time

import ray

from herdsman import RAY_NAMESPACE, controller_name, wire
from herdsman.config import HerdsmanConfig, config_secrets
from herdsman.events import AgentReport
from herdsman.secrets import protect_process_logs
from agents.agent import NodeAgent

log = logging.getLogger("herdsman.agent")


def agent_name(host: str) -> str:
    return f"herdsman-agent-{host}"


class AgentService:
    """Sends each cycle's report as one wire frame (herdsman/wire.py): to its relay when the controller named one,
    else to the controller itself. GPU samples ride along on the first report a controller gets, every
    `agent.samples_every_s`, and with any evidence; Prometheus scrapes every reading from the agent itself."""

    def __init__(self, host: str, config: HerdsmanConfig):
        protect_process_logs(config_secrets(config))  # this process's logs hide the token and the store password
        self._target = None
        self._via_relay = False
        self._job = ""
        self._relay = ""
        self._samples_due = 0.0
        self._last_ref = None
        self.samples_every_s = config.agent.samples_every_s
        self.agent = NodeAgent(host, config, sink=self._send)
        self.agent.start_metrics()
        self.agent.start()

    def _find_target(self) -> None:
        self._job = self.agent.job
        self._samples_due = 0.0  # whoever receives from now on has no readings of this host yet
        if self._relay:
            try:
                self._target, self._via_relay = ray.get_actor(self._relay, namespace=RAY_NAMESPACE), True
                return
            except ValueError:
                log.info("relay %s not found: reporting to the controller directly", self._relay)
        try:  # the controller of the job this host serves
            self._target, self._via_relay = ray.get_actor(controller_name(self._job), namespace=RAY_NAMESPACE), False
        except ValueError:
            self._target = None  # no controller yet: the next cycle tries again

    def _send(self, report: AgentReport) -> None:
        if self._last_ref is not None:  # the previous call failed: its receiver is gone, find the current one
            done, _ = ray.wait([self._last_ref], timeout=0)
            if done:
                try:
                    ray.get(done[0])
                except Exception:
                    self._target = None
                self._last_ref = None
        if self._target is None or self._job != self.agent.job:
            self._find_target()
            if self._target is None:
                return
        now = time.monotonic()
        samples = now >= self._samples_due or bool(report.evidence)
        frame = wire.encode(report, samples=samples)
        try:
            if self._via_relay:
                ref = self._target.send.remote(frame, wire.urgent(report))
            else:
                ref = self._target.ingest.remote(frame)
        except Exception:  # the actor handle is dead: look it up again next time
            self._target = None
            return
        if samples:
            self._samples_due = now + self.samples_every_s
        if self._last_ref is None:
            self._last_ref = ref

    def ready(self, job: str = "", run_dir: str = "", relay: str = "") -> str:
        if job:
            self.agent.follow(job, run_dir or None)
        if relay != self._relay:
            self._relay, self._target = relay, None
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

"""What the controller needs of the machines, behind one interface: find the hosts, keep an agent on each, pull
reports and flight-recorder dumps from them, and start worker groups. `RayFleet` is the real one (Ray nodes,
agent actors, rank actors); tests drive the controller with a fake of the same shape, without Ray.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Callable, Protocol

from herdsman import RAY_NAMESPACE
from herdsman.config import HerdsmanConfig
from herdsman.events import AgentReport, RankFailure


class GroupStatusLike(Protocol):
    ranks: tuple[Any, ...]
    unreachable: tuple[int, ...]

    @property
    def finished(self) -> bool: ...
    @property
    def failed(self) -> list[Any]: ...
    @property
    def waiting(self) -> set[int]: ...
    def failures(self, now: float) -> list[RankFailure]: ...


class Group(Protocol):
    """A worker group: the ranks of one attempt (orchestrator.workers.WorkerGroup on Ray)."""

    attempt: int
    hosts: list[str]
    rank_hosts: list[str]

    @property
    def world_size(self) -> int: ...
    def start(self) -> None: ...
    def poll(self) -> GroupStatusLike: ...
    def shutdown(self, grace_s: float = 3.0, keep_hosts: tuple[str, ...] | list[str] = ()) -> None: ...
    def request_checkpoint(self, then_exit: bool = False) -> None: ...
    def request_dumps(self, skip: frozenset[int] = frozenset()) -> list[int]: ...
    def inject(self, rank: int, fault: str, message: str = "", at_step: int = 0, sticky: bool = False) -> str: ...
    def kill(self, rank: int) -> None: ...
    def refill_standbys(self) -> None: ...


class Fleet(Protocol):
    def discover(self) -> dict[str, str]:
        """Host name -> node id of every Herdsman host alive now."""
    def ensure_agents(self, nodes: dict[str, str], job: str, decide: Callable[[str], None]) -> None: ...
    def gather(self, hosts: list[str], decide: Callable[[str], None]) -> list[AgentReport]: ...
    def flight_recorder(self, hosts: list[str], attempt: int,
                        decide: Callable[[str], None]) -> tuple[list[Any], list[str], list[str]]:
        """(summaries, refused dumps, hosts that did not answer)."""
    def has_agent(self, host: str) -> bool: ...
    def health_check(self, host: str) -> list[str]: ...
    def inject(self, host: str, fault: str, gpu: int = 0, **args: Any) -> str: ...
    def warm(self, spares: list[tuple[str, str]], in_job: list[str]) -> None:
        """Keep rank actors with warm standbys on these spare hosts (host, node id); let go of hosts warmed
        before that are neither among them nor in the job."""
    def start_group(self, placement: list[tuple[str, str]], attempt: int, env: dict[str, str]) -> Group:
        """The ranks of one attempt on `placement` (host, node id), not started yet."""
    def close(self) -> None: ...


class RayFleet:
    """The fleet as a Ray cluster: hosts are nodes with a `herdsman_host` resource, agents detached actors."""

    def __init__(self, config: HerdsmanConfig, run_dir: Path, cwd: str):
        self.cfg, self.run_dir, self.cwd = config, run_dir, cwd
        self.agents: dict[str, Any] = {}
        self.rank_actors: dict[tuple[str, int], Any] = {}  # reused across attempts on the same hosts
        self.relays: dict[str, Any] = {}  # report relays, owned by this controller: they end with it
        self.warmed: set[str] = set()  # spare hosts with warm rank actors (warm())

    def discover(self) -> dict[str, str]:
        from orchestrator.cluster import discover_hosts

        return discover_hosts()

    def ensure_agents(self, nodes: dict[str, str], job: str, decide: Callable[[str], None]) -> None:
        """An agent on every host, following `job`'s streams; one that died (or never answers) is replaced."""
        import ray

        from agents.ray_agent import AgentActor, agent_name
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        def create(host: str, node_id: str) -> Any:
            return AgentActor.options(  # a crashed agent is started again, like a DaemonSet's pod
                name=agent_name(host), namespace=RAY_NAMESPACE, get_if_exists=True, lifetime="detached",
                max_restarts=-1, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(host, self.cfg)

        for host, node_id in nodes.items():
            if host not in self.agents:
                self.agents[host] = create(host, node_id)
        routes = self._ensure_relays(list(nodes), job)
        refs = {h: a.ready.remote(job, str(self.run_dir), routes[h]) for h, a in self.agents.items() if h in nodes}
        for host, ref in refs.items():
            try:
                ray.get(ref, timeout=60)
            except Exception as e:
                decide(f"agent on {host} is gone ({type(e).__name__}): starting a new one")
                self.agents[host] = create(host, nodes[host])

    def _ensure_relays(self, hosts: list[str], job: str) -> dict[str, str]:
        """Report relays for a fleet larger than one relay's fanout (orchestrator/relay.py); each host's route."""
        from orchestrator.relay import assign, relay_actor

        c = self.cfg.controller
        routes = assign(hosts, job, c.relay_fanout)
        for name in sorted(set(routes.values()) - {""} - set(self.relays)):
            self.relays[name] = relay_actor().options(name=name, namespace=RAY_NAMESPACE, get_if_exists=True,
                                                      max_restarts=-1).remote(job, c.relay_flush_s)
        return routes

    def gather(self, hosts: list[str], decide: Callable[[str], None]) -> list[AgentReport]:
        """A fresh report from each host's agent, not waiting for its next heartbeat."""
        import ray

        refs = {h: self.agents[h].collect_now.remote() for h in hosts if h in self.agents}
        out = []
        for h, ref in refs.items():
            try:
                out.append(ray.get(ref, timeout=3))
            except Exception as e:
                decide(f"agent on {h} did not answer: {type(e).__name__}")
        return out

    def flight_recorder(self, hosts: list[str], attempt: int,
                        decide: Callable[[str], None]) -> tuple[list[Any], list[str], list[str]]:
        import ray

        refs = {h: self.agents[h].flight_recorder.remote(attempt) for h in hosts if h in self.agents}
        summaries: list[Any] = []
        refused: list[str] = []
        silent = [h for h in hosts if h not in self.agents]
        for h, ref in refs.items():
            try:
                s, r = ray.get(ref, timeout=5)
                summaries += s
                refused += r
            except Exception as e:
                decide(f"flight recorder of {h} unavailable: {type(e).__name__}")
                silent.append(h)
        return summaries, refused, silent

    def has_agent(self, host: str) -> bool:
        return host in self.agents

    def health_check(self, host: str) -> list[str]:
        import ray

        return ray.get(self.agents[host].health_check.remote(), timeout=30)

    def inject(self, host: str, fault: str, gpu: int = 0, **args: Any) -> str:
        import ray

        return ray.get(self.agents[host].inject.remote(fault, gpu, **args), timeout=10)

    def warm(self, spares: list[tuple[str, str]], in_job: list[str]) -> None:
        from orchestrator.workers import RankActor, close_actor
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        t = self.cfg.trainer
        if t.entrypoint or not self.cfg.controller.warm_standby:
            return  # a standby imports the embedded trainer: of no use to a trainer of your own
        wanted = {h for h, _ in spares}
        for host in self.warmed - wanted - set(in_job):
            for key in [k for k in self.rank_actors if k[0] == host]:
                close_actor(self.rank_actors.pop(key))
        for host, node_id in spares:
            for slot in range(t.ranks_per_host):
                if (host, slot) not in self.rank_actors:  # the same actors WorkerGroup reuses by (host, slot)
                    self.rank_actors[(host, slot)] = RankActor.options(
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
                        host, self.cwd, True)
        self.warmed = wanted

    def start_group(self, placement: list[tuple[str, str]], attempt: int, env: dict[str, str]) -> Group:
        from orchestrator.workers import WorkerGroup

        t = self.cfg.trainer
        return WorkerGroup(placement, t.ranks_per_host, attempt, env, self.run_dir, self.cfg.job, self.cwd,
                           self.rank_actors, self.cfg.controller.warm_standby,
                           shlex.split(t.entrypoint) if t.entrypoint else None, t.fr_buffer_size)

    def close(self) -> None:
        import ray

        from orchestrator.workers import close_actor

        for a in self.rank_actors.values():
            close_actor(a)
        self.rank_actors.clear()
        for r in self.relays.values():
            try:
                ray.get(r.stop.remote(), timeout=5)  # what they hold reaches the controller before it goes
                ray.kill(r, no_restart=True)
            except Exception:
                pass
        self.relays.clear()
        for a in self.agents.values():
            try:
                ray.get(a.stop.remote(), timeout=5)
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.agents.clear()

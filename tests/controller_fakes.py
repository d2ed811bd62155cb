"""Fakes for stepping the controller one tick at a time without Ray: a clock, a worker group, a fleet, and the
body of the `make` fixture (tests/conftest.py) that builds a controller on them (tests/test_controller.py,
tests/test_controller_states.py).

Every controller `make` builds records the transitions its ticks take in TAKEN, so that a test can check that the
suite takes every legal transition of orchestrator/states.py.
"""

from herdsman.config import load_config
from herdsman.events import AgentReport, Heartbeat, HostState, StepStats, TrainerEvent
from orchestrator.controller import Controller
from orchestrator.states import Running
from orchestrator.workers import GroupStatus, RankStatus

TAKEN: set[tuple[type, type]] = set()  # (from, to) state classes of every tick of a controller `make` built


HOSTS = ["host-1", "host-2", "host-3", "host-4"]


class Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


class FakeGroup:
    def __init__(self, placement, attempt, clock):
        self.hosts = [h for h, _ in placement]
        self.rank_hosts = list(self.hosts)
        self.attempt, self.clock = attempt, clock
        self.exit = {r: None for r in range(len(self.hosts))}
        self.ended, self.stderr = {}, {}
        self.unreachable = ()
        self.shutdowns, self.checkpoints = [], []
        self.rejoins, self.rejoin_error = [], None
        self.refills = self.dump_requests = 0
        self.reported = {}  # live rank -> when it reported its failure and began to wait (its rank actor saw it)

    @property
    def world_size(self):
        return len(self.hosts)

    def start(self):
        getattr(self, "calls", []).append("start")

    def poll(self):
        ranks = tuple(RankStatus(r, self.rank_hosts[r], 100 + r, self.exit[r] is None, self.exit[r],
                                 self.ended.get(r), self.stderr.get(r, ""),
                                 self.reported.get(r) if self.exit[r] is None else None)
                      for r in self.exit)
        return GroupStatus(ranks, tuple(self.unreachable))

    def fail(self, rank, code=1, stderr=""):
        self.exit[rank], self.ended[rank], self.stderr[rank] = code, self.clock(), stderr

    def finish(self):
        for r in self.exit:
            self.exit[r], self.ended[r] = 0, self.clock()

    def shutdown(self, grace_s=3.0, keep_hosts=()):
        self.shutdowns.append(tuple(keep_hosts))

    def rejoin(self, attempt, anew):
        """In-process restart: the ranks in `anew` start anew, the others keep running."""
        if self.rejoin_error is not None:
            raise self.rejoin_error
        self.rejoins.append((attempt, set(anew)))
        self.attempt = attempt
        self.reported = {}  # a report names its attempt: the next one starts with none
        for r in anew:
            self.exit[r] = None
            self.ended.pop(r, None)
        return [r for r in self.exit if r not in anew]

    def request_checkpoint(self, then_exit=False):
        self.checkpoints.append(then_exit)

    def request_dumps(self, skip=frozenset()):
        self.dump_requests += 1
        return []

    def inject(self, rank, fault, message="", at_step=0, sticky=False):
        return f"{fault} into rank {rank}"

    def refill_standbys(self):
        self.refills += 1

    def kill(self, rank):
        self.fail(rank, -9)


class FakeFleet:
    def __init__(self, clock, hosts=HOSTS):
        self.clock, self.hosts = clock, {h: f"node-{h}" for h in hosts}
        self.groups, self.problems, self.injected, self.warmed = [], {}, [], []
        self.fr = []  # the flight-recorder summaries the agents would return
        self.calls = []  # "agents", "group", "start": the order the controller did them in
        self.fresh = []  # what the agents had not sent yet: the reports the next gather returns


    def discover(self):
        return dict(self.hosts)

    def ensure_agents(self, nodes, job, decide):
        self.calls.append("agents")

    def gather(self, hosts, decide):
        self.calls.append("gather")
        out, self.fresh = self.fresh, []
        return out

    def flight_recorder(self, hosts, attempt, decide):
        return list(self.fr), [], []

    def has_agent(self, host):
        return host in self.hosts

    def health_check(self, host):
        return self.problems.get(host, [])

    def inject(self, host, fault, gpu=0, **args):
        self.injected.append((host, fault))
        return f"{host}: {fault}"

    def warm(self, spares, in_job):
        self.warmed.append(([h for h, _ in spares], list(in_job)))

    def start_group(self, placement, attempt, env):
        g = FakeGroup(placement, attempt, self.clock)
        g.calls = self.calls
        self.groups.append(g)
        self.calls.append("group")
        return g

    def close(self):
        pass


def controllers(tmp_path):
    """The body of the `make` fixture (tests/conftest.py): `build(store=None, **controller_config)` -> (controller,
    fake fleet, clock), each controller's store writer closed at the end."""
    made = []

    def build(store=None, **controller):
        clock = Clock()
        cfg = load_config(overrides={"run_dir": str(tmp_path / "run"), "job": "unit",
                                     "trainer": {"steps": 20, "checkpoint_every": 5},
                                     # the process-restart path unless a test turns the in-process one on
                                    "controller": {"failure_grace_s": 1.0, "hang_timeout_s": 30.0,
                                                    "startup_timeout_s": 30.0, "restart_backoff_s": 1.0,
                                                    "inprocess_restart": False, **controller}})
        fleet = FakeFleet(clock)
        ctrl = Controller(cfg, store=store, fleet=fleet, clock=clock)
        _record_transitions(ctrl)
        made.append(ctrl)
        return ctrl, fleet, clock

    yield build
    for c in made:
        c.records.close(timeout_s=1)


def _record_transitions(ctrl):
    tick = ctrl.tick

    def recorded():
        before = type(ctrl.state)
        changed = tick()
        TAKEN.add((before, type(ctrl.state)))
        return changed

    ctrl.tick = recorded


def heartbeat_all(ctrl, clock, hosts=HOSTS):
    for h in hosts:
        ctrl.report(AgentReport(Heartbeat(h, clock(), 1)))


def step(ctrl, clock, n, attempt=0):
    heartbeat_all(ctrl, clock, [h for h in HOSTS if ctrl.pool.state(h) != HostState.QUARANTINED])
    ctrl.report(AgentReport(Heartbeat("host-1", clock(), 1),
                            steps=(StepStats(0, "host-1", attempt, n, clock(), 0.5, 512, 2.0),)))


def event(ctrl, clock, phase, attempt, step_=0):
    ctrl.report(AgentReport(Heartbeat("host-1", clock(), 1),
                            trainer_events=(TrainerEvent(0, "host-1", attempt, phase, clock(), step_, 0.1),)))


def running(make, **kw):
    ctrl, fleet, clock = make(**kw)
    heartbeat_all(ctrl, clock)
    assert ctrl.tick() and isinstance(ctrl.state, Running)
    return ctrl, fleet, clock

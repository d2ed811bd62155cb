"""Stragglers without false alarms (agents/drift.py): a rank is flagged only when it falls behind its peers in the
same steps, with the reason its GPU shows; whatever slows every rank together is not a straggler; the thermal
trend warns of a heating GPU before its clock drops. Through the tracker and through the agent's own path."""

import json
import math
import os
import random

import pytest

from agents.agent import NodeAgent
from agents.drift import CPU_STARVED, POWER, THERMAL, THERMAL_TREND, DriftTracker, RankSample, ThermalTrend
from herdsman.config import load_config
from herdsman.events import EvidenceKind, GpuSample, Severity
from orchestrator.diagnose import candidate, precursor

VICTIM, ONSET = 3, 180
REASON = {"heat": THERMAL, "power_cap": POWER, "cpu_starved": CPU_STARVED, "data_starved": CPU_STARVED}


def run(seed, kind=None, size=0.05, ranks=8, steps=240, all_slow_from=None, heat_lead=60):
    """Ranks of one node with 1-3 % jitter, a common diurnal drift and hiccups; `kind` slows rank VICTIM by `size`
    from ONSET (its temperature rising for `heat_lead` steps before, for heat; for data_starved it waits longer for
    its batches, and no GPU reports its utilization); `all_slow_from` slows every rank 15 % from that step, noisier
    (a loaded host). Returns the tracker and [(step, what it started)]."""
    rng = random.Random(seed)
    tr = DriftTracker()
    jitter = [rng.uniform(0.01, 0.03) for _ in range(ranks)]
    base_c = [rng.uniform(62, 70) for _ in range(ranks)]
    base_u = [rng.uniform(94, 98) for _ in range(ranks)]
    started, now = [], 1000.0
    for step in range(steps):
        loaded = all_slow_from is not None and step >= all_slow_from
        common = (1 + 0.015 * math.sin(step / 40)) * (rng.uniform(1.1, 1.4) if rng.random() < 0.02 else 1.0)
        common *= 1.15 if loaded else 1.0
        for r in range(ranks):
            temp, clock, reasons = base_c[r] + rng.gauss(0, 0.3), 1965.0, ()
            util, slow, data = min(100.0, base_u[r] + rng.gauss(0, 1)), 1.0, 0.02 * rng.uniform(0.7, 1.3)
            if r == VICTIM and kind == "heat" and step >= ONSET - heat_lead:  # heat sink failing: it heats first
                temp = base_c[r] + (84 - base_c[r]) * min(1.0, (step - ONSET + heat_lead) / heat_lead)
            if r == VICTIM and kind and step >= ONSET:
                slow = 1 + size
                if kind == "heat":
                    clock, reasons = round(1935 / slow), ("sw_thermal",)
                elif kind == "power_cap":
                    clock, reasons = round(1965 / slow), ("sw_power_cap",)
                elif kind == "cpu_starved":
                    util /= slow
                else:
                    data = (data + slow - 1) / slow
            compute = 1.0 * (1 + rng.gauss(0, jitter[r] * (1.5 if loaded else 1.0))) * common * slow
            tr.add(RankSample(r, "h", step, now, compute, 4096 / compute, round(temp, 1), clock, 1980.0, reasons,
                              0, None if kind == "data_starved" else round(util, 1), 600.0, data * compute))
        now += 1.2
        started += [(step, x) for x in tr.pop_started()]
    return tr, started


def flagged(started):
    return [(step, x) for step, x in started if not isinstance(x, ThermalTrend)]


@pytest.mark.parametrize("seed", range(5))
def test_healthy_noisy_ranks_are_never_flagged(seed):
    tr, started = run(seed, steps=400)
    assert started == []
    assert not any(s.straggler for s in tr.scores())


@pytest.mark.parametrize("seed", range(3))
def test_all_ranks_slower_together_is_not_a_straggler(seed):
    """The e2e false alarm: every rank 15 % slower than its usual (a loaded host), none slower than its peers."""
    tr, started = run(seed, all_slow_from=150)
    assert started == []
    assert all(s.individual > 1.05 for s in tr.scores())  # slower than usual indeed, and not flagged
    # one rank alone on its node (no peers), slowed with nothing on its GPU: not flagged either
    tr, started = run(seed, ranks=1, all_slow_from=150)
    assert started == [] and tr.scores()[0].individual > 1.05


@pytest.mark.parametrize("kind", sorted(REASON))
@pytest.mark.parametrize("seed", range(3))
def test_a_five_percent_slowdown_is_flagged_within_30_steps_with_its_reason(kind, seed):
    tr, started = run(seed, kind)
    flags = flagged(started)
    assert flags, f"{kind} never flagged"
    step, score = flags[0]
    assert score.rank == VICTIM and ONSET <= step <= ONSET + 30
    assert score.reason == REASON[kind]
    assert score.relative > 1.02 and score.straggler
    assert {x.rank for _, x in flags} == {VICTIM} and len(flags) == 1  # once per episode, nobody else
    assert {s.rank for s in tr.scores() if s.straggler} == {VICTIM}


def test_the_thermal_trend_fires_before_the_clock_drops():
    _, started = run(0, "heat", heat_lead=80)
    trends = [(step, x) for step, x in started if isinstance(x, ThermalTrend)]
    assert [x.rank for _, x in trends] == [VICTIM]
    step, trend = trends[0]
    assert step < ONSET  # before the clock drops
    assert trend.slope_c_per_min > 1 and trend.temperature_c > trend.usual_c + 3 and trend.sm_clock_mhz == 1965
    assert "clocks still at max" in trend.line() and "C/min" in trend.line()
    (flag_step, score), = flagged(started)
    assert flag_step >= ONSET and score.reason == THERMAL


def test_no_thermal_trend_when_every_gpu_warms_together():
    """A warming room heats every GPU: against its peers no GPU is heating."""
    tr = DriftTracker()
    started = []
    for step in range(300):
        for r in range(8):
            temp = 65 + r + (0.05 * (step - 150) if step > 150 else 0.0)  # +3 C/min for all from step 150
            tr.add(RankSample(r, "h", step, 1000 + step, 1.0 + 0.001 * r, 4096, temp, 1965.0, 1980.0, ()))
        started += tr.pop_started()
    assert started == []


class ScriptedGpus:
    """A probe whose readings the test sets (temperature and clock per GPU)."""

    def __init__(self, n):
        self.host, self.n = "n1", n
        self.temp = [65.0 + g for g in range(n)]
        self.clock = [1965.0] * n
        self.reasons = [()] * n

    def device_count(self):
        return self.n

    def sample(self):
        return [GpuSample(g, f"GPU-{g}", temperature_c=self.temp[g], sm_clock_mhz=self.clock[g],
                          max_sm_clock_mhz=1980.0, utilization_pct=96.0, throttle_reasons=self.reasons[g])
                for g in range(self.n)]

    def poll_events(self):
        return []

    def close(self):
        pass


def write_step(f, rank, step, when, compute):
    f.write(json.dumps({"kind": "step", "rank": rank, "host": "n1", "attempt": 0, "step": step, "time": when,
                        "step_time_s": 1.1, "tokens": 4096, "loss": 2.0, "compute_s": compute}) + "\n")


def test_the_agent_warns_of_a_heating_gpu_then_flags_its_rank_thermal(tmp_path):
    """Through NodeAgent.cycle: 4 ranks, their streams read file by file; rank 1's GPU heats from step 100 (the
    trend: context evidence, no cause, not a lemon's precursor), throttles at step 160 (a thermal straggler)."""
    probe = ScriptedGpus(4)
    agent = NodeAgent("n1", load_config(overrides={"run_dir": str(tmp_path)}), probe=probe)
    rng = random.Random(1)
    files = [open(agent.stats_dir / f"rank{r:05d}-attempt0000.jsonl", "a", buffering=1) for r in range(4)]
    try:
        for r, f in enumerate(files):
            f.write(json.dumps({"kind": "event", "rank": r, "host": "n1", "attempt": 0, "phase": "rendezvous",
                                "time": 1000.0, "gpu": r}) + "\n")
        evidence = []
        for step in range(1, 200):
            if step >= 100:
                probe.temp[1] = min(86.0, 66.0 + 0.35 * (step - 100))  # ~10 C/min at 2 s a step
            if step >= 160:
                probe.clock[1], probe.reasons[1] = 1760.0, ("sw_thermal",)
            for r, f in enumerate(files):
                slow = 1980 / probe.clock[r] if r == 1 else 1.0
                write_step(f, r, step, 1000.0 + 2 * step, (1.0 + rng.gauss(0, 0.015)) * slow)
            evidence += [(step, e) for e in agent.cycle().evidence]
    finally:
        for f in files:
            f.close()
        agent.stop()
    trend = [(s, e) for s, e in evidence if e.attrs.get("reason") == THERMAL_TREND]
    strag = [(s, e) for s, e in evidence if e.kind == EvidenceKind.STRAGGLER]
    assert [(e.kind, e.rank, e.gpu) for _, e in trend] == [(EvidenceKind.GPU_THERMAL, 1, 1)]
    t_step, t = trend[0]
    assert 100 < t_step < 160 and t.severity == Severity.INFO and "clocks still at max" in t.message
    assert candidate(t) is None and not precursor(t)  # context: it decides no verdict, drains nothing
    assert [(e.rank, e.attrs["reason"]) for _, e in strag] == [(1, THERMAL)]
    s_step, s = strag[0]
    assert 160 <= s_step <= 190 and "straggling (thermal)" in s.message and s.attrs["relative"] > 1.05


def test_the_agent_with_one_rank_on_a_loaded_host_raises_nothing(tmp_path):
    """The e2e run: one rank per host, the host loaded (every step 12 % slower, noisier) for a while."""
    probe = ScriptedGpus(2)
    agent = NodeAgent("n1", load_config(overrides={"run_dir": str(tmp_path)}), probe=probe)
    rng = random.Random(2)
    try:
        with open(agent.stats_dir / "rank00000-attempt0000.jsonl", "a", buffering=1) as f:
            f.write(json.dumps({"kind": "event", "rank": 0, "host": "n1", "attempt": 0, "phase": "rendezvous",
                                "time": 1000.0, "gpu": 0}) + "\n")
            evidence = []
            for step in range(1, 160):
                load = 1.12 if 60 <= step < 120 else 1.0
                write_step(f, 0, step, 1000.0 + 0.1 * step, 0.05 * load * (1 + rng.gauss(0, 0.03 * load)))
                if step % 3 == 0:  # a few steps a cycle
                    evidence += agent.cycle().evidence
    finally:
        agent.stop()
    assert [e for e in evidence if e.kind in (EvidenceKind.STRAGGLER, EvidenceKind.GPU_THERMAL)] == []
    (score,) = agent.straggler_scores()
    assert not score.straggler


def test_the_agent_with_one_rank_flags_a_thermally_throttled_gpu(tmp_path):
    """The e2e campaign's thermal fault: one rank per host (no peers), its simulated GPU's heat sink fails a few
    dozen steps into the attempt; the rank slows with its clock. Thermal straggler evidence (what drains the host),
    even without peers: its own usual, and the GPU says why."""
    agent = NodeAgent("n1", load_config(overrides={"run_dir": str(tmp_path)}))
    rng = random.Random(3)
    evidence, factor = [], 1.0
    try:
        with open(agent.stats_dir / "rank00000-attempt0000.jsonl", "a", buffering=1) as f:
            f.write(json.dumps({"kind": "event", "rank": 0, "host": "n1", "attempt": 0, "phase": "rendezvous",
                                "time": 1000.0, "gpu": 0, "pid": os.getpid()}) + "\n")
            for step in range(1, 90):
                if step == 40:
                    agent.inject("thermal", gpu=0, cooling=0.2)
                for g in agent.probe._gpus:  # 0.5 s of simulated time a step
                    g.last_t -= 0.5
                write_step(f, 0, step, 1000.0 + 0.5 * step, 0.05 * factor * (1 + rng.gauss(0, 0.03)))
                report = agent.cycle()
                evidence += [(step, e) for e in report.evidence if e.kind == EvidenceKind.STRAGGLER]
                gpu = report.heartbeat.gpus[0]
                factor = gpu.max_sm_clock_mhz / gpu.sm_clock_mhz  # as trainer.train.SimulatedClock slows the rank
    finally:
        agent.stop()
    assert [(e.rank, e.attrs["reason"]) for _, e in evidence] == [(0, THERMAL)]
    step, e = evidence[0]
    assert 40 < step < 70 and "straggling (thermal)" in e.message


@pytest.mark.parametrize("hot_from", [120, 8])
def test_a_lone_rank_whose_work_is_mostly_off_the_gpu_is_flagged_when_its_gpu_is_held_down_by_heat(hot_from):
    """One rank per host (no peers), its step mostly CPU work with 10 % noise: its hot GPU's held clock adds only
    ~4 % to a step, within its noise. The hardware thermal slowdown is the GPU's own account of why; no false alarm
    before it, and the flag comes within a dozen steps of it, also when it comes right after the attempt's warm-up,
    before the rank has a usual pace (the e2e campaign's overheating GPU)."""
    rng = random.Random(7)
    tr = DriftTracker()
    started = []
    for step in range(1, 200):
        hot = step >= hot_from
        clock, reasons = (1500.0, ("hw_slowdown", "hw_thermal")) if hot else (1965.0, ())
        compute = 0.15 * (1 + rng.gauss(0, 0.10)) + 0.05 * (1980.0 / clock)
        tr.add(RankSample(0, "h", step, 1000.0 + step, compute, 4096 / compute, 92.0 if hot else 65.0, clock, 1980.0,
                          reasons, 0))
        started += [(step, x) for x in tr.pop_started()]
    assert [(x.rank, x.reason) for _, x in flagged(started)] == [(0, THERMAL)]
    assert hot_from < flagged(started)[0][0] <= max(hot_from, 5) + 12


def test_an_agent_that_follows_a_new_job_judges_its_ranks_afresh(tmp_path):
    """An agent outlives jobs: after one whose attempts reached 7, the next job's attempt 0 is judged, not dropped
    as late lines of an old attempt (the e2e campaign's thermal drain never came after such a job)."""
    agent = NodeAgent("n1", load_config(overrides={"run_dir": str(tmp_path), "job": "first"}), probe=ScriptedGpus(2))
    try:
        for job, attempt, rank in (("first", 7, 3), ("second", 0, 0)):
            agent.follow(job)
            with open(agent.stats_dir / f"rank{rank:05d}-attempt{attempt:04d}.jsonl", "a", buffering=1) as f:
                f.write(json.dumps({"kind": "event", "rank": rank, "host": "n1", "attempt": attempt,
                                    "phase": "rendezvous", "time": 1000.0, "gpu": 0}) + "\n")
                for step in range(1, 30):
                    f.write(json.dumps({"kind": "step", "rank": rank, "host": "n1", "attempt": attempt, "step": step,
                                        "time": 1000.0 + step, "step_time_s": 0.05, "tokens": 4096, "loss": 2.0,
                                        "compute_s": 0.05}) + "\n")
            agent.cycle()
            assert [(s.rank, s.step) for s in agent.straggler_scores()] == [(rank, 29)], job
    finally:
        agent.stop()


def test_a_lone_rank_on_a_gpu_warming_from_idle_while_its_host_is_loaded_is_not_a_thermal_straggler():
    """A spare placed in the job starts cold: its GPU warms from 40 C to its working 70 C, the clock trimmed ~1 %
    on the way (no throttle bit), while the host's load slows the rank 20 % (the detection bench drained such a
    healthy host as thermal). Warmer than its usual and a little slower is not a GPU held down by heat."""
    tr = DriftTracker()
    started = []
    for step in range(1, 200):
        temp = 40.0 + 30.0 * min(1.0, step / 120)
        clock = 1980.0 * (1 - max(0.0, temp - 60) * 0.001)
        compute = 0.2 * (1.2 if step >= 100 else 1.0)
        tr.add(RankSample(0, "h", step, 1000.0 + step, compute, 4096 / compute, temp, clock, 1980.0, (), 0))
        started += [(step, x) for x in tr.pop_started()]
    assert flagged(started) == []

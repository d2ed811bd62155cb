"""The fleet simulator: calibration against Llama 3's 54 days, Herdsman's predicted ETTR, properties, the CLI."""

import dataclasses
import json
import statistics
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herdsman.config import ConfigError, SimulateConfig
from herdsman.events import TIME_SPLIT
from herdsman.taxonomy import TABLE5_PLANNED, TABLE5_UNEXPECTED, RootCause
from orchestrator.sim_sweep import parse_values
from orchestrator.simulate import expected_unexpected, profile, simulate

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

SEEDS = range(6)


@pytest.fixture(scope="module")
def llama3_runs():
    return [simulate(profile("llama3", seed=s)) for s in SEEDS]


def test_llama3_profile_lands_near_466_interruptions_and_90_percent(llama3_runs):
    # the failure process is calibrated on a homogeneous fleet: Table 5's rates exactly (lemons are an assumption
    # on top, and the detector takes most of them out before or early in the job)
    plain = [len(simulate(profile("llama3", seed=s, lemon_share=0.0)).interruptions) for s in SEEDS]
    # Poisson: sd ~ sqrt(466) ~ 22 per run; the mean of 6 runs within ~2 sd of its own error
    assert abs(statistics.mean(plain) - (TABLE5_UNEXPECTED + TABLE5_PLANNED)) < 25, plain
    e = [r.ettr for r in llama3_runs]
    assert 0.86 < statistics.mean(e) < 0.93, e
    for r in llama3_runs:
        assert r.split["lost_work"] > r.split["restart"] > 0  # 30-min checkpoints: lost work dominates
        assert r.human_interventions <= 5  # dependency breaks page; nothing else should at default rates


def test_the_mix_matches_table5_within_sampling_error():
    """Pooled over seeds on a homogeneous fleet, a chi-square test against Table 5's counts (17 dof)."""
    counts: Counter[RootCause] = Counter()
    for s in range(8):
        counts += simulate(profile("llama3", seed=100 + s, lemon_share=0.0)).by_cause
    n = sum(counts.values())
    expected = {c: n * c.facts.table5_count / TABLE5_UNEXPECTED for c in RootCause if c.facts.table5_count}
    chi2 = sum((counts[c] - e) ** 2 / e for c, e in expected.items())
    assert set(counts) <= set(expected)
    assert chi2 < 40.79, (chi2, counts)  # the 0.999 quantile of chi-square with 17 degrees of freedom
    # and the test has teeth: a mix with software bugs doubled is rejected
    skewed = counts + Counter({RootCause.SOFTWARE_BUG: counts[RootCause.SOFTWARE_BUG]})
    n2 = sum(skewed.values())
    chi2_skewed = sum((skewed[c] - n2 * c.facts.table5_count / TABLE5_UNEXPECTED) ** 2
                      / (n2 * c.facts.table5_count / TABLE5_UNEXPECTED) for c in expected)
    assert chi2_skewed > 40.79


def test_herdsman_figures_predict_at_least_97_percent(llama3_runs):
    runs = [simulate(profile("herdsman", seed=s)) for s in SEEDS]
    e = statistics.mean(r.ettr for r in runs)
    assert e > 0.965, e  # the goal is 97 %; the mean over 20 seeds is reported in the README
    assert e - statistics.mean(r.ettr for r in llama3_runs) > 0.06
    # the same failures arrive (same seeds): the gain is in recovery, not luck
    assert statistics.mean(len(r.interruptions) for r in runs) == pytest.approx(
        statistics.mean(len(r.interruptions) for r in llama3_runs), rel=0.05)


def test_a_run_is_reproducible_and_seeds_differ():
    cfg = profile("llama3", gpus=2048, days=10)
    a, b = simulate(cfg).to_dict(), simulate(cfg).to_dict()
    for d in (a, b):
        d.pop("sim_wall_s"), d.pop("policy_us_per_event")
    assert a == b
    assert simulate(dataclasses.replace(cfg, seed=1)).split != simulate(cfg).split


def test_too_few_spares_and_slow_repairs_leave_the_job_waiting():
    tight = simulate(profile("llama3", gpus=2048, days=20, spare_hosts=0, repair_s=3 * 86400, failure_scale=4))
    roomy = simulate(profile("llama3", gpus=2048, days=20, spare_hosts=32, repair_s=3 * 86400, failure_scale=4))
    assert tight.waits_for_hosts > 0 and tight.split["waiting_for_hosts"] > 86400
    assert roomy.split["waiting_for_hosts"] < tight.split["waiting_for_hosts"] / 10
    assert roomy.waits_for_hosts == 0
    assert roomy.ettr > tight.ettr


def test_lemon_detection_finds_lemons_without_taking_healthy_hosts(llama3_runs):
    """The default 54-day run: 2% of hosts fail 15x as often and show precursors 5x as often."""
    recall = statistics.mean(r.lemon_recall for r in llama3_runs)
    precision = statistics.mean(r.lemon_precision for r in llama3_runs)
    assert recall >= 0.8 and precision >= 0.9, (recall, precision)
    assert statistics.mean(r.healthy_flagged for r in llama3_runs) <= 0.5  # flagged at 99:1 odds, not 9:1
    # without its precursors and the fleet's history the same detector finds far fewer: both carry weight
    blind = simulate(profile("llama3", seed=0, precursor_per_day=0.0, history_days=0.0))
    assert blind.lemon_recall < recall - 0.2
    # lemons that stay in service keep failing: more interruptions with the detector off
    off = simulate(profile("llama3", seed=0, lemon_threshold=10_000, lemon_precursor_factor=1.0, history_days=0.0))
    assert len(off.unexpected) > statistics.mean(len(r.unexpected) for r in llama3_runs)


def test_lemon_detection_under_the_measured_diagnosis_takes_out_broken_hosts_not_healthy_ones():
    """Wrong verdicts leave faults in service (silent data corruption called `unknown`) to fail again: the count
    rule takes such a host out. It was broken, so not a false alarm, but it was no lemon either."""
    runs = [simulate(profile("llama3", seed=s, diagnosis="measured")) for s in range(4)]
    assert statistics.mean(r.lemon_recall for r in runs) >= 0.8
    assert statistics.mean(r.removal_precision for r in runs) >= 0.95
    assert statistics.mean(r.healthy_flagged for r in runs) <= 0.5
    assert sum(r.faulty_flagged for r in runs) > 0  # what the seeded-lemon precision counts against the detector
    assert statistics.mean(r.lemon_precision for r in runs) >= 0.85


def test_wrong_verdicts_cost_what_they_cost_in_the_policy():
    perfect = [simulate(profile("llama3", gpus=4096, seed=s)) for s in range(3)]
    measured = [simulate(profile("llama3", gpus=4096, seed=s, diagnosis="measured")) for s in range(3)]
    assert all(r.misdiagnosed == 0 for r in perfect) and all(r.misdiagnosed > 0 for r in measured)
    wrong = [i for r in measured for i in r.interruptions if i.verdict is not None and i.verdict != i.cause]
    assert wrong and all(i.verdict != i.cause for i in wrong)
    # a host fault taken for a software bug or an unknown leaves the host in: it fails again
    kept = [(r, i) for r in measured for i in r.interruptions
            if i.verdict is not None and i.verdict != i.cause and i.cause.facts.host_fault and not i.hosts]
    assert kept
    # ... and the same fault strikes again later (the simulator's refail), until a verdict takes the host out
    again = [(r, i) for r, i in kept
             if any(j.time > i.time and j.struck == i.struck and j.cause == i.cause for j in r.interruptions)]
    assert again


def test_the_confusion_the_simulator_draws_from_is_the_corpus_score():
    from orchestrator.diagnose_eval import evaluate, load_corpus
    from orchestrator.simulate import CONFUSION

    corpus = sorted(str(p) for p in (ROOT / "tests" / "corpus").glob("*.jsonl"))
    score = evaluate(load_corpus(corpus))
    stored = json.loads(CONFUSION.read_text())
    assert stored["confusion"] == score.to_json()["confusion"], "regenerate orchestrator/diagnosis_confusion.json"


def test_idle_spares_fail_and_lost_work_is_whole_steps():
    r = simulate(profile("llama3", gpus=4096, seed=3, spare_hosts=64))
    assert r.spare_failures > 0
    for i in r.interruptions:
        assert i.lost_steps == int(i.lost_work_s // r.cfg.step_s)


def test_a_dependency_break_pages_a_human_and_costs_the_response_time():
    cfg = profile("llama3", gpus=1024, days=30, failure_scale=30, human_response_s=7200)
    r = simulate(cfg)
    deps = r.by_cause[RootCause.DEPENDENCY]
    assert deps >= 1 and r.human_interventions >= deps
    # each page holds the job down for the response time, even when more breaks meanwhile
    assert r.split["operator"] >= 7000 * r.human_interventions * 0.99 or r.interruptions[-1].action.value == "stop"
    calm = simulate(dataclasses.replace(cfg, human_response_s=0))
    assert calm.split["operator"] == 0 < r.split["operator"]


def test_expected_count_is_table5_at_the_reference_size():
    assert expected_unexpected(SimulateConfig()) == pytest.approx(TABLE5_UNEXPECTED)
    assert expected_unexpected(SimulateConfig(gpus=8192, days=27)) == pytest.approx(TABLE5_UNEXPECTED / 4)


small = st.builds(
    lambda gpus, days, scale, interval, stall, restart, spares, seed: profile(
        "llama3", gpus=gpus, days=days, failure_scale=scale, checkpoint_interval_s=interval,
        checkpoint_stall_s=stall, restart_s=restart, spare_hosts=spares, seed=seed),
    gpus=st.sampled_from([64, 256, 1024]), days=st.floats(0.5, 10), scale=st.floats(0, 200),
    interval=st.floats(60, 7200), stall=st.floats(0, 300), restart=st.floats(0, 3600),
    spares=st.integers(0, 8), seed=st.integers(0, 1000))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(small)
def test_ettr_is_a_fraction_and_the_split_sums_to_the_wall(cfg):
    r = simulate(cfg)
    assert 0.0 <= r.ettr <= 1.0
    assert set(r.split) == set(TIME_SPLIT) and all(v >= -1e-6 for v in r.split.values()), r.split
    assert sum(r.split.values()) == pytest.approx(r.wall_s, rel=1e-9)
    assert r.split["unexplained"] == 0  # the simulator knows where every second went
    for i in r.interruptions:
        assert min(i.detection_s, i.restart_s, i.restore_s, i.lost_work_s, i.idle_s, i.waiting_s, i.operator_s,
                   i.idle_s - i.waiting_s - i.operator_s) >= -1e-6


@settings(max_examples=8, deadline=None, derandomize=True)
@given(gpus=st.sampled_from([512, 2048]), interval=st.floats(300, 3600), base=st.floats(0.5, 3))
def test_more_failures_never_improve_ettr(gpus, interval, base):
    def mean_ettr(scale: float) -> float:
        return statistics.mean(simulate(profile("llama3", gpus=gpus, days=20, failure_scale=scale,
                                                checkpoint_interval_s=interval, seed=s)).ettr for s in range(4))

    assert mean_ettr(base * 3) < mean_ettr(base) <= mean_ettr(0.0) == pytest.approx(
        interval / (interval + 15.0), rel=0.02)


def test_parse_values_types_and_rejects():
    cfg = SimulateConfig()
    assert parse_values(cfg, "spare_hosts", "0,8,16") == [0, 8, 16]
    assert parse_values(cfg, "restart_s", "60,180") == [60.0, 180.0]
    with pytest.raises(ConfigError, match="unknown simulate parameter"):
        parse_values(cfg, "nope", "1")
    with pytest.raises(ConfigError, match="takes int"):
        parse_values(cfg, "gpus", "many")
    with pytest.raises(ConfigError, match="gpus_per_host"):
        SimulateConfig(gpus=4, gpus_per_host=8)


def test_cli_single_run_and_sweep(tmp_path):
    cmd = [sys.executable, "-m", "orchestrator.cli", "simulate"]
    r = subprocess.run(cmd + ["--set", "gpus=1024", "--set", "days=10", "--seeds", "2", "--json",
                              str(tmp_path / "one.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Effective training time (ETTR)" in r.stdout and "over 2 seeds" in r.stdout
    runs = json.loads((tmp_path / "one.json").read_text())
    assert len(runs) == 2 and runs[0]["config"]["gpus"] == 1024
    assert sum(runs[0]["split"].values()) == pytest.approx(runs[0]["wall_s"])
    r = subprocess.run(cmd + ["--set", "gpus=512", "--set", "days=5", "--sweep", "checkpoint_interval_s=300,1800",
                              "--sweep", "spare_hosts=0,4", "--plot", str(tmp_path / "s.png"), "--json",
                              str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads((tmp_path / "s.json").read_text())
    assert [row["params"] for row in sweep["rows"]] == [
        {"checkpoint_interval_s": 300.0, "spare_hosts": 0}, {"checkpoint_interval_s": 300.0, "spare_hosts": 4},
        {"checkpoint_interval_s": 1800.0, "spare_hosts": 0}, {"checkpoint_interval_s": 1800.0, "spare_hosts": 4}]
    r = subprocess.run(cmd + ["--sweep", "bogus=1,2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown simulate parameter 'bogus'" in r.stderr

import json
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.agent import NodeAgent
from agents.gpu import GpuProbeError
from agents.gpu_nvml import NvmlProbe
from agents.gpu_sim import MAX_SM_MHZ, SimulatedGpus
from herdsman.config import load_config
from herdsman.events import EvidenceKind, Severity


def scrape(url):
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


@pytest.fixture
def agent(tmp_path):
    a = NodeAgent("n1", load_config(overrides={"run_dir": str(tmp_path)}))
    yield a
    a.stop()


def test_simulated_thermal_model_slows_clocks():
    sim = SimulatedGpus("n1", 2)
    sim.set_load(0, 1.0)
    sim.set_load(1, 1.0)
    sim.inject(1, "thermal", cooling=0.2)
    for g in sim._gpus:  # pretend a minute has passed
        g.last_t -= 60
    s0, s1 = sim.sample()
    assert s0.temperature_c < 87 and s0.sm_clock_mhz > 0.98 * MAX_SM_MHZ and not s0.throttle_reasons
    assert s1.temperature_c > 87 and "hw_thermal" in s1.throttle_reasons and s1.sm_clock_mhz < s0.sm_clock_mhz


def test_simulated_xid79_loses_the_gpu_and_calls_back():
    seen = []
    sim = SimulatedGpus("n1", 2, on_fatal=lambda gpu, msg: seen.append((gpu, msg)))
    sim.inject(0, "xid", code=79)
    s0, s1 = sim.sample()
    assert s0.lost and s0.xid_counts == {79: 1} and not s1.lost
    kinds = [(e.kind, e.code) for e in sim.poll_events()]
    assert (EvidenceKind.GPU_XID, 79) in kinds and (EvidenceKind.GPU_LOST, None) in kinds
    assert sim.poll_events() == []
    assert seen and seen[0][0] == 0 and "fallen off the bus" in seen[0][1]


def test_simulated_xid48_counts_dram_ecc():
    sim = SimulatedGpus("n1", 1)
    sim.inject(0, "xid", code=48)
    sim.inject(0, "xid", code=48)
    (s,) = sim.sample()
    assert s.ecc_dram_uncorrected == 2 and s.xid_counts == {48: 2} and not s.lost


def test_nvml_without_a_driver_fails_cleanly():
    try:
        import pynvml
        pynvml.nvmlInit()
        pytest.skip("an NVIDIA driver is present")
    except pynvml.NVMLError:
        pass
    with pytest.raises(GpuProbeError, match="NVML is not available on n1"):
        NvmlProbe("n1")


def test_evidence_from_gpu_faults_and_trainer_reports(agent):
    agent.inject("xid", gpu=1, code=48)
    stats = agent.stats_dir / "rank00000-attempt0000.jsonl"
    stats.write_text(
        json.dumps({"kind": "step", "rank": 0, "host": "n1", "attempt": 0, "step": 7, "time": time.time(),
                    "step_time_s": 0.5, "tokens": 512, "loss": 3.25}) + "\n"
        + json.dumps({"kind": "event", "rank": 0, "host": "n1", "attempt": 0, "phase": "failed",
                      "time": time.time(), "step": 7, "message": "Traceback\nValueError: boom"}) + "\n"
        + '{"kind": "step", "rank": 0, "tor')  # a torn last line waits
    r = agent.cycle()
    kinds = {e.kind for e in r.evidence}
    assert {EvidenceKind.GPU_XID, EvidenceKind.GPU_ECC, EvidenceKind.TRAINER_EXCEPTION} <= kinds
    assert any(e.severity == Severity.CRITICAL and e.code == 48 for e in r.evidence)
    assert [s.step for s in r.steps] == [7] and r.heartbeat.seq == 1 and len(r.heartbeat.gpus) == 2
    assert agent.cycle().steps == ()  # nothing new


def test_metrics_endpoint_serves_gpu_and_trainer_series(agent):
    url = agent.start_metrics()
    agent.inject("xid", gpu=0, code=48)
    (agent.stats_dir / "rank00002-attempt0001.jsonl").write_text(json.dumps(
        {"kind": "step", "rank": 2, "host": "n1", "attempt": 1, "step": 12, "time": time.time(),
         "step_time_s": 0.25, "tokens": 512, "loss": 2.5}) + "\n")
    agent.cycle()
    m = scrape(url)
    lab = (("gpu", "0"), ("node", "n1"), ("uuid", "GPU-sim-n1-0"))
    assert m[("herdsman_gpu_xid_errors_total", tuple(sorted(lab + (("code", "48"),))))] == 1
    assert m[("herdsman_gpu_ecc_errors_total",
              tuple(sorted(lab + (("counter", "aggregate"), ("memory", "dram"), ("type", "uncorrected")))))] == 1
    assert 20 < m[("herdsman_gpu_temperature_celsius", lab)] < 100
    assert m[("herdsman_trainer_step", (("node", "n1"), ("rank", "2")))] == 12
    assert m[("herdsman_trainer_tokens_per_second", (("node", "n1"), ("rank", "2")))] == 2048


def test_fatal_fault_kills_the_trainer_process_on_that_gpu(agent):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lines = [{"kind": "event", "rank": r, "host": "n1", "attempt": 0, "phase": "rendezvous", "time": 1.0,
                  "pid": p.pid, "gpu": g} for r, (p, g) in enumerate([(victim, 0), (bystander, 1)])]
        (agent.stats_dir / "rank00000-attempt0000.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        agent.cycle()
        assert [g.utilization_pct for g in agent.probe.sample()] == [90.0, 90.0]  # busy while a trainer runs
        agent.inject("xid", gpu=0, code=79)
        assert victim.wait(timeout=10) == -9
        assert bystander.poll() is None
    finally:
        victim.kill()
        bystander.kill()


def test_ranks_left_over_from_an_earlier_attempt_are_killed_but_not_one_kept_in_process(agent):
    """Two attempts never train at once: a rank of attempt 0 still alive once attempt 1 reports is killed, unless
    it reports in attempt 1 itself (an in-process restart kept its process)."""
    import time

    kept = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    stale = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        now = time.time()

        def started(rank, attempt, pid):
            return json.dumps({"kind": "event", "rank": rank, "host": "n1", "attempt": attempt, "phase": "started",
                               "time": now, "pid": pid, "gpu": rank}) + "\n"
        (agent.stats_dir / "rank00000-attempt0000.jsonl").write_text(started(0, 0, kept.pid))
        (agent.stats_dir / "rank00001-attempt0000.jsonl").write_text(started(1, 0, stale.pid))
        agent.cycle()
        (agent.stats_dir / "rank00000-attempt0001.jsonl").write_text(started(0, 1, kept.pid))
        agent.cycle()
        assert stale.wait(timeout=10) == -9
        assert kept.poll() is None
    finally:
        kept.kill()
        stale.kill()


def test_dashboard_queries_name_exported_metrics(agent):
    """Every metric a dashboard panel queries is one the agent exports (a renamed metric breaks this)."""
    import re
    from pathlib import Path

    url = agent.start_metrics()
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    families = {fam.name for fam in text_string_to_metric_families(body)}  # counters without _total
    dash = json.loads((Path(__file__).resolve().parent.parent / "dashboards" / "herdsman-fleet.json").read_text())
    for panel in dash["panels"]:
        for t in panel["targets"]:
            for name in re.findall(r"herdsman_[a-z_]+", t["expr"]):
                assert name.removesuffix("_total") in families, (name, sorted(families))


# fault -> (arguments, the sample field it moves, the metric and extra labels that must show it)
FIELD_FAULTS = [
    ("xid", {"code": 48}, lambda s: s.xid_counts == {48: 1} and s.ecc_dram_uncorrected == 1 and s.row_remap_pending,
     ("herdsman_gpu_xid_errors_total", {"code": "48"}, 1)),
    ("xid", {"code": 95}, lambda s: s.ecc_sram_uncorrected == 1,
     ("herdsman_gpu_ecc_errors_total", {"counter": "volatile", "memory": "sram", "type": "uncorrected"}, 1)),
    ("ecc", {"memory": "dram", "uncorrected": False, "count": 7}, lambda s: s.ecc_count("dram", "corrected") == 7,
     ("herdsman_gpu_ecc_errors_total", {"counter": "aggregate", "memory": "dram", "type": "corrected"}, 7)),
    ("retire_page", {"cause": "dbe"}, lambda s: s.retired_pages_dbe == 1 and s.retired_pages_pending,
     ("herdsman_gpu_retired_pages", {"cause": "dbe"}, 1)),
    ("retire_page", {"cause": "sbe", "pending": False}, lambda s: s.retired_pages_sbe == 1,
     ("herdsman_gpu_retired_pages", {"cause": "sbe"}, 1)),
    ("row_remap", {"uncorrectable": True}, lambda s: s.remapped_rows_uncorrectable == 1 and s.row_remap_pending
     and s.xid_counts == {63: 1}, ("herdsman_gpu_row_remap_pending", {}, 1)),
    ("row_remap", {"uncorrectable": False, "failure": True}, lambda s: s.row_remap_failure and
     s.remapped_rows_correctable == 1, ("herdsman_gpu_row_remap_failure", {}, 1)),
    ("pcie_replay", {"count": 42}, lambda s: s.pcie_replay_count == 42, ("herdsman_gpu_pcie_replay_total", {}, 42)),
    ("nvlink", {"kind": "crc_data", "count": 5}, lambda s: s.nvlink_errors["crc_data"] == 5,
     ("herdsman_gpu_nvlink_errors_total", {"type": "crc_data"}, 5)),
    ("xid", {"code": 74}, lambda s: s.nvlink_errors["replay"] == 10,
     ("herdsman_gpu_nvlink_errors_total", {"type": "replay"}, 10)),
    ("power_brake", {}, lambda s: "hw_power_brake" in s.throttle_reasons and s.sm_clock_mhz == 345.0,
     ("herdsman_gpu_clock_event_active", {"reason": "hw_power_brake"}, 1)),
    ("power_cap", {}, lambda s: "sw_power_cap" in s.throttle_reasons,
     ("herdsman_gpu_clock_event_active", {"reason": "sw_power_cap"}, 1)),
    ("lost", {}, lambda s: s.lost and s.temperature_c is None, ("herdsman_gpu_lost", {}, 1)),
]


@pytest.mark.parametrize("fault, args, check, metric", FIELD_FAULTS, ids=[f"{f[0]}-{i}" for i, f in enumerate(FIELD_FAULTS)])
def test_every_gpu_fault_moves_its_field_and_metric(agent, fault, args, check, metric):
    url = agent.start_metrics()
    agent.probe.set_load(0, 1.0)
    agent.inject(fault, gpu=0, **args)
    s0, s1 = agent.probe.sample()
    assert check(s0), s0
    assert not check(s1)  # the other GPU is untouched
    name, labels, value = metric
    m = scrape(url)
    key = (name, tuple(sorted({"node": "n1", "gpu": "0", "uuid": "GPU-sim-n1-0", **labels}.items())))
    assert m[key] == value


def test_every_sample_field_is_exported(agent):
    """A healthy simulated GPU fills every field, and each has a series."""
    url = agent.start_metrics()
    agent.probe.set_load(0, 1.0)
    s = agent.probe.sample()[0]
    empty = [f for f, v in vars(s).items() if v is None]
    assert empty == []
    m = scrape(url)
    names = {k[0] for k in m}
    for n in ("temperature_celsius", "memory_temperature_celsius", "sm_clock_mhz", "sm_clock_max_mhz",
              "mem_clock_mhz", "power_watts", "energy_joules_total", "utilization_percent", "memory_used_bytes",
              "violation_seconds_total", "ecc_errors_total", "retired_pages", "retired_pages_pending",
              "remapped_rows", "row_remap_pending", "row_remap_failure", "pcie_replay_total", "nvlink_errors_total",
              "lost", "clock_event_active"):
        assert f"herdsman_gpu_{n}" in names, n


def test_thermal_violation_time_accumulates():
    sim = SimulatedGpus("n1", 1)
    sim.set_load(0, 1.0)
    sim.inject(0, "thermal", cooling=0.2)
    sim._gpus[0].last_t -= 60
    sim.sample()
    sim._gpus[0].last_t -= 10
    s = sim.sample()[0]
    assert s.violation_s["thermal"] >= 10 and s.violation_s["power"] == 0
    assert s.energy_j > 0


def test_gpu_reset_clears_volatile_counters_only():
    sim = SimulatedGpus("n1", 1)
    sim.inject(0, "xid", code=48)
    sim.inject(0, "clear")
    s = sim.sample()[0]
    assert s.ecc_count("dram", counter="volatile") == 0 and s.ecc_dram_uncorrected == 1 and not s.row_remap_pending


def test_unknown_fault_is_a_clear_error():
    sim = SimulatedGpus("n1", 1)
    with pytest.raises(ValueError, match="unknown GPU fault"):
        sim.inject(0, "gremlins")
    with pytest.raises(ValueError, match="no gpu3"):
        sim.inject(3, "lost")


def test_health_check_keeps_a_faulty_host_out_until_it_is_repaired(agent):
    assert agent.health_check() == []
    agent.inject("xid", gpu=0, code=79)
    agent.inject("xid", gpu=1, code=48)
    problems = agent.health_check()
    assert any("gpu0" in p and "lost" in p for p in problems)
    assert any("gpu1" in p and "reset" in p for p in problems)
    agent.inject("clear", gpu=0)  # the GPU reset / repair
    agent.inject("clear", gpu=1)
    assert agent.health_check() == []

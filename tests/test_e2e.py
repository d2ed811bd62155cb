"""The whole loop on a real local multi-node Ray cluster: 3 worker hosts + 1 spare, real trainer processes."""

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import ray

from herdsman.config import load_config
from herdsman.layout import rank_log, stats_dir
from herdsman.events import HostState
from herdsman.taxonomy import RootCause
from orchestrator.cluster import LocalCluster, connect
from orchestrator.job import end_job, launch_controller, stop_controller, wait_done, wait_until
from orchestrator.store import Store
from tests.prometheus_server import prometheus, wait_for
from tests.test_cli import one_error_line
from tests.test_web import chromium_page, save_screenshot

pytestmark = pytest.mark.e2e
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
HOSTS = ["host-1", "host-2", "host-3", "host-4"]
STEPS = 40


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(HOSTS) as c:
        connect(c.address)
        yield c


def job_config(tmp_path, name, trainer=None, controller=None, agent=None):
    return load_config(overrides={
        "run_dir": str(tmp_path / "run"), "job": name, "agent": agent or {},
        "trainer": {"steps": STEPS, "checkpoint_every": 5, "step_delay_s": 0.05, **(trainer or {})},
        "controller": {"restart_backoff_s": 0.2, **(controller or {})},
    })


def accounted(st, share=0.01):
    """Every second of the job is in a named bucket: what no measurement covers is at most `share` of the wall."""
    split, wall = st["split"], st["wall_s"]
    assert abs(split["unexplained"]) <= share * wall, {k: round(v, 3) for k, v in split.items()}
    return split


def xid79_on_rank1(ctrl, after_step):
    """Once the job has trained past `after_step`, rank 1's GPU falls off the bus; returns that host."""
    st = wait_until(ctrl, lambda s: s["step"] >= after_step and s["state"] == "running", 300)
    victim = st["placement"][1]
    ray.get(ctrl.inject_gpu_fault.remote(victim, "xid", gpu=0, code=79))
    return victim


def test_xid79_evicts_the_host_and_resumes_from_the_latest_checkpoint(cluster, tmp_path):
    # reports reach the controller through two relays, as on a fleet larger than one relay's fanout
    cfg = job_config(tmp_path, "xid79", controller={"relay_fanout": 2})
    ctrl = launch_controller(cfg)
    try:
        victim = xid79_on_rank1(ctrl, 12)
        st = wait_done(ctrl, 300)
        assert st["intake"] == {"relays": ["herdsman-relay-xid79-0", "herdsman-relay-xid79-1"], "frames_refused": 0}
        split = accounted(st)
        assert split["detection"] > 0 and split["restart"] > 0 and split["restore"] > 0 and split["startup"] > 0
        # the spare was warmed while attempt 0 trained: its rank started from a standby, not cold
        first = next(d for d in st["decisions"] if "attempt 0: starting" in d)
        (spare,) = [h for h in st["placement"] if h not in first]
        assert any(f"warming spare(s) {spare}" in d for d in st["decisions"]), st["decisions"]
        log = rank_log(tmp_path / "run", spare, "xid79", st["placement"].index(spare), 1).read_text()
        assert "warm start from standby" in log, log[-2000:]
        # the operator page, from the real controller in a real browser, shows the evicted host
        with chromium_page() as page:
            page.goto(st["api_url"] + "/")
            page.wait_for_selector(f"#hosts tr[data-host='{victim}']")
            assert page.inner_text(f"#hosts tr[data-host='{victim}'] .state") == "quarantined"
            assert "faulty_gpu" in page.inner_text("#interruptions")
            save_screenshot(page, "operator-page-after-xid79.png")
    finally:
        stop_controller(ctrl)

    assert st["state"] == "finished", st["decisions"]
    (verdict,) = st["verdicts"]
    assert verdict["cause"] == "faulty_gpu" and verdict["hosts"] == [victim] and verdict["ranks"] == [1]
    assert any("Xid 79" in line for line in verdict["evidence"])
    assert st["hosts"][victim] == "quarantined"
    assert victim not in st["placement"] and len(st["placement"]) == 3 and "host-4" in st["placement"]

    store = Store(cfg.store_url)
    (it,) = store.interruptions("xid79")
    assert it.verdict.cause == RootCause.FAULTY_GPU and it.verdict.hosts == (victim,)
    # resumed from the latest checkpoint committed before the failure (a save the fault cut short does not count)
    # (>=: a save committed in the instant between the fault and its report would be newer still)
    assert it.last_step >= it.resumed_step >= max(s for s, t in st["checkpoints"] if t <= it.failed_at)
    assert 0 <= it.last_step - it.resumed_step <= cfg.trainer.checkpoint_every
    assert 0 < it.detection_s < 10 and 0 < it.restart_s < 60 and 0 <= it.restore_s < 30 and it.lost_work_s >= 0
    assert {h.host: h.state for h in store.hosts()}[victim] == HostState.QUARANTINED
    job = store.job("xid79")
    assert job.state == "finished" and job.last_step == STEPS and job.productive_s > 0
    # the quarantined host never got a rank again
    victim_stats = sorted(p.name for p in stats_dir(tmp_path / "run", victim, "xid79").glob("*.jsonl"))
    assert victim_stats and all("attempt0000" in n for n in victim_stats)


def test_software_exception_restarts_without_eviction(cluster, tmp_path):
    cfg = job_config(tmp_path, "bug")
    ctrl = launch_controller(cfg)
    try:
        # asked for while the ranks start up: a request made after some reported step could land late
        st = wait_until(ctrl, lambda s: s["state"] == "running", 300)
        first_placement = st["placement"]
        ray.get(ctrl.inject_trainer_fault.remote(2, "exception", "KeyError: 'lr_scale'", 14))
        st = wait_done(ctrl, 300)
        accounted(st)
    finally:
        stop_controller(ctrl)

    assert st["state"] == "finished", st["decisions"]
    (verdict,) = st["verdicts"]
    assert verdict["cause"] == "software_bug" and verdict["ranks"] == [2]
    assert "KeyError: 'lr_scale'" in verdict["evidence"][0]
    assert "quarantined" not in st["hosts"].values()
    assert st["placement"] == first_placement
    (it,) = Store(cfg.store_url).interruptions("bug")
    # the fault fires at the first step >= 14 after its file lands (on a loaded machine the trainer may be past 14
    # by then); the restart resumes from the latest checkpoint committed before it
    assert it.last_step >= 13 and it.restore_s is not None
    assert it.last_step >= it.resumed_step >= max(s for s, t in st["checkpoints"] if t <= it.failed_at)
    assert it.resumed_step % cfg.trainer.checkpoint_every == 0
    assert 0 <= it.last_step - it.resumed_step <= cfg.trainer.checkpoint_every


def test_a_dead_rank_is_replaced_and_the_others_rejoin_in_their_own_processes(cluster, tmp_path):
    """In-process restart: rank 1 is killed; ranks 0 and 2 keep their processes (same pids), re-form the group
    with a fresh rank 1 and restore from the memory tier; the losses are those of an uninterrupted run."""
    from tests.trainer_runs import launch, losses, write_config

    steps = 20
    cfg = job_config(tmp_path, "inproc", trainer={"steps": steps})
    ctrl = launch_controller(cfg)
    try:
        wait_until(ctrl, lambda s: s["state"] == "running", 300)  # asked for while the ranks start up
        ray.get(ctrl.inject_trainer_fault.remote(1, "sigkill", "", 12))
        st = wait_done(ctrl, 300)
        split = accounted(st)
    finally:
        stop_controller(ctrl)
    assert st["state"] == "finished", st["decisions"]
    assert len(st["verdicts"]) == 1 and split["restart"] > 0, "\n".join(st["decisions"])
    assert any("in-process restart" in d and "rank(s) [0, 2] keep their processes, rank(s) [1] start anew" in d
               for d in st["decisions"]), "\n".join(st["decisions"])

    def started(rank, attempt):
        d = stats_dir(tmp_path / "run", st["placement"][rank], "inproc")
        recs = [json.loads(x) for x in (d / f"rank{rank:05d}-attempt{attempt:04d}.jsonl").read_text().splitlines()]
        return next(r for r in recs if r["kind"] == "event" and r["phase"] == "started")
    for rank in (0, 2):
        assert started(rank, 0)["pid"] == started(rank, 1)["pid"] and "kept" in started(rank, 1)["message"]
    assert started(1, 0)["pid"] != started(1, 1)["pid"]
    log = rank_log(tmp_path / "run", st["placement"][0], "inproc", 0, 1).read_text()
    assert "kept process" in log and "(memory, " in log, log[-3000:]
    (it,) = Store(cfg.store_url).interruptions("inproc")
    assert it.last_step >= 11 and it.restore_s is not None
    assert it.last_step >= it.resumed_step >= max(s for s, t in st["checkpoints"] if t <= it.failed_at) >= 10

    ref = tmp_path / "uninterrupted"
    ref.mkdir()
    ref_cfg = write_config(ref / "h.toml", ref / "run", steps=steps, checkpoint_every=cfg.trainer.checkpoint_every)
    assert [r.returncode for r in launch(ref_cfg, 3, 0, ref / "stats")] == [0, 0, 0]
    got = losses(stats_dir(tmp_path / "run", st["placement"][0], "inproc"))
    assert got == losses(ref / "stats") and sorted(got) == list(range(1, steps + 1))


def test_hung_rank_is_found_by_the_flight_recorder_and_the_job_restarts(cluster, tmp_path):
    cfg = job_config(tmp_path, "hang", trainer={"steps": 30, "collective_timeout_s": 4.0})
    ctrl = launch_controller(cfg)
    try:
        st = wait_until(ctrl, lambda s: s["state"] == "running", 300)  # asked for while the ranks start up
        victim = st["placement"][1]
        ray.get(ctrl.inject_trainer_fault.remote(1, "hang", "", 12))
        st = wait_done(ctrl, 300)
        accounted(st)
    finally:
        stop_controller(ctrl)
    assert st["state"] == "finished", st["decisions"]
    assert len(st["verdicts"]) == 1, "\n".join(st["decisions"])
    (verdict,) = st["verdicts"]
    assert verdict["cause"] == "nccl_watchdog_timeout" and verdict["ranks"] == [1] and verdict["hosts"] == [victim]
    assert "never joined" in verdict["evidence"][0] and "gloo:" in verdict["evidence"][0]
    # asked for its dump: alone once its peers' collectives timed out (4 s), with them when the flight recorder
    # confirmed the hang first
    assert any(re.search(r"asked live ranks \[(0, )?1(, 2)?\]", d) for d in st["decisions"]), st["decisions"]
    # and how long the failure waited for those dumps (bench/mttr reads it): about dump_wait_s at most
    waits = [m for m in (re.search(r"flight-recorder dumps of attempt 0: (\d) of (\d) asked in ([0-9.]+) s$", d)
                         for d in st["decisions"]) if m]
    assert len(waits) == 1 and waits[0][1] <= waits[0][2] and float(waits[0][3]) <= cfg.controller.dump_wait_s + 2, \
        st["decisions"]
    assert st["hosts"][victim] == "suspect"
    dumps = sorted(p.name for p in (tmp_path / "run" / "nodes").glob("*/jobs/hang/flight_recorder/*attempt0000.json"))
    assert len(dumps) == 3


def test_crash_loop_stops_the_job_without_burning_a_spare(cluster, tmp_path):
    cfg = job_config(tmp_path, "loop")
    ctrl = launch_controller(cfg)
    try:
        st = wait_until(ctrl, lambda s: s["state"] == "running" and s["step"] >= 2, 300)
        ray.get(ctrl.inject_trainer_fault.remote(0, "exception", "AssertionError: grad norm is inf", 8, True))
        st = wait_done(ctrl, 300)
        accounted(st)
    finally:
        stop_controller(ctrl)
    assert st["state"] == "stopped" and "crash loop" in st["reason"] and "AssertionError: grad norm is inf" in st["reason"]
    assert [v["cause"] for v in st["verdicts"]] == ["software_bug"] * 3
    assert st["hosts"]["host-4"] == "spare" and "quarantined" not in st["hosts"].values()
    assert len(Store(cfg.store_url).interruptions("loop")) == 3
    assert Store(cfg.store_url).job("loop").state == "stopped"


def test_operator_api_quarantines_restarts_returns_and_stops(cluster, tmp_path):
    import httpx

    # it ends by the operator's stop; enough steps that a slow Prometheus start cannot let it finish first
    cfg = job_config(tmp_path, "api", trainer={"steps": 1000})
    ctrl = launch_controller(cfg)
    try:
        st = wait_until(ctrl, lambda s: s["state"] == "running" and s["step"] >= 3, 300)
        token = (tmp_path / "run" / "api_token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=st["api_url"], timeout=30) as api:
            hosts = {h["host"]: h for h in api.get("/api/hosts").json()}
            assert hosts["host-4"]["state"] == "spare" and hosts["host-1"]["in_job"] and hosts["host-1"]["gpus"] == 2
            # what the operator page reads, from the real controller
            assert "<title>Herdsman</title>" in api.get("/").text
            gpus = api.get("/api/gpus").json()["gpus"]
            assert {g["host"] for g in gpus} == set(HOSTS) and all(g["max_sm_clock_mhz"] > 0 for g in gpus)
            job = api.get("/api/job").json()
            assert 0 < job["ettr"] <= 1 and job["step_time_s"] > 0
            metrics = api.get("/metrics").text
            assert 'herdsman_job_step{job="api"}' in metrics
            assert 'herdsman_host_state{host="host-4",state="spare"} 1.0' in metrics
            # a real Prometheus scrapes the four agents and the controller, as dashboards/prometheus.yml does
            with prometheus(tmp_path / "prom", {"herdsman-agents": list(st["metrics_urls"].values()),
                                                "herdsman-controller": [st["api_url"] + "/metrics"]},
                            honor_labels=("herdsman-controller",)) as query:
                up = wait_for(query, "up == 1", lambda r: len(r) == 5)
                assert {m["job"] for m, _ in up} == {"herdsman-agents", "herdsman-controller"}
                temps = wait_for(query, "herdsman_gpu_temperature_celsius", lambda r: len(r) == 8)
                assert {m["node"] for m, _ in temps} == set(HOSTS) and all(20 < v < 100 for _, v in temps)
                (step,) = wait_for(query, 'herdsman_job_step{job="api"}', lambda r: len(r) == 1 and r[0][1] >= 3)
                assert wait_for(query, 'herdsman_host_state{state="spare"} == 1', lambda r: len(r) == 1)[0][0][
                    "host"] == "host-4"
            assert api.post("/api/hosts/host-4/quarantine", json={"reason": "x"}).status_code == 401
            victim = st["placement"][2]
            before = ray.get(ctrl.status.remote())
            assert before["attempt"] == 0 and before["state"] == "running", before["decisions"]  # nothing else ended it
            r = api.post(f"/api/hosts/{victim}/quarantine", json={"reason": "reseat the IB cable"}, headers=auth)
            assert r.status_code == 200
            st = wait_until(ctrl, lambda s: s["attempt"] == 1 and s["state"] == "running", 120)
            assert victim not in st["placement"] and st["hosts"][victim] == "quarantined", st["decisions"]
            r = api.post(f"/api/hosts/{victim}/return", headers=auth)
            assert r.status_code == 200 and r.json()["returned"], r.text
            assert api.get("/api/hosts").json()[[h["host"] for h in api.get("/api/hosts").json()].index(victim)][
                "state"] == "spare"
            (it,) = api.get("/api/interruptions").json()
            assert it["planned"] and "reseat the IB cable" in it["verdict"]["reason"]
            # every rank is healthy (the machine loaded by Prometheus, a restart, a browser): none is a straggler
            assert api.get("/api/gpus").json()["stragglers"] == []
            flags = [line for u in st["metrics_urls"].values() for line in httpx.get(u).text.splitlines()
                     if line.startswith("herdsman_rank_straggler{") and line.endswith(" 1.0")]
            assert flags == []
            assert api.post("/api/job/stop", json={"reason": "end of test"}, headers=auth).status_code == 200
        st = wait_done(ctrl, 60)
        accounted(st)
    finally:
        stop_controller(ctrl)
    assert st["state"] == "stopped" and "end of test" in st["reason"]


def test_planned_maintenance_drains_after_a_fresh_checkpoint(cluster, tmp_path):
    cfg = job_config(tmp_path, "maint", trainer={"checkpoint_every": 1000})  # no periodic checkpoints
    ctrl = launch_controller(cfg)
    try:
        st = wait_until(ctrl, lambda s: s["state"] == "running" and s["step"] >= 7, 300)
        host = st["placement"][0]
        ray.get(ctrl.inject_gpu_fault.remote(host, "maintenance", reason="BIOS update, window 03:00-04:00"))
        st = wait_done(ctrl, 300)
        accounted(st)
    finally:
        stop_controller(ctrl)
    assert st["state"] == "finished", st["decisions"]
    (verdict,) = st["verdicts"]
    assert verdict["cause"] == "host_maintenance" and verdict["hosts"] == [host]
    assert st["hosts"][host] == "quarantined" and host not in st["placement"]
    (it,) = Store(cfg.store_url).interruptions("maint")
    assert it.planned and it.detection_s == 0
    assert it.resumed_step == it.last_step >= 7  # the fresh checkpoint: no work lost
    assert any(s >= 7 for s, _ in st["checkpoints"][:1])


def test_a_host_whose_agent_falls_silent_is_taken_out_of_the_job(cluster, tmp_path):
    from herdsman import RAY_NAMESPACE
    from agents.ray_agent import agent_name

    cfg = job_config(tmp_path, "silent", trainer={"steps": 150, "checkpoint_every": 10},  # outlasts the window
                     controller={"heartbeat_timeout_s": 8.0})  # a loaded 2-core machine can delay beats by seconds
    ctrl = launch_controller(cfg)
    try:
        st = wait_until(ctrl, lambda s: s["state"] == "running" and s["step"] >= 5, 300)
        victim = st["placement"][1]
        ray.kill(ray.get_actor(agent_name(victim), namespace=RAY_NAMESPACE), no_restart=True)
        st = wait_done(ctrl, 300)
        accounted(st)
    finally:
        stop_controller(ctrl)
    assert st["state"] == "finished", st["decisions"]
    assert len(st["verdicts"]) == 1, "\n".join(st["decisions"])
    (verdict,) = st["verdicts"]
    assert verdict["cause"] == "unknown" and verdict["hosts"] == [victim], st["decisions"]
    assert victim not in st["placement"] and "host-4" in st["placement"]
    assert any(f"{victim} unreachable" in d for d in st["decisions"])
    assert not any("asked live ranks" in d for d in st["decisions"])  # live, progressing ranks are not dumped
    assert any(f"agent on {victim} is gone" in d for d in st["decisions"])
    assert st["hosts"][victim] == "quarantined"  # out until an operator returns it after a health check


def test_the_controller_survives_its_own_death_mid_campaign(cluster, tmp_path):
    """Ray restarts a killed controller; the new one carries on the job from the store and the report streams:
    same attempt numbering, verdict history, quarantine and checkpoints, and no interruption recorded twice."""
    cfg = job_config(tmp_path, "phoenix")
    ctrl = launch_controller(cfg)
    try:
        victim = xid79_on_rank1(ctrl, 10)
        # attempt 0 may have stepped past 17 before it was stopped: attempt 1's own steps are what is awaited
        st = wait_until(ctrl, lambda s: s["attempt"] == 1 and s["state"] == "running" and s["attempt_step"] >= 17,
                        300)
        pid_before = st["pid"]
        ray.kill(ctrl, no_restart=False)  # the controller's process dies; Ray starts it again
        st = wait_done(ctrl, 300)
        accounted(st)
    finally:
        stop_controller(ctrl)

    assert st["state"] == "finished", st["decisions"]
    assert st["pid"] != pid_before and st["api_url"]
    assert any("controller restarted" in d for d in st["decisions"])
    assert [v["cause"] for v in st["verdicts"]] == ["faulty_gpu", "unknown"]
    assert st["hosts"][victim] == "quarantined" and victim not in st["placement"]
    store = Store(cfg.store_url)
    its = store.interruptions("phoenix")
    assert [(i.attempt, i.verdict.cause) for i in its] == [(0, RootCause.FAULTY_GPU), (1, RootCause.UNKNOWN)]
    assert "controller restarted" in its[1].verdict.evidence[0]
    # the trainer of attempt 2 resumed from a checkpoint the first controller saw committed
    assert its[1].resumed_step is not None and its[1].resumed_step >= 15 and its[1].restore_s is not None
    job = store.job("phoenix")
    assert job.state == "finished" and job.last_step == STEPS
    # productive time counts each step once, though steps were recomputed after both interruptions
    assert 0 < job.productive_s < (job.ended_at - job.started_at)
    stats = {p.name for p in (tmp_path / "run" / "nodes").glob("*/jobs/phoenix/stats/rank00000-attempt*.jsonl")}
    assert stats == {"rank00000-attempt0000.jsonl", "rank00000-attempt0001.jsonl", "rank00000-attempt0002.jsonl"}


def _next_verdict(ctrl, inject, n_verdicts, mark, timeout=240):
    """Wait for progress past step `mark`, inject, and wait for the verdict it causes. Returns the verdict, the
    status, and the step at which the fault was injected."""
    st = wait_until(ctrl, lambda s: s["state"] == "running" and s["step"] >= 4 and s["step"] > mark + 3, timeout)
    injected_at = st["step"]
    inject(st)
    st = wait_until(ctrl, lambda s: len(s["verdicts"]) > n_verdicts, timeout)
    return st["verdicts"][n_verdicts], st, injected_at


def test_a_campaign_of_table5_faults_is_classified_blamed_and_acted_on(cluster, tmp_path):
    """One job, eight faults from Table 5's mix, each with the evidence a real one leaves: the verdict, the blamed
    host and the action must all be right. Hosts repaired in between go back to service through the health check."""
    cfg = job_config(tmp_path, "campaign", trainer={"steps": 100000},
                     controller={"hang_timeout_s": 5.0, "lemon_threshold": 100, "max_restarts": 50},
                     agent={"kernel_log": "{node_dir}/kern.log", "sys_root": "{node_dir}/sys"})
    for h in HOSTS:  # a per-host kernel log and NIC, as the agents of an embedded cluster see them
        (tmp_path / "run" / "nodes" / h).mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / "nodes" / h / "kern.log").write_text("")
    ctrl = launch_controller(cfg)
    seen, mark = [], [0]

    def check(inject, cause, action):
        v, st, mark[0] = _next_verdict(ctrl, inject, len(seen), mark[0])
        seen.append(v)
        (tmp_path / "decisions.txt").write_text("\n".join(st["decisions"]))
        assert v["cause"] == cause, (cause, v, "\n".join(st["decisions"][-40:]))
        assert v["action"] == action, (cause, v)
        return st

    def repair(host, *faults):
        for f, kw in faults:
            ray.get(ctrl.inject_gpu_fault.remote(host, f, **kw))
        wait_until(ctrl, lambda s: s["hosts"][host] == "quarantined", 60)
        time.sleep(1.5)  # the health check judges the agent's latest sample (every 0.5 s)
        assert ray.get(ctrl.return_to_service.remote(host)) == []

    try:
        wait_until(ctrl, lambda s: s["state"] == "running", 120)
        for h in HOSTS:
            ray.get(ctrl.inject_gpu_fault.remote(h, "nic", iface="eth0", state="up"))
        victim = {}

        def gpu(fault, key, **kw):
            def inject(st):
                victim[key] = st["placement"][1]
                ray.get(ctrl.inject_gpu_fault.remote(victim[key], fault, gpu=0, **kw))
            return inject

        check(gpu("xid", "48", code=48), "gpu_hbm3_memory", "evict")
        assert seen[-1]["hosts"] == [victim["48"]]
        repair(victim["48"], ("clear", {}))
        check(gpu("xid", "119", code=119), "gpu_system_processor", "evict")
        assert seen[-1]["hosts"] == [victim["119"]]
        repair(victim["119"], ("clear", {}))
        check(gpu("ecc", "sram", memory="sram", uncorrected=True), "gpu_sram_memory", "evict")
        assert seen[-1]["hosts"] == [victim["sram"]]
        repair(victim["sram"], ("clear", {}))

        def nic_down(st):
            victim["nic"] = st["placement"][2]
            ray.get(ctrl.inject_gpu_fault.remote(victim["nic"], "nic", iface="eth0", state="down"))
            ray.get(ctrl.inject_gpu_fault.remote(victim["nic"], "kernel", line="mlx5_core 0000:17:00.0 eth0: Link down"))
            time.sleep(1.5)  # the agent sees the link go down before the collectives fail
            ray.get(ctrl.inject_trainer_fault.remote(2, "exception", "RuntimeError: [../third_party/gloo/gloo/"
                                                     "transport/tcp/pair.cc:534] Connection closed by peer "
                                                     "[10.0.3.7]:40117", st["step"] + 1))
        check(nic_down, "nic", "evict")
        assert seen[-1]["hosts"] == [victim["nic"]]
        repair(victim["nic"], ("nic", {"iface": "eth0", "state": "up"}))

        check(lambda st: ray.get(ctrl.inject_trainer_fault.remote(1, "hang", "", st["step"] + 1)),
              "nccl_watchdog_timeout", "restart")
        assert seen[-1]["ranks"] == [1]  # the flight recorder named the rank that stopped joining
        check(lambda st: ray.get(ctrl.inject_trainer_fault.remote(0, "exception", "KeyError: 'lr_scale'",
                                                                  st["step"] + 1)),
              "software_bug", "restart")

        def thermal(st):
            victim["thermal"] = st["placement"][0]
            ray.get(ctrl.inject_gpu_fault.remote(victim["thermal"], "thermal", gpu=0, cooling=0.2))
        st = check(thermal, "gpu_thermal_interface_sensor", "drain")
        assert seen[-1]["hosts"] == [victim["thermal"]]
        assert any("straggling (thermal)" in e or "thermal slowdown" in e for e in seen[-1]["evidence"])

        check(lambda st: ray.get(ctrl.inject_trainer_fault.remote(
            0, "exception", "ImportError: /usr/lib/x86_64-linux-gnu/libnccl.so.2: undefined symbol: "
            "ncclCommInitRankScalable", st["step"] + 1)), "dependency", "stop")
        st = wait_done(ctrl, 120)
        accounted(st)
    finally:
        stop_controller(ctrl)

    assert st["state"] == "stopped" and "dependency" in st["reason"]
    store = Store(cfg.store_url)
    causes = [i.verdict.cause.value for i in store.interruptions("campaign")]
    assert causes == ["gpu_hbm3_memory", "gpu_system_processor", "gpu_sram_memory", "nic", "nccl_watchdog_timeout",
                      "software_bug", "gpu_thermal_interface_sensor", "dependency"]
    assert st["hosts"][victim["thermal"]] == "quarantined"
    # the postmortem of the campaign: one row per unexpected cause, both plots embedded
    from orchestrator.postmortem import render_html, render_markdown
    from orchestrator.report import summarize
    from tests.conftest import artifacts_dir

    summary = summarize(store, "campaign")
    md = render_markdown(summary)
    unexpected = [i.verdict.cause.value for i in store.interruptions("campaign") if not i.planned]
    assert len(unexpected) >= 7
    for cause in unexpected:
        assert re.search(rf"\| {cause} +\| +1 \|", md), (cause, md)
    assert md.count("### Attempt") == 8 and 0 < summary.ettr < 1
    html = render_html(summary)
    assert html.count("data:image/png;base64,") == 2
    out = artifacts_dir() / "postmortem-campaign.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html)


@contextlib.contextmanager
def small_filesystem(path, size_mb):
    """A tmpfs of `size_mb` mounted at `path` (the checkpoint file system of the chaos job)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs for the disk-full fault: {r.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path):
    """Take every free byte of the file system at `path`; returns the ballast file."""
    ballast = path / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return ballast


def hold_database_lock(db, seconds, locked):
    """What a backup, a `sqlite3` shell or a stuck migration does: hold the write lock."""
    conn = sqlite3.connect(db, timeout=30)
    conn.execute("BEGIN EXCLUSIVE")
    locked.set()
    time.sleep(seconds)
    conn.rollback()
    conn.close()


def test_chaos_the_job_outlives_its_store_agents_controller_disk_and_network(cluster, tmp_path):
    """During one job: the database is locked for 30 s while a GPU fails, a host goes quiet for less than the
    heartbeat window, an agent is killed, the checkpoint file system fills up, and the controller is killed.
    The job finishes; every interruption is recorded once with its cause; only the faulty host is quarantined;
    no checkpoint that verified is lost."""
    from agents.ray_agent import agent_name
    from herdsman import RAY_NAMESPACE
    from trainer.checkpoint import CheckpointError, committed, latest_valid, verify

    cfg = job_config(tmp_path, "chaos", trainer={"steps": 500, "checkpoint_every": 5, "step_delay_s": 0.1},
                     controller={"heartbeat_timeout_s": 20.0})
    with small_filesystem(tmp_path / "run" / "checkpoints", 64) as fs:
        ctrl = launch_controller(cfg)
        try:
            # 1. the store is locked for 30 s; meanwhile a GPU falls off the bus: the loop must act anyway
            wait_until(ctrl, lambda s: s["state"] == "running" and s["step"] >= 8, 300)
            locked = threading.Event()
            locker = threading.Thread(target=hold_database_lock, args=(tmp_path / "run" / "herdsman.db", 30, locked))
            locker.start()
            assert locked.wait(30)
            victim = xid79_on_rank1(ctrl, 8)
            st = wait_until(ctrl, lambda s: s["attempt"] == 1 and s["state"] == "running" and s["store"]["degraded"],
                            120)
            assert locker.is_alive()  # evicted and restarted while the store was still locked
            locker.join()
            st = wait_until(ctrl, lambda s: not s["store"]["degraded"] and s["store"]["pending_writes"] == 0, 120)
            assert [i.verdict.cause for i in Store(cfg.store_url).interruptions("chaos")] == [RootCause.FAULTY_GPU]

            # 2. a host is heard from not at all for 6 s (less than the 20 s window), 3. an agent is killed
            quiet, killed = [h for h in st["placement"] if h != victim][:2]
            ray.get(ctrl.inject_gpu_fault.remote(quiet, "silence", seconds=6))
            ray.kill(ray.get_actor(agent_name(killed), namespace=RAY_NAMESPACE), no_restart=False)

            # 4. the checkpoint file system fills up for a while: saves fail, training goes on
            mark = st["step"]
            good = latest_valid(fs / "chaos")
            ballast = fill(fs)
            st = wait_until(ctrl, lambda s: any("failed, skipped (training goes on)" in d for d in s["decisions"]),
                            180)
            ballast.unlink()
            st = wait_until(ctrl, lambda s: s["checkpoints"] and s["checkpoints"][-1][0] > st["step"], 180)
            assert st["attempt"] == 1, st["decisions"]  # neither the silence, the agent nor the disk restarted it
            assert (fs / "chaos" / good.path.name).exists() or any(s > good.step for s, _ in st["checkpoints"])

            # 5. the controller dies; Ray starts it again and it carries on
            pid = st["pid"]
            ray.kill(ctrl, no_restart=False)
            st = wait_done(ctrl, 400)
            accounted(st)
        finally:
            stop_controller(ctrl)
        assert st["state"] == "finished" and st["pid"] != pid, st["decisions"]
        assert st["step"] == 500 and mark < 500
        # every interruption once, with its cause
        its = Store(cfg.store_url).interruptions("chaos")
        assert [(i.attempt, i.verdict.cause) for i in its] == [(0, RootCause.FAULTY_GPU), (1, RootCause.UNKNOWN)]
        assert "controller restarted" in its[1].verdict.evidence[0]
        # only the faulty host is out
        assert {h for h, s in st["hosts"].items() if s == "quarantined"} == {victim}, st["hosts"]
        # what is on disk verifies, and the newest is the final step
        kept = committed(fs / "chaos")
        assert kept and int(kept[0].name.split("-")[1]) == 500
        for p in kept:
            try:
                verify(p)
            except CheckpointError as e:
                pytest.fail(f"a committed checkpoint does not verify: {e}")
        assert not list((tmp_path / "run").glob("*.store-spool.jsonl"))  # nothing was left unwritten


def write_toml(path, cfg):
    from herdsman.config import to_toml

    path.write_text(to_toml(cfg, redact=False))
    return str(path)


def herdsman_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


def test_the_job_outlives_its_client_and_answers_status_list_attach_and_stop(cluster, tmp_path):
    """`herdsman run` is killed with SIGKILL mid-job: the detached controller finishes the job, and new clients
    see it. A second job is stopped after a fresh checkpoint."""
    from dataclasses import replace

    from orchestrator.job import controller_of

    # a second a step: the CLI calls below (each a fresh Python importing Ray) must all land while it runs
    cfg = replace(job_config(tmp_path, "detached", trainer={"steps": 60, "step_delay_s": 1.0}), cluster=replace(
        load_config().cluster, address=cluster.address))
    conf = write_toml(tmp_path / "detached.toml", cfg)
    client = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "--config", conf],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT))
    deadline = time.time() + 120
    while controller_of("detached") is None and time.time() < deadline:
        time.sleep(0.5)
    ctrl = controller_of("detached")
    assert ctrl is not None, client.stdout.read1().decode() if client.poll() is not None else "no controller"
    try:
        wait_until(ctrl, lambda s: s["state"] == "running" and s["step"] >= 5, 240)
        client.kill()  # the operator's terminal is gone
        client.wait(10)
        st = ray.get(ctrl.status.remote())
        assert st["state"] == "running", st["decisions"][-10:]
        r = herdsman_cli("status", "detached", "--config", conf)
        assert r.returncode == 0 and "detached: running" in r.stdout and "attempt 0" in r.stdout, r.stdout + r.stderr
        assert "ETTR" in r.stdout and "hosts host-" in r.stdout and "last verdict -" in r.stdout, r.stdout
        r = herdsman_cli("list", "--config", conf)
        assert r.returncode == 0 and "detached" in r.stdout and "yes" in r.stdout and "ETTR" in r.stdout, r.stdout
        # Ctrl-C on attach detaches: the job goes on
        att = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "attach", "detached", "--config", conf],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT), text=True)
        assert att.stdout.readline(), "attach printed nothing"  # it follows the job now
        att.send_signal(signal.SIGINT)
        out = att.communicate(timeout=60)[0]
        assert att.returncode == 0 and "detached; the job goes on" in out and "Traceback" not in out, out
        assert ray.get(ctrl.status.remote())["state"] == "running"
        # bad input: one clear line, exit status 2, nothing changed
        before = ray.get(ctrl.status.remote())
        one_error_line(herdsman_cli("submit", "--config", conf), "already running")  # the name of a running job
        after = ray.get(ctrl.status.remote())
        assert (after["pid"], after["attempt"], after["state"]) == (before["pid"], before["attempt"], "running")
        one_error_line(herdsman_cli("status", "no-such-job", "--config", conf), "no job named 'no-such-job'")
        r = herdsman_cli("attach", "detached", "--config", conf, timeout=300)  # follows it to the end
        assert r.returncode == 0 and "detached: finished" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    finally:
        stop_controller(ctrl)
    job = Store(cfg.store_url).job("detached")
    assert job.state == "finished" and job.last_step == 60
    r = herdsman_cli("status", "detached", "--config", conf)
    assert "detached: finished (no controller running" in r.stdout and "ETTR" in r.stdout, r.stdout + r.stderr
    assert "step 60/60" in r.stdout and "last verdict -" in r.stdout, r.stdout
    one_error_line(herdsman_cli("submit", "--config", conf), "already ran")  # the name is taken by a finished job
    one_error_line(herdsman_cli("stop", "detached", "--config", conf),  # a finished job: nothing to stop
                   "no controller is running job 'detached'")
    assert Store(cfg.store_url).job("detached").state == "finished"  # nothing changed
    assert [j.name for j in Store(cfg.store_url).jobs()] == ["detached"]
    # --new starts the name afresh; the finished job's records are kept under another name
    r = herdsman_cli("submit", "--new", "--config", conf)
    assert r.returncode == 0 and "submitted job detached (attempt 0)" in r.stdout, r.stdout + r.stderr
    try:
        st = wait_until(controller_of("detached"), lambda s: s["state"] == "running" and s["step"] >= 1, 240)
        assert st["attempt"] == 0 and st["step"] < 60 and not st["verdicts"], st  # not the old job's history
        log = rank_log(tmp_path / "run", st["placement"][0], "detached", 0, 0).read_text()
        assert "fresh start at step 0" in log, log[-2000:]  # nor its checkpoints
    finally:
        end_job(controller_of("detached"), "test over")
    jobs = {j.name: j for j in Store(cfg.store_url).jobs()}
    (old,) = [j for n, j in jobs.items() if n.startswith("detached@")]
    assert old.state == "finished" and old.last_step == 60 and jobs["detached"].state == "stopped"

    # stop --drain: the ranks save a fresh checkpoint, then the job stops
    cfg2 = replace(cfg, job="drained", trainer=replace(cfg.trainer, steps=400, step_delay_s=0.05))
    conf2 = write_toml(tmp_path / "drained.toml", cfg2)
    r = herdsman_cli("submit", "--config", conf2)
    assert r.returncode == 0 and "submitted job drained" in r.stdout, r.stdout + r.stderr
    ctrl2 = controller_of("drained")
    try:
        wait_until(ctrl2, lambda s: s["state"] == "running" and s["step"] >= 7, 240)
        r = herdsman_cli("stop", "drained", "--drain", "--config", conf2)
        assert r.returncode == 0, r.stderr
        st = wait_done(ctrl2, 120)
        accounted(st)
    finally:
        stop_controller(ctrl2)
    assert st["state"] == "stopped" and "after a checkpoint at step" in st["reason"], st["reason"]
    fresh = int(st["reason"].split("after a checkpoint at step ")[1].split(":")[0])
    assert fresh >= 7 and fresh < 400

    # `run --stop-on-exit`: the job ends with its client (Ctrl-C here), recorded as stopped
    cfg3 = replace(cfg, job="onexit", trainer=replace(cfg.trainer, steps=400, step_delay_s=0.05))
    conf3 = write_toml(tmp_path / "onexit.toml", cfg3)
    client = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "--stop-on-exit", "--config", conf3],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT), text=True)
    deadline = time.time() + 120
    while controller_of("onexit") is None and time.time() < deadline:
        time.sleep(0.5)
    try:
        wait_until(controller_of("onexit"), lambda s: s["state"] == "running" and s["step"] >= 3, 240)
        client.send_signal(signal.SIGINT)
        out = client.communicate(timeout=180)[0]
    finally:
        if controller_of("onexit") is not None:
            stop_controller(controller_of("onexit"))
    assert client.returncode == 0 and "stopping job onexit (--stop-on-exit)" in out, out[-3000:]
    assert controller_of("onexit") is None and Store(cfg.store_url).job("onexit").state == "stopped"


def test_a_trainer_of_your_own_is_evicted_and_resumes_from_its_own_checkpoint(cluster, tmp_path):
    """examples/ddp_train.py, a plain DDP script with its own checkpoints, under Herdsman: an Xid 79 on one host
    kills its rank there; the host is evicted and the script resumes from the checkpoint it wrote."""
    cfg = job_config(tmp_path, "byo", trainer={
        "entrypoint": "python examples/ddp_train.py --steps 40 --checkpoint-every 5 --step-delay 0.1"})
    ctrl = launch_controller(cfg)
    try:
        victim = xid79_on_rank1(ctrl, 12)
        st = wait_done(ctrl, 300)
        # a trainer of your own reports no process start or model build: its legs are one (see accounts.py)
        split = accounted(st)
        assert st["intake"] == {"relays": [], "frames_refused": 0} and split["restart"] > 0
    finally:
        stop_controller(ctrl)
    assert st["state"] == "finished", st["decisions"][-20:]
    (verdict,) = st["verdicts"]
    assert verdict["cause"] == "faulty_gpu" and verdict["hosts"] == [victim], verdict
    assert st["hosts"][victim] == "quarantined" and victim not in st["placement"]
    (it,) = Store(cfg.store_url).interruptions("byo")
    assert it.resumed_step is not None and it.resumed_step >= 10 and it.restore_s is not None
    ckpts = sorted(p.name for p in cfg.checkpoint_dir.glob("step-*.pt"))
    assert ckpts and ckpts[-1] == "step-00000040.pt"
    # its ranks were told where checkpoints live and that resuming is required once one exists
    log = next(layout_rank_log(tmp_path, st["placement"][0]))
    assert "Traceback" not in log.read_text()


def layout_rank_log(tmp_path, host):
    from herdsman.layout import job_dir

    return iter(sorted((job_dir(tmp_path / "run", host, "byo") / "logs").glob("*attempt0001.log")))

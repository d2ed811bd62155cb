"""The restart daemon's side of a job: after the head's Ray is stopped and started again (the store and the run
directory intact), `herdsman resume` (what the daemon does every few seconds) carries the job on."""

import subprocess
import time

import pytest

from herdsman.config import load_config
from herdsman.taxonomy import RootCause
from orchestrator.cli_jobs import resume_jobs
from orchestrator.cluster import LocalCluster, connect
from orchestrator.job import controller_of, launch_controller, stop_controller, wait_done, wait_until
from orchestrator.store import Store

HOSTS = ["host-1", "host-2", "host-3", "host-4"]


def processes_mentioning(text):
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


@pytest.mark.e2e
def test_the_job_carries_on_after_the_head_restarts(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(overrides={"run_dir": str(run_dir), "job": "phoenix-head",
                                 "trainer": {"steps": 80, "checkpoint_every": 5, "step_delay_s": 0.1},
                                 "controller": {"restart_backoff_s": 0.2}})
    first = LocalCluster(HOSTS).start()
    try:
        connect(first.address)
        ctrl = launch_controller(cfg)
        st = wait_until(ctrl, lambda s: s["state"] == "running" and s["step"] >= 12 and s["checkpoints"], 300)
        step_before = st["step"]
    finally:
        first.stop()  # `ray stop` on the head: every actor gone, the controller with them
    assert Store(cfg.store_url).job("phoenix-head").state == "running"  # the store still says so

    second = LocalCluster(HOSTS).start()
    try:
        connect(second.address)
        assert controller_of("phoenix-head") is None
        assert resume_jobs(cfg) == ["phoenix-head"]  # what `herdsman resume` / the daemon does
        assert resume_jobs(cfg) == []  # and only once
        ctrl = controller_of("phoenix-head")
        try:
            st = wait_done(ctrl, 400)
        finally:
            stop_controller(ctrl)
    finally:
        second.stop()
    assert st["state"] == "finished" and st["step"] == 80, st["decisions"][-15:]
    its = Store(cfg.store_url).interruptions("phoenix-head")
    # one interruption, no host blamed: recorded by the new controller ("controller restarted"), or by the old one
    # if it saw its ranks vanish with the cluster before it went itself
    assert [i.verdict.cause for i in its] == [RootCause.UNKNOWN] and not its[0].verdict.hosts, its
    assert its[0].resumed_step is not None and its[0].resumed_step >= 5 and step_before >= 12
    time.sleep(1)
    assert processes_mentioning(str(run_dir)) == []  # no rank of the first cluster left behind


def test_the_daemon_waits_for_a_cluster_that_is_not_up_yet(tmp_path):
    """Started by systemd before Ray: each look is one line, never an exit (the resume itself is tested above)."""
    from orchestrator.cli_jobs import run_daemon

    cfg = load_config(overrides={"run_dir": str(tmp_path / "run"), "cluster": {"address": "127.0.0.1:1"}})
    lines, naps = [], []
    run_daemon(cfg, 7.0, lines.append, iterations=3, sleep=naps.append)
    assert naps == [7.0, 7.0, 7.0] and len(lines) == 3
    assert all(line.startswith("waiting: HerdsmanError: cannot reach the Ray cluster at 127.0.0.1:1") for line in lines)

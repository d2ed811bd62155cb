"""`herdsman demo`: the whole loop on one machine, with a short fault campaign, ending with the report."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from herdsman import HerdsmanError
from herdsman.config import HerdsmanConfig
from herdsman.events import HostState, HostStatus
from orchestrator.cluster import LocalCluster
from orchestrator.job import Progress, launch_controller, stop_controller, wait_done, wait_until
from orchestrator.report import render_text, summarize
from orchestrator.store import Store


def host_names(n: int) -> list[str]:
    return [f"host-{i + 1}" for i in range(n)]


def fresh_hardware(cfg: HerdsmanConfig, hosts: list[str]) -> None:
    """Each demo starts new simulated hosts: quarantines an earlier demo left on hosts of the same names do not
    apply to them (a real fleet's quarantines, in `herdsman run`, are kept across jobs)."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    store = Store(cfg.store_url)
    try:
        now = time.time()
        old = {st.host: st for st in store.hosts()}
        for h in hosts:
            if h in old and old[h].state != HostState.HEALTHY:
                store.set_host_state(HostStatus(h, HostState.HEALTHY, now, f"new simulated host for demo {cfg.job}"))
    finally:
        store.close()


def run_demo(cfg: HerdsmanConfig, echo: Callable[[str], None] = print, timeout_s: float = 600) -> None:
    if cfg.cluster.address != "local":
        raise HerdsmanError("the demo starts its own local cluster; set [cluster] address = \"local\"")
    if cfg.trainer.steps < 30:
        raise HerdsmanError("the demo's fault campaign needs trainer.steps >= 30")
    cfg = replace(cfg, job=f"{cfg.job}-{time.strftime('%Y%m%d-%H%M%S')}")
    hosts = host_names(cfg.cluster.worker_hosts + cfg.cluster.spare_hosts)
    fresh_hardware(cfg, hosts)
    t0 = time.time()
    echo(f"Starting a local Ray cluster: head + {len(hosts)} hosts ({', '.join(hosts)}) ...")
    with LocalCluster(hosts, cfg.cluster.cpus_per_host) as cluster:
        from orchestrator.cluster import connect

        connect(cluster.address)
        echo(f"  up in {time.time() - t0:.1f} s at {cluster.address}; run dir {cfg.run_dir}, job {cfg.job}")
        ctrl = launch_controller(cfg)
        import ray

        echo(f"  operator page: {ray.get(ctrl.status.remote())['api_url']}/ (token in {cfg.run_dir}/api_token)")
        progress = Progress(echo)
        try:
            # 1. a GPU falls off the bus on the host of rank 1
            first = max(cfg.trainer.checkpoint_every * 2, cfg.trainer.steps // 4)
            st = wait_until(ctrl, lambda s: s["step"] >= first, timeout_s, progress)
            victim = st["placement"][min(1, len(st["placement"]) - 1)]
            echo(f"* fault 1: Xid 79 on {victim} gpu0 (step {st['step']})")
            ray.get(ctrl.inject_gpu_fault.remote(victim, "xid", gpu=0, code=79))

            # 2. a software bug in rank 0 a few steps after the restart. Asked for as soon as the new attempt's
            # processes are launched, while they start up: waiting for its first reported step could let a short
            # job finish before the request lands. Counted from the checkpoint it resumes from (the first attempt
            # may have stepped on well past the Xid before it was stopped); it fires at the first step >= `at`.
            st = wait_until(ctrl, lambda s: s["attempt"] >= 1 and s["state"] == "running", timeout_s, progress)
            resume = max((step for step, _ in st["checkpoints"]), default=0)
            at = min(resume + cfg.trainer.checkpoint_every + 2, cfg.trainer.steps - 1)
            echo(f"* fault 2: a Python exception in rank 0 at step {at}")
            ray.get(ctrl.inject_trainer_fault.remote(0, "exception", "ValueError: shapes (4, 128) and (256,) not aligned",
                                                     at))
            st = wait_done(ctrl, timeout_s, progress)
        finally:
            stop_controller(ctrl)
    echo(f"Cluster stopped. Demo took {time.time() - t0:.0f} s.\n")
    summary = summarize(Store(cfg.store_url), cfg.job)
    echo(render_text(summary))
    from orchestrator.postmortem import render_html

    page = Path(cfg.run_dir).resolve() / f"postmortem-{cfg.job}.html"
    page.write_text(render_html(summary))
    echo(f"\nPostmortem with timeline, charts and runbook links: {page}")

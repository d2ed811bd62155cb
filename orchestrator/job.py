"""Start the controller on a connected Ray cluster and follow it until the job ends."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from herdsman import RAY_NAMESPACE, HerdsmanError, controller_name
from herdsman.config import HerdsmanConfig
from orchestrator.controller import ControllerActor


def controller_of(job: str) -> Any | None:
    """The running controller of `job` on the connected cluster, or None."""
    try:
        return ray.get_actor(controller_name(job), namespace=RAY_NAMESPACE)
    except ValueError:
        return None


def launch_controller(config: HerdsmanConfig, new: bool = False) -> Any:
    """The job's controller: a detached actor on this (the head) node, named after the job, so that it outlives
    the client that started it and agents and commands find it.

    A job has one identity: a live job is carried on (its controller, if one is missing, picks up from the store);
    a job name that already ended is refused, since attempt 0 again would write over its history, unless `new`,
    which archives the old records under `<job>@<its start time>` first."""
    from orchestrator.store import Store

    if controller_of(config.job) is not None:
        raise HerdsmanError(f"job {config.job!r} is already running (herdsman attach {config.job} / "
                            f"herdsman stop {config.job})")
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)  # where the default store lives
    store = Store(config.store_url)
    try:
        rec = store.job(config.job)
        if rec is not None and rec.state in ("finished", "stopped"):
            if not new:
                raise HerdsmanError(
                    f"job {config.job!r} already ran in this store ({rec.state} at step {rec.last_step}"
                    f"{': ' + rec.message if rec.message else ''}); give the new job another name, or pass --new "
                    "to archive its records and start the name afresh")
            archived = f"{config.job}@{time.strftime('%Y%m%d-%H%M%S', time.gmtime(rec.started_at))}"
            archive_files(config.run_dir, config.job, archived)
            store.archive_job(config.job, archived)
    finally:
        store.close()
    here = ray.get_runtime_context().get_node_id()
    ctrl = ControllerActor.options(
        name=controller_name(config.job), namespace=RAY_NAMESPACE, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        # a dead controller is started again and carries on from the store; calls made meanwhile wait for it
        max_restarts=config.controller.controller_restarts, max_task_retries=-1,
    ).remote(config)
    ray.get(ctrl.start.remote())  # the loop first: the job's start does not wait for the API's
    ray.get(ctrl.start_api.remote())
    return ctrl


def archive_files(run_dir: str | Path, job: str, archived: str) -> list[Path]:
    """Move what an ended job left in the run directory (shared by the cluster: its checkpoints, and on every
    host its report streams, control files, dumps and logs) under the archived name, so that a job started
    afresh under the same name (`--new`) neither resumes from its checkpoints nor reads its streams."""
    from herdsman import layout

    moved = []
    for src in [layout.checkpoint_dir(run_dir, job), *sorted((Path(run_dir) / "nodes").glob(f"*/jobs/{job}"))]:
        if src.is_dir():
            dst = src.with_name(archived)
            if dst.exists():
                raise HerdsmanError(f"cannot archive {src} as {dst.name}: that name is taken")
            src.rename(dst)
            moved.append(dst)
    return moved


def wait_until(ctrl: Any, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
               on_status: Callable[[dict[str, Any]], None] | None = None, poll_s: float = 0.5) -> dict[str, Any]:
    """Poll the controller's status until `predicate` holds; raise if the job ends first or time runs out."""
    deadline = time.time() + timeout_s
    while True:
        st = ray.get(ctrl.status.remote())
        if on_status:
            on_status(st)
        if predicate(st):
            return st
        if st["state"] in ("finished", "stopped"):
            raise HerdsmanError(f"job ended ({st['state']}: {st['reason']}) before the awaited condition")
        if time.time() > deadline:
            raise HerdsmanError(f"timed out after {timeout_s:.0f} s waiting; controller state {st['state']}, "
                                f"step {st['step']}")
        time.sleep(poll_s)


def wait_done(ctrl: Any, timeout_s: float, on_status: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    deadline = time.time() + timeout_s
    while True:
        st = ray.get(ctrl.status.remote())
        if on_status:
            on_status(st)
        if st["state"] in ("finished", "stopped"):
            return st
        if time.time() > deadline:
            raise HerdsmanError(f"job did not finish within {timeout_s:.0f} s (state {st['state']}, step {st['step']})")
        time.sleep(0.5)


def end_job(ctrl: Any, reason: str, timeout_s: float = 120.0) -> dict[str, Any] | None:
    """Stop the job as an operator would (recorded as stopped, so no daemon resumes it), then its controller."""
    st = None
    try:
        st = ray.get(ctrl.status.remote(), timeout=30)
        if st["state"] not in ("finished", "stopped"):
            ray.get(ctrl.request_stop.remote(reason, False), timeout=30)
            st = wait_done(ctrl, timeout_s)
    finally:
        stop_controller(ctrl)
    return st


def stop_controller(ctrl: Any) -> None:
    try:
        ray.get(ctrl.shutdown.remote(), timeout=60)
    finally:
        ray.kill(ctrl, no_restart=True)


class Progress:
    """Prints a line when something an operator cares about changes (step every few, state, decisions)."""

    def __init__(self, echo: Callable[[str], None] = print, every_steps: int = 10):
        self.echo, self.every = echo, every_steps
        self.last_step, self.last_state, self.n_decisions = -1, "", 0

    def __call__(self, st: dict[str, Any]) -> None:
        for line in st["decisions"][self.n_decisions:]:
            self.echo(f"  {line}")
        self.n_decisions = len(st["decisions"])
        if st["step"] // self.every != self.last_step // self.every and st["step"] > 0:
            loss = "-" if st["loss"] is None else f"{st['loss']:.3f}"
            self.echo(f"  step {st['step']}/{st['target_step']} loss {loss} attempt {st['attempt']} "
                      f"hosts {st['hosts']}")
            self.last_step = st["step"]

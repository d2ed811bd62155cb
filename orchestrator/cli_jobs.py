"""Job lifecycle commands: submit, status, list, attach, stop, resume, daemon (and `run` = submit + attach).

A job's controller is a detached Ray actor named after the job: it runs until the job ends or an operator stops
it, whatever happens to the client that submitted it. These commands find it by name; what they cannot ask a
live controller they read from the store.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import click

from herdsman import HerdsmanError
from herdsman.config import HerdsmanConfig, loads_config


def _connect(cfg: HerdsmanConfig) -> None:
    from orchestrator.cluster import connect

    if cfg.cluster.address == "local":
        raise HerdsmanError("[cluster] address is 'local': `herdsman demo` runs its own cluster; for a job that "
                            "outlives its client, set the address of a running Ray cluster")
    connect(cfg.cluster.address)


def submit_job(cfg: HerdsmanConfig, new: bool, echo: Callable[[str], None]) -> Any:
    from orchestrator.job import launch_controller

    _connect(cfg)
    ctrl = launch_controller(cfg, new=new)
    import ray

    st = ray.get(ctrl.status.remote())
    echo(f"submitted job {cfg.job} (attempt {st['attempt']}); operator page {st['api_url']}/")
    echo(f"  follow it: herdsman attach {cfg.job}    stop it: herdsman stop {cfg.job} [--drain]")
    return ctrl


def attach_job(ctrl: Any, echo: Callable[[str], None], timeout_s: float) -> dict[str, Any]:
    """Follow the job until it ends; Ctrl-C detaches (the job goes on)."""
    from orchestrator.job import Progress, wait_done

    try:
        return wait_done(ctrl, timeout_s, Progress(echo))
    except KeyboardInterrupt:
        echo("\ndetached; the job goes on (herdsman attach / status / stop)")
        raise SystemExit(0) from None


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def summary_line(st: dict[str, Any]) -> str:
    ettr = "-" if st.get("ettr") is None else f"{100 * st['ettr']:.1f}%"
    verdict = st["verdicts"][-1]["cause"] if st.get("verdicts") else "-"
    hosts = ",".join(st.get("placement") or []) or "-"
    return (f"{st['job']}: {st['state']}{' (' + st['reason'] + ')' if st.get('reason') else ''}, step "
            f"{st['step']}/{st['target_step']}, attempt {st['attempt']}, ETTR {ettr}, hosts {hosts}, "
            f"last verdict {verdict}")


def stored_line(store: Any, name: str) -> str:
    """What the store knows of a job whose controller is not running: the same fields as `summary_line`, with
    the fleet's hosts (the job's placement lives only in its controller)."""
    s, verdict = _stored(store, name)
    rec = s.job
    hosts = store.hosts()
    out = sorted(h.host for h in hosts if h.state.value == "quarantined")
    return (f"{name}: {rec.state} (no controller running{': ' + rec.message if rec.message else ''}), step "
            f"{rec.last_step}/{rec.target_step}, attempt {rec.attempt}, ETTR {100 * s.ettr:.1f}%, hosts "
            f"{len(hosts) - len(out)} in service{', quarantined ' + ','.join(out) if out else ''}, "
            f"last verdict {verdict}")


def list_row(store: Any, rec: Any) -> list[Any]:
    """One job's row: a running controller's own figures, else the store's."""
    ctrl = controller_of(rec.name)
    st: dict[str, Any] | None = None
    if ctrl is not None:
        import ray

        try:
            st = ray.get(ctrl.status.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a controller restarting or busy: the store's figures will do
            st = None
    if st is not None:
        state, step, attempt = st["state"], f"{st['step']}/{st['target_step']}", st["attempt"]
        ettr = None if st.get("ettr") is None else st["ettr"]
        verdict = st["verdicts"][-1]["cause"] if st.get("verdicts") else "-"
    else:
        s, verdict = _stored(store, rec.name)
        state, step, attempt, ettr = rec.state, f"{rec.last_step}/{rec.target_step}", rec.attempt, s.ettr
    return [rec.name, state, "yes" if ctrl is not None else "no", step, attempt,
            "-" if ettr is None else f"{100 * ettr:.1f}%", verdict,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.started_at))]


def _stored(store: Any, name: str) -> tuple[Any, str]:
    """The store's summary of a job and its last verdict ("-" if none)."""
    from orchestrator.report import summarize

    s = summarize(store, name)
    return s, (s.interruptions[-1].verdict.cause.value if s.interruptions else "-")


def controller_of(job: str) -> Any | None:
    from orchestrator.job import controller_of as find  # imports Ray: only when a command needs it

    return find(job)


def register(main: click.Group, config_option: Callable, load: Callable[..., HerdsmanConfig],
             echo: Callable[[str], None]) -> None:
    """Add the lifecycle commands to the `herdsman` group (orchestrator/cli.py)."""
    job_arg = click.argument("job", required=False)

    @main.command()
    @config_option
    @click.option("--new", is_flag=True, help="Start the job's name afresh: its earlier records are archived.")
    def submit(config_path: str | None, new: bool) -> None:
        """Start the job and return at once (it runs until it ends or is stopped, whatever the client does)."""
        submit_job(load(config_path), new, echo)

    @main.command()
    @config_option
    @click.option("--new", is_flag=True, help="Start the job's name afresh: its earlier records are archived.")
    @click.option("--stop-on-exit", is_flag=True, help="Stop the job when this command ends or is interrupted.")
    @click.option("--timeout", type=float, default=30 * 86400, show_default=True, help="Seconds to follow it.")
    def run(config_path: str | None, new: bool, stop_on_exit: bool, timeout: float) -> None:
        """Submit the job and follow it (Ctrl-C detaches; the job goes on unless --stop-on-exit)."""
        from orchestrator.report import render_text, summarize
        from orchestrator.store import Store

        cfg = load(config_path)
        ctrl = submit_job(cfg, new, echo)
        if stop_on_exit:  # a closed terminal (SIGHUP) or a kill (SIGTERM) is an exit too: stop the job then
            import signal

            for sig in (signal.SIGHUP, signal.SIGTERM):
                signal.signal(sig, _interrupt)
        try:
            attach_job(ctrl, echo, timeout)
        finally:
            if stop_on_exit:
                from orchestrator.job import end_job

                echo(f"stopping job {cfg.job} (--stop-on-exit)")
                end_job(ctrl, "the client ended (--stop-on-exit)")
        echo(render_text(summarize(Store(cfg.store_url), cfg.job)))

    @main.command()
    @config_option
    @job_arg
    def status(config_path: str | None, job: str | None) -> None:
        """A job's state, step, attempt, ETTR so far, hosts and last verdict (default: the config's job)."""
        cfg = load(config_path)
        _connect(cfg)
        name = job or cfg.job
        ctrl = controller_of(name)
        if ctrl is not None:
            import ray

            echo(summary_line(ray.get(ctrl.status.remote(), timeout=30)))
            return
        from orchestrator.store import Store

        store = Store(cfg.store_url)
        try:
            if store.job(name) is None:
                raise HerdsmanError(f"no job named {name!r} in the store or on the cluster")
            echo(stored_line(store, name))
        finally:
            store.close()

    @main.command("list")
    @config_option
    def list_jobs(config_path: str | None) -> None:
        """Every job in the store: state, whether its controller runs, step, attempt, ETTR, last verdict."""
        from tabulate import tabulate

        from orchestrator.store import Store

        cfg = load(config_path)
        _connect(cfg)
        store = Store(cfg.store_url)
        try:
            rows = [list_row(store, rec) for rec in store.jobs()]
        finally:
            store.close()
        echo(tabulate(rows, headers=["job", "state", "controller", "step", "attempt", "ETTR", "last verdict",
                                     "started"]) if rows else "no jobs")

    @main.command()
    @config_option
    @job_arg
    @click.option("--timeout", type=float, default=30 * 86400, show_default=True)
    def attach(config_path: str | None, job: str | None, timeout: float) -> None:
        """Follow a running job's progress and decisions (Ctrl-C detaches; the job goes on)."""
        cfg = load(config_path)
        _connect(cfg)
        ctrl = controller_of(job or cfg.job)
        if ctrl is None:
            raise HerdsmanError(f"no controller is running job {job or cfg.job!r} (herdsman status / list)")
        st = attach_job(ctrl, echo, timeout)
        echo(summary_line(st))

    @main.command()
    @config_option
    @job_arg
    @click.option("--drain", is_flag=True, help="Stop after a fresh checkpoint (the ranks save, then exit).")
    @click.option("--reason", default="stopped from the command line", show_default=True)
    def stop(config_path: str | None, job: str | None, drain: bool, reason: str) -> None:
        """Stop a job now, or after a fresh checkpoint (--drain)."""
        import ray

        cfg = load(config_path)
        _connect(cfg)
        ctrl = controller_of(job or cfg.job)
        if ctrl is None:
            raise HerdsmanError(f"no controller is running job {job or cfg.job!r}")
        ray.get(ctrl.request_stop.remote(reason, drain), timeout=30)
        echo(f"stop requested{' after a fresh checkpoint' if drain else ''}: {job or cfg.job}")

    @main.command()
    @config_option
    def resume(config_path: str | None) -> None:
        """Start a controller for every job the store says is live but no controller runs (after the head
        restarted): each carries on from the store and its checkpoints."""
        cfg = load(config_path)
        _connect(cfg)
        for name in resume_jobs(cfg):
            echo(f"resumed job {name}")

    @main.command()
    @config_option
    @click.option("--every", type=float, default=15.0, show_default=True, help="Seconds between looks.")
    def daemon(config_path: str | None, every: float) -> None:
        """The head-side restart daemon (systemd: deploy/herdsman.service): waits for the Ray cluster, then keeps
        a controller running for every live job in the store."""
        run_daemon(load(config_path), every, echo)


def run_daemon(cfg: HerdsmanConfig, every: float, echo: Callable[[str], None], iterations: int | None = None,
               sleep: Callable[[float], None] = time.sleep) -> None:
    """Look every `every` seconds: join the cluster if not joined, then resume the live jobs that lack a
    controller. A cluster or store that is not up yet is a line and another look later, never an exit."""
    import ray

    from orchestrator.cluster import connect

    n = 0
    while iterations is None or n < iterations:
        n += 1
        try:
            if not ray.is_initialized():
                connect(cfg.cluster.address)
            for name in resume_jobs(cfg):
                echo(f"resumed job {name}")
        except Exception as e:  # noqa: BLE001 - the cluster or the store is not up yet: look again later
            echo(f"waiting: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            try:
                ray.shutdown()  # joined a cluster that then went away: join afresh next time
            except Exception:  # noqa: BLE001
                pass
        sleep(every)


def resume_jobs(cfg: HerdsmanConfig) -> list[str]:
    """Controllers for the live jobs of the store that have none; returns their names."""
    from orchestrator.job import launch_controller
    from orchestrator.recovery import LIVE_STATES
    from orchestrator.store import Store

    store = Store(cfg.store_url)
    try:
        live = [j for j in store.jobs() if j.state in LIVE_STATES]
    finally:
        store.close()
    started = []
    for rec in live:
        if controller_of(rec.name) is None:
            launch_controller(as_submitted(rec.name, rec.config, cfg))
            started.append(rec.name)
    return started


def as_submitted(name: str, text: str | None, cfg: HerdsmanConfig) -> HerdsmanConfig:
    """The job's configuration as it was submitted (kept in the store without secrets), with this cluster's
    address, store and token; a job from before the store kept configurations runs with `cfg`."""
    from dataclasses import replace

    if not text:
        return replace(cfg, job=name)
    job = loads_config(text)
    return replace(job, job=name, cluster=replace(job.cluster, address=cfg.cluster.address), store=cfg.store,
                   api=replace(job.api, token=cfg.api.token))

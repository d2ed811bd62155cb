"""`herdsman` command line.

Nothing it prints gives a secret away: errors (one line, or a traceback for a bug), log records and the progress of
`run`/`demo` pass through herdsman.secrets.redact_text, which hides URL passwords and the secrets this process knows
(the configured API token, Grafana credentials); `herdsman config` leaves secrets out unless --show-secrets.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from herdsman import HerdsmanError
from herdsman.config import HerdsmanConfig, load_config, to_toml
from herdsman.secrets import (
    RedactingFilter,
    install_log_redaction,
    redact_text,
    redact_url,
)

# The secrets this process has learned (config token, Grafana credentials): hidden in errors and log records.
_redactor = RedactingFilter()


def _redact(text: str) -> str:
    return redact_text(text, _redactor.secrets)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Control characters from outside text (a kernel line, a rank's stderr) shown as escapes: a carriage
    return or an ANSI sequence in hostile input must not rewrite what the operator's terminal shows."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _echo(message: str = "", **kw: Any) -> None:
    """click.echo with secrets hidden and control characters escaped: for progress lines that carry outside
    text (evidence, URLs)."""
    click.echo(printable(_redact(message)), **kw)


def _load_config(path: str | None, overrides: dict[str, Any] | None = None) -> HerdsmanConfig:
    cfg = load_config(path, overrides)
    _redactor.add_secret(cfg.api.token)
    return cfg


class _Group(click.Group):
    """Operator errors are one line on stderr and exit status 2, never a traceback; a bug's traceback (exit 1)
    has its secrets hidden too."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HerdsmanError as e:
            click.echo(f"herdsman: error: {_redact(str(e))}", err=True)
            sys.exit(2)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except BrokenPipeError:  # the reader went away (`herdsman diagnose log | head`): stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
            sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a tool SIGPIPE ended
        except Exception as e:  # noqa: BLE001 - a bug: show its traceback, but never a password or token in it
            click.echo(_redact("".join(traceback.format_exception(e))).rstrip("\n"), err=True)
            sys.exit(1)


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="TOML configuration file (defaults run on a laptop).")


@click.group(cls=_Group)
@click.version_option(package_name="herdsman")
def main() -> None:
    """Herdsman keeps large training runs training: agents, diagnosis, eviction and restart on Ray."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction(flt=_redactor)


@main.command()
@config_option
@click.option("--steps", type=int, help="Target training step (overrides [trainer] steps).")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Overrides run_dir.")
def demo(config_path: str | None, steps: int | None, run_dir: str | None) -> None:
    """Run the whole system on this machine: a local multi-node Ray cluster, agents with simulated GPUs, the
    controller and the Llama 3 trainer, with a short fault campaign; ends with the report."""
    from orchestrator.demo import run_demo

    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides.setdefault("trainer", {})["steps"] = steps
    if run_dir is not None:
        overrides["run_dir"] = run_dir
    run_demo(_load_config(config_path, overrides), _echo)


def _register_jobs() -> None:
    from orchestrator.cli_jobs import register

    register(main, config_option, _load_config, _echo)


_register_jobs()


@main.command()
@config_option
@click.option("--job", help="Job name (default: the most recent job in the store).")
@click.option("--db", help="SQLAlchemy URL of the store (default: from the config).")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "html"]), default="text", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False),
              help="Write the report here (Markdown: the plots go next to it as PNG files); default stdout.")
@click.option("--runbook-base", default="", help="URL or directory of the runbooks (default: this checkout's).")
def report(config_path: str | None, job: str | None, db: str | None, fmt: str, out: str | None,
           runbook_base: str) -> None:
    """Postmortem: interruptions by root cause (Table 5 style), ETTR and its split, MTTF and MTTR.

    Markdown and HTML add a timeline and a root-cause chart, hosts implicated (lemon candidates) and every
    interruption with its evidence and runbook link; the HTML file is self-contained.
    """
    from orchestrator.report import render_text, summarize
    from orchestrator.store import Store

    cfg = _load_config(config_path)
    url = db or cfg.store_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise HerdsmanError(f"no Herdsman database at {url.removeprefix('sqlite:///')}")
    store = Store(url)
    if job is None:
        jobs = store.jobs()
        if not jobs:
            raise HerdsmanError(f"no jobs recorded in {redact_url(url)}")
        job = jobs[-1].name
    summary = summarize(store, job)
    if fmt == "text":
        text = render_text(summary)
    else:
        from orchestrator import postmortem

        if fmt == "html":
            text = postmortem.render_html(summary, runbook_base)
        else:
            images = {}
            if out and summary.interruptions:
                target = Path(out)
                target.parent.mkdir(parents=True, exist_ok=True)
                for key, draw in (("timeline", postmortem.timeline_png), ("causes", postmortem.causes_png)):
                    name = f"{target.stem}-{key}.png"
                    (target.parent / name).write_bytes(draw(summary))
                    images[key] = name
            text = postmortem.render_markdown(summary, runbook_base, images)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(text)


@main.command("config")
@config_option
@click.option("--show-secrets", is_flag=True,
              help="Include the API token and the store URL's password (left out by default).")
def show_config(config_path: str | None, show_secrets: bool) -> None:
    """Print the effective configuration as TOML (every default visible, secrets left out)."""
    click.echo(to_toml(_load_config(config_path), redact=not show_secrets), nl=False)


@main.command()
@click.argument("files", nargs=-1, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object.")
@click.option("--host", default="unknown-host", show_default=True,
              help="Host to attribute lines to when they carry no host prefix.")
@click.option("--eval", "corpus", multiple=True, type=click.Path(),
              help="Score diagnosis on a labelled JSONL corpus (repeatable) instead of diagnosing FILES.")
@click.option("--split", type=click.Choice(["dev", "holdout", "all"]), default="all", show_default=True,
              help="With --eval: which split of the corpus to score.")
@click.option("--min-top1", type=float, default=None,
              help="With --eval: exit with status 1 when top-1 accuracy is below this fraction.")
def diagnose(files: tuple[str, ...], as_json: bool, host: str, corpus: tuple[str, ...], split: str,
             min_top1: float | None) -> None:
    """Diagnose an interruption from evidence text: kernel logs, PyTorch/NCCL stderr, torchrun summaries,
    nvidia-smi output, mcelog, ipmitool, cloud notices, scheduler logs (files, or standard input).
    Prints the Verdict; with --eval, scores a labelled corpus instead."""
    import json

    if corpus:
        from orchestrator.diagnose_eval import evaluate, load_corpus, render

        score = evaluate(load_corpus(corpus), split)
        if as_json:
            click.echo(json.dumps({"split": split, **score.to_json()}))
        else:
            click.echo(render(score, f"{', '.join(corpus)} [{split}]"))
        if min_top1 is not None and score.accuracy < min_top1:
            click.echo(f"herdsman: error: top-1 {score.accuracy:.1%} is below {min_top1:.1%}", err=True)
            sys.exit(1)
        return

    from evidence.engine import iter_lines
    from orchestrator.diagnose_eval import verdict_of_lines

    def lines():
        if not files or files == ("-",):
            yield from iter_lines(sys.stdin.buffer)
        for f in files:
            if f == "-":
                continue
            try:
                with open(f, "rb") as fh:
                    yield from iter_lines(fh)
            except OSError as e:
                raise HerdsmanError(f"cannot read {f}: {e.strerror or e}") from None

    v = verdict_of_lines(lines(), host)
    if as_json:
        click.echo(json.dumps({"category": v.cause.value, "confidence": v.confidence, "hosts": list(v.hosts),
                               "ranks": list(v.ranks), "evidence": list(v.evidence), "reason": v.reason,
                               "alternatives": list(v.alternatives)}))
        return
    f = v.cause.facts
    out = [f"{v.cause.value} ({f.component}, {f.category}) confidence {v.confidence:.2f}",
           f"  hosts: {', '.join(v.hosts) or '-'}   ranks: {', '.join(map(str, v.ranks)) or '-'}",
           f"  action: {v.action.value}{' (pages)' if f.pages else ''}   runbook: runbooks/{v.cause.runbook}",
           f"  why: {v.reason}", *(f"  evidence: {line}" for line in v.evidence),
           *(f"  also considered: {line}" for line in v.alternatives)]
    for line in out:
        click.echo(printable(line))


@main.command("flight-recorder")
@click.argument("dirs", nargs=-1, required=True, type=click.Path())
@click.option("--world-size", type=int, help="Ranks in the job (reports ranks with no dump).")
@click.option("--attempt", type=int, help="Only dumps of this attempt (default: the latest per rank).")
def flight_recorder_cmd(dirs: tuple[str, ...], world_size: int | None, attempt: int | None) -> None:
    """Analyse PyTorch flight-recorder dumps (JSON or pickle, gloo or NCCL) without executing them: the collective
    each process group is stuck on, the ranks that never joined it, mismatched ops or sizes."""
    from agents.flight_recorder import analyse, collect

    missing = [d for d in dirs if not Path(d).is_dir()]
    if missing:
        raise HerdsmanError(f"not a directory: {', '.join(missing)}")
    summaries, refused = collect([Path(d) for d in dirs], attempt)
    if not summaries and not refused:
        raise HerdsmanError(f"no flight-recorder dumps in {', '.join(dirs)}")
    a = analyse(summaries, world_size, refused)
    click.echo(f"{len(summaries)} dump(s) read, {len(refused)} refused")
    for line in a.lines():
        click.echo(f"  {line}")


@main.group()
def checkpoint() -> None:
    """Inspect sharded checkpoints."""


@checkpoint.command("verify")
@click.argument("path", type=click.Path())
def checkpoint_verify(path: str) -> None:
    """Verify one committed checkpoint, or every checkpoint under a checkpoint directory."""
    from trainer.checkpoint import MANIFEST, CheckpointError, committed, verify

    p = Path(path)
    if not p.exists():
        raise HerdsmanError(f"checkpoint path {p} does not exist")
    targets = [p] if (p / MANIFEST).exists() or p.name.startswith("step-") else committed(p)
    if not targets:
        raise HerdsmanError(f"no committed checkpoints under {p}")
    bad = 0
    for t in targets:
        try:
            info = verify(t)
            click.echo(f"ok   {t} (step {info.step}, {info.world_size} ranks)")
        except CheckpointError as e:
            bad += 1
            click.echo(f"BAD  {e}")
    if bad:
        raise HerdsmanError(f"{bad} of {len(targets)} checkpoint(s) failed verification")


@checkpoint.command("pin")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--note", default="", help="Why it is kept (written into the pin).")
def checkpoint_pin(path: str, note: str) -> None:
    """Keep a committed checkpoint beyond retention (it must verify first)."""
    from trainer.checkpoint import CheckpointError, pin

    try:
        pin(Path(path), note)
    except CheckpointError as e:
        raise HerdsmanError(str(e)) from None
    click.echo(f"pinned {path}")


@checkpoint.command("unpin")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def checkpoint_unpin(path: str) -> None:
    """Let retention delete a pinned checkpoint again."""
    from trainer.checkpoint import unpin

    unpin(Path(path))
    click.echo(f"unpinned {path}")


@main.group()
def dashboards() -> None:
    """Grafana dashboards (also provisioned from files by docker-compose)."""


@dashboards.command("push")
@click.option("--url", required=True, help="Grafana base URL, e.g. http://grafana:3000")
@click.option("--token", envvar="GRAFANA_TOKEN", help="Service-account token (env GRAFANA_TOKEN).")
@click.option("--user", envvar="GRAFANA_USER", help="Basic-auth user (env GRAFANA_USER), instead of a token.")
@click.option("--password", envvar="GRAFANA_PASSWORD", help="Basic-auth password (env GRAFANA_PASSWORD).")
@click.option("--folder", default="Herdsman", show_default=True)
@click.option("--prometheus-url", help="Create or repoint the dashboards' Prometheus datasource to this URL.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True),
              help="Dashboards directory (default: the packaged dashboards/).")
def dashboards_push(url: str, token: str | None, user: str | None, password: str | None, folder: str,
                    prometheus_url: str | None, directory: str | None) -> None:
    """Push every dashboard into a Grafana folder through its HTTP API (idempotent: overwrites by uid)."""
    from orchestrator.grafana_push import DASHBOARDS_DIR, load_dashboards, push

    for secret in (token, password):
        _redactor.add_secret(secret or "")
    if token and user:
        raise HerdsmanError("give either --token or --user/--password, not both")
    credential: str | tuple[str, str] | None = token or ((user, password or "") if user else None)
    boards = load_dashboards(Path(directory) if directory else DASHBOARDS_DIR)
    for p in push(url, credential, boards, folder=folder, prometheus_url=prometheus_url):
        click.echo(f"pushed {p.uid:<22} v{p.version:<3} {redact_url(url.rstrip('/'))}{p.url}  ({p.title})")


@main.command()
@config_option
@click.option("--profile", "profile_name", type=click.Choice(["llama3", "herdsman"]),
              help="Start from a named set of assumptions (see orchestrator/simulate.py) instead of [simulate].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one [simulate] value.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Runs per point, seeds seed..seed+N-1.")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Sweep a [simulate] value; several --sweep options make a grid.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default="simulate-sweep.png",
              show_default=True, help="Where a sweep writes its ETTR plot.")
def simulate(config_path: str | None, profile_name: str | None, sets: tuple[str, ...], seeds: int,
             sweeps: tuple[str, ...], json_path: str | None, plot_path: str) -> None:
    """Simulate a training job on a large fleet with Herdsman's real policies: ETTR, Table 5 mix, MTTF/MTTR.

    \b
    herdsman simulate                                  # Llama 3 405B: 16,384 GPUs, 54 days
    herdsman simulate --profile herdsman --seeds 10    # with Herdsman's measured figures, scaled
    herdsman simulate --sweep checkpoint_interval_s=300,900,1800 --sweep restart_s=60,180 --seeds 5
    """
    import dataclasses
    import json
    import math
    import statistics

    from tabulate import tabulate

    from orchestrator import sim_sweep
    from orchestrator import simulate as sim
    from orchestrator.report import render_simulation

    base = _load_config(config_path).simulate
    if profile_name:
        base = dataclasses.replace(base, **sim.PROFILES[profile_name])
    if seeds < 1:
        raise HerdsmanError("--seeds must be >= 1")
    overrides: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise HerdsmanError(f"--set takes KEY=VALUE, got {item!r}")
        values = sim_sweep.parse_values(base, key, value)
        if len(values) != 1:
            raise HerdsmanError(f"--set takes one value, got {item!r} (use --sweep for several)")
        overrides[key] = values[0]
    base = dataclasses.replace(base, **overrides)
    grid: dict[str, list[Any]] = {}
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise HerdsmanError(f"--sweep takes KEY=V1,V2,..., got {item!r}")
        grid[key] = sim_sweep.parse_values(base, key, values)
    if not grid:
        results = [sim.simulate(dataclasses.replace(base, seed=base.seed + s)) for s in range(seeds)]
        click.echo(render_simulation(results[0]))
        if seeds > 1:
            e = [r.ettr for r in results]
            n = [len(r.interruptions) for r in results]
            click.echo(f"\nover {seeds} seeds: ETTR {100 * statistics.mean(e):.2f}% +- {100 * statistics.stdev(e):.2f} "
                       f"(min {100 * min(e):.2f}%), interruptions {statistics.mean(n):.1f} +- "
                       f"{statistics.stdev(n):.1f}")
        if json_path:
            Path(json_path).write_text(json.dumps([r.to_dict() for r in results], indent=1))
        return
    total = seeds * math.prod(len(v) for v in grid.values())
    with click.progressbar(length=total, label=f"{total} runs", file=sys.stderr) as bar:
        rows = sim_sweep.sweep(base, grid, seeds, on_run=lambda: bar.update(1))
    table = [[*r.params.values(), f"{100 * r.mean('ettr'):.2f}", f"{100 * r.std('ettr'):.2f}",
              f"{r.mean('interruptions'):.0f}", f"{r.mean('mttr') / 60:.1f}", f"{r.mean('spares_used'):.0f}"]
             for r in rows]
    click.echo(tabulate(table, headers=[*grid, "ETTR %", "+-", "interruptions", "MTTR min", "spares used"]))
    sim_sweep.sweep_plot(rows, grid, plot_path)
    click.echo(f"plot: {plot_path}")
    if json_path:
        Path(json_path).write_text(json.dumps({"base": dataclasses.asdict(base), "grid": grid, "seeds": seeds,
                                               "rows": [{"params": r.params, "ettr": r.ettr,
                                                         "interruptions": r.interruptions, "mttr_s": r.mttr,
                                                         "spares_used": r.spares_used} for r in rows]}, indent=1))


if __name__ == "__main__":
    main()

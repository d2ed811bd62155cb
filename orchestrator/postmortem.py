"""Postmortem documents for one job: Markdown and a self-contained HTML page, with a timeline and a root-cause chart.

The numbers come from `report.summarize` (the same split as the page, the metrics and the simulator); this module
only lays them out: the Table-5-style table, ETTR and its split, MTTF/MTTR, per-host implication counts (lemon
candidates), and every interruption with its verdict, evidence and runbook link.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from herdsman.events import Interruption
from herdsman.taxonomy import RootCause
from orchestrator.report import Summary, planned_note, table5

RUNBOOKS = Path(__file__).resolve().parent.parent / "runbooks"
_COLORS = {"lost_work": "#9e9e9e", "detection": "#e53935", "restart": "#fb8c00", "restore": "#fdd835"}


def runbook_url(cause: RootCause, base: str = "") -> str:
    """Where the runbook of a cause lives: under `base` (a URL or directory) or in this checkout's runbooks/."""
    if base:
        return base.rstrip("/") + "/" + cause.runbook
    return (RUNBOOKS / cause.runbook).as_uri()


def host_implications(its: list[Interruption]) -> list[tuple[str, int, Counter[str]]]:
    """Hosts blamed by verdicts, most often first: (host, times, causes)."""
    by_host: dict[str, Counter[str]] = {}
    for it in its:
        for h in it.verdict.hosts:
            by_host.setdefault(h, Counter())[it.verdict.cause.value] += 1
    return sorted(((h, sum(c.values()), c) for h, c in by_host.items()), key=lambda x: (-x[1], x[0]))


def _fig_png(fig) -> bytes:  # type: ignore[no-untyped-def]
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def timeline_png(s: Summary) -> bytes:
    """One lane per interruption: the lost work before the failure, then detection, restart and restore."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = s.interruptions
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * max(1, len(its))))
    t0 = s.job.started_at
    for lane, it in enumerate(its):
        f = it.failed_at - t0
        spans = [("lost_work", f - it.lost_work_s, it.lost_work_s), ("detection", f, it.detection_s)]
        if it.restart_s is not None:
            spans.append(("restart", f + it.detection_s, it.restart_s))
            if it.restore_s is not None:
                spans.append(("restore", f + it.detection_s + it.restart_s, it.restore_s))
        for kind, start, width in spans:
            ax.broken_barh([(start, max(width, 0.0))], (lane - 0.35, 0.7), color=_COLORS[kind])
        end = max(start + width for _, start, width in spans)
        ax.text(end + 0.01 * max(s.wall_s, 1e-9), lane, it.verdict.cause.value, fontsize=7, va="center")
    ax.set_yticks(range(len(its)), [f"attempt {it.attempt}" for it in its], fontsize=8)
    ax.set_ylim(len(its) - 0.4, -0.6)
    ax.set_xlim(0, max(s.wall_s, 1e-9))
    ax.set_xlabel("seconds since the job started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, [k.replace("_", " ") for k in _COLORS], fontsize=7, ncol=4, loc="lower center",
              bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Interruptions of {s.job.name}", fontsize=10, pad=18)
    return _fig_png(fig)


def causes_png(s: Summary) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table5(s.interruptions)
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.35 * max(1, len(rows))))
    ax.barh([r[2] for r in rows], [r[3] for r in rows], color="#3949ab")
    ax.invert_yaxis()
    ax.set_xlabel("interruptions")
    ax.set_title("By root cause (Llama 3 Table 5 categories)", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    return _fig_png(fig)


def _split_rows(s: Summary) -> list[list[str]]:
    return [[k.replace("_", " "), f"{v:.2f}", f"{100 * v / s.wall_s:.1f}%" if s.wall_s else "-"]
            for k, v in s.split.items()]


def _fmt(v: float | None) -> str:
    """Seconds in the unit a reader wants: a demo's MTTR in seconds, a 54-day run's MTTF in hours."""
    if v is None:
        return "-"
    return f"{v:.2f} s" if v < 120 else f"{v / 60:.1f} min" if v < 7200 else f"{v / 3600:.2f} h"


def render_markdown(s: Summary, runbook_base: str = "", images: dict[str, str] | None = None) -> str:
    """The report as Markdown; `images` maps "timeline"/"causes" to image paths to link (written by the caller)."""
    j = s.job
    out = [f"# Postmortem: {j.name}", "",
           f"State **{j.state}**, step {j.last_step}/{j.target_step}, wall {s.wall_s:.1f} s, "
           f"{len(s.interruptions)} interruption(s)." + (f" {j.message}" if j.message else ""), "",
           "## Interruptions by root cause", ""]
    rows = table5(s.interruptions)
    out.append(tabulate(rows, headers=["Component", "Category", "RootCause", "Count", "%"], tablefmt="github")
               if rows else "None.")
    if planned_note(s.interruptions):
        out += ["", planned_note(s.interruptions)]
    out += ["", f"## Effective training time: {100 * s.ettr:.1f}%", "",
            tabulate(_split_rows(s), headers=["time", "seconds", "share"], tablefmt="github"), "",
            f"MTTF {_fmt(s.mttf_s)}, MTTR {_fmt(s.mttr_s)}.", ""]
    for key, title in (("timeline", "Timeline"), ("causes", "Root causes")):
        if images and key in images:
            out += [f"![{title}]({images[key]})", ""]
    hosts = host_implications(s.interruptions)
    out += ["## Hosts implicated (lemon candidates first)", ""]
    out.append(tabulate([[h, n, ", ".join(f"{c} x{k}" for c, k in causes.items())] for h, n, causes in hosts],
                        headers=["host", "times", "causes"], tablefmt="github") if hosts else "None.")
    out += ["", "## Interruptions", ""]
    for it in s.interruptions:
        v = it.verdict
        out.append(f"### Attempt {it.attempt}: {v.cause.value} ({v.confidence:.2f})"
                   + (" — planned" if it.planned else ""))
        out.append("")
        out.append(f"- hosts: {', '.join(v.hosts) or '-'}; ranks: {', '.join(map(str, v.ranks)) or '-'}")
        out.append(f"- action: {v.action.value}; {v.reason}")
        out.append(f"- detection {it.detection_s:.2f} s, restart {_fmt(it.restart_s)}, restore {_fmt(it.restore_s)}, "
                   f"lost work {it.lost_work_s:.2f} s, steps {it.last_step} -> "
                   f"{'-' if it.resumed_step is None else it.resumed_step}")
        out.append(f"- runbook: [{v.cause.runbook}]({runbook_url(v.cause, runbook_base)})")
        if v.evidence:
            out += ["", "```", *v.evidence, "```"]
        out.append("")
    return "\n".join(out)


def render_html(s: Summary, runbook_base: str = "") -> str:
    """One self-contained HTML file: the plots are embedded as data URIs, no external asset is loaded."""
    e = html.escape
    timeline = base64.b64encode(timeline_png(s)).decode() if s.interruptions else ""
    causes = base64.b64encode(causes_png(s)).decode() if s.interruptions else ""

    def table(headers: list[str], rows: list[list[object]]) -> str:
        head = "".join(f"<th>{e(str(h))}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    j = s.job
    parts = [f"<h1>Postmortem: {e(j.name)}</h1>",
             f"<p>State <b>{e(j.state)}</b>, step {j.last_step}/{j.target_step}, wall {s.wall_s:.1f} s, "
             f"{len(s.interruptions)} interruption(s). {e(j.message)}</p>",
             "<h2>Interruptions by root cause</h2>",
             table(["Component", "Category", "RootCause", "Count", "%"], table5(s.interruptions)),
             f"<p>{e(planned_note(s.interruptions))}</p>",
             f"<h2>Effective training time: {100 * s.ettr:.1f}%</h2>",
             table(["time", "seconds", "share"], _split_rows(s)),
             f"<p>MTTF {e(_fmt(s.mttf_s))}, MTTR {e(_fmt(s.mttr_s))}</p>"]
    if timeline:
        parts += [f'<img alt="timeline" src="data:image/png;base64,{timeline}">',
                  f'<img alt="root causes" src="data:image/png;base64,{causes}">']
    parts += ["<h2>Hosts implicated (lemon candidates first)</h2>",
              table(["host", "times", "causes"], [[h, n, ", ".join(f"{c} x{k}" for c, k in cs.items())]
                                                 for h, n, cs in host_implications(s.interruptions)]),
              "<h2>Interruptions</h2>"]
    for it in s.interruptions:
        v = it.verdict
        parts.append(
            f'<section class="interruption"><h3>Attempt {it.attempt}: {e(v.cause.value)} ({v.confidence:.2f})'
            f'{" — planned" if it.planned else ""}</h3>'
            f"<p>hosts {e(', '.join(v.hosts) or '-')}; ranks {e(', '.join(map(str, v.ranks)) or '-')}; "
            f"action <b>{e(v.action.value)}</b>: {e(v.reason)}</p>"
            f"<p>detection {it.detection_s:.2f} s, restart {e(_fmt(it.restart_s))}, restore {e(_fmt(it.restore_s))}, "
            f"lost work {it.lost_work_s:.2f} s</p>"
            f'<p><a href="{e(runbook_url(v.cause, runbook_base))}">runbook: {e(v.cause.runbook)}</a></p>'
            f"<pre>{e(chr(10).join(v.evidence))}</pre></section>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:left}pre{background:#f5f5f5;padding:6px;white-space:pre-wrap}img{max-width:100%}")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>Postmortem {e(j.name)}</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")

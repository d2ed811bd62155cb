"""Sweeps of the simulator (`herdsman simulate --sweep`): a grid of [simulate] values, several seeds each, a table
and a plot of ETTR."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from herdsman.config import ConfigError, SimulateConfig
from orchestrator.simulate import simulate


@dataclass
class SweepRow:
    params: dict[str, Any]
    ettr: list[float] = field(default_factory=list)
    interruptions: list[int] = field(default_factory=list)
    mttr: list[float] = field(default_factory=list)
    spares_used: list[int] = field(default_factory=list)

    def mean(self, name: str) -> float:
        xs = getattr(self, name)
        return sum(xs) / len(xs) if xs else float("nan")

    def std(self, name: str) -> float:
        xs = getattr(self, name)
        m = self.mean(name)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def parse_values(cfg: SimulateConfig, key: str, text: str) -> list[Any]:
    """`key=v1,v2` values, typed as the config field."""
    fields = {f.name: f for f in dataclasses.fields(SimulateConfig)}
    if key not in fields:
        raise ConfigError(f"unknown simulate parameter {key!r} (known: {', '.join(fields)})")
    typ = type(getattr(cfg, key))
    try:
        return [typ(v) if typ is not int else int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"simulate.{key} takes {typ.__name__} values, got {text!r}") from None


def sweep(base: SimulateConfig, grid: dict[str, list[Any]], seeds: int,
          on_run: Callable[[], None] | None = None) -> list[SweepRow]:
    rows = []
    for combo in itertools.product(*grid.values()):
        params = dict(zip(grid, combo))
        row = SweepRow(params)
        for s in range(seeds):
            r = simulate(dataclasses.replace(base, **params, seed=base.seed + s))
            row.ettr.append(r.ettr)
            row.interruptions.append(len(r.interruptions))
            row.mttr.append(r.mttr_s or 0.0)
            row.spares_used.append(r.spares_used)
            if on_run:
                on_run()
        rows.append(row)
    return rows


def sweep_plot(rows: list[SweepRow], grid: dict[str, list[Any]], path: str) -> None:
    """ETTR against the first swept parameter, one line per combination of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(grid)
    x_key, others = keys[0], keys[1:]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups: dict[tuple, list[SweepRow]] = {}
    for r in rows:
        groups.setdefault(tuple(r.params[k] for k in others), []).append(r)
    for label, rs in groups.items():
        xs = [r.params[x_key] for r in rs]
        ys = [100 * r.mean("ettr") for r in rs]
        err = [100 * r.std("ettr") for r in rs]
        name = ", ".join(f"{k}={v}" for k, v in zip(others, label)) or "ETTR"
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xlabel(x_key)
    ax.set_ylabel("effective training time (%)")
    ax.grid(alpha=0.3)
    if len(groups) > 1 or others:
        ax.legend(fontsize=8)
    ax.set_title("Simulated ETTR")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

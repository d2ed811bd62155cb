"""Scoring diagnosis on a labelled corpus of real failure text (`herdsman diagnose --eval FILE`).

A corpus is JSON Lines: {"id", "label" (a root cause), "text", "source" (URL), "split" ("dev" | "holdout"),
"ambiguous" (bool), ...}. Each item's text goes through exactly what `herdsman diagnose` runs; the result is top-1
accuracy (all items and unambiguous ones), per-category precision and recall, and the confusion matrix.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from herdsman import HerdsmanError
from herdsman.taxonomy import RootCause
from orchestrator.diagnose import Failure, diagnose
from orchestrator.logparse import parse


def verdict_of_lines(lines: Iterable[str], host: str = "unknown-host"):
    """Exactly what `herdsman diagnose` decides for these lines."""
    parsed = parse(lines, host)
    return diagnose(Failure(0.0, tuple(parsed.failures), tuple(parsed.hosts)), parsed.evidence)


def verdict_of_text(text: str, host: str = "unknown-host"):
    return verdict_of_lines(text.splitlines(), host)


@dataclass
class Score:
    n: int = 0
    correct: int = 0
    n_clear: int = 0
    correct_clear: int = 0
    confusion: Counter = field(default_factory=Counter)  # (label, predicted) -> count
    misses: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def accuracy_clear(self) -> float:
        return self.correct_clear / self.n_clear if self.n_clear else 0.0

    def per_category(self) -> dict[str, dict[str, float]]:
        out = {}
        for c in RootCause:
            tp = self.confusion[(c.value, c.value)]
            labelled = sum(v for (lab, _), v in self.confusion.items() if lab == c.value)
            predicted = sum(v for (_, pred), v in self.confusion.items() if pred == c.value)
            if labelled or predicted:
                out[c.value] = {"items": labelled, "precision": tp / predicted if predicted else 0.0,
                                "recall": tp / labelled if labelled else 0.0}
        return out

    def to_json(self) -> dict:
        return {"items": self.n, "top1": round(self.accuracy, 4), "unambiguous_items": self.n_clear,
                "top1_unambiguous": round(self.accuracy_clear, 4), "per_category": self.per_category(),
                "confusion": [{"label": a, "predicted": b, "count": n} for (a, b), n in sorted(self.confusion.items())],
                "misses": self.misses}


def load_corpus(paths: Iterable[str]) -> list[dict]:
    items = []
    for p in paths:
        try:
            lines = Path(p).read_text().splitlines()
        except OSError as e:
            raise HerdsmanError(f"cannot read {p}: {e.strerror or e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                it = json.loads(line)
                RootCause(it["label"])
                str(it["text"])
            except (ValueError, KeyError, TypeError) as e:
                raise HerdsmanError(f"{p}:{n}: not a corpus item ({type(e).__name__}: {e})") from None
            items.append(it)
    return items


def evaluate(items: list[dict], split: str = "all") -> Score:
    s = Score()
    for it in items:
        if split != "all" and it.get("split", "dev") != split:
            continue
        v = verdict_of_text(it["text"])
        ok = v.cause.value == it["label"]
        s.n += 1
        s.correct += ok
        if not it.get("ambiguous"):
            s.n_clear += 1
            s.correct_clear += ok
        s.confusion[(it["label"], v.cause.value)] += 1
        if not ok:
            s.misses.append({"id": it.get("id"), "label": it["label"], "predicted": v.cause.value,
                             "ambiguous": bool(it.get("ambiguous"))})
    return s


def render(score: Score, title: str) -> str:
    from tabulate import tabulate

    lines = [f"{title}: top-1 {score.accuracy:.1%} ({score.correct}/{score.n}); unambiguous "
             f"{score.accuracy_clear:.1%} ({score.correct_clear}/{score.n_clear})", ""]
    rows = [(c, d["items"], f"{d['precision']:.2f}", f"{d['recall']:.2f}") for c, d in score.per_category().items()]
    lines.append(tabulate(rows, headers=["category", "items", "precision", "recall"]))
    labels = [c.value for c in RootCause if any(c.value in k for k in score.confusion)]
    short = {c: "".join(w[0] for w in c.split("_"))[:4] for c in labels}
    matrix = [[short[a]] + [score.confusion[(a, b)] or "." for b in labels] for a in labels]
    lines += ["", "confusion (rows: label, columns: verdict): " + ", ".join(f"{v}={k}" for k, v in short.items()), "",
              tabulate(matrix, headers=[""] + [short[b] for b in labels])]
    return "\n".join(lines)

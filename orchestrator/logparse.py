"""Evidence from text, for `herdsman diagnose`: any mix of kernel log, PyTorch / NCCL stderr, torchrun failure
summaries, nvidia-smi output, mcelog, ipmitool, cloud notices and scheduler logs.

The shared engine (evidence/) groups the lines into records and matches every record against the one rule set the
agents and the controller use; Python tracebacks, bare exception lines and torchrun's per-rank failure blocks
become the failed ranks, whose text diagnosis runs through the same rules. Nothing here decides a cause: that is
diagnose()'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from evidence.engine import scan
from herdsman.events import Evidence, RankFailure


@dataclass(frozen=True)
class Parsed:
    evidence: list[Evidence]
    failures: list[RankFailure]
    hosts: list[str]


def parse(lines: Iterable[str], default_host: str = "unknown-host") -> Parsed:
    s = scan(lines, default_host, source="log")
    return Parsed(s.evidence, s.failures, [h for h in s.hosts if h])

"""A trainer rank on standby: the expensive imports (torch) are done before any failure happens.

The rank actor keeps one of these per rank. On a restart it writes one JSON line to its stdin — the attempt's
environment, log file and arguments — and the process becomes the rank at once, instead of paying the ~2 s import
on the restart path. If its parent goes away, stdin closes and it exits.
"""

from __future__ import annotations

import json
import select
import sys

from trainer import rejoin, train  # (the point: import now, run later)


def main() -> int:
    if not select.select([sys.stdin], [], [], 0)[0]:
        # Nothing to run yet: pay FSDP's first-use import (fully_shard imports torch._dynamo: 0.36 s of a restart's
        # model build) while waiting. A standby whose rank is already asked for (a job's first attempt, whose
        # standbys are still importing when it is launched) starts it at once and imports it there, beside the
        # other ranks, instead of making them wait in the rendezvous.
        import torch._dynamo  # noqa: F401
    line = sys.stdin.readline()
    if not line:
        return 0
    spec = json.loads(line)
    rejoin.take(spec)  # the attempt's environment, and its log file for stdout and stderr
    return train.main(spec["argv"])


if __name__ == "__main__":
    train.exit_now(main())

"""A trainer rank on standby: the expensive imports (torch) are done before any failure happens.

The rank actor keeps one of these per rank. On a restart it writes one JSON line to its stdin — the attempt's
environment, log file and arguments — and the process becomes the rank at once, instead of paying the ~2 s import
on the restart path. If its parent goes away, stdin closes and it exits.
"""

from __future__ import annotations

import json
import sys

import torch._dynamo  # noqa: F401  (FSDP's first fully_shard imports it: 0.36 s of a restart's model build)

from trainer import rejoin, train  # (the point: import now, run later)


def main() -> int:
    line = sys.stdin.readline()
    if not line:
        return 0
    spec = json.loads(line)
    rejoin.take(spec)  # the attempt's environment, and its log file for stdout and stderr
    return train.main(spec["argv"])


if __name__ == "__main__":
    train.exit_now(main())

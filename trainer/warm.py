"""A trainer rank on standby: the expensive imports (torch) are done before any failure happens.

The rank actor keeps one of these per rank. On a restart it writes one JSON line to its stdin — the attempt's
environment, log file and arguments — and the process becomes the rank at once, instead of paying the ~2 s import
on the restart path. If its parent goes away, stdin closes and it exits.
"""

from __future__ import annotations

import json
import os
import sys

from trainer import train  # noqa: F401  (the point: import now, run later)


def main() -> int:
    line = sys.stdin.readline()
    if not line:
        return 0
    spec = json.loads(line)
    os.environ.update(spec["env"])
    fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return train.main(spec["argv"])


if __name__ == "__main__":
    sys.exit(main())

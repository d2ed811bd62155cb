"""Fault injection into a running trainer rank, one shot at a time.

The controller, a test or the demo drops a JSON file `inject-rank{R}.json` into the control directory; the rank
picks it up at the start of its next step (one stat() call per step), removes it and acts. Removing it first
means a restarted rank never replays an old fault.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


class InjectedFault(RuntimeError):
    """Raised by an injected software fault; looks to diagnosis like any other exception in user code."""


FAULTS = ("exception", "exit", "hang", "sigkill", "bitflip")


def request(control_dir: Path, rank: int, fault: str, message: str = "", at_step: int = 0,
            sticky: bool = False) -> Path:
    """Ask `rank` to fail with `fault` at the first step >= at_step (0: its next step). A sticky fault stays and
    fires again in every later attempt (a deterministic bug: the crash loop)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
    control_dir = Path(control_dir)
    control_dir.mkdir(parents=True, exist_ok=True)
    path = control_dir / f"inject-rank{rank}.json"
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps({"fault": fault, "message": message, "at_step": at_step, "sticky": sticky}))
    os.replace(tmp, path)
    return path


def check(control_dir: Path | None, rank: int, step: int) -> str | None:
    """Called at the start of each step by the trainer; acts on a pending request for this rank. Returns the
    faults the trainer carries out itself ("bitflip": corrupt a parameter shard after this step's update)."""
    if control_dir is None:
        return None
    path = Path(control_dir) / f"inject-rank{rank}.json"
    try:
        body = json.loads(path.read_text())
        if step < int(body.get("at_step", 0)):
            return
        if not body.get("sticky"):
            path.unlink()
    except (FileNotFoundError, ValueError):
        return None
    fault, message = body.get("fault"), body.get("message") or "injected fault"
    if fault == "exception":
        raise InjectedFault(message)
    if fault == "exit":
        os._exit(3)
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "bitflip":
        return "bitflip"
    if fault == "hang":
        while True:  # a rank stuck outside any collective: its peers time out
            time.sleep(1)
    return None

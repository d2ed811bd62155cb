"""The control directory's files: how the rank actor (for the controller) asks a running trainer rank for
something, and how the rank reads it. Torch-free on purpose: the rank actor imports this, and a Ray worker that
imported torch for it would pay ~3 CPU-seconds per rank at every job start (on a small host, the first step's
wait). Fault requests are in trainer/faults.py (also torch-free).

    checkpoint-rank{R}.request   save at the next step ("exit": and then exit; a drain)
    dump-rank{R}.request         write the flight-recorder buffer now (trainer/flight_recorder.py)
    rejoin-rank{R}.json          rejoin a later attempt in this process (trainer/rejoin.py)
    failed-rank{R}               the other way: this rank failed in the attempt it holds and waits to rejoin (the
                                 rank actor's poll tells the controller at once, before the agent has read the
                                 rank's own report)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _dir(control_dir: Path | str) -> Path:
    control_dir = Path(control_dir)
    control_dir.mkdir(parents=True, exist_ok=True)
    return control_dir


def request_now(control_dir: Path, rank: int, then_exit: bool = False) -> Path:
    """Ask a rank for a checkpoint at its next step, and to exit after it (a drain loses no work)."""
    path = _dir(control_dir) / f"checkpoint-rank{rank}.request"
    path.write_text("exit" if then_exit else "")
    return path


def now_requested(control_dir: Path | None, rank: int) -> tuple[bool, bool]:
    """(checkpoint now, then exit), once per request. The ranks agree on the step through the loss all-reduce,
    so one rank seeing it is enough and they never disagree about which step to save."""
    if control_dir is None:
        return False, False
    path = Path(control_dir) / f"checkpoint-rank{rank}.request"
    try:
        then_exit = path.read_text().strip() == "exit"
        path.unlink()
        return True, then_exit
    except FileNotFoundError:
        return False, False


def dump_request_path(control_dir: Path, rank: int) -> Path:
    return Path(control_dir) / f"dump-rank{rank}.request"


def request_dump(control_dir: Path, rank: int) -> Path:
    """Ask a live rank for its flight-recorder buffer (its watcher thread writes it, even while the main thread
    is stuck in a collective)."""
    path = dump_request_path(_dir(control_dir), rank)
    path.touch()
    return path


def report_failed(control_dir: Path | None, rank: int, attempt: int) -> None:
    """The rank's side: it failed in `attempt` and waits for an order to rejoin, in its process. Never raises: the
    report through the stats stream stays the record; this is only the fast path."""
    if control_dir is None:
        return
    try:
        path = _dir(control_dir) / f"failed-rank{rank}"
        tmp = path.with_suffix(".part")
        tmp.write_text(str(attempt))
        os.replace(tmp, path)
    except OSError:
        pass


def failed_at(control_dir: Path | None, rank: int, attempt: int) -> float | None:
    """The rank actor's side: when this rank reported a failure in `attempt` (None: it did not)."""
    if control_dir is None:
        return None
    path = Path(control_dir) / f"failed-rank{rank}"
    try:
        return path.stat().st_mtime if path.read_text().strip() == str(attempt) else None
    except (OSError, ValueError):
        return None


def order_path(control_dir: Path, rank: int) -> Path:
    return Path(control_dir) / f"rejoin-rank{rank}.json"


def write_order(control_dir: Path, rank: int, attempt: int, env: dict[str, str], log: str) -> Path:
    """The controller's side (through the rank actor): rejoin as `rank` in `attempt` with this environment."""
    path = order_path(_dir(control_dir), rank)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps({"attempt": attempt, "env": env, "log": log}))
    os.replace(tmp, path)
    return path


def pending(control_dir: Path | None, rank: int, attempt: int) -> dict[str, Any] | None:
    """A rejoin order for a later attempt than `attempt`, if one is there (it is removed: read once)."""
    if control_dir is None:
        return None
    path = order_path(control_dir, rank)
    try:
        order = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        path.unlink(missing_ok=True)  # torn or foreign: not an order
        return None
    path.unlink(missing_ok=True)
    if not isinstance(order, dict) or not isinstance(order.get("env"), dict) \
            or not isinstance(order.get("attempt"), int) or order["attempt"] <= attempt:
        return None  # an old attempt's order: already past it
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in order["env"].items()):
        return None
    return order

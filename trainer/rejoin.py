"""In-process restart: a rank whose collective failed because a peer died keeps its process and waits to rejoin.

The controller decides (orchestrator/controller.py): when a failure needs no new host, the ranks that are still
alive get a *rejoin order* for the next attempt — a JSON file `rejoin-rank{R}.json` in their control directory
with the attempt's environment (new attempt number, new rendezvous port, the new log file) — and only the dead
ranks are started anew (from their warm standby). A waiting rank then re-forms the process group, rebuilds its
model on it and restores from the in-memory tier, with no process start, import or Ray round trip.

Which ranks wait: one whose own code failed exits as before (it may be the problem; and gloo cannot release its
peers short of closing its sockets, which only the process's exit does). One whose collective broke because a
peer died or stopped answering — gloo's "Connection closed by peer", "Read error", a timed-out transfer, NCCL's
aborted communicator — was only a witness: it waits, up to `wait_s`, and exits if no order comes (the
controller then restarts processes, as without this module).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from herdsman import layout
from trainer.control import pending  # the order's file; the controller's side writes it (write_order)

# what a collective says when the rank on the other end died, hung or aborted (gloo's transport, NCCL, c10d)
_PEER_TEXT = ("Connection closed by peer", "Connection reset by peer", "Read error", "Write error",
              "Timed out waiting", "Broken pipe", "NCCL communicator was aborted",
              "Watchdog caught collective operation timeout", "remote process exited or there was a network error")


def enabled() -> bool:
    return os.environ.get(layout.ENV_INPROCESS) == "1"


def peer_failure(e: BaseException) -> bool:
    """The exception is a collective's failure caused by another rank (this rank's own code did not fail)."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, getattr(dist, "DistError", ())) and not isinstance(x, getattr(dist, "DistStoreError", ())):
            return True
        text = str(x)
        if isinstance(x, RuntimeError) and any(t in text for t in _PEER_TEXT):
            return True
        x = x.__cause__ or x.__context__
    return False


def wait(control_dir: Path | None, rank: int, attempt: int, wait_s: float, poll_s: float = 0.05
         ) -> dict[str, Any] | None:
    """Wait up to `wait_s` for an order to rejoin a later attempt."""
    deadline = time.monotonic() + wait_s
    while True:
        order = pending(control_dir, rank, attempt)
        if order is not None or time.monotonic() >= deadline:
            return order
        time.sleep(poll_s)


def leave_group() -> None:
    """Drop the broken process group (and every group made from it) so a new one can be formed in this process."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a broken group may fail to tear down; the new one does not depend on it
            print(f"[trainer] leaving the failed process group: {type(e).__name__}: {e}", file=sys.stderr)


def take(order: dict[str, Any]) -> None:
    """Become the ordered rank: its environment, and its attempt's log file for stdout and stderr."""
    os.environ.update(order["env"])
    log = order.get("log")
    if isinstance(log, str) and log:
        sys.stdout.flush()
        sys.stderr.flush()
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

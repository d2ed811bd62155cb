"""Sharded torch.distributed.checkpoint (DCP) checkpoints that count only once complete.

Protocol: every rank writes its shards with `dcp.save` into `step-NNNNNNNN.tmp`; DCP's coordinator writes
`.metadata` last; then rank 0 writes `herdsman.json` (the manifest: step, world size, every file with its size and
CRC32) and renames the directory to `step-NNNNNNNN`. A directory without the final name and a valid manifest is
never loaded. Loading verifies the manifest first and falls back to the next older checkpoint, saying why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from herdsman import HerdsmanError

MANIFEST = "herdsman.json"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(HerdsmanError):
    pass


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    world_size: int
    saved_at: float


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(path: Path, step: int, world_size: int) -> None:
    files = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = {"size": p.stat().st_size, "crc32": _crc32(p)}
    body = {"format": 1, "step": step, "world_size": world_size, "saved_at": time.time(), "files": files}
    tmp = path / (MANIFEST + ".part")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)


def verify(path: Path) -> CheckpointInfo:
    """Check one committed checkpoint directory; raise CheckpointError naming the problem."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    try:
        m = json.loads((path / MANIFEST).read_text())
        files, step, world = m["files"], int(m["step"]), int(m["world_size"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no manifest ({MANIFEST}): it was never committed") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has a corrupt manifest: {e}") from None
    if ".metadata" not in files:
        raise CheckpointError(f"checkpoint {path} manifest lists no DCP .metadata")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint {path}: file {name} has {f.stat().st_size} bytes, manifest says {meta['size']}")
        if _crc32(f) != meta["crc32"]:
            raise CheckpointError(f"checkpoint {path}: file {name} fails its CRC32 check")
    return CheckpointInfo(path, step, world, float(m.get("saved_at", 0.0)))


def committed(root: Path) -> list[Path]:
    """Committed checkpoint directories under root, newest first (by name; verification is separate)."""
    root = Path(root)
    if not root.exists():
        return []
    if not root.is_dir():
        raise CheckpointError(f"checkpoint root {root} is not a directory")
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), reverse=True)


def latest_valid(root: Path, warn: Callable[[str], None] = print) -> CheckpointInfo | None:
    """The newest checkpoint that verifies; each one skipped is reported through `warn`."""
    for p in committed(root):
        try:
            return verify(p)
        except CheckpointError as e:
            warn(f"skipping checkpoint: {e}")
    return None


class Checkpointer:
    """Saves and restores the whole training state (model, optimizer, trainer state, per-rank RNG) with DCP."""

    def __init__(self, root: Path, keep: int, rank: int, world_size: int):
        self.root, self.keep, self.rank, self.world_size = Path(root), keep, rank, world_size

    def _state(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optim),
        }

    def save(self, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer, extra: dict[str, Any]) -> float:
        """Collective. Returns the seconds the training loop was blocked."""
        t0 = time.perf_counter()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that died
            tmp.mkdir(parents=True)
        dist.barrier()
        state = self._state(model, optim)
        state["trainer"] = extra  # replicated: identical on every rank
        state[f"rng.rank{self.rank}"] = torch.get_rng_state()
        dcp.save(state, checkpoint_id=str(tmp))
        dist.barrier()  # every shard and .metadata are on disk
        if self.rank == 0:
            write_manifest(tmp, step, self.world_size)
            if final.exists():  # a re-save of the same step after a rollback
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._retain()
        dist.barrier()
        return time.perf_counter() - t0

    def _retain(self) -> None:
        for old in committed(self.root)[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, info: CheckpointInfo, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective. Restores model and optimizer in place; returns the trainer state saved with them."""
        state = self._state(model, optim)
        state["trainer"] = {"step": 0, "loader": {"position": 0}}
        rng_key = f"rng.rank{self.rank}"
        has_rng = self.rank < info.world_size  # a rank that did not exist when saving keeps its fresh RNG
        if has_rng:
            state[rng_key] = torch.get_rng_state()
        dcp.load(state, checkpoint_id=str(info.path))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optim, state["optim"])
        if has_rng:
            torch.set_rng_state(state[rng_key])
        return state["trainer"]


def request_now(control_dir: Path, rank: int, then_exit: bool = False) -> Path:
    """Ask a rank for a checkpoint at its next step, and to exit after it (a drain loses no work)."""
    control_dir = Path(control_dir)
    control_dir.mkdir(parents=True, exist_ok=True)
    path = control_dir / f"checkpoint-rank{rank}.request"
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

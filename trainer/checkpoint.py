"""Sharded torch.distributed.checkpoint (DCP) checkpoints that count only once complete.

Protocol: every rank writes its shards with `dcp.save` into `step-NNNNNNNN.<save id>.tmp`; DCP's coordinator
writes `.metadata` last; then rank 0 writes `herdsman.json` (the manifest: step, world size, every file with its
size and CRC32; trainer/manifest.py) and renames the directory to `step-NNNNNNNN`. A directory without the final
name and a valid manifest is never loaded. Loading verifies the manifest first and falls back to the next older
checkpoint, saying why. Retention never deletes the newest checkpoint that verifies.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import (
    AsyncStager,
    DefaultStager,
    StagingOptions,
)
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer.manifest import (  # the manifest's code lives there; re-exported from here
    MANIFEST,
    PIN,
    SUSPECT,
    CheckpointError,
    CheckpointInfo,
    fingerprint,
    verify,
    write_manifest,
)
from trainer.memory_tier import MemoryTier, copy_into, to_local

__all__ = ["MANIFEST", "PIN", "SUSPECT", "CheckpointError", "CheckpointInfo", "Checkpointer", "Pending", "committed",
           "latest_valid", "now_requested", "pin", "request_now", "step_dir", "unpin", "verify", "write_manifest"]
_NAME = re.compile(r"^step-(\d{8})$")
_TMP = re.compile(r"^step-(\d{8})\..*\.tmp$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class Pending:
    """One save in flight: DCP writes in a background thread; the commit follows on rank 0."""

    def __init__(self, step: int, tmp: Path, blocked_s: float, save_id: str):
        self.step, self.tmp, self.blocked_s, self.save_id = step, tmp, blocked_s, save_id
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.committed = False
        self.memory_bytes = 0
        self.thread: threading.Thread | None = None


class Checkpointer:
    """Saves and restores the whole training state (model, optimizer, trainer state, per-rank RNG) with DCP.

    With `async_save`, `save` blocks the loop only to stage a copy in host memory (pinned under CUDA); the write,
    the commit (rank 0: manifest, rename, retention) and the in-memory tier's copy and peer replica run on a
    background thread over a process group of their own. A new save first waits for the previous one, so two
    never overlap. Only a committed checkpoint is reported (`poll`) and ever loaded.
    """

    def __init__(self, root: Path, keep: int, rank: int, world_size: int, *, async_save: bool = False,
                 memory: MemoryTier | None = None, attempt: int = 0, log: Callable[[str], None] = print):
        self.root, self.keep, self.rank, self.world_size = Path(root), keep, rank, world_size
        self.async_save, self.memory, self.attempt, self.log = async_save, memory, attempt, log
        self._pending: Pending | None = None
        self._reported: list[Pending] = []
        self._seq = 0
        self._distrust_after: int | None = None
        # retention's memory of verifications: path -> (fingerprint, verified?), so that a commit costs no re-read
        self._verified: dict[Path, tuple[tuple | None, bool]] = {}
        # a CPU (gloo) group for everything off the training path: async writes, the memory tier, small
        # agreements; under NCCL the default group cannot carry CPU tensors
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        # from the OS, not torch's generator: seeded identically in every run, and training's RNG stays untouched
        nonce = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
        if dist.is_initialized():
            dist.broadcast(nonce, 0, group=self.group)  # one name per save on every rank, never reused
        self._nonce = f"{int(nonce.item()):016x}"
        if memory is not None:
            memory.group = self.group
        cuda = torch.cuda.is_available()
        # pinned host memory under CUDA (a faster device-to-host copy); blocking copies, so the snapshot is whole
        self._stager = DefaultStager(StagingOptions(cuda, False, False, False)) if async_save or memory else None

    def _state(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optim),
        }

    def save(self, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer, extra: dict[str, Any]) -> float:
        """Collective. Returns the seconds the training loop was blocked (waiting for the previous save, staging)."""
        t0 = time.perf_counter()
        self.wait()
        self._seq += 1
        # a name of this attempt and save: a dead attempt's leftovers can never collide with (or be deleted
        # under) a live save, and are swept by retention
        save_id = f"{self._nonce}-a{self.attempt}s{self._seq}"
        tmp = self.root / f"step-{step:08d}.{save_id}.tmp"
        state = self._state(model, optim)
        state["trainer"] = extra  # replicated: identical on every rank
        state[f"rng.rank{self.rank}"] = torch.get_rng_state()
        if not self.async_save:
            dcp.save(state, checkpoint_id=str(tmp))
            dist.barrier()  # every shard and .metadata are on disk
            p = Pending(step, tmp, 0.0, save_id)
            if self.memory is not None:
                p.memory_bytes = self.memory.put(step, save_id, to_local(self._stager.stage(state)))
            if self.rank == 0:
                self._commit(p)
            dist.barrier()
            p.blocked_s = time.perf_counter() - t0
            p.done.set()
            self._reported.append(p)
            return p.blocked_s
        staged = self._stager.stage(state)
        fut = dcp.async_save(staged, checkpoint_id=str(tmp), process_group=self.group, async_stager=_NoCopy())
        p = Pending(step, tmp, time.perf_counter() - t0, save_id)
        p.thread = threading.Thread(target=self._finish, args=(p, fut, staged), name=f"ckpt-{step}", daemon=True)
        p.thread.start()
        self._pending = p
        return p.blocked_s

    def _finish(self, p: Pending, fut: Any, staged: dict[str, Any]) -> None:
        try:  # the copy to the memory tier, the CRCs and the commit yield the CPU to the training thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (OSError, AttributeError):
            pass
        try:
            fut.result()  # on rank 0 this includes every rank's write results and the .metadata
            if self.memory is not None:
                p.memory_bytes = self.memory.put(p.step, p.save_id, to_local(staged))
            if self.rank == 0:
                self._commit(p)
        except BaseException as e:  # noqa: BLE001 - reported to the training loop by poll()/wait()
            p.error = e
        finally:
            p.done.set()

    def _commit(self, p: Pending) -> None:
        if self._distrust_after is not None and p.step > self._distrust_after:
            raise CheckpointError(f"not committing step {p.step}: taken after the last clean SDC check")
        write_manifest(p.tmp, p.step, self.world_size, p.save_id)
        final = step_dir(self.root, p.step)
        if os.path.lexists(final):  # a re-save of the same step (a restart resumed from an older checkpoint)
            _swap_in(p.tmp, final, p.save_id)
        else:
            os.replace(p.tmp, final)
            _fsync_dir(self.root)
        # the manifest was just computed from these very files: no need to read them again for retention
        self._verified[final] = (fingerprint(final), True)
        p.committed = True
        self._retain()

    def poll(self) -> list[Pending]:
        """Saves finished since the last call (committed ones on rank 0). Raises if a background save failed."""
        p = self._pending
        if p is not None and p.done.is_set():
            self._pending = None
            if p.thread is not None:
                p.thread.join()  # it has nothing left to do but return
            if p.error is not None:
                if self.rank == 0:  # what the failed save wrote would hold space a full disk needs for the next
                    shutil.rmtree(p.tmp, ignore_errors=True)
                raise CheckpointError(f"checkpoint save of step {p.step} failed: {type(p.error).__name__}: "
                                      f"{p.error}") from p.error
            self._reported.append(p)
        out, self._reported = self._reported, []
        return out

    def wait(self, timeout_s: float | None = None) -> list[Pending]:
        """Block until the save in flight (if any) is written and committed (or `timeout_s`); then as `poll`."""
        if self._pending is not None:
            self._pending.done.wait(timeout_s)
        return self.poll()

    @property
    def in_flight(self) -> bool:
        return self._pending is not None and not self._pending.done.is_set()

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()

    def distrust_after(self, step: int, reason: str) -> list[Path]:
        """Silent data corruption: no checkpoint of a later step may be loaded. Rank 0 sets the committed ones
        aside (renamed `*.suspect`, kept for forensics) and a save in flight is not committed."""
        self._distrust_after = step
        if self._pending is not None:  # its commit either lands before we look, or is refused
            self._pending.done.wait()
            if self.rank == 0 and not self._pending.committed:
                self.log(f"checkpoint of step {self._pending.step} (in flight) not committed: {reason}")
        moved = []
        if self.rank == 0:
            for p in committed(self.root):
                if int(p.name.split("-")[1]) > step:
                    dst = p.with_name(p.name + ".suspect")
                    shutil.rmtree(dst, ignore_errors=True)
                    os.replace(p, dst)
                    (dst / SUSPECT).write_text(reason + "\n")
                    moved.append(dst)
                    self.log(f"checkpoint {p.name} set aside as {dst.name}: {reason}")
        return moved

    def _retain(self) -> None:
        found = committed(self.root)
        keep = set(found[: self.keep])
        good = self._newest_valid(found)
        if good is not None:  # never delete the last checkpoint that can be loaded, whatever lies above it
            keep.add(good)
        for old in found:
            if old not in keep and not (old / PIN).exists():  # an operator's pin outlives retention
                _discard(old, "retired")
        self._verified = {p: v for p, v in self._verified.items() if p in keep}
        # leftovers of saves that died (other attempts' temporary directories) older than what is kept
        newest = int(found[0].name.split("-")[1]) if found and self.keep else 0
        for p in self.root.iterdir():
            m = _TMP.match(p.name)
            if m and int(m.group(1)) <= newest and p != self._pending_tmp():
                shutil.rmtree(p, ignore_errors=True)

    def _newest_valid(self, found: list[Path]) -> Path | None:
        """The newest of `found` (newest first) that verifies. Each is read at most once while it is unchanged:
        the outcome is remembered under its fingerprint, so a commit's retention reads nothing in the usual case
        (the new checkpoint is the newest) and a broken one above it is read once, not at every commit."""
        for p in found:
            fp = fingerprint(p)
            seen = self._verified.get(p)
            if seen is None or fp is None or seen[0] != fp:
                try:
                    verify(p)
                    seen = (fp, True)
                except CheckpointError as e:
                    seen = (fp, False)
                    self.log(f"retention: {e}")
                self._verified[p] = seen
            if seen[1]:
                return p
        return None

    def _pending_tmp(self) -> Path | None:
        return self._pending.tmp if self._pending is not None else None

    def load(self, info: CheckpointInfo, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective. Restores model and optimizer in place; returns the trainer state saved with them."""
        state = self._state(model, optim)
        state["trainer"] = {"step": 0, "loader": {"position": 0}}
        rng_key = f"rng.rank{self.rank}"
        has_rng = self.rank < info.world_size  # a rank that did not exist when saving keeps its fresh RNG
        if has_rng:
            state[rng_key] = torch.get_rng_state()
        dcp.load(state, checkpoint_id=str(info.path))
        return self._apply(state, model, optim, rng_key if has_rng else None)

    def _apply(self, state: dict[str, Any], model: torch.nn.Module, optim: torch.optim.Optimizer,
               rng_key: str | None) -> dict[str, Any]:
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optim, state["optim"])
        if rng_key is not None:
            torch.set_rng_state(state[rng_key])
        return state["trainer"]

    def restore(self, info: CheckpointInfo, model: torch.nn.Module, optim: torch.optim.Optimizer
                ) -> tuple[dict[str, Any], str]:
        """Collective. From the memory tier when every rank's shard of this step is in some host's RAM (same
        world size), else from disk. Returns (trainer state, "memory" | "disk")."""
        if self.memory is not None and info.world_size == self.world_size:
            local = self.memory.restore(info.step, info.save_id)
            if local is not None:
                template = self._state(model, optim)
                rng_key = f"rng.rank{self.rank}"
                template["trainer"], template[rng_key] = local["trainer"], local[rng_key]
                try:
                    state = copy_into(template, local)
                    ok = 1
                except (ValueError, KeyError, TypeError) as e:
                    self.log(f"memory tier: snapshot of step {info.step} does not fit this model ({e})")
                    ok = 0
                flag = torch.tensor([ok])
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
                if flag.item():
                    return self._apply(state, model, optim, rng_key), "memory"
        return self.load(info, model, optim), "disk"


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path, tag: str) -> None:
    """Delete a committed checkpoint without ever leaving a half-deleted one under a committed name (a kill in
    the middle of rmtree would): rename it out of the committed namespace first, atomically."""
    gone = path.with_name(f"{path.name}.{tag}.tmp")
    os.replace(path, gone)
    _remove(gone)


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> None:
    """Swap two names in one atomic step (Linux renameat2 with RENAME_EXCHANGE)."""
    fn = _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(b))


def _swap_in(new: Path, final: Path, tag: str) -> None:
    """Put the directory `new` in the place of the committed `final`, of the same step (a re-save).

    The old one is deleted only once the new one is in place. Where the file system can exchange two names
    atomically (Linux, renameat2 RENAME_EXCHANGE: ext4, xfs, btrfs, tmpfs, ...), `final` names a whole committed
    directory at every instant: the old one up to the exchange, the new one from it; the old one then lies under
    new's temporary name (swept by retention if we die before deleting it). Elsewhere it takes two renames, old ->
    `final.<tag>.replaced.tmp`, new -> `final`: the window without `final` is that single rename (nothing else
    happens in between; no deletion), and a kill inside it leaves the old one whole under the `.replaced.tmp` name,
    with every older checkpoint still loadable."""
    try:
        _exchange(new, final)
        old = new
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        old = final.with_name(f"{final.name}.{tag}.replaced.tmp")
        os.replace(final, old)
        os.replace(new, final)
    _fsync_dir(final.parent)
    _remove(old)


class _NoCopy(AsyncStager):
    """The state handed to async_save is already staged by our own stager (which the memory tier reads too)."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def pin(path: Path, note: str = "") -> None:
    """Keep a committed checkpoint beyond retention (an operator's choice: a known-good state, a release)."""
    verify(path)
    (Path(path) / PIN).write_text(note + "\n")


def unpin(path: Path) -> None:
    (Path(path) / PIN).unlink(missing_ok=True)


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

"""Sharded torch.distributed.checkpoint (DCP) checkpoints that count only once complete.

Protocol: every rank writes its shards with `dcp.save` into `step-NNNNNNNN.<save id>.tmp`; DCP's coordinator
writes `.metadata` last; then rank 0 writes `herdsman.json` (the manifest: step, world size, every file with its
size and CRC32; trainer/manifest.py) and renames the directory to `step-NNNNNNNN`. A directory without the final
name and a valid manifest is never loaded. Loading verifies the manifest first and falls back to the next older
checkpoint, saying why. Retention never deletes the newest checkpoint that verifies.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer.checkpoint_dirs import (TMP_NAME, committed, discard, fsync, fsync_own, latest_valid, pin, step_dir,
                                     swap_in, unpin)
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
from trainer.memory_tier import MemoryTier, copy_into
from trainer.save_writer import Writer, dcp_write, spare_cores
from trainer.snapshots import HostBuffer, Snapshot, snapshot

__all__ = ["MANIFEST", "PIN", "SUSPECT", "CheckpointError", "CheckpointInfo", "Checkpointer", "Pending", "committed",
           "latest_valid", "pin", "spare_cores", "step_dir", "unpin", "verify",
           "write_manifest"]
class Pending:
    """One save in flight: DCP writes in a background thread; the commit follows on rank 0."""

    def __init__(self, step: int, tmp: Path, blocked_s: float, save_id: str):
        self.step, self.tmp, self.blocked_s, self.save_id = step, tmp, blocked_s, save_id
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.committed = False
        self.memory_bytes = 0
        self.cpu_s = 0.0  # CPU time of the save's work on every rank, summed (its own threads; not gloo's)
        self.started, self.took_s = time.perf_counter(), 0.0  # from `save` to done (committed on rank 0)
        self.thread: threading.Thread | None = None
        self.background = False  # written by the writer process while the loop trained on
        # the training thread's wait for a CPU (run queue), from `save` to done: (start s, its delay s, end s, ...)
        self.probe: tuple[float, float, float, float] | None = None


STEAL = 0.15  # a background save may not make the training thread wait for a CPU this much more of the time
STRIKES = 2  # saves in a row that did, before the loop takes the write back
RETRY = 8  # saves written while the loop waits, after such a fall-back, before the background is tried again


def _run_delay(tid: int | None) -> float | None:
    """Seconds thread `tid` of this process has spent runnable but waiting for a CPU (Linux schedstat)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def stolen(probe: tuple[float, float, float, float], now: float, delay_now: float) -> float | None:
    """How much more of its time the training thread waited for a CPU while a background save ran (`probe`:
    its start and end, with the thread's run delay at each) than since (up to `now`, `delay_now`); None when the
    time since is too short to tell."""
    t0, d0, t1, d1 = probe
    if now - t1 < 0.2 or t1 <= t0:
        return None
    return (d1 - d0) / (t1 - t0) - (delay_now - d1) / (now - t1)


class Checkpointer:
    """Saves and restores the whole training state (model, optimizer, trainer state, per-rank RNG) with DCP.

    With `async_save`, where the machine has a core to spare for each rank (`spare_cores`; or `background=True`),
    `save` blocks the loop only to lay out a copy in reusable host buffers (the memory tier's own files when there
    is one): the copy, the write (by a process of its own, `Writer`: DCP's Python would hold the GIL), the commit
    (rank 0: manifest, rename, retention) and the memory tier's peer replica run in the background, over process
    groups of their own, and the optimizer's next step waits for the copy only (a step pre-hook). Where it has
    none, background work could only take its CPU from the training step: the copy and the write then run while
    the loop waits, and only what waits on the disk or is light on CPU and GIL (fsync, CRCs, commit, replica) runs
    in the background. The count of cores is a guess (neighbours share the machine): each background save also
    measures how long the training thread waited for a CPU meanwhile (Linux schedstat) against the time since; if
    `STRIKES` saves in a row made it wait `STEAL` more of the time on any rank, the loop takes the write back (the
    path that does not lose to a synchronous save) and tries the background again after `RETRY` saves. A new save
    first waits for the previous one, so two never overlap. Only a committed checkpoint is reported (`poll`) and
    ever loaded.
    """

    def __init__(self, root: Path, keep: int, rank: int, world_size: int, *, async_save: bool = False,
                 memory: MemoryTier | None = None, attempt: int = 0, log: Callable[[str], None] = print,
                 background: bool | None = None):
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
        if background is None:
            background = async_save and spare_cores(self.group) >= 1
        self.background = bool(background) and Writer.available()
        self._writer = Writer(rank, world_size, f"/herdsman-writer/{self._nonce}", 1800.0) if self.background else None
        if async_save and rank == 0:
            log("async checkpoints: " + ("in the background (a spare core per rank; writer process)" if
                                         self.background else "written while the loop waits (no spare core)"))
        self._buffers: dict[int, HostBuffer] = {}  # the staging copy without a memory tier
        self._copying: Snapshot | None = None  # the background copy the optimizer's next step waits for
        self._hooked: list[tuple[torch.optim.Optimizer, Any]] = []
        self._closed = False
        self._strikes = self._waited = 0  # background saves in a row that slowed training; saves since falling back
        self._last_probe: tuple[float, float, float, float] | None = None
        self._loop_tid: int | None = None

    def _state(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}

    def _snapshot(self, state: dict[str, Any], step: int, save_id: str) -> Snapshot:
        if self.memory is not None:
            return self.memory.snapshot(state, step, save_id, self._seq)
        return snapshot(state, self._buffers, 0)

    def save(self, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer, extra: dict[str, Any]) -> float:
        """Collective. Returns the seconds the training loop was blocked (waiting for the previous save, staging)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        self._reported[:0] = self.wait()  # reported by the next poll, not lost
        self._seq += 1
        # a name of this attempt and save: a dead attempt's leftovers can never collide with (or be deleted
        # under) a live save, and are swept by retention
        save_id = f"{self._nonce}-a{self.attempt}s{self._seq}"
        tmp = self.root / f"step-{step:08d}.{save_id}.tmp"
        state = self._state(model, optim)
        state["trainer"] = extra  # replicated: identical on every rank
        state[f"rng.rank{self.rank}"] = torch.get_rng_state()
        p = Pending(step, tmp, 0.0, save_id)
        p.started = t0
        if self.async_save and self._writer is not None:
            self._choose_path()
        if not self.async_save:
            self._write_now(state, tmp, step, durable=True)
            dist.barrier()  # every shard and .metadata are on disk
            if self.memory is not None:
                snap = self.memory.snapshot(state, step, save_id, self._seq)
                snap.copy()
                p.memory_bytes = self.memory.publish(snap)
            if self.rank == 0:
                self._commit(p)
            p.cpu_s = self._sum(time.thread_time() - c0)  # and a barrier: committed for every rank
            p.blocked_s = p.took_s = time.perf_counter() - t0
            p.done.set()
            self._reported.append(p)
            return p.blocked_s
        p.background = self.background
        if p.background:
            self._loop_tid = threading.get_native_id()
            delay = _run_delay(self._loop_tid)
            p.probe = None if delay is None else (t0, delay, 0.0, 0.0)
        snap = self._snapshot(state, step, save_id) if self.background or self.memory is not None else None
        if self.background:
            self._guard(optim)
            self._copying = snap
        else:
            if snap is not None:
                snap.copy()
            self._write_now(state, tmp, step, durable=False)  # from the live state: nothing changes it now
        p.blocked_s, p.cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        p.thread = threading.Thread(target=self._finish, args=(p, snap), name=f"ckpt-{step}", daemon=True)
        p.thread.start()
        self._pending = p
        return p.blocked_s

    def _write_now(self, state: dict[str, Any], tmp: Path, step: int, durable: bool) -> None:
        """DCP-save in the loop; a failure is a CheckpointError of this step (a full disk keeps its OSError as the
        cause, which the trainer reads to skip the save and train on)."""
        try:
            dcp_write(state, tmp, durable=durable, group=self.group)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
            err = CheckpointError(f"checkpoint save of step {step} failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}")
            err.step = step
            raise err from e

    def _choose_path(self) -> None:
        """Background or not for this save (every rank alike: the paths' collectives differ), from what the last
        background save did to the training thread (`stolen`); after `RETRY` saves in the loop, try again."""
        if not self.background:
            self._waited += 1
            if self._waited >= RETRY:  # the same count on every rank (saves are collective)
                self.background, self._strikes, self._last_probe = True, 0, None
            return
        probe, self._last_probe = self._last_probe, None
        delay = _run_delay(self._loop_tid)
        extra = stolen(probe, time.perf_counter(), delay) if probe is not None and delay is not None else None
        if extra is not None:
            self._strikes = self._strikes + 1 if extra > STEAL else 0
        vote = torch.tensor([int(self._strikes >= STRIKES)])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
        if vote.item():
            self.background, self._waited, self._strikes = False, 0, 0
            if self.rank == 0:
                self.log(f"async checkpoints: written while the loop waits from now on (background saves made "
                         f"training wait for a CPU {STRIKES} times in a row; background again in {RETRY} saves)")

    def _sum(self, cpu_s: float) -> float:
        if not dist.is_initialized():
            return cpu_s
        t = torch.tensor([cpu_s], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t.item())

    def _guard(self, optim: torch.optim.Optimizer) -> None:
        if not any(o is optim for o, _ in self._hooked):
            self._hooked.append((optim, optim.register_step_pre_hook(self._before_update)))

    def _before_update(self, *_: Any) -> None:
        """The optimizer is about to change what the background copy may still be reading: wait for the copy."""
        snap, self._copying = self._copying, None
        if snap is not None and not snap.copied.is_set():
            t0 = time.perf_counter()
            snap.copied.wait()
            if self._pending is not None:
                self._pending.blocked_s += time.perf_counter() - t0

    def _finish(self, p: Pending, snap: Snapshot | None) -> None:
        # normal priority: a niced thread starves under any other load, and then the next save waits on it
        c0 = time.thread_time()
        try:
            if p.background:
                snap.copy()
                p.cpu_s += self._writer.write(snap, p.tmp)  # collective over the writers' own group
            else:
                fsync_own(p.tmp, self.rank)
            if self.memory is not None:
                p.memory_bytes = self.memory.publish(snap)
            # on rank 0 (DCP's coordinator) this follows every rank's write; the sum is also a barrier for the
            # fsyncs, so that rank 0 commits only what every rank has made durable
            p.cpu_s = self._sum(p.cpu_s + time.thread_time() - c0)
            if self.rank == 0:
                c1 = time.thread_time()
                self._commit(p)
                p.cpu_s += time.thread_time() - c1
        except BaseException as e:  # noqa: BLE001 - reported to the training loop by poll()/wait()
            p.error = e
        finally:
            if snap is not None:
                snap.copied.set()  # a failed copy must not hold the optimizer
            p.took_s = time.perf_counter() - p.started
            delay = _run_delay(self._loop_tid) if p.probe is not None and p.error is None else None
            p.probe = None if delay is None else (p.probe[0], p.probe[1], time.perf_counter(), delay)
            self._last_probe = p.probe
            p.done.set()

    def _commit(self, p: Pending) -> None:
        if self._closed:
            raise CheckpointError(f"not committing step {p.step}: the checkpointer was closed")
        if self._distrust_after is not None and p.step > self._distrust_after:
            raise CheckpointError(f"not committing step {p.step}: taken after the last clean SDC check")
        write_manifest(p.tmp, p.step, self.world_size, p.save_id)
        final = step_dir(self.root, p.step)
        if os.path.lexists(final):  # a re-save of the same step (a restart resumed from an older checkpoint)
            swap_in(p.tmp, final, p.save_id)
        else:
            os.replace(p.tmp, final)
            fsync(self.root)
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

    def close(self, timeout_s: float = 60.0) -> None:
        """Release everything this Checkpointer owns: the writer process (joined, else killed), the optimizer
        hook, the host buffers, the memory tier's hold on its buffers and group (its files stay, for a restore),
        and the process group it created. A save still in flight gets `timeout_s` to land; one that has not by
        then is abandoned and can no longer commit. Afterwards, in the same process, the default group may be
        destroyed and made anew, and a new Checkpointer (and MemoryTier) restore as after a restart."""
        if self._pending is not None:
            self._pending.done.wait(timeout_s)
        self._closed = True
        if self._writer is not None:
            # a save stuck on it fails at once (EOF)
            self._writer.close(graceful=self._pending is None or self._pending.done.is_set())
            self._writer = None
        if self._pending is not None and self._pending.thread is not None:
            self._pending.thread.join(1.0)  # a thread stuck in a collective of a dead peer stays (a daemon)
        for _, handle in self._hooked:
            handle.remove()
        self._hooked.clear()
        self._copying = None
        for buf in self._buffers.values():
            buf.close()
        self._buffers.clear()
        if self.memory is not None:
            self.memory.close()
        group, self.group = self.group, None
        if group is not None and dist.is_initialized() and group in dist.distributed_c10d._world.pg_map:
            with contextlib.suppress(Exception):  # a group already gone with the default one
                dist.destroy_process_group(group)

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
                discard(old, "retired")
        self._verified = {p: v for p, v in self._verified.items() if p in keep}
        # leftovers of saves that died (other attempts' temporary directories) older than what is kept
        newest = int(found[0].name.split("-")[1]) if found and self.keep else 0
        for p in self.root.iterdir():
            m = TMP_NAME.match(p.name)
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
        self._reported[:0] = self.wait()  # no background copy may be reading what this overwrites
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

"""The in-memory checkpoint tier: each save's snapshot (trainer/snapshots.py) kept in host RAM, here and on a peer.

Gemini (SOSP'23) restores from peers' memory instead of remote storage. Here every rank keeps its own shard
(`step-N/rank-R.bin`, the raw tensor bytes, and `rank-R.json`, the layout, the non-tensor state and CRC32s, written
last) and sends the same bytes to the rank with its local rank on the next host, which keeps them in *its* host's
memory. A restart that lost one host therefore still finds every shard in some surviving host's RAM.

The disk tier stays the source of truth: memory is used only for the step of the newest verified disk checkpoint,
by the same world size; anything else (a missing shard, a CRC mismatch, another world size) falls back to disk.
What is read back is data, never code: JSON and raw bytes, every offset and dtype checked.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from trainer.snapshots import HostBuffer, Snapshot, acquire_buffer, decode_tree, snapshot, tensor_at

_STEP = re.compile(r"^step-(\d{8})$")
KEEP_STEPS = 2  # the snapshot being written and the last one whose disk copy committed


def copy_into(template: Any, local: Any) -> Any:
    """Fill a fresh state dict (DTensors of the live model) from the local shards in `local`; shapes must match."""
    if isinstance(template, dict):
        if set(template) != set(local):
            raise ValueError(f"keys differ: {sorted(map(str, set(template) ^ set(local)))[:5]}")
        return {k: copy_into(template[k], local[k]) for k in template}
    if isinstance(template, (list, tuple)):
        if len(template) != len(local):
            raise ValueError("list lengths differ")
        return type(template)(copy_into(t, v) for t, v in zip(template, local))
    if isinstance(template, DTensor):
        dst = template.to_local()
        if dst.shape != local.shape:
            raise ValueError(f"shard shape {tuple(local.shape)} != {tuple(dst.shape)}")
        dst.copy_(local)
        return template
    if isinstance(template, torch.Tensor):
        if template.shape != local.shape:
            raise ValueError(f"shape {tuple(local.shape)} != {tuple(template.shape)}")
        return local.to(template.device, template.dtype, copy=True)  # never a view of the payload read back
    return local


class MemoryTier:
    def __init__(self, root: Path, rank: int, world_size: int, ranks_per_host: int,
                 group: dist.ProcessGroup | None, log: Callable[[str], None] = print):
        self.root, self.rank, self.world, self.group, self.log = Path(root), rank, world_size, group, log
        # the peer: same local rank on the next host (none when the job fits on one host)
        self.peer_stride = ranks_per_host if world_size > ranks_per_host else 0
        # own and replica buffers, two of each, alternating: a save never overwrites the last committed step's
        self._own, self._replica = {}, {}  # type: ignore[var-annotated]

    def _dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def _claim(self, buffers: dict[int, HostBuffer], slot: int, step: int, rank: int) -> Path:
        """Where `rank`'s shard of `step` goes; no shard claims that file, or the buffer's, any more."""
        path = self._dir(step) / f"rank-{rank:05d}.bin"
        for p in (path, getattr(buffers.get(slot), "path", None)):
            if p is not None:  # a shard stops existing before its bytes change
                p.with_suffix(".json").unlink(missing_ok=True)
        return path

    def snapshot(self, state: dict[str, Any], step: int, save_id: str, seq: int) -> Snapshot:
        """Lay out this save's copy in this host's memory directory (the caller copies, then `publish`es)."""
        slot = seq % 2
        snap = snapshot(state, self._own, slot, self._claim(self._own, slot, step, self.rank))
        snap.step, snap.save_id, snap.slot = step, save_id, slot
        return snap

    def _meta(self, step: int, rank: int, head: bytes) -> None:
        tmp = self._dir(step) / f"rank-{rank:05d}.json.part"  # the metadata last: a shard without it does not exist
        tmp.write_bytes(head)
        os.replace(tmp, tmp.with_suffix(""))

    def publish(self, snap: Snapshot) -> int:
        """Collective over `group` (every rank's background save thread), after `snap.copy()`. Returns bytes/rank."""
        head = json.dumps({"step": snap.step, "save_id": snap.save_id, "rank": self.rank, "world_size": self.world,
                           "size": snap.size, "crc32": _crcs(snap.buffer.array), "tree": snap.tree,
                           "tensors": snap.buffer.layout}).encode()
        self._meta(snap.step, self.rank, head)
        if self.peer_stride:
            self._exchange_ring(snap, head)
        self._prune(keep_from=snap.step)
        return snap.size

    def _exchange_ring(self, snap: Snapshot, head: bytes) -> None:
        to, frm = (self.rank + self.peer_stride) % self.world, (self.rank - self.peer_stride) % self.world
        sizes_in = torch.zeros(2, dtype=torch.int64)
        _both(dist.isend(torch.tensor([len(head), snap.size]), to, group=self.group),
              dist.irecv(sizes_in, frm, group=self.group))
        n_head, n_payload = (int(x) for x in sizes_in)
        buf = acquire_buffer(self._replica, snap.slot, n_payload, self._claim(self._replica, snap.slot, snap.step, frm))
        head_in = torch.empty(n_head, dtype=torch.uint8)
        out = (torch.frombuffer(bytearray(head), dtype=torch.uint8), snap.buffer.tensor)  # sent from the buffer
        _both(*[dist.isend(x, to, group=self.group) for x in out if x.numel()],
              *[dist.irecv(x, frm, group=self.group) for x in (head_in, buf.tensor) if x.numel()])
        self._meta(snap.step, frm, head_in.numpy().tobytes())  # the sender's CRC: checked when read back

    def _prune(self, keep_from: int) -> None:
        steps = sorted((int(m.group(1)) for p in self.root.iterdir() if (m := _STEP.match(p.name))), reverse=True)
        keep = [s for s in steps if s <= keep_from][:KEEP_STEPS]
        for s in steps:
            if s not in keep:  # a buffer of ours still in there was moved out before (`snapshot`, `_exchange_ring`)
                shutil.rmtree(self._dir(s), ignore_errors=True)

    def close(self) -> None:
        """Let go of this process's hold on the host buffers (file descriptors; the mappings go with their last
        view) and of the process group, keeping the files: a new tier in this process (or the next) restores from
        them."""
        for buf in (*self._own.values(), *self._replica.values()):
            buf.close()
        self._own, self._replica = {}, {}
        self.group = None

    def clear(self) -> None:
        """The job is done: give the RAM back (several ranks of a host may race here; all ignore errors)."""
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _head(self, step: int, rank: int) -> dict:
        try:
            meta = json.loads((self._dir(step) / f"rank-{rank:05d}.json").read_bytes())
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def _read(self, step: int, save_id: str, rank: int) -> tuple[bytes, torch.Tensor] | None:
        """This host's copy of `rank`'s shard of this save: (its metadata, its payload, read into fresh memory)."""
        meta = self._head(step, rank)
        if meta.get("save_id") != save_id or meta.get("world_size") != self.world:
            return None  # another save of this step (an earlier run or attempt): not this checkpoint
        try:  # mapped, not read: a private mapping of tmpfs pages costs no copy (nothing writes to it)
            with open(self._dir(step) / f"rank-{rank:05d}.bin", "rb", buffering=0) as f:
                if not 0 < meta["size"] <= os.fstat(f.fileno()).st_size:
                    raise ValueError("size")
                mm = mmap.mmap(f.fileno(), meta["size"], flags=mmap.MAP_PRIVATE)
        except (OSError, ValueError, TypeError, KeyError) as e:
            self.log(f"memory tier: shard of rank {rank} at step {step} in {self._dir(step)} fails its check ({e})")
            return None
        return json.dumps(meta).encode(), torch.from_numpy(np.frombuffer(mm, dtype=np.uint8))

    def restore(self, step: int, save_id: str) -> Any | None:
        """Collective over `group` (gloo). This rank's local state for `step`, from its own host's memory or
        sent by the peer host that holds a replica; None on every rank unless every rank can be served."""
        W, me = self.world, self.rank
        held = torch.tensor([int(self._head(step, r).get("save_id") == save_id) for r in range(W)])
        table = [torch.zeros(W, dtype=torch.int64) for _ in range(W)]
        dist.all_gather(table, held, group=self.group)
        inventory = torch.stack(table)  # [holder, shard]
        source = [r if inventory[r, r] else next((h for h in range(W) if inventory[h, r]), -1) for r in range(W)]
        if -1 in source:
            if me == 0:
                self.log(f"memory tier: no copy of rank(s) {[r for r in range(W) if source[r] < 0]} at step "
                         f"{step} in any host's memory; restoring from disk")
            return None
        mine = self._read(step, save_id, me) if source[me] == me else None
        # serve the shards other ranks need from this host, receive ours if it lives elsewhere
        empty = (b"", torch.empty(0, dtype=torch.uint8))
        sends = [(r, self._read(step, save_id, r) or empty) for r in range(W) if source[r] == me and r != me]
        size_in = torch.zeros(2, dtype=torch.int64)
        _both(*[dist.isend(torch.tensor([len(h), p.numel()]), r, group=self.group) for r, (h, p) in sends],
              *([dist.irecv(size_in, source[me], group=self.group)] if source[me] != me else []))
        incoming = [torch.empty(int(n), dtype=torch.uint8) for n in size_in] if size_in[0] else []
        _both(*[dist.isend(x, r, group=self.group) for r, (h, p) in sends if h
                for x in (torch.frombuffer(bytearray(h), dtype=torch.uint8), p) if x.numel()],
              *[dist.irecv(x, source[me], group=self.group) for x in incoming if x.numel()])
        if incoming:
            mine = incoming[0].numpy().tobytes(), incoming[1]
        state = None
        if mine:
            try:
                meta, array = json.loads(mine[0]), mine[1].numpy()
                if _crcs(array, threads=len(os.sched_getaffinity(0))) != meta["crc32"]:
                    raise ValueError("it fails its check (CRC32)")
                views = [tensor_at(array, *entry) for entry in meta["tensors"]]
                state = decode_tree(meta["tree"], lambda i: views[i])
            except Exception as e:  # noqa: BLE001 - any unreadable shard means: use the disk
                self.log(f"memory tier: shard of rank {me} at step {step} not used: {e}; using disk")
        ok = torch.tensor([int(state is not None)], dtype=torch.int64)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)  # all ranks from memory, or all from disk
        return state if ok.item() else None


def _crcs(array: np.ndarray, threads: int = 1) -> list[int]:
    """CRC32 of each 32 MiB: a restore, which has every core to itself, checks them in parallel (zlib frees the GIL)."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda i: zlib.crc32(array[i:i + (1 << 25)]), range(0, array.size, 1 << 25)))


def _both(*reqs: Any) -> None:
    for r in reqs:
        r.wait()

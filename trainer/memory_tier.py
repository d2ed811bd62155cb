"""The in-memory checkpoint tier: each rank's latest snapshot in host RAM, with a replica on a peer host.

Gemini (SOSP'23) restores from peers' memory instead of remote storage. Here every rank writes its own shards
(local tensors of the DCP snapshot, optimizer state, trainer state and RNG) to its host's memory directory (tmpfs,
`/dev/shm` by default, so it outlives the process but not the host) and sends the same bytes to the rank with its
local rank on the next host, which keeps them in *its* host's memory. A restart that lost one host therefore still
finds every shard in some surviving host's RAM.

The disk tier stays the source of truth: memory is used only for the step of the newest verified disk checkpoint,
by the same world size; anything else (a missing shard, a CRC mismatch, another world size) falls back to disk.
Files are read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map

_STEP = re.compile(r"^step-(\d{8})$")
KEEP_STEPS = 2  # the snapshot being written and the last one whose disk copy committed


def to_local(state: Any) -> Any:
    """A staged state dict with every DTensor replaced by this rank's local shard."""
    return tree_map(lambda v: v.to_local() if isinstance(v, DTensor) else v, state)


def copy_into(template: Any, local: Any) -> Any:
    """Fill a fresh state dict (DTensors of the live model) from the local shards in `local`; shapes must match."""
    if isinstance(template, dict):
        if set(template) != set(local):
            raise ValueError(f"keys differ: {sorted(set(template) ^ set(local))[:5]}")
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
        return local.to(template.device, template.dtype)
    return local


class MemoryTier:
    def __init__(self, root: Path, rank: int, world_size: int, ranks_per_host: int,
                 group: dist.ProcessGroup | None, log: Callable[[str], None] = print):
        self.root, self.rank, self.world, self.group, self.log = Path(root), rank, world_size, group, log
        # the peer: same local rank on the next host (none when the job fits on one host)
        self.peer_stride = ranks_per_host if world_size > ranks_per_host else 0

    def _dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def _write(self, step: int, save_id: str, rank: int, payload: bytes) -> None:
        d = self._dir(step)
        d.mkdir(parents=True, exist_ok=True)
        blob, meta = d / f"rank-{rank:05d}.pt", d / f"rank-{rank:05d}.json"
        tmp = blob.with_suffix(".part")
        tmp.write_bytes(payload)
        os.replace(tmp, blob)
        tmp = meta.with_suffix(".part")  # the metadata last: a shard without it does not exist
        tmp.write_text(json.dumps({"step": step, "save_id": save_id, "rank": rank, "world_size": self.world,
                                   "size": len(payload),
                                   "crc32": zlib.crc32(payload)}))
        os.replace(tmp, meta)

    def _read(self, step: int, save_id: str, rank: int) -> bytes | None:
        d = self._dir(step)
        try:
            meta = json.loads((d / f"rank-{rank:05d}.json").read_text())
            payload = (d / f"rank-{rank:05d}.pt").read_bytes()
        except (OSError, ValueError):
            return None
        if meta.get("save_id") != save_id:
            return None  # another save of this step (an earlier run or attempt): not this checkpoint
        if meta.get("world_size") != self.world or meta.get("size") != len(payload) or \
                meta.get("crc32") != zlib.crc32(payload):
            self.log(f"memory tier: shard of rank {rank} at step {step} in {d} fails its check; not used")
            return None
        return payload

    def put(self, step: int, save_id: str, local_state: Any) -> int:
        """Collective over `group` (called from every rank's background save thread). Returns bytes per rank."""
        buf = io.BytesIO()
        torch.save(local_state, buf)
        payload = buf.getvalue()
        self._write(step, save_id, self.rank, payload)
        if self.peer_stride:
            got = self._exchange_ring(payload)
            self._write(step, save_id, (self.rank - self.peer_stride) % self.world, got)
        self._prune(keep_from=step)
        return len(payload)

    def _exchange_ring(self, payload: bytes) -> bytes:
        to, frm = (self.rank + self.peer_stride) % self.world, (self.rank - self.peer_stride) % self.world
        size_out, size_in = torch.tensor([len(payload)], dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        reqs = [dist.isend(size_out, to, group=self.group), dist.irecv(size_in, frm, group=self.group)]
        for r in reqs:
            r.wait()
        data_out = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        data_in = torch.empty(int(size_in.item()), dtype=torch.uint8)
        reqs = [dist.isend(data_out, to, group=self.group), dist.irecv(data_in, frm, group=self.group)]
        for r in reqs:
            r.wait()
        return data_in.numpy().tobytes()

    def _prune(self, keep_from: int) -> None:
        steps = sorted((int(m.group(1)) for p in self.root.iterdir() if (m := _STEP.match(p.name))), reverse=True)
        keep = [s for s in steps if s <= keep_from][:KEEP_STEPS]
        for s in steps:
            if s not in keep:
                shutil.rmtree(self._dir(s), ignore_errors=True)

    def clear(self) -> None:
        """The job is done: give the RAM back (several ranks of a host may race here; all ignore errors)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def restore(self, step: int, save_id: str) -> Any | None:
        """Collective over `group` (gloo). This rank's local state for `step`, from its own host's memory or
        sent by the peer host that holds a replica; None on every rank unless every rank can be served."""
        W = self.world
        held = torch.zeros(W, dtype=torch.int64)
        for r in range(W):
            try:
                held[r] = int(json.loads((self._dir(step) / f"rank-{r:05d}.json").read_text())["save_id"] == save_id)
            except (OSError, ValueError, KeyError, TypeError):
                held[r] = 0
        table = [torch.zeros(W, dtype=torch.int64) for _ in range(W)]
        dist.all_gather(table, held, group=self.group)
        inventory = torch.stack(table)  # [holder, shard]
        source = []
        for r in range(W):
            holders = [r] if inventory[r, r] else [h for h in range(W) if inventory[h, r]]
            source.append(holders[0] if holders else -1)
        if -1 in source:
            if self.rank == 0:
                self.log(f"memory tier: no copy of rank(s) {[r for r in range(W) if source[r] < 0]} at step "
                         f"{step} in any host's memory; restoring from disk")
            return None
        mine: bytes | None = self._read(step, save_id, self.rank) if source[self.rank] == self.rank else None
        # serve the shards other ranks need from this host, receive ours if it lives elsewhere
        sends = []
        for r in range(W):
            if source[r] == self.rank and r != self.rank:
                payload = self._read(step, save_id, r) or b""
                sends.append((r, payload))
        size_reqs = []
        for r, payload in sends:
            size_reqs.append(dist.isend(torch.tensor([len(payload)], dtype=torch.int64), r, group=self.group))
        size_in = torch.zeros(1, dtype=torch.int64)
        if source[self.rank] != self.rank:
            size_reqs.append(dist.irecv(size_in, source[self.rank], group=self.group))
        for q in size_reqs:
            q.wait()
        data_reqs = [dist.isend(torch.frombuffer(bytearray(p), dtype=torch.uint8), r, group=self.group)
                     for r, p in sends if p]
        if source[self.rank] != self.rank and size_in.item() > 0:
            data_in = torch.empty(int(size_in.item()), dtype=torch.uint8)
            data_reqs.append(dist.irecv(data_in, source[self.rank], group=self.group))
            for q in data_reqs:
                q.wait()
            mine = data_in.numpy().tobytes()
        else:
            for q in data_reqs:
                q.wait()
        state = None
        if mine:
            try:
                state = torch.load(io.BytesIO(mine), weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable shard means: use the disk
                self.log(f"memory tier: shard of rank {self.rank} at step {step} unreadable ({e}); using disk")
        ok = torch.tensor([int(state is not None)], dtype=torch.int64)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)  # all ranks from memory, or all from disk
        return state if ok.item() else None

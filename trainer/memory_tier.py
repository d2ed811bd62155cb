"""Host-memory snapshots of the training state, the process that writes them to disk, and the in-memory tier.

A save copies each tensor once, into a host buffer reused from save to save (no page faults after the first): a
memfd, or the memory tier's own file in the host's memory directory (tmpfs, `/dev/shm` by default), one storage each.

Gemini (SOSP'23) restores from peers' memory instead of remote storage. Here every rank keeps its own shard
(`step-N/rank-R.bin`, the raw tensor bytes, and `rank-R.json`, the layout, the non-tensor state and CRC32s, written
last) and sends the same bytes to the rank with its local rank on the next host, which keeps them in *its* host's
memory. A restart that lost one host therefore still finds every shard in some surviving host's RAM.

The disk tier stays the source of truth: memory is used only for the step of the newest verified disk checkpoint,
by the same world size; anything else (a missing shard, a CRC mismatch, another world size) falls back to disk.
What is read back is data, never code: JSON and raw bytes, every offset and dtype checked.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import multiprocessing as mp
import os
import re
import shutil
import socket
import threading
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from multiprocessing import reduction
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

_STEP = re.compile(r"^step-(\d{8})$")
KEEP_STEPS = 2  # the snapshot being written and the last one whose disk copy committed
_ALIGN = 64
_DTYPES = {str(t)[6:]: t for t in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8,
                                    torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64)}


def _encode(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """The tree of a state dict in JSON terms (tuples and non-string keys kept); tensors are appended to `tensors`
    and stand in the tree as their index."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"x": len(tensors) - 1}
    if isinstance(obj, dict):
        if not all(k is None or isinstance(k, (str, int, float)) for k in obj):
            raise TypeError("a dict key that is no JSON scalar")
        return {"d": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l" if isinstance(obj, list) else "t": [_encode(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise TypeError(f"a value of type {type(obj).__name__}")


def _decode(tree: Any, leaf: Callable[[int], Any]) -> Any:
    """The inverse of `_encode`: fresh containers (a deep copy of the non-tensor state), tensors from `leaf`."""
    if not isinstance(tree, dict) or len(tree) != 1:
        raise ValueError("malformed tree")
    (kind, v), = tree.items()
    if kind == "x":
        return leaf(v)
    if kind == "d":
        return {k: _decode(x, leaf) for k, x in v}
    if kind in ("l", "t"):
        items = [_decode(x, leaf) for x in v]
        return items if kind == "l" else tuple(items)
    if kind != "v":
        raise ValueError(f"unknown node {kind!r}")
    return v


def _layout(tensors: list[torch.Tensor]) -> tuple[list[list], int]:
    """[dtype, shape, offset, nbytes] of each tensor in a buffer, and the buffer's size."""
    out, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        out.append([str(t.dtype).removeprefix("torch."), list(t.shape), off, n])
        off += -(-n // _ALIGN) * _ALIGN
    return out, off


def _view(array: np.ndarray, dtype: str, shape: list, offset: int, nbytes: int) -> torch.Tensor:
    """A tensor on `array[offset:offset + nbytes]` with a storage of its own (DCP then writes it without a clone)."""
    dt = _DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dt is None or not all(type(s) is int and s >= 0 for s in shape) or type(offset) is not int or offset < 0 or \
            nbytes != int(np.prod(shape, dtype=np.int64)) * dt.itemsize or offset + nbytes > array.size:
        raise ValueError(f"tensor entry {dtype!r} {shape!r} at {offset!r} does not fit the payload")
    return torch.from_numpy(array[offset:offset + nbytes]).view(dt).view(shape)


class HostBuffer:
    """`size` bytes of host memory, kept mapped: a file (the memory tier's), else a memfd, which the writer
    process can map too; else (no memfd) anonymous memory. `place` moves the file to a new name."""

    _keys = itertools.count()

    def __init__(self, size: int, path: Path | None = None):
        self.size, self.path, self.key = size, path, next(self._keys)
        self.fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)  # never write into a file another process may still read
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        elif hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("herdsman-snapshot")
        if self.fd is not None:
            os.ftruncate(self.fd, max(size, 1))
        mm = mmap.mmap(-1 if self.fd is None else self.fd, max(size, 1))
        self.array = np.frombuffer(mm, dtype=np.uint8)[:size]
        self.tensor = torch.from_numpy(self.array)
        self.layout: list[list] | None = None
        self.views: list[torch.Tensor] = []

    def alive(self) -> bool:
        """The file is still this buffer's (not deleted or replaced meanwhile)."""
        try:
            return os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except (OSError, TypeError):
            return False

    def place(self, path: Path) -> bool:
        """Move the file to `path`; False when it is gone (a new buffer is needed)."""
        if not self.alive():
            return False
        if self.path != path:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, path)
            self.path = path
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _acquire(buffers: dict[int, HostBuffer], slot: int, size: int, path: Path | None, layout: Any = None
             ) -> HostBuffer:
    """`buffers[slot]` (moved to `path`), or a new one where it has another size or layout, or its file is gone."""
    buf = buffers.get(slot)
    if buf is None or buf.size != size or buf.layout != layout or (path is not None and not buf.place(path)):
        if buf is not None:
            buf.close()
        buf = buffers[slot] = HostBuffer(size, path)
        buf.layout, buf.views = layout, [_view(buf.array, *entry) for entry in layout or ()]
    return buf


class Snapshot:
    """One save's copy of the state, made by `copy`: its tree (`_encode`), and on `buffer` its tensors."""

    def __init__(self, tree: Any, sources: list[torch.Tensor], buffer: HostBuffer, specs: list):
        self.tree, self.sources, self.buffer, self.specs = tree, sources, buffer, specs
        self.size, self.copied = buffer.size, threading.Event()

    def copy(self) -> None:
        try:
            for src, dst in zip(self.sources, self.buffer.views):
                dst.copy_(src)  # releases the GIL: the training thread runs on meanwhile
        finally:
            self.copied.set()


def snapshot(state: dict[str, Any], buffers: dict[int, HostBuffer], slot: int, path: Path | None = None) -> Snapshot:
    """Lay `state` out in `buffers[slot]` (reused while the layout holds; moved to `path` for the memory tier).
    Nothing is copied yet: `Snapshot.copy` does, now or on another thread (until then `state` must not change)."""
    tensors: list[torch.Tensor] = []
    tree = _encode(state, tensors)
    sources = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    layout, size = _layout(sources)
    buf = _acquire(buffers, slot, size, path, layout)
    specs = [(t.device_mesh.mesh.tolist(), t.device_mesh.mesh_dim_names, t.placements, t.shape, t.stride())
             if isinstance(t, DTensor) else None for t in tensors]  # for the writer process's DTensors
    return Snapshot(tree, sources, buf, specs)


def spare_cores(group: dist.ProcessGroup | None = None) -> int:
    """Cores per rank left idle on this machine while training: the CPUs its ranks may run on (their affinity)
    less the intra-op threads they all run. Collective over `group`; the minimum over all machines."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    mine = ((socket.gethostname(), boot.read_text() if boot.exists() else ""), sorted(os.sched_getaffinity(0)),
            torch.get_num_threads())
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size(group)
        dist.all_gather_object(ranks, mine, group=group)
    here = [r for r in ranks if r[0] == mine[0]]
    spare = (len(set().union(*(set(r[1]) for r in here))) - sum(r[2] for r in here)) // len(here)
    if dist.is_initialized():
        t = torch.tensor([spare])
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        spare = int(t.item())
    return spare


def dcp_write(state: dict[str, Any], path: Path | str, durable: bool, group: dist.ProcessGroup | None) -> None:
    """`dcp.save` into `path`; `durable`: fsync every file (else the caller does, off the training loop)."""
    crc = torch.serialization.get_crc32_options()  # torch.save's per-record CRC32 is a third of DCP's CPU time;
    torch.serialization.set_crc32_options(False)  # the manifest's whole-file CRC32 covers the same bytes
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), sync_files=durable), process_group=group)
    finally:
        torch.serialization.set_crc32_options(crc)


class Writer:
    """A process of this rank's own that writes snapshots as DCP checkpoints. DCP's planning and serialization run
    Python for ~0.1 s per 200 MB, holding the GIL: in a thread of the training process, time the training thread
    waits for it; here, none. It maps each snapshot buffer (handed over once, as a file descriptor) and forms a
    gloo group with the other ranks' writers through the job's store (`available`: a TCPStore, memfd)."""

    def __init__(self, rank: int, world: int, prefix: str, timeout_s: float):
        store, ctx = _tcp_store(), mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_writer_main, name=f"herdsman-writer-{rank}", daemon=True, args=(
            child, rank, world, store.host, store.port, prefix, timeout_s, os.getpid()))
        self._proc.start()
        child.close()
        self._mapped: dict[int, weakref.ref] = {}

    @staticmethod
    def available() -> bool:
        return hasattr(os, "memfd_create") and dist.is_initialized() and _tcp_store() is not None

    def write(self, snap: Snapshot, tmp: Path) -> float:
        """Collective (with every rank's writer): DCP-save `snap` into `tmp`, durably. Returns its CPU seconds."""
        for key in [k for k, ref in self._mapped.items() if ref() is None]:  # unmapped there too
            self._conn.send(("drop", key))
            del self._mapped[key]
        buf = snap.buffer
        if buf.key not in self._mapped:
            self._conn.send(("map", buf.key, buf.size))
            reduction.send_handle(self._conn, buf.fd, self._proc.pid)
            self._mapped[buf.key] = weakref.ref(buf)
        self._conn.send(("write", buf.key, str(tmp), snap.tree, buf.layout, snap.specs))
        reply = self._conn.recv()  # EOFError if the process died
        if isinstance(reply, BaseException):
            raise reply
        return float(reply)

    def close(self, graceful: bool = True) -> None:
        """Stop the process: asked (it is idle) and joined, else (`graceful` False: a write in flight may hang in a
        collective with a dead peer's writer, or it does not stop within 10 s) killed."""
        if graceful:
            with contextlib.suppress(OSError):
                self._conn.send(("stop",))
            self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()


def _tcp_store() -> Any:
    store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store if isinstance(store, dist.TCPStore) else None


def _writer_main(conn: Any, rank: int, world: int, host: str, port: int, prefix: str, timeout_s: float,
                 parent: int) -> None:
    def orphaned() -> None:  # a killed trainer leaves nothing behind (a collective may hold the loop below)
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    torch.set_num_threads(1)
    timeout = timedelta(seconds=timeout_s)
    store = dist.PrefixStore(prefix, dist.TCPStore(host, port, is_master=False, timeout=timeout))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    # per buffer: its mapping, and its specs and tensors (DTensors cost ~0.1 ms each: made once); meshes by ranks
    arrays, leaves, meshes = {}, {}, {}  # type: ignore[var-annotated]
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg[0] == "map":
            fd = reduction.recv_handle(conn)
            arrays[msg[1]] = np.frombuffer(mmap.mmap(fd, max(msg[2], 1)), dtype=np.uint8)[:msg[2]]
            os.close(fd)
        elif msg[0] == "drop":
            arrays.pop(msg[1], None)
            leaves.pop(msg[1], None)
        elif msg[0] == "write":
            _, key, tmp, tree, layout, specs = msg
            c0 = time.process_time()
            try:
                if leaves.get(key, (None,))[0] != specs:
                    leaves[key] = specs, [_leaf(_view(arrays[key], *e), s, meshes) for e, s in zip(layout, specs)]
                dcp_write(_decode(tree, leaves[key][1].__getitem__), tmp, durable=True, group=None)
                conn.send(time.process_time() - c0)
            except BaseException as e:  # noqa: BLE001 - the save fails, the writer lives on
                conn.send(_portable(e))
        else:
            break
    os._exit(0)


def _leaf(view: torch.Tensor, spec: Any, meshes: dict[Any, DeviceMesh]) -> Any:
    if spec is None:
        return view
    ranks, names, placements, shape, stride = spec
    if (str(ranks), names) not in meshes:  # the same ranks as the trainer's mesh, over the writers' group
        meshes[str(ranks), names] = DeviceMesh("cpu", torch.tensor(ranks), mesh_dim_names=names)
    return DTensor.from_local(view, meshes[str(ranks), names], placements, run_check=False, shape=shape,
                              stride=stride)


def _portable(e: BaseException) -> BaseException:
    """What survives the pipe: the OSError inside (a full disk is told by its errno), else the text."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        x = x[0] if isinstance(x, tuple) and x else x  # DCP's failures: rank -> (exception, traceback)
        if isinstance(x, BaseException) and id(x) not in seen:
            seen.add(id(x))
            if isinstance(x, OSError) and x.errno:
                return OSError(x.errno, f"{x.strerror} (checkpoint writer: {type(e).__name__}: {e})"[:2000])
            failures = getattr(x, "failures", None)
            stack += [x.__cause__, x.__context__, *(failures.values() if isinstance(failures, dict) else ())]
    return RuntimeError(f"checkpoint writer: {type(e).__name__}: {e}"[:4000])


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
        buf = _acquire(self._replica, snap.slot, n_payload, self._claim(self._replica, snap.slot, snap.step, frm))
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
                views = [_view(array, *entry) for entry in meta["tensors"]]
                state = _decode(meta["tree"], lambda i: views[i])
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

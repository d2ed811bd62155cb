"""The process that writes snapshots to disk as DCP checkpoints, off the training process (and its GIL).

One per rank; the writers of all ranks form a gloo group of their own through the job's TCPStore. `spare_cores`
says whether the machine has the cores for it (a GPU host does; two ranks on two cores do not).
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import os
import socket
import threading
import time
import weakref
from datetime import timedelta
from multiprocessing import reduction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from trainer.snapshots import Snapshot, decode_tree, tensor_at

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
                    leaves[key] = specs, [_leaf(tensor_at(arrays[key], *e), s, meshes) for e, s in zip(layout, specs)]
                dcp_write(decode_tree(tree, leaves[key][1].__getitem__), tmp, durable=True, group=None)
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

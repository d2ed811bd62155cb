"""Host-memory snapshots of the training state: each save's copy of every tensor, into reused host buffers.

A save copies each tensor once, into a host buffer reused from save to save (no page faults after the first): a
memfd, or the memory tier's own file in the host's memory directory (tmpfs, `/dev/shm` by default), one storage each.
The rest of the state (steps, the loader's position, ...) is kept as a JSON-able tree whose tensor leaves point into
the buffer; read back, every offset and dtype is checked (what comes from disk is data, never code).
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.distributed.tensor import DTensor

_ALIGN = 64
_DTYPES = {str(t)[6:]: t for t in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8,
                                    torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64)}


def encode_tree(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """The tree of a state dict in JSON terms (tuples and non-string keys kept); tensors are appended to `tensors`
    and stand in the tree as their index."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"x": len(tensors) - 1}
    if isinstance(obj, dict):
        if not all(k is None or isinstance(k, (str, int, float)) for k in obj):
            raise TypeError("a dict key that is no JSON scalar")
        return {"d": [[k, encode_tree(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l" if isinstance(obj, list) else "t": [encode_tree(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise TypeError(f"a value of type {type(obj).__name__}")


def decode_tree(tree: Any, leaf: Callable[[int], Any]) -> Any:
    """The inverse of `encode_tree`: fresh containers (a deep copy of the non-tensor state), tensors from `leaf`."""
    if not isinstance(tree, dict) or len(tree) != 1:
        raise ValueError("malformed tree")
    (kind, v), = tree.items()
    if kind == "x":
        return leaf(v)
    if kind == "d":
        return {k: decode_tree(x, leaf) for k, x in v}
    if kind in ("l", "t"):
        items = [decode_tree(x, leaf) for x in v]
        return items if kind == "l" else tuple(items)
    if kind != "v":
        raise ValueError(f"unknown node {kind!r}")
    return v


def buffer_layout(tensors: list[torch.Tensor]) -> tuple[list[list], int]:
    """[dtype, shape, offset, nbytes] of each tensor in a buffer, and the buffer's size."""
    out, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        out.append([str(t.dtype).removeprefix("torch."), list(t.shape), off, n])
        off += -(-n // _ALIGN) * _ALIGN
    return out, off


def tensor_at(array: np.ndarray, dtype: str, shape: list, offset: int, nbytes: int) -> torch.Tensor:
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


def acquire_buffer(buffers: dict[int, HostBuffer], slot: int, size: int, path: Path | None, layout: Any = None
             ) -> HostBuffer:
    """`buffers[slot]` (moved to `path`), or a new one where it has another size or layout, or its file is gone."""
    buf = buffers.get(slot)
    if buf is None or buf.size != size or buf.layout != layout or (path is not None and not buf.place(path)):
        if buf is not None:
            buf.close()
        buf = buffers[slot] = HostBuffer(size, path)
        buf.layout, buf.views = layout, [tensor_at(buf.array, *entry) for entry in layout or ()]
    return buf


class Snapshot:
    """One save's copy of the state, made by `copy`: its tree (`encode_tree`), and on `buffer` its tensors."""

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
    tree = encode_tree(state, tensors)
    sources = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    layout, size = buffer_layout(sources)
    buf = acquire_buffer(buffers, slot, size, path, layout)
    specs = [(t.device_mesh.mesh.tolist(), t.device_mesh.mesh_dim_names, t.placements, t.shape, t.stride())
             if isinstance(t, DTensor) else None for t in tensors]  # for the writer process's DTensors
    return Snapshot(tree, sources, buf, specs)

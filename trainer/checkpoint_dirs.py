"""The checkpoint root on disk: committed directories by name, their atomic replacement and deletion, pins.

A checkpoint is committed when its directory takes its final name, `step-NNNNNNNN` (see trainer/checkpoint.py);
everything else under the root (`*.tmp`) is work in progress or debris that retention sweeps. Nothing here ever
leaves a half-written or half-deleted directory under a committed name, whatever instant the process is killed at.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.manifest import PIN, CheckpointError, CheckpointInfo, verify

_NAME = re.compile(r"^step-(\d{8})$")
TMP_NAME = re.compile(r"^step-(\d{8})\..*\.tmp$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_own(tmp: Path, rank: int) -> None:
    """Make this rank's part of a DCP save durable: its data files (`__<rank>_*`) and, on the coordinator, the
    metadata (DCP was told not to: its fsyncs would hold the training loop)."""
    for f in tmp.iterdir():
        if f.name.startswith(f"__{rank}_") or (rank == 0 and f.name == ".metadata"):
            fsync(f)


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


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def discard(path: Path, tag: str) -> None:
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


def swap_in(new: Path, final: Path, tag: str) -> None:
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
    fsync(final.parent)
    _remove(old)


def pin(path: Path, note: str = "") -> None:
    """Keep a committed checkpoint beyond retention (an operator's choice: a known-good state, a release)."""
    verify(path)
    (Path(path) / PIN).write_text(note + "\n")


def unpin(path: Path) -> None:
    (Path(path) / PIN).unlink(missing_ok=True)

"""The manifest of a committed checkpoint (`herdsman.json`) and the check of a directory against it.

A manifest is data from disk, never trusted: its names must be plain file names inside the checkpoint directory,
its fields must have the right types, its step must be the directory's, and the directory must hold exactly the
files it lists (plus the manifest and the PIN/SUSPECT markers written after the commit), none of them a symlink.
`verify` raises only CheckpointError, one line naming the directory and the problem, whatever the directory holds.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from herdsman import HerdsmanError

MANIFEST = "herdsman.json"
PIN = "PINNED"  # an operator's pin (pin/unpin), written into a committed directory
SUSPECT = "SUSPECT"  # the reason a directory was set aside as `*.suspect` (distrust_after)
MARKERS = frozenset({MANIFEST, PIN, SUSPECT})  # in the directory, never in the manifest
MAX_MANIFEST_BYTES = 16 << 20  # a real one lists a few files per rank: ~100 bytes each
_STEP = re.compile(r"^step-(\d{8,})(?:\.|$)")  # step-NNNNNNNN, also `.suspect` and other set-aside names
_OPEN = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # never a link, never a FIFO's wait


class CheckpointError(HerdsmanError):
    pass


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    world_size: int
    saved_at: float
    save_id: str = ""  # unique per save: the memory tier's copy must carry the same id


def _crc32_fd(fd: int) -> int:
    crc = 0
    while chunk := os.read(fd, 1 << 20):
        crc = zlib.crc32(chunk, crc)
    return crc


def _crc32(path: Path) -> int:
    fd = os.open(path, _OPEN)
    try:
        return _crc32_fd(fd)
    finally:
        os.close(fd)


def write_manifest(path: Path, step: int, world_size: int, save_id: str = "") -> None:
    files = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and not p.is_symlink() and p.name not in MARKERS:
            files[p.name] = {"size": p.stat().st_size, "crc32": _crc32(p)}
    body = {"format": 1, "step": step, "world_size": world_size, "saved_at": time.time(), "save_id": save_id,
            "files": files}
    tmp = path / (MANIFEST + ".part")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)


def _err(message: str) -> CheckpointError:
    return CheckpointError(message.replace("\r", "\\r").replace("\n", "\\n"))


def _show(name: str) -> str:
    """A name from disk or from a manifest, printable on one line and not too long."""
    shown = name if name.isprintable() else ascii(name)[1:-1]
    return shown if len(shown) <= 120 else shown[:120] + "..."


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _int(value: object, lo: int, hi: int | None = None) -> bool:
    return type(value) is int and value >= lo and (hi is None or value <= hi)  # bool is no int here


def _finite(value: object) -> bool:
    if type(value) is int:
        return abs(value) < 2**63
    return type(value) is float and math.isfinite(value)


def _brief(value: object) -> str:
    """A manifest value in an error message: containers by kind (their repr could be deep and huge)."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    return _show(repr(value))


def _no_constant(token: str) -> None:
    raise ValueError(f"{token} is not a number")


def _read(fd: int, name: str, limit: int) -> bytes | None:
    """The bytes of regular file `name` under the directory `fd` (never through a link), None when it is over
    `limit` bytes. Raises FileNotFoundError, and OSError(ELOOP) for a symlink."""
    f = os.open(name, _OPEN, dir_fd=fd)
    try:
        st = os.fstat(f)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > limit:
            return None
        data = bytearray()  # and read no more than the bound, should it grow meanwhile
        while len(data) <= limit and (chunk := os.read(f, 1 << 20)):
            data += chunk
        return bytes(data) if len(data) <= limit else None
    finally:
        os.close(f)


def _manifest(path: Path, fd: int) -> dict:
    """The manifest of `path` (open as `fd`), its shape and types checked."""
    where = f"checkpoint {path}"
    try:
        data = _read(fd, MANIFEST, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise _err(f"{where} has no manifest ({MANIFEST}): it was never committed") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EINVAL):
            raise _err(f"{where}: its manifest ({MANIFEST}) is a symlink or not a regular file") from None
        raise
    if data is None:
        raise _err(f"{where} has a corrupt manifest: over the {MAX_MANIFEST_BYTES} byte limit")
    try:
        m = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: deep nesting
        raise _err(f"{where} has a corrupt manifest: {_show(str(e) or type(e).__name__)}") from None

    def bad(problem: str) -> CheckpointError:
        return _err(f"{where} has a corrupt manifest: {problem}")

    if not isinstance(m, dict):
        raise bad(f"{_brief(m)}, not a JSON object")
    if not _int(m.get("format"), 1, 1):
        raise bad(f"format {_brief(m.get('format'))}, not 1")
    for key, lo in (("step", 0), ("world_size", 1)):
        if not _int(m.get(key), lo):
            raise bad(f"{key} {_brief(m.get(key))} is not an integer >= {lo}")
    if not _finite(m.get("saved_at", 0.0)):
        raise bad(f"saved_at {_brief(m.get('saved_at'))} is not a finite number")
    if not isinstance(m.get("save_id", ""), str):
        raise bad(f"save_id {_brief(m.get('save_id'))} is not a string")
    files = m.get("files")
    if not isinstance(files, dict):
        raise bad(f"files is {_brief(files)}, not a JSON object")
    for name, meta in files.items():
        if not _plain_name(name):
            raise bad(f"file name {_brief(name)} is not a plain file name inside the directory")
        if name in MARKERS:
            raise bad(f"file name {_brief(name)} is reserved for the files written after the commit")
        if not isinstance(meta, dict):
            raise bad(f"the entry of file {_show(name)} is {_brief(meta)}, not a JSON object")
        if not _int(meta.get("size"), 0):
            raise bad(f"file {_show(name)} has size {_brief(meta.get('size'))}, not an integer >= 0")
        if not _int(meta.get("crc32"), 0, 0xFFFFFFFF):
            raise bad(f"file {_show(name)} has crc32 {_brief(meta.get('crc32'))}, not a 32-bit integer")
    return m


def fingerprint(path: Path) -> tuple | None:
    """What changes when a directory's contents change (names, sizes, mtimes, inodes), without reading a byte:
    the key under which a verification is remembered. None if the directory cannot be listed."""
    try:
        st = os.lstat(path)
        with os.scandir(path) as it:
            entries = sorted((e.name, s.st_mode, s.st_size, s.st_mtime_ns, s.st_ino)
                             for e in it for s in (e.stat(follow_symlinks=False),))
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, tuple(entries))


def verify(path: Path) -> CheckpointInfo:
    """Check one committed checkpoint directory; raise CheckpointError naming the problem (and only that)."""
    path = Path(path)
    try:  # everything through one descriptor of the directory itself: no link is followed, at any moment
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if os.path.islink(path):  # ELOOP, or ENOTDIR (O_DIRECTORY is checked first on Linux)
            raise _err(f"checkpoint {path} is a symlink: only a real directory is a checkpoint") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise _err(f"checkpoint {path} does not exist or is not a directory") from None
        raise _err(f"checkpoint {path} cannot be read: {_show(str(e))}") from None
    try:
        return _verify(path, fd)
    except OSError as e:  # unreadable, or changed under us (a file gone, swapped for a link or a FIFO)
        raise _err(f"checkpoint {path} cannot be read: {_show(str(e))}") from None
    finally:
        os.close(fd)


def _verify(path: Path, fd: int) -> CheckpointInfo:
    m = _manifest(path, fd)
    files: dict[str, dict] = m["files"]
    where = f"checkpoint {path}"
    if ".metadata" not in files:
        raise _err(f"{where} manifest lists no DCP .metadata")
    named = _STEP.match(path.name)
    if named and int(named.group(1)) != m["step"]:
        raise _err(f"{where}: its manifest is of step {m['step']}, its name of step {int(named.group(1))}")
    present: dict[str, int] = {}
    with os.scandir(fd) as it:
        for e in it:
            s = e.stat(follow_symlinks=False)
            if stat.S_ISLNK(s.st_mode):
                raise _err(f"{where}: {_show(e.name)} is a symlink")
            if not stat.S_ISREG(s.st_mode):
                raise _err(f"{where}: {_show(e.name)} is not a regular file")
            if e.name not in files and e.name not in MARKERS:
                raise _err(f"{where}: file {_show(e.name)} is not in the manifest")
            present[e.name] = s.st_size
    for name, meta in files.items():  # every size before any CRC: the cheap checks first
        if name not in present:
            raise _err(f"{where}: file {_show(name)} is missing")
        if present[name] != meta["size"]:
            raise _err(f"{where}: file {_show(name)} has {present[name]} bytes, manifest says {meta['size']}")
    for name, meta in files.items():
        f = os.open(name, _OPEN, dir_fd=fd)  # the name came from the listing too: encodable, no NUL
        try:
            s = os.fstat(f)
            if not stat.S_ISREG(s.st_mode) or s.st_size != meta["size"]:
                raise _err(f"{where}: file {_show(name)} changed while it was checked")
            if _crc32_fd(f) != meta["crc32"]:
                raise _err(f"{where}: file {_show(name)} fails its CRC32 check")
        finally:
            os.close(f)
    return CheckpointInfo(path, m["step"], m["world_size"], float(m.get("saved_at", 0.0)), m.get("save_id", ""))

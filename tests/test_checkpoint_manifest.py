"""A checkpoint's manifest is data from disk, never trusted: names confined to the directory, no symlinks, no
unlisted files, the right shape and types, the directory's own step, a bounded size; `verify` answers with a
CheckpointInfo or one line of CheckpointError, whatever the directory holds (fuzzed with hypothesis)."""

import json
import os
import shutil
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trainer.checkpoint import (
    MANIFEST,
    PIN,
    CheckpointError,
    CheckpointInfo,
    verify,
    write_manifest,
)
from trainer.manifest import MAX_MANIFEST_BYTES, SUSPECT


def fake(root: Path, step: int = 7, world: int = 1) -> Path:
    """A committed checkpoint by hand, as DCP and the commit leave it (no torch)."""
    d = root / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"dcp metadata " * 3)
    for r in range(world):
        (d / f"__{r}_0.distcp").write_bytes(bytes(range(256)) * (r + 2))
    write_manifest(d, step, world, "save-1")
    return d


def manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def rewrite(d: Path, m: object) -> None:
    (d / MANIFEST).write_text(json.dumps(m))


def refused(d: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        verify(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg, msg
    return msg


def test_a_good_checkpoint_verifies_and_markers_are_allowed(tmp_path):
    d = fake(tmp_path, 7, 2)
    info = verify(d)
    assert (info.step, info.world_size, info.save_id) == (7, 2, "save-1")
    (d / PIN).write_text("kept\n")
    (d / SUSPECT).write_text("why\n")  # written after the commit: never in the manifest, never a problem
    assert verify(d).step == 7
    # the same checkpoint set aside under another name still verifies (forensics; `herdsman checkpoint verify`)
    assert verify(d.rename(tmp_path / "step-00000007.suspect")).step == 7


@pytest.mark.parametrize("name", ["../outside", "/abs/outside", "sub/../x", "..", ".", "", "a\x00b"])
def test_a_name_outside_the_directory_is_refused(tmp_path, name):
    d = fake(tmp_path)
    outside = tmp_path / "outside"  # it would verify if the name were followed: the right size and CRC
    outside.write_bytes(b"secret")
    m = manifest(d)
    m["files"][str(outside) if name.startswith("/abs") else name] = {"size": 6, "crc32": zlib.crc32(b"secret")}
    rewrite(d, m)
    refused(d, "is not a plain file name inside the directory")


@pytest.mark.parametrize("name", [MANIFEST, PIN, SUSPECT])
def test_the_marker_names_are_never_in_a_manifest(tmp_path, name):
    d = fake(tmp_path)
    m = manifest(d)
    if name != MANIFEST:
        (d / name).write_bytes(b"secret")  # even when it would check out
    m["files"][name] = {"size": 6, "crc32": zlib.crc32(b"secret")}
    rewrite(d, m)
    refused(d, "is reserved")


def test_symlinks_are_refused_shard_manifest_and_directory(tmp_path):
    d = fake(tmp_path)
    shard = d / "__0_0.distcp"
    copy = tmp_path / "copy.distcp"
    shutil.copy(shard, copy)
    shard.unlink()
    shard.symlink_to(copy)  # identical bytes: only the link itself is wrong
    refused(d, r"__0_0.distcp is a symlink")
    shard.unlink()
    shutil.copy(copy, shard)
    assert verify(d).step == 7
    real = tmp_path / "m.json"
    shutil.move(d / MANIFEST, real)
    (d / MANIFEST).symlink_to(real)
    refused(d, "manifest .* is a symlink")
    (d / MANIFEST).unlink()
    shutil.move(real, d / MANIFEST)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    good = d.rename(elsewhere / "step-00000007")
    (tmp_path / "step-00000007").symlink_to(good, target_is_directory=True)
    refused(tmp_path / "step-00000007", "is a symlink")
    assert verify(good).step == 7


def test_unlisted_files_and_entries_are_refused(tmp_path):
    d = fake(tmp_path)
    (d / "__9_0.distcp").write_bytes(b"not saved by this checkpoint")
    refused(d, "file __9_0.distcp is not in the manifest")
    (d / "__9_0.distcp").unlink()
    (d / "sub").mkdir()
    refused(d, "sub is not a regular file")
    (d / "sub").rmdir()
    (d / PIN).mkdir()
    refused(d, "PINNED is not a regular file")


WRONG_SHAPES = [  # (change to the manifest, the message's words); each crashed or passed before
    (lambda m: m.update(files=list(m["files"])), "files is a JSON array"),
    (lambda m: m.update(files=None), "files is None"),
    (lambda m: m["files"].update({".metadata": "39 bytes"}), "entry of file .metadata is '39 bytes'"),
    (lambda m: m["files"].update({".metadata": [39, 1]}), "entry of file .metadata is a JSON array"),
    (lambda m: m["files"][".metadata"].update(size=str(m["files"][".metadata"]["size"])), "has size '39'"),
    (lambda m: m["files"][".metadata"].update(size=39.0), "has size 39.0"),
    (lambda m: m["files"][".metadata"].update(crc32=-1), "crc32 -1"),
    (lambda m: m["files"][".metadata"].update(crc32=1 << 32), "crc32 4294967296"),
    (lambda m: m["files"][".metadata"].pop("crc32"), "crc32 None"),
    (lambda m: m.update(step="7"), "step '7' is not an integer"),
    (lambda m: m.update(step=7.0), "step 7.0 is not an integer"),
    (lambda m: m.update(step=True), "step True is not an integer"),
    (lambda m: m.update(step=-7), "step -7 is not an integer"),
    (lambda m: m.pop("step"), "step None"),
    (lambda m: m.update(world_size=0), "world_size 0"),
    (lambda m: m.update(world_size={"n": 1}), "world_size a JSON object"),
    (lambda m: m.update(saved_at="yesterday"), "saved_at 'yesterday'"),
    (lambda m: m.update(saved_at=float("inf")), "Infinity is not a number"),
    (lambda m: m.update(saved_at=10**400), "saved_at 1000"),
    (lambda m: m.update(save_id=5), "save_id 5"),
    (lambda m: m.update(format=2), "format 2"),
    (lambda m: m.update(format=True), "format True"),
]


@pytest.mark.parametrize("change, words", WRONG_SHAPES)
def test_a_manifest_of_the_wrong_shape_is_one_clear_error(tmp_path, change, words):
    d = fake(tmp_path)
    m = manifest(d)
    change(m)
    rewrite(d, m)
    assert words in refused(d, "corrupt manifest")


@pytest.mark.parametrize("text, words", [
    ("[1, 2]", "a JSON array, not a JSON object"),
    ("7", "7, not a JSON object"),
    ('"files"', "'files', not a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "recursion"),
    ('{"step": NaN}', "NaN is not a number"),
    ('{"step": ' + "9" * 5000 + "}", "digits"),
    ("{", "Expecting property name"),
])
def test_a_manifest_that_is_not_a_json_object_is_refused(tmp_path, text, words):
    d = fake(tmp_path)
    (d / MANIFEST).write_text(text)
    assert words in refused(d, "corrupt manifest")


def test_1e999_is_not_a_number_here(tmp_path):
    d = fake(tmp_path)
    text = (d / MANIFEST).read_text()
    (d / MANIFEST).write_text(text.replace('"saved_at": ', '"saved_at": 1e999, "x": ', 1))
    refused(d, "saved_at inf is not a finite number")


def test_the_manifest_step_must_be_the_directory_step(tmp_path):
    d = fake(tmp_path, 7)
    m = manifest(d)
    m["step"] = 9
    rewrite(d, m)
    refused(d, "its manifest is of step 9, its name of step 7")


def test_a_huge_manifest_is_refused_before_parsing(tmp_path):
    d = fake(tmp_path)
    body = (d / MANIFEST).read_text()
    (d / MANIFEST).write_text(" " * MAX_MANIFEST_BYTES + body)  # valid JSON, and over the bound
    t0 = time.perf_counter()
    refused(d, "over the 16777216 byte limit")
    assert time.perf_counter() - t0 < 2


def test_a_name_with_a_newline_still_makes_one_line(tmp_path):
    d = fake(tmp_path)
    (d / "evil\nname").write_bytes(b"x")
    assert "evil\\nname" in refused(d, "is not in the manifest")


def test_an_io_error_is_a_checkpoint_error(tmp_path, monkeypatch):
    d = fake(tmp_path)

    def eio(fd, n):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "read", eio)  # a failing disk, or a file that cannot be read
    refused(d, "cannot be read: .*Input/output error")
    monkeypatch.undo()
    (d / "__0_0.distcp").unlink()
    os.mkfifo(d / "__0_0.distcp")  # a FIFO under a shard's name: never opened, so never waited on
    refused(d, "__0_0.distcp is not a regular file")


# --- fuzzing ---------------------------------------------------------------------------------------------------

NAMES = st.one_of(
    st.sampled_from([".metadata", "__0_0.distcp", "../__0_0.distcp", "/etc/passwd", "a/b", "..", ".", "",
                     "a\x00b", MANIFEST, PIN, "é.distcp", "\ud800", "x" * 300, "\n"]),
    st.text(max_size=12),
)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
META = st.one_of(
    st.fixed_dictionaries({"size": st.one_of(st.integers(), JUNK), "crc32": st.one_of(st.integers(), JUNK)}),
    JUNK,
)
def _mostly(value, other):  # the right value most of the time, so the checks behind it are reached too
    return st.one_of(st.just(value), st.just(value), st.just(value), other)


MANIFESTS = st.fixed_dictionaries(
    {"format": _mostly(1, JUNK), "step": _mostly(7, st.one_of(st.integers(), JUNK)),
     "world_size": _mostly(1, st.one_of(st.integers(), JUNK)),
     "files": st.one_of(st.dictionaries(NAMES, META, max_size=5), JUNK)},
    optional={"saved_at": st.one_of(st.floats(allow_nan=True, allow_infinity=True), JUNK),
              "save_id": st.one_of(st.text(max_size=5), JUNK)},
)


def _mutations(good: dict) -> st.SearchStrategy:
    """The real manifest with one field, or one file's entry, replaced by something else."""
    def mutate(args):
        where, key, value, name, meta = args
        m = json.loads(json.dumps(good))
        if where == "extra":  # one more file listed: a path, a marker, a name that is not there
            m["files"][name] = meta
            return m
        target = m if where == "top" else m["files"][where]
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
        return m
    keys = st.sampled_from(["format", "step", "world_size", "files", "saved_at", "save_id", "size", "crc32"])
    where = st.sampled_from(["top", ".metadata", "__0_0.distcp", "extra"])
    return st.tuples(where, keys, st.one_of(st.none(), JUNK), NAMES, META).map(mutate)


SHARDS = {".metadata": b"dcp metadata", "__0_0.distcp": bytes(range(256)) * 3}
GOOD = {"format": 1, "step": 7, "world_size": 1, "saved_at": 1.7e9, "save_id": "s",
        "files": {n: {"size": len(b), "crc32": zlib.crc32(b)} for n, b in SHARDS.items()}}
_GOOD = json.dumps(GOOD, indent=1).encode()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "step-00000007"
    d.mkdir()
    for name, data in SHARDS.items():
        (d / name).write_bytes(data)
    write_manifest(d, 7, 1, "s")  # the same files as GOOD lists
    assert manifest(d)["files"] == GOOD["files"]
    return d


_RAW = st.one_of(
    st.binary(max_size=512),
    st.sampled_from([b"", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"null", b"1e999", b"-0", b"[" * 5000,
                     _GOOD[: len(_GOOD) // 2], _GOOD.replace(b"\"size\": ", b"\"size\": 1e999 + "),
                     _GOOD.replace(b"\"step\": 7", b"\"step\": 1e999"),
                     _GOOD.replace(b"\"step\": 7", b"\"step\": " + b"1" * 4400)]),
)


def _check(d: Path, data: bytes) -> None:
    (d / MANIFEST).write_bytes(data)
    t0 = time.perf_counter()
    try:
        info = verify(d)
    except CheckpointError as e:  # anything else fails the test
        assert "\n" not in str(e) and str(d) in str(e)
    else:
        assert isinstance(info, CheckpointInfo) and info.step == 7
        m = json.loads(data)  # it only passes as the directory's own manifest, files exactly as listed
        assert sorted(m["files"]) == [".metadata", "__0_0.distcp"] and m["world_size"] >= 1
    assert time.perf_counter() - t0 < 2.0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(MANIFESTS.map(lambda m: json.dumps(m).encode()),
                      _mutations(GOOD).map(lambda m: json.dumps(m).encode()), _RAW))
@example(data=_GOOD)
def test_fuzzed_manifests_verify_or_raise_checkpoint_error(fuzz_dir, data):
    _check(fuzz_dir, data)


def test_the_good_manifest_verifies(fuzz_dir):
    _check(fuzz_dir, _GOOD)
    assert verify(fuzz_dir).save_id == "s"

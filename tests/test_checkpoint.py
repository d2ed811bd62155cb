"""Checkpoints that make failures cheap: the memory tier after a host is lost, N->M resharding, silent data
corruption found and rolled back, operator pins, no silent fresh start, the Young/Daly suggestion."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer_runs import ROOT, free_port, launch, losses, write_config
from trainer import faults
from trainer.checkpoint import (
    MANIFEST,
    PIN,
    Checkpointer,
    Pending,
    committed,
    latest_valid,
    pin,
    unpin,
    verify,
    write_manifest,
)
from trainer.interval import young_daly

STEPS, EVERY = 12, 4


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    cfg = write_config(d / "h.toml", d / "run", steps=STEPS, checkpoint_every=EVERY)
    runs = launch(cfg, 2, 0, d / "stats", hosts=["h0", "h1"])
    assert [r.returncode for r in runs] == [0, 0], runs[0].stdout
    return losses(d / "stats")


def _fail_at(tmp_path, step, hosts):
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=STEPS, checkpoint_every=EVERY)
    faults.request(tmp_path / "ctl", 0, "exception", "boom", at_step=step)
    first = launch(cfg, 2, 0, tmp_path / "stats", tmp_path / "ctl", hosts=hosts)
    assert all(r.returncode != 0 for r in first)
    return cfg


def test_a_lost_host_is_restored_from_its_peers_memory(straight, tmp_path):
    cfg = _fail_at(tmp_path, 10, ["h0", "h1"])
    mem = tmp_path / "run" / "memory"
    # each host holds its own shard and its peer's replica of the newest committed step
    assert sorted(p.name for p in (mem / "h0" / "step-00000008").glob("*.bin")) == ["rank-00000.bin", "rank-00001.bin"]
    shutil.rmtree(mem / "h1")  # host h1 is gone; its rank restarts on a fresh spare h2
    second = launch(cfg, 2, 1, tmp_path / "stats", tmp_path / "ctl", hosts=["h0", "h2"])
    assert [r.returncode for r in second] == [0, 0], second[0].stdout
    assert "step-00000008 (memory, " in second[0].stdout
    assert losses(tmp_path / "stats") == straight  # exactly the uninterrupted run


def test_without_a_copy_in_memory_the_disk_is_used(straight, tmp_path):
    cfg = _fail_at(tmp_path, 10, ["h0", "h1"])
    shutil.rmtree(tmp_path / "run" / "memory")  # every host rebooted
    second = launch(cfg, 2, 1, tmp_path / "stats", tmp_path / "ctl", hosts=["h0", "h1"])
    assert [r.returncode for r in second] == [0, 0], second[0].stdout
    assert "step-00000008 (disk, " in second[0].stdout and "no copy of rank(s) [0, 1]" in second[0].stdout
    assert losses(tmp_path / "stats") == straight


def test_a_corrupt_memory_copy_falls_back_to_disk(straight, tmp_path):
    cfg = _fail_at(tmp_path, 10, ["h0", "h1"])
    blob = tmp_path / "run" / "memory" / "h0" / "step-00000008" / "rank-00000.bin"
    blob.write_bytes(blob.read_bytes()[:-7] + b"garbage")
    second = launch(cfg, 2, 1, tmp_path / "stats", tmp_path / "ctl", hosts=["h0", "h1"])
    assert [r.returncode for r in second] == [0, 0], second[0].stdout
    assert "fails its check" in second[0].stdout and "(disk, " in second[0].stdout
    assert losses(tmp_path / "stats") == straight


def test_a_flipped_bit_is_found_attributed_and_rolled_back(straight, tmp_path):
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=STEPS, checkpoint_every=3)
    faults.request(tmp_path / "ctl", 1, "bitflip", at_step=6)  # after step 6's update, before its checkpoint
    first = launch(cfg, 2, 0, tmp_path / "stats", tmp_path / "ctl", hosts=["h0", "h1"])
    assert all(r.returncode != 0 for r in first)
    assert "SilentDataCorruption: parameter checksum mismatch on rank 1 (h1) at step 7" in first[1].stdout
    assert "PeerCorruption" in first[0].stdout and "parameter checksum mismatch" not in first[0].stdout
    root = tmp_path / "run" / "checkpoints" / "t"
    # the checkpoint of step 6 holds the flipped bit: set aside if it had committed, else never committed
    assert [p.name for p in committed(root)] == ["step-00000003"]
    if (root / "step-00000006.suspect").exists():
        assert "changed outside the optimizer" in (root / "step-00000006.suspect" / "SUSPECT").read_text()
    else:
        assert "checkpoint of step 6 (in flight) not committed" in first[0].stdout
    second = launch(cfg, 2, 1, tmp_path / "stats", tmp_path / "ctl", hosts=["h0", "h1"])
    assert [r.returncode for r in second] == [0, 0], second[0].stdout
    assert "step-00000003" in second[0].stdout
    # rolled back and recomputed: the same losses as a run that was never corrupted
    want = losses(tmp_path / "stats")
    assert all(want[s] == straight[s] for s in range(1, STEPS + 1)), (want, straight)


def test_checksums_see_any_single_bit():
    from trainer.sdc import flip_bit, shard_checksum

    p = [torch.randn(7, 5), torch.randn(3)]
    before = shard_checksum(p)
    for bit in (0, 7, 22, 31, 100):
        q = [t.clone() for t in p]
        flip_bit(q, bit)
        assert shard_checksum(q) != before, bit


PROBE = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from herdsman.config import load_config
from trainer.checkpoint import Checkpointer, verify
from trainer.train import build_model
cfg = load_config({config!r})
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
model = build_model(cfg.trainer, torch.device("cpu"))
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).sum().backward(); optim.step()
state = Checkpointer({ckpt!r}, 3, rank, world).load(verify({ckpt!r}), model, optim)
full = StateDictOptions(full_state_dict=True, cpu_offload=True)
m, o = get_model_state_dict(model, options=full), get_optimizer_state_dict(model, optim, options=full)
if rank == 0:
    torch.save({{"model": m, "optim": o["state"], "step": state["step"]}}, {out!r})
dist.destroy_process_group()
"""


def _load_on(world, config, ckpt, out):
    import os

    code = PROBE.format(root=str(ROOT), config=str(config), ckpt=str(ckpt), out=str(out))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world),
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
             for r in range(world)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world, outs[0]
    return torch.load(out, weights_only=True)


@pytest.mark.slow  # tens of seconds of real ranks: out of the quick loop, in `make test`
def test_a_checkpoint_of_two_ranks_loads_on_one_and_on_three(tmp_path):
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=8, checkpoint_every=8)
    assert [r.returncode for r in launch(cfg, 2, 0, tmp_path / "stats")] == [0, 0]
    ckpt = tmp_path / "run" / "checkpoints" / "t" / "step-00000008"
    on = {w: _load_on(w, cfg, ckpt, tmp_path / f"full{w}.pt") for w in (1, 2, 3)}
    for w in (1, 3):
        assert on[w]["step"] == 8
        for k, v in on[2]["model"].items():
            assert torch.equal(on[w]["model"][k], v), (w, k)
        for k, st in on[2]["optim"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(on[w]["optim"][k][name], st[name]), (w, k, name)
    # and the trainer itself carries on with three ranks from the two-rank checkpoint
    cfg3 = write_config(tmp_path / "h3.toml", tmp_path / "run", steps=10, checkpoint_every=8)
    runs = launch(cfg3, 3, 1, tmp_path / "stats3")
    assert [r.returncode for r in runs] == [0, 0, 0], runs[0].stdout
    assert "step-00000008 (disk, " in runs[0].stdout  # another world size: never the memory tier
    assert sorted(losses(tmp_path / "stats3")) == [9, 10]


@pytest.mark.slow  # tens of seconds of real ranks: out of the quick loop, in `make test`
def test_pinned_checkpoints_outlive_retention_and_all_broken_stops(tmp_path):
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=4, checkpoint_every=1, keep_checkpoints=2)
    root = tmp_path / "run" / "checkpoints" / "t"
    assert [r.returncode for r in launch(cfg, 1, 0, tmp_path / "stats")] == [0]
    assert [p.name for p in committed(root)] == ["step-00000004", "step-00000003"]
    # pin the newest, train on: retention keeps the last two plus the pin
    pin(root / "step-00000004", "known good")
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=8, checkpoint_every=1, keep_checkpoints=2)
    assert [r.returncode for r in launch(cfg, 1, 1, tmp_path / "stats")] == [0]
    assert [p.name for p in committed(root)] == ["step-00000008", "step-00000007", "step-00000004"]
    assert (root / "step-00000004" / PIN).read_text().strip() == "known good"
    assert verify(root / "step-00000004").step == 4  # the pin file is not part of the manifest's check
    unpin(root / "step-00000004")
    assert not (root / "step-00000004" / PIN).exists()
    assert not list(root.glob("*.tmp"))  # no leftovers of the async saves
    # every checkpoint broken: the trainer says so and stops; it never silently starts again from scratch
    for p in committed(root):
        (p / "herdsman.json").write_text("{")
    runs = launch(cfg, 1, 2, tmp_path / "stats")
    assert runs[0].returncode != 0
    assert "none of the 3 checkpoint(s)" in runs[0].stdout and "refusing to train from scratch" in runs[0].stdout
    assert runs[0].stdout.count("skipping checkpoint") == 3


@pytest.mark.slow  # tens of seconds of real ranks: out of the quick loop, in `make test`
def test_young_daly_and_the_suggestion_printed_at_start(tmp_path):
    assert young_daly(10.0, 3600.0) == pytest.approx((2 * 10 * 3600) ** 0.5, rel=0.05)  # ~268 s
    assert young_daly(0.0, 3600.0) == 0.0 and young_daly(100.0, 10.0) == 10.0
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=4, checkpoint_every=2)
    first = launch(cfg, 1, 0, tmp_path / "stats")
    assert "Young/Daly needs a measured save cost" in first[0].stdout
    stats = json.loads((tmp_path / "run" / "checkpoints" / "t" / "herdsman-stats.json").read_text())
    assert stats["save_blocked_s"] > 0 and stats["step_s"] > 0
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=6, checkpoint_every=2)
    second = launch(cfg, 1, 1, tmp_path / "stats")
    line = next(ln for ln in second[0].stdout.splitlines() if "Young/Daly suggests" in ln)
    assert "observed: 1 failure(s)" in line and "steps)" in line


def test_cli_pins_only_a_checkpoint_that_verifies(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main

    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=2, checkpoint_every=1)
    assert [r.returncode for r in launch(cfg, 1, 0, tmp_path / "stats")] == [0]
    root = tmp_path / "run" / "checkpoints" / "t"
    r = CliRunner().invoke(main, ["checkpoint", "pin", str(root / "step-00000002"), "--note", "release 1"])
    assert r.exit_code == 0 and (root / "step-00000002" / PIN).read_text().strip() == "release 1"
    (root / "step-00000001" / "herdsman.json").unlink()
    r = CliRunner().invoke(main, ["checkpoint", "pin", str(root / "step-00000001")])
    assert r.exit_code == 2 and "never committed" in r.output
    assert CliRunner().invoke(main, ["checkpoint", "unpin", str(root / "step-00000002")]).exit_code == 0
    assert not (root / "step-00000002" / PIN).exists()


# --- retention and re-saves, on checkpoints made by hand (no training run) --------------------------------------

def _saved(root: Path, step: int, save_id: str) -> Pending:
    """A save written (as DCP leaves it) and not yet committed."""
    tmp = root / f"step-{step:08d}.{save_id}.tmp"
    tmp.mkdir(parents=True)
    (tmp / ".metadata").write_bytes(f"metadata of {save_id}".encode())
    (tmp / "__0_0.distcp").write_bytes(save_id.encode() * 1000)
    return Pending(step, tmp, 0.0, save_id)


def _committed_by_hand(root: Path, step: int, broken: bool = False) -> Path:
    p = _saved(root, step, f"hand{step}")
    write_manifest(p.tmp, step, 1, p.save_id)
    if broken:
        (p.tmp / MANIFEST).write_text("{")
    return p.tmp.rename(root / f"step-{step:08d}")


def _names(root: Path) -> list[int]:
    return [int(p.name[5:]) for p in committed(root)]


def test_retention_never_deletes_the_newest_checkpoint_that_verifies(tmp_path):
    root = tmp_path / "t"
    _committed_by_hand(root, 2)
    for step in (6, 8):
        _committed_by_hand(root, step, broken=True)
    # a restart resumed from step 2 (6 and 8 do not load) and saves step 4: it outranks nothing by name
    logs = []
    ck = Checkpointer(root, 2, 0, 1, log=logs.append)
    ck._commit(_saved(root, 4, "b"))
    assert _names(root) == [8, 6, 4]  # the two newest by name, and the one that loads
    assert latest_valid(root, warn=lambda m: None).save_id == "b"
    assert sum("retention: " in m and "corrupt manifest" in m for m in logs) == 2


def test_three_broken_checkpoints_do_not_push_out_the_last_good_one(tmp_path):
    root = tmp_path / "t"
    _committed_by_hand(root, 1)
    pin(root / "step-00000001", "known good")
    _committed_by_hand(root, 2)
    for step in (3, 4, 5):
        _committed_by_hand(root, step, broken=True)
    ck = Checkpointer(root, 3, 0, 1, log=lambda m: None)
    ck._retain()
    assert _names(root) == [5, 4, 3, 2, 1]  # 2 verifies; 1 is pinned
    ck._commit(_saved(root, 6, "c"))
    assert _names(root) == [6, 5, 4, 1]  # 6 verifies now: 2 may go; the pin stays


def test_retention_reads_a_checkpoint_once_while_it_is_unchanged(tmp_path, monkeypatch):
    import trainer.checkpoint as ckmod

    calls = []
    real = ckmod.verify
    monkeypatch.setattr(ckmod, "verify", lambda p: calls.append(Path(p).name) or real(p))
    root = tmp_path / "t"
    ck = Checkpointer(root, 2, 0, 1, log=lambda m: None)
    for step in range(1, 6):
        ck._commit(_saved(root, step, f"s{step}"))
    assert calls == [] and _names(root) == [5, 4]  # a fresh commit is known good: nothing is read again
    for step in (9, 8):
        _committed_by_hand(root, step, broken=True)
    ck._commit(_saved(root, 6, "s6"))
    ck._commit(_saved(root, 7, "s7"))
    assert calls == ["step-00000009", "step-00000008"]  # each broken one read once, not at every commit
    assert _names(root) == [9, 8, 7]
    (root / "step-00000009" / MANIFEST).write_text("{}")  # changed: read again
    ck._retain()
    assert calls[2:] == ["step-00000009"]


class Killed(BaseException):
    pass


def _watch(monkeypatch, root: Path, kill_at: int | None = None) -> list[tuple[str, str | None]]:
    """Every rename, exchange and deletion from here on: (which, the save id latest_valid would load after it);
    the `kill_at`-th (1-based) raises Killed instead of happening, as a kill -9 right before it would."""
    import trainer.checkpoint_dirs as ckdirs

    seen: list[tuple[str, str | None]] = []

    def hook(name, real):
        def run(*a, **k):
            if len(seen) + 1 == kill_at:
                raise Killed(name)
            out = real(*a, **k)
            info = latest_valid(root, warn=lambda m: None)
            seen.append((name, info.save_id if info is not None and info.step == 4 else None))
            return out
        return run

    monkeypatch.setattr(ckdirs, "_exchange", hook("exchange", ckdirs._exchange))
    monkeypatch.setattr(os, "replace", hook("replace", os.replace))
    monkeypatch.setattr(shutil, "rmtree", hook("rmtree", shutil.rmtree))
    return seen


@pytest.mark.parametrize("kill_at", [None, 1, 2, 3])
def test_a_resave_replaces_the_step_with_a_whole_checkpoint_at_every_instant(tmp_path, monkeypatch, kill_at):
    root = tmp_path / "t"
    ck = Checkpointer(root, 3, 0, 1, log=lambda m: None)
    ck._commit(_saved(root, 4, "a"))
    again = _saved(root, 4, "b")  # a restart resumed from an older checkpoint and saves step 4 once more
    seen = _watch(monkeypatch, root, kill_at)
    try:
        ck._commit(again)
    except Killed:
        pass
    monkeypatch.undo()
    # the manifest's rename, the exchange of the two directories, the deletion of the old one
    assert [op for op, _ in seen] == ["replace", "exchange", "rmtree"][: (kill_at or 4) - 1]
    assert all(sid in ("a", "b") for _, sid in seen), seen  # step 4 loads at every instant
    assert latest_valid(root, warn=lambda m: None).save_id == ("a" if kill_at in (1, 2) else "b")
    ck._commit(_saved(root, 5, "c"))  # whatever a kill left behind is swept by the next commit
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000005"]


def test_a_resave_without_an_atomic_exchange_has_a_single_rename_window(tmp_path, monkeypatch):
    import errno

    import trainer.checkpoint_dirs as ckdirs

    def unsupported(a, b):
        raise OSError(errno.EINVAL, "RENAME_EXCHANGE not supported")

    root = tmp_path / "t"
    ck = Checkpointer(root, 3, 0, 1, log=lambda m: None)
    ck._commit(_saved(root, 4, "a"))
    monkeypatch.setattr(ckdirs, "_exchange", unsupported)
    seen = _watch(monkeypatch, root, kill_at=3)  # killed between the two renames
    with pytest.raises(Killed):
        ck._commit(_saved(root, 4, "b"))
    monkeypatch.undo()
    assert seen == [("replace", "a"), ("replace", None)]  # the one instant without step 4: one rename long
    (aside,) = root.glob("step-00000004.*.replaced.tmp")
    assert verify(aside).save_id == "a"  # the old one is whole, under a name only retention's sweep touches
    ck._commit(_saved(root, 4, "c"))  # the next save of step 4 finds none: a plain rename; the sweep tidies
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]
    # and without a kill: old aside, new in, old deleted after
    monkeypatch.setattr(ckdirs, "_exchange", unsupported)
    seen = _watch(monkeypatch, root)
    ck._commit(_saved(root, 4, "d"))
    monkeypatch.undo()
    assert seen == [("replace", "c"), ("replace", None), ("replace", "d"), ("rmtree", "d")]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]

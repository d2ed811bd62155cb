"""Checkpoints that make failures cheap: the memory tier after a host is lost, N->M resharding, silent data
corruption found and rolled back, operator pins, no silent fresh start, the Young/Daly suggestion."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import faults
from trainer.checkpoint import PIN, Checkpointer, committed, latest_valid, pin, unpin, verify
from trainer.interval import young_daly
from tests.trainer_runs import ROOT, free_port, launch, losses, write_config

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
    assert sorted(p.name for p in (mem / "h0" / "step-00000008").glob("*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
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
    blob = tmp_path / "run" / "memory" / "h0" / "step-00000008" / "rank-00000.pt"
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

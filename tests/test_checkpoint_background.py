"""Async checkpoints that do not fight the training step: the snapshot taken at `save` is what lands on disk and in
the memory tier although the optimizer moves on at once, the writer process is really used and leaves nothing
behind, the host buffers are reused without ever overwriting the last committed step's memory copy, and the
placement decision follows the cores the ranks leave free."""

import os
import subprocess
import sys

import pytest
import torch

from tests.trainer_runs import ROOT, free_port
from trainer import save_writer, snapshots

PROBE = r"""
import os, sys, time, json, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from pathlib import Path
from herdsman.config import TrainerConfig
from trainer.checkpoint import Checkpointer, latest_valid
from trainer.memory_tier import MemoryTier
from trainer.train import build_model
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = TrainerConfig(model="tiny")
model = build_model(cfg, torch.device("cpu"))
optim = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
x = torch.randint(0, 200, (2, 16))
def step():
    model(x, torch.zeros_like(x)).float().mean().backward()
    optim.step()
    optim.zero_grad()
def params():
    return {{k: v.to_local().clone() for k, v in model.state_dict().items()}}
from trainer import snapshots
real_copy = snapshots.Snapshot.copy
def slow_copy(self):  # a copy slower than the next step: only the optimizer's pre-hook keeps the snapshot whole
    time.sleep(0.5)
    real_copy(self)
snapshots.Snapshot.copy = slow_copy
root, mem = Path({tmp!r}) / "ckpt", Path({tmp!r}) / "mem"
memory = MemoryTier(mem, 0, 1, 1, None)
ck = Checkpointer(root, 2, 0, 1, async_save=True, memory=memory, background=True, log=lambda m: None)
assert ck.background and ck._writer is not None
writer_pid = ck._writer._proc.pid
step()
saved = {{}}
for s in (1, 2, 3):
    saved[s] = params()
    ck.save(s, model, optim, {{"step": s, "loader": {{"position": s}}, "note": ("a", 1)}})
    step()  # at once: the optimizer's pre-hook holds it until the background copy is taken
    step()
    ck.wait()
# the memory tier holds the last two steps; each file's JSON names its save, written last
held = sorted(p.name for p in mem.iterdir())
assert held == ["step-00000002", "step-00000003"], held
info = latest_valid(root)
assert info.step == 3
after = params()
state, tier = ck.restore(info, model, optim)
assert tier == "memory", tier
assert state == {{"step": 3, "loader": {{"position": 3}}, "note": ("a", 1)}}, state
assert all(torch.equal(v, saved[3][k]) for k, v in params().items())
assert not all(torch.equal(v, after[k]) for k, v in params().items())  # it really moved on meanwhile
for p in list(model.parameters()):
    p.data.zero_()
ck.load(info, model, optim)  # and the disk copy, written by the writer process, is the same snapshot
assert all(torch.equal(v, saved[3][k]) for k, v in params().items())
assert optim.param_groups[0]["betas"] == (0.9, 0.95)
ck.close()  # the writer process is gone (joined), not left behind
assert not os.path.exists(f"/proc/{{writer_pid}}")
print("OK")
"""


@pytest.mark.slow  # tens of seconds of real ranks: out of the quick loop, in `make test`
def test_a_background_save_writes_the_state_of_its_step_while_training_moves_on(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), tmp=str(tmp_path))], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-3000:] + r.stderr[-3000:]


def test_spare_cores_counts_what_the_ranks_leave_free(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert save_writer.spare_cores() == 3  # one rank, one thread, four cores
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert save_writer.spare_cores() == 0  # its intra-op threads take them all
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert save_writer.spare_cores() == 0


def test_snapshots_reuse_their_buffers_and_keep_the_shape_of_the_state(tmp_path):
    state = {"w": torch.arange(10, dtype=torch.float32), "s": torch.tensor(3), 7: [(0.9, 0.95), None, "x"],
             "h": torch.zeros(0, 4, dtype=torch.bfloat16)}
    buffers: dict = {}
    first = snapshots.snapshot(state, buffers, 0)
    first.copy()
    state["w"] += 1  # the next save copies into the same buffer: no new memory, no page faults
    second = snapshots.snapshot(state, buffers, 0)
    second.copy()
    assert second.buffer is first.buffer and second.copied.is_set()
    views = second.buffer.views
    assert torch.equal(views[0], torch.arange(1, 11, dtype=torch.float32)) and views[1].item() == 3
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in views)  # DCP writes no clone
    back = snapshots.decode_tree(second.tree, views.__getitem__)
    assert back[7] == [(0.9, 0.95), None, "x"] and back["h"].shape == (0, 4)
    bad = list(second.buffer.layout[0])
    bad[3] += 4  # a layout that does not fit the payload is refused, never read out of bounds
    with pytest.raises(ValueError):
        snapshots.tensor_at(second.buffer.array, *bad)
    with pytest.raises(TypeError):
        snapshots.encode_tree({"f": object()}, [])


RESTART = r"""
import os, sys, threading, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from pathlib import Path
from herdsman.config import TrainerConfig
from trainer.checkpoint import Checkpointer, latest_valid
from trainer.memory_tier import MemoryTier
from trainer.train import build_model
root, mem = Path({tmp!r}) / "ckpt", Path({tmp!r}) / "mem"
cfg = TrainerConfig(model="tiny")
x = torch.randint(0, 200, (2, 16))

def session(port, background):
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = build_model(cfg, torch.device("cpu"))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ck = Checkpointer(root, 2, 0, 1, async_save=True, memory=MemoryTier(mem, 0, 1, 1, None, log=print),
                      background=background, log=print)
    return model, optim, ck

def params(model):
    return {{k: v.to_local().clone() for k, v in model.state_dict().items()}}

threads_before = set(threading.enumerate())
model, optim, ck = session({port1}, True)
assert ck.background, "the first session must use the writer process"
writer, group, memory = ck._writer._proc, ck.group, ck.memory
model(x, torch.zeros_like(x)).float().mean().backward()
optim.step()
saved = params(model)
ck.save(1, model, optim, {{"step": 1, "loader": {{"position": 1}}}})
ck.wait()
ck.close()
assert not writer.is_alive() and writer.exitcode is not None, "writer process left behind"
assert group not in dist.distributed_c10d._world.pg_map, "checkpoint group not destroyed"
assert memory.group is None and not memory._own, "memory tier still holds its buffers"
assert not [t for t in set(threading.enumerate()) - threads_before if t.name.startswith("ckpt-")], "thread left"
assert not optim._optimizer_step_pre_hooks, "optimizer hook left"
dist.destroy_process_group()

# the in-process restart: a fresh default group, a fresh model, a new Checkpointer and MemoryTier
model, optim, ck = session({port2}, {background2})
info = latest_valid(root)
assert info is not None and info.step == 1, info
state, tier = ck.restore(info, model, optim)
assert tier == "memory", tier
assert state["step"] == 1, state
assert all(torch.equal(v, saved[k]) for k, v in params(model).items())
ck.save(2, model, optim, {{"step": 2, "loader": {{"position": 2}}}})  # and it saves again
assert [p.step for p in ck.wait() if p.committed] == [2]
ck.close()
dist.destroy_process_group()
print("OK")
"""


@pytest.mark.slow  # tens of seconds of real ranks: out of the quick loop, in `make test`
@pytest.mark.parametrize("background2", [True, False])
def test_close_releases_everything_so_a_new_checkpointer_restores_in_the_same_process(tmp_path, background2):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    code = RESTART.format(root=str(ROOT), tmp=str(tmp_path), port1=free_port(), port2=free_port(),
                          background2=background2)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-3000:] + r.stderr[-3000:]


TWO_RANKS = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from pathlib import Path
from herdsman.config import TrainerConfig
from trainer.checkpoint import Checkpointer, latest_valid
from trainer.memory_tier import MemoryTier
from trainer.train import build_model
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
model = build_model(TrainerConfig(model="tiny"), torch.device("cpu"))
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(rank))
def step():
    model(x, torch.zeros_like(x)).float().mean().backward()
    optim.step()
    optim.zero_grad()
def params():
    return {{k: v.to_local().clone() for k, v in model.state_dict().items()}}
root = Path({tmp!r}) / "ckpt"
ck = Checkpointer(root, 2, rank, 2, async_save=True, memory=MemoryTier(Path({tmp!r}) / "mem", rank, 2, 2, None),
                  background=True, log=lambda m: None)
assert ck.background
step()
saved = params()
ck.save(1, model, optim, {{"step": 1, "loader": {{"position": 1}}}})
step()  # the optimizer moves on while the writers write
moved = params()
assert [p.step for p in ck.wait() if p.committed] == ([1] if rank == 0 else [])
dist.barrier()  # rank 0 commits after every rank's part is written: rank 1 looks once it has
info = latest_valid(root)
assert info.step == 1 and info.world_size == 2
ck.load(info, model, optim)  # the disk copy the two writer processes wrote, each its own shard
assert all(torch.equal(v, saved[k]) for k, v in params().items())
assert not all(torch.equal(v, moved[k]) for k, v in params().items())
step()
state, tier = ck.restore(info, model, optim)
assert tier == "memory" and state["step"] == 1, (tier, state)
assert all(torch.equal(v, saved[k]) for k, v in params().items())
ck.close()
dist.destroy_process_group()
print("OK")
"""


def test_two_ranks_writer_processes_write_each_their_shard(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "WORLD_SIZE": "2"}
    code = TWO_RANKS.format(root=str(ROOT), tmp=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(o.strip().endswith("OK") for o in outs), \
        outs[0][-3000:] + outs[1][-3000:]


def test_stolen_compares_the_wait_for_a_cpu_during_a_save_with_the_time_since():
    from trainer.checkpoint import stolen
    # during the save (0 -> 2 s) the training thread waited 1 s for a CPU; since (2 -> 4 s), 0.2 s
    assert stolen((0.0, 0.0, 2.0, 1.0), 4.0, 1.2) == pytest.approx(0.5 - 0.1)
    assert stolen((0.0, 0.0, 2.0, 0.2), 4.0, 0.4) == pytest.approx(0.0)  # neighbours alike before and after
    assert stolen((0.0, 0.0, 2.0, 1.0), 2.1, 1.0) is None  # too little time since to tell


def test_background_saves_that_make_training_wait_give_the_write_back_to_the_loop(monkeypatch, tmp_path):
    from trainer import checkpoint
    logs: list[str] = []
    ck = checkpoint.Checkpointer(tmp_path, 2, 0, 1, async_save=True, background=False, log=logs.append)
    ck.background = True  # as if a writer process ran (no process group in this test)
    monkeypatch.setattr(checkpoint, "_run_delay", lambda tid: 1.0)  # no wait for a CPU since the save ended
    hurt, fine = (0.0, 0.0, 2.0, 1.0), (0.0, 0.98, 2.0, 1.0)  # the save made it wait half the time / 1%
    for probe, background in ((hurt, True), (fine, True), (hurt, True), (hurt, False)):
        ck._last_probe = probe
        ck._choose_path()
        assert ck.background is background
    assert len(logs) == 2 and "loop waits from now on" in logs[1]  # after the choice at start
    for _ in range(checkpoint.RETRY - 1):
        ck._choose_path()
        assert not ck.background
    ck._choose_path()  # and after RETRY saves in the loop, the background is tried again
    assert ck.background and ck._strikes == 0


FULL_DISK = r"""
import errno, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from pathlib import Path
from torch.distributed.checkpoint.api import CheckpointException
from herdsman.config import TrainerConfig
from trainer import checkpoint
from trainer.checkpoint import Checkpointer, CheckpointError
from trainer.train import _storage_failure, build_model
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
model = build_model(TrainerConfig(model="tiny"), torch.device("cpu"))
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
def full(*args, **kwargs):  # what DCP raises when a rank's write hits a full file system
    raise CheckpointException("save failed", {{0: (OSError(errno.ENOSPC, "No space left on device"), None)}})
checkpoint.dcp_write = full
for async_save in (False, True):  # the synchronous path, and the async one that writes in the loop (no free core)
    ck = Checkpointer(Path({tmp!r}) / str(async_save), 2, 0, 1, async_save=async_save, background=False,
                      log=lambda m: None)
    try:
        ck.save(4, model, optim, {{"step": 4}})
        raise SystemExit("the save did not fail")
    except CheckpointError as e:
        assert e.step == 4 and "step 4" in str(e) and _storage_failure(e), e
    ck.close()
print("ok")
"""


def test_a_save_in_the_loop_that_hits_a_full_disk_is_a_checkpoint_error_the_trainer_skips(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", FULL_DISK.format(root=str(ROOT), tmp=str(tmp_path), port=free_port())],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]

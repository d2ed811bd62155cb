import json
import shutil

import pytest

from trainer import faults
from trainer.checkpoint import MANIFEST, CheckpointError, committed, latest_valid, verify
from tests.trainer_runs import launch, losses, write_config

STEPS, EVERY, WORLD = 14, 4, 2


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    cfg = write_config(d / "h.toml", d / "run", steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=3)
    runs = launch(cfg, WORLD, 0, d / "stats")
    assert [r.returncode for r in runs] == [0] * WORLD, runs[0].stdout
    return d


def test_interrupted_run_resumes_on_the_same_loss_curve(uninterrupted, tmp_path):
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=3)
    faults.request(tmp_path / "ctl", 1, "exception", "boom", at_step=11)
    first = launch(cfg, WORLD, 0, tmp_path / "stats", tmp_path / "ctl")
    assert all(r.returncode != 0 for r in first)
    assert "InjectedFault: boom" in first[1].stdout
    ckpts = tmp_path / "run" / "checkpoints" / "t"
    assert [p.name for p in committed(ckpts)] == ["step-00000008", "step-00000004"]
    assert losses(tmp_path / "stats") == {s: l for s, l in losses(uninterrupted / "stats").items() if s <= 10}

    second = launch(cfg, WORLD, 1, tmp_path / "stats", tmp_path / "ctl")
    assert [r.returncode for r in second] == [0] * WORLD, second[0].stdout
    assert "resumed from" in second[0].stdout and "step-00000008 (memory, " in second[0].stdout
    want, got = losses(uninterrupted / "stats"), losses(tmp_path / "stats")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"
    # rank 1 agrees too (the loss is all-reduced)
    assert losses(tmp_path / "stats", rank=1) == got


def test_retention_and_manifest(uninterrupted):
    ckpts = committed(uninterrupted / "run" / "checkpoints" / "t")
    assert [p.name for p in ckpts] == ["step-00000014", "step-00000012", "step-00000008"]
    info = verify(ckpts[0])
    assert (info.step, info.world_size) == (14, WORLD)
    m = json.loads((ckpts[0] / MANIFEST).read_text())
    assert ".metadata" in m["files"] and sum(n.endswith(".distcp") for n in m["files"]) == WORLD


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "__0_0.distcp").write_bytes(b"x" + (p / "__0_0.distcp").read_bytes()[1:]), "CRC32"),
    (lambda p: (p / "__1_0.distcp").unlink(), "__1_0.distcp is missing"),
    (lambda p: (p / MANIFEST).write_text((p / MANIFEST).read_text()[:40]), "corrupt manifest"),
    (lambda p: (p / MANIFEST).unlink(), "never committed"),
    (lambda p: (p / ".metadata").write_bytes(b""), "has 0 bytes"),
])
def test_damaged_checkpoint_is_skipped_with_a_clear_message(uninterrupted, tmp_path, damage, message):
    root = tmp_path / "ckpts"
    shutil.copytree(uninterrupted / "run" / "checkpoints" / "t", root)
    damage(root / "step-00000014")
    with pytest.raises(CheckpointError, match=message):
        verify(root / "step-00000014")
    warnings = []
    info = latest_valid(root, warn=warnings.append)
    assert info is not None and info.step == 12
    assert len(warnings) == 1 and message.split()[0] in warnings[0]


def test_uncommitted_directory_is_never_loaded(uninterrupted, tmp_path):
    root = tmp_path / "ckpts"
    shutil.copytree(uninterrupted / "run" / "checkpoints" / "t", root)
    (root / "step-00000014").rename(root / "step-00000016.tmp")
    assert latest_valid(root, warn=lambda m: None).step == 12


def test_resume_required_refuses_to_train_from_scratch(tmp_path):
    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=3)
    runs = launch(cfg, WORLD, 0, tmp_path / "stats", extra_env={"HERDSMAN_RESUME": "required"})
    assert all(r.returncode != 0 for r in runs)
    assert "no usable checkpoint" in runs[0].stdout and "refusing to train from scratch" in runs[0].stdout
    assert losses(tmp_path / "stats") == {}


def test_a_rank_dies_with_its_parent(tmp_path):
    """A rank orphaned by its launcher's death exits instead of training on beside its replacement."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.trainer_runs import ROOT, free_port

    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=100000)
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "HERDSMAN_STATS_DIR": str(tmp_path / "stats")}
    launcher = (f"import os, subprocess, sys, time\n"
                f"p = subprocess.Popen([sys.executable, '-m', 'trainer.train', '--config', {str(cfg)!r}],"
                f" env={{**os.environ, **{env!r}}}, start_new_session=True)\n"
                f"print(p.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(parent.stdout.readline())
    deadline = time.time() + 60
    while not list((tmp_path / "stats").glob("*.jsonl")) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the orphaned rank kept running")


def test_a_save_lost_to_a_full_disk_is_skipped_and_any_other_failure_is_not():
    import errno
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from trainer.train import _storage_failure

    def wrapped(e):  # how DCP gathers each rank's error
        return (e, traceback.extract_stack())

    full = CheckpointException("save failed", {0: wrapped(OSError(errno.ENOSPC, "No space left on device")),
                                               1: wrapped(OSError(errno.ENOSPC, "No space left on device"))})
    assert _storage_failure(full)
    ours = CheckpointError("checkpoint save of step 25 failed")
    ours.__cause__ = full
    assert _storage_failure(ours)
    assert _storage_failure(CheckpointError(f"checkpoint save of step 5 failed: CheckpointException: {full}"))
    assert _storage_failure(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert _storage_failure(OSError(errno.EROFS, "Read-only file system"))
    assert not _storage_failure(CheckpointError("checkpoint save of step 5 failed: RuntimeError: CUDA error"))
    assert not _storage_failure(CheckpointException("save failed", {1: wrapped(ValueError("shapes differ"))}))
    assert not _storage_failure(OSError(errno.EIO, "Input/output error"))  # a failing disk is not a full one


def test_a_short_write_on_a_full_disk_is_a_storage_failure_though_its_errno_is_lost(tmp_path, monkeypatch):
    """torch's zip writer reports a short write on a full tmpfs as "unexpected pos" (seen in the chaos e2e run):
    it is a storage failure when the file system cannot hold another checkpoint the size of the newest."""
    import collections
    import shutil

    from trainer.train import _storage_failure

    newest = tmp_path / "step-00000080"
    newest.mkdir()
    (newest / "__0_0.distcp").write_bytes(b"x" * 4096)
    short = CheckpointError("checkpoint save of step 85 failed: RuntimeError: [enforce fail at "
                            "inline_container.cc:672] . unexpected pos 704 vs 598")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 20, (1 << 20) - 1000, 1000))
    assert _storage_failure(short, tmp_path)
    assert not _storage_failure(short)  # no checkpoint root to look at: only the errno counts
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 0, 1 << 30))
    assert not _storage_failure(short, tmp_path)  # room enough: something else broke the save


@pytest.mark.slow  # tens of seconds of real ranks: out of the quick loop, in `make test`
def test_a_rank_that_saw_its_peer_die_rejoins_in_its_own_process_on_the_same_loss_curve(uninterrupted, tmp_path):
    """In-process restart without the controller: rank 1 is killed at step 11; rank 0 keeps its process, waits for
    an order to rejoin, re-forms the group with a fresh rank 1 and restores from the memory tier."""
    import os
    import subprocess
    import sys
    import time

    from tests.trainer_runs import ROOT, free_port, start
    from trainer import control

    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=3)
    ctl, stats = tmp_path / "ctl", tmp_path / "stats"
    faults.request(ctl, 1, "sigkill", at_step=11)
    procs = start(cfg, WORLD, 0, stats, ctl, extra_env={"HERDSMAN_INPROCESS": "1"})
    assert procs[1].wait(timeout=120) == -9
    time.sleep(0.5)
    assert procs[0].poll() is None  # a witness of its peer's death: it waits to rejoin
    assert control.failed_at(ctl, 0, 0) and control.failed_at(ctl, 0, 1) is None  # ... and its rank actor can tell

    port = str(free_port())
    env = {"HERDSMAN_ATTEMPT": "1", "MASTER_PORT": port}
    control.write_order(ctl, 0, 1, env, str(tmp_path / "rank0-attempt1.log"))
    fresh = subprocess.Popen([sys.executable, "-m", "trainer.train", "--config", str(cfg)], cwd=ROOT,
                             env={**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "HERDSMAN_ATTEMPT": "1",
                                  "HERDSMAN_HOST": "local", "HERDSMAN_STATS_DIR": str(stats),
                                  "HERDSMAN_CONTROL_DIR": str(ctl), "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = fresh.communicate(timeout=120)
    assert fresh.returncode == 0, out[-3000:]
    first, _ = procs[0].communicate(timeout=60)
    assert procs[0].returncode == 0, first[-3000:]
    assert "a peer failed: keeping this process" in first and "rejoining in attempt 1" in first
    log = (tmp_path / "rank0-attempt1.log").read_text()  # the kept rank writes the new attempt's log
    assert "resumed from" in log and "step-00000008 (memory, " in log, log[-3000:]

    def started(attempt):
        recs = [json.loads(x) for x in (stats / f"rank00000-attempt{attempt:04d}.jsonl").read_text().splitlines()]
        return next(r for r in recs if r["kind"] == "event" and r["phase"] == "started")
    assert started(0)["pid"] == started(1)["pid"] == procs[0].pid and "kept" in started(1)["message"]
    want, got = losses(uninterrupted / "stats"), losses(stats)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in got), [(s, got[s], want[s]) for s in got if got[s] != want[s]]


def test_a_rank_whose_own_code_failed_does_not_wait_to_rejoin(tmp_path):
    """It exits (gloo cannot release its peers short of closing its sockets); the witness waits, says so to its
    rank actor, and gives up after rejoin_wait_s."""
    from trainer import control

    cfg = write_config(tmp_path / "h.toml", tmp_path / "run", steps=6, checkpoint_every=3, rejoin_wait_s=2.0)
    faults.request(tmp_path / "ctl", 1, "exception", "boom", at_step=2)
    runs = launch(cfg, WORLD, 0, tmp_path / "stats", tmp_path / "ctl", extra_env={"HERDSMAN_INPROCESS": "1"},
                  timeout=120)
    assert runs[1].returncode == 1 and "keeping this process" not in runs[1].stdout
    assert control.failed_at(tmp_path / "ctl", 1, 0) is None and control.failed_at(tmp_path / "ctl", 0, 0)
    assert "keeping this process" in runs[0].stdout  # the witness waited (rejoin_wait_s), then gave up
    assert "no order to rejoin came: exiting" in runs[0].stdout and runs[0].returncode == 1


def test_a_rank_exits_without_waiting_for_the_interpreters_teardown():
    """exit_now skips teardown: a failed rank's gloo peers are released when its sockets close, so its exit must
    not wait on torch's C++ destructors (0.6 s measured) or on anything left running, as this thread."""
    import subprocess
    import sys

    from tests.trainer_runs import ROOT

    code = ("import threading, time\nfrom trainer.train import exit_now\n"
            "threading.Thread(target=time.sleep, args=(600,)).start()\nprint('leaving', flush=True)\nexit_now(3)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and r.stdout == "leaving\n", r.stderr[-2000:]


def test_a_standby_becomes_the_rank_it_is_given_and_exits_with_its_code(tmp_path):
    """The warm standby (trainer/warm.py) takes the attempt's environment and log file from one line on stdin and
    ends with the trainer's own exit code (2: a configuration the trainer refuses)."""
    import json as json_
    import subprocess
    import sys

    from tests.trainer_runs import ROOT

    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer]\nsteps = 'many'\n")
    log = tmp_path / "logs" / "rank0.log"
    standby = subprocess.Popen([sys.executable, "-m", "trainer.warm"], cwd=ROOT, stdin=subprocess.PIPE, text=True)
    spec = {"env": {"RANK": "0", "WORLD_SIZE": "1"}, "log": str(log), "argv": ["--config", str(bad)]}
    standby.communicate(json_.dumps(spec) + "\n", timeout=120)
    assert standby.returncode == 2
    assert "trainer: error:" in log.read_text() and "steps" in log.read_text()
    idle = subprocess.run([sys.executable, "-m", "trainer.warm"], cwd=ROOT, input="", timeout=120)
    assert idle.returncode == 0  # its parent went away before it was needed


def test_a_rank_connects_to_the_store_once_its_server_listens():
    """Ranks other than 0 wait for rank 0's store server with bare connections (TCPStore's own retry waits out a
    back-off: see await_listener); nothing listening is reported after the timeout."""
    import socket
    import threading
    import time

    from tests.trainer_runs import free_port
    from trainer.train import await_listener

    port = free_port()
    assert await_listener("127.0.0.1", port, 0.2) is False
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_later():
        time.sleep(0.3)
        server.bind(("127.0.0.1", port))
        server.listen()

    threading.Thread(target=listen_later).start()
    try:
        assert await_listener("127.0.0.1", port, 60) is True
    finally:
        server.close()

"""The contract of a trainer of your own: the environment Herdsman gives each rank, and what Reporter writes."""

import os

from herdsman import layout
from herdsman.contract import Reporter, checkpoint_dir, resume_required
from orchestrator.ledger import JobLedger


def test_a_rank_gets_its_job_s_paths_and_the_flight_recorder(tmp_path):
    env = layout.rank_env(tmp_path, "host-2", "byo", 3, fr_buffer_size=500)
    assert env[layout.ENV_CHECKPOINT_DIR] == str(layout.checkpoint_dir(tmp_path, "byo"))
    assert env[layout.ENV_STATS_DIR] == str(layout.stats_dir(tmp_path, "host-2", "byo"))
    assert env[layout.ENV_ATTEMPT] == "3" and env["TORCH_FR_BUFFER_SIZE"] == "500"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_DUMP_TEMP_FILE"].startswith(str(layout.flight_recorder_dir(tmp_path, "host-2", "byo")))


def test_reporter_writes_what_the_controller_folds(tmp_path, monkeypatch):
    for k, v in layout.rank_env(tmp_path, "host-1", "byo", 1).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(layout.ENV_RESUME, layout.RESUME_REQUIRED)
    assert checkpoint_dir() == layout.checkpoint_dir(tmp_path, "byo") and resume_required()
    r = Reporter()
    r.restored(10)
    for s in (11, 12):
        r.step(s, 1.5, 0.25)
    r.checkpoint(12)
    r.finished(12)
    led = JobLedger("byo", 0.0, attempt=1)
    for path in layout.rank0_streams(tmp_path, "byo"):
        led.fold_stream(path)
    assert led.step_now == 12 and led.resumed_at[1][1] == 10 and 12 in led.ckpt_at and led.productive_s == 0.5
    assert led.progressed(1)


def test_outside_herdsman_the_reporter_does_nothing(tmp_path, monkeypatch):
    for k in (layout.ENV_STATS_DIR, layout.ENV_CHECKPOINT_DIR, layout.ENV_RESUME):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    r = Reporter()
    r.step(1, 1.0, 0.1)
    assert checkpoint_dir("mine") == __import__("pathlib").Path("mine") and not resume_required()
    assert os.listdir(tmp_path) == []

"""Bad input gives one clear line on stderr (exit 2), never a traceback, and loses no stored data."""

import subprocess
import sys

import pytest

from herdsman.events import Interruption, Verdict
from herdsman.taxonomy import RootCause
from orchestrator.store import Store


def herdsman(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def one_error_line(r, text):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("herdsman: error:") and text in lines[0], r.stderr


def test_help_lists_the_commands():
    r = herdsman("--help")
    assert r.returncode == 0
    for cmd in ("demo", "run", "report", "config", "checkpoint"):
        assert cmd in r.stdout


def test_unknown_config_key(tmp_path):
    (tmp_path / "h.toml").write_text("[trainer]\nlearning_rate = 1\n")
    one_error_line(herdsman("config", "--config", str(tmp_path / "h.toml")), "unknown config key 'trainer.learning_rate'")


def test_unreachable_ray_address(tmp_path):
    (tmp_path / "h.toml").write_text(f'run_dir = "{tmp_path}"\n[cluster]\naddress = "127.0.0.1:1"\n')
    one_error_line(herdsman("run", "--config", str(tmp_path / "h.toml")), "cannot reach the Ray cluster at 127.0.0.1:1")


@pytest.mark.parametrize("make", ["missing", "empty", "corrupt"])
def test_missing_or_corrupt_checkpoint_directory(tmp_path, make):
    p = tmp_path / "ckpts"
    if make != "missing":
        p.mkdir()
    if make == "corrupt":
        (p / "step-00000005").mkdir()
        (p / "step-00000005" / "herdsman.json").write_text("{not json")
    r = herdsman("checkpoint", "verify", str(p))
    msg = {"missing": "does not exist", "empty": "no committed checkpoints", "corrupt": "failed verification"}[make]
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout and msg in r.stderr
    if make == "corrupt":
        assert "corrupt manifest" in r.stdout


def test_report_reads_without_changing_the_store(tmp_path):
    db = tmp_path / "h.db"
    s = Store(f"sqlite:///{db}")
    s.upsert_job("j", state="finished", target_step=10, last_step=10, productive_s=8.0, ended_at=None)
    s.record_interruption(Interruption("j", 0, Verdict(RootCause.FAULTY_GPU, 0.95, ("h2",)), 1.0, 2.0, 3.0, 4.0,
                                       last_step=7, resumed_step=5, lost_work_s=0.5))
    s.close()  # its write-ahead log goes into the database file
    before = db.read_bytes()
    r = herdsman("report", "--db", f"sqlite:///{db}")
    assert r.returncode == 0, r.stderr
    assert "Faulty GPU" in r.stdout and "faulty_gpu" in r.stdout and "ETTR" in r.stdout
    assert db.read_bytes() == before
    one_error_line(herdsman("report", "--db", f"sqlite:///{db}", "--job", "nope"), "no job named 'nope'")
    one_error_line(herdsman("report", "--db", f"sqlite:///{tmp_path / 'none.db'}"), "no Herdsman database")

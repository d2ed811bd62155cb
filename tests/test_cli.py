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


def test_status_of_a_job_without_its_controller_gives_ettr_hosts_and_last_verdict(tmp_path):
    """What `herdsman status JOB` prints from the store once no controller runs the job."""
    from herdsman.events import HostState, HostStatus, Interruption, Verdict
    from herdsman.taxonomy import Action, RootCause
    from orchestrator.cli_jobs import stored_line
    from orchestrator.store import Store

    s = Store(f"sqlite:///{tmp_path / 'h.db'}")
    s.upsert_job("j", state="finished", target_step=60, last_step=60, started_at=0.0, ended_at=100.0,
                 productive_s=80.0, attempt=1)
    v = Verdict(RootCause.FAULTY_GPU, 0.95, ("host-2",), (1,), ("Xid 79",), Action.EVICT, "hw")
    s.record_interruption(Interruption("j", 0, v, failed_at=10.0, detected_at=11.0, last_step=20))
    for h, state in (("host-1", HostState.HEALTHY), ("host-2", HostState.QUARANTINED), ("host-3", HostState.SPARE)):
        s.set_host_state(HostStatus(h, state, 1.0, ""))
    line = stored_line(s, "j")
    assert line.startswith("j: finished (no controller running"), line
    assert "step 60/60, attempt 1" in line and "ETTR 80.0%" in line, line
    assert "hosts 2 in service, quarantined host-2" in line and line.endswith("last verdict faulty_gpu"), line


def test_a_new_job_under_an_ended_name_gets_none_of_its_files(tmp_path):
    """`submit --new`: the ended job's checkpoints and every host's streams move under the archived name."""
    from herdsman import layout
    from orchestrator.job import archive_files

    run = tmp_path / "run"
    ckpt = layout.checkpoint_dir(run, "j") / "step-00000060"
    ckpt.mkdir(parents=True)
    for h in ("host-1", "host-2"):
        layout.stats_dir(run, h, "j").mkdir(parents=True)
        (layout.stats_dir(run, h, "j") / "rank00000-attempt0000.jsonl").write_text("{}\n")
    layout.stats_dir(run, "host-1", "other").mkdir(parents=True)  # another job's files stay
    moved = archive_files(run, "j", "j@20261130-000000")
    assert len(moved) == 3 and not layout.checkpoint_dir(run, "j").exists()
    assert (layout.checkpoint_dir(run, "j@20261130-000000") / "step-00000060").is_dir()
    assert not list(run.glob("nodes/*/jobs/j")) and len(list(run.glob("nodes/*/jobs/j@20261130-000000"))) == 2
    assert layout.stats_dir(run, "host-1", "other").is_dir()

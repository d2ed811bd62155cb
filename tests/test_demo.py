"""`herdsman demo` runs the whole loop, ends with the report and leaves no process behind."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def processes_mentioning(text):
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def test_demo_end_to_end(tmp_path):
    run_dir = tmp_path / "demo-run"
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", "--run-dir", str(run_dir), "--steps", "40"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "fault 1: Xid 79" in out and "fault 2: a Python exception" in out
    assert "verdict faulty_gpu (0.95)" in out and "verdict software_bug" in out
    assert "Faulty GPU" in out and "Software Bug" in out and "Effective training time (ETTR)" in out
    assert "finished, step 40/40" in out
    page = next(run_dir.glob("postmortem-*.html")).read_text()
    assert "faulty_gpu.md" in page and "software_bug.md" in page and page.count("data:image/png;base64,") == 2
    assert processes_mentioning(str(run_dir)) == []

"""`herdsman diagnose` on a realistic evidence file per Table 5 category (tests/fixtures/diagnose/<cause>.log)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from herdsman.taxonomy import RootCause

FIXTURES = Path(__file__).parent / "fixtures" / "diagnose"

# cause -> the hosts the verdict must blame (None: any)
BLAMED = {
    "faulty_gpu": ["node-17"], "gpu_hbm3_memory": ["node-09"], "software_bug": ["unknown-host"],
    "network_switch_cable": ["node-21", "node-22", "node-23"], "host_maintenance": ["node-30"],
    "gpu_sram_memory": ["node-11"], "gpu_system_processor": ["node-12"], "nic": ["node-40"],
    "nccl_watchdog_timeout": None, "silent_data_corruption": ["node-50"],
    "gpu_thermal_interface_sensor": ["node-61"], "ssd": ["node-70"], "power_supply": ["node-81"],
    "server_chassis": ["node-82"], "io_expansion_board": ["node-83"], "dependency": None, "cpu": ["node-84"],
    "system_memory": ["node-85"], "unknown": ["node-90"],
}


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "diagnose", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_a_fixture_for_every_category():
    assert {p.stem for p in FIXTURES.glob("*.log")} == {c.value for c in RootCause} == set(BLAMED)


@pytest.mark.parametrize("cause", sorted(BLAMED))
def test_each_category_is_classified_with_its_evidence(cause):
    r = run("--json", str(FIXTURES / f"{cause}.log"))
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()  # exactly one JSON object
    v = json.loads(line)
    assert set(v) == {"category", "confidence", "hosts", "ranks", "evidence", "reason", "alternatives"}
    assert v["category"] == cause, v
    assert 0 <= v["confidence"] <= 1 and v["evidence"]
    if BLAMED[cause] is not None:
        assert v["hosts"] == BLAMED[cause], v


def test_ranks_are_blamed_from_prefixes():
    v = json.loads(run("--json", str(FIXTURES / "faulty_gpu.log")).stdout)
    assert v["ranks"] == [136]
    v = json.loads(run("--json", str(FIXTURES / "software_bug.log")).stdout)
    assert v["ranks"] == [3] and "KeyError: 'doc_ids'" in v["evidence"][0]


def test_reads_standard_input_and_mixes_files():
    text = (FIXTURES / "gpu_system_processor.log").read_text()
    v = json.loads(run("--json", stdin=text).stdout)
    assert v["category"] == "gpu_system_processor"
    # the GSP fault and an unrelated software traceback elsewhere: hardware on the failing host decides
    v = json.loads(run("--json", str(FIXTURES / "gpu_system_processor.log"), str(FIXTURES / "software_bug.log")).stdout)
    assert v["category"] == "gpu_system_processor"


def test_human_output_names_action_and_runbook():
    r = run(str(FIXTURES / "dependency.log"))
    assert r.returncode == 0 and r.stdout.startswith("dependency (Dependency, Dependency)")
    assert "action: stop (pages)" in r.stdout and "runbooks/dependency.md" in r.stdout


def test_missing_file_is_one_clear_error():
    r = run("/no/such/file.log")
    assert r.returncode == 2 and r.stderr.strip() == "herdsman: error: cannot read /no/such/file.log: No such file or directory"

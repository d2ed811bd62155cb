"""`herdsman diagnose` on a realistic evidence file per Table 5 category (tests/fixtures/diagnose/<cause>.log)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herdsman.taxonomy import RootCause
from tests.test_evidence import mutated_excerpts

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


# --- fuzzing the command itself, in process ------------------------------------------------------------------------

CAUSES = {c.value for c in RootCause}
HUMAN_HEAD = re.compile(r"([a-z0-9_]+) \([^()\n]+, [^()\n]+\) confidence [01]\.\d\d")


@st.composite
def evidence_files(draw) -> bytes:
    """Random bytes, or a damaged real log (tests/test_evidence.py), sometimes not valid UTF-8."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=4096))
    data = draw(mutated_excerpts()).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):  # a few bytes overwritten: broken UTF-8 and control bytes
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = bytes(data)
    return data


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=evidence_files(), as_json=st.booleans(), where=st.sampled_from(["file"] * 8 + ["missing", "directory"]))
def test_diagnose_on_any_input_is_one_verdict_or_one_error_never_a_traceback(tmp_path, data, as_json, where):
    from click.testing import CliRunner

    from orchestrator.cli import main

    path = {"file": tmp_path / "evidence.log", "missing": tmp_path / "missing.log", "directory": tmp_path}[where]
    (tmp_path / "evidence.log").write_bytes(data)
    r = CliRunner().invoke(main, ["diagnose", *(["--json"] if as_json else []), str(path)])
    assert r.exit_code in (0, 2), (r.exit_code, r.output[-3000:])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.stderr  # (stdout may quote one: evidence lines come from the input)
    if r.exit_code == 2:  # one clear error line, nothing on stdout
        assert where != "file" and r.stdout == ""
        assert r.stderr.startswith(f"herdsman: error: cannot read {path}: ") and r.stderr.count("\n") == 1
        return
    assert where == "file" and r.stderr == ""
    if as_json:  # exactly one JSON object
        assert r.stdout.count("\n") == 1
        v = json.loads(r.stdout)
        assert v["category"] in CAUSES and 0.0 <= v["confidence"] <= 1.0
    else:  # one verdict: its head line, then its hosts, action and reasons
        # control characters of the input (\r, \v, \x1b, \x85...) are escaped: they cannot rewrite the terminal
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", r.stdout), repr(r.stdout[-3000:])
        head, *rest = r.stdout.removesuffix("\n").split("\n")
        m = HUMAN_HEAD.fullmatch(head)
        assert m and m[1] in CAUSES, head
        assert rest[0].startswith("  hosts: ") and rest[1].startswith("  action: ") and rest[2].startswith("  why: ")
        assert all(line.startswith(("  evidence: ", "  also considered: ")) for line in rest[3:]), rest


def test_a_hostile_line_cannot_rewrite_the_operators_terminal(tmp_path):
    """An Xid line carrying a carriage return and an ANSI 'clear screen' is shown with both escaped."""
    from click.testing import CliRunner

    from orchestrator.cli import main

    log = tmp_path / "kern.log"
    log.write_bytes(b"NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus.\r\x1b[2Jall is well\n")
    r = CliRunner().invoke(main, ["diagnose", str(log)])
    assert r.exit_code == 0 and r.stdout.startswith("faulty_gpu"), r.stdout
    assert "\x1b" not in r.stdout and "\r" not in r.stdout and "\\x1b[2J" in r.stdout, repr(r.stdout)


def test_a_reader_that_goes_away_ends_it_quietly():
    """`herdsman diagnose log | head -1`: once the pipe's reader is gone, no traceback, the status SIGPIPE gives."""
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "diagnose", str(FIXTURES / "ssd.log")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before it writes a line: its first write finds no reader
    err = p.stderr.read().decode()
    assert p.wait(60) == 141 and "Traceback" not in err, err

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.host import HostMonitor, KernelLog, load_rules, match_line
from herdsman.config import ConfigError
from herdsman.events import EvidenceKind, Severity
from tests.bounds import bounded

FIXTURES = Path(__file__).parent / "fixtures"
RULES = load_rules()

# each recorded line of tests/fixtures/kernel.log -> (rule, kind, cause, severity, code)
EXPECTED = [
    ("NvidiaXid", EvidenceKind.GPU_XID, "faulty_gpu", Severity.CRITICAL, 79),
    ("GpuFellOffTheBus", EvidenceKind.GPU_LOST, "faulty_gpu", Severity.CRITICAL, None),
    ("NvidiaXid", EvidenceKind.GPU_XID, "gpu_hbm3_memory", Severity.CRITICAL, 48),
    ("PowerSupplyFault", EvidenceKind.HOST_LOG, "power_supply", Severity.CRITICAL, None),
    ("EdacUncorrectable", EvidenceKind.HOST_LOG, "system_memory", Severity.CRITICAL, None),
    ("EdacCorrectable", EvidenceKind.HOST_LOG, "system_memory", Severity.WARNING, None),
    ("EdacUncorrectable", EvidenceKind.HOST_LOG, "system_memory", Severity.CRITICAL, None),
    ("MceStatus", EvidenceKind.HOST_LOG, "cpu", Severity.CRITICAL, None),
    ("PcieAerUncorrected", EvidenceKind.HOST_LOG, "io_expansion_board", Severity.CRITICAL, None),
    ("PcieAerCorrected", EvidenceKind.HOST_LOG, "io_expansion_board", Severity.WARNING, None),
    ("NvmeFault", EvidenceKind.HOST_LOG, "ssd", Severity.CRITICAL, None),
    ("BlockIoError", EvidenceKind.HOST_LOG, "ssd", Severity.CRITICAL, None),
    ("FilesystemError", EvidenceKind.HOST_LOG, "ssd", Severity.WARNING, None),
    ("NicLinkDown", EvidenceKind.HOST_LOG, "nic", Severity.WARNING, None),
    ("InfinibandPortDown", EvidenceKind.HOST_LOG, "nic", Severity.WARNING, None),
    ("CpuThermalThrottle", EvidenceKind.HOST_LOG, "", Severity.WARNING, None),
    ("OomKill", EvidenceKind.HOST_LOG, "", Severity.WARNING, None),
    (None, None, None, None, None),  # an ordinary line raises nothing
]


@pytest.mark.parametrize("line, expected", list(zip((FIXTURES / "kernel.log").read_text().splitlines(), EXPECTED)))
def test_each_kernel_rule_on_a_recorded_line(line, expected):
    reason, kind, cause, severity, code = expected
    ev = match_line(RULES, "h1", line, 1.0)
    if reason is None:
        assert ev is None
        return
    assert ev is not None and ev.attrs["reason"] == reason, ev
    assert (ev.kind, ev.severity, ev.code) == (kind, severity, code)
    if cause is not None:
        assert ev.attrs["cause"] == cause


def test_the_agent_uses_the_shared_rules():
    from evidence.rules import default
    assert RULES is default() and {e[0] for e in EXPECTED if e[0]} <= set(RULES.by_id)


def test_kernel_log_file_is_read_incrementally_and_survives_rotation(tmp_path):
    log = tmp_path / "kern.log"
    log.write_text("old line\n")
    k = KernelLog(str(log))  # starts at the end: old lines are not replayed
    assert k.read_new() == []
    with open(log, "a") as f:
        f.write("new 1\npartial")
    assert k.read_new() == ["new 1"]
    with open(log, "a") as f:
        f.write(" line\n")
    assert k.read_new() == ["partial line"]
    log.write_text("after rotation\n")
    assert k.read_new() == ["after rotation"]


def test_missing_sources_degrade_cleanly(tmp_path):
    m = HostMonitor("h1", kernel_log=str(tmp_path / "no-such-log"), sys_root=str(tmp_path / "no-sys"),
                    disk_paths=(str(tmp_path / "no-disk"),))
    assert m.cycle() == []
    assert not m.snapshot.kernel_log_available and m.snapshot.nics == {} and m.snapshot.ib_ports == {}


def make_sys(root: Path, nic_state="up", ib_state="4: ACTIVE", link_downed=0, carrier_changes=2):
    nic = root / "class" / "net" / "ens1f0np0"
    (nic / "statistics").mkdir(parents=True, exist_ok=True)
    (nic / "device").mkdir(exist_ok=True)
    (nic / "operstate").write_text(nic_state + "\n")
    (nic / "carrier_changes").write_text(f"{carrier_changes}\n")
    for c in ("rx_errors", "tx_errors", "rx_dropped", "tx_dropped"):
        (nic / "statistics" / c).write_text("0\n")
    lo = root / "class" / "net" / "lo"  # virtual: ignored
    lo.mkdir(parents=True, exist_ok=True)
    (lo / "operstate").write_text("unknown\n")
    port = root / "class" / "infiniband" / "mlx5_0" / "ports" / "1"
    (port / "counters").mkdir(parents=True, exist_ok=True)
    (port / "state").write_text(ib_state + "\n")
    (port / "phys_state").write_text("5: LinkUp\n")
    (port / "counters" / "link_downed").write_text(f"{link_downed}\n")
    (port / "counters" / "symbol_error").write_text("0\n")


def test_nic_and_infiniband_conditions_and_counters(tmp_path):
    make_sys(tmp_path)
    m = HostMonitor("h1", kernel_log="", sys_root=str(tmp_path))
    assert m.cycle() == []
    assert m.snapshot.nics["ens1f0np0"]["up"] and "lo" not in m.snapshot.nics
    assert m.snapshot.ib_ports["mlx5_0/1"]["active"]

    make_sys(tmp_path, nic_state="down", ib_state="1: DOWN", link_downed=3, carrier_changes=3)
    reasons = {e.attrs["reason"]: e for e in m.cycle()}
    assert set(reasons) == {"NicDown", "IbPortDown", "InfinibandErrors", "NicFlap"}
    assert reasons["InfinibandErrors"].attrs["delta"] == 3 and reasons["NicDown"].attrs["cause"] == "nic"
    assert m.cycle() == []  # a condition is reported once, while it lasts

    make_sys(tmp_path, link_downed=3, carrier_changes=4)
    cleared = m.cycle()
    assert {e.attrs.get("condition") for e in cleared if e.attrs.get("cleared")} == {
        "NicDown:ens1f0np0", "IbPortDown:mlx5_0/1"}


def test_disk_pressure_condition(tmp_path):
    m = HostMonitor("h1", kernel_log="", sys_root=str(tmp_path), disk_paths=(str(tmp_path),), min_free_ratio=1.01)
    (ev,) = m.cycle()
    assert ev.attrs["reason"] == "DiskPressure" and m.snapshot.disks[str(tmp_path)]["total"] > 0


def test_bad_rules_file_is_a_clear_error(tmp_path):
    p = tmp_path / "rules.toml"
    p.write_text('[[rule]]\nid = "X"\npattern = "("\n')
    with pytest.raises(ConfigError, match="rule X: pattern is not RE2"):
        load_rules(p)
    p.write_text('[[rule]]\nid = "X"\npattern = "(a)\\\\1"\n')  # a backreference: not linear, refused
    with pytest.raises(ConfigError, match="not RE2"):
        load_rules(p)
    p.write_text('[[rule]]\nid = "X"\npattern = "x"\ncause = "gremlins"\n')
    with pytest.raises(ConfigError, match="unknown cause"):
        load_rules(p)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.text(max_size=300))
def test_no_kernel_line_crashes_the_rules(line):
    with bounded("kernel-log line", seconds=1.0, mib=16):
        match_line(RULES, "h1", line, 1.0)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=2000))
def test_no_malformed_sysfs_or_log_crashes_the_monitor(tmp_path_factory, counter, state, log_bytes):
    root = tmp_path_factory.mktemp("sys")
    make_sys(root)
    port = root / "class" / "infiniband" / "mlx5_0" / "ports" / "1"
    (port / "counters" / "link_downed").write_bytes(counter)
    (port / "state").write_bytes(state)
    (root / "class" / "net" / "ens1f0np0" / "carrier_changes").write_bytes(counter)
    log = root / "kern.log"
    log.write_bytes(b"")
    m = HostMonitor("h1", kernel_log=str(log), sys_root=str(root), disk_paths=(str(root),))
    m.cycle()
    with open(log, "ab") as f:
        f.write(log_bytes + b"\n")
    with bounded("kernel-log tailer and sysfs", seconds=2.0, mib=64):  # a cycle reads up to 4 MiB of log
        m.cycle()


def test_io_errors_on_the_checkpoint_disk_say_so(tmp_path):
    import os
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dev = os.stat(ckpt).st_dev
    sysroot = tmp_path / "sys"
    (sysroot / "dev" / "block").mkdir(parents=True)
    target = sysroot / "devices" / "nvme0n1" / "nvme0n1p1"
    target.mkdir(parents=True)
    (sysroot / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}").symlink_to(target)
    log = tmp_path / "kern.log"
    log.write_text("")
    m = HostMonitor("h1", kernel_log=str(log), sys_root=str(sysroot), disk_paths=(str(ckpt),))
    assert m.checkpoint_devices == {"nvme0n1p1"}
    m.cycle()
    log.write_text("I/O error, dev nvme0n1, sector 2048 op 0x1:(WRITE) flags 0x0\n"
                   "I/O error, dev sdb, sector 9 op 0x0:(READ) flags 0x0\n")
    on_ckpt, other = m.cycle()
    assert on_ckpt.attrs.get("checkpoint_disk") and "[checkpoint file system]" in on_ckpt.message
    assert not other.attrs.get("checkpoint_disk")


def test_a_huge_line_and_absurd_numbers_stop_nothing_and_lose_no_later_line(tmp_path):
    """A line over the 4 MiB read chunk used to pin the offset forever; a 5,000-digit Xid or rank number used to
    raise after the offset moved, losing the rest of the batch. Both are read past; the Xid after them is found."""
    log = tmp_path / "kern.log"
    log.write_text("")
    mon = HostMonitor("h1", str(log), str(tmp_path / "sys"), (), "", 0.0)
    assert mon.cycle() == []
    with open(log, "ab") as f:
        f.write(b"[  1.0] " + b"x" * (5 << 20) + b"\n")
        f.write(b"[  2.0] NVRM: Xid (PCI:0000:3b:00): " + b"9" * 5000 + b", pid=1, name=python\n")
        f.write(b"[  2.5] [rank" + b"7" * 5000 + b"]: something\n")
        f.write(b"[  3.0] NVRM: Xid (PCI:0000:3b:00): 79, pid=2, GPU has fallen off the bus.\n")
    found = []
    for _ in range(5):  # a few cycles: the huge line takes more than one read
        found += mon.cycle()
    xids = [e for e in found if e.kind == EvidenceKind.GPU_XID and e.code == 79]
    assert xids and xids[0].severity == Severity.CRITICAL
    assert mon.log.offset == log.stat().st_size  # everything read, nothing pinned

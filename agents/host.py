"""Host health: the kernel log (through the shared rule engine, evidence/), NIC and InfiniBand links and
counters, and disk space on the checkpoint path.

Every source is read through a path (kernel log file or /dev/kmsg, a sysfs root, disk paths) so tests point it at
fixture trees. A missing source (no InfiniBand, an unreadable kernel log) is skipped, never an error; a malformed
line or counter file is ignored, never a crash. Links and disks are *conditions* (on until they clear, evidence
on each change); kernel-log records are *events*.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from evidence.engine import evidence_of
from evidence.records import Grouper, records
from evidence.rules import RuleSet
from evidence.rules import default as default_rules
from evidence.rules import load as load_ruleset
from herdsman.events import IB_LINK_DOWNED, Evidence, EvidenceKind, Reason, Severity
from herdsman.taxonomy import RootCause

IB_COUNTERS = (IB_LINK_DOWNED, "link_error_recovery", "symbol_error", "port_rcv_errors", "port_xmit_discards",
               "excessive_buffer_overrun_errors", "local_link_integrity_errors")
NIC_COUNTERS = ("rx_errors", "tx_errors", "rx_dropped", "tx_dropped")
READ_CHUNK = 4 << 20  # bytes of kernel log read per cycle


def load_rules(path: Path | str | None = None) -> RuleSet:
    """The rule set the agent matches its kernel log with (the shared one unless a file is given)."""
    return load_ruleset(path) if path else default_rules()


def match_line(rules: RuleSet, host: str, line: str, when: float) -> Evidence | None:
    """The first piece of evidence one kernel-log line raises, or None."""
    for rec in records([line], host):
        evs = evidence_of(rec, rules, when, source="kernel")
        if evs:
            return evs[0]
    return None


class KernelLog:
    """Incremental reader of a kernel log: a text file (rotation and truncation handled) or /dev/kmsg."""

    def __init__(self, path: str, from_start: bool = False):
        self.path, self.offset = Path(path), None if not from_start else 0
        self._kmsg_fd: int | None = None
        self.available = True

    def read_new(self) -> list[str]:
        try:
            st = os.stat(self.path)
        except OSError:
            self.available = False
            return []
        if stat.S_ISCHR(st.st_mode):
            return self._read_kmsg()
        if self.offset is None:  # start at the end: old lines were handled before this agent started
            self.offset = st.st_size
        if st.st_size < self.offset:  # truncated or rotated
            self.offset = 0
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(READ_CHUNK)
        except OSError:
            self.available = False
            return []
        self.available = True
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) == READ_CHUNK:  # one line longer than a whole chunk: look at its head, move on
            end = len(data)
        self.offset += end
        return data[:end].decode("utf-8", errors="replace").splitlines()

    def _read_kmsg(self) -> list[str]:
        if self._kmsg_fd is None:
            try:
                self._kmsg_fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
                os.lseek(self._kmsg_fd, 0, os.SEEK_END)
            except OSError:
                self.available = False
                return []
        out = []
        while True:
            try:
                rec = os.read(self._kmsg_fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records were overwritten before we read them: skip ahead
                    continue
                self.available = False
                break
            if not rec:
                break
            line = rec.decode("utf-8", errors="replace")
            out.append(line.split(";", 1)[1].strip() if ";" in line else line.strip())
        return out

    def close(self) -> None:
        if self._kmsg_fd is not None:
            os.close(self._kmsg_fd)
            self._kmsg_fd = None


def _read_word(path: Path) -> str | None:
    try:
        return path.read_bytes()[:4096].decode("utf-8", errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_word(path)
    try:
        return int(text.split()[0].rstrip(":"), 0) if text else None
    except (ValueError, IndexError):
        return None


def block_device(path: str, sys_root: Path) -> str | None:
    """The block device (e.g. nvme0n1p1) holding `path`, from its st_dev through /sys/dev/block."""
    try:
        dev = os.stat(path).st_dev
        link = sys_root / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}"
        return Path(os.path.realpath(link)).name if link.exists() else None
    except OSError:
        return None


def _same_disk(device: str, ckpt_device: str) -> bool:
    """nvme0n1 and its partition nvme0n1p1 (or sda and sda1) are the same disk."""
    a, b = sorted((device, ckpt_device), key=len)
    return b.startswith(a)


@dataclass
class HostSnapshot:
    """What the host looked like at the last cycle, for the metrics."""

    nics: dict[str, dict[str, object]] = field(default_factory=dict)  # iface -> up, counters
    ib_ports: dict[str, dict[str, object]] = field(default_factory=dict)  # "mlx5_0/1" -> active, state, counters
    disks: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> total, free, free_ratio
    conditions: dict[str, str] = field(default_factory=dict)  # active condition -> message
    kernel_log_available: bool = False


class HostMonitor:
    def __init__(self, host: str, kernel_log: str = "/dev/kmsg", sys_root: str = "/sys",
                 disk_paths: tuple[str, ...] = (), rules_path: str = "", min_free_ratio: float = 0.05,
                 log_from_start: bool = False):
        self.host = host
        self.rules = load_rules(rules_path or None)
        self.log = KernelLog(kernel_log, from_start=log_from_start) if kernel_log else None
        self.sys = Path(sys_root)
        self.disk_paths, self.min_free_ratio = disk_paths, min_free_ratio
        self.snapshot = HostSnapshot()
        self._prev_counters: dict[str, int] = {}
        self.checkpoint_devices = {d for d in (block_device(p, self.sys) for p in disk_paths) if d}

    def cycle(self) -> list[Evidence]:
        now = time.time()
        out: list[Evidence] = []
        if self.log is not None:
            grouper = Grouper(self.host)
            lines = self.log.read_new()
            recs = [r for line in lines for r in grouper.feed(line)] + list(grouper.close())
            for rec in recs:
                for ev in evidence_of(rec, self.rules, now, source="kernel"):
                    out.append(self._mark_checkpoint_disk(ev))
            self.snapshot.kernel_log_available = self.log.available
        conditions: dict[str, tuple[str, str, Severity]] = {}  # name -> (message, cause, severity)
        out += self._nics(now, conditions)
        out += self._infiniband(now, conditions)
        self._disks(conditions)
        out += self._conditions(now, conditions)
        return out

    def _mark_checkpoint_disk(self, ev: Evidence) -> Evidence:
        """An I/O error on the disk that holds the checkpoints says so: it threatens every restart."""
        dev = ev.attrs.get("device") or ev.attrs.get("dev2")
        if dev and any(_same_disk(dev, c) for c in self.checkpoint_devices):
            return replace(ev, message=ev.message + " [checkpoint file system]",
                           attrs={**ev.attrs, "checkpoint_disk": True})
        return ev

    def _counter_rise(self, key: str, value: int | None) -> int:
        if value is None:
            return 0
        prev = self._prev_counters.get(key)
        self._prev_counters[key] = value
        return 0 if prev is None or value < prev else value - prev

    def _nics(self, now: float, conditions: dict) -> list[Evidence]:
        out, nics = [], {}
        root = self.sys / "class" / "net"
        if not root.is_dir():
            return out
        for d in sorted(root.iterdir()):
            if not (d / "device").exists():  # virtual interfaces (lo, bridges, veth) are not hardware
                continue
            oper = _read_word(d / "operstate")
            counters = {c: _read_int(d / "statistics" / c) for c in NIC_COUNTERS}
            changes = _read_int(d / "carrier_changes")
            up = oper == "up"
            was_up = self.snapshot.nics.get(d.name, {}).get("up")
            nics[d.name] = {"up": up, "operstate": oper, "carrier_changes": changes, **counters}
            if not up and (was_up or self._prev_counters.get(f"nic/{d.name}/seen_up")):
                conditions[f"{Reason.NIC_DOWN}:{d.name}"] = (f"{d.name} operstate {oper}", RootCause.NIC.value, Severity.WARNING)
            if up:
                self._prev_counters[f"nic/{d.name}/seen_up"] = 1
            flaps = self._counter_rise(f"nic/{d.name}/carrier_changes", changes)
            if flaps:
                out.append(Evidence(self.host, EvidenceKind.HOST_LOG, now, f"NicFlap: {d.name} carrier changed "
                                    f"{flaps} time(s)", Severity.WARNING,
                                    attrs={"reason": Reason.NIC_FLAP.value, "cause": "nic", "iface": d.name}))
        self.snapshot.nics = nics
        return out

    def _infiniband(self, now: float, conditions: dict) -> list[Evidence]:
        out, ports = [], {}
        root = self.sys / "class" / "infiniband"
        if not root.is_dir():
            return out
        for dev in sorted(root.iterdir()):
            pdir = dev / "ports"
            if not pdir.is_dir():
                continue
            for port in sorted(pdir.iterdir()):
                name = f"{dev.name}/{port.name}"
                state = _read_word(port / "state") or ""
                phys = _read_word(port / "phys_state") or ""
                counters = {c: _read_int(port / "counters" / c) for c in IB_COUNTERS}
                active = "ACTIVE" in state
                ports[name] = {"active": active, "state": state, "phys_state": phys, **counters}
                if not active and state:
                    conditions[f"{Reason.IB_PORT_DOWN}:{name}"] = (f"InfiniBand {name} state {state!r}, phys {phys!r}",
                                                        RootCause.NIC.value, Severity.WARNING)
                for c in IB_COUNTERS:
                    rise = self._counter_rise(f"ib/{name}/{c}", counters[c])
                    if rise:
                        sev = Severity.WARNING
                        out.append(Evidence(self.host, EvidenceKind.HOST_LOG, now,
                                            f"InfinibandErrors: {name} {c} +{rise}", sev,
                                            attrs={"reason": Reason.IB_ERRORS.value, "cause": "nic", "port": name,
                                                   "counter": c, "delta": rise}))
        self.snapshot.ib_ports = ports
        return out

    def _disks(self, conditions: dict) -> None:
        disks = {}
        for p in self.disk_paths:
            try:
                u = shutil.disk_usage(p)
            except OSError:
                continue
            ratio = u.free / u.total if u.total else 0.0
            disks[p] = {"total": float(u.total), "free": float(u.free), "free_ratio": ratio}
            if ratio < self.min_free_ratio:
                conditions[f"{Reason.DISK_PRESSURE}:{p}"] = (f"{p}: {ratio:.1%} free", "", Severity.WARNING)
        self.snapshot.disks = disks

    def _conditions(self, now: float, current: dict[str, tuple[str, str, Severity]]) -> list[Evidence]:
        out = []
        for name, (message, cause, sev) in current.items():
            if name not in self.snapshot.conditions:
                out.append(Evidence(self.host, EvidenceKind.HOST_LOG, now, f"{name.split(':')[0]}: {message}", sev,
                                    attrs={"reason": name.split(":")[0], "cause": cause, "condition": name}))
        for name in self.snapshot.conditions:
            if name not in current:
                out.append(Evidence(self.host, EvidenceKind.HOST_LOG, now, f"{name} cleared", Severity.INFO,
                                    attrs={"reason": name.split(":")[0], "cause": "", "condition": name,
                                           "cleared": True}))
        self.snapshot.conditions = {n: m for n, (m, _, _) in current.items()}
        return out

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

"""The facts that flow between agents, trainer, controller and reports: frozen dataclasses, JSON-friendly.

Timestamps are Unix seconds (time.time()) so that records from different processes and hosts line up.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
from dataclasses import dataclass, field
from typing import Any

from herdsman.taxonomy import Action, RootCause


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"  # the device or host cannot be trusted with training any more


class HostState(str, enum.Enum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"  # implicated but still usable (e.g. an unknown failure, a single flap)
    QUARANTINED = "quarantined"  # evicted: gets no trainer rank until returned to service
    SPARE = "spare"  # healthy and idle, first choice to replace an evicted host
    UNREACHABLE = "unreachable"  # missed heartbeats beyond the window


class EvidenceKind(str, enum.Enum):
    GPU_XID = "gpu_xid"  # an Xid event; `code` holds the Xid number
    GPU_LOST = "gpu_lost"  # the device fell off the bus / cannot be queried
    GPU_ECC = "gpu_ecc"  # ECC error counts rose; attrs say sram/dram, corrected/uncorrected
    GPU_THERMAL = "gpu_thermal"  # thermal slowdown / clocks held down by temperature
    HOST_LOG = "host_log"  # a kernel / system log line matched a rule
    TRAINER_EXCEPTION = "trainer_exception"  # a rank raised; `message` holds the exception text
    TRAINER_EXIT = "trainer_exit"  # a rank exited; attrs hold exit code or signal
    TRAINER_HANG = "trainer_hang"  # a collective timed out / no progress
    MAINTENANCE = "maintenance"  # a planned drain notice
    STRAGGLER = "straggler"  # a rank much slower than its peers or its own usual; attrs say why
    NETWORK = "network"  # NCCL / InfiniBand transport errors seen by a rank
    SDC = "sdc"  # silent data corruption: a checksum mismatch or an unexplained loss spike


class Reason(str, enum.Enum):
    """Names in Evidence.attrs["reason"] that agents write and the controller's diagnosis reads."""

    AGENT_SILENT = "AgentSilent"  # the controller heard nothing from a host of the job for the heartbeat window
    NIC_DOWN = "NicDown"  # a NIC's operstate is down (sysfs)
    NIC_FLAP = "NicFlap"  # a NIC's carrier changed since the last look
    NIC_LINK_DOWN = "NicLinkDown"  # a kernel-log rule: link down
    IB_PORT_DOWN = "IbPortDown"  # an InfiniBand port not ACTIVE / LinkUp (sysfs)
    IB_PORT_DOWN_LOG = "InfinibandPortDown"  # a kernel-log rule: port down
    IB_ERRORS = "InfinibandErrors"  # InfiniBand error counters rose; attrs["counter"] says which
    DISK_PRESSURE = "DiskPressure"  # the checkpoint file system is nearly full
    PLANNED_MAINTENANCE = "PlannedMaintenance"  # a drain notice from the scheduler or the provider
    THERMAL = "thermal"  # a straggler slowed by heat (attrs of STRAGGLER evidence)

    def __str__(self) -> str:  # written into attrs as the plain name
        return self.value


LINK_DOWN = frozenset({Reason.NIC_DOWN, Reason.IB_PORT_DOWN, Reason.NIC_LINK_DOWN, Reason.IB_PORT_DOWN_LOG,
                       Reason.IB_ERRORS})
# The InfiniBand port counter (sysfs) whose rise means the link went down: of the IB_ERRORS evidence (its
# attrs["counter"]) only this one is a link down, the others are errors on a link that stayed up.
IB_LINK_DOWNED = "link_downed"


class TrainerPhase(str, enum.Enum):
    STARTED = "started"  # process up and its imports done, before rendezvous
    RENDEZVOUS = "rendezvous"  # process group formed
    RESTORED = "restored"  # state loaded from a checkpoint (or fresh start); duration = the load alone
    CHECKPOINT = "checkpoint"  # a checkpoint committed; duration = time the loop was blocked
    CHECKPOINT_FAILED = "checkpoint_failed"  # a save lost to a full/read-only file system; training went on
    FAILED = "failed"  # about to exit with an error; message holds it
    FINISHED = "finished"  # reached the target step (or drained); duration = waiting for the last saves


@dataclass(frozen=True)
class RankFailure:
    """A trainer rank that ended (or is stuck) as the worker group or a log saw it."""

    rank: int
    host: str
    time: float
    exit_code: int | None = None  # None while still running (e.g. hardware evidence arrived first)
    message: str = ""  # exception text or the tail of stderr

    @property
    def signal_name(self) -> str | None:
        if self.exit_code is not None and self.exit_code < 0:
            try:
                return signal.Signals(-self.exit_code).name
            except ValueError:
                return f"signal {-self.exit_code}"
        return None

    def line(self) -> str:
        how = self.signal_name or (f"exit code {self.exit_code}" if self.exit_code is not None else "running")
        # a killed process said nothing about why: its last log line would mislead
        last = self.message.strip().splitlines()[-1] if self.message.strip() and not self.signal_name else ""
        return f"[{self.host} rank{self.rank}] trainer {how}" + (f": {last[:300]}" if last else "")


@dataclass(frozen=True)
class Evidence:
    """One observation that may explain an interruption."""

    host: str
    kind: EvidenceKind
    time: float
    message: str
    severity: Severity = Severity.WARNING
    gpu: int | None = None
    code: int | None = None  # Xid number, exit code, ...
    rank: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One human-readable line, as shown in verdicts and reports."""
        where = self.host + (f" gpu{self.gpu}" if self.gpu is not None else "")
        where += f" rank{self.rank}" if self.rank is not None else ""
        return f"[{where}] {self.kind.value}: {self.message}"


ECC_COUNTERS = ("volatile", "aggregate")
ECC_LOCATIONS = ("sram", "dram")
ECC_TYPES = ("corrected", "uncorrected")
NVLINK_ERRORS = ("replay", "recovery", "crc_flit", "crc_data")


@dataclass(frozen=True)
class GpuSample:
    """One GPU's readings at one instant. None means the field is not available on this device/driver.

    `ecc` is keyed "<volatile|aggregate>_<sram|dram>_<corrected|uncorrected>"; `nvlink_errors` by error type,
    summed over links; `violation_s` is the cumulative time clocks were held down, by policy (power, thermal).
    """

    index: int
    uuid: str
    name: str = ""
    temperature_c: float | None = None
    memory_temperature_c: float | None = None
    sm_clock_mhz: float | None = None
    max_sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    power_w: float | None = None
    energy_j: float | None = None  # since the driver loaded
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    throttle_reasons: tuple[str, ...] = ()
    violation_s: dict[str, float] = field(default_factory=dict)
    ecc: dict[str, int] = field(default_factory=dict)
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_pending: bool | None = None
    row_remap_failure: bool | None = None
    pcie_replay_count: int | None = None
    nvlink_errors: dict[str, int] = field(default_factory=dict)
    xid_counts: dict[int, int] = field(default_factory=dict)  # per Xid code since the agent started
    lost: bool = False

    def ecc_count(self, location: str, kind: str = "uncorrected", counter: str = "aggregate") -> int | None:
        return self.ecc.get(f"{counter}_{location}_{kind}")

    @property
    def ecc_dram_uncorrected(self) -> int | None:
        return self.ecc_count("dram")

    @property
    def ecc_sram_uncorrected(self) -> int | None:
        return self.ecc_count("sram")


@dataclass(frozen=True)
class StepStats:
    """What one trainer rank reports after each optimizer step."""

    rank: int
    host: str
    attempt: int
    step: int
    time: float  # when the step finished
    step_time_s: float
    tokens: int
    loss: float
    compute_s: float = 0.0  # this rank's own work, before it waits for the others in the step's last collective
    data_s: float = 0.0  # of step_time_s, the time spent waiting for the batch (data loading)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else 0.0


@dataclass(frozen=True)
class TrainerEvent:
    """A lifecycle event of one trainer rank (start, rendezvous, restore, checkpoint, failure, finish)."""

    rank: int
    host: str
    attempt: int
    phase: TrainerPhase
    time: float
    step: int = 0
    duration_s: float = 0.0
    message: str = ""
    pid: int = 0
    gpu: int | None = None  # local device index the rank runs on


@dataclass(frozen=True)
class Heartbeat:
    host: str
    time: float
    seq: int
    metrics_url: str = ""
    gpus: tuple[GpuSample, ...] = ()


@dataclass(frozen=True)
class AgentReport:
    """What an agent sends the controller each cycle: its heartbeat and everything new since the last one."""

    heartbeat: Heartbeat
    evidence: tuple[Evidence, ...] = ()
    steps: tuple[StepStats, ...] = ()
    trainer_events: tuple[TrainerEvent, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """The controller's explanation of an interruption and what to do about it."""

    cause: RootCause
    confidence: float
    hosts: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()
    evidence: tuple[str, ...] = ()
    action: Action = Action.RESTART
    reason: str = ""
    # the causes that lost, most likely first ("cause (strength): evidence line"): what else was on the table
    alternatives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be within [0, 1], got {self.confidence}")


# Where a job's wall-clock time goes, every second in one bucket, each measured where it happens
# (orchestrator/accounts.py; README, "Where the time goes"); ETTR = productive / wall.
TIME_SPLIT = ("productive", "data_loading", "checkpoint", "startup", "detection", "restart", "restore", "lost_work",
              "waiting_for_hosts", "operator", "shutdown", "unexplained")

@dataclass(frozen=True)
class Interruption:
    """One interruption of a job with its time split (README, "How it fits together").

    failed_at: first sign of the failure (earliest fault evidence or rank exit);
    detected_at: the controller decided the verdict;
    restarted_at: new processes formed their process group (teardown + placement + start + rendezvous done);
    resumed_at: state restored from the checkpoint, training continues.
    """

    job: str
    attempt: int
    verdict: Verdict
    failed_at: float
    detected_at: float
    restarted_at: float | None = None
    resumed_at: float | None = None
    last_step: int = 0  # last step completed before the failure
    resumed_step: int | None = None  # checkpoint step the new attempt resumed from
    lost_work_s: float = 0.0  # wall time of the steps that must be recomputed
    planned: bool = False

    @property
    def detection_s(self) -> float:
        return max(0.0, self.detected_at - self.failed_at)

    @property
    def restart_s(self) -> float | None:
        return None if self.restarted_at is None else max(0.0, self.restarted_at - self.detected_at)

    @property
    def restore_s(self) -> float | None:
        if self.resumed_at is None or self.restarted_at is None:
            return None
        return max(0.0, self.resumed_at - self.restarted_at)

    @property
    def lost_steps(self) -> int | None:
        return None if self.resumed_step is None else max(0, self.last_step - self.resumed_step)


@dataclass(frozen=True)
class HostStatus:
    host: str
    state: HostState
    since: float
    reason: str = ""


# --- JSON round trip, used on the wire (stats files, Ray calls are plain objects) and in the store ---------

def to_dict(obj: Any) -> dict[str, Any]:
    """A frozen event as plain JSON-ready data (enums as their values)."""

    def conv(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return v

    return conv(obj)


def verdict_from_dict(d: dict[str, Any]) -> Verdict:
    return Verdict(
        cause=RootCause(d["cause"]),
        confidence=float(d["confidence"]),
        hosts=tuple(d.get("hosts", ())),
        ranks=tuple(int(r) for r in d.get("ranks", ())),
        evidence=tuple(d.get("evidence", ())),
        action=Action(d.get("action", Action.RESTART.value)),
        reason=d.get("reason", ""),
        alternatives=tuple(d.get("alternatives", ())),
    )


def step_stats_from_dict(d: dict[str, Any]) -> StepStats:
    # fields with defaults (added later) may be missing from older streams
    return StepStats(**{f.name: d[f.name] for f in dataclasses.fields(StepStats)
                        if f.name in d or f.default is dataclasses.MISSING})


def trainer_event_from_dict(d: dict[str, Any]) -> TrainerEvent:
    kw = {f.name: d[f.name] for f in dataclasses.fields(TrainerEvent) if f.name in d}
    kw["phase"] = TrainerPhase(kw["phase"])
    return TrainerEvent(**kw)


def interruption_from_dict(d: dict[str, Any]) -> Interruption:
    kw = {f.name: d[f.name] for f in dataclasses.fields(Interruption) if f.name in d}
    kw["verdict"] = verdict_from_dict(d["verdict"])
    return Interruption(**kw)

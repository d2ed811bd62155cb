"""Typed configuration, loaded from one TOML file. Every default runs on a laptop.

    [cluster]  where the hosts come from (an embedded local Ray cluster by default)
    [agent]    per-node sampling and the GPU backend
    [trainer]  the embedded Llama 3 run
    [controller] the control loop's timings and restart budget
    [store]    where interruptions are recorded
    [simulate] the fleet-scale simulator's job, failure and timing model

Unknown sections or keys and values of the wrong type are errors, reported as one line.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herdsman import HerdsmanError


class ConfigError(HerdsmanError):
    pass


@dataclass(frozen=True)
class ClusterConfig:
    address: str = "local"
    """Ray address of an existing cluster, or "local" to start an embedded multi-node cluster on this machine."""
    worker_hosts: int = 3
    """Hosts that run trainer ranks at start."""
    spare_hosts: int = 1
    """Healthy idle hosts kept to replace evicted ones."""
    cpus_per_host: int = 1
    """CPUs each embedded Ray node advertises (local cluster only)."""

    def __post_init__(self) -> None:
        _check(self.worker_hosts >= 1, "cluster.worker_hosts must be >= 1")
        _check(self.spare_hosts >= 0, "cluster.spare_hosts must be >= 0")


@dataclass(frozen=True)
class AgentConfig:
    gpu_backend: str = "simulated"
    """"simulated" (no GPU needed, faults injectable) or "nvml" (real GPUs through pynvml)."""
    gpus_per_host: int = 2
    """GPUs per simulated host (the NVML backend counts the real ones)."""
    interval_s: float = 0.5
    """Sampling and heartbeat period."""
    metrics_port: int = 0
    """Port of the agent's Prometheus /metrics endpoint; 0 picks a free one (reported in heartbeats)."""
    metrics_host: str = "127.0.0.1"
    kernel_log: str = "/dev/kmsg"
    """Kernel log to watch: /dev/kmsg, a file such as /var/log/kern.log, or "" to disable."""
    sys_root: str = "/sys"
    """Where NIC (class/net) and InfiniBand (class/infiniband) state is read."""
    host_rules: str = ""
    """Rules file (the format of evidence/rules.toml); empty means the packaged rules."""
    min_disk_free_ratio: float = 0.05
    """Below this free share of the checkpoint file system the host reports DiskPressure."""
    straggler_relative: float = 1.10
    """A rank whose step time is this many times the fastest ranks' is a straggler."""
    straggler_individual: float = 1.10
    """A rank whose step time is this many times its own usual is a straggler."""
    drift_window: int = 2000
    """Samples kept per node for stragglers and the throughput-vs-temperature fit."""

    def __post_init__(self) -> None:
        _check(self.gpu_backend in ("simulated", "nvml"), "agent.gpu_backend must be 'simulated' or 'nvml'")
        _check(self.straggler_relative > 1 and self.straggler_individual > 1,
               "agent.straggler_relative and agent.straggler_individual must be > 1")
        _check(self.gpus_per_host >= 1, "agent.gpus_per_host must be >= 1")
        _check(self.interval_s > 0, "agent.interval_s must be > 0")


@dataclass(frozen=True)
class TrainerConfig:
    model: str = "tiny"
    """Named size: tiny (laptop), 8B, 70B, 405B (the paper's)."""
    seq_len: int = 128
    batch_size: int = 4
    """Sequences per rank per step."""
    steps: int = 60
    """Target step: the job is done when it is reached."""
    lr: float = 3e-3
    warmup_steps: int = 5
    seed: int = 1234
    checkpoint_every: int = 5
    """Steps between sharded checkpoints."""
    keep_checkpoints: int = 3
    ranks_per_host: int = 1
    collective_timeout_s: float = 30.0
    """A collective that does not complete in this time fails the rank (a hang becomes an error)."""
    fr_buffer_size: int = 2000
    """Entries in the PyTorch flight recorder ring buffer (TORCH_FR_BUFFER_SIZE)."""
    step_delay_s: float = 0.0
    """Extra sleep per step: stretches a tiny run so faults can land mid-training (demo/tests)."""
    checkpoint_interval_s: float = 0.0
    """Also checkpoint when this many seconds have passed since the last save (0: by steps only)."""
    checkpoint_async: bool = True
    """Write checkpoints in the background; the loop is blocked only to copy the state to host memory."""
    memory_tier: bool = True
    """Keep the latest snapshot in host RAM with a replica on a peer host, and restore from it when possible."""
    memory_dir: str = ""
    """Host-RAM directory of the memory tier ({job}, {host} and {run_dir} are filled in). Default: a tmpfs
    (/dev/shm/herdsman/{job}/{host}) where one exists, else {run_dir}/memory/{host}."""
    sdc_check_every: int = 1
    """Check every this many steps that no rank's parameters changed outside the optimizer (0: off)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "trainer.steps must be >= 1")
        _check(self.checkpoint_every >= 1, "trainer.checkpoint_every must be >= 1")
        _check(self.keep_checkpoints >= 1, "trainer.keep_checkpoints must be >= 1")
        _check(self.ranks_per_host >= 1, "trainer.ranks_per_host must be >= 1")
        _check(self.checkpoint_interval_s >= 0, "trainer.checkpoint_interval_s must be >= 0")
        _check(self.sdc_check_every >= 0, "trainer.sdc_check_every must be >= 0")


@dataclass(frozen=True)
class ControllerConfig:
    poll_interval_s: float = 0.25
    """How often the control loop polls the trainer ranks."""
    failure_grace_s: float = 1.0
    """After the first rank fails, wait this long for evidence from the agents before deciding."""
    evidence_window_s: float = 60.0
    """Evidence older than this before the failure is not considered."""
    max_restarts: int = 10
    """Restart budget of one job."""
    restart_backoff_s: float = 0.5
    """First backoff before a restart; doubles for each consecutive failure without progress."""
    heartbeat_timeout_s: float = 10.0
    """A host whose agent is silent this long is unreachable."""
    lemon_window_s: float = 86400.0
    """A host implicated lemon_threshold times within this window is kept out as a lemon."""
    lemon_threshold: int = 3
    drain_timeout_s: float = 120.0
    """How long a drain waits for the fresh checkpoint before taking the host out anyway."""
    hang_timeout_s: float = 120.0
    """No completed step for this long while every rank is alive is a hang: dumps are taken, the group restarted."""
    startup_timeout_s: float = 120.0
    """An attempt whose first step has not completed after this long is hung (start, rendezvous, restore)."""
    dump_wait_s: float = 3.0
    """How long to wait for live ranks to write their flight-recorder dumps after asking."""
    controller_restarts: int = 3
    """How often Ray restarts a controller whose process died; the new one carries on from the store."""
    warm_standby: bool = True
    """Keep one pre-imported trainer process per rank ready, so a restart skips the ~2 s torch import."""

    def __post_init__(self) -> None:
        _check(self.poll_interval_s > 0, "controller.poll_interval_s must be > 0")
        _check(self.max_restarts >= 0, "controller.max_restarts must be >= 0")


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    """Where the controller serves its HTTP API (and, later, the operator page)."""
    port: int = 0
    """0 picks a free port (shown in `herdsman` output and the job status)."""
    token: str = ""
    """Operator token for mutating calls; empty generates one into <run_dir>/api_token."""


@dataclass(frozen=True)
class StoreConfig:
    url: str = ""
    """SQLAlchemy URL; empty means a SQLite file in the run directory. PostgreSQL: postgresql+psycopg://..."""


@dataclass(frozen=True)
class SimulateConfig:
    """The fleet-scale simulator (`herdsman simulate`). Defaults: Llama 3 405B's run as the paper and common
    practice describe it (16,384 GPUs, 54 days, Table 5 failure rates, checkpoint every 30 min, restart in minutes).
    """

    gpus: int = 16384
    gpus_per_host: int = 8
    days: float = 54.0
    spare_hosts: int = 64
    """Healthy idle hosts that can replace evicted ones."""
    failure_scale: float = 1.0
    """Multiplier on every Table 5 failure rate (2.0 = twice as many failures)."""
    planned_per_day: float = 47 / 54
    """Planned interruptions (firmware, config, dataset updates): checkpoint, drain, restart."""
    lemon_share: float = 0.02
    """Share of hosts that fail far more often than the rest."""
    lemon_factor: float = 15.0
    """A lemon's failure rate over a normal host's (the fleet-wide mean stays at Table 5's rate)."""
    checkpoint_interval_s: float = 1800.0
    checkpoint_stall_s: float = 15.0
    """Training time each checkpoint blocks (synchronous save to remote storage)."""
    detect_hardware_s: float = 60.0
    """Failure to verdict when the GPU/host says what broke (Xid, ECC, kernel log)."""
    detect_software_s: float = 30.0
    """An exception or exit in the trainer."""
    detect_hang_s: float = 600.0
    """Collectives that stop: network, NIC, NCCL watchdog (the 10-minute NCCL timeout)."""
    detect_sdc_s: float = 3600.0
    """Silent data corruption, found by a loss spike or a checksum."""
    detect_thermal_s: float = 1800.0
    """A thermally throttled straggler, noticed and drained."""
    restart_s: float = 180.0
    """Teardown, placement, process start and rendezvous (NCCL init at 16K ranks)."""
    restore_disk_s: float = 60.0
    restore_memory_s: float = 0.0
    """Restore from a peer's memory copy; 0 means no in-memory tier (always from disk)."""
    repair_s: float = 86400.0
    """Time an evicted host needs to come back (reset, diagnostics, part swap)."""
    network_repair_s: float = 7200.0
    lemon_repair_s: float = 1209600.0
    """A host found to be a lemon goes to RMA and comes back as a normal one."""
    maintenance_s: float = 14400.0
    """Time a host spends in (planned or unplanned) maintenance."""
    human_response_s: float = 3600.0
    """A stop that pages a human (dependency break, crash loop, exhausted budget) costs this long."""
    restart_budget: int = 1000
    """Automatic restarts before a human must look (reset by each human intervention)."""
    lemon_window_s: float = 14 * 86400.0
    lemon_threshold: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.gpus >= self.gpus_per_host >= 1, "simulate.gpus must be >= simulate.gpus_per_host >= 1")
        _check(self.days > 0, "simulate.days must be > 0")
        _check(self.spare_hosts >= 0, "simulate.spare_hosts must be >= 0")
        _check(self.failure_scale >= 0, "simulate.failure_scale must be >= 0")
        _check(0 <= self.lemon_share < 1 and self.lemon_factor >= 1,
               "simulate.lemon_share must be in [0, 1) and simulate.lemon_factor >= 1")
        _check(self.checkpoint_interval_s > 0, "simulate.checkpoint_interval_s must be > 0")
        _check(self.lemon_threshold >= 1, "simulate.lemon_threshold must be >= 1")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_s"):
                _check(v >= 0, f"simulate.{f.name} must be >= 0")


@dataclass(frozen=True)
class HerdsmanConfig:
    run_dir: str = "herdsman-run"
    """Checkpoints, trainer stats, logs and the default database live here."""
    job: str = "llama3-demo"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{Path(self.run_dir).resolve() / 'herdsman.db'}"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.run_dir).resolve() / "checkpoints" / self.job


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{name}' (known: {', '.join(sorted(fields))})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}' must be a table [{name}]")
            kwargs[key] = _build(typ, value, name)
        elif typ is float and isinstance(value, int) and not isinstance(value, bool):
            kwargs[key] = float(value)
        elif not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"config key '{name}' must be {typ.__name__}, got {type(value).__name__} {value!r}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> HerdsmanConfig:
    return _build(HerdsmanConfig, data, "")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> HerdsmanConfig:
    """Defaults, then the TOML file (if any), then `overrides` (nested dicts, e.g. from the CLI or tests)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    if overrides:
        data = _merge(data, overrides)
    return from_dict(data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_toml(cfg: HerdsmanConfig) -> str:
    """The configuration as a TOML file (for `herdsman config`), every default visible."""
    top, tables = [], []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            lines = [f"[{f.name}]"] + [f"{g.name} = {_toml_value(getattr(v, g.name))}" for g in dataclasses.fields(v)]
            tables.append("\n".join(lines))
        else:
            top.append(f"{f.name} = {_toml_value(v)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)

"""Typed configuration, loaded from one TOML file. Every default runs on a laptop.

    [cluster]  where the hosts come from (an embedded local Ray cluster by default)
    [agent]    per-node sampling and the GPU backend
    [trainer]  the embedded Llama 3 run
    [controller] the control loop's timings and restart budget
    [store]    where interruptions are recorded
    [simulate] the fleet-scale simulator's job, failure and timing model

Unknown sections or keys, values of the wrong type and values out of range are errors, reported as one line that
names the key (`trainer.seq_len = 1024 is beyond the context of model 'tiny' (512)`). The ranges are declared next
to each field (`_f(default, gt=0)`); on top of them, every float must be finite, every int must fit in 64 bits (as
TOML's do), no string may hold a NUL, every `*_s` duration without a declared range must be >= 0, and every one is
at most 1e7 s (about 115 days: config_fields.MAX_DURATION_S; beyond threading.TIMEOUT_MAX a wait raises). Checks that
involve several fields are in the sections' __post_init__. Sections validate themselves when built, so
dataclasses.replace() and direct construction are checked as well as files.
"""

from __future__ import annotations

import dataclasses
import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herdsman import layout
from herdsman.config_fields import ConfigError, _check, _f, _hints, _show, _validate
from herdsman.secrets import redact_url, url_password


MODEL_CONTEXT: dict[str, int] = {"8B": 8192, "70B": 8192, "405B": 8192, "tiny": 512, "small": 512}
"""Named model sizes and the longest sequence each was built for (trainer/model.py SIZES[name].max_seq_len, which
herdsman/ may not import; tests/test_config.py keeps the two equal)."""

JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A job name is a path component (checkpoints/<job>) and a label: no '/', no '..', nothing odd."""

MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class ClusterConfig:
    address: str = "local"
    """Ray address of an existing cluster, or "local" to start an embedded multi-node cluster on this machine."""
    worker_hosts: int = _f(3, ge=1)
    """Hosts that run trainer ranks at start."""
    spare_hosts: int = _f(1, ge=0)
    """Healthy idle hosts kept to replace evicted ones."""
    cpus_per_host: int = _f(1, ge=1)
    """CPUs each embedded Ray node advertises (local cluster only)."""

    def __post_init__(self) -> None:
        _validate(self, "cluster")
        _check(self.address.strip() != "",
               "cluster.address must not be empty ('local' or the address of a Ray cluster)")


@dataclass(frozen=True)
class AgentConfig:
    gpu_backend: str = _f("simulated", choices=("simulated", "nvml"))
    """"simulated" (no GPU needed, faults injectable) or "nvml" (real GPUs through pynvml)."""
    gpus_per_host: int = _f(2, ge=1)
    """GPUs per simulated host (the NVML backend counts the real ones)."""
    interval_s: float = _f(0.5, gt=0)
    """Sampling and heartbeat period."""
    metrics_port: int = _f(0, ge=0, le=65535)
    """Port of the agent's Prometheus /metrics endpoint; 0 picks a free one (reported in heartbeats)."""
    metrics_host: str = "127.0.0.1"
    kernel_log: str = "/dev/kmsg"
    """Kernel log to watch: /dev/kmsg, a file such as /var/log/kern.log, or "" to disable."""
    sys_root: str = "/sys"
    """Where NIC (class/net) and InfiniBand (class/infiniband) state is read."""
    host_rules: str = ""
    """Rules file (the format of evidence/rules.toml); empty means the packaged rules."""
    min_disk_free_ratio: float = _f(0.05, ge=0, lt=1)
    """Below this free share of the checkpoint file system the host reports DiskPressure."""
    straggler_relative: float = _f(1.10, gt=1)
    """Before a rank has a usual pace: a rank whose own work in a step is this many times its peers' in the same
    step is a straggler (after that, a statistical test against its usual ratio: agents/drift.py)."""
    straggler_individual: float = _f(1.10, gt=1)
    """A rank slower than its own usual by this factor is a straggler even within its noise (with no peers on its
    node, only when its GPU shows why: held-down clocks, a thermal or power limit)."""
    drift_window: int = _f(2000, ge=1)
    """Samples kept per node for stragglers and the throughput-vs-temperature fit."""
    samples_every_s: float = _f(10.0, ge=0)
    """GPU samples travel to the controller this often (and with any evidence); Prometheus scrapes every reading.
    0 sends them with every heartbeat."""

    def __post_init__(self) -> None:
        _validate(self, "agent")


@dataclass(frozen=True)
class TrainerConfig:
    model: str = _f("tiny", choices=tuple(MODEL_CONTEXT))
    """Named size: tiny (laptop), small (~19M parameters), 8B, 70B, 405B (the paper's)."""
    seq_len: int = _f(128, ge=1)
    """Tokens per sequence; at most the model's context (MODEL_CONTEXT)."""
    batch_size: int = _f(4, ge=1)
    """Sequences per rank per step."""
    steps: int = _f(60, ge=1)
    """Target step: the job is done when it is reached."""
    lr: float = _f(3e-3, gt=0)
    warmup_steps: int = _f(5, ge=0)
    seed: int = _f(1234, ge=0)
    """Seeds torch (which takes at most 64 bits) and the data order."""
    checkpoint_every: int = _f(5, ge=1)
    """Steps between sharded checkpoints."""
    keep_checkpoints: int = _f(3, ge=1)
    ranks_per_host: int = _f(1, ge=1)
    collective_timeout_s: float = _f(30.0, gt=0)
    """A collective that does not complete in this time fails the rank (a hang becomes an error)."""
    rejoin_wait_s: float = _f(60.0, gt=0)
    """In-process restart: how long a rank that saw a peer fail keeps its process waiting for the controller's
    order to rejoin the next attempt, before it exits (must exceed the controller's time to a verdict)."""
    fr_buffer_size: int = _f(2000, ge=0)
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
    sdc_check_every: int = _f(1, ge=0)
    """Check every this many steps that no rank's parameters changed outside the optimizer (0: off)."""
    entrypoint: str = ""
    """A trainer of your own instead of the embedded Llama 3: the command each rank runs, e.g. "python -m my_train
    --lr 3e-4" (herdsman/contract.py: the environment it gets, what it reports). Empty: the embedded trainer."""

    def __post_init__(self) -> None:
        _validate(self, "trainer")
        context = MODEL_CONTEXT[self.model]
        _check(self.seq_len <= context,
               f"trainer.seq_len = {self.seq_len} is beyond the context of model {self.model!r} ({context})")
        try:  # the trainer fills it in with str.format: plain {job}, {host} and {run_dir} only, no format specs
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(self.memory_dir)
                      if name is not None]
        except ValueError:
            fields = [("", "", None)]
        _check(all(name in ("job", "host", "run_dir") and not spec and conv is None for name, spec, conv in fields),
               f"trainer.memory_dir = {_show(self.memory_dir)} may use only the placeholders {{job}}, {{host}} and "
               "{run_dir} (write {{ and }} for literal braces)")


@dataclass(frozen=True)
class ControllerConfig:
    poll_interval_s: float = _f(0.25, gt=0)
    """How often the control loop polls the trainer ranks."""
    failure_grace_s: float = 1.0
    """After the first rank fails, wait this long for evidence from the agents before deciding (0: decide at
    once)."""
    evidence_window_s: float = _f(60.0, gt=0)
    """Evidence older than this before the failure is not considered."""
    max_restarts: int = _f(10, ge=0)
    """Restart budget of one job."""
    restart_backoff_s: float = 0.5
    """First backoff before a restart; doubles for each consecutive failure without progress."""
    heartbeat_timeout_s: float = _f(10.0, gt=0)
    """A host whose agent is silent this long is unreachable (must exceed agent.interval_s)."""
    lemon_window_s: float = _f(86400.0, gt=0)
    """A host implicated lemon_threshold times within this window is kept out as a lemon (mostly a fault a wrong
    verdict left in service, failing again: broken, if not a lemon; the likelihood test below finds lemons)."""
    lemon_threshold: int = _f(3, ge=1)
    lemon_factor: float = _f(15.0, ge=1)
    """The lemon hypothesis: a lemon fails this many times as often as a normal host ..."""
    lemon_warning_factor: float = _f(5.0, ge=1)
    """... and shows precursors (correctable ECC bursts, PCIe replays, link flaps) this many times as often."""
    lemon_prior_share: float = _f(0.02, gt=0, lt=1)
    """Share of lemons expected in the fleet. A host is flagged at 99:1 posterior odds of being one: a flag sends
    it to RMA, and at 9:1 one flag in ten may be healthy (see orchestrator/policy.py, LemonDetector)."""
    drain_timeout_s: float = 120.0
    """How long a drain waits for the fresh checkpoint before taking the host out anyway."""
    hang_timeout_s: float = _f(120.0, gt=0)
    """No completed step for this long while every rank is alive is a hang: dumps are taken, the group restarted."""
    hang_factor: float = _f(10.0, ge=1)
    """Sooner, once the attempt has steady steps: no step for hang_factor x the longest of its last 50 step
    intervals (checkpoint stalls included) ..."""
    hang_floor_s: float = _f(10.0, gt=0)
    """... but never under this (the NCCL watchdog's default is 600 s; a stuck collective is found in seconds)."""
    hang_suspect_s: float = _f(3.0, ge=0)
    """Sooner still with the flight recorder's word: after no step for max(hang_suspect_s, hang_suspect_factor x the
    same pace) the controller looks at every rank's flight recorder each hang_confirm_s; the same ranks missing from
    the same stuck collective in two looks in a row, with still no step, is a hang (0: off)."""
    hang_suspect_factor: float = _f(3.0, ge=1)
    hang_confirm_s: float = _f(1.0, gt=0)
    startup_timeout_s: float = _f(120.0, gt=0)
    """An attempt whose first step has not completed after this long is hung (start, rendezvous, restore)."""
    dump_wait_s: float = 3.0
    """How long to wait for live ranks to write their flight-recorder dumps after asking."""
    controller_restarts: int = _f(3, ge=-1)
    """How often Ray restarts a controller whose process died; the new one carries on from the store (-1: always)."""
    relay_fanout: int = _f(64, ge=0)
    """Hosts per report relay: a fleet of more hosts than this reports through relays (Ray actors that batch
    agents' frames into one call); 0 means agents always call the controller directly."""
    relay_flush_s: float = _f(0.1, gt=0)
    """How long a relay gathers frames before forwarding them (fatal evidence is forwarded at once)."""
    warm_standby: bool = True
    """Keep one pre-imported trainer process per rank ready, so a restart skips the ~2 s torch import."""
    inprocess_restart: bool = True
    """After a failure that needs no new host (a rank's exception or death, a hang), the ranks still alive keep
    their processes and rejoin the next attempt in-process (re-formed process group, restore from the memory
    tier); only the dead ranks are started anew. Falls back to restarting every process when that fails."""
    warm_spares: int = _f(1, ge=0)
    """Spare hosts kept warm once the job trains: rank actors with a pre-imported standby trainer each, so a restart
    that evicts a host onto a spare costs what a same-host restart costs (0: spares start cold)."""

    def __post_init__(self) -> None:
        _validate(self, "controller")


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    """Where the controller serves its HTTP API (and, later, the operator page)."""
    port: int = _f(0, ge=0, le=65535)
    """0 picks a free port (shown in `herdsman` output and the job status)."""
    token: str = _f("", secret="token")
    """Operator token for mutating calls (at least 16 characters); empty generates one into <run_dir>/api_token."""
    docs: bool = False
    """Serve the interactive API docs (/docs, /redoc, /openapi.json); off by default, they map the attack surface."""

    def __post_init__(self) -> None:
        _validate(self, "api")
        _check(self.token == "" or (len(self.token) >= MIN_TOKEN_CHARS and self.token.isascii()
                                    and self.token.isprintable() and " " not in self.token),
               f"api.token must be empty (a random one is generated) or at least {MIN_TOKEN_CHARS} printable ASCII "
               f"characters without spaces (got {len(self.token)} characters)")


@dataclass(frozen=True)
class StoreConfig:
    url: str = _f("", secret="url")
    """SQLAlchemy URL; empty means a SQLite file in the run directory. PostgreSQL: postgresql+psycopg://..."""

    def __post_init__(self) -> None:
        _validate(self, "store")
        _check(self.url == "" or re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", self.url) is not None,
               f"store.url = {_show(self.url, 'url')} is not an SQLAlchemy URL (dialect[+driver]://..., e.g. "
               "sqlite:///path/herdsman.db or postgresql+psycopg://user@host/db)")


@dataclass(frozen=True)
class SimulateConfig:
    """The fleet-scale simulator (`herdsman simulate`). Defaults: Llama 3 405B's run as the paper and common
    practice describe it (16,384 GPUs, 54 days, Table 5 failure rates, checkpoint every 30 min, restart in minutes).
    """

    gpus: int = _f(16384, ge=1)
    gpus_per_host: int = _f(8, ge=1)
    days: float = _f(54.0, gt=0)
    spare_hosts: int = _f(64, ge=0)
    """Healthy idle hosts that can replace evicted ones."""
    failure_scale: float = _f(1.0, ge=0)
    """Multiplier on every Table 5 failure rate (2.0 = twice as many failures)."""
    planned_per_day: float = _f(47 / 54, ge=0)
    """Planned interruptions (firmware, config, dataset updates): checkpoint, drain, restart."""
    lemon_share: float = _f(0.02, ge=0, lt=1)
    """Share of hosts that fail far more often than the rest."""
    lemon_factor: float = _f(15.0, ge=1)
    """A lemon's failure rate over a normal host's (the fleet-wide mean stays at Table 5's rate)."""
    checkpoint_interval_s: float = _f(1800.0, gt=0)
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
    restart_budget: int = _f(1000, ge=0)
    """Automatic restarts before a human must look (reset by each human intervention)."""
    lemon_window_s: float = _f(14 * 86400.0, gt=0)
    lemon_threshold: int = _f(3, ge=1)
    """The detector's count rule (the controller's own, see [controller]); its likelihood test runs beside it."""
    history_days: float = _f(30.0, ge=0)
    """Days the fleet served other jobs before this one: what the store remembers of each host (failures and
    precursors) when the job starts, and lemons already found in that time."""
    precursor_per_day: float = _f(0.05, ge=0)
    """Precursors a normal host shows per day (correctable ECC bursts, PCIe replays, link flaps, recoverable Xids)."""
    lemon_precursor_factor: float = _f(5.0, ge=1)
    """How much more often a lemon shows them (an assumption: see the README's lemon sweep)."""
    step_s: float = _f(15.0, gt=0)
    """One training step; checkpoints land on step boundaries and an interruption loses whole steps."""
    diagnosis: str = _f("perfect", choices=("perfect", "measured"))
    """"perfect": every verdict right; "measured": verdicts drawn from the confusion `herdsman diagnose --eval`
    measured on the public corpus (orchestrator/diagnosis_confusion.json)."""
    refail_s: float = _f(3600.0, gt=0)
    """A faulty host kept in the job by a wrong verdict fails again after this long on average."""
    seed: int = 0

    def __post_init__(self) -> None:
        _validate(self, "simulate")
        _check(self.gpus >= self.gpus_per_host,
               f"simulate.gpus = {self.gpus} must be >= simulate.gpus_per_host ({self.gpus_per_host})")


@dataclass(frozen=True)
class HerdsmanConfig:
    run_dir: str = "herdsman-run"
    """Checkpoints, trainer stats, logs and the default database live here."""
    job: str = "llama3-demo"
    """Job name: letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters (it names
    the job's checkpoint directory)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)

    def __post_init__(self) -> None:
        _validate(self, "")
        _check(self.run_dir.strip() != "", "run_dir must not be empty")
        _check(JOB_NAME.fullmatch(self.job) is not None and self.job not in (".", ".."),
               f"job = {_show(self.job)} is not a valid job name: use 1 to 64 letters, digits, '.', '_' or '-', "
               "starting with a letter or digit")
        _check(self.controller.heartbeat_timeout_s > self.agent.interval_s,
               f"controller.heartbeat_timeout_s = {self.controller.heartbeat_timeout_s!r} must be longer than "
               f"agent.interval_s ({self.agent.interval_s!r}), the heartbeat period")

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{Path(self.run_dir).resolve() / 'herdsman.db'}"

    @property
    def checkpoint_dir(self) -> Path:
        return layout.checkpoint_dir(self.run_dir, self.job)


def config_secrets(cfg: HerdsmanConfig) -> list[str]:
    """The literal secrets a configuration holds, for log redaction: the API token and the store URL's password
    (one under 6 characters is left out: hiding every occurrence of "pw" would mangle the logs; inside a URL the
    redaction hides it anyway)."""
    password = url_password(cfg.store.url)
    return [s for s in (cfg.api.token, password if len(password) >= 6 else "") if s]


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r} (known: {', '.join(sorted(fields))})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} must be a table [{name}]")
            kwargs[key] = _build(typ, value, name)
        elif typ is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                kwargs[key] = float(value)
            except OverflowError:
                raise ConfigError(f"{name} = {_show(value)} is too large for a float") from None
        else:
            kwargs[key] = value  # types and ranges: _validate, from the section's __post_init__
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> HerdsmanConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"the configuration must be a table, got {type(data).__name__}")
    return _build(HerdsmanConfig, data, "")


def loads_config(text: str) -> HerdsmanConfig:
    """A configuration from TOML text (e.g. the one a job was submitted with, as the store keeps it)."""
    try:
        return from_dict(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"configuration text is not valid TOML: {str(e).splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> HerdsmanConfig:
    """Defaults, then the TOML file (if any), then `overrides` (nested dicts, e.g. from the CLI or tests)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {p} is a directory") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                              f"{e.start})") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
        except ValueError as e:  # an integer literal of thousands of digits
            raise ConfigError(f"config file {p} is not valid TOML: {str(e).splitlines()[0]}") from None
        except RecursionError:
            raise ConfigError(f"config file {p} is not valid TOML: arrays or tables nested too deeply") from None
    if overrides:
        data = _merge(data, overrides)
    return from_dict(data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_toml(cfg: HerdsmanConfig, redact: bool = True) -> str:
    """The configuration as a TOML file (for `herdsman config` and the controller's resolved copy), every default
    visible. With `redact` (the default) no secret is written: the API token comes out empty and the store URL's
    password as ***; a comment at the top says what was left out. The text loads back either way."""
    top, tables, hidden = [], [], []

    def value_of(section: str, f: dataclasses.Field[Any], v: Any) -> str:
        secret = f.metadata.get("secret")
        if redact and secret == "token" and v:
            hidden.append(f"{section}.{f.name}")
            v = ""
        elif redact and secret == "url" and redact_url(v) != v:
            hidden.append(f"the password in {section}.{f.name}")
            v = redact_url(v)
        return _toml_value(v)

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            lines = [f"[{f.name}]"] + [f"{g.name} = {value_of(f.name, g, getattr(v, g.name))}"
                                       for g in dataclasses.fields(v)]
            tables.append("\n".join(lines))
        else:
            top.append(f"{f.name} = {_toml_value(v)}")
    head = f"# secrets left out: {', '.join(hidden)}\n" if hidden else ""
    return head + "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                             for c in v) + '"'
    return repr(v)

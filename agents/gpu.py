"""The GPU probe interface, shared by the NVML probe (real GPUs) and the simulation (laptops, CI, faults).

A probe gives a GpuSample per device (None where a field is not available) and the events seen since the last
poll (Xid errors, lost devices). Nothing here knows about trainers or controllers.
"""

from __future__ import annotations

from typing import Callable, Protocol

from herdsman import HerdsmanError
from herdsman.events import Evidence, EvidenceKind, GpuSample, Severity
from herdsman.xid import lookup as xid_lookup

# Clock-event (throttle) reasons, in NVML's bit order (nvmlClocksEventReason*).
THROTTLE_REASONS = ("gpu_idle", "applications_clocks", "sw_power_cap", "hw_slowdown", "sync_boost",
                    "sw_thermal", "hw_thermal", "hw_power_brake")
THERMAL_REASONS = ("sw_thermal", "hw_thermal")


class GpuProbeError(HerdsmanError):
    pass


class GpuProbe(Protocol):
    host: str

    def device_count(self) -> int: ...

    def sample(self) -> list[GpuSample]: ...

    def poll_events(self) -> list[Evidence]: ...

    def close(self) -> None: ...


def xid_evidence(host: str, gpu: int, code: int, when: float, detail: str = "") -> Evidence:
    x = xid_lookup(code)
    meaning = x.meaning if x else "unlisted Xid"
    fatal = bool(x and x.fatal)
    return Evidence(host, EvidenceKind.GPU_XID, when, f"Xid {code}: {meaning}{' ' + detail if detail else ''}",
                    Severity.CRITICAL if fatal else Severity.WARNING, gpu=gpu, code=code)


def make_probe(backend: str, host: str, gpus: int, seed: int = 0,
               on_fatal: Callable[[int, str], None] | None = None) -> GpuProbe:
    if backend == "nvml":
        from agents.gpu_nvml import NvmlProbe

        return NvmlProbe(host)
    from agents.gpu_sim import SimulatedGpus

    return SimulatedGpus(host, gpus, seed, on_fatal)

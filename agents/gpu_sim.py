"""Simulated H100s: the same fields as NVML, a first-order thermal model, and every fault NVML can report.

Temperature relaxes towards ambient + load heating / cooling; at 87 C the hardware thermal slowdown engages and
the SM clock falls, as on a GPU whose heat sink or thermal interface has failed. Faults are injected with
`inject(gpu, fault, **args)` (see FAULTS); a fatal one calls `on_fatal(gpu, message)`, which the agent uses to end
the processes on that device, as a real fatal Xid does.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable

from herdsman.events import (ECC_COUNTERS, NVLINK_ERRORS, Evidence, EvidenceKind, GpuSample, Severity)
from herdsman.xid import lookup as xid_lookup
from agents.gpu import xid_evidence

MAX_SM_MHZ, MAX_MEM_MHZ, SLOWDOWN_C, TDP_W = 1980.0, 2619.0, 87.0, 700.0

FAULTS = ("xid", "ecc", "retire_page", "row_remap", "pcie_replay", "nvlink", "thermal", "power_brake",
          "power_cap", "lost", "clear")


class _Gpu:
    def __init__(self, index: int, uuid: str, rng: random.Random):
        self.index, self.uuid = index, uuid
        self.temp = 35.0 + rng.random() * 3
        self.ambient = 30.0
        self.cooling = 1.0  # 1 = healthy heat sink; lower = failing thermal interface
        self.util = 0.0
        self.power_brake = self.power_cap = self.lost = False
        self.energy_j = 0.0
        self.violation = {"power": 0.0, "thermal": 0.0}
        self.ecc = {f"{c}_{loc}_{t}": 0 for c in ECC_COUNTERS for loc in ("sram", "dram")
                    for t in ("corrected", "uncorrected")}
        self.retired = {"sbe": 0, "dbe": 0}
        self.retired_pending = False
        self.rows = {"correctable": 0, "uncorrectable": 0}
        self.remap_pending = self.remap_failure = False
        self.pcie_replay = 0
        self.nvlink = {k: 0 for k in NVLINK_ERRORS}
        self.xids: dict[int, int] = {}
        self.last_t = time.monotonic()


class SimulatedGpus:
    def __init__(self, host: str, count: int = 2, seed: int = 0,
                 on_fatal: Callable[[int, str], None] | None = None):
        self.host = host
        rng = random.Random(f"{host}-{seed}")
        self._gpus = [_Gpu(i, f"GPU-sim-{host}-{i}", rng) for i in range(count)]
        self._events: list[Evidence] = []
        self._lock = threading.Lock()
        self.on_fatal = on_fatal

    def device_count(self) -> int:
        return len(self._gpus)

    def set_load(self, gpu: int, util: float) -> None:
        with self._lock:
            self._gpus[gpu].util = max(0.0, min(1.0, util))

    def set_ambient(self, gpu: int, celsius: float) -> None:
        """Machine-room temperature at the inlet (the diurnal swing acts through this)."""
        with self._lock:
            self._gpus[gpu].ambient = celsius

    # --- the physics ---------------------------------------------------------------------------------------
    def _clock(self, g: _Gpu) -> tuple[float, tuple[str, ...], dict[str, bool]]:
        reasons: list[str] = [] if g.util > 0 else ["gpu_idle"]
        sm, held = MAX_SM_MHZ, {"power": False, "thermal": False}
        if g.temp >= SLOWDOWN_C:
            reasons += ["hw_slowdown", "hw_thermal"]
            sm = min(sm, max(345.0, MAX_SM_MHZ * (1 - (g.temp - SLOWDOWN_C) / 20)))
            held["thermal"] = True
        elif g.temp >= SLOWDOWN_C - 4:  # the driver's software thermal control starts first
            reasons.append("sw_thermal")
            sm = min(sm, MAX_SM_MHZ * 0.95)
            held["thermal"] = True
        if g.power_brake:
            reasons += ["hw_slowdown", "hw_power_brake"]
            sm = min(sm, 345.0)
            held["power"] = True
        if g.power_cap:
            reasons.append("sw_power_cap")
            sm = min(sm, MAX_SM_MHZ * 0.8)
            held["power"] = True
        # Silicon leaks more when hot: DVFS trims clocks a little with temperature even below the slowdown point,
        # which is how a hot afternoon costs a fleet 1-2% of throughput.
        sm = min(sm, MAX_SM_MHZ * (1 - max(0.0, g.temp - 60) * 0.001))
        return round(sm, 1), tuple(dict.fromkeys(reasons)), held

    def _advance(self, g: _Gpu) -> None:
        now = time.monotonic()
        dt, g.last_t = now - g.last_t, now
        # healthy: ~40 C idle, ~75 C at full load; a failing heat sink multiplies the rise (capped near shutdown)
        target = min(105.0, g.ambient + (10.0 + 35.0 * g.util) / max(g.cooling, 0.05))
        g.temp += (target - g.temp) * min(1.0, dt / 5.0)  # ~5 s time constant
        _, _, held = self._clock(g)
        for k, v in held.items():
            if v:
                g.violation[k] += dt
        g.energy_j += self._power(g) * dt

    def _power(self, g: _Gpu) -> float:
        return 70.0 + (TDP_W - 70.0) * g.util * (0.5 if g.power_brake else 1.0)

    def sample(self) -> list[GpuSample]:
        with self._lock:
            return [self._sample(g) for g in self._gpus]

    def _sample(self, g: _Gpu) -> GpuSample:
        if g.lost:
            return GpuSample(g.index, g.uuid, "NVIDIA H100 (simulated)", lost=True, xid_counts=dict(g.xids))
        self._advance(g)
        sm, reasons, _ = self._clock(g)
        return GpuSample(
            index=g.index, uuid=g.uuid, name="NVIDIA H100 (simulated)", temperature_c=round(g.temp, 2),
            memory_temperature_c=round(g.temp + 5, 2), sm_clock_mhz=sm, max_sm_clock_mhz=MAX_SM_MHZ,
            mem_clock_mhz=MAX_MEM_MHZ, power_w=round(self._power(g), 1), energy_j=round(g.energy_j, 3),
            utilization_pct=100 * g.util, memory_used_bytes=int(g.util * 60e9), throttle_reasons=reasons,
            violation_s={k: round(v, 3) for k, v in g.violation.items()}, ecc=dict(g.ecc),
            retired_pages_sbe=g.retired["sbe"], retired_pages_dbe=g.retired["dbe"],
            retired_pages_pending=g.retired_pending, remapped_rows_correctable=g.rows["correctable"],
            remapped_rows_uncorrectable=g.rows["uncorrectable"], row_remap_pending=g.remap_pending,
            row_remap_failure=g.remap_failure, pcie_replay_count=g.pcie_replay, nvlink_errors=dict(g.nvlink),
            xid_counts=dict(g.xids),
        )

    def poll_events(self) -> list[Evidence]:
        with self._lock:
            ev, self._events = self._events, []
            return ev

    # --- faults ----------------------------------------------------------------------------------------------
    def inject(self, gpu: int, fault: str, **args: Any) -> str:
        """Inject one fault; returns a line describing it. Raises ValueError for unknown faults or arguments."""
        if fault not in FAULTS:
            raise ValueError(f"unknown GPU fault {fault!r} (known: {', '.join(FAULTS)})")
        if not 0 <= gpu < len(self._gpus):
            raise ValueError(f"no gpu{gpu} on {self.host} ({len(self._gpus)} GPUs)")
        fatal: list[str] = []
        with self._lock:
            g = self._gpus[gpu]
            line = getattr(self, f"_inject_{fault}")(g, fatal, **args)
        for message in fatal:
            if self.on_fatal:
                self.on_fatal(gpu, message)
        return f"{self.host} gpu{gpu}: {line}"

    def _xid(self, g: _Gpu, code: int, fatal: list[str]) -> Evidence:
        g.xids[code] = g.xids.get(code, 0) + 1
        ev = xid_evidence(self.host, g.index, code, time.time())
        self._events.append(ev)
        x = xid_lookup(code)
        if x and x.fatal:
            fatal.append(ev.message)
        return ev

    def _inject_xid(self, g: _Gpu, fatal: list[str], code: int) -> str:
        # the counters a real device moves along with each Xid
        if code == 48:
            self._count_ecc(g, "dram", "uncorrected", 1)
            g.remap_pending = True
        elif code == 63:
            g.remap_pending = True
        elif code == 64:
            g.remap_failure = True
        elif code in (94, 95):
            self._count_ecc(g, "sram", "uncorrected", 1)
        elif code == 92:
            self._count_ecc(g, "dram", "corrected", 100)
        elif code == 74:
            g.nvlink["replay"] += 10
            g.nvlink["recovery"] += 1
        ev = self._xid(g, code, fatal)
        if code == 79:
            self._lose(g)
        return ev.message

    def _lose(self, g: _Gpu) -> None:
        if not g.lost:
            g.lost = True
            self._events.append(Evidence(self.host, EvidenceKind.GPU_LOST, time.time(), "GPU is lost",
                                         Severity.CRITICAL, gpu=g.index))

    def _count_ecc(self, g: _Gpu, memory: str, kind: str, count: int) -> None:
        for c in ECC_COUNTERS:
            g.ecc[f"{c}_{memory}_{kind}"] += count

    def _inject_ecc(self, g: _Gpu, fatal: list[str], memory: str = "dram", uncorrected: bool = True,
                    count: int = 1) -> str:
        if memory not in ("sram", "dram"):
            raise ValueError("memory must be 'sram' or 'dram'")
        kind = "uncorrected" if uncorrected else "corrected"
        self._count_ecc(g, memory, kind, count)
        return f"{count} {memory.upper()} {kind} ECC error(s)"

    def _inject_retire_page(self, g: _Gpu, fatal: list[str], cause: str = "dbe", pending: bool = True) -> str:
        if cause not in g.retired:
            raise ValueError("cause must be 'sbe' or 'dbe'")
        g.retired[cause] += 1
        g.retired_pending = pending
        return f"page retired ({cause}){', pending reset' if pending else ''}"

    def _inject_row_remap(self, g: _Gpu, fatal: list[str], uncorrectable: bool = True, failure: bool = False) -> str:
        g.rows["uncorrectable" if uncorrectable else "correctable"] += 1
        if failure:
            self._inject_xid(g, fatal, 64)
            return "row remapping failed"
        g.remap_pending = True
        self._xid(g, 63, fatal)
        return "row remap pending"

    def _inject_pcie_replay(self, g: _Gpu, fatal: list[str], count: int = 100) -> str:
        g.pcie_replay += count
        return f"{count} PCIe replays"

    def _inject_nvlink(self, g: _Gpu, fatal: list[str], kind: str = "crc_flit", count: int = 10) -> str:
        if kind not in g.nvlink:
            raise ValueError(f"kind must be one of {', '.join(NVLINK_ERRORS)}")
        g.nvlink[kind] += count
        return f"{count} NVLink {kind} errors"

    def _inject_thermal(self, g: _Gpu, fatal: list[str], cooling: float = 0.25) -> str:
        g.cooling = cooling
        return f"thermal interface failing (cooling {cooling:.0%})"

    def _inject_power_brake(self, g: _Gpu, fatal: list[str], on: bool = True) -> str:
        g.power_brake = on
        return f"power brake {'asserted' if on else 'released'}"

    def _inject_power_cap(self, g: _Gpu, fatal: list[str], on: bool = True) -> str:
        g.power_cap = on
        return f"software power cap {'on' if on else 'off'}"

    def _inject_lost(self, g: _Gpu, fatal: list[str]) -> str:
        self._lose(g)
        fatal.append("GPU is lost")
        return "GPU is lost"

    def _inject_clear(self, g: _Gpu, fatal: list[str]) -> str:
        """A GPU reset: volatile counters and pending states clear, the device returns; aggregates stay."""
        g.lost = g.power_brake = g.power_cap = False
        g.cooling = 1.0
        g.remap_pending = g.retired_pending = False
        for k in g.ecc:
            if k.startswith("volatile"):
                g.ecc[k] = 0
        return "reset"

    def close(self) -> None:
        pass

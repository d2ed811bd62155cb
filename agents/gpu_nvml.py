"""Real GPUs through pynvml (NVIDIA's nvidia-ml-py). Every field a driver or device does not support reads as
None ("not available"), never a crash; a device that falls off the bus is reported lost."""

from __future__ import annotations

import time
from typing import Any, Callable

from herdsman.events import (ECC_COUNTERS, ECC_LOCATIONS, ECC_TYPES, NVLINK_ERRORS, Evidence, EvidenceKind,
                             GpuSample, Severity)
from agents.gpu import THROTTLE_REASONS, GpuProbeError, xid_evidence


class NvmlProbe:
    def __init__(self, host: str, nvml: Any = None):
        """`nvml` is the pynvml module (a stand-in in tests of the degradation paths)."""
        self.host = host
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:  # pragma: no cover - a declared dependency
                raise GpuProbeError(f"pynvml is not installed: {e}") from None
        self.nv = nv = nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError as e:
            raise GpuProbeError(f"NVML is not available on {host} (no NVIDIA driver?): {e}") from None
        self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
        self._uuids = [self._get(lambda h=h: _str(nv.nvmlDeviceGetUUID(h))) or f"GPU-{i}"
                       for i, h in enumerate(self._handles)]
        self._xids: list[dict[int, int]] = [{} for _ in self._handles]
        self._lost = [False] * len(self._handles)
        self._pending: list[Evidence] = []
        self._reason_bits = tuple(getattr(nv, f"nvmlClocksEventReason{n}") for n in (
            "GpuIdle", "ApplicationsClocksSetting", "SwPowerCap", "HwSlowdown", "SyncBoost", "SwThermalSlowdown",
            "HwThermalSlowdown", "HwPowerBrakeSlowdown"))
        self._events = None
        try:
            self._events = nv.nvmlEventSetCreate()
            for h in self._handles:
                try:
                    nv.nvmlDeviceRegisterEvents(h, nv.nvmlEventTypeXidCriticalError, self._events)
                except nv.NVMLError:
                    pass  # this device cannot deliver Xid events (e.g. inside some containers)
        except nv.NVMLError:
            self._events = None

    def device_count(self) -> int:
        return len(self._handles)

    def _get(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self.nv.NVMLError_GpuIsLost:
            raise
        except self.nv.NVMLError:
            return None

    def _sample_one(self, i: int, h: Any) -> GpuSample:
        nv = self.nv
        try:
            name = _str(nv.nvmlDeviceGetName(h))
            return self._read(i, h, name)
        except nv.NVMLError_GpuIsLost:
            self._mark_lost(i)
            return GpuSample(i, self._uuids[i], lost=True, xid_counts=dict(self._xids[i]))
        except nv.NVMLError:
            return self._read(i, h, "")

    def _read(self, i: int, h: Any, name: str) -> GpuSample:
        nv, get = self.nv, self._get
        mask = get(lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(h))
        reasons = tuple(r for bit, r in zip(self._reason_bits, THROTTLE_REASONS) if mask is not None and mask & bit)
        ecc = {}
        for c, counter in zip(ECC_COUNTERS, (nv.NVML_VOLATILE_ECC, nv.NVML_AGGREGATE_ECC)):
            for loc, location in zip(ECC_LOCATIONS, (nv.NVML_MEMORY_LOCATION_SRAM, nv.NVML_MEMORY_LOCATION_DRAM)):
                for t, kind in zip(ECC_TYPES, (nv.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                                               nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)):
                    v = get(lambda: nv.nvmlDeviceGetMemoryErrorCounter(h, kind, counter, location))
                    if v is not None:
                        ecc[f"{c}_{loc}_{t}"] = int(v)
        violation = {}
        for pol, policy in (("power", nv.NVML_PERF_POLICY_POWER), ("thermal", nv.NVML_PERF_POLICY_THERMAL)):
            v = get(lambda: nv.nvmlDeviceGetViolationStatus(h, policy))
            if v is not None:
                violation[pol] = v.violationTime / 1e9
        rows = get(lambda: nv.nvmlDeviceGetRemappedRows(h))
        power, energy = get(lambda: nv.nvmlDeviceGetPowerUsage(h)), get(lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h))
        sbe = get(lambda: nv.nvmlDeviceGetRetiredPages(h, nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS))
        dbe = get(lambda: nv.nvmlDeviceGetRetiredPages(h, nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR))
        pending = get(lambda: nv.nvmlDeviceGetRetiredPagesPendingStatus(h))
        return GpuSample(
            index=i, uuid=self._uuids[i], name=name,
            temperature_c=get(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            memory_temperature_c=self._field(h, nv.NVML_FI_DEV_MEMORY_TEMP),
            sm_clock_mhz=get(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            max_sm_clock_mhz=get(lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
            mem_clock_mhz=get(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
            power_w=None if power is None else power / 1000.0,
            energy_j=None if energy is None else energy / 1000.0,
            utilization_pct=get(lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
            memory_used_bytes=get(lambda: nv.nvmlDeviceGetMemoryInfo(h).used),
            throttle_reasons=reasons, violation_s=violation, ecc=ecc,
            retired_pages_sbe=None if sbe is None else len(sbe), retired_pages_dbe=None if dbe is None else len(dbe),
            retired_pages_pending=None if pending is None else pending == nv.NVML_FEATURE_ENABLED,
            remapped_rows_correctable=None if rows is None else rows[0],
            remapped_rows_uncorrectable=None if rows is None else rows[1],
            row_remap_pending=None if rows is None else bool(rows[2]),
            row_remap_failure=None if rows is None else bool(rows[3]),
            pcie_replay_count=get(lambda: nv.nvmlDeviceGetPcieReplayCounter(h)),
            nvlink_errors=self._nvlink(h), xid_counts=dict(self._xids[i]),
        )

    def _field(self, h: Any, field_id: int) -> float | None:
        v = self._get(lambda: self.nv.nvmlDeviceGetFieldValues(h, [field_id]))
        if v is None or v[0].nvmlReturn != self.nv.NVML_SUCCESS:
            return None
        return float(v[0].value.uiVal)

    def _nvlink(self, h: Any) -> dict[str, int]:
        nv, out = self.nv, {}
        for link in range(nv.NVML_NVLINK_MAX_LINKS):
            if self._get(lambda: nv.nvmlDeviceGetNvLinkState(h, link)) != nv.NVML_FEATURE_ENABLED:
                continue
            for name, counter in zip(NVLINK_ERRORS, (nv.NVML_NVLINK_ERROR_DL_REPLAY, nv.NVML_NVLINK_ERROR_DL_RECOVERY,
                                                     nv.NVML_NVLINK_ERROR_DL_CRC_FLIT, nv.NVML_NVLINK_ERROR_DL_CRC_DATA)):
                v = self._get(lambda: nv.nvmlDeviceGetNvLinkErrorCounter(h, link, counter))
                if v is not None:
                    out[name] = out.get(name, 0) + int(v)
        return out

    def _mark_lost(self, i: int) -> None:
        if not self._lost[i]:
            self._lost[i] = True
            self._pending.append(Evidence(self.host, EvidenceKind.GPU_LOST, time.time(),
                                          "NVML reports GPU is lost", Severity.CRITICAL, gpu=i))

    def sample(self) -> list[GpuSample]:
        return [self._sample_one(i, h) for i, h in enumerate(self._handles)]

    def poll_events(self) -> list[Evidence]:
        nv, out = self.nv, []
        while self._events is not None:
            try:
                data = nv.nvmlEventSetWait_v2(self._events, 0)
            except nv.NVMLError:  # Timeout: nothing pending
                break
            try:
                i = nv.nvmlDeviceGetIndex(data.device)
            except nv.NVMLError:
                i = 0
            code = int(data.eventData)
            self._xids[i][code] = self._xids[i].get(code, 0) + 1
            out.append(xid_evidence(self.host, i, code, time.time()))
        out += self._pending
        self._pending = []
        return out

    def close(self) -> None:
        try:
            if self._events is not None:
                self.nv.nvmlEventSetFree(self._events)
            self.nv.nvmlShutdown()
        except self.nv.NVMLError:
            pass


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)

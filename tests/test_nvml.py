"""NvmlProbe against a stand-in for the driver with pynvml's API: unsupported fields read as None, a GPU that
falls off the bus is reported lost, Xid events are counted per code. (On a GPU machine the same probe runs
against the real driver; see the device notes.)"""

import types

import pynvml
import pytest

from agents.gpu_nvml import NvmlProbe
from herdsman.events import EvidenceKind


class FakeDriver(types.SimpleNamespace):
    """The subset of pynvml NvmlProbe calls, over two GPUs. `unsupported` names calls that raise NotSupported."""

    def __init__(self, unsupported=(), lost=()):
        consts = {k: getattr(pynvml, k) for k in dir(pynvml) if k.startswith(("NVML_", "nvmlClocksEventReason",
                                                                               "nvmlEventType"))}
        super().__init__(**consts)
        self.NVMLError, self.NVMLError_GpuIsLost = pynvml.NVMLError, pynvml.NVMLError_GpuIsLost
        self.NVMLError_Timeout = pynvml.NVMLError_Timeout
        self.unsupported, self.lost, self.xids = set(unsupported), set(lost), []

    def _call(self, name, h, value):
        if h in self.lost:
            raise pynvml.NVMLError_GpuIsLost()
        if name in self.unsupported:
            raise pynvml.NVMLError_NotSupported()
        return value

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return 2
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetIndex(self, h): return h
    def nvmlDeviceGetUUID(self, h): return f"GPU-fake-{h}"
    def nvmlDeviceGetName(self, h): return self._call("name", h, b"NVIDIA H100 80GB HBM3")
    def nvmlDeviceGetTemperature(self, h, s): return self._call("temp", h, 61)
    def nvmlDeviceGetFieldValues(self, h, ids):
        v = types.SimpleNamespace(nvmlReturn=pynvml.NVML_SUCCESS, value=types.SimpleNamespace(uiVal=70))
        return self._call("fields", h, [v])
    def nvmlDeviceGetClockInfo(self, h, c): return self._call("clock", h, 1980 if c == pynvml.NVML_CLOCK_SM else 2619)
    def nvmlDeviceGetMaxClockInfo(self, h, c): return self._call("maxclock", h, 1980)
    def nvmlDeviceGetPowerUsage(self, h): return self._call("power", h, 650_000)
    def nvmlDeviceGetTotalEnergyConsumption(self, h): return self._call("energy", h, 9_000_000)
    def nvmlDeviceGetUtilizationRates(self, h): return self._call("util", h, types.SimpleNamespace(gpu=97))
    def nvmlDeviceGetMemoryInfo(self, h): return self._call("mem", h, types.SimpleNamespace(used=70 << 30))
    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._call("reasons", h, pynvml.nvmlClocksEventReasonSwThermalSlowdown)
    def nvmlDeviceGetMemoryErrorCounter(self, h, kind, counter, loc):
        return self._call("ecc", h, 2 if loc == pynvml.NVML_MEMORY_LOCATION_DRAM else 0)
    def nvmlDeviceGetViolationStatus(self, h, p):
        return self._call("violation", h, types.SimpleNamespace(violationTime=3_000_000_000))
    def nvmlDeviceGetRemappedRows(self, h): return self._call("rows", h, (1, 2, 1, 0))
    def nvmlDeviceGetRetiredPages(self, h, cause): return self._call("retired", h, [0x1000])
    def nvmlDeviceGetRetiredPagesPendingStatus(self, h): return self._call("pending", h, 0)
    def nvmlDeviceGetPcieReplayCounter(self, h): return self._call("pcie", h, 5)
    def nvmlDeviceGetNvLinkState(self, h, link):
        return self._call("nvlink", h, pynvml.NVML_FEATURE_ENABLED if link < 2 else 0)
    def nvmlDeviceGetNvLinkErrorCounter(self, h, link, c): return self._call("nvlink", h, 3)
    def nvmlEventSetCreate(self): return "set"
    def nvmlDeviceRegisterEvents(self, h, kinds, es): pass
    def nvmlEventSetWait_v2(self, es, timeout):
        if not self.xids:
            raise pynvml.NVMLError_Timeout()
        gpu, code = self.xids.pop(0)
        return types.SimpleNamespace(device=gpu, eventData=code)
    def nvmlEventSetFree(self, es): pass


def test_every_field_read_from_the_driver():
    s = NvmlProbe("n1", FakeDriver()).sample()[0]
    assert (s.temperature_c, s.memory_temperature_c, s.sm_clock_mhz, s.max_sm_clock_mhz) == (61, 70.0, 1980, 1980)
    assert (s.power_w, s.energy_j, s.utilization_pct) == (650.0, 9000.0, 97)
    assert s.throttle_reasons == ("sw_thermal",) and s.violation_s == {"power": 3.0, "thermal": 3.0}
    assert s.ecc_dram_uncorrected == 2 and s.ecc_count("sram", "corrected", "volatile") == 0 and len(s.ecc) == 8
    assert (s.retired_pages_sbe, s.retired_pages_dbe, s.retired_pages_pending) == (1, 1, False)
    assert (s.remapped_rows_correctable, s.remapped_rows_uncorrectable, s.row_remap_pending, s.row_remap_failure) \
        == (1, 2, True, False)
    assert s.pcie_replay_count == 5 and s.nvlink_errors == {"replay": 6, "recovery": 6, "crc_flit": 6, "crc_data": 6}


@pytest.mark.parametrize("call, field", [("temp", "temperature_c"), ("fields", "memory_temperature_c"),
                                         ("energy", "energy_j"), ("rows", "row_remap_pending"),
                                         ("retired", "retired_pages_dbe"), ("pcie", "pcie_replay_count")])
def test_an_unsupported_call_is_not_available_not_a_crash(call, field):
    s = NvmlProbe("n1", FakeDriver(unsupported={call, "ecc", "nvlink", "violation"})).sample()[0]
    assert getattr(s, field) is None
    assert s.ecc == {} and s.nvlink_errors == {} and s.violation_s == {}
    assert s.sm_clock_mhz == 1980  # the rest still reads


def test_lost_gpu_and_xid_events_per_code():
    drv = FakeDriver(lost={1})
    probe = NvmlProbe("n1", drv)
    drv.xids = [(0, 48), (0, 48), (0, 63)]
    s0, s1 = probe.sample()
    assert s1.lost and not s0.lost
    ev = probe.poll_events()
    assert [(e.kind, e.gpu, e.code) for e in ev] == [
        (EvidenceKind.GPU_XID, 0, 48), (EvidenceKind.GPU_XID, 0, 48), (EvidenceKind.GPU_XID, 0, 63),
        (EvidenceKind.GPU_LOST, 1, None)]
    assert probe.sample()[0].xid_counts == {48: 2, 63: 1}
    assert probe.poll_events() == []  # lost is reported once

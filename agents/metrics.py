"""Prometheus metrics of one node, read at scrape time (no update threads).

GPU series carry the labels node, gpu, uuid. Names follow DCGM's fields where one exists:

| DCGM field                                   | Herdsman metric                                              |
| -------------------------------------------- | ------------------------------------------------------------ |
| DCGM_FI_DEV_GPU_TEMP                         | herdsman_gpu_temperature_celsius                             |
| DCGM_FI_DEV_MEMORY_TEMP                      | herdsman_gpu_memory_temperature_celsius                      |
| DCGM_FI_DEV_SM_CLOCK / DCGM_FI_DEV_MEM_CLOCK | herdsman_gpu_sm_clock_mhz / herdsman_gpu_mem_clock_mhz       |
| (max SM clock, nvmlDeviceGetMaxClockInfo)    | herdsman_gpu_sm_clock_max_mhz                                |
| DCGM_FI_DEV_POWER_USAGE                      | herdsman_gpu_power_watts                                     |
| DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION         | herdsman_gpu_energy_joules_total                             |
| DCGM_FI_DEV_GPU_UTIL                         | herdsman_gpu_utilization_percent                             |
| DCGM_FI_DEV_FB_USED                          | herdsman_gpu_memory_used_bytes                               |
| DCGM_FI_DEV_CLOCK_THROTTLE_REASONS (bits)    | herdsman_gpu_clock_event_active{reason}                      |
| DCGM_FI_DEV_POWER_VIOLATION / _THERMAL_      | herdsman_gpu_violation_seconds_total{policy=power|thermal}   |
| DCGM_FI_DEV_ECC_{SBE,DBE}_{VOL,AGG}_TOTAL    | herdsman_gpu_ecc_errors_total{counter,memory,type}           |
| DCGM_FI_DEV_RETIRED_SBE / _DBE / _PENDING    | herdsman_gpu_retired_pages{cause}, ..._retired_pages_pending |
| DCGM_FI_DEV_{UN,}CORRECTABLE_REMAPPED_ROWS   | herdsman_gpu_remapped_rows{type}                             |
| DCGM_FI_DEV_ROW_REMAP_PENDING / _FAILURE     | herdsman_gpu_row_remap_pending / ..._row_remap_failure       |
| DCGM_FI_DEV_PCIE_REPLAY_COUNTER              | herdsman_gpu_pcie_replay_total                               |
| DCGM_FI_DEV_NVLINK_*_ERROR_COUNT_TOTAL       | herdsman_gpu_nvlink_errors_total{type}                       |
| DCGM_FI_DEV_XID_ERRORS (last code only)      | herdsman_gpu_xid_errors_total{code} (every code counted)     |
| (NVML GPU_IS_LOST)                           | herdsman_gpu_lost                                            |

Host, trainer and agent series: herdsman_host_condition{condition}, herdsman_nic_up{iface},
herdsman_nic_errors_total{iface,counter}, herdsman_ib_port_active{port}, herdsman_ib_errors_total{port,counter},
herdsman_disk_free_bytes{path}, herdsman_disk_free_ratio{path}, herdsman_kernel_log_readable,
herdsman_trainer_{step,loss,step_seconds,tokens_per_second}{rank}, herdsman_rank_straggler_score{rank,kind},
herdsman_rank_straggler{rank,reason}, herdsman_throughput_temperature_slope, herdsman_throughput_thermal_swing,
herdsman_agent_heartbeats_total, herdsman_agent_evidence_total{kind,code}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from herdsman.events import ECC_COUNTERS, ECC_LOCATIONS, ECC_TYPES, NVLINK_ERRORS, GpuSample
from agents.gpu import THROTTLE_REASONS

if TYPE_CHECKING:
    from agents.agent import NodeAgent

GPU_LABELS = ["node", "gpu", "uuid"]
_GAUGES = [  # (metric, help, GpuSample attribute)
    ("herdsman_gpu_temperature_celsius", "GPU temperature (DCGM_FI_DEV_GPU_TEMP).", "temperature_c"),
    ("herdsman_gpu_memory_temperature_celsius", "HBM temperature (DCGM_FI_DEV_MEMORY_TEMP).", "memory_temperature_c"),
    ("herdsman_gpu_sm_clock_mhz", "SM clock (DCGM_FI_DEV_SM_CLOCK).", "sm_clock_mhz"),
    ("herdsman_gpu_sm_clock_max_mhz", "Maximum SM clock.", "max_sm_clock_mhz"),
    ("herdsman_gpu_mem_clock_mhz", "Memory clock (DCGM_FI_DEV_MEM_CLOCK).", "mem_clock_mhz"),
    ("herdsman_gpu_power_watts", "Power draw (DCGM_FI_DEV_POWER_USAGE).", "power_w"),
    ("herdsman_gpu_utilization_percent", "GPU utilization (DCGM_FI_DEV_GPU_UTIL).", "utilization_pct"),
    ("herdsman_gpu_memory_used_bytes", "Frame buffer used (DCGM_FI_DEV_FB_USED).", "memory_used_bytes"),
    ("herdsman_gpu_retired_pages_pending", "1 while a page retirement waits for a GPU reset.", "retired_pages_pending"),
    ("herdsman_gpu_row_remap_pending", "1 while a row remap waits for a GPU reset.", "row_remap_pending"),
    ("herdsman_gpu_row_remap_failure", "1 once row remapping has failed (repair the GPU).", "row_remap_failure"),
]
_COUNTERS = [
    ("herdsman_gpu_energy_joules", "Energy since the driver loaded (DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION).",
     "energy_j"),
    ("herdsman_gpu_pcie_replay", "PCIe replays (DCGM_FI_DEV_PCIE_REPLAY_COUNTER).", "pcie_replay_count"),
]


def _gpu_families(node: str, samples: list[GpuSample]) -> Iterator[Metric]:
    def lab(s: GpuSample) -> list[str]:
        return [node, str(s.index), s.uuid]

    for family, fields in ((GaugeMetricFamily, _GAUGES), (CounterMetricFamily, _COUNTERS)):
        for name, doc, attr in fields:
            f = family(name, doc, labels=GPU_LABELS)
            for s in samples:
                v = getattr(s, attr)
                if v is not None:
                    f.add_metric(lab(s), float(v))
            yield f
    lost = GaugeMetricFamily("herdsman_gpu_lost", "1 when the GPU cannot be reached (fell off the bus).",
                             labels=GPU_LABELS)
    throttle = GaugeMetricFamily("herdsman_gpu_clock_event_active", "1 while a clock-event (throttle) reason is "
                                 "active (DCGM_FI_DEV_CLOCK_THROTTLE_REASONS).", labels=GPU_LABELS + ["reason"])
    violation = CounterMetricFamily("herdsman_gpu_violation_seconds", "Time clocks were held down, by policy "
                                    "(DCGM_FI_DEV_POWER_VIOLATION, _THERMAL_VIOLATION).", labels=GPU_LABELS + ["policy"])
    ecc = CounterMetricFamily("herdsman_gpu_ecc_errors", "ECC errors (DCGM_FI_DEV_ECC_{SBE,DBE}_{VOL,AGG}_TOTAL).",
                              labels=GPU_LABELS + ["counter", "memory", "type"])
    retired = GaugeMetricFamily("herdsman_gpu_retired_pages", "Retired pages (DCGM_FI_DEV_RETIRED_SBE/_DBE).",
                                labels=GPU_LABELS + ["cause"])
    rows = GaugeMetricFamily("herdsman_gpu_remapped_rows", "Remapped rows (DCGM_FI_DEV_*_REMAPPED_ROWS).",
                             labels=GPU_LABELS + ["type"])
    nvlink = CounterMetricFamily("herdsman_gpu_nvlink_errors", "NVLink errors summed over links "
                                 "(DCGM_FI_DEV_NVLINK_*_ERROR_COUNT_TOTAL).", labels=GPU_LABELS + ["type"])
    xid = CounterMetricFamily("herdsman_gpu_xid_errors", "Xid events by code (DCGM_FI_DEV_XID_ERRORS).",
                              labels=GPU_LABELS + ["code"])
    for s in samples:
        lost.add_metric(lab(s), 1.0 if s.lost else 0.0)
        if not s.lost:
            for r in THROTTLE_REASONS:
                throttle.add_metric(lab(s) + [r], 1.0 if r in s.throttle_reasons else 0.0)
        for pol, v in s.violation_s.items():
            violation.add_metric(lab(s) + [pol], v)
        for c in ECC_COUNTERS:
            for m in ECC_LOCATIONS:
                for t in ECC_TYPES:
                    v = s.ecc.get(f"{c}_{m}_{t}")
                    if v is not None:
                        ecc.add_metric(lab(s) + [c, m, t], float(v))
        for cause, v in (("sbe", s.retired_pages_sbe), ("dbe", s.retired_pages_dbe)):
            if v is not None:
                retired.add_metric(lab(s) + [cause], float(v))
        for typ, v in (("correctable", s.remapped_rows_correctable), ("uncorrectable", s.remapped_rows_uncorrectable)):
            if v is not None:
                rows.add_metric(lab(s) + [typ], float(v))
        for t in NVLINK_ERRORS:
            if t in s.nvlink_errors:
                nvlink.add_metric(lab(s) + [t], float(s.nvlink_errors[t]))
        for code, n in sorted(s.xid_counts.items()):
            xid.add_metric(lab(s) + [str(code)], float(n))
    yield from (lost, throttle, violation, ecc, retired, rows, nvlink, xid)


class AgentCollector(Collector):
    def __init__(self, agent: "NodeAgent"):
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        node = self.agent.host
        yield from _gpu_families(node, self.agent.probe.sample())
        yield from self._host(node)
        yield from self._trainer(node)
        yield from self._agent(node)

    def _host(self, node: str) -> Iterator[Metric]:
        snap = self.agent.host_monitor.snapshot
        cond = GaugeMetricFamily("herdsman_host_condition", "1 while a host condition holds (NicDown, IbPortDown, "
                                 "DiskPressure).", labels=["node", "condition"])
        for name in sorted(snap.conditions):
            cond.add_metric([node, name], 1.0)
        nic_up = GaugeMetricFamily("herdsman_nic_up", "1 when the NIC's operstate is up.", labels=["node", "iface"])
        nic_err = CounterMetricFamily("herdsman_nic_errors", "NIC error and drop counters.",
                                      labels=["node", "iface", "counter"])
        for iface, d in sorted(snap.nics.items()):
            nic_up.add_metric([node, iface], 1.0 if d["up"] else 0.0)
            for k in ("rx_errors", "tx_errors", "rx_dropped", "tx_dropped"):
                if d.get(k) is not None:
                    nic_err.add_metric([node, iface, k], float(d[k]))  # type: ignore[arg-type]
        ib_up = GaugeMetricFamily("herdsman_ib_port_active", "1 when the InfiniBand port is ACTIVE.",
                                  labels=["node", "port"])
        ib_err = CounterMetricFamily("herdsman_ib_errors", "InfiniBand port error counters.",
                                     labels=["node", "port", "counter"])
        for port, d in sorted(snap.ib_ports.items()):
            ib_up.add_metric([node, port], 1.0 if d["active"] else 0.0)
            for k, v in d.items():
                if k not in ("active", "state", "phys_state") and v is not None:
                    ib_err.add_metric([node, port, k], float(v))  # type: ignore[arg-type]
        free = GaugeMetricFamily("herdsman_disk_free_bytes", "Free bytes on the checkpoint file system.",
                                 labels=["node", "path"])
        ratio = GaugeMetricFamily("herdsman_disk_free_ratio", "Free share of the checkpoint file system.",
                                  labels=["node", "path"])
        for path, d in sorted(snap.disks.items()):
            free.add_metric([node, path], d["free"])
            ratio.add_metric([node, path], d["free_ratio"])
        klog = GaugeMetricFamily("herdsman_kernel_log_readable", "1 when the kernel log can be read.", labels=["node"])
        klog.add_metric([node], 1.0 if snap.kernel_log_available else 0.0)
        yield from (cond, nic_up, nic_err, ib_up, ib_err, free, ratio, klog)

    def _trainer(self, node: str) -> Iterator[Metric]:
        rl = ["node", "rank"]
        fams = {
            "step": GaugeMetricFamily("herdsman_trainer_step", "Last completed training step.", labels=rl),
            "loss": GaugeMetricFamily("herdsman_trainer_loss", "Loss of the last step.", labels=rl),
            "time": GaugeMetricFamily("herdsman_trainer_step_seconds", "Duration of the last step.", labels=rl),
            "tps": GaugeMetricFamily("herdsman_trainer_tokens_per_second", "Tokens per second of this rank.", labels=rl),
        }
        for st in self.agent.latest_steps():
            lab = [node, str(st.rank)]
            fams["step"].add_metric(lab, st.step)
            fams["loss"].add_metric(lab, st.loss)
            fams["time"].add_metric(lab, st.step_time_s)
            fams["tps"].add_metric(lab, st.tokens_per_s)
        yield from fams.values()
        score = GaugeMetricFamily("herdsman_rank_straggler_score", "The rank's own work relative to its peers' in "
                                  "the same steps (relative) or to its own usual (individual).", labels=rl + ["kind"])
        flag = GaugeMetricFamily("herdsman_rank_straggler", "1 while the rank is a straggler, with the reason.",
                                 labels=rl + ["reason"])
        for s in self.agent.straggler_scores():
            score.add_metric([node, str(s.rank), "relative"], s.relative)
            score.add_metric([node, str(s.rank), "individual"], s.individual)
            flag.add_metric([node, str(s.rank), s.reason or "none"], 1.0 if s.straggler else 0.0)
        yield from (score, flag)
        fit = self.agent.drift_fit()
        slope = GaugeMetricFamily("herdsman_throughput_temperature_slope", "Relative throughput change per degree "
                                  "C, fitted over the node's recent steps.", labels=["node"])
        swing = GaugeMetricFamily("herdsman_throughput_thermal_swing", "Relative throughput swing the temperature "
                                  "range explains (the diurnal 1-2 %).", labels=["node"])
        if fit is not None:
            slope.add_metric([node], fit.slope_per_c)
            swing.add_metric([node], fit.swing)
        yield from (slope, swing)

    def _agent(self, node: str) -> Iterator[Metric]:
        hb = CounterMetricFamily("herdsman_agent_heartbeats", "Heartbeats sent by this agent.", labels=["node"])
        hb.add_metric([node], float(self.agent.seq))
        yield hb
        ev = CounterMetricFamily("herdsman_agent_evidence", "Evidence raised, by kind and code (Xid number, host "
                                 "rule reason, ...).", labels=["node", "kind", "code"])
        for (kind, code), n in sorted(self.agent.evidence_counts().items()):
            ev.add_metric([node, kind, code], float(n))
        yield ev

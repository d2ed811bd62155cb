"""The controller's Prometheus metrics: the job, its time split (ETTR), interruptions by root cause, host states.

Read from the controller's views at scrape time (nothing is kept twice), served at /metrics on the API. The
agents export the per-node series (agents/metrics.py); these are the job-level ones the goodput and
interruption dashboards and the page share.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from herdsman.events import TIME_SPLIT, HostState
from herdsman.taxonomy import RootCause


class JobCollector(Collector):
    def __init__(self, ops: Any):
        self.ops = ops

    def collect(self) -> Iterator[Any]:
        st = self.ops.status()
        its = self.ops.interruptions_view()
        hosts = self.ops.hosts_view()
        job = str(st.get("job", ""))

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["job"])
            if value is not None:
                g.add_metric([job], float(value))
            return g

        yield gauge("herdsman_job_step", "Latest completed training step.", st.get("step"))
        yield gauge("herdsman_job_target_step", "The step the job trains to.", st.get("target_step"))
        yield gauge("herdsman_job_attempt", "Current attempt (restarts so far).", st.get("attempt"))
        yield gauge("herdsman_job_ettr", "Effective training time so far: productive / wall.", st.get("ettr"))
        yield gauge("herdsman_job_since_checkpoint_seconds", "Age of the latest committed checkpoint.",
                    st.get("since_checkpoint_s"))
        store = st.get("store") or {}
        yield gauge("herdsman_store_degraded", "1 while the store refuses the controller's writes (they are kept "
                    "and retried).", float(bool(store.get("degraded"))))
        yield gauge("herdsman_store_pending_writes", "Records waiting to be written to the store.",
                    store.get("pending_writes", 0))
        state = GaugeMetricFamily("herdsman_job_state", "1 for the controller's current state.",
                                  labels=["job", "state"])
        state.add_metric([job, str(st.get("state", ""))], 1.0)
        yield state

        split = st.get("split") or {}
        secs = CounterMetricFamily("herdsman_job_time_seconds", "Wall time of the job by where it went, every "
                                   "second in one bucket: " + ", ".join(TIME_SPLIT) + ".", labels=["job", "kind"])
        for kind in TIME_SPLIT:
            secs.add_metric([job, kind], float(split.get(kind, 0.0)))
        yield secs

        bad = CounterMetricFamily("herdsman_job_badput_seconds", "Wall time each root cause cost the job: "
                                  "detection + restart + restore + work done again.", labels=["job", "cause"])
        cost: Counter[str] = Counter()
        for i in its:
            cost[i.get("cause", "unknown")] += ((i.get("detection_s") or 0.0) + (i.get("restart_s") or 0.0)
                                                + (i.get("restore_s") or 0.0) + (i.get("lost_work_s") or 0.0))
        for cause, v in sorted(cost.items()):
            bad.add_metric([job, cause], float(v))
        yield bad

        counts = Counter((i.get("cause", "unknown"), bool(i.get("planned"))) for i in its)
        inter = CounterMetricFamily("herdsman_interruptions", "Interruptions by root cause (Llama 3 Table 5).",
                                    labels=["job", "cause", "component", "category", "planned"])
        for (cause, planned), n in sorted(counts.items()):
            try:
                facts = RootCause(cause).facts
                component, category = facts.component, facts.category
            except ValueError:
                component = category = "Unknown"
            inter.add_metric([job, cause, component, category, str(planned).lower()], float(n))
        yield inter

        hs = GaugeMetricFamily("herdsman_host_state", "1 for each host's state.", labels=["host", "state"])
        for h in hosts:
            for s in HostState:
                hs.add_metric([h["host"], s.value], 1.0 if h.get("state") == s.value else 0.0)
        yield hs

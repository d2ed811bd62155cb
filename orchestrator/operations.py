"""What the controller serves besides its loop: the status and views the API and the page read, operator
actions (quarantine, return to service, restart, stop: the API queues the last two, `_operator` carries them out
in the loop), and the fault-injection hooks of the demo and tests. A mixin of Controller: it works on the
controller's state under its lock."""

from __future__ import annotations

import os
from typing import Any

from herdsman import HerdsmanError
from herdsman.events import EvidenceKind, Verdict, to_dict
from herdsman.taxonomy import Action, RootCause
from orchestrator.accounts import account
from orchestrator.states import TERMINAL, Draining, Failing, Running, Scheduling, State, Stopped, Stopping

# why an operator's restart is refused in a state where the job is not training (the loop restarts it anyway)
_NO_RESTART = {
    "scheduling": "the job is being placed", "failing": "a failure is being diagnosed; its response restarts the job",
    "draining": "hosts are being drained; the job restarts when the drain is done",
    "backingoff": "the job restarts when its backoff ends", "stopping": "the job is stopping",
}


class Operations:
    def start_api(self) -> str:
        from orchestrator.api import ApiServer, create_app, load_or_create_token

        if self._api is not None:  # already serving (a restarted controller starts its own)
            return self.api_url
        token = load_or_create_token(self.cfg.api.token, self.run_dir)
        self._api = ApiServer(create_app(self, token, docs=self.cfg.api.docs), self.cfg.api.host, self.cfg.api.port)
        self.api_url = self._api.start()
        where = "[api] token in the config" if self.cfg.api.token else str(self.run_dir / "api_token")
        self._decide(f"API at {self.api_url} (operator token: {where})")
        return self.api_url


    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "state": type(self.state).__name__.lower(),
                "reason": getattr(self.state, "reason", ""),
                "attempt": self.ledger.attempt,
                "step": self.ledger.step_now,  # the job's: the furthest any attempt got
                "attempt_step": self.ledger.last_step.get(self.ledger.attempt, 0),  # this attempt's latest (0: none yet)
                "target_step": self.cfg.trainer.steps,
                "loss": self.ledger.last_loss,
                "hosts": {h: st.state.value for h, st in sorted(self.pool.status.items())},
                "placement": list(self.group.rank_hosts) if self.group else [],
                "verdicts": [to_dict(v) for v in self.verdicts],
                "decisions": list(self.decisions),
                "checkpoints": sorted(self.ledger.ckpt_at.items()),  # (step, commit time of its latest save)
                "metrics_urls": {h: hb.metrics_url for h, hb in self.heartbeats.items()},
                "api_url": self.api_url,
                "store": self.records.view(),
                "intake": {"relays": sorted(getattr(self.fleet, "relays", {})), "frames_refused": self.frames_refused},
                "pid": os.getpid(),
                **self._progress_view(),
            }

    def _progress_view(self) -> dict[str, Any]:
        """ETTR so far with the time accounts (orchestrator/accounts.py), the latest step time, the age of the
        latest checkpoint."""
        now = self.clock()
        with self.lock:
            led = self.ledger
            split = account(led, now, type(self.state).__name__.lower())
            productive = led.productive_s
            last = led.step_time[led.step_now][1] if led.step_time else None
            ckpt = max(led.ckpt_at.values()) if led.ckpt_at else None
        wall = sum(split.values())
        return {"job": self.cfg.job, "ettr": split["productive"] / wall if wall > 0 else None, "step_time_s": last,
                "since_checkpoint_s": None if ckpt is None else now - ckpt, "wall_s": wall,
                "productive_s": productive, "checkpoint_s": led.ckpt_stall_s, "split": split}

    def gpus_view(self) -> dict[str, Any]:
        """Every GPU's latest reading (from the heartbeats) and the straggler evidence of the last 10 minutes, with
        the thermal trends (a GPU heating against its own history before its clock drops)."""
        with self.lock:
            gpus = [{"host": h, "index": g.index, "temperature_c": g.temperature_c, "sm_clock_mhz": g.sm_clock_mhz,
                     "max_sm_clock_mhz": g.max_sm_clock_mhz, "throttle_reasons": list(g.throttle_reasons),
                     "utilization_pct": g.utilization_pct}
                    for h, hb in sorted(self.heartbeats.items()) for g in hb.gpus]
            since = self.clock() - 600
            stragglers = [e.line() for e in self.evidence if e.time >= since and (  # thermal_trend: agents.drift
                e.kind == EvidenceKind.STRAGGLER or e.attrs.get("reason") == "thermal_trend")]
        return {"gpus": gpus, "stragglers": stragglers[-20:]}

    def inject_gpu_fault(self, host: str, fault: str, gpu: int = 0, **args: Any) -> str:
        if not self.fleet.has_agent(host):
            raise HerdsmanError(f"no agent on host {host!r}")
        line = self.fleet.inject(host, fault, gpu, **args)
        self._decide(f"injected on {host}: {line}")
        return line

    def inject_trainer_fault(self, rank: int, fault: str, message: str = "", at_step: int = 0,
                             sticky: bool = False) -> str:
        if self.group is None:
            raise HerdsmanError("no trainer is running")
        self._decide(f"injected into rank {rank}: {fault} at step >= {at_step}{' (every attempt)' if sticky else ''}")
        return self.group.inject(rank, fault, message, at_step, sticky)

    def hosts_view(self) -> list[dict[str, Any]]:
        with self.lock:
            latest: dict[str, str] = {}
            for e in self.evidence:  # oldest first: the last one per host wins
                latest[e.host] = e.line()
            out = []
            for h, st in sorted(self.pool.status.items()):
                hb = self.heartbeats.get(h)
                out.append({"host": h, "state": st.state.value, "since": st.since, "reason": st.reason,
                            "last_heartbeat": self.last_heard.get(h), "metrics_url": hb.metrics_url if hb else "",
                            "gpus": len(hb.gpus) if hb else 0,
                            "lost_gpus": sum(g.lost for g in hb.gpus) if hb else 0,
                            "in_job": bool(self.group and h in self.group.hosts),
                            "latest_evidence": latest.get(h, "")})
            return out

    def interruptions_view(self) -> list[dict[str, Any]]:
        out = []
        with self.lock:
            its = sorted(self.ledger.interruptions.values(), key=lambda it: it.failed_at)
        for it in its:
            out.append({"attempt": it.attempt, "cause": it.verdict.cause.value, "planned": it.planned,
                        "verdict": to_dict(it.verdict), "failed_at": it.failed_at, "detection_s": it.detection_s,
                        "restart_s": it.restart_s, "restore_s": it.restore_s, "lost_work_s": it.lost_work_s,
                        "last_step": it.last_step, "resumed_step": it.resumed_step,
                        "runbook": f"runbooks/{it.verdict.cause.runbook}"})
        return out

    def quarantine(self, host: str, reason: str) -> None:
        with self.lock:
            if host not in self.pool.status:
                raise HerdsmanError(f"no host named {host!r}")
            self.pool.quarantine(host, f"operator: {reason}", self.clock())
            self._persist_hosts()
            self._decide(f"operator quarantined {host}: {reason}")
            if self.group is not None and host in self.group.hosts and not self.done():
                self._requests.append(("restart", f"{host} quarantined by an operator: {reason}"))

    def request_restart(self, reason: str) -> None:
        if self.done():
            raise HerdsmanError("the job has already ended")
        with self.lock:
            self._requests.append(("restart", reason))

    def request_stop(self, reason: str, drain: bool = False) -> None:
        """Stop the job now, or (drain) after a fresh checkpoint."""
        if self.done():
            raise HerdsmanError("the job has already ended")
        with self.lock:
            self._requests.append(("stop-drain" if drain else "stop", reason))

    def _operator(self, kind: str, reason: str, state: State) -> State:
        """An operator's restart or stop, carried out by the loop. A restart ends a training attempt (planned);
        in any other live state it is refused, nothing changed. A stop ends the job now; `stop-drain` first lets
        the ranks save (a drain already saving is waited for), and is plain when nothing trains."""
        if isinstance(state, TERMINAL):
            self._decide(f"operator {kind} ignored: the job has already ended ({reason})")
            return state
        group = getattr(state, "group", None)
        if kind == "stop-drain" and isinstance(state, Stopping):
            self._decide(f"operator stop after a fresh checkpoint: already stopping so ({reason})")
            return state
        if kind == "stop-drain" and isinstance(state, (Running, Draining)):
            self._decide(f"operator stop after a fresh checkpoint: {reason}")
            if isinstance(state, Draining):  # its ranks are saving already, then exit: the stop waits for that
                return Stopping(state.group, reason, state.requested_at, state.deadline, state.verdict)
            state.group.request_checkpoint(then_exit=True)
            now = self.clock()
            return Stopping(state.group, reason, now, now + self.cfg.controller.drain_timeout_s)
        if kind in ("stop", "stop-drain") and isinstance(state, Failing):  # the failure happened: on the record
            self._decide(f"operator stop during a failure: diagnosed and recorded first ({reason})")
            self._handle_failure(state, now_=True)
        if kind == "stop" and isinstance(state, Draining):  # its hosts go to their maintenance all the same
            with self.lock:
                self.responder.drain(state.verdict, self.pool, self.clock())
                self._persist_hosts()
        if kind in ("stop", "stop-drain"):  # (stop-drain here: nothing is training, there is nothing to save)
            if group is not None:
                group.shutdown()
            self._decide(f"operator stop: {reason}")
            return Stopped(f"stopped by an operator: {reason}")
        if not isinstance(state, Running):
            self._decide(f"operator restart refused while {state.name}: {_NO_RESTART[state.name]} ({reason})")
            return state
        now = self.clock()
        self._decide(f"operator restart: {reason}")
        usable = self.pool.usable()
        state.group.shutdown(keep_hosts=[h for h in state.group.hosts if h in usable])
        verdict = Verdict(RootCause.UNKNOWN, 1.0, (), (), (f"operator: {reason}",), Action.RESTART,
                          f"restart requested by an operator: {reason}")
        with self.lock:
            self.records.record_interruption(self.ledger.interrupt(verdict, now, now, planned=True))
        return Scheduling(self.clock())

    def return_to_service(self, host: str) -> list[str]:
        """Run the host's health check; if it passes the host becomes a spare. Returns the problems found."""
        if not self.fleet.has_agent(host):
            raise HerdsmanError(f"no agent on host {host!r}")
        problems = self.fleet.health_check(host)
        with self.lock:
            if problems:
                self._decide(f"{host} stays out of service: {'; '.join(problems)}")
            else:
                now = self.clock()
                self.pool.return_to_service(host, "health check passed", now)
                self.returned_at[host] = now
                self._decide(f"{host} returned to service after a passed health check")
            self._persist_hosts()
        return problems

    def kill_rank(self, rank: int) -> float:
        if self.group is None:
            raise HerdsmanError("no trainer is running")
        self.group.kill(rank)
        return self.clock()

"""The trainer's worker group on Ray: one actor per rank, pinned to its host, running the rank as a process.

A rank is a plain `python -m trainer.train` process (the same entry point torchrun runs), so a crash of the
trainer never takes Ray's worker down with it, and teardown is a kill. The actor watches its process on a
thread and records the exact moment it ended.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from herdsman import layout
from herdsman.events import RankFailure
from trainer import control, faults  # torch-free: this actor's worker never imports torch (its trainer does)


@dataclass(frozen=True)
class RankStatus:
    rank: int
    host: str
    pid: int
    running: bool
    exit_code: int | None
    ended_at: float | None
    stderr_tail: str
    reported_at: float | None = None  # alive, failed then, waiting for an order to rejoin (control.failed_at)


class RankProcess:
    """Ray actor body: owns one trainer rank process on this node, and a warm standby for the next attempt."""

    def __init__(self, host: str, cwd: str, warm: bool = True):
        self.rank, self.host, self.cwd, self.warm = -1, host, cwd, warm
        self.attempt = -1
        self.proc: subprocess.Popen | None = None
        self.ended_at: float | None = None
        self.log_path: Path | None = None
        self.control_dir: Path | None = None
        self._standby: subprocess.Popen | None = None
        self._command: list[str] | None = None  # the user's trainer: a standby of ours is of no use to it
        self._spawn_standby()

    def _spawn_standby(self) -> None:
        if self.warm:
            self._standby = subprocess.Popen(
                [sys.executable, "-m", "trainer.warm"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd=self.cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                start_new_session=True, text=True)

    def _take_standby(self, spec: dict) -> subprocess.Popen | None:
        p, self._standby = self._standby, None
        if p is None or p.poll() is not None:
            return None
        try:
            p.stdin.write(json.dumps(spec) + "\n")
            p.stdin.close()
            return p
        except OSError:  # it died between poll() and write
            return None

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def start(self, env: dict[str, str], log_path: str, control_dir: str, command: list[str] | None = None) -> int:
        self.stop()  # a leftover of the previous attempt
        self.rank, self.ended_at = int(env["RANK"]), None
        self.attempt = int(env.get(layout.ENV_ATTEMPT, -1))
        self.log_path, self.control_dir = Path(log_path), Path(control_dir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["--config", env[layout.ENV_CONFIG]]
        cmd = [sys.executable, "-m", "trainer.train", *argv]
        if command:  # the user's trainer: its own command line ("python" means this interpreter)
            cmd = [sys.executable if command[0] in ("python", "python3") else command[0], *command[1:]]
            self._close_standby()
        standby = self._standby
        self.proc = None if command else self._take_standby({"env": env, "log": str(self.log_path), "argv": argv})
        with open(self.log_path, "a") as log:
            why = "no standby" if standby is None else f"standby exited with {standby.poll()}"
            log.write(f"[rank actor on {self.host}] rank {self.rank}: "
                      f"{'warm start from standby' if self.proc else 'cold start (' + why + ')'}\n")
        if self.proc is None:  # cold start
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=self.cwd, start_new_session=True)
        threading.Thread(target=self._watch, args=(self.proc,), daemon=True).start()
        self._command = command
        return self.proc.pid

    def rejoin(self, env: dict[str, str], log_path: str, control_dir: str) -> tuple[bool, int]:
        """In-process restart: a live rank gets an order to rejoin the next attempt in its own process
        (trainer/rejoin.py); a dead one is started anew. Returns (kept, pid)."""
        p = self.proc
        if p is None or p.poll() is not None or self.rank != int(env["RANK"]):
            return False, self.start(env, log_path, control_dir)
        self.log_path, self.control_dir = Path(log_path), Path(control_dir)
        self.attempt = int(env[layout.ENV_ATTEMPT])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"[rank actor on {self.host}] rank {self.rank}: kept process {p.pid} (in-process restart)\n")
        control.write_order(self.control_dir, self.rank, int(env[layout.ENV_ATTEMPT]), env, log_path)
        return True, p.pid

    def refill(self) -> bool:
        """Warm the next standby (the controller asks once the attempt has stepped: on a small host, a torch
        import beside a rank that is still starting delays its first step by seconds)."""
        if self._standby is not None and self._standby.poll() is None or self._command:
            return False
        self._spawn_standby()
        return self._standby is not None

    def _watch(self, proc: subprocess.Popen) -> None:
        proc.wait()
        if proc is self.proc:
            self.ended_at = time.time()

    def poll(self) -> RankStatus:
        p = self.proc
        code = None if p is None else p.poll()
        if code is not None and self.ended_at is None:
            self.ended_at = time.time()
        tail = self._tail() if code not in (None, 0) else ""
        reported = (control.failed_at(self.control_dir, self.rank, self.attempt) if code is None and p is not None
                    else None)
        return RankStatus(self.rank, self.host, p.pid if p else 0, p is not None and code is None, code,
                          self.ended_at, tail, reported)

    def _tail(self, n: int = 8000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def inject(self, fault: str, message: str = "", at_step: int = 0, sticky: bool = False) -> str:
        assert self.control_dir is not None, "rank not started"
        return str(faults.request(self.control_dir, self.rank, fault, message, at_step, sticky))

    def request_checkpoint(self, then_exit: bool = False) -> bool:
        if self.proc is None or self.proc.poll() is not None or self.control_dir is None:
            return False
        control.request_now(self.control_dir, self.rank, then_exit)
        return True

    def request_dump(self) -> bool:
        """Ask a live rank for its flight-recorder buffer (it writes it from its watcher thread)."""
        if self.proc is None or self.proc.poll() is not None or self.control_dir is None:
            return False
        control.request_dump(self.control_dir, self.rank)
        return True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def close(self) -> None:
        """Stop the rank and the standby (before the actor is killed)."""
        self.stop()
        self._close_standby()

    def _close_standby(self) -> None:
        if self._standby is not None and self._standby.poll() is None:
            os.killpg(self._standby.pid, signal.SIGKILL)
            self._standby.wait()
        self._standby = None

    def stop(self, grace_s: float = 3.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except ProcessLookupError:
            pass


RankActor = ray.remote(num_cpus=0, max_concurrency=4)(RankProcess)


@dataclass(frozen=True)
class GroupStatus:
    """A frozen snapshot of one poll of the group."""

    ranks: tuple[RankStatus, ...]
    unreachable: tuple[int, ...]  # ranks whose actor did not answer (host gone)

    @property
    def finished(self) -> bool:
        return bool(self.ranks) and all(r.exit_code == 0 for r in self.ranks) and not self.unreachable

    @property
    def failed(self) -> list[RankStatus]:
        return sorted((r for r in self.ranks if r.exit_code not in (None, 0)), key=lambda r: r.ended_at or 0)

    @property
    def waiting(self) -> set[int]:
        """Ranks alive that reported their failure to their rank actor and wait for an order to rejoin."""
        return {r.rank for r in self.ranks if r.running and r.reported_at is not None}

    def failures(self, now: float) -> list[RankFailure]:
        out = [RankFailure(r.rank, r.host, r.ended_at or now, r.exit_code, r.stderr_tail) for r in self.failed]
        return out


class WorkerGroup:
    """Ranks 0..N-1 on the given hosts (ranks_per_host each), started together, torn down together.

    Rank actors are kept per (host, slot) across attempts: a restart on the same hosts only starts new processes,
    which saves spawning a Ray worker per rank (seconds on a small machine).
    """

    def __init__(self, placement: list[tuple[str, str]], ranks_per_host: int, attempt: int, env: dict[str, str],
                 run_dir: Path, job: str, cwd: str, actors: dict[tuple[str, int], object] | None = None,
                 warm: bool = True, command: list[str] | None = None, fr_buffer_size: int = 2000):
        self.attempt, self.env, self.run_dir, self.job, self.cwd = attempt, env, Path(run_dir), job, cwd
        self.command, self.fr_buffer_size = command, fr_buffer_size
        warm = warm and not command  # a standby imports the embedded trainer: of no use to another one
        self.hosts = [h for h, _ in placement]
        self.rank_hosts: list[str] = []
        self.actors = []
        self.pool = actors if actors is not None else {}
        for host, node_id in placement:
            for slot in range(ranks_per_host):
                self.rank_hosts.append(host)
                key = (host, slot)
                if key not in self.pool:
                    self.pool[key] = RankActor.options(
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(host, cwd, warm)
                self.actors.append(self.pool[key])
        self.ranks_per_host = ranks_per_host

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def start(self, timeout_s: float = 60.0) -> None:
        from herdsman import HerdsmanError

        try:
            master_ip = ray.get(self.actors[0].node_ip.remote(), timeout=timeout_s)
            port = ray.get(self.actors[0].free_port.remote(), timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            raise HerdsmanError(f"could not place rank 0 on {self.rank_hosts[0]}: {e}") from None
        refs = []
        for rank, (actor, host) in enumerate(zip(self.actors, self.rank_hosts)):
            env, log = self._rank_env(rank, host, master_ip, port)
            refs.append(actor.start.remote(env, log, env[layout.ENV_CONTROL_DIR], self.command))
        ray.get(refs, timeout=timeout_s)

    def _rank_env(self, rank: int, host: str, master_ip: str, port: int) -> tuple[dict[str, str], str]:
        env = {**self.env, **layout.rank_env(self.run_dir, host, self.job, self.attempt, self.fr_buffer_size),
               "RANK": str(rank),
               "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(rank % self.ranks_per_host),
               "MASTER_ADDR": master_ip, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        return env, str(layout.rank_log(self.run_dir, host, self.job, rank, self.attempt))

    def rejoin(self, attempt: int, replace: set[int], timeout_s: float = 60.0) -> list[int]:
        """In-process restart into `attempt`: the ranks in `replace` are started anew (a hung one is stopped
        first), every other one is ordered to rejoin in its own process. Returns the ranks that kept theirs."""
        self.attempt = attempt
        master_ip = ray.get(self.actors[0].node_ip.remote(), timeout=timeout_s)
        port = ray.get(self.actors[0].free_port.remote(), timeout=timeout_s)
        refs = {}
        for rank, (actor, host) in enumerate(zip(self.actors, self.rank_hosts)):
            env, log = self._rank_env(rank, host, master_ip, port)
            if rank in replace:
                refs[rank] = actor.start.remote(env, log, env[layout.ENV_CONTROL_DIR], self.command)
            else:
                refs[rank] = actor.rejoin.remote(env, log, env[layout.ENV_CONTROL_DIR])
        kept = []
        for rank, ref in refs.items():
            out = ray.get(ref, timeout=timeout_s)
            if isinstance(out, tuple) and out[0]:
                kept.append(rank)
        return kept

    def poll(self, timeout_s: float = 5.0) -> GroupStatus:
        refs = [a.poll.remote() for a in self.actors]
        ranks, unreachable = [], []
        for rank, ref in enumerate(refs):
            try:
                ranks.append(ray.get(ref, timeout=timeout_s))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                unreachable.append(rank)
        return GroupStatus(tuple(ranks), tuple(unreachable))

    def refill_standbys(self) -> None:
        """Each rank actor warms its next standby, in the background (nothing waits for the imports)."""
        for a in self.actors:
            a.refill.remote()

    def inject(self, rank: int, fault: str, message: str = "", at_step: int = 0, sticky: bool = False) -> str:
        return ray.get(self.actors[rank].inject.remote(fault, message, at_step, sticky), timeout=10)

    def kill(self, rank: int) -> None:
        ray.get(self.actors[rank].kill.remote(), timeout=10)

    def request_checkpoint(self, then_exit: bool = False) -> None:
        """Every rank saves at its next step (they agree on which through their loss all-reduce)."""
        ray.get([a.request_checkpoint.remote(then_exit) for a in self.actors], timeout=10)

    def request_dumps(self, skip: frozenset[int] = frozenset()) -> list[int]:
        """Ask every live rank but `skip` to dump its flight recorder; returns the ranks asked."""
        refs = {rank: a.request_dump.remote() for rank, a in enumerate(self.actors) if rank not in skip}
        asked = []
        for rank, ref in refs.items():
            try:
                if ray.get(ref, timeout=5):
                    asked.append(rank)
            except Exception:
                pass
        return asked

    def shutdown(self, grace_s: float = 3.0, keep_hosts: tuple[str, ...] | list[str] = ()) -> None:
        """Stop every rank process; keep the actors of `keep_hosts` for the next attempt, kill the others."""
        refs = [a.stop.remote(grace_s) for a in self.actors]
        for ref in refs:
            try:
                ray.get(ref, timeout=grace_s + 5)
            except Exception:  # a dead host: its processes died with it
                pass
        for key in [k for k in self.pool if k[0] in self.hosts and k[0] not in keep_hosts]:
            if keep_hosts:  # a restart: an evicted host's actors need not be gone before the next attempt starts
                threading.Thread(target=close_actor, args=(self.pool.pop(key),), daemon=True).start()
            else:
                close_actor(self.pool.pop(key))
        self.actors = []


def close_actor(actor: object) -> None:
    try:
        ray.get(actor.close.remote(), timeout=10)  # type: ignore[attr-defined]
    except Exception:  # its host is gone, and its processes with it
        pass
    ray.kill(actor, no_restart=True)

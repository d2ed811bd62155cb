"""The three systems of the peer campaign (bench/campaign.py): `torchrun --max-restarts`, Ray Train's `TorchTrainer`
with `FailureConfig(max_failures)`, and Herdsman, each able to start the job, inject a fault of the schedule into
it, say where its ranks run and stop."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.campaign import HOSTS, JOB, ROOT, SPARE, Fault, read_records


def _kill_pids(records: list[dict]) -> None:
    for r in records:
        if r.get("kind") == "event" and r.get("pid"):
            try:
                os.kill(r["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class _Local:
    """torchrun and Ray Train: ranks on this machine, faults through the control dir and SIGKILL."""

    name = ""

    def __init__(self, d: Path, cfg: Path, a: argparse.Namespace):
        self.d, self.cfg, self.a = d, cfg, a
        self.stats, self.control = d / "stats", d / "control"
        self.proc: subprocess.Popen | None = None
        self.log = open(d / f"{self.name}.log", "w")  # noqa: SIM115 (closed in stop())

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
        return {**env, "HERDSMAN_STATS_DIR": str(self.stats), "HERDSMAN_CONTROL_DIR": str(self.control),
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def rank_files(self, rank: int) -> list[Path]:
        return sorted(self.stats.glob(f"rank{rank:05d}-attempt*.jsonl"))

    def rank0_files(self) -> list[Path]:
        return self.rank_files(0)

    def placement(self) -> list[str]:
        return list(HOSTS)  # no eviction: host r keeps rank r

    def inject(self, f: Fault, rank: int) -> float:
        from trainer import faults

        if f.kind == "xid":  # the Xid ends the process on that GPU
            pid = next(r["pid"] for r in read_records(self.rank_files(rank)[-1:])[::-1]
                       if r.get("kind") == "event" and r.get("pid"))
            t = time.time()
            os.kill(pid, signal.SIGKILL)
            return t
        t = time.time()
        if f.kind == "crash":
            faults.request(self.control, rank, "exception", "RuntimeError: campaign: one-off crash")
        else:
            faults.request(self.control, rank, "hang")
        return t

    def inject_off_job(self, f: Fault) -> None:
        raise AssertionError("every host stays in a torchrun / Ray Train job")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _kill_pids(read_records(self.stats.glob("*.jsonl")))  # any rank left behind in a session of its own
        self.log.close()


class Torchrun(_Local):
    name = "torchrun"

    def start(self) -> float:
        from tests.trainer_runs import free_port

        torchrun = Path(sys.executable).with_name("torchrun")
        t0 = time.time()
        self.proc = subprocess.Popen(
            [str(torchrun), "--nproc-per-node", str(len(HOSTS)), "--max-restarts", str(self.a.max_restarts),
             "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             "-m", "trainer.train", "--config", str(self.cfg)],
            cwd=ROOT, env={**self.env(), "HERDSMAN_HOST": "local"}, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        return t0


class RayTrain(_Local):
    """A real `ray.train.torch.TorchTrainer` (Ray Train V2) with FailureConfig(max_failures), in a driver process
    of its own (a local Ray instance); each worker runs the embedded trainer in the process group Ray Train forms."""

    name = "ray-train"

    def start(self) -> float:
        spec = {"config": str(self.cfg), "stats": str(self.stats), "control": str(self.control), "dir": str(self.d),
                "hosts": HOSTS, "storage": str(self.d / "ray_results"), "max_failures": self.a.max_restarts,
                "timeout_s": max(1, round(self.a.collective_timeout_s)), "started": str(self.d / "fit-started")}
        (self.d / "spec.json").write_text(json.dumps(spec))
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.campaign", "--ray-train-driver",
                                      str(self.d / "spec.json")], cwd=ROOT, env=self.env(), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        started = Path(spec["started"])
        deadline = time.time() + 180
        while not started.exists():  # the job's submission: Ray is up, as a cluster would be
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray Train driver did not start (see {self.log.name})")
            time.sleep(0.1)
        return float(started.read_text())


def _ray_train_loop(spec: dict) -> None:
    """One Ray Train worker: the embedded trainer, in the process group Ray Train formed, resuming from its own
    DCP checkpoints. The attempt number (the trainer's stats files and checkpoints are named by it) is counted by
    rank 0 and broadcast."""
    import ray.train
    import torch.distributed as dist

    from herdsman import layout
    from herdsman.config import load_config
    from trainer.train import train

    rank = ray.train.get_context().get_world_rank()
    box = [0]
    if rank == 0:
        counter = Path(spec["dir"]) / "attempts"
        box = [int(counter.read_text()) + 1 if counter.exists() else 0]
        counter.write_text(str(box[0]))
    dist.broadcast_object_list(box, src=0)
    os.environ.update({layout.ENV_ATTEMPT: str(box[0]), layout.ENV_HOST: spec["hosts"][rank],
                       layout.ENV_STATS_DIR: spec["stats"], layout.ENV_CONTROL_DIR: spec["control"]})
    if train(load_config(spec["config"])) != 0:
        raise RuntimeError(f"rank {rank} failed in attempt {box[0]}")


def ray_train_driver(spec_path: str) -> int:
    import logging

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = json.loads(Path(spec_path).read_text())

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # a Ray instance of its own (address="local"), not whatever cluster this machine already runs
    ray.init(address="local", num_cpus=len(spec["hosts"]) + 1, include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        trainer = TorchTrainer(
            _ray_train_loop, train_loop_config=spec,
            torch_config=TorchConfig(backend="gloo", timeout_s=spec["timeout_s"]),
            scaling_config=ScalingConfig(num_workers=len(spec["hosts"]), use_gpu=False,
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=JOB, storage_path=spec["storage"],
                                 failure_config=FailureConfig(max_failures=spec["max_failures"])))
        Path(spec["started"]).write_text(repr(time.time()))
        result = trainer.fit()
        print(f"ray train: fit returned, error {result.error!r}", flush=True)
        return 0 if result.error is None else 1
    except KeyboardInterrupt:
        print("ray train: stopped", flush=True)
        return 1
    finally:
        ray.shutdown()


class Herdsman:
    """The controller on a local 4-host Ray cluster (3 in the job, 1 spare kept warm), real agents with simulated
    GPUs; faults through its own operations API (the GPU's Xid through the host's agent)."""

    name = "herdsman"

    def __init__(self, d: Path, cfg: Path, a: argparse.Namespace):
        from herdsman.config import load_config
        from orchestrator.cluster import LocalCluster, connect

        self.cfg = load_config(cfg)
        self.cluster = LocalCluster(HOSTS + [SPARE]).start()  # up before the job's submission
        connect(self.cluster.address)
        self.ctrl = None
        self.interruptions: list[dict] = []

    def start(self) -> float:
        from orchestrator.job import launch_controller

        t0 = time.time()
        self.ctrl = launch_controller(self.cfg)
        return t0

    def _status(self) -> dict:
        import ray

        return ray.get(self.ctrl.status.remote())

    def rank0_files(self) -> list[Path]:
        from herdsman.layout import rank0_streams

        return rank0_streams(self.cfg.run_dir, JOB)

    def placement(self) -> list[str]:
        return self._status()["placement"]

    def inject(self, f: Fault, rank: int) -> float:
        import ray

        t = time.time()
        if f.kind == "xid":
            ray.get(self.ctrl.inject_gpu_fault.remote(f.host, "xid", gpu=0, code=79))
        elif f.kind == "crash":
            ray.get(self.ctrl.inject_trainer_fault.remote(rank, "exception", "RuntimeError: campaign: one-off crash"))
        else:
            ray.get(self.ctrl.inject_trainer_fault.remote(rank, "hang"))
        return t

    def inject_off_job(self, f: Fault) -> None:
        import ray

        if f.kind == "xid":  # the host still fails, out of the job
            ray.get(self.ctrl.inject_gpu_fault.remote(f.host, "xid", gpu=0, code=79))

    def alive(self) -> bool:
        return self._status()["state"] != "stopped"

    def stop(self) -> None:
        from orchestrator.job import stop_controller
        from orchestrator.store import Store

        try:
            if self.ctrl is not None:
                st = self._status()
                self.decisions = st["decisions"]
                self.split = {k: round(v, 2) for k, v in st["split"].items()}  # where Herdsman's wall went
                stop_controller(self.ctrl)
            self.interruptions = [{"attempt": it.attempt, "cause": it.verdict.cause.value,
                                   "hosts": list(it.verdict.hosts), "action": it.verdict.action.value,
                                   "detection_s": it.detection_s, "restart_s": it.restart_s,
                                   "restore_s": it.restore_s} for it in Store(self.cfg.store_url).interruptions(JOB)]
        finally:
            self.cluster.stop()


SYSTEM_CLASSES = {"torchrun": Torchrun, "ray-train": RayTrain, "herdsman": Herdsman}

"""The training loop: Llama 3 on torch.distributed with FSDP2, sharded checkpoints, and reports to the agent.

Runs as one process per rank, under Herdsman's worker group or under torchrun:

    python -m trainer.train --config herdsman.toml

Environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (as torchrun sets them); the attempt number
from HERDSMAN_ATTEMPT or TORCHELASTIC_RESTART_COUNT; optional HERDSMAN_HOST, HERDSMAN_STATS_DIR (reports to the
local agent), HERDSMAN_CONTROL_DIR (fault injection), HERDSMAN_FR_DIR (flight-recorder dumps) and
HERDSMAN_RESUME=required (refuse to start from scratch when no usable checkpoint exists).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

from herdsman import HerdsmanError
from herdsman.config import HerdsmanConfig, TrainerConfig, load_config
from herdsman.events import TrainerPhase
from trainer import control, faults, flight_recorder, interval, rejoin
from trainer.checkpoint import Checkpointer, CheckpointError, committed, latest_valid
from trainer.memory_tier import MemoryTier
from trainer.sdc import ParamGuard, PeerCorruption, SilentDataCorruption, flip_bit
from trainer.data import IGNORE, VOCAB_SIZE, PackedLoader
from trainer.model import Transformer, model_args
from herdsman import layout
from herdsman.stats import StatsWriter


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    attempt: int
    host: str
    device: torch.device


def init_distributed(cfg: TrainerConfig) -> DistEnv:
    """Form the process group. Each attempt gets its own key prefix in the store, so a restarted group never
    reads a previous attempt's addresses (torchrun + gloo otherwise fails to reconnect: `Gloo connectFullMesh failed`)."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(cfg.fr_buffer_size))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    attempt = int(os.environ.get(layout.ENV_ATTEMPT, os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
    timeout = timedelta(seconds=cfg.collective_timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if dist.is_initialized():  # formed by the launcher (Ray Train's TorchTrainer): used as it is
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent hosts the store
            base = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
        else:
            if rank != 0:
                await_listener(addr, port, cfg.collective_timeout_s)
            base = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=True)
        store = dist.PrefixStore(f"/attempt_{attempt}", base)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    host = os.environ.get(layout.ENV_HOST) or socket.gethostname()
    return DistEnv(rank, world, local_rank, attempt, host, device)


def await_listener(addr: str, port: int, timeout_s: float, poll_s: float = 0.01) -> bool:
    """Wait until something listens on addr:port (rank 0's store server); False if nothing did within timeout_s.
    A TCPStore client that finds no server retries only after a back-off: with the server 50-300 ms late, the client
    connected 0.3-0.6 s after it began (measured), most of a restart's rendezvous whenever rank 0's process starts
    a little after the others. A bare connection every 10 ms finds it at once (the server takes it for a client that left)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((addr, port), timeout=1.0).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)


def exit_with_parent(interval_s: float = 1.0) -> None:
    """End this rank if the process that started it (rank actor, warm-standby parent or torchrun) dies: an
    orphaned rank would go on training and writing checkpoints beside its replacement. (PR_SET_PDEATHSIG is no
    use here: it fires when the forking *thread* ends, and the standby is forked from a short-lived one.)"""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                print("[trainer] parent process died: exiting", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def exit_now(code: int) -> NoReturn:
    """End the rank's process without the interpreter's teardown. Destroying torch's C++ objects (process
    groups, DCP's executor) at exit takes ~0.6 s on a failed rank, and its gloo peers stay blocked in the collective
    until its sockets close, so every recovery would wait for it; it has also aborted a finished rank with
    "terminate called without an active exception" (seen once in CI). Everything the rank reports is flushed by
    then (stats lines are line-buffered and fsynced when closed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak (the paper's schedule, scaled down)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_model(cfg: TrainerConfig, device: torch.device) -> Transformer:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank before sharding
    model = Transformer(model_args(cfg.model, VOCAB_SIZE)).to(device)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


class SimulatedClock:
    """The SM clock of this rank's simulated GPU, as its node's agent publishes it (max clock / current clock).

    Only with the simulated GPU backend: it makes a throttled simulated GPU slow its rank down, as a real one does.
    Read at most once a second; a missing or torn file means full speed.
    """

    def __init__(self, path: Path | None, gpu: int):
        self.path, self.gpu = path, str(gpu)
        self._factor, self._read_at = 1.0, 0.0

    def slowdown(self) -> float:
        if self.path is None:
            return 1.0
        now = time.monotonic()
        if now - self._read_at >= 1.0:
            self._read_at = now
            try:
                self._factor = max(1.0, min(20.0, float(json.loads(self.path.read_text())[self.gpu])))
            except (OSError, ValueError, KeyError, TypeError):
                self._factor = 1.0
        return self._factor


def train(config: HerdsmanConfig) -> int:
    """Run this rank: one attempt, or (in-process restart, trainer/rejoin.py) one attempt after another in this
    process, each time the controller orders it to rejoin after a peer's failure."""
    t_start = time.time()
    exit_with_parent()
    kept = False
    while True:
        code, order = _attempt(config, t_start, kept)
        if order is None:
            return code
        t_start, kept = time.time(), True
        rejoin.take(order)


def _attempt(config: HerdsmanConfig, t_start: float, kept: bool) -> tuple[int, dict[str, Any] | None]:
    """One attempt: (exit code, None), or (1, an order to rejoin the next attempt in this process)."""
    cfg = config.trainer
    env = init_distributed(cfg)
    stats = StatsWriter(_env_path(layout.ENV_STATS_DIR), env.rank, env.host, env.attempt, gpu=env.local_rank)
    # when this process was up with its imports done (the time accounts start its rendezvous here); a rank kept
    # by an in-process restart says so (its process id is the one it had)
    stats.event(TrainerPhase.STARTED, message=f"pid {os.getpid()}" + (" kept (in-process restart)" if kept else ""),
                duration_s=0.0, at=t_start)
    stats.event(TrainerPhase.RENDEZVOUS, duration_s=time.time() - t_start)
    control_dir, fr_dir = _env_path(layout.ENV_CONTROL_DIR), _env_path(layout.ENV_FR_DIR)
    sim_clocks = SimulatedClock(_env_path(layout.ENV_SIM_CLOCKS), env.local_rank)
    backend = dist.get_backend()
    watcher = flight_recorder.DumpOnRequest(control_dir, fr_dir, env.rank, env.attempt, backend).start()
    step = 0
    ckpt: Checkpointer | None = None
    try:
        t0 = time.time()
        model = build_model(cfg, env.device)
        optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
        loader = PackedLoader(cfg.seed, cfg.seq_len, cfg.batch_size, env.rank, env.world_size)
        log = lambda m: _log(env, m)  # noqa: E731
        memory = None
        if cfg.memory_tier:
            memory = MemoryTier(memory_dir(config, env.host), env.rank, env.world_size, cfg.ranks_per_host, None, log)
        ckpt = Checkpointer(config.checkpoint_dir, cfg.keep_checkpoints, env.rank, env.world_size,
                            async_save=cfg.checkpoint_async, memory=memory, attempt=env.attempt, log=log)
        info = latest_valid(config.checkpoint_dir, warn=log)
        if info is None and committed(config.checkpoint_dir):
            raise CheckpointError(f"none of the {len(committed(config.checkpoint_dir))} checkpoint(s) in "
                                  f"{config.checkpoint_dir} is usable (see above); refusing to train from scratch")
        if info is None and os.environ.get(layout.ENV_RESUME) == layout.RESUME_REQUIRED:
            raise CheckpointError(f"no usable checkpoint in {config.checkpoint_dir}; refusing to train from scratch")
        source, restore_s = "fresh start", 0.0
        if info is not None:
            t_restore = time.perf_counter()
            state, tier = ckpt.restore(info, model, optim)
            step = int(state["step"])
            loader.load_state_dict(state["loader"])
            restore_s = time.perf_counter() - t_restore
            source = f"{info.path} ({tier}, {restore_s:.3f} s)"
        # the load alone; the model build before it is the time since rendezvous
        stats.event(TrainerPhase.RESTORED, step=step, duration_s=restore_s, message=source)
        _log(env, f"attempt {env.attempt}: {'resumed from ' + source if info else 'fresh start'} at step {step}")
        if env.rank == 0:
            _log(env, interval.suggestion(config.checkpoint_dir, env.world_size, env.attempt, cfg.checkpoint_every,
                                          cfg.checkpoint_interval_s))

        guard = ParamGuard(env.rank, env.world_size, cfg.sdc_check_every)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=env.device.type == "cuda")
        last_save = time.monotonic()
        final_wait_s = 0.0  # waiting for the last saves to land (after the last step): a checkpoint stall
        while step < cfg.steps:
            injected = faults.check(control_dir, env.rank, step + 1)
            t0 = time.perf_counter()
            step += 1
            for g in optim.param_groups:
                g["lr"] = lr_at(step, cfg)
            b = loader.next_batch()
            tokens, doc_ids, targets = (x.to(env.device) for x in (b.tokens, b.doc_ids, b.targets))
            data_s = time.perf_counter() - t0
            with autocast:
                logits = model(tokens, doc_ids)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
            loss.backward()
            actual = guard.before_update(step, model.parameters(), env.device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            optim.zero_grad(set_to_none=True)
            expected = guard.after_update(step, model.parameters(), env.device)
            if injected == "bitflip":  # after the update and its checksum: memory corrupted at rest
                _log(env, f"fault injection: {flip_bit(model.parameters())} at step {step}")
            # one all-reduce carries the loss, the "checkpoint now" / "then exit" votes and the SDC checksums
            save_now, then_exit = control.now_requested(control_dir, env.rank)
            if env.rank == 0 and cfg.checkpoint_interval_s and time.monotonic() - last_save >= cfg.checkpoint_interval_s:
                save_now = True
            votes = torch.tensor([float(save_now), float(then_exit)], dtype=torch.float64, device=env.device)
            reduced = torch.cat([loss.detach().double().reshape(1), votes, expected, actual])
            if cfg.step_delay_s:  # stand-in GPU work; a simulated GPU's lowered clock stretches it, as it would
                time.sleep(cfg.step_delay_s * sim_clocks.slowdown())
            compute_s = time.perf_counter() - t0  # before waiting for the slowest rank in the all-reduce
            dist.all_reduce(reduced)
            reduced = reduced.cpu()
            bad = guard.judge(step, reduced[3:])
            if bad:
                _sdc_stop(env, ckpt, guard, bad, step)
            step_s = time.perf_counter() - t0
            stats.step(step, step_s, tokens.numel(), reduced[0].item() / env.world_size, compute_s, data_s)
            _saves_done(env, ckpt.poll, stats, config, step_s)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or reduced[1].item() > 0:
                state = {"step": step, "loader": loader.state_dict()}
                _saves_done(env, lambda: ckpt.save(step, model, optim, state), stats, config, step_s, step)
                last_save = time.monotonic()
                if step == cfg.steps or reduced[2].item() > 0:
                    t_wait = time.perf_counter()
                    _saves_done(env, ckpt.wait, stats, config, step_s)  # the last save must land
                    final_wait_s += time.perf_counter() - t_wait
            if reduced[2].item() > 0:  # drained: the work is in the checkpoint just taken
                _log(env, f"stopping after the requested checkpoint at step {step}")
                break
        t_wait = time.perf_counter()
        _saves_done(env, ckpt.wait, stats, config, None)
        ckpt.close()
        final_wait_s += time.perf_counter() - t_wait
        if memory is not None and step >= cfg.steps:  # finished (not drained): nothing will restore from RAM
            dist.barrier()
            memory.clear()
        stats.event(TrainerPhase.FINISHED, step=step, message="" if step >= cfg.steps else "drained",
                    duration_s=final_wait_s)
        watcher.stop()
        stats.close()
        dist.destroy_process_group()
        return 0, None
    except Exception as e:
        tb = traceback.format_exc()
        stats.event(TrainerPhase.FAILED, step=step, message=tb[-4000:])
        # a collective broken by a peer: this rank keeps its process and waits to rejoin, and its rank actor tells
        # the controller at once (trainer/control.py). A rank whose own code failed exits: gloo cannot release the
        # peers blocked in a collective with it short of closing its sockets (destroying or aborting the group
        # does not), and they would wait for the collective timeout.
        waits = rejoin.enabled() and rejoin.peer_failure(e)
        if waits:
            control.report_failed(control_dir, env.rank, env.attempt)
        flight_recorder.dump(fr_dir, env.rank, env.attempt, backend)
        _log(env, f"failed at step {step}: {type(e).__name__}: {e}")
        print(tb, file=sys.stderr, flush=True)
        if ckpt is not None and ckpt.in_flight:
            # let the save in flight land: a committed save is work not lost. Its peers are alive when this rank's
            # own code failed; when a peer failed, a save that needs it mostly fails at once, but one stuck on it
            # would hold a rank that waits to rejoin for the collective timeout: a short wait, then it is abandoned
            wait_s = min(10.0, cfg.collective_timeout_s, 2.0 if waits else 10.0)
            try:
                _saves_done(env, lambda: ckpt.wait(timeout_s=wait_s), stats, config, None)
            except CheckpointError as err:
                _log(env, f"the checkpoint in flight was not committed: {err}")
            if ckpt.in_flight and not waits:  # its thread would hold the interpreter's exit until its timeout
                exit_now(1)
            if ckpt.in_flight:  # closing the checkpointer (_await_rejoin) abandons it: it can no longer commit
                _log(env, f"the checkpoint in flight did not land within {wait_s:.0f} s: abandoned")
        stats.close()
        if not waits:
            return 1, None
        return 1, _await_rejoin(env, cfg, control_dir, ckpt, watcher)


def _await_rejoin(env: DistEnv, cfg: TrainerConfig, control_dir: Path | None, ckpt: Checkpointer | None,
                  watcher: flight_recorder.DumpOnRequest) -> dict[str, Any] | None:
    """This rank only saw a peer fail: it keeps its process and waits for the controller's order to rejoin the
    next attempt (trainer/rejoin.py). What this attempt held is let go first: the checkpointer (its files stay,
    for the restore), the dump watcher, the broken process group."""
    watcher.stop()
    if ckpt is not None:
        try:
            ckpt.close(timeout_s=0.0)
        except Exception as err:  # a broken group may fail to tear down; nothing of it is used again
            _log(env, f"closing the checkpointer: {type(err).__name__}: {err}")
    rejoin.leave_group()
    _log(env, f"a peer failed: keeping this process (pid {os.getpid()}), waiting up to {cfg.rejoin_wait_s:.0f} s "
              f"for an order to rejoin")
    order = rejoin.wait(control_dir, env.rank, env.attempt, cfg.rejoin_wait_s)
    if order is None:
        _log(env, "no order to rejoin came: exiting (the controller restarts processes)")
    else:
        _log(env, f"rejoining in attempt {order['attempt']} as rank {order['env'].get('RANK', env.rank)}")
    return order


def _storage_failure(e: BaseException, root: Path | None = None) -> bool:
    """A save that failed because the checkpoint file system is full, over quota or read-only: the training
    itself is sound, so it goes on and the next save tries again (the agent reports the disk).

    The errno does not always survive: torch's zip writer turns a short write into "unexpected pos", and the
    ranks that did not write the failing file see only DCP's summary. So a save that failed while the file
    system under `root` cannot hold another checkpoint the size of the newest one is a storage failure too."""
    if _errno_of_storage(e):
        return True
    return root is not None and _no_room_for_a_checkpoint(root)


def _no_room_for_a_checkpoint(root: Path) -> bool:
    try:
        free = shutil.disk_usage(root).free
        newest = committed(root)
        need = sum(f.stat().st_size for f in newest[0].iterdir() if f.is_file()) if newest else 1 << 20
    except (OSError, CheckpointError):
        return False
    return free < need


def _errno_of_storage(e: BaseException) -> bool:
    seen: set[int] = set()
    stack: list[object] = [e]
    while stack:
        x = stack.pop()
        if isinstance(x, tuple) and x:  # DCP's failures: rank -> (exception, traceback summary)
            x = x[0]
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _STORAGE_ERRNOS:
            return True
        failures = getattr(x, "failures", None)
        stack += [x.__cause__, x.__context__, *(failures.values() if isinstance(failures, dict) else ())]
    return any(text in str(e) for text in _STORAGE_TEXT)


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_STORAGE_TEXT = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def _saves_done(env: DistEnv, call: Callable[[], Any], stats: StatsWriter, config: HerdsmanConfig,
                step_s: float | None, step: int = 0) -> None:
    """Run a checkpoint call (poll, wait or save) and report what it finished; a save lost to a full or
    read-only checkpoint file system is reported and skipped, any other failure fails the rank."""
    try:
        done = call()  # poll/wait: the saves that finished; save: its blocked time (nothing finished)
    except (CheckpointError, OSError) as e:
        if not _storage_failure(e, Path(config.checkpoint_dir)):
            raise
        msg = f"checkpoint{f' of step {step}' if step else ''} failed, skipped (training goes on): " + \
              str(e).splitlines()[0][:500]
        _log(env, msg)
        stats.event(TrainerPhase.CHECKPOINT_FAILED, step=getattr(e, "step", step) or step, message=msg)
        return
    try:
        _report_commits(env, done if isinstance(done, list) else [], stats, config, step_s)
    except OSError as e:  # the running save-cost figures are advice; a full disk must not fail the rank
        if not _storage_failure(e):
            raise


def _report_commits(env: DistEnv, done: list, stats: StatsWriter, config: HerdsmanConfig,
                    step_s: float | None) -> None:
    """Rank 0 reports each committed checkpoint (the controller counts only those) and keeps the running save
    cost for the Young/Daly suggestion."""
    for p in done:
        if env.rank == 0 and p.committed:
            stats.event(TrainerPhase.CHECKPOINT, step=p.step, duration_s=p.blocked_s,
                        message=(f"memory tier {p.memory_bytes} B/rank; " if p.memory_bytes else "") +
                        f"save work {p.cpu_s:.3f} CPU-s (all ranks), done {p.took_s:.3f} s after it began")
            figures = {"save_blocked_s": p.blocked_s}
            if step_s:
                figures["step_s"] = step_s
            interval.record(config.checkpoint_dir, **figures)


def _sdc_stop(env: DistEnv, ckpt: Checkpointer, guard: ParamGuard, bad: list[int], step: int) -> None:
    """Every rank learns the verdict from the same all-reduce: no checkpoint after the last clean check may be
    loaded; the corrupted rank names itself (the controller evicts its host), the others stop without blame."""
    clean = guard.verified_through
    ckpt.distrust_after(clean, f"parameters of rank(s) {bad} changed outside the optimizer, found at step {step}; "
                               f"last clean check covered step {clean}")
    if env.rank in bad:
        raise SilentDataCorruption(f"parameter checksum mismatch on rank {env.rank} ({env.host}) at step {step}: "
                                   f"its parameters changed outside the optimizer; rolling back to step <= {clean}")
    raise PeerCorruption(f"stopping at step {step}: rank(s) {bad} failed their parameter check; rolling back to "
                         f"a checkpoint of step <= {clean}")


def memory_dir(config: HerdsmanConfig, host: str) -> Path:
    template = config.trainer.memory_dir or ("/dev/shm/herdsman/{job}/{host}" if Path("/dev/shm").is_dir()
                                             else "{run_dir}/memory/{host}")
    return Path(template.format(job=config.job, host=host, run_dir=config.run_dir))


def _env_path(name: str) -> Path | None:
    v = os.environ.get(name)
    return Path(v) if v else None


def _log(env: DistEnv, message: str) -> None:
    print(f"[trainer rank {env.rank}/{env.world_size} on {env.host}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainer.train", description="Herdsman's embedded Llama 3 trainer (one rank).")
    p.add_argument("--config", help="Herdsman TOML config (the [trainer] section, run_dir and job are used)")
    args = p.parse_args(argv)
    try:
        return train(load_config(args.config))
    except HerdsmanError as e:
        print(f"trainer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_now(main())

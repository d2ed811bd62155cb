"""A plain PyTorch DDP training script, not Herdsman's trainer: what a user brings.

It trains a small regression model with DistributedDataParallel (gloo on CPU, NCCL on GPU), saves a checkpoint
every `--checkpoint-every` steps (rank 0, written to a temporary name and renamed) and resumes from the newest one.
The only Herdsman-specific lines are the marked ones: where checkpoints live, and what it reports. Run it alone
with torchrun, or under Herdsman with

    [trainer]
    entrypoint = "python examples/ddp_train.py --steps 60"
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from herdsman.contract import Reporter, checkpoint_dir, resume_required  # Herdsman


def latest(ckpts):
    found = sorted(ckpts.glob("step-*.pt"))
    return found[-1] if found else None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--step-delay", type=float, default=0.05)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    report = Reporter()  # Herdsman
    ckpts = checkpoint_dir("ddp-checkpoints")  # Herdsman
    ckpts.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(device)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    step = 0
    path = latest(ckpts)
    if path is not None:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
    elif resume_required():  # Herdsman: a checkpoint was committed, so starting over would lose work
        raise SystemExit(f"no checkpoint in {ckpts} although one was committed")
    report.restored(step)  # Herdsman

    gen = torch.Generator().manual_seed(1234 + rank)
    target = torch.randn(32, 1, generator=torch.Generator().manual_seed(7)).to(device)
    while step < a.steps:
        t0 = time.perf_counter()
        x = torch.randn(16, 32, generator=gen).to(device)
        loss = torch.nn.functional.mse_loss(ddp(x), x @ target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(a.step_delay)
        step += 1
        report.step(step, loss.item(), time.perf_counter() - t0)  # Herdsman
        if step % a.checkpoint_every == 0 or step == a.steps:
            dist.barrier()
            if rank == 0:
                tmp = ckpts / f".step-{step:08d}.pt.tmp"
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
                os.replace(tmp, ckpts / f"step-{step:08d}.pt")
                report.checkpoint(step)  # Herdsman
            dist.barrier()
    report.finished(step)  # Herdsman
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

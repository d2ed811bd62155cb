"""Silent data corruption checks that ride on the step's all-reduce.

Parameters change only in the optimizer step. After each update every rank checksums its own parameter shards;
before the next update it checksums them again. Both checksums travel in the step's existing all-reduce (each rank
fills its own slot of a world-sized vector), so every rank holds every rank's expected and actual value and they
all reach the same verdict at the same step, with no extra collective. A rank whose shards changed between two
updates had them corrupted in memory (a flipped bit that ECC did not catch); it is named, and no checkpoint taken
after the last clean check is trusted.

The checksum is the sum of the shards' 32-bit words modulo 2**52: any single flipped bit changes it, and it is
exact in the float64 all-reduce.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.distributed.tensor import DTensor

from herdsman import HerdsmanError

_MOD = 1 << 52


class SilentDataCorruption(HerdsmanError):
    """Raised on the rank whose parameters failed the check (the text diagnosis matches it)."""


class PeerCorruption(HerdsmanError):
    """Raised on the other ranks: they stop so the job can roll back, but their hosts are not to blame."""


def shard_checksum(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-d int64 tensor on the parameters' device: no host sync (the step's all-reduce carries it)."""
    sums = []
    for p in params:
        t = (p.to_local() if isinstance(p, DTensor) else p).detach().contiguous().view(-1)
        raw = t.view(torch.uint8)
        words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
        sums.append(words.sum(dtype=torch.int64))  # int64 wraps mod 2**64, a multiple of 2**52
    return torch.stack(sums).sum() % _MOD


class ParamGuard:
    """Slots [expected(W), actual(W)] of the step's all-reduce vector; `every` steps apart (0: off)."""

    def __init__(self, rank: int, world_size: int, every: int):
        self.rank, self.world, self.every = rank, world_size, every
        self.verified_through = 0  # the newest step whose post-update parameters were confirmed intact
        self._expected: torch.Tensor | None = None  # every rank's checksum after the last recorded update
        self._expected_step = 0

    @property
    def width(self) -> int:
        return 2 * self.world if self.every else 0

    def before_update(self, step: int, params: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The `actual` slots for this step (zeros unless this step is checked)."""
        return self._slots(self._checks(step), params, device)

    def after_update(self, step: int, params: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The `expected` slots: recorded after the update that precedes a checked step."""
        return self._slots(self._checks(step + 1), params, device)

    def _slots(self, check: bool, params: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
        out = torch.zeros(self.world, dtype=torch.float64, device=device)
        if check:
            out[self.rank] = shard_checksum(params).to(device, torch.float64)
        return out

    def _checks(self, step: int) -> bool:
        return bool(self.every) and step > 1 and step % self.every == 0

    def judge(self, step: int, reduced: torch.Tensor) -> list[int]:
        """Given this step's reduced [expected(W), actual(W)] slots, the ranks whose parameters changed outside
        the optimizer (empty when clean). Call on every rank with the same tensor: they all agree."""
        if not self.every:
            return []
        expected, actual = reduced[: self.world], reduced[self.world:]
        bad: list[int] = []
        if self._checks(step) and self._expected is not None and self._expected_step == step - 1:
            bad = [r for r in range(self.world) if actual[r].item() != self._expected[r].item()]
            if not bad:
                self.verified_through = step - 1
        if self._checks(step + 1):
            self._expected, self._expected_step = expected.clone(), step
        return bad


def flip_bit(params: Iterable[torch.Tensor], bit: int = 22) -> str:
    """Fault injection: flip one bit of this rank's first parameter shard in place (what a cosmic ray or a
    marginal SRAM cell does). Returns a description."""
    for p in params:
        t = (p.to_local() if isinstance(p, DTensor) else p).detach()
        if t.numel() == 0:
            continue
        words = t.view(-1).view(torch.uint8)
        words[bit // 8] ^= 1 << (bit % 8)
        return f"flipped bit {bit} of a {tuple(t.shape)} shard"
    raise RuntimeError("no local parameter shard to corrupt")

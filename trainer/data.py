"""Tokenizer, a generated text corpus, and a packed loader that resumes exactly.

The tokenizer is byte-level (UTF-8 bytes plus BOS/EOS), so nothing is downloaded. The corpus is generated from
a seed: short documents of arithmetic, counting, sorting and cluster-operations prose, varied enough for the
loss to fall and deterministic on every machine. Documents are packed back to back into fixed-length sequences;
each token carries its document id so attention never crosses a boundary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

BOS, EOS = 256, 257
VOCAB_SIZE = 260  # 256 bytes, BOS, EOS, two reserved
IGNORE = -100


def encode(text: str) -> list[int]:
    return [BOS, *text.encode("utf-8"), EOS]


def decode(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


_HOSTS = ["node-a", "node-b", "node-c", "node-d", "gpu-host-7", "rack12-n3"]
_PARTS = ["GPU", "NIC", "SSD", "HBM3 stack", "power supply", "CPU", "switch port", "cable"]
_VERBS = ["failed", "was drained", "returned to service", "was quarantined", "threw Xid 79", "ran hot"]


def _document(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a} + {b} = {a + b}. {b} + {a} = {a + b}."
    if kind == 1:
        start, n = rng.randrange(50), rng.randrange(4, 12)
        return "count: " + " ".join(str(start + i) for i in range(n)) + "."
    if kind == 2:
        xs = [rng.randrange(100) for _ in range(rng.randrange(3, 8))]
        return f"sort {xs} -> {sorted(xs)}"
    if kind == 3:
        host, part, verb = rng.choice(_HOSTS), rng.choice(_PARTS), rng.choice(_VERBS)
        return f"At step {rng.randrange(10_000)}, the {part} on {host} {verb}. The job restarted from the last checkpoint."
    word = rng.choice(["herd", "llama", "shepherd", "checkpoint", "gradient"])
    return f"The {word} is {rng.choice(['calm', 'fast', 'patient', 'sharded', 'warm'])}. " * rng.randrange(1, 4)


def build_corpus(seed: int, n_docs: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, doc_ids) as two aligned int64 tensors."""
    rng = random.Random(seed)
    tokens: list[int] = []
    doc_ids: list[int] = []
    for d in range(n_docs):
        t = encode(_document(rng))
        tokens += t
        doc_ids += [d] * len(t)
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(doc_ids, dtype=torch.long)


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T)
    doc_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), IGNORE where the next token starts another document


class PackedLoader:
    """Deterministic global order: step s consumes sequences [s*W*B, (s+1)*W*B); rank r takes its slice of B.

    The state is a single sequence position shared by all ranks, so a checkpoint saved by N ranks resumes on M.
    """

    def __init__(self, seed: int, seq_len: int, batch_size: int, rank: int, world_size: int):
        self.tokens, self.doc_ids = build_corpus(seed)
        if len(self.tokens) < 4 * (seq_len + 1):
            raise ValueError("corpus too small for this sequence length")
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.position = 0  # global sequences consumed

    def next_batch(self) -> Batch:
        T, B = self.seq_len, self.batch_size
        span = len(self.tokens) - (T + 1)
        first = self.position + self.rank * B
        starts = [((first + i) * T) % span for i in range(B)]
        idx = torch.tensor(starts)[:, None] + torch.arange(T + 1)[None, :]
        tok, doc = self.tokens[idx], self.doc_ids[idx]
        targets = tok[:, 1:].clone()
        targets[doc[:, 1:] != doc[:, :-1]] = IGNORE
        self.position += self.world_size * B
        return Batch(tok[:, :-1], doc[:, :-1], targets)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

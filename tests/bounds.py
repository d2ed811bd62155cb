"""Per-example bounds for the fuzz tests: each example must finish within a time and a memory budget, not merely
without an exception (a parser that takes 27 s or 800 MB on a 277-byte input fails here even if it then answers).

    with bounded("flight-recorder dump", seconds=2.0, mib=64):
        ...one example...

Memory is Python's own allocation peak while the block runs, above what was allocated when it began (tracemalloc:
objects, buffers, numpy arrays; not memory a C library gets from malloc directly). Time is wall time, measured with
tracemalloc on, which slows allocation-heavy code by about 2x: the budgets allow for that. The largest time and peak
seen per label are kept in OBSERVED (what the README's reliability figures quote).
"""

from __future__ import annotations

import contextlib
import time
import tracemalloc
from collections.abc import Iterator

MIB = 1 << 20

OBSERVED: dict[str, tuple[int, float, float]] = {}
"""label -> (examples, the longest seconds, the highest peak in MiB)."""


@contextlib.contextmanager
def bounded(label: str, seconds: float, mib: float = 64.0) -> Iterator[None]:
    """Fails the example when the block took `seconds` or more, or allocated `mib` MiB or more at its peak, whether
    it returned or raised (an expected error must come within the bounds too)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - t0
        peak = max(0.0, (tracemalloc.get_traced_memory()[1] - base) / MIB)
        if not was_tracing:
            tracemalloc.stop()
        n, worst_s, worst_mib = OBSERVED.get(label, (0, 0.0, 0.0))
        OBSERVED[label] = (n + 1, max(worst_s, elapsed), max(worst_mib, peak))
        over = ([f"took {elapsed:.2f} s (bound {seconds} s)"] if elapsed >= seconds else []) + \
            ([f"allocated a peak of {peak:.1f} MiB (bound {mib} MiB)"] if peak >= mib else [])
        if over:  # replaces (and chains) whatever the block raised
            raise AssertionError(f"{label}: one example {' and '.join(over)}")

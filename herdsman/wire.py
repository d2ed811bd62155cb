"""The agents' wire format: one compact msgpack frame per report, frames that concatenate.

A fleet's intake cannot afford a pickled dataclass per GPU sample on every heartbeat (2,048 nodes x 8 GPUs a
second). So a report on the wire is a msgpack array of plain values — host, seq, time, and only what changed: the
evidence, rank 0's step records and lifecycle events (the only ones the job ledger reads; every rank's records stay
on its node for the straggler check and Prometheus), and GPU samples only when the sender says so (the first
report, every `agent.samples_every_s`, and whenever the report carries evidence). Frames are self-delimiting, so a
relay forwards many agents' frames as one `bytes` joined without decoding them, and the controller reads the
batch back with one streaming unpacker. A frame that does not decode is counted and skipped; the rest of its
batch is kept.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any, Iterable

import msgpack

from herdsman.events import (
    AgentReport,
    Evidence,
    EvidenceKind,
    GpuSample,
    Heartbeat,
    Severity,
    StepStats,
    TrainerEvent,
    TrainerPhase,
)

log = logging.getLogger("herdsman.wire")

VERSION = 1
MAX_BATCH_BYTES = 64 << 20  # what one controller call may carry: a relay flushes long before this
_SAMPLE_FIELDS = tuple(f.name for f in fields(GpuSample))
_STEP_FIELDS = tuple(f.name for f in fields(StepStats))
_TUPLE_FIELDS = {"throttle_reasons"}


def _plain(x: Any) -> Any:
    """What msgpack cannot carry as is (an enum, a set, a path in evidence attrs) travels as text or a list."""
    if isinstance(x, (set, frozenset)):
        return sorted(x, key=str)
    return x.value if hasattr(x, "value") else str(x)


_packer = msgpack.Packer(default=_plain, use_bin_type=True)


def _sample(s: GpuSample) -> list[Any]:
    return [getattr(s, f) for f in _SAMPLE_FIELDS]


def _evidence(e: Evidence) -> list[Any]:
    return [e.host, e.kind.value, e.time, e.message, e.severity.value, e.gpu, e.code, e.rank, e.attrs]


def _event(e: TrainerEvent) -> list[Any]:
    return [e.rank, e.host, e.attempt, e.phase.value, e.time, e.step, e.duration_s, e.message, e.pid, e.gpu]


def encode(r: AgentReport, samples: bool = True, ranks: Iterable[int] | None = (0,)) -> bytes:
    """One report as a frame. `ranks`: whose step records and events travel (None: every rank's)."""
    keep = None if ranks is None else frozenset(ranks)
    hb = r.heartbeat
    return _packer.pack([
        VERSION, hb.host, hb.seq, hb.time,
        hb.metrics_url if samples else None,
        [_sample(s) for s in hb.gpus] if samples else None,
        [_evidence(e) for e in r.evidence],
        [[getattr(s, f) for f in _STEP_FIELDS] for s in r.steps if keep is None or s.rank in keep],
        [_event(e) for e in r.trainer_events if keep is None or e.rank in keep],
    ])


def urgent(r: AgentReport) -> bool:
    """A report a relay must forward at once rather than with its next batch: it may end an attempt."""
    return any(e.severity == Severity.CRITICAL or e.kind == EvidenceKind.TRAINER_EXCEPTION for e in r.evidence) or any(
        e.phase in (TrainerPhase.FAILED, TrainerPhase.FINISHED) for e in r.trainer_events)


_NUM = (int, float)
_OPT_INT = (int, type(None))
# the types each record's fields must have: a frame that decodes to something else is refused, not absorbed
_EVIDENCE_TYPES = (str, str, _NUM, str, str, _OPT_INT, _OPT_INT, _OPT_INT, dict)
_STEP_TYPES = (int, str, int, int, _NUM, _NUM, int, _NUM, _NUM, _NUM)
_EVENT_TYPES = (int, str, int, str, _NUM, int, _NUM, str, int, _OPT_INT)


def _typed(rows: Any, types: tuple[Any, ...], what: str) -> list[list[Any]]:
    if not isinstance(rows, list):
        raise ValueError(f"{what}: not a list")
    for row in rows:
        if not isinstance(row, list) or len(row) != len(types) or not all(
                isinstance(v, t) and not (isinstance(v, bool) and t is int) for v, t in zip(row, types)):
            raise ValueError(f"{what}: a record of the wrong shape")
    return rows


def _decode_one(a: list[Any]) -> AgentReport:
    if not isinstance(a, list) or len(a) != 9 or a[0] != VERSION:
        raise ValueError(f"not a version-{VERSION} report frame")
    _, host, seq, t, url, samples, evidence, steps, events = a
    if not isinstance(host, str) or not isinstance(seq, int) or not isinstance(t, (int, float)):
        raise ValueError("report frame without host, seq and time")
    evidence = _typed(evidence, _EVIDENCE_TYPES, "evidence")
    steps = _typed(steps, _STEP_TYPES, "steps")
    events = _typed(events, _EVENT_TYPES, "trainer events")
    if url is not None and not isinstance(url, str):
        raise ValueError("metrics url: not text")
    gpus: tuple[GpuSample, ...] = ()
    if samples is not None:
        if not isinstance(samples, list) or not all(
                isinstance(x, list) and len(x) == len(_SAMPLE_FIELDS) and isinstance(x[0], int) for x in samples):
            raise ValueError("GPU samples of the wrong shape")
        gpus = tuple(GpuSample(**{f: (tuple(v) if f in _TUPLE_FIELDS else v) for f, v in zip(_SAMPLE_FIELDS, s)})
                     for s in samples)
    return AgentReport(
        Heartbeat(host, float(t), seq, url or "", gpus),
        tuple(Evidence(h, EvidenceKind(k), tm, m, Severity(sv), g, c, rk, at)
              for h, k, tm, m, sv, g, c, rk, at in evidence),
        tuple(StepStats(*s) for s in steps),
        tuple(TrainerEvent(rk, h, att, TrainerPhase(ph), tm, st, d, m, pid, g)
              for rk, h, att, ph, tm, st, d, m, pid, g in events),
    )


def decode(blob: bytes) -> tuple[list[AgentReport], int]:
    """Every report in a batch of frames, and how many frames were refused (malformed, from a newer agent)."""
    if len(blob) > MAX_BATCH_BYTES:
        log.error("report batch of %d bytes refused (limit %d)", len(blob), MAX_BATCH_BYTES)
        return [], 1
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=MAX_BATCH_BYTES)
    unpacker.feed(blob)
    out, bad, end = [], 0, 0
    while True:
        try:
            a = unpacker.unpack()
            end = unpacker.tell()
        except msgpack.OutOfData:
            if end < len(blob):  # a frame cut short: the frames before it are whole
                bad += 1
                log.warning("report batch ends in a partial frame (%d bytes)", len(blob) - end)
            break
        except Exception as e:  # not msgpack at all: nothing after it can be framed
            log.error("report batch unreadable after %d frame(s): %s", len(out) + bad, e)
            return out, bad + 1
        try:
            out.append(_decode_one(a))
        except (TypeError, ValueError, KeyError) as e:
            bad += 1
            log.warning("report frame refused: %s", e)
    return out, bad

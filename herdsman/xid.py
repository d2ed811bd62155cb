"""NVIDIA Xid codes that matter for training, with the root cause each points to.

From NVIDIA's Xid catalogue; `fatal` means the GPU cannot keep running the job (the process dies or must be
restarted and the device needs a reset or repair). Used by the agents (severity) and by diagnosis (cause).
"""

from __future__ import annotations

from dataclasses import dataclass

from herdsman.taxonomy import RootCause


@dataclass(frozen=True)
class Xid:
    code: int
    meaning: str
    cause: RootCause
    fatal: bool


_G, _H, _S, _P, _B = (RootCause.FAULTY_GPU, RootCause.GPU_HBM3_MEMORY, RootCause.GPU_SRAM_MEMORY,
                      RootCause.GPU_SYSTEM_PROCESSOR, RootCause.SOFTWARE_BUG)
XIDS: dict[int, Xid] = {x.code: x for x in [
    Xid(13, "graphics engine exception (often an application bug)", _B, False),
    Xid(31, "GPU memory page fault (often an application bug)", _B, False),
    Xid(43, "GPU stopped processing (application fault)", _B, False),
    Xid(45, "preemptive cleanup, due to previous errors", _B, False),
    Xid(48, "double-bit ECC error (DBE)", _H, True),
    Xid(61, "internal micro-controller breakpoint/warning (PMU/GSP)", _P, True),
    Xid(62, "internal micro-controller halt", _P, True),
    Xid(63, "ECC page retirement or row remapping recorded", _H, False),
    Xid(64, "ECC page retirement or row remapping failure", _H, True),
    Xid(74, "NVLink error", _G, True),
    Xid(79, "GPU has fallen off the bus", _G, True),
    Xid(92, "high single-bit ECC error rate", _H, False),
    Xid(94, "contained ECC error", _H, True),
    Xid(95, "uncontained ECC error", _S, True),
    Xid(119, "GSP RPC timeout", _P, True),
    Xid(120, "GSP error", _P, True),
    Xid(140, "unrecovered ECC error", _H, True),
    Xid(143, "GPU initialization failure", _G, True),
]}


def lookup(code: int) -> Xid | None:
    return XIDS.get(code)

"""x86 machine-check (MCA) status decoding: is it the memory (system_memory) or the processor itself (cpu)?

The compound error code (MCACOD, the low 16 bits of IA32_MCi_STATUS) says which unit reported the error (Intel
SDM vol. 3B, "Interpreting the MCA Error Codes"; AMD uses the same compound codes for its legacy banks):
- 0000 0000 1MMM CCCC: memory controller errors -> system_memory;
- 0000 0001 RRRR TTLL: cache hierarchy; 0000 0000 0001 TTLL: TLB; 0000 1PPT RRRR IILL: bus and interconnect;
  0000 01xx xxxx xxxx: internal unclassified (IERR, internal timer); 0000 0000 0000 0xxx: generic -> cpu.
Bit 12 of MCACOD is the corrected-error filtering flag and is ignored. Bit 61 (UC) marks an uncorrected error,
bit 63 (VAL) a valid record.
"""

from __future__ import annotations

from herdsman.taxonomy import RootCause

_UC = 1 << 61


def decode_status(status: int) -> tuple[RootCause, bool, str] | None:
    """(cause, uncorrected, what) for an MCi_STATUS value, or None when it decodes to nothing we know."""
    if status < 0 or status >= 1 << 64:
        return None
    code = status & 0xEFFF  # drop the filtering bit
    uncorrected = bool(status & _UC)
    if code & 0xFF80 == 0x0080:
        return RootCause.SYSTEM_MEMORY, uncorrected, "memory controller error"
    if code & 0xFF00 == 0x0100:
        return RootCause.CPU, uncorrected, "cache hierarchy error"
    if code & 0xFFF0 == 0x0010:
        return RootCause.CPU, uncorrected, "TLB error"
    if code & 0xF800 == 0x0800:
        return RootCause.CPU, uncorrected, "bus/interconnect error"
    if code & 0xFC00 == 0x0400:
        return RootCause.CPU, uncorrected, "internal error"
    if code & 0xFFF8 == 0x0000 and code:
        return RootCause.CPU, uncorrected, "generic processor error"
    return None


def parse_hex(text: str, max_digits: int = 16) -> int | None:
    """A bounded hexadecimal number (MCA status words are 64-bit)."""
    t = text.strip().lower().removeprefix("0x").replace("'", "")  # HPE's IML groups it: 0xBA000000'00400405
    if not t or len(t) > max_digits:
        return None
    try:
        return int(t, 16)
    except ValueError:
        return None

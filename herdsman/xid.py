"""NVIDIA Xid codes with the Table 5 root cause each points to.

From NVIDIA's Xid catalogue (docs.nvidia.com/deploy/xid-errors, the "Xid Errors" table and the newer catalogue
with recovery actions for Hopper and Blackwell). `fatal` means the GPU cannot keep running the job (the process
dies or must be restarted and the device needs a reset or repair): such an Xid decides a diagnosis on its own.
A non-fatal Xid only supports one. `application` marks the codes NVIDIA lists as usually caused by the
application (13, 31, 43, 45, 68, 109, ...): they point at a software bug unless hardware evidence joins them.
An Xid the table does not list is still a GPU-reported error: it supports `faulty_gpu` (see `lookup_or_default`).
"""

from __future__ import annotations

from dataclasses import dataclass

from herdsman.taxonomy import RootCause

XID_DOC = "https://docs.nvidia.com/deploy/xid-errors/index.html"


@dataclass(frozen=True)
class Xid:
    code: int
    meaning: str
    cause: RootCause
    fatal: bool
    application: bool = False  # usually caused by the application (software unless hardware evidence joins)


_G, _H, _S, _P, _B = (RootCause.FAULTY_GPU, RootCause.GPU_HBM3_MEMORY, RootCause.GPU_SRAM_MEMORY,
                      RootCause.GPU_SYSTEM_PROCESSOR, RootCause.SOFTWARE_BUG)
_T, _IO, _D = RootCause.GPU_THERMAL_INTERFACE_SENSOR, RootCause.IO_EXPANSION_BOARD, RootCause.DEPENDENCY
XIDS: dict[int, Xid] = {x.code: x for x in [
    Xid(1, "invalid or corrupted push buffer stream", _B, False, True),
    Xid(2, "invalid or corrupted push buffer stream", _B, False, True),
    Xid(3, "invalid or corrupted push buffer stream", _B, False, True),
    Xid(4, "invalid or corrupted push buffer stream", _B, False, True),
    Xid(6, "invalid or corrupted push buffer stream", _B, False, True),
    Xid(7, "invalid or corrupted push buffer address", _B, False, True),
    Xid(8, "GPU stopped processing (bad data or methods from the application)", _B, False, True),
    Xid(9, "driver error programming GPU", _D, False),
    Xid(11, "invalid or corrupted push buffer stream", _B, False, True),
    Xid(12, "driver error handling GPU exception", _D, False),
    Xid(13, "graphics engine exception (often an application bug)", _B, False, True),
    Xid(16, "display engine hung", _G, False),
    Xid(18, "bus mastering disabled in PCI config space", _IO, True),
    Xid(19, "display engine error", _G, False),
    Xid(20, "invalid or corrupted MPEG push buffer", _B, False, True),
    Xid(21, "invalid or corrupted motion estimation push buffer", _B, False, True),
    Xid(22, "invalid or corrupted video processor push buffer", _B, False, True),
    Xid(24, "GPU semaphore timeout", _B, False, True),
    Xid(25, "invalid or illegal push buffer stream", _B, False, True),
    Xid(26, "framebuffer timeout", _G, False),
    Xid(27, "video processor exception", _G, False),
    Xid(28, "video processor exception", _G, False),
    Xid(29, "video processor exception", _G, False),
    Xid(30, "GPU semaphore access error", _B, False, True),
    Xid(31, "GPU memory page fault (often an application bug)", _B, False, True),
    Xid(32, "invalid or corrupted push buffer stream (bus or system memory)", _IO, False),
    Xid(33, "internal micro-controller error", _P, False),
    Xid(34, "video processor exception", _G, False),
    Xid(35, "video processor exception", _G, False),
    Xid(36, "video processor exception", _G, False),
    Xid(37, "driver firmware error", _D, False),
    Xid(38, "FECS micro-controller watchdog timeout", _P, False),
    Xid(39, "copy engine exception (often an application bug)", _B, False, True),
    Xid(40, "copy engine exception (often an application bug)", _B, False, True),
    Xid(41, "copy engine exception (often an application bug)", _B, False, True),
    Xid(42, "video processor exception", _G, False),
    Xid(43, "GPU stopped processing (application fault)", _B, False, True),
    Xid(44, "graphics engine fault during context switch", _G, True),
    Xid(45, "preemptive cleanup, due to previous errors", _B, False, True),
    Xid(46, "GPU stopped processing (GPU permanently stopped)", _G, True),
    Xid(47, "video processor exception", _G, False),
    Xid(48, "double-bit ECC error (DBE)", _H, True),
    Xid(54, "auxiliary power is not connected to the GPU board", RootCause.POWER_SUPPLY, True),
    Xid(56, "display engine error", _G, False),
    Xid(57, "error programming video memory interface", _H, True),
    Xid(58, "unstable video memory interface detected", _H, True),
    Xid(59, "internal micro-controller error", _P, False),
    Xid(60, "SEC2/video processor exception (often an application bug)", _B, False, True),
    Xid(61, "internal micro-controller breakpoint/warning (PMU/GSP)", _P, True),
    Xid(62, "internal micro-controller halt", _P, True),
    Xid(63, "ECC page retirement or row remapping recorded", _H, False),
    Xid(64, "ECC page retirement or row remapping failure", _H, True),
    Xid(65, "video processor exception", _G, False),
    Xid(66, "illegal access by driver", _D, False),
    Xid(67, "illegal access by driver", _D, False),
    Xid(68, "NVDEC0 exception (often an application bug)", _B, False, True),
    Xid(69, "graphics engine class error (often an application bug)", _B, False, True),
    Xid(70, "copy engine exception (often an application bug)", _B, False, True),
    Xid(71, "copy engine exception (often an application bug)", _B, False, True),
    Xid(72, "copy engine exception (often an application bug)", _B, False, True),
    Xid(73, "NVENC2 error", _G, False),
    Xid(74, "NVLink error", _G, True),
    Xid(75, "copy engine exception (often an application bug)", _B, False, True),
    Xid(76, "copy engine exception (often an application bug)", _B, False, True),
    Xid(77, "copy engine exception (often an application bug)", _B, False, True),
    Xid(78, "vGPU start error", _D, False),
    Xid(79, "GPU has fallen off the bus", _G, True),
    Xid(80, "corrupted data sent to GPU", _G, False),
    Xid(81, "VGA subsystem error", _G, False),
    Xid(82, "NVJPG0 error", _G, False),
    Xid(83, "NVDEC1 error", _G, False),
    Xid(84, "NVDEC2 error", _G, False),
    Xid(85, "copy engine exception (often an application bug)", _B, False, True),
    Xid(86, "OFA exception", _G, False),
    Xid(87, "reserved", _G, False),
    Xid(88, "NVDEC3 error", _G, False),
    Xid(89, "NVDEC4 error", _G, False),
    Xid(92, "high single-bit ECC error rate", _H, False),
    Xid(93, "non-fatal violation of provisioned InfoROM wear limit", _G, False),
    Xid(94, "contained ECC error", _H, True),
    Xid(95, "uncontained ECC error", _S, True),
    Xid(96, "NVDEC5 error", _G, False),
    Xid(97, "NVDEC6 error", _G, False),
    Xid(98, "NVDEC7 error", _G, False),
    Xid(99, "NVJPG1 error", _G, False),
    Xid(100, "NVJPG2 error", _G, False),
    Xid(109, "context switch timeout (often an application bug)", _B, False, True),
    Xid(110, "security fault", _G, True),
    Xid(111, "display bundle error event", _G, False),
    Xid(112, "display supervisor error", _G, False),
    Xid(113, "DP link training error", _G, False),
    Xid(114, "display pipeline underflow", _G, False),
    Xid(115, "display core channel error", _G, False),
    Xid(116, "display window channel error", _G, False),
    Xid(117, "display cursor channel error", _G, False),
    Xid(118, "display pixel pipeline error", _G, False),
    Xid(119, "GSP RPC timeout", _P, True),
    Xid(120, "GSP error", _P, True),
    Xid(121, "C2C link corrected error", _G, False),
    Xid(122, "SPI PMU RPC read failure", _P, False),
    Xid(123, "SPI PMU RPC write failure", _P, False),
    Xid(124, "SPI PMU RPC erase failure", _P, False),
    Xid(125, "InfoROM FS failure", _G, False),
    Xid(126, "copy engine exception (often an application bug)", _B, False, True),
    Xid(127, "copy engine exception (often an application bug)", _B, False, True),
    Xid(128, "copy engine exception (often an application bug)", _B, False, True),
    Xid(129, "copy engine exception (often an application bug)", _B, False, True),
    Xid(130, "copy engine exception (often an application bug)", _B, False, True),
    Xid(131, "copy engine exception (often an application bug)", _B, False, True),
    Xid(132, "copy engine exception (often an application bug)", _B, False, True),
    Xid(133, "copy engine exception (often an application bug)", _B, False, True),
    Xid(134, "copy engine exception (often an application bug)", _B, False, True),
    Xid(135, "copy engine exception (often an application bug)", _B, False, True),
    Xid(136, "NVLink link training failed", _G, True),
    Xid(137, "NVLink FLA privilege error (often an application bug)", _B, False, True),
    Xid(140, "unrecovered ECC error", _H, True),
    Xid(141, "reserved", _G, False),
    Xid(143, "GPU initialization failure", _G, True),
    Xid(144, "NVLink SAW MVB error", _G, True),
    Xid(145, "NVLink RLW error", _G, True),
    Xid(146, "NVLink TLW error", _G, True),
    Xid(147, "NVLink TREX error (software class, non-fatal)", _B, False, True),
    Xid(148, "NVLink NVLPW control error (software class, non-fatal)", _B, False, True),
    Xid(149, "NVLink NETIR error", _G, True),
    Xid(150, "NVLink MSE firmware error", _P, True),
    Xid(151, "confidential-computing key rotation error", _D, False),
    Xid(152, "DLA / engine timeout", _G, False),
    Xid(153, "page retirement / resource retirement event", _H, False),
    Xid(154, "GPU recovery action changed (reset or reboot required)", _G, True),
    Xid(155, "NVLink link down (software-defined)", _B, False, True),
    Xid(156, "spare resource retired (reset to apply)", _G, False),
    Xid(157, "no spare resources left", _G, True),
    Xid(158, "GPU fatal timeout", _G, True),
    Xid(159, "C2C/CHI non-data error", _IO, False),
    Xid(160, "channel / L2 slice repair recorded", _H, False),
    Xid(161, "no spare channels or L2 slices left", _H, True),
    Xid(162, "power smoothing re-engaged", RootCause.POWER_SUPPLY, False),
    Xid(163, "power smoothing disengaged", RootCause.POWER_SUPPLY, False),
    Xid(164, "power smoothing circuitry lifetime low", RootCause.POWER_SUPPLY, False),
    Xid(165, "power smoothing circuitry lifetime exhausted", RootCause.POWER_SUPPLY, False),
    Xid(166, "confidential-computing configuration error", _D, True),
    Xid(167, "PCIe fatal timeout", _IO, True),
    Xid(168, "errors in WPR with ECC disabled", _H, False),
    Xid(169, "SEC2 micro-controller halt", _P, True),
    Xid(170, "confidential-computing configuration error", _D, True),
    Xid(171, "DRAM uncorrectable error (detail of Xid 48)", _H, True),
    Xid(172, "SRAM uncorrectable error (detail of Xid 48)", _S, True),
]}

# An Xid the table lacks: the GPU reported an error, but how grave is unknown.
UNLISTED = Xid(0, "unlisted Xid", _G, False)


# Xid 94/95 name the unit that held the error ("Contained: SM (0x1). RST: No"): on-chip units are SRAM.
_SRAM_UNITS = ("SM", "LTC", "L2", "TAG", "GPC", "TPC", "L1", "RF", "SHM")
_DRAM_UNITS = ("FBPA", "HBM", "DRAM", "FB", "MMU")


def unit_cause(code: int, text: str) -> RootCause | None:
    """The memory an ECC Xid's message names, if it names one."""
    if code not in (48, 94, 95):
        return None
    _, sep, rest = text.partition("ontained: ")
    if not sep:
        return None
    unit = rest.split(" ", 1)[0].strip(".,:()").upper()
    if unit in _SRAM_UNITS:
        return RootCause.GPU_SRAM_MEMORY
    if unit in _DRAM_UNITS:
        return RootCause.GPU_HBM3_MEMORY
    return None


def lookup(code: int) -> Xid | None:
    return XIDS.get(code)


def lookup_or_default(code: int) -> Xid:
    return XIDS.get(code, UNLISTED)

"""Root causes of training interruptions: the Llama 3 report's Table 5 categories, plus `unknown`.

Each cause carries the facts the rest of Herdsman acts on: whether it is a fault of the host (so the host is
taken out of the herd), the default action, whether a human is paged, and the runbook that explains it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(str, enum.Enum):
    """What the controller does about an interruption."""

    RESTART = "restart"  # restart on the same hosts
    EVICT = "evict"  # quarantine the blamed hosts, restart on the rest plus spares
    DRAIN = "drain"  # checkpoint, take the host out, restart elsewhere (planned)
    STOP = "stop"  # restarting will not help: stop the job and page


@dataclass(frozen=True)
class CauseFacts:
    component: str  # Table 5 "Component" column
    category: str  # Table 5 "Category" column
    table5_count: int  # interruptions in Llama 3 405B's 54 days (0 for unknown)
    table5_percent: float  # as printed in the report
    host_fault: bool  # the blamed host is taken out of service
    action: Action
    pages: bool = False  # a human is paged as well

    @property
    def hardware(self) -> bool:
        return self.category in ("GPU", "Host", "Network")


class RootCause(str, enum.Enum):
    FAULTY_GPU = "faulty_gpu"
    GPU_HBM3_MEMORY = "gpu_hbm3_memory"
    SOFTWARE_BUG = "software_bug"
    NETWORK_SWITCH_CABLE = "network_switch_cable"
    HOST_MAINTENANCE = "host_maintenance"
    GPU_SRAM_MEMORY = "gpu_sram_memory"
    GPU_SYSTEM_PROCESSOR = "gpu_system_processor"
    NIC = "nic"
    NCCL_WATCHDOG_TIMEOUT = "nccl_watchdog_timeout"
    SILENT_DATA_CORRUPTION = "silent_data_corruption"
    GPU_THERMAL_INTERFACE_SENSOR = "gpu_thermal_interface_sensor"
    SSD = "ssd"
    POWER_SUPPLY = "power_supply"
    SERVER_CHASSIS = "server_chassis"
    IO_EXPANSION_BOARD = "io_expansion_board"
    DEPENDENCY = "dependency"
    CPU = "cpu"
    SYSTEM_MEMORY = "system_memory"
    UNKNOWN = "unknown"

    @property
    def facts(self) -> CauseFacts:
        return FACTS[self]

    @property
    def runbook(self) -> str:
        """Runbook file name under runbooks/."""
        return f"{self.value}.md"


_E, _R, _D, _S = Action.EVICT, Action.RESTART, Action.DRAIN, Action.STOP
FACTS: dict[RootCause, CauseFacts] = {
    RootCause.FAULTY_GPU: CauseFacts("Faulty GPU", "GPU", 148, 30.1, True, _E),
    RootCause.GPU_HBM3_MEMORY: CauseFacts("GPU HBM3 Memory", "GPU", 72, 17.2, True, _E),
    RootCause.SOFTWARE_BUG: CauseFacts("Software Bug", "Dependency", 54, 12.9, False, _R),
    RootCause.NETWORK_SWITCH_CABLE: CauseFacts("Network Switch/Cable", "Network", 35, 8.4, True, _E, pages=True),
    RootCause.HOST_MAINTENANCE: CauseFacts("Host Maintenance", "Unplanned Maintenance", 32, 7.6, True, _D),
    RootCause.GPU_SRAM_MEMORY: CauseFacts("GPU SRAM Memory", "GPU", 19, 4.5, True, _E),
    RootCause.GPU_SYSTEM_PROCESSOR: CauseFacts("GPU System Processor", "GPU", 17, 4.1, True, _E),
    RootCause.NIC: CauseFacts("NIC", "Host", 7, 1.7, True, _E),
    RootCause.NCCL_WATCHDOG_TIMEOUT: CauseFacts("NCCL Watchdog Timeouts", "Unknown", 7, 1.7, False, _R),
    RootCause.SILENT_DATA_CORRUPTION: CauseFacts("Silent Data Corruption", "GPU", 6, 1.4, True, _E),
    RootCause.GPU_THERMAL_INTERFACE_SENSOR: CauseFacts("GPU Thermal Interface + Sensor", "GPU", 6, 1.4, True, _D),
    RootCause.SSD: CauseFacts("SSD", "Host", 3, 0.7, True, _E),
    RootCause.POWER_SUPPLY: CauseFacts("Power Supply", "Host", 3, 0.7, True, _E),
    RootCause.SERVER_CHASSIS: CauseFacts("Server Chassis", "Host", 2, 0.5, True, _E),
    RootCause.IO_EXPANSION_BOARD: CauseFacts("IO Expansion Board", "Host", 2, 0.5, True, _E),
    RootCause.DEPENDENCY: CauseFacts("Dependency", "Dependency", 2, 0.5, False, _S, pages=True),
    RootCause.CPU: CauseFacts("CPU", "Host", 2, 0.5, True, _E),
    RootCause.SYSTEM_MEMORY: CauseFacts("System Memory", "Host", 2, 0.5, True, _E),
    RootCause.UNKNOWN: CauseFacts("Unknown", "Unknown", 0, 0.0, False, _R),
}

# Table 5 counts 419 unexpected interruptions; 47 more were planned (466 in all).
TABLE5_UNEXPECTED = 419
TABLE5_PLANNED = 47

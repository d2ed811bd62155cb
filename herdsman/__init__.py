"""Herdsman's shared vocabulary: root causes, events, host states and configuration.

Standard library only. Everything else (trainer, agents, orchestrator) imports from here and nothing here
imports from them.
"""

__version__ = "0.1.0"


class HerdsmanError(Exception):
    """An error with a message meant for an operator: the CLI prints it as one line, without a traceback."""


# Names under which the Ray actors find each other.
RAY_NAMESPACE = "herdsman"
CONTROLLER_NAME = "herdsman-controller"


def controller_name(job: str) -> str:
    """The detached Ray actor that runs `job`'s controller (the agents report to it, the CLI finds it)."""
    return f"{CONTROLLER_NAME}-{job}"

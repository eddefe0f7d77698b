"""The orchestrator service: commands in, runs created and dispatched, run index kept."""

from .commands import CommandError, derive_run_id
from .orchestrator import Orchestrator

__all__ = ["CommandError", "Orchestrator", "derive_run_id"]

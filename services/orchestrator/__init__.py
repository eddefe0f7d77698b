"""The orchestrator service: commands in, runs created and dispatched, run index kept."""

from . import waiting as _waiting  # noqa: F401 - registers resume, cancel, events
from .orchestrator import CommandError, Orchestrator, derive_run_id

__all__ = ["CommandError", "Orchestrator", "derive_run_id"]

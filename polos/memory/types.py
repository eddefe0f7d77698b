"""The types of session memory and compaction (``from polos.memory.types import CompactionConfig``).

Two tiers: a rolling summary of the older turns (made by an LLM call) and the recent messages
kept verbatim. See docs/agents.md, "Sessions and memory"."""

from polos._private.agents.sessions import (
    CompactionConfig,
    CompactionResult,
    NormalizedCompactionConfig,
    SessionMemory,
)

__all__ = ["CompactionConfig", "CompactionResult", "NormalizedCompactionConfig", "SessionMemory"]

"""Session memory and compaction: an agent's conversation across runs, kept in JetStream.

``Agent(compaction=CompactionConfig(...))`` sets the budget; ``agent.with_input(text,
session_id=...)`` (or ``Agent.run(..., session_id=...)``) gives a turn its session. These
functions are the same store and the same compaction for your own code. See docs/agents.md,
"Sessions and memory"."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polos._private.agents.sessions import (
    COMPACTION_PROMPT,
    SUMMARY_ASSISTANT_ACK,
    SUMMARY_USER_PREFIX,
    build_summary_messages,
    compact,
    estimate_message_tokens,
    estimate_messages_tokens,
    estimate_tokens,
    format_messages_for_prompt,
    is_summary_pair,
    normalize_compaction,
    read_session,
    write_session,
)
from polos._private.agents.steps import DurableRunner, StepRunner
from polos._private.store import connect, disconnect
from polos.config import Settings
from polos.memory.types import (
    CompactionConfig,
    CompactionResult,
    NormalizedCompactionConfig,
    SessionMemory,
)

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from polos._private.agents.sessions import AgentLike
    from polos.workflow import WorkflowContext


async def _with_js(client: Any, settings: Settings | None, op: Any) -> Any:
    """Run ``op(js, prefix)`` on the client's connection, or on a connection of its own made
    from ``settings`` (default: the environment, as a worker or client process has it)."""
    if client is not None:
        js: JetStreamContext = client.js
        return await op(js, client.settings.prefix)
    s = settings or Settings()
    nc = await connect(s, name="polos-session-memory")
    try:
        return await op(nc.jetstream(timeout=s.request_timeout), s.prefix)
    finally:
        await disconnect(nc)


async def get_session_memory(
    session_id: str, *, client: Any = None, settings: Settings | None = None
) -> SessionMemory:
    """A session's summary and recent messages (stored form: ``{"role", "content"}``,
    ``{"type": "function_call", ...}``, ``{"type": "function_call_output", ...}``).

    ``client``: a ``PolosClient`` (its connection); without one, a connection is made from
    ``settings`` or the environment. An unknown session is empty."""
    result: SessionMemory = await _with_js(
        client, settings, lambda js, prefix: read_session(js, prefix, session_id)
    )
    return result


async def put_session_memory(
    session_id: str,
    summary: str | None,
    messages: list[dict[str, Any]],
    *,
    client: Any = None,
    settings: Settings | None = None,
) -> None:
    """Replace a session's summary and messages (chat or stored form), by compare-and-set.
    Written by the worker (or service) role; the client role may only read sessions."""
    await _with_js(
        client,
        settings,
        lambda js, prefix: write_session(js, prefix, session_id, summary, messages),
    )


async def compact_if_needed(
    messages: list[dict[str, Any]],
    current_summary: str | None,
    config: CompactionConfig | NormalizedCompactionConfig | None,
    ctx: WorkflowContext | None,
    agent_config: AgentLike,
    step_key_prefix: str = "compaction",
) -> CompactionResult:
    """Fold the messages before the recent ones into the summary when they pass
    ``config.max_conversation_tokens``; the result's messages are the summary pair plus the
    recent messages (kept from a user message on, so no tool call loses its output).

    ``agent_config`` is the ``Agent`` whose provider and model write the summary. Inside a
    workflow give ``ctx``: the LLM calls are the durable steps ``step_key_prefix`` and
    ``step_key_prefix/resummarize`` of the run (a replay makes no call again); with ``ctx=None``
    they are plain calls. A failed call keeps the messages as they are."""
    runner = DurableRunner(ctx._x) if ctx is not None else StepRunner()
    result, _ = await compact(
        runner,
        agent_config,
        list(messages),
        current_summary,
        normalize_compaction(config),
        step_key_prefix,
    )
    return result


__all__ = [
    "COMPACTION_PROMPT",
    "SUMMARY_ASSISTANT_ACK",
    "SUMMARY_USER_PREFIX",
    "CompactionConfig",
    "CompactionResult",
    "NormalizedCompactionConfig",
    "SessionMemory",
    "build_summary_messages",
    "compact_if_needed",
    "estimate_message_tokens",
    "estimate_messages_tokens",
    "estimate_tokens",
    "format_messages_for_prompt",
    "get_session_memory",
    "is_summary_pair",
    "put_session_memory",
]

"""Sessions: an agent's conversation history across runs, kept in JetStream, and compaction.

A ``session_id`` (``agent.with_input(..., session_id=)``, ``Agent.run(..., session_id=)``, or
the run's own session) gives an agent the messages of the session's earlier turns. The seam
with the agent loop is two calls, both durable steps of the agent run:

* ``open_session(runner, key, agent, session_id)`` before the loop: the step
  ``<key>/session/load`` reads the session (its output is what the turn saw, so a replay sees
  the same history even if the session moved on since); when the history passes the token
  budget of ``agent.compaction``, the steps ``<key>/session/compact`` (an LLM call folding old
  turns into the summary) and ``<key>/session/compact/resummarize`` (when the summary itself is
  too long) follow. ``session.history`` is what the loop puts before the new input.
* ``session.record(conversation)`` after the final answer: the step ``<key>/session/record``
  appends the turn's messages to the session (and the new summary, if this turn compacted).

Storage: KV bucket ``<prefix>_sessions``, one key per session, the value a JSON document
``{"session_id", "summary", "folded", "generation", "messages", "turns", "recent",
"updated_at"}``. ``messages`` are in the provider-independent form of the original Polos
(``{"role": "user"|"assistant", "content"}``, ``{"type": "function_call", "name", "call_id",
"arguments"}``, ``{"type": "function_call_output", "call_id", "output"}``); ``folded`` counts
the messages the summary covers (the position of ``messages[0]`` in the whole conversation).
Every write is a compare-and-set on the key's revision, so two turns of one session running at
once both land, one after the other, whatever order they finish in. ``recent`` holds the ids of
the last turns written: a record repeated after a crash between the write and its step finds
its own id and writes nothing.

A document too large for one message is kept in the payloads object store, the KV value then
being ``{"$ref": <object>}`` (the swap of the reference is the compare-and-set).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import nats.errors
import nats.js.errors
import orjson
from pydantic import BaseModel, Field

from polos._private.agents.decisions import decision_record
from polos._private.agents.pricing import cost_usd
from polos._private.agents.provider import (
    AgentConfigError,
    ProviderConfig,
    ProviderError,
    call_llm,
    estimate_request_tokens,
)
from polos._private.agents.steps import StepDone, StepError, StepRunner
from polos._private.limits import TokenLimiter, reserve_for_step
from polos._private.store import Names, connection_of, payloads
from polos._private.store.topology import missing
from polos.errors import StepFailedError

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

log = logging.getLogger("polos.agent.sessions")

# --------------------------------------------------------------------------- types


class SessionMemory(BaseModel):
    """A session's memory: the rolling summary of its older turns and its recent messages."""

    summary: str | None = None
    messages: list[dict[str, Any]] = Field(default_factory=list)


class CompactionConfig(BaseModel):
    """When and how a session's history is compacted (``Agent(compaction=...)``).

    ``None`` takes the default: 80000, 20000, 2, True."""

    max_conversation_tokens: int | None = None
    max_summary_tokens: int | None = None
    min_recent_messages: int | None = None
    enabled: bool | None = None


class NormalizedCompactionConfig(BaseModel):
    """``CompactionConfig`` with every default filled in."""

    max_conversation_tokens: int
    max_summary_tokens: int
    min_recent_messages: int
    enabled: bool


class CompactionResult(BaseModel):
    """What ``compact_if_needed`` did: the messages to use from now on, and the summary."""

    compacted: bool
    messages: list[dict[str, Any]]
    summary: str | None
    summary_tokens: int
    total_turns: int


def normalize_compaction(
    config: CompactionConfig | NormalizedCompactionConfig | None,
) -> NormalizedCompactionConfig:
    """Defaults filled in; a budget below 1 (or negative recent count) is a clear error."""
    if isinstance(config, NormalizedCompactionConfig):
        return config
    c = config or CompactionConfig()
    out = NormalizedCompactionConfig(
        max_conversation_tokens=80000
        if c.max_conversation_tokens is None
        else c.max_conversation_tokens,
        max_summary_tokens=20000 if c.max_summary_tokens is None else c.max_summary_tokens,
        min_recent_messages=2 if c.min_recent_messages is None else c.min_recent_messages,
        enabled=True if c.enabled is None else c.enabled,
    )
    if out.max_conversation_tokens < 1 or out.max_summary_tokens < 1:
        raise ValueError(
            "CompactionConfig: max_conversation_tokens and max_summary_tokens must be at least 1, "
            f"got {out.max_conversation_tokens} and {out.max_summary_tokens}"
        )
    if out.min_recent_messages < 0:
        raise ValueError(
            f"CompactionConfig: min_recent_messages must be 0 or more, got {out.min_recent_messages}"
        )
    return out


# --------------------------------------------------------------------------- the summary pair

COMPACTION_PROMPT = (
    "You are summarizing a conversation between a user and an AI assistant.\n"
    "\n"
    "Your goal: someone reading only this summary should be able to continue "
    "the conversation without the user having to repeat themselves.\n"
    "\n"
    "Capture:\n"
    "- What the user is trying to accomplish (their goal, problem, or question)\n"
    "- Key facts, context, or constraints the user shared "
    "(personal details, preferences, requirements, deadlines)\n"
    "- Decisions made or conclusions reached\n"
    "- Recommendations given and whether the user accepted, rejected, "
    "or is still considering them\n"
    "- Any specific artifacts produced (code, files, plans, drafts, lists "
    "\u2014 include names and key details)\n"
    "- Open threads \u2014 anything unresolved, in progress, or that the user "
    "said they'd come back to\n"
    "- The current state of the conversation (where things left off)\n"
    "\n"
    "Existing summary (if any):\n"
    "{existing_summary}\n"
    "\n"
    "New messages to fold into the summary:\n"
    "{messages_to_fold}\n"
    "\n"
    "Write a concise summary in short paragraphs grouped by topic. "
    "Not bullet points \u2014 narrative that flows.\n"
    "Be factual and specific. No pleasantries, no meta-commentary, "
    'no "the user and assistant discussed..."\n'
    "Write as if taking notes for a colleague who needs to pick up "
    "this conversation."
)
SUMMARY_USER_PREFIX = "[Prior conversation summary]\n"
SUMMARY_ASSISTANT_ACK = "Understood, I have context from our earlier conversation."
RESUMMARIZE_NOTE = "The following is a summary that needs to be shortened:\n\n"


def build_summary_messages(summary: str) -> list[dict[str, Any]]:
    """The user/assistant pair that carries a summary at the start of a conversation."""
    return [
        {"role": "user", "content": SUMMARY_USER_PREFIX + summary},
        {"role": "assistant", "content": SUMMARY_ASSISTANT_ACK},
    ]


def is_summary_pair(messages: list[dict[str, Any]], index: int) -> bool:
    """Whether ``messages[index]`` and ``messages[index + 1]`` are a summary pair."""
    if index < 0 or index + 1 >= len(messages):
        return False
    user, ack = messages[index], messages[index + 1]
    if not isinstance(user, dict) or not isinstance(ack, dict):
        return False
    if user.get("role") != "user" or ack.get("role") != "assistant":
        return False
    u, a = user.get("content", ""), ack.get("content", "")
    return (
        isinstance(u, str)
        and isinstance(a, str)
        and u.startswith(SUMMARY_USER_PREFIX)
        and a == SUMMARY_ASSISTANT_ACK
    )


# --------------------------------------------------------------------------- tokens


def estimate_tokens(text: str) -> int:
    """About four characters a token."""
    return math.ceil(len(text) / 4)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def estimate_message_tokens(message: dict[str, Any]) -> int:
    """A message's tokens: its content, and also what tool calls and tool outputs carry (the
    original counted ``content`` only, so a tool-heavy history looked empty)."""
    parts = [_text(message.get("content"))]
    if message.get("tool_calls"):
        parts.append(_text(message["tool_calls"]))
    if message.get("type") == "function_call":
        parts.append(_text(message.get("name")) + _text(message.get("arguments")))
    if message.get("type") == "function_call_output":
        parts.append(_text(message.get("output")))
    return estimate_tokens("".join(parts))


def estimate_messages_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(estimate_message_tokens(m) for m in messages)


# --------------------------------------------------------------------------- message forms


def to_stored(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat-completions messages (the loop's) in the stored, provider-independent form."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "tool":
            out.append(
                {
                    "type": "function_call_output",
                    "call_id": m.get("tool_call_id"),
                    "output": _text(m.get("content")),
                }
            )
        elif role == "assistant":
            content = m.get("content")
            calls = m.get("tool_calls") or []
            if content or not calls:
                out.append({"role": "assistant", "content": content or ""})
            for c in calls:
                fn = c.get("function") or {}
                out.append(
                    {
                        "type": "function_call",
                        "name": fn.get("name", c.get("name")),
                        "call_id": c.get("id"),
                        "arguments": _text(fn.get("arguments", c.get("arguments"))) or "{}",
                    }
                )
        elif role in ("user", "system", "developer"):
            out.append({"role": role, "content": m.get("content")})
        elif m.get("type") in ("function_call", "function_call_output"):
            out.append(dict(m))  # already stored form
        else:
            raise ValueError(f"a session cannot keep this message (no known role): {m!r:.200}")
    return out


def to_chat(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored messages as chat-completions messages: a run of ``function_call`` items becomes
    the ``tool_calls`` of one assistant message (joined to the assistant text just before it),
    each output a ``{"role": "tool"}`` message."""
    out: list[dict[str, Any]] = []
    for m in messages:
        kind = m.get("type")
        if kind == "function_call":
            call = {
                "id": m.get("call_id"),
                "type": "function",
                "function": {"name": m.get("name"), "arguments": _text(m.get("arguments")) or "{}"},
            }
            last = out[-1] if out else None
            if last is not None and last.get("role") == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if last.get("content") == "":
                    last["content"] = None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": m.get("call_id"),
                    "content": _text(m.get("output")),
                }
            )
        else:
            out.append({"role": m.get("role"), "content": m.get("content")})
    return out


def answered_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Without the tool calls that have no output (a turn stopped by ``max_tokens`` before its
    tools ran): a provider refuses a history with a call left unanswered."""
    answered = {m.get("call_id") for m in messages if m.get("type") == "function_call_output"}
    return [m for m in messages if m.get("type") != "function_call" or m.get("call_id") in answered]


# --------------------------------------------------------------------------- compaction


def _line(m: dict[str, Any]) -> str:
    if m.get("type") == "function_call":
        return f"assistant called {m.get('name')}({_text(m.get('arguments'))})"
    if m.get("type") == "function_call_output" or m.get("role") == "tool":
        return f"tool: {_text(m.get('output', m.get('content')))}"
    text = f"{m.get('role', 'unknown')}: {_text(m.get('content'))}"
    for c in m.get("tool_calls") or []:
        fn = c.get("function") or {}
        text += f"\nassistant called {fn.get('name')}({_text(fn.get('arguments'))})"
    return text


def format_messages_for_prompt(messages: list[dict[str, Any]]) -> str:
    """``role: content`` paragraphs, for the compaction prompt."""
    return "\n\n".join(_line(m) for m in messages)


def fold_point(messages: list[dict[str, Any]], start: int, min_recent: int) -> int:
    """Where the kept messages begin: at least ``min_recent`` of them, starting at a user
    message, so a tool call is never cut off from its output. ``start`` when nothing folds."""
    cut = len(messages) - min_recent
    if cut >= len(messages):
        return max(len(messages), start)  # keep none: the new input starts the next turn
    while cut > start and not (
        messages[cut].get("role") == "user" and not is_summary_pair(messages, cut)
    ):
        cut -= 1
    return max(cut, start)


class AgentLike(Protocol):
    """What compaction needs of an agent: its provider configuration and names."""

    name: str
    model: str
    provider: str
    config: ProviderConfig


async def _summary_call(runner: StepRunner, agent: AgentLike, key: str, prompt: str) -> str:
    """One LLM call, as the durable step ``key``: no tools, no output schema, the agent's
    provider and model; its usage and cost are in the step like any LLM call's."""
    request: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}

    async def call(step_id: str) -> StepDone:
        headers = {"X-Polos-Step": f"{runner.run_id}:{step_id}"}
        exe = runner.execution
        try:
            if exe is None:
                outcome = await call_llm(agent.config, request, headers=headers)
            else:
                limiter = TokenLimiter.shared(exe.nc, exe.js, exe.names, exe.settings)

                async def blocked(seconds: float) -> None:
                    await limiter.backoff(
                        model=agent.model, provider=agent.provider, retry_after=seconds
                    )

                reservation = await reserve_for_step(
                    exe,
                    step_id,
                    limiter,
                    model=agent.model,
                    provider=agent.provider,
                    tokens=estimate_request_tokens(request),
                )
                async with reservation:
                    outcome = await call_llm(
                        agent.config, request, headers=headers, on_rate_limited=blocked
                    )
                    reservation.settle(outcome.usage.get("total_tokens", 0))
        except ProviderError as exc:
            raise StepError(
                exc.error_type, exc.message, {"status": exc.status, "agent": agent.name}
            ) from exc
        meta = {
            "agent": agent.name,
            "provider": agent.provider,
            "model": agent.model,
            "base_url": agent.config.effective_base_url,
            "messages": request["messages"],
            "tools_offered": [],
            "usage": outcome.usage,
            "latency_ms": outcome.latency_ms,
            "finish_reason": outcome.finish_reason,
            "cost_usd": cost_usd(agent.model, outcome.usage),
            "choice": decision_record(outcome.message, []),
            "purpose": "compaction",
        }
        return StepDone(outcome.message, meta, attempts=outcome.attempts)

    rec = await runner.step(key, "llm", agent.model, call)
    return str((rec.output or {}).get("content") or "")


async def compact(
    runner: StepRunner,
    agent: AgentLike,
    messages: list[dict[str, Any]],
    summary: str | None,
    config: NormalizedCompactionConfig,
    key: str,
    *,
    extra_tokens: int = 0,
) -> tuple[CompactionResult, int]:
    """Fold the messages before the recent ones into the summary when ``messages`` (plus
    ``extra_tokens``) pass the budget. Returns the result and how many of ``messages`` were
    folded (a leading summary pair included). The LLM calls are the steps ``key`` and
    ``key/resummarize``; a failed call keeps every message (nothing is ever dropped unsummarised)
    and is recorded, so a replay takes the same path."""
    start = 2 if is_summary_pair(messages, 0) else 0
    if summary is None and start == 2:
        summary = str(messages[0]["content"])[len(SUMMARY_USER_PREFIX) :]
    pair = build_summary_messages(summary) if summary and start == 0 else []
    unchanged = CompactionResult(
        compacted=False,
        messages=messages,
        summary=summary,
        summary_tokens=estimate_tokens(summary) if summary else 0,
        total_turns=len(messages),
    )
    total = estimate_messages_tokens(pair + messages) + extra_tokens
    if not config.enabled or total <= config.max_conversation_tokens:
        return unchanged, 0
    cut = fold_point(messages, start, config.min_recent_messages)
    if cut <= start:
        return unchanged, 0
    prompt = COMPACTION_PROMPT.replace("{existing_summary}", summary or "(none)").replace(
        "{messages_to_fold}", format_messages_for_prompt(messages[start:cut])
    )
    try:
        new = await _summary_call(runner, agent, key, prompt)
        if estimate_tokens(new) > config.max_summary_tokens:
            again = COMPACTION_PROMPT.replace("{existing_summary}", "(none)").replace(
                "{messages_to_fold}", RESUMMARIZE_NOTE + new
            )
            new = await _summary_call(runner, agent, f"{key}/resummarize", again)
    except StepFailedError as exc:
        log.warning("agent %s: compaction failed, the history is kept whole: %s", agent.name, exc)
        return unchanged, 0
    return (
        CompactionResult(
            compacted=True,
            messages=build_summary_messages(new) + messages[cut:],
            summary=new,
            summary_tokens=estimate_tokens(new),
            total_turns=len(messages),
        ),
        cut,
    )


# --------------------------------------------------------------------------- the store

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-=]{0,127}$")
RECENT_TURNS = 64  # turn ids kept per session to recognise a repeated record


def session_key(session_id: str) -> str:
    """The KV key of a session: the id itself when it is a key token, else ``=`` + its
    SHA-256 (so any string is a session id, and two ids never share a key)."""
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"a session id is a non-empty string, got {session_id!r}")
    if _TOKEN_RE.match(session_id):
        return session_id
    return "=" + hashlib.sha256(session_id.encode()).hexdigest()


class SessionConflictError(RuntimeError):
    """Too many concurrent writers of one session in a row: the write gave up."""


@dataclass
class SessionDoc:
    session_id: str
    summary: str | None = None
    folded: int = 0
    generation: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    turns: int = 0
    recent: list[str] = field(default_factory=list)
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "summary": self.summary,
            "folded": self.folded,
            "generation": self.generation,
            "messages": self.messages,
            "turns": self.turns,
            "recent": self.recent,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, session_id: str, data: dict[str, Any]) -> SessionDoc:
        return cls(
            session_id=str(data.get("session_id") or session_id),
            summary=data.get("summary"),
            folded=int(data.get("folded") or 0),
            generation=int(data.get("generation") or 0),
            messages=list(data.get("messages") or []),
            turns=int(data.get("turns") or 0),
            recent=[str(t) for t in data.get("recent") or []],
            updated_at=float(data.get("updated_at") or 0.0),
        )


class SessionStore:
    """The sessions bucket of a namespace: read a session, change it by compare-and-set."""

    def __init__(self, js: JetStreamContext, prefix: str, *, max_tries: int = 200) -> None:
        self.js = js
        self.names = Names(prefix)
        self.max_tries = max_tries
        self._kv: KeyValue | None = None
        self.conflicts = 0  # compare-and-set retries (a figure for tests)

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(self.names.sessions_bucket)
            except nats.js.errors.BucketNotFoundError:
                raise missing(self.names, "sessions_bucket") from None
        return self._kv

    async def read(self, session_id: str) -> tuple[SessionDoc, int]:
        """The session and its revision (an empty session, revision 0, when there is none)."""
        kv = await self._bucket()
        try:
            entry = await kv.get(session_key(session_id))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return SessionDoc(session_id), 0
        rev = entry.revision or 0
        if not entry.value:
            return SessionDoc(session_id), rev
        data = orjson.loads(entry.value)
        if isinstance(data, dict) and "$ref" in data:
            data = await payloads.get_value(self.js, self.names, str(data["$ref"]))
        return SessionDoc.from_json(session_id, data), rev

    async def _encode(self, doc: SessionDoc) -> bytes:
        data = orjson.dumps(doc.to_json())
        limit = payloads.inline_limit(connection_of(self.js))
        if len(data) <= limit:
            return data
        name = await payloads.put_value(
            self.js, self.names, f"session:{session_key(doc.session_id)}", data
        )
        return orjson.dumps({"$ref": name})

    async def change(
        self, session_id: str, fn: Callable[[SessionDoc], SessionDoc | None]
    ) -> tuple[SessionDoc, int, bool]:
        """Apply ``fn(doc) -> doc | None`` by compare-and-set (``None``: nothing to write).
        Returns the document, its revision and whether this call wrote it."""
        kv = await self._bucket()
        key = session_key(session_id)
        for attempt in range(self.max_tries):
            doc, rev = await self.read(session_id)
            new = fn(doc)
            if new is None:
                return doc, rev, False
            new.updated_at = time.time()
            data = await self._encode(new)
            try:
                if rev == 0:
                    rev = await kv.create(key, data)
                else:
                    rev = await kv.update(key, data, last=rev)
                return new, rev, True
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
                self.conflicts += 1
                await asyncio.sleep(min(0.05, 0.001 * attempt))
        raise SessionConflictError(
            f"session {session_id!r}: gave up after {self.max_tries} conflicting writes"
        )

    async def replace(
        self, session_id: str, summary: str | None, messages: list[dict[str, Any]]
    ) -> int:
        """Set a session's summary and messages (a new generation: a turn in flight then adds
        its messages to these, without the compaction it made of the old ones)."""
        stored = to_stored(messages)

        def put(doc: SessionDoc) -> SessionDoc:
            return SessionDoc(
                session_id,
                summary=summary,
                folded=0,
                generation=doc.generation + 1,
                messages=stored,
                turns=doc.turns,
                recent=doc.recent,
            )

        _, rev, _ = await self.change(session_id, put)
        return rev


# --------------------------------------------------------------------------- the seam


def session_of(runner: StepRunner, session_id: str | None) -> str | None:
    """The turn's session: the one it was given, else the run's own (when runs carry one)."""
    if session_id:
        return session_id
    exe = runner.execution
    requested = exe.state.requested if exe is not None else None
    run_session = getattr(requested, "session_id", None)
    return str(run_session) if run_session else None


@dataclass
class Session:
    """One turn's view of its session: ``history`` goes before the new input; ``record``
    appends the turn. ``NO_SESSION`` (``session_id`` None) does nothing."""

    runner: StepRunner | None = None
    key: str = ""
    session_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    generation: int = 0
    # The summary this turn made and the position in the whole conversation it reaches
    # (None: this turn did not compact).
    compacted: tuple[str, int] | None = None
    revision: int = 0

    async def record(self, conversation: list[dict[str, Any]]) -> None:
        """Append the turn: ``conversation`` is the loop's (history, input, answers; leading
        system messages are skipped). A durable step; repeated, it writes nothing twice."""
        if self.session_id is None or self.runner is None:
            return
        runner, session_id = self.runner, self.session_id
        convo = list(conversation)
        while convo and convo[0].get("role") == "system":
            convo.pop(0)
        turn = answered_calls(to_stored(convo[len(self.history) :]))
        turn_id = f"{runner.run_id}:{self.key}"
        compacted, generation = self.compacted, self.generation

        def add(doc: SessionDoc) -> SessionDoc | None:
            if turn_id in doc.recent:
                return None  # written before a crash: the step is being repeated
            summary, folded, messages = doc.summary, doc.folded, doc.messages
            if compacted is not None and doc.generation == generation:
                new_summary, reach = compacted
                # Ours covers more than the stored one (another turn may have compacted
                # meanwhile, less far): keep the stored messages past what ours covers.
                if doc.folded < reach <= doc.folded + len(doc.messages):
                    summary, folded = new_summary, reach
                    messages = doc.messages[reach - doc.folded :]
            return SessionDoc(
                doc.session_id,
                summary=summary,
                folded=folded,
                generation=doc.generation,
                messages=[*messages, *turn],
                turns=doc.turns + 1,
                recent=[*doc.recent, turn_id][-RECENT_TURNS:],
            )

        async def write(step_id: str) -> StepDone:
            doc, rev, wrote = await _store(runner).change(session_id, add)
            return StepDone(
                {"revision": rev, "turns": doc.turns, "messages": len(turn), "written": wrote},
                {"session_id": session_id},
            )

        await runner.step(f"{self.key}/session/record", "run", "polos.session.record", write)


NO_SESSION = Session()


def _store(runner: StepRunner) -> SessionStore:
    if runner.js is None or runner.prefix is None:
        raise AgentConfigError(
            "a session_id needs a NATS connection to keep the conversation: run the agent in "
            "a workflow, or give agent.run(..., settings=Settings(...))"
        )
    return SessionStore(runner.js, runner.prefix)


async def open_session(
    runner: StepRunner,
    key: str,
    agent: AgentLike,
    session_id: str | None,
    new_input: list[dict[str, Any]] | None = None,
) -> Session:
    """Load the session's history for this turn (the step ``<key>/session/load``) and compact
    it when it passes the budget of ``agent.compaction`` (counting ``new_input`` too)."""
    if session_id is None:
        return NO_SESSION
    session_key(session_id)  # a bad id fails here, before anything is recorded
    store = _store(runner)

    async def load(step_id: str) -> StepDone:
        doc, rev = await store.read(session_id)
        return StepDone(
            {
                "summary": doc.summary,
                "folded": doc.folded,
                "generation": doc.generation,
                "messages": doc.messages,
                "turns": doc.turns,
                "revision": rev,
            },
            {"session_id": session_id},
        )

    rec = await runner.step(f"{key}/session/load", "run", "polos.session.load", load)
    loaded = dict(rec.output or {})
    summary: str | None = loaded.get("summary")
    folded = int(loaded.get("folded") or 0)
    messages: list[dict[str, Any]] = list(loaded.get("messages") or [])
    config = normalize_compaction(getattr(agent, "compaction", None))
    result, cut = await compact(
        runner,
        agent,
        messages,
        summary,
        config,
        f"{key}/session/compact",
        extra_tokens=estimate_messages_tokens(new_input or []),
    )
    compacted = None
    if result.compacted:
        summary, messages = result.summary, messages[cut:]
        compacted = (str(summary), folded + cut)
    history = (build_summary_messages(summary) if summary else []) + to_chat(messages)
    return Session(
        runner,
        key,
        session_id,
        history,
        int(loaded.get("generation") or 0),
        compacted,
        int(loaded.get("revision") or 0),
    )


# --------------------------------------------------------------------------- public functions


async def read_session(js: JetStreamContext, prefix: str, session_id: str) -> SessionMemory:
    doc, _ = await SessionStore(js, prefix).read(session_id)
    return SessionMemory(summary=doc.summary, messages=doc.messages)


async def write_session(
    js: JetStreamContext,
    prefix: str,
    session_id: str,
    summary: str | None,
    messages: list[dict[str, Any]],
) -> None:
    try:
        await SessionStore(js, prefix).replace(session_id, summary, messages)
    except (nats.errors.TimeoutError, TimeoutError) as exc:
        raise TimeoutError(
            f"no answer writing session {session_id!r}: the server is busy, or this user may "
            "not write sessions (only the worker and service roles may)"
        ) from exc


__all__ = [
    "COMPACTION_PROMPT",
    "NO_SESSION",
    "SUMMARY_ASSISTANT_ACK",
    "SUMMARY_USER_PREFIX",
    "CompactionConfig",
    "CompactionResult",
    "NormalizedCompactionConfig",
    "Session",
    "SessionConflictError",
    "SessionMemory",
    "SessionStore",
    "build_summary_messages",
    "compact",
    "estimate_message_tokens",
    "estimate_messages_tokens",
    "estimate_tokens",
    "format_messages_for_prompt",
    "is_summary_pair",
    "normalize_compaction",
    "open_session",
    "read_session",
    "session_key",
    "session_of",
    "to_chat",
    "to_stored",
    "write_session",
]

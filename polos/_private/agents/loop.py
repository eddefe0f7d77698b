"""The agent loop: ``Agent``, its durable run (``agent_workflow``) and the loop's turns.

Durable LLM agents: tools, structured output, handoffs, guardrails, stop conditions, memory.

::

    agent = Agent(id="order_validator", provider="openai", model="gpt-4o",
                  system_prompt="You validate orders.", tools=[check_inventory, calculate_shipping],
                  output_schema=OrderValidation, stop_conditions=[max_steps(MaxStepsConfig(count=10))])

    @workflow
    async def process_order(ctx: WorkflowContext, order: Order) -> str:
        v = await ctx.step.agent_invoke_and_wait("validate_order", agent.with_input(f"Validate {order}"))
        return "ok" if v.result.valid else v.result.reason

Inside a run every LLM call is one ``StepCompleted(kind="llm")`` and every tool call one
``StepCompleted(kind="tool")`` in the run's history; a replay (after a crash, on another
worker) returns the recorded calls, so no token is paid for twice and no completed tool runs
twice. ``agent.run(polos, input)`` / ``agent.stream(polos, input)`` start the agent as a
durable run of its own; ``agent.run(input)`` runs the same loop in plain code, without
durability. Hooks, ``guardrails`` and custom stop conditions are durable steps too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson
import pydantic

from polos._private.agents.decisions import decision_record
from polos._private.agents.memory import SharedMemory
from polos._private.agents.pricing import cost_usd
from polos._private.agents.provider import (
    AgentConfigError,
    LLMOutcome,
    LLMRetry,
    ProviderConfig,
    ProviderError,
    call_llm,
    estimate_request_tokens,
)
from polos._private.agents.sessions import (
    NO_SESSION,
    CompactionConfig,
    Session,
    normalize_compaction,
    open_session,
    session_key,
    session_of,
)
from polos._private.agents.steps import DurableRunner, Recorded, StepDone, StepError, StepRunner
from polos._private.agents.stream import AgentStream
from polos._private.agents.tools import Tool, ToolScope, as_tool
from polos._private.limits import TokenLimiter, reserve_for_step
from polos._private.model.values import Queue
from polos._private.run import waits
from polos._private.run.definitions import workflow
from polos._private.run.hooks import run_hooks
from polos._private.store import Names, connect, disconnect
from polos.agents.stop_conditions import StopCondition, StopConditionContext, as_stop_condition
from polos.converter import from_json, json_schema, to_json
from polos.errors import PolosError, StepExecutionError, StepFailedError
from polos.middleware.guardrail import GuardrailContext, GuardrailResult, check_guardrails
from polos.middleware.hook import HookAction, HookContext, HookFunction, HookResult, check_hooks
from polos.types import (
    AgentConfig,
    AgentResult,
    AgentStep,
    Step,
    ToolCall,
    ToolCallFunction,
    ToolResult,
    Usage,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from polos._private.run.execution import RunExecution
    from polos.config import Settings
    from polos.workflow import WorkflowContext

T = TypeVar("T")
log = logging.getLogger("polos.agent")

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,48}$")


class AgentError(PolosError):
    """An agent run could not produce a result."""


class AgentOutputError(AgentError):
    """The model's final answer did not match ``output_type``, even after the corrective retry."""


class GuardrailViolation(Exception):
    """Raise from a guardrail to reject an input, a tool call or an output, with the reason."""


class AgentGuardrailError(AgentError):
    """A guardrail rejected the input, or rejected the output more often than allowed."""


@dataclass(frozen=True)
class AgentRun:
    """An agent with its input, ready for ``ctx.step.agent_invoke_and_wait(key, run)``."""

    agent: Agent[Any]
    input: str | list[dict[str, Any]]
    session: str | None = None  # ours: the scope of shared working memory (memory.py)
    user_id: str | None = None
    streaming: bool = False  # stream text deltas even if the agent does not (agent.stream())
    provider_kwargs: dict[str, Any] = field(default_factory=dict)
    # The original's: the conversation this turn belongs to (sessions.py); also the memory
    # scope when ``session`` is not given.
    session_id: str | None = None

    @property
    def memory_scope(self) -> str | None:
        return self.session or (session_key(self.session_id) if self.session_id else None)


Guardrail = Callable[..., Any]

_AGENTS: dict[str, Agent[Any]] = {}
_AMBIGUOUS: set[str] = set()


def get_agent(name: str) -> Agent[Any]:
    """The agent defined in this process under ``name``; an error if none or several are."""
    if name in _AMBIGUOUS:
        raise AgentConfigError(
            f"several agents are named {name!r} in this process: give each Agent its own name "
            "(a child run finds its agent by name)"
        )
    try:
        return _AGENTS[name]
    except KeyError:
        raise AgentConfigError(
            f"no agent named {name!r} is defined in this process: the worker serving "
            "polos_agent must import the module that defines it"
        ) from None


class Agent(Generic[T]):
    """An LLM with instructions and tools, run as a durable loop.

    The original Polos SDK's options are accepted under their names: ``id`` (ours ``name``),
    ``system_prompt`` (``instructions``), ``output_schema`` (``output_type``),
    ``provider_base_url`` (``base_url``), ``max_output_tokens``, ``stop_conditions``,
    ``guardrails`` / ``guardrail_max_retries``, the hooks ``on_start``, ``on_end``,
    ``on_agent_step_start``, ``on_agent_step_end``, ``on_tool_start``, ``on_tool_end``,
    ``stream_to_workflow`` (``stream``), ``queue`` and ``compaction``. docs/agents.md lists
    every option.

    ``provider="openai"`` covers any OpenAI-compatible server through ``base_url`` (vLLM,
    Ollama, LiteLLM, a gateway); ``api_key`` defaults to ``OPENAI_API_KEY``.

    Stop conditions: ``stop_conditions=[max_steps(MaxStepsConfig(count=10)), ...]`` (see
    ``polos.agents.stop_conditions``), and ours: ``max_steps`` LLM calls (20 unless a
    ``max_steps`` condition is given), ``max_tokens`` total tokens over the run,
    ``stop_on_tools`` (stop right after one of these tools ran; its output is the result).

    ``guardrails`` are the original's: ``(ctx, GuardrailContext) -> GuardrailResult`` or a
    string judged by an LLM, run on every LLM answer (``polos.middleware.guardrail``). Ours
    stay beside them, plain (sync or async) functions run in the loop, so they must be
    deterministic: ``input_guardrails`` get the input text and return a rewrite or None;
    ``tool_guardrails`` get ``(tool_name, arguments)`` and return rewritten arguments or None;
    ``output_guardrails`` get the final output and return a rewrite or None. Any of them may
    raise ``GuardrailViolation(reason)``: a rejected input fails the agent, a rejected tool call
    goes back to the model as the tool's error, a rejected output goes back to the model for
    another try, at most ``guardrail_retries`` times.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        id: str | None = None,
        provider: str = "openai",
        model: str = "gpt-4o",
        instructions: str | None = None,
        system_prompt: str | None = None,
        description: str | None = None,
        tools: Sequence[Tool | Callable[..., Any]] = (),
        output_type: type[T] | None = None,
        output_schema: type[T] | None = None,
        temperature: float | None = None,
        max_output_tokens: int | None = None,
        model_settings: dict[str, Any] | None = None,
        max_steps: int | None = None,
        max_tokens: int | None = None,
        stop_on_tools: Sequence[str] = (),
        stop_conditions: Sequence[Callable[..., Any]] | None = None,
        handoffs: Sequence[Agent[Any]] = (),
        guardrails: Any = None,
        guardrail_max_retries: int = 2,
        input_guardrails: Sequence[Guardrail] = (),
        tool_guardrails: Sequence[Guardrail] = (),
        output_guardrails: Sequence[Guardrail] = (),
        guardrail_retries: int = 1,
        output_retries: int = 1,
        on_start: Any = None,
        on_end: Any = None,
        on_agent_step_start: Any = None,
        on_agent_step_end: Any = None,
        on_tool_start: Any = None,
        on_tool_end: Any = None,
        compaction: Any = None,
        memory: bool = False,
        stream: bool = False,
        stream_to_workflow: bool = False,
        queue: str | Queue | dict[str, Any] | None = None,
        base_url: str | None = None,
        provider_base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retry: LLMRetry | None = None,
    ) -> None:
        name = _one_of("name", name, "id", id) or "agent"
        output_type = _one_of("output_type", output_type, "output_schema", output_schema)
        base_url = _one_of("base_url", base_url, "provider_base_url", provider_base_url)
        instructions = _one_of("instructions", instructions, "system_prompt", system_prompt)
        if not _NAME_RE.match(name):
            raise ValueError(f"agent name {name!r} must be 1-48 letters, digits, '_' or '-'")
        conditions = [
            as_stop_condition(c, f"Agent({name!r}, stop_conditions=...)")
            for c in (stop_conditions or [])
        ]
        if max_steps is None:
            # A max_steps condition replaces the default cap, as in the original SDK.
            max_steps = sys.maxsize if any(c.name == "max_steps" for c in conditions) else 20
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if guardrail_max_retries < 0:
            raise ValueError("guardrail_max_retries must be 0 or more")
        if compaction is not None and not isinstance(compaction, CompactionConfig):
            raise AgentConfigError(
                f"Agent({name!r}, compaction=...) takes a polos.memory.CompactionConfig, "
                f"got {type(compaction).__name__}"
            )
        normalize_compaction(compaction)  # a bad budget fails here, not in a run
        self.name = name
        self.provider = provider
        self.model = model
        self.instructions = instructions
        self.description = (
            description or (self.instructions or f"the {name} agent").split("\n")[0][:200]
        )
        self.tools = [as_tool(t) for t in tools]
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"agent {name!r} has two tools with one name: {names}")
        self.output_type = output_type
        self.temperature = temperature
        self.max_output_tokens = max_output_tokens
        self.model_settings = dict(model_settings or {})
        if max_output_tokens is not None:
            if max_output_tokens < 1:
                raise ValueError("max_output_tokens must be at least 1")
            self.model_settings["max_tokens"] = max_output_tokens
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.stop_on_tools = frozenset(stop_on_tools)
        self.stop_conditions = conditions
        self.handoffs = list(handoffs)
        self.guardrails = check_guardrails(guardrails, where=f"Agent({name!r}, guardrails=...)")
        self.guardrail_max_retries = guardrail_max_retries
        self.input_guardrails = list(input_guardrails)
        self.tool_guardrails = list(tool_guardrails)
        self.output_guardrails = list(output_guardrails)
        self.guardrail_retries = guardrail_retries
        self.output_retries = output_retries
        self.hooks: dict[str, list[HookFunction]] = {
            phase: check_hooks(value, where=f"Agent({name!r}, {phase}=...)")
            for phase, value in (
                ("on_start", on_start),
                ("on_end", on_end),
                ("on_agent_step_start", on_agent_step_start),
                ("on_agent_step_end", on_agent_step_end),
                ("on_tool_start", on_tool_start),
                ("on_tool_end", on_tool_end),
            )
        }
        self.compaction = compaction or CompactionConfig()
        self.memory = memory
        # ``stream=True`` (ours) is the original's ``stream_to_workflow=True``: every run of
        # this agent publishes its text deltas, not only those started by agent.stream().
        self.stream_to_workflow = stream or stream_to_workflow
        self.queue_name = _queue_name(queue, name)
        self.config = ProviderConfig(
            provider=provider,
            model=model,
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            retry=retry or LLMRetry(),
        )
        if name in _AGENTS and _AGENTS[name] is not self:
            _AMBIGUOUS.add(name)
        _AGENTS[name] = self

    @property
    def id(self) -> str:
        """The original SDK's name for ``name``."""
        return self.name

    @property
    def system_prompt(self) -> str | None:
        return self.instructions

    @property
    def output_schema(self) -> Any:
        return self.output_type

    @property
    def provider_base_url(self) -> str | None:
        return self.config.base_url

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, model={self.model!r}, tools={[t.name for t in self.tools]})"

    def agent_config(self) -> AgentConfig:
        """The agent's configuration as hooks and guardrails see it."""
        return AgentConfig(
            name=self.name,
            provider=self.provider,
            model=self.model,
            tools=[t.openai_schema() for t in self.tools],
            system_prompt=self.instructions,
            max_output_tokens=self.max_output_tokens,
            temperature=self.temperature,
            provider_base_url=self.config.base_url,
            output_schema=json_schema(self.output_type) if self.output_type else None,
            output_schema_name=getattr(self.output_type, "__name__", None),
            guardrail_max_retries=self.guardrail_max_retries,
        )

    def with_input(
        self,
        input: str | list[dict[str, Any]],
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        initial_state: Any = None,
        session: str | None = None,
        streaming: bool = False,
        **provider_kwargs: Any,
    ) -> AgentRun:
        """This agent with an input (text, or OpenAI-style messages), for
        ``ctx.step.agent_invoke_and_wait``. ``session_id`` names the conversation: the
        agent sees that session's earlier turns and this turn is added to it. ``session``
        (ours) names the shared working memory (``memory=True``); it defaults to the
        ``session_id``.
        ``provider_kwargs`` (e.g. ``top_p=0.5``) go into this run's LLM requests."""
        _refuse_initial_state(self, initial_state)
        return AgentRun(
            self,
            input,
            session,
            user_id=user_id,
            streaming=streaming,
            provider_kwargs=dict(provider_kwargs),
            session_id=session_id,
        )

    async def run(
        self,
        polos: Any = None,
        input: str | list[dict[str, Any]] | None = None,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        initial_state: Any = None,
        timeout: float | None = 600.0,
        session: str | None = None,
        settings: Settings | None = None,
        **provider_kwargs: Any,
    ) -> AgentResult[T]:
        """``agent.run(polos, input)``: a durable run of this agent (the ``polos_agent``
        workflow, served by any worker that imports the agent) and its result, as in the
        original SDK; ``polos`` is a ``PolosClient`` (or ``Polos``).

        ``agent.run(input)`` (ours): the loop in plain code in this process, not durable;
        ``settings`` gives NATS for shared memory and live streaming."""
        _refuse_initial_state(self, initial_state)
        if isinstance(polos, str | list):
            if input is not None:
                raise TypeError("agent.run(input) or agent.run(polos, input), not both inputs")
            plain = AgentRun(
                self,
                polos,
                session,
                user_id=user_id,
                provider_kwargs=dict(provider_kwargs),
                session_id=session_id,
            )
            return await _run_plain(plain, settings)
        if input is None:
            raise TypeError("agent.run(polos, input) needs the input (a str or a list of messages)")
        handle = await self._start(
            polos, input, session, session_id, user_id, provider_kwargs, False
        )
        output = await handle.result(timeout=timeout)
        return _result_from_output(output, self)

    async def stream(
        self,
        polos: Any,
        input: str | list[dict[str, Any]],
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        initial_state: Any = None,
        **provider_kwargs: Any,
    ) -> AgentStream:
        """``agent.stream(polos, input)``: start a durable run that streams, and return at once
        a handle with ``text_chunks`` (the text as the model writes it), ``events`` (every
        delta, the end of every LLM step, the final ``agent_finish``), ``text()`` and
        ``result()``. The run is durable as with ``run``; the stream is live (NATS core)."""
        _refuse_initial_state(self, initial_state)
        nc = getattr(polos, "nc", None)
        names = getattr(polos, "names", None)
        if nc is None or names is None:
            raise TypeError(f"agent.stream(polos, ...) needs a PolosClient, got {polos!r}")
        run_id = uuid.uuid4().hex
        stream = AgentStream(polos, self, run_id, lambda out: _result_from_output(out, self))
        # Subscribed before the start, so not one delta is missed.
        await stream.subscribe(nc, names.delta_subject(run_id, "") + ">")
        try:
            await self._start(
                polos, input, None, session_id, user_id, provider_kwargs, True, run_id
            )
        except BaseException:
            await stream.close()
            raise
        stream.start_waiting()
        return stream

    async def _start(
        self,
        polos: Any,
        input: str | list[dict[str, Any]],
        session: str | None,
        session_id: str | None,
        user_id: str | None,
        provider_kwargs: dict[str, Any],
        streaming: bool,
        run_id: str | None = None,
    ) -> Any:
        if not callable(getattr(polos, "start", None)):
            raise TypeError(
                f"agent.run(polos, input): polos must be a PolosClient (or Polos), got {polos!r}"
            )
        _input_messages(input)  # a bad input fails here, not in the worker
        request = AgentRequest(
            agent=self.name,
            input=input,
            session=session,
            session_id=session_id,
            user_id=user_id,
            streaming=streaming,
            provider_kwargs=dict(provider_kwargs),
        )
        return await polos.start(agent_workflow, request, run_id=run_id, queue=self.queue_name)

    # ------------------------------------------------------------------ the request

    def response_format(self) -> dict[str, Any] | None:
        if self.output_type is None or self.output_type is str:
            return None
        schema = json_schema(self.output_type)
        return {
            "type": "json_schema",
            "json_schema": {
                "name": getattr(self.output_type, "__name__", "output")[:64],
                "schema": schema,
                "strict": False,
            },
        }

    def system_message(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.instructions}] if self.instructions else []


def _one_of(ours: str, a: Any, theirs: str, b: Any) -> Any:
    """One option given under either of its two names (ours and the original SDK's)."""
    if a is not None and b is not None and a != b:
        raise ValueError(f"{ours}= and {theirs}= name one option; give one of them")
    return a if a is not None else b


def _refuse_initial_state(agent: Agent[Any], initial_state: Any) -> None:
    if initial_state is not None:
        raise TypeError(
            f"agent {agent.name!r}: initial_state is not supported for agents here (an agent "
            "run has no workflow state); pass what the agent needs in its input"
        )


def _queue_name(queue: Any, name: str) -> str | None:
    """The queue an agent's runs start on: a name, a ``Queue`` or ``{"name": ...}``; None is the
    default queue (the ``polos_agent`` workflow's own)."""
    if queue is None:
        return None
    if isinstance(queue, str):
        return queue
    if isinstance(queue, Queue):
        return queue.name
    if isinstance(queue, dict):
        unknown = set(queue) - {"name"}
        if unknown:
            raise TypeError(
                f"Agent({name!r}, queue={queue!r}): only 'name' is accepted in a queue dict; set "
                "limits with a polos.Queue declared by a workflow or polos.queues.configure_queue"
            )
        return str(queue.get("name") or name)
    raise TypeError(f"Agent({name!r}, queue=...): a str, a Queue or a dict, got {queue!r}")


async def _run_plain(run: AgentRun, settings: Settings | None) -> AgentResult[Any]:
    if settings is None:
        return await _agent_loop(StepRunner(), "agent", run)
    nc = await connect(settings, name=f"polos-agent-{run.agent.name}")
    try:
        runner = StepRunner(nc, settings.prefix, nc.jetstream(timeout=settings.request_timeout))
        return await _agent_loop(runner, "agent", run)
    finally:
        await disconnect(nc)


def _result_from_output(output: dict[str, Any], agent: Agent[Any]) -> AgentResult[Any]:
    """An agent run's recorded output as an ``AgentResult``, its result typed by the
    ``output_type`` of the agent that answered (a handoff may have moved on)."""
    result = AgentResult.from_json(output)
    # The agent called types its own result; after a handoff, the agent that answered.
    final = agent if result.agent == agent.name else _AGENTS.get(result.agent, agent)
    if (
        final.output_type is not None
        and result.result is not None
        and result.stop_reason == "completed"
    ):
        result.result = from_json(result.result, final.output_type)
    return result


def handoff_tool_name(agent: Agent[Any]) -> str:
    return f"transfer_to_{agent.name}"


def _handoff_schema(target: Agent[Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": handoff_tool_name(target),
            "description": f"Hand the conversation over to {target.name}: {target.description}",
            "parameters": {
                "type": "object",
                "properties": {"reason": {"type": "string", "description": "why you hand over"}},
            },
        },
    }


def _memory_tools(mem: SharedMemory | None) -> list[Tool]:
    async def _need() -> SharedMemory:
        if mem is None:
            raise AgentConfigError(
                "shared memory needs a NATS connection (run the agent in a workflow)"
            )
        return mem

    async def memory_get(key: str) -> Any:
        """Read an entry of the session's shared working memory (null when absent).

        Args:
            key: the entry's name (letters, digits, '_', '-')
        """
        return await (await _need()).get(key)

    async def memory_set(key: str, value: Any) -> Any:
        """Write an entry of the session's shared working memory, replacing its value.

        Args:
            key: the entry's name (letters, digits, '_', '-')
            value: any JSON value
        """
        return await (await _need()).set(key, value)

    async def memory_append(key: str, item: Any) -> Any:
        """Append an item to a list entry of the session's shared working memory.

        Args:
            key: the entry's name (letters, digits, '_', '-')
            item: any JSON value
        """
        return await (await _need()).append(key, item)

    return [Tool.from_function(f) for f in (memory_get, memory_set, memory_append)]


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _assistant_message(out: dict[str, Any]) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": out.get("content")}
    calls = out.get("tool_calls") or []
    if calls:
        msg["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {
                    "name": c["name"],
                    "arguments": c["arguments"]
                    if isinstance(c["arguments"], str)
                    else orjson.dumps(c["arguments"]).decode(),
                },
            }
            for c in calls
        ]
    if out.get("reasoning_items"):
        # Anthropic wants a thinking model's thinking blocks back on its tool-use turn.
        msg["reasoning_items"] = out["reasoning_items"]
    return msg


def _dumps(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


class _DeltaSink:
    """Publishes one LLM step's text deltas, numbered, then a closing ``done`` message."""

    def __init__(self, nc: NATS, subject: str, run_id: str, step_id: str, agent: str) -> None:
        self.nc = nc
        self.subject = subject
        self.head = {"run_id": run_id, "step": step_id, "agent": agent}
        self.seq = 0

    async def send(self, delta: str) -> None:
        self.seq += 1
        await self.nc.publish(
            self.subject, orjson.dumps({**self.head, "seq": self.seq, "delta": delta})
        )

    async def done(self, finish_reason: str | None) -> None:
        await self.nc.publish(
            self.subject,
            orjson.dumps({**self.head, "done": True, "finish_reason": finish_reason}),
        )


def _llm_meta(
    agent: Agent[Any], messages: list[dict[str, Any]], offered: list[str], outcome: LLMOutcome
) -> dict[str, Any]:
    """What an llm step records beside the answer (analytics, trace and spans read it)."""
    return {
        "agent": agent.name,
        "provider": agent.provider,
        "model": agent.model,
        "base_url": agent.config.effective_base_url,
        "messages": messages,
        "tools_offered": offered,
        "usage": outcome.usage,
        "latency_ms": outcome.latency_ms,
        "finish_reason": outcome.finish_reason,
        "cost_usd": cost_usd(agent.model, outcome.usage, agent.provider),
        "temperature": agent.temperature,
        # What was decided, kept with the call: chosen vs the offered tools not chosen, and
        # the model's stated reason.
        "choice": decision_record(outcome.message, offered),
    }


class _Loop:
    """One agent run: the state the loop rebuilds identically on every replay."""

    def __init__(self, runner: StepRunner, key: str, run: AgentRun, ctx: Any = None) -> None:
        self.runner = runner
        self.key = key
        self.run = run
        self.ctx = ctx  # what hooks and guardrails get as their ``ctx`` (the WorkflowContext)
        self.active: Agent[Any] = run.agent
        self.usage = Usage()
        self.steps: list[AgentStep] = []
        # The original SDK's view of the run: one Step per LLM call, with its tool calls.
        self.agent_steps: list[Step] = []
        self.tool_results: list[ToolResult] = []
        self.stop_message: str | None = None
        self.answer: AgentStep  # set by each llm_call whose answer the loop uses
        self.llm_n = 0
        self.tool_n = 0
        self.last_text: str | None = None
        self.output_tries = 0
        self.guard_tries = 0
        self.session: Session = NO_SESSION  # set by session_history
        session = run.memory_scope or runner.run_id
        self.memory = (
            SharedMemory(runner.js, runner.prefix, session)
            if runner.js is not None and runner.prefix is not None and _TOKEN_OK.match(session)
            else None
        )

    # ------------------------------------------------------------------ tools on offer

    def tools_of(self, agent: Agent[Any]) -> dict[str, Tool]:
        tools = {t.name: t for t in agent.tools}
        if agent.memory:
            tools.update({t.name: t for t in _memory_tools(self.memory)})
        return tools

    def request(self, agent: Agent[Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
        req: dict[str, Any] = {
            "messages": messages,
            **agent.model_settings,
            **self.run.provider_kwargs,
        }
        schemas = [t.openai_schema() for t in self.tools_of(agent).values()]
        schemas += [_handoff_schema(h) for h in agent.handoffs]
        if schemas:
            req["tools"] = schemas
        fmt = agent.response_format()
        if fmt is not None:
            req["response_format"] = fmt
        if agent.temperature is not None:
            req["temperature"] = agent.temperature
        return req

    # ------------------------------------------------------------------ the result

    def result(
        self, value: Any, reason: str, messages: list[dict[str, Any]], text: str | None = None
    ) -> AgentResult[Any]:
        runner = self.runner
        run_id = runner.run_id if runner.execution is not None else None
        text = self.last_text if text is None else text
        if value is None and reason != "completed" and self.active.output_type is None:
            # Stopped early: the last thing the model said is the result (None if nothing).
            value = next((s.content for s in reversed(self.agent_steps) if s.content), None)
        schema = None
        if isinstance(value, pydantic.BaseModel):
            schema = f"{type(value).__module__}.{type(value).__qualname__}"
        return AgentResult(
            value,
            text,
            self.active.name,
            self.usage,
            self.steps,
            reason,
            messages,
            run_id,
            tool_results=list(self.tool_results),
            total_steps=len(self.agent_steps),
            result_schema=schema,
        )

    # ------------------------------------------------------------------ steps

    async def llm_call(
        self,
        messages: list[dict[str, Any]],
        *,
        key: str | None = None,
        request: dict[str, Any] | None = None,
        purpose: str | None = None,
    ) -> dict[str, Any]:
        """One LLM call as one durable step. By default the agent's next step
        (``<key>/llm/<n>``); ``key`` and ``request`` for the calls around it (a guardrail
        retry, a string guardrail's judge, a compaction), which are recorded and counted but
        are no agent step. ``purpose`` (``retry``, ``guardrail``, ...) goes into the step's meta;
        only a call without one streams, and only ``None`` / ``retry`` answers are the step's."""
        agent = self.active
        agent.config.resolved_key()  # a missing key fails here, before any call is made
        if key is None:
            self.llm_n += 1
            key = f"{self.key}/llm/{self.llm_n}"
        req = self.request(agent, messages) if request is None else request
        offered = [t["function"]["name"] for t in req.get("tools", [])]

        async def call(step_id: str) -> StepDone:
            deltas = self.delta_sink(agent, step_id) if purpose is None else None
            outcome = await self.provider_call(
                agent, req, step_id, deltas.send if deltas is not None else None
            )
            if deltas is not None:
                await deltas.done(outcome.finish_reason)
            meta = _llm_meta(agent, messages, offered, outcome)
            if purpose is not None:
                meta["purpose"] = purpose
            return StepDone(outcome.message, meta, attempts=outcome.attempts)

        rec = await self.runner.step(key, "llm", agent.model, call)
        self.note_llm(agent, rec)
        if purpose in (None, "retry"):
            self.answer = self.steps[-1]  # the call whose answer the loop goes on with
        return dict(rec.output)

    def delta_sink(self, agent: Agent[Any], step_id: str) -> _DeltaSink | None:
        """Where a streaming agent's text deltas go (None: not streamed, or no NATS)."""
        if agent.guardrails or not self.streaming(agent):
            return None
        return self.sink(agent, step_id)

    def streaming(self, agent: Agent[Any]) -> bool:
        return (agent.stream_to_workflow or self.run.streaming) and self.runner.nc is not None

    def sink(self, agent: Agent[Any], step_id: str) -> _DeltaSink | None:
        runner = self.runner
        if runner.nc is None or runner.prefix is None:
            return None
        subject = Names(runner.prefix).delta_subject(runner.root_run_id, step_id)
        return _DeltaSink(runner.nc, subject, runner.run_id, step_id, agent.name)

    async def provider_call(
        self,
        agent: Agent[Any],
        req: dict[str, Any],
        step_id: str,
        on_delta: Callable[[str], Awaitable[None]] | None,
    ) -> LLMOutcome:
        """The provider call, through the shared token limiter inside a run; a provider's
        refusal becomes the step's failure."""
        runner = self.runner
        headers = {"X-Polos-Step": f"{runner.run_id}:{step_id}"}
        limiter = _token_limiter(runner)
        try:
            if limiter is None:
                return await call_llm(agent.config, req, headers=headers, on_delta=on_delta)

            # System-wide token and request limits (polos/_private/limits.py): reserve an
            # estimate (a long wait suspends the run: it holds no worker meanwhile), settle
            # with the real usage, and share a 429 with every process.
            async def blocked(seconds: float) -> None:
                await limiter.backoff(
                    model=agent.model, provider=agent.provider, retry_after=seconds
                )

            assert runner.execution is not None
            reservation = await reserve_for_step(
                runner.execution,
                step_id,
                limiter,
                model=agent.model,
                provider=agent.provider,
                tokens=estimate_request_tokens(req),
            )
            async with reservation:
                outcome = await call_llm(
                    agent.config, req, headers=headers, on_delta=on_delta, on_rate_limited=blocked
                )
                reservation.settle(outcome.usage.get("total_tokens", 0))
                return outcome
        except ProviderError as exc:
            raise StepError(
                exc.error_type, exc.message, {"status": exc.status, "agent": agent.name}
            ) from exc

    def note_llm(self, agent: Agent[Any], rec: Recorded) -> None:
        """Count a recorded LLM call in the run's usage and steps (new or replayed alike)."""
        usage = rec.meta.get("usage") or {}
        self.usage.add(usage, rec.meta.get("cost_usd"))
        self.steps.append(
            AgentStep(
                "llm",
                rec.key,
                agent.model,
                agent.name,
                rec.output,
                usage=usage,
                replayed=rec.replayed,
            )
        )

    # ------------------------------------------------------------------ hooks and durable calls

    def steps_of(self) -> Any:
        """Where hooks, guardrails and custom stop conditions run as durable steps: the run's
        execution, or (plain code) a stand-in that just calls them."""
        return self.runner.execution if self.runner.execution is not None else _PlainSteps()

    def hook_context(self, **fields: Any) -> HookContext:
        base: dict[str, Any] = {
            "workflow_id": self.run.agent.name,
            "session_id": self.run.session,
            "user_id": self.run.user_id,
            "agent_config": self.active.agent_config(),
            "steps": [s.model_copy() for s in self.agent_steps],
        }
        return HookContext(**{**base, **fields})

    async def hook(self, phase: str, key: str, **fields: Any) -> HookResult:
        """The agent's ``phase`` hooks, each a durable step under ``key`` (a FAIL raises
        ``StepExecutionError``), seeing a ``HookContext`` with ``fields``; what they changed,
        merged, as plain JSON (the same on a replay as on the first run)."""
        hooks = self.run.agent.hooks.get(phase) or []
        if not hooks:
            return HookResult()
        context = self.hook_context(**fields)
        merged = await run_hooks(self.steps_of(), self.ctx, key, hooks, context)
        return HookResult(
            modified_payload=to_json(merged.modified_payload, what=f"{phase} modified_payload"),
            modified_output=to_json(merged.modified_output, what=f"{phase} modified_output"),
        )

    async def step_start(
        self, n: int, convo: list[dict[str, Any]]
    ) -> list[dict[str, Any]] | AgentResult[Any]:
        """``on_agent_step_start``: ``modified_payload["messages"]`` replaces the conversation;
        a FAIL ends the loop here (as the original SDK meant), with the stop reason
        ``on_agent_step_start`` and the hook's message as ``stop_message``."""
        if not self.run.agent.hooks.get("on_agent_step_start"):
            return convo
        try:
            got = await self.hook(
                "on_agent_step_start",
                f"{self.key}/step/{n}/on_agent_step_start",
                current_payload={"step": n, "messages": list(convo)},
            )
        except StepFailedError:
            raise  # the hook itself raised: that fails the run
        except StepExecutionError as exc:
            self.stop_message = str(exc)
            return self.result(None, "on_agent_step_start", self.active.system_message() + convo)
        messages = (got.modified_payload or {}).get("messages")
        return [dict(m) for m in messages] if isinstance(messages, list) else convo

    async def step_end(self, n: int, convo: list[dict[str, Any]]) -> None:
        """``on_agent_step_end``: a ``modified_output`` (a Step, as a dict) replaces the step."""
        if not self.run.agent.hooks.get("on_agent_step_end") or not self.agent_steps:
            return
        got = await self.hook(
            "on_agent_step_end",
            f"{self.key}/step/{n}/on_agent_step_end",
            current_payload={"step": n, "messages": list(convo)},
            current_output=self.agent_steps[-1].model_copy(),
        )
        if got.modified_output:
            self.agent_steps[-1] = Step.model_validate(got.modified_output)

    async def tool_start(self, n: int, call: dict[str, Any]) -> dict[str, Any]:
        """``on_tool_start``: ``modified_payload`` is merged into the tool's arguments."""
        if not self.run.agent.hooks.get("on_tool_start"):
            return call
        args = call.get("arguments")
        got = await self.hook(
            "on_tool_start",
            f"{self.tool_key(call, n)}/on_tool_start",
            current_tool=call.get("name"),
            current_payload=args,
        )
        if got.modified_payload and isinstance(args, dict):
            return {**call, "arguments": {**args, **got.modified_payload}}
        return call

    async def tool_end(
        self, n: int, call: dict[str, Any], done: tuple[Any, AgentStep]
    ) -> tuple[Any, AgentStep]:
        """``on_tool_end``: ``modified_output`` replaces the result the model sees."""
        if not self.run.agent.hooks.get("on_tool_end"):
            return done
        output, step = done
        got = await self.hook(
            "on_tool_end",
            f"{self.tool_key(call, n)}/on_tool_end",
            current_tool=call.get("name"),
            current_payload=call.get("arguments"),
            current_output=output,
        )
        if got.modified_output is not None:
            return got.modified_output, dataclasses.replace(step, output=got.modified_output)
        return done

    def note_step(self, n: int, out: dict[str, Any]) -> None:
        """The original SDK's ``Step`` for agent step ``n`` (its tool results come later)."""
        usage = Usage()
        usage.add(self.answer.usage or {}, None)
        self.agent_steps.append(
            Step(
                step=n,
                content=out.get("content"),
                tool_calls=[_tool_call_model(c) for c in out.get("tool_calls") or []],
                usage=usage,
            )
        )

    def note_tool_results(self, calls: list[dict[str, Any]], outs: list[Any]) -> None:
        results = []
        for c, (output, step) in zip(calls, outs, strict=True):
            results.append(
                ToolResult(
                    tool_name=str(c.get("name")),
                    status="failed" if step.error else "completed",
                    result=output,
                    error=step.error,
                    tool_call_id=str(c.get("id")),
                    tool_call_call_id=str(c.get("id")),
                )
            )
        self.tool_results.extend(results)
        if self.agent_steps:
            self.agent_steps[-1].tool_results.extend(results)

    # ------------------------------------------------------------------ stop conditions

    async def check_stop(self, convo: list[dict[str, Any]]) -> AgentResult[Any] | None:
        """The stop conditions, in order, after a step that called tools; the first that holds
        ends the run with its name as the stop reason. A custom one is a durable step."""
        conditions = self.run.agent.stop_conditions
        if not conditions:
            return None
        context = StopConditionContext(
            steps=[s.model_copy() for s in self.agent_steps],
            agent_id=self.run.agent.name,
            agent_run_id=self.runner.run_id,
        )
        n = len(self.agent_steps)
        for i, cond in enumerate(conditions):
            if cond.pure:
                hit = bool(cond(context))
            else:

                async def evaluate(cond: StopCondition = cond) -> bool:
                    return bool(await _maybe_await(cond(context)))

                evaluate.__qualname__ = f"stop_condition:{cond.name}"
                hit = await self.steps_of().run_step(
                    f"{self.key}/step/{n}/stop_condition.{cond.name}.{i}", evaluate, (), {}, None
                )
            if hit:
                return self.result(None, cond.name, self.active.system_message() + convo)
        return None

    # ------------------------------------------------------------------ guardrails

    async def guarded_llm_call(self, n: int, convo: list[dict[str, Any]]) -> dict[str, Any]:
        """The LLM call of agent step ``n`` and the agent's ``guardrails`` on its answer. A
        rejection asks again with the reason, each retry a new request under its own key
        (``<key>/llm/<i>/retry/<a>``), so no retry gets a recorded answer back."""
        agent = self.active
        out = await self.llm_call(agent.system_message() + convo)
        if not agent.guardrails:
            return out
        base = f"{self.key}/llm/{self.llm_n}"
        attempt = 0
        while True:
            verdict = await self.run_guardrails(out, f"{base}/guardrail/{attempt}")
            if verdict.action != HookAction.FAIL:
                out = _apply_guardrail(out, verdict)
                await self.publish_guarded(out)
                return out
            reason = verdict.error_message or "rejected by a guardrail"
            if attempt >= agent.guardrail_max_retries:
                raise AgentGuardrailError(
                    f"agent {agent.name!r}: guardrail failed after {agent.guardrail_max_retries} "
                    f"retries. Last error: {reason}"
                )
            attempt += 1
            convo.append(_assistant_message(out))
            convo.append(
                {
                    "role": "user",
                    "content": f"Previous attempt failed guardrail validation: {reason}. "
                    "Please revise your response accordingly.",
                }
            )
            out = await self.llm_call(
                agent.system_message() + convo, key=f"{base}/retry/{attempt}", purpose="retry"
            )

    async def run_guardrails(self, out: dict[str, Any], key: str) -> GuardrailResult:
        """Every guardrail in order, on the answer as the ones before changed it; the first
        FAIL stops the chain."""
        agent = self.active
        content = out.get("content")
        calls = [_tool_call_model(c) for c in out.get("tool_calls") or []]
        changed: dict[str, Any] = {}
        for i, rule in enumerate(agent.guardrails):
            context = GuardrailContext(
                content=content,
                tool_calls=list(calls),
                agent_workflow_id=agent.name,
                agent_run_id=self.runner.run_id,
                session_id=self.run.session,
                user_id=self.run.user_id,
                llm_config=agent.agent_config(),
                steps=[s.model_copy() for s in self.agent_steps],
            )
            if isinstance(rule, str):
                result = await self.judge(rule, content, f"{key}/judge.{i}")
            else:
                result = await self.call_guardrail(rule, context, f"{key}/{_fn_name(rule, i)}.{i}")
            if result.action == HookAction.FAIL:
                return result
            if result.modified_content is not None:
                content = changed["modified_content"] = result.modified_content
            if result.modified_tool_calls is not None:
                calls = changed["modified_tool_calls"] = list(result.modified_tool_calls)
        return GuardrailResult(**changed)

    async def call_guardrail(
        self, fn: Callable[..., Any], context: GuardrailContext, key: str
    ) -> GuardrailResult:
        name = _fn_name(fn, 0)

        async def call() -> GuardrailResult:
            result = await _maybe_await(fn(self.ctx, context))
            if result is None:
                return GuardrailResult()
            if isinstance(result, GuardrailResult):
                return result
            if isinstance(result, HookResult):
                return GuardrailResult.model_validate(result.model_dump())
            return GuardrailResult.fail(
                f"guardrail {name!r} returned {type(result).__name__}; a guardrail returns a "
                "GuardrailResult (or None to continue)"
            )

        call.__qualname__ = f"guardrail:{getattr(fn, '__qualname__', name)}"
        result: GuardrailResult = await self.steps_of().run_step(key, call, (), {}, None)
        return result

    async def judge(self, rule: str, content: Any, key: str) -> GuardrailResult:
        """A string guardrail: the agent's model judges the answer against ``rule`` (its own
        LLM step, no tools offered); empty content passes."""
        if content is None or (isinstance(content, str) and not content.strip()):
            return GuardrailResult()
        messages = [
            {
                "role": "user",
                "content": f"{rule}\n\nPlease evaluate the following LLM response against the "
                "criteria above. Answer with JSON: passed (true if the response meets the "
                "criteria) and reason.\n\nLLM Response to evaluate:\n"
                f"{content if isinstance(content, str) else _dumps(content)}",
            }
        ]
        request = {
            "messages": messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "GuardrailEvaluationResult",
                    "schema": {
                        "type": "object",
                        "properties": {"passed": {"type": "boolean"}, "reason": {"type": "string"}},
                        "required": ["passed", "reason"],
                        "additionalProperties": False,
                    },
                    "strict": True,
                },
            },
        }
        answer = await self.llm_call(messages, key=key, request=request, purpose="guardrail")
        try:
            verdict = orjson.loads(answer.get("content") or "")
            passed, reason = bool(verdict["passed"]), str(verdict.get("reason") or "")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            return GuardrailResult.fail(f"Failed to parse guardrail evaluation result: {exc}")
        return GuardrailResult() if passed else GuardrailResult.fail(reason or rule)

    async def publish_guarded(self, out: dict[str, Any]) -> None:
        """With guardrails nothing streams while the model writes: the text that passed is
        sent once, as one delta."""
        agent = self.active
        text = out.get("content")
        if not text or not self.streaming(agent) or self.runner.is_replaying:
            return
        sink = self.sink(agent, f"{self.key}/llm/{self.llm_n}")
        if sink is not None:
            await sink.send(str(text))
            await sink.done("stop")

    # ------------------------------------------------------------------ the session seam

    async def session_history(self, convo: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The session's earlier turns before this run's input: loaded (and compacted when
        they pass the agent's ``compaction`` budget) as durable steps (sessions.py)."""
        self.session = await open_session(
            self.runner,
            self.key,
            self.run.agent,
            session_of(self.runner, self.run.session_id),
            convo,
        )
        return self.session.history + convo

    async def compact(self, n: int, convo: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Before each LLM call: the conversation, summarised when it passed the agent's
        ``compaction`` budget. Compaction runs when a turn starts (``session_history``), so
        within one turn the conversation goes on whole."""
        return convo

    async def record_turn(self, result: AgentResult[Any]) -> None:
        """After the run: this turn appended to the session's history, a durable step that
        writes once even when repeated after a crash (sessions.py)."""
        await self.session.record(result.messages)

    # ------------------------------------------------------------------ the end

    async def finish(self, result: AgentResult[Any]) -> AgentResult[Any]:
        """Record why the run stopped (the step ``<key>/stopped``), run ``on_end`` (whose
        ``modified_output`` replaces the result's value) and record the turn."""
        exe = self.runner.execution
        if exe is not None:
            why = {
                "stop_reason": result.stop_reason,
                "total_steps": result.total_steps,
                "message": self.stop_message,
            }

            async def stopped() -> dict[str, Any]:
                return why

            await exe.run_step(f"{self.key}/stopped", stopped, (), {}, None)
        if self.run.agent.hooks.get("on_end"):
            got = await self.hook(
                "on_end",
                f"{self.key}/on_end",
                current_payload=self.payload(),
                current_output=result,
            )
            if got.modified_output is not None:
                result.result = got.modified_output
        await self.record_turn(result)
        return result

    def payload(self) -> dict[str, Any]:
        return {"input": self.run.input, "session_id": self.run.session_id or self.run.session}

    # ------------------------------------------------------------------ turns

    async def tool_turn(
        self, out: dict[str, Any], convo: list[dict[str, Any]]
    ) -> AgentResult[Any] | None:
        """Run the tool calls of one LLM answer (the tools in parallel, then a handoff) and add their outputs to ``convo``; a result when the run stops here."""
        active = self.active
        decision = self.answer.key
        calls = out.get("tool_calls") or []
        if active.max_tokens is not None and self.usage.total_tokens >= active.max_tokens:
            return self.result(None, "max_tokens", active.system_message() + convo)
        handoffs = {handoff_tool_name(h): h for h in active.handoffs}
        numbered = []
        for c in calls:
            self.tool_n += 1
            numbered.append((self.tool_n, c))
        regular = [(n, c) for n, c in numbered if c.get("name") not in handoffs]
        # Parallel tool calls run concurrently; their step keys are fixed by position, so
        # a replay finds each one whatever order they finished in.
        # A tool that waits for a human (approval, ask_user) suspends the run from inside
        # its call; its siblings finish and record first, and the resumed run replays them.
        regular = [(n, await self.tool_start(n, c)) for n, c in regular]
        outs = await asyncio.gather(*(self.tool_call(c, decision, n) for n, c in regular))
        outs = [await self.tool_end(n, c, o) for (n, c), o in zip(regular, outs, strict=True)]
        by_id = {c.get("id"): o for (_, c), o in zip(regular, outs, strict=True)}
        self.note_tool_results([c for _, c in regular], outs)
        self.steps.extend(step for _, step in outs)
        self.usage.tool_calls += len(outs)
        target: Agent[Any] | None = None
        for n, c in numbered:
            if c.get("name") in handoffs and target is None:
                target = handoffs[str(c.get("name"))]
                await self.handoff(c, decision, n, target)
                content = _dumps({"transferred_to": target.name})
            elif c.get("name") in handoffs:
                content = _dumps({"error": "only one handoff per turn"})
            else:
                content = _dumps(by_id[c.get("id")][0])
            convo.append({"role": "tool", "tool_call_id": c.get("id"), "content": content})
        stopped = [
            by_id[c.get("id")][0] for _, c in regular if c.get("name") in active.stop_on_tools
        ]
        if stopped:
            return self.result(stopped[0], "tool_called", active.system_message() + convo)
        return None

    async def final_answer(
        self, out: dict[str, Any], convo: list[dict[str, Any]]
    ) -> AgentResult[Any] | None:
        """Parse and guard an answer without tool calls: the result, or None after adding a
        corrective message to ``convo`` for another try."""
        active = self.active
        text = out.get("content")
        value: Any = text
        if active.output_type is not None and active.output_type is not str:
            try:
                value = pydantic.TypeAdapter(active.output_type).validate_json(text or "")
            except pydantic.ValidationError as exc:
                if self.output_tries >= active.output_retries:
                    raise AgentOutputError(
                        f"agent {active.name!r}: the answer does not match "
                        f"{getattr(active.output_type, '__name__', active.output_type)}: {exc}"
                    ) from exc
                self.output_tries += 1
                convo.append(
                    {
                        "role": "user",
                        "content": "Your answer is not valid JSON for the required schema "
                        f"({exc.error_count()} errors: {_short_errors(exc)}). "
                        "Answer again with only the JSON object.",
                    }
                )
                return None
        try:
            for guard in active.output_guardrails:
                rewritten = await _maybe_await(guard(value))
                if rewritten is not None:
                    value = rewritten
        except GuardrailViolation as exc:
            if self.guard_tries >= active.guardrail_retries:
                raise AgentGuardrailError(f"agent {active.name!r}: output rejected: {exc}") from exc
            self.guard_tries += 1
            convo.append(
                {"role": "user", "content": f"Your answer was rejected: {exc}. Try again."}
            )
            return None
        return self.result(value, "completed", active.system_message() + convo, text=text)

    def tool_key(self, call: dict[str, Any], n: int) -> str:
        return f"{self.key}/tool/{n}/{call.get('name')}"

    async def tool_call(self, call: dict[str, Any], decision: str, n: int) -> tuple[Any, AgentStep]:
        agent = self.active
        name = str(call.get("name"))
        arguments = call.get("arguments")
        tool = self.tools_of(agent).get(name)
        key = self.tool_key(call, n)

        async def execute(step_id: str) -> StepDone:
            args = arguments
            error: str | None = None
            output: Any = None
            meta: dict[str, Any] = {
                "agent": agent.name,
                "arguments": arguments,
                "decision": decision,
                "tool_call_id": call.get("id"),
                "error": None,
            }
            try:
                if tool is None:
                    raise LookupError(
                        f"no tool named {name!r}; available: {sorted(self.tools_of(agent))}"
                    )
                if not isinstance(args, dict):
                    raise ValueError(f"arguments must be a JSON object, got {args!r}")
                for guard in agent.tool_guardrails:
                    rewritten = await _maybe_await(guard(name, args))
                    if rewritten is not None:
                        args = dict(rewritten)
                if args != arguments:
                    meta["rewritten_arguments"] = args
                output = await tool.call(
                    args,
                    ToolScope(
                        self.runner.execution,
                        step_id,
                        agent=agent.name,
                        session_id=self.run.session_id or self.run.session,
                    ),
                )
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                output = {"error": error}
            meta["error"] = error
            return StepDone(output, meta)

        rec = await self.runner.step(key, "tool", name, execute)
        err = rec.meta.get("error")
        # Not appended to self.steps here: parallel calls finish in any order, and the result
        # lists them in the order the model asked for them.
        return rec.output, AgentStep(
            "tool",
            rec.key,
            name,
            agent.name,
            rec.output,
            arguments=arguments,
            error=err,
            replayed=rec.replayed,
        )

    async def handoff(
        self, call: dict[str, Any], decision: str, n: int, target: Agent[Any]
    ) -> None:
        source = self.active

        async def record(step_id: str) -> StepDone:
            return StepDone(
                {"transferred_to": target.name},
                {
                    "agent": source.name,
                    "arguments": call.get("arguments"),
                    "decision": decision,
                    "tool_call_id": call.get("id"),
                    "error": None,
                    "handoff": target.name,
                },
            )

        name = str(call.get("name"))
        rec = await self.runner.step(f"{self.key}/tool/{n}/{name}", "tool", name, record)
        self.steps.append(
            AgentStep(
                "tool",
                rec.key,
                name,
                source.name,
                rec.output,
                arguments=call.get("arguments"),
                replayed=rec.replayed,
            )
        )
        self.active = target


_TOKEN_OK = re.compile(r"^[A-Za-z0-9_\-=]{1,128}$")


def _token_limiter(runner: StepRunner) -> Any:
    """The worker's shared token limiter inside a run; None in plain code."""
    exe = runner.execution
    if exe is None:
        return None
    return TokenLimiter.shared(exe.nc, exe.js, exe.names, exe.settings)


def _input_messages(input: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(input, str):
        return [{"role": "user", "content": input}]
    if isinstance(input, list) and all(isinstance(m, dict) and "role" in m for m in input):
        return [dict(m) for m in input]
    raise TypeError(
        "an agent's input is a string or a list of {'role': ..., 'content': ...} messages"
    )


async def _guard_input(agent: Agent[Any], convo: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input guardrails, on the last user message: a rewrite replaces it, a rejection
    fails the agent before any LLM call."""
    for guard in agent.input_guardrails:
        last = next((m for m in reversed(convo) if m.get("role") == "user"), None)
        if last is None:
            break
        try:
            rewritten = await _maybe_await(guard(str(last.get("content"))))
        except GuardrailViolation as exc:
            raise AgentGuardrailError(f"agent {agent.name!r}: input rejected: {exc}") from exc
        if rewritten is not None:
            last["content"] = rewritten
    return convo


async def _agent_loop(
    runner: StepRunner, key: str, run: AgentRun, ctx: Any = None
) -> AgentResult[Any]:
    """The loop: ``on_start``, input guardrails, the session's history; then agent steps, each
    an LLM call (with its guardrails) followed by a tool turn (which may end the run, as may a
    stop condition) or a final answer (which ends it, unless sent back for another try); then
    the stop record and ``on_end``."""
    loop = _Loop(runner, key, run, ctx)
    run.agent.config.resolved_key()
    started = await loop.hook(
        "on_start",
        f"{key}/on_start",
        agent_config=None,
        current_payload=loop.payload(),
    )
    given = (started.modified_payload or {}).get("input", run.input)
    convo = await _guard_input(run.agent, _input_messages(given))
    convo = await loop.session_history(convo)
    return await loop.finish(await _turns(loop, convo))


async def _turns(loop: _Loop, convo: list[dict[str, Any]]) -> AgentResult[Any]:
    while True:
        active = loop.active
        if loop.llm_n >= active.max_steps:
            return loop.result(None, "max_steps", active.system_message() + convo)
        n = len(loop.agent_steps) + 1
        started = await loop.step_start(n, convo)
        if isinstance(started, AgentResult):
            return started
        convo = started
        convo = await loop.compact(n, convo)
        out = await loop.guarded_llm_call(n, convo)
        loop.note_step(n, out)
        convo.append(_assistant_message(out))
        loop.last_text = out.get("content")
        if out.get("tool_calls"):
            done = await loop.tool_turn(out, convo)
        else:
            done = await loop.final_answer(out, convo)
        await loop.step_end(n, convo)
        if done is None and out.get("tool_calls"):
            done = await loop.check_stop(convo)
        if done is not None:
            return done


class _PlainSteps:
    """``run_step`` outside a run (``agent.run(input)`` in plain code): just call."""

    async def run_step(
        self,
        key: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: Any,
    ) -> Any:
        return await _maybe_await(fn(*args, **kwargs))


def _fn_name(fn: Any, index: int) -> str:
    name = getattr(fn, "__name__", "")
    return name if name and name != "<lambda>" else f"guardrail_{index}"


def _tool_call_model(call: dict[str, Any]) -> ToolCall:
    args = call.get("arguments")
    return ToolCall(
        id=str(call.get("id")),
        call_id=str(call.get("id")),
        function=ToolCallFunction(
            name=str(call.get("name")),
            arguments=args if isinstance(args, str) else orjson.dumps(args).decode(),
        ),
    )


def _apply_guardrail(out: dict[str, Any], verdict: GuardrailResult) -> dict[str, Any]:
    """The answer as the guardrails left it: their text, their tool calls (``[]``: none)."""
    out = dict(out)
    if verdict.modified_content is not None:
        out["content"] = verdict.modified_content
    if verdict.modified_tool_calls is not None:
        calls = []
        for tc in verdict.modified_tool_calls:
            tc = tc if isinstance(tc, ToolCall) else ToolCall.model_validate(tc)
            try:
                args: Any = orjson.loads(tc.function.arguments or "{}")
            except orjson.JSONDecodeError:
                args = tc.function.arguments
            calls.append({"id": tc.call_id or tc.id, "name": tc.function.name, "arguments": args})
        out["tool_calls"] = calls
    return out


def _short_errors(exc: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())) or '(root)'}: {e.get('msg')}"
        for e in exc.errors()[:5]
    )


async def run_agent_in_execution(
    execution: RunExecution, key: str, run: AgentRun, ctx: Any = None
) -> AgentResult[Any]:
    """Run an agent's loop in a run's own history under ``key`` (LLM and tool calls as steps)."""
    if not isinstance(run, AgentRun):
        raise TypeError(
            f"agent_invoke_and_wait({key!r}, ...) needs agent.with_input(...), got {type(run).__name__}"
        )
    base = execution.step_id(key, "agent")
    return await _agent_loop(DurableRunner(execution), base, run, ctx)


_served_checked: set[str] = set()


async def _warn_if_unserved(execution: RunExecution) -> None:
    """A child agent run waits for a worker serving ``polos_agent``; say so loudly if no worker
    of the namespace ever registered it (a warning only: one may start later)."""
    prefix = execution.names.prefix
    if prefix in _served_checked:
        return
    try:
        kv = await execution.js.key_value(execution.names.workflows_bucket)
        await kv.get(agent_workflow.name)
        _served_checked.add(prefix)
    except Exception:
        log.warning(
            "no worker of namespace %r serves the %r workflow, so agent child runs will wait: "
            "import polos.agent.agent_workflow into your worker module (or use inline=True)",
            prefix,
            agent_workflow.name,
        )


class AgentRequest(pydantic.BaseModel):
    """The input of the ``polos_agent`` workflow: which agent, its input, its session, and the
    key its steps are recorded under (``<key>/llm/<n>``, ``<key>/tool/<n>/<name>``)."""

    agent: str
    input: str | list[dict[str, Any]]
    session: str | None = None
    session_id: str | None = None
    key: str = "agent"
    user_id: str | None = None
    streaming: bool = False
    provider_kwargs: dict[str, Any] = {}


@workflow(name="polos_agent")
async def agent_workflow(ctx: WorkflowContext, req: AgentRequest) -> dict[str, Any]:
    """Run a named agent as a run of its own (its own history). Serve it from any worker
    whose module defines (or imports) the agent."""
    agent = get_agent(req.agent)
    run = AgentRun(
        agent,
        req.input,
        req.session,
        user_id=req.user_id,
        streaming=req.streaming,
        provider_kwargs=dict(req.provider_kwargs),
        session_id=req.session_id,
    )
    result = await run_agent_in_execution(ctx._x, req.key, run, ctx)
    return result.to_json()


async def invoke_agent(
    execution: RunExecution, key: str, run: AgentRun, *, inline: bool = False, ctx: Any = None
) -> AgentResult[Any]:
    """``ctx.step.agent_invoke_and_wait``: the agent as a child run (the ``polos_agent``
    workflow; the parent waits holding no worker), or ``inline`` in the parent's history."""
    if inline:
        return await run_agent_in_execution(execution, key, run, ctx)
    if not isinstance(run, AgentRun):
        raise TypeError(
            f"agent_invoke_and_wait({key!r}, ...) needs agent.with_input(...), got {type(run).__name__}"
        )
    get_agent(run.agent.name)  # two agents under one name would make the child run the wrong one
    if run.agent.queue_name is not None:
        raise AgentConfigError(
            f"agent {run.agent.name!r} has queue={run.agent.queue_name!r}, which agent.run and "
            "agent.stream honour; a child run cannot be put on a queue yet: call it with "
            "inline=True, or start it with agent.run(polos, input)"
        )
    if not execution.is_replaying:
        await _warn_if_unserved(execution)

    # Agents started by one run share working memory unless told otherwise.
    request = AgentRequest(
        agent=run.agent.name,
        input=run.input,
        session=run.memory_scope or execution.run_id,
        session_id=run.session_id,
        key=key,
        user_id=run.user_id,
        streaming=run.streaming,
        provider_kwargs=dict(run.provider_kwargs),
    )
    output = await waits.invoke_and_wait(execution, key, agent_workflow, request)
    return _result_from_output(output, run.agent)


__all__ = [
    "Agent",
    "AgentError",
    "AgentGuardrailError",
    "AgentOutputError",
    "AgentRequest",
    "AgentResult",
    "AgentRun",
    "AgentStep",
    "GuardrailViolation",
    "Usage",
    "agent_workflow",
    "get_agent",
    "invoke_agent",
]

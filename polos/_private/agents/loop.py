"""The agent loop: ``Agent``, its durable run (``agent_workflow``) and the loop's turns.

Durable LLM agents: tools, structured output, handoffs, guardrails, stop conditions, memory.

::

    agent = Agent(provider="openai", model="gpt-4o", tools=[check_inventory, calculate_shipping],
                  instructions="You validate orders.", output_type=OrderValidation)

    @workflow
    async def process_order(ctx: WorkflowContext, order: Order) -> str:
        v = await ctx.step.agent_invoke_and_wait("validate_order", agent.with_input(f"Validate {order}"))
        return "ok" if v.result.valid else v.result.reason

Inside a run every LLM call is one ``StepCompleted(kind="llm")`` and every tool call one
``StepCompleted(kind="tool")`` in the run's history; a replay (after a crash, on another
worker) returns the recorded calls, so no token is paid for twice and no completed tool runs
twice. ``agent.run(...)`` runs the same loop in plain code, without durability.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson
import pydantic

from polos._private.agents.decisions import decision_record
from polos._private.agents.memory import SharedMemory
from polos._private.agents.pricing import cost_usd
from polos._private.agents.provider import (
    AgentConfigError,
    LLMRetry,
    ProviderConfig,
    ProviderError,
    call_llm,
    estimate_request_tokens,
)
from polos._private.agents.sessions import (
    CompactionConfig,
    normalize_compaction,
    open_session,
    session_key,
    session_of,
)
from polos._private.agents.steps import DurableRunner, StepDone, StepError, StepRunner
from polos._private.agents.tools import Tool, as_tool
from polos._private.limits import TokenLimiter, reserve_for_step
from polos._private.run import waits
from polos._private.run.definitions import workflow
from polos._private.store import Names, connect, disconnect
from polos.converter import from_json, json_schema, to_json
from polos.errors import PolosError

if TYPE_CHECKING:
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


@dataclass
class Usage:
    """Tokens and dollars over every LLM call of an agent run (cost None if a model has no price)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = 0.0
    llm_calls: int = 0
    tool_calls: int = 0

    def add(self, usage: dict[str, Any], cost: float | None) -> None:
        self.prompt_tokens += int(usage.get("prompt_tokens", 0) or 0)
        self.completion_tokens += int(usage.get("completion_tokens", 0) or 0)
        self.cached_tokens += int(usage.get("cached_tokens", 0) or 0)
        self.total_tokens += int(usage.get("total_tokens", 0) or 0)
        self.cost_usd = (
            None if cost is None or self.cost_usd is None else round(self.cost_usd + cost, 10)
        )
        self.llm_calls += 1


@dataclass
class AgentStep:
    """One step an agent took: an LLM call (``kind="llm"``) or a tool call (``kind="tool"``)."""

    kind: str
    key: str
    name: str | None
    agent: str
    output: Any = None
    arguments: Any = None
    error: str | None = None
    usage: dict[str, Any] | None = None
    replayed: bool = False


@dataclass
class AgentResult(Generic[T]):
    """What an agent run produced. ``result`` is typed by ``output_type`` (else the final text).

    ``stop_reason``: completed | max_steps | max_tokens | tool_called."""

    result: T | None
    text: str | None
    agent: str
    usage: Usage
    steps: list[AgentStep]
    stop_reason: str = "completed"
    messages: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None  # the run whose history holds the steps (the child run)

    def to_json(self) -> dict[str, Any]:
        # The messages are left out: every llm step's meta already holds its request messages.
        return {
            "run_id": self.run_id,
            "result": to_json(self.result, what="the agent's result"),
            "text": self.text,
            "agent": self.agent,
            "usage": to_json(self.usage, what="usage"),
            "steps": to_json(self.steps, what="steps"),
            "stop_reason": self.stop_reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], output_type: Any = None) -> AgentResult[Any]:
        result = data.get("result")
        if (
            output_type is not None
            and result is not None
            and data.get("stop_reason") == "completed"
        ):
            result = from_json(result, output_type)
        return cls(
            result=result,
            text=data.get("text"),
            agent=str(data.get("agent")),
            usage=Usage(**data.get("usage", {})),
            steps=[AgentStep(**s) for s in data.get("steps", [])],
            stop_reason=str(data.get("stop_reason", "completed")),
            messages=list(data.get("messages") or []),
            run_id=data.get("run_id"),
        )


@dataclass(frozen=True)
class AgentRun:
    """An agent with its input, ready for ``ctx.step.agent_invoke_and_wait(key, run)``."""

    agent: Agent[Any]
    input: str | list[dict[str, Any]]
    session: str | None = None
    session_id: str | None = None  # the conversation this turn belongs to (sessions.py)


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

    ``provider="openai"`` covers any OpenAI-compatible server through ``base_url`` (vLLM,
    Ollama, LiteLLM, a gateway); ``api_key`` defaults to ``OPENAI_API_KEY``.

    Stop conditions: ``max_steps`` LLM calls, ``max_tokens`` total tokens over the run,
    ``stop_on_tools`` (stop right after one of these tools ran; its output is the result).
    Guardrails are plain (sync or async) functions, run in the loop, so they must be
    deterministic: ``input_guardrails`` get the input text and return a rewrite or None;
    ``tool_guardrails`` get ``(tool_name, arguments)`` and return rewritten arguments or None;
    ``output_guardrails`` get the final output and return a rewrite or None. Any of them may
    raise ``GuardrailViolation(reason)``: a rejected input fails the agent, a rejected tool call
    goes back to the model as the tool's error, a rejected output goes back to the model for
    another try, at most ``guardrail_retries`` times.
    """

    def __init__(
        self,
        name: str = "agent",
        *,
        provider: str = "openai",
        model: str = "gpt-4o",
        instructions: str | None = None,
        system_prompt: str | None = None,
        description: str | None = None,
        tools: Sequence[Tool | Callable[..., Any]] = (),
        output_type: type[T] | None = None,
        temperature: float | None = None,
        model_settings: dict[str, Any] | None = None,
        max_steps: int = 20,
        max_tokens: int | None = None,
        stop_on_tools: Sequence[str] = (),
        handoffs: Sequence[Agent[Any]] = (),
        input_guardrails: Sequence[Guardrail] = (),
        tool_guardrails: Sequence[Guardrail] = (),
        output_guardrails: Sequence[Guardrail] = (),
        guardrail_retries: int = 1,
        output_retries: int = 1,
        memory: bool = False,
        stream: bool = False,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retry: LLMRetry | None = None,
        compaction: CompactionConfig | None = None,
    ) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"agent name {name!r} must be 1-48 letters, digits, '_' or '-'")
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        self.name = name
        self.provider = provider
        self.model = model
        self.instructions = instructions if instructions is not None else system_prompt
        self.description = (
            description or (self.instructions or f"the {name} agent").split("\n")[0][:200]
        )
        self.tools = [as_tool(t) for t in tools]
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"agent {name!r} has two tools with one name: {names}")
        self.output_type = output_type
        self.temperature = temperature
        self.model_settings = dict(model_settings or {})
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.stop_on_tools = frozenset(stop_on_tools)
        self.handoffs = list(handoffs)
        self.input_guardrails = list(input_guardrails)
        self.tool_guardrails = list(tool_guardrails)
        self.output_guardrails = list(output_guardrails)
        self.guardrail_retries = guardrail_retries
        self.output_retries = output_retries
        self.memory = memory
        self.stream = stream
        normalize_compaction(compaction)  # a bad budget fails here, not in a run
        self.compaction = compaction or CompactionConfig()
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

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, model={self.model!r}, tools={[t.name for t in self.tools]})"

    def with_input(
        self,
        input: str | list[dict[str, Any]],
        *,
        session: str | None = None,
        session_id: str | None = None,
    ) -> AgentRun:
        """This agent with an input (text, or OpenAI-style messages), for agent_invoke_and_wait.

        Agents given the same ``session`` share working memory (``memory=True``); a
        ``session_id`` gives the agent the conversation of that session's earlier turns."""
        return AgentRun(self, input, session, session_id)

    async def run(
        self,
        input: str | list[dict[str, Any]],
        *,
        session: str | None = None,
        session_id: str | None = None,
        settings: Settings | None = None,
    ) -> AgentResult[T]:
        """Run the loop in plain code (not durable). ``settings`` gives NATS for shared memory
        and live streaming; without it neither is available."""
        if settings is None:
            return await _agent_loop(
                StepRunner(), "agent", AgentRun(self, input, session, session_id)
            )

        nc = await connect(settings, name=f"polos-agent-{self.name}")
        try:
            runner = StepRunner(nc, settings.prefix, nc.jetstream(timeout=settings.request_timeout))
            return await _agent_loop(runner, "agent", AgentRun(self, input, session, session_id))
        finally:
            await disconnect(nc)

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
    return msg


def _dumps(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


class _Loop:
    """One agent run: the state the loop rebuilds identically on every replay."""

    def __init__(self, runner: StepRunner, key: str, run: AgentRun) -> None:
        self.runner = runner
        self.key = key
        self.run = run
        self.active: Agent[Any] = run.agent
        self.usage = Usage()
        self.steps: list[AgentStep] = []
        self.llm_n = 0
        self.tool_n = 0
        session = run.session or (session_key(run.session_id) if run.session_id else runner.run_id)
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
        req: dict[str, Any] = {"messages": messages, **agent.model_settings}
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

    # ------------------------------------------------------------------ steps

    async def llm_call(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        agent = self.active
        agent.config.resolved_key()  # a missing key fails here, before any call is made
        self.llm_n += 1
        req = self.request(agent, messages)
        offered = [t["function"]["name"] for t in req.get("tools", [])]
        runner = self.runner

        async def call(step_id: str) -> StepDone:
            on_delta = None
            subject = None
            nc = runner.nc
            if agent.stream and nc is not None and runner.prefix is not None:
                subject = Names(runner.prefix).delta_subject(runner.root_run_id, step_id)
                seq = 0

                async def on_delta(delta: str) -> None:
                    nonlocal seq
                    seq += 1
                    await nc.publish(
                        subject,
                        orjson.dumps(
                            {
                                "run_id": runner.run_id,
                                "step": step_id,
                                "agent": agent.name,
                                "seq": seq,
                                "delta": delta,
                            }
                        ),
                    )

            headers = {"X-Polos-Step": f"{runner.run_id}:{step_id}"}
            limiter = _token_limiter(runner)
            try:
                if limiter is None:
                    outcome = await call_llm(agent.config, req, headers=headers, on_delta=on_delta)
                else:
                    # System-wide token and request limits (polos/_private/limits.py): reserve an
                    # estimate (a long wait suspends the run: it holds no worker meanwhile),
                    # settle with the real usage, and share a 429 with every process.
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
                            agent.config,
                            req,
                            headers=headers,
                            on_delta=on_delta,
                            on_rate_limited=blocked,
                        )
                        reservation.settle(outcome.usage.get("total_tokens", 0))
            except ProviderError as exc:
                raise StepError(
                    exc.error_type, exc.message, {"status": exc.status, "agent": agent.name}
                ) from exc
            if subject is not None and nc is not None:
                await nc.publish(
                    subject,
                    orjson.dumps(
                        {
                            "run_id": runner.run_id,
                            "step": step_id,
                            "agent": agent.name,
                            "done": True,
                            "finish_reason": outcome.finish_reason,
                        }
                    ),
                )
            cost = cost_usd(agent.model, outcome.usage)
            meta = {
                "agent": agent.name,
                "provider": agent.provider,
                "model": agent.model,
                "base_url": agent.config.effective_base_url,
                "messages": messages,
                "tools_offered": offered,
                "usage": outcome.usage,
                "latency_ms": outcome.latency_ms,
                "finish_reason": outcome.finish_reason,
                "cost_usd": cost,
                "temperature": agent.temperature,
                # What was decided, kept with the call: chosen vs the offered tools not
                # chosen, and the model's stated reason (analytics, trace and spans read it).
                "choice": decision_record(outcome.message, offered),
            }
            return StepDone(outcome.message, meta, attempts=outcome.attempts)

        rec = await runner.step(f"{self.key}/llm/{self.llm_n}", "llm", agent.model, call)
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
        return dict(rec.output)

    def tool_key(self, call: dict[str, Any], n: int) -> str:
        return f"{self.key}/tool/{n}/{call.get('name')}"

    async def tool_call(
        self, call: dict[str, Any], decision: str, n: int, verdict: tuple[bool, str | None] | None
    ) -> tuple[Any, AgentStep]:
        agent = self.active
        name = str(call.get("name"))
        arguments = call.get("arguments")
        tool = self.tools_of(agent).get(name)
        key = self.tool_key(call, n)
        approved, reason = verdict if verdict is not None else (None, None)

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
                if approved is False:
                    raise PermissionError(
                        f"a human rejected this call: {reason or 'no reason given'}"
                    )
                for guard in agent.tool_guardrails:
                    rewritten = await _maybe_await(guard(name, args))
                    if rewritten is not None:
                        args = dict(rewritten)
                if args != arguments:
                    meta["rewritten_arguments"] = args
                output = await tool.call(args)
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

    async def approval(self, key: str, tool: Tool, arguments: Any) -> tuple[bool, str | None]:
        exe = self.runner.execution
        if exe is None:
            raise AgentConfigError(
                f"tool {tool.name!r} needs a human's approval, which needs a durable run: "
                "call the agent with ctx.step.agent_invoke_and_wait inside a workflow"
            )
        decision = await waits.suspend(
            exe,
            f"{key}/approval",
            data={"agent": self.active.name, "tool": tool.name, "arguments": arguments},
        )
        data = decision.data or {}
        if not isinstance(data, dict):
            data = {"approved": bool(data)}
        return bool(data.get("approved")), data.get("reason")

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


async def _agent_loop(runner: StepRunner, key: str, run: AgentRun) -> AgentResult[Any]:
    loop = _Loop(runner, key, run)
    agent = run.agent
    agent.config.resolved_key()
    convo = _input_messages(run.input)
    # Sessions (sessions.py): the earlier turns go before the input; the turn is recorded at
    # the end (``result``). Both are durable steps of this run.
    session = await open_session(runner, key, agent, session_of(runner, run.session_id), convo)
    convo = session.history + convo
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
    output_tries = 0
    guard_tries = 0
    last_text: str | None = None

    async def result(
        value: Any, text: str | None, reason: str, messages: list[dict[str, Any]]
    ) -> AgentResult[Any]:
        await session.record(convo)
        run_id = runner.run_id if runner.execution is not None else None
        return AgentResult(
            value, text, loop.active.name, loop.usage, loop.steps, reason, messages, run_id
        )

    while True:
        active = loop.active
        messages = active.system_message() + convo
        if loop.llm_n >= active.max_steps:
            return await result(None, last_text, "max_steps", messages)
        out = await loop.llm_call(messages)
        decision = loop.steps[-1].key
        convo.append(_assistant_message(out))
        last_text = out.get("content")
        calls = out.get("tool_calls") or []
        if calls:
            if active.max_tokens is not None and loop.usage.total_tokens >= active.max_tokens:
                return await result(None, last_text, "max_tokens", active.system_message() + convo)
            handoffs = {handoff_tool_name(h): h for h in active.handoffs}
            numbered = []
            for c in calls:
                loop.tool_n += 1
                numbered.append((loop.tool_n, c))
            regular = [(n, c) for n, c in numbered if c.get("name") not in handoffs]
            # Parallel tool calls run concurrently; their step keys are fixed by position, so
            # a replay finds each one whatever order they finished in.
            # Approvals come first, one by one: a suspend stops the loop before any tool of
            # this turn has run, and the resumed run replays the decisions in order.
            verdicts: dict[int, tuple[bool, str | None]] = {}
            for n, c in regular:
                gated = loop.tools_of(active).get(str(c.get("name")))
                if gated is not None and gated.approval:
                    verdicts[n] = await loop.approval(
                        loop.tool_key(c, n), gated, c.get("arguments")
                    )
            outs = await asyncio.gather(
                *(loop.tool_call(c, decision, n, verdicts.get(n)) for n, c in regular)
            )
            by_id = {c.get("id"): o for (_, c), o in zip(regular, outs, strict=True)}
            loop.steps.extend(step for _, step in outs)
            loop.usage.tool_calls += len(outs)
            target: Agent[Any] | None = None
            for n, c in numbered:
                if c.get("name") in handoffs and target is None:
                    target = handoffs[str(c.get("name"))]
                    await loop.handoff(c, decision, n, target)
                    content = _dumps({"transferred_to": target.name})
                elif c.get("name") in handoffs:
                    content = _dumps({"error": "only one handoff per turn"})
                else:
                    content = _dumps(by_id[c.get("id")][0])
                convo.append({"role": "tool", "tool_call_id": c.get("id"), "content": content})
            stopped = [
                (c, by_id[c.get("id")][0])
                for _, c in regular
                if c.get("name") in active.stop_on_tools
            ]
            if stopped:
                return await result(
                    stopped[0][1], last_text, "tool_called", active.system_message() + convo
                )
            continue
        # A final answer.
        text = out.get("content")
        value: Any = text
        if active.output_type is not None and active.output_type is not str:
            try:
                value = pydantic.TypeAdapter(active.output_type).validate_json(text or "")
            except pydantic.ValidationError as exc:
                if output_tries >= active.output_retries:
                    raise AgentOutputError(
                        f"agent {active.name!r}: the answer does not match "
                        f"{getattr(active.output_type, '__name__', active.output_type)}: {exc}"
                    ) from exc
                output_tries += 1
                convo.append(
                    {
                        "role": "user",
                        "content": "Your answer is not valid JSON for the required schema "
                        f"({exc.error_count()} errors: {_short_errors(exc)}). "
                        "Answer again with only the JSON object.",
                    }
                )
                continue
        try:
            for guard in active.output_guardrails:
                rewritten = await _maybe_await(guard(value))
                if rewritten is not None:
                    value = rewritten
        except GuardrailViolation as exc:
            if guard_tries >= active.guardrail_retries:
                raise AgentGuardrailError(f"agent {active.name!r}: output rejected: {exc}") from exc
            guard_tries += 1
            convo.append(
                {"role": "user", "content": f"Your answer was rejected: {exc}. Try again."}
            )
            continue
        return await result(value, text, "completed", active.system_message() + convo)


def _short_errors(exc: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())) or '(root)'}: {e.get('msg')}"
        for e in exc.errors()[:5]
    )


async def run_agent_in_execution(
    execution: RunExecution, key: str, run: AgentRun
) -> AgentResult[Any]:
    """Run an agent's loop in a run's own history under ``key`` (LLM and tool calls as steps)."""
    if not isinstance(run, AgentRun):
        raise TypeError(
            f"agent_invoke_and_wait({key!r}, ...) needs agent.with_input(...), got {type(run).__name__}"
        )
    base = execution.step_id(key, "agent")
    return await _agent_loop(DurableRunner(execution), base, run)


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


@workflow(name="polos_agent")
async def agent_workflow(ctx: WorkflowContext, req: AgentRequest) -> dict[str, Any]:
    """Run a named agent as a run of its own (its own history). Serve it from any worker
    whose module defines (or imports) the agent."""
    agent = get_agent(req.agent)
    result = await run_agent_in_execution(
        ctx._x, req.key, AgentRun(agent, req.input, req.session, req.session_id)
    )
    return result.to_json()


async def invoke_agent(
    execution: RunExecution, key: str, run: AgentRun, *, inline: bool = False
) -> AgentResult[Any]:
    """``ctx.step.agent_invoke_and_wait``: the agent as a child run (the ``polos_agent``
    workflow; the parent waits holding no worker), or ``inline`` in the parent's history."""
    if inline:
        return await run_agent_in_execution(execution, key, run)
    if not isinstance(run, AgentRun):
        raise TypeError(
            f"agent_invoke_and_wait({key!r}, ...) needs agent.with_input(...), got {type(run).__name__}"
        )
    get_agent(run.agent.name)  # two agents under one name would make the child run the wrong one
    if not execution.is_replaying:
        await _warn_if_unserved(execution)

    # Agents started by one run share working memory unless told otherwise.
    request = AgentRequest(
        agent=run.agent.name,
        input=run.input,
        session=run.session
        or (session_key(run.session_id) if run.session_id else None)
        or execution.run_id,
        session_id=run.session_id,
        key=key,
    )
    output = await waits.invoke_and_wait(execution, key, agent_workflow, request)
    result = AgentResult.from_json(output)
    final = _AGENTS.get(result.agent, run.agent)
    if (
        final.output_type is not None
        and result.result is not None
        and result.stop_reason == "completed"
    ):
        result.result = from_json(result.result, final.output_type)
    return result


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

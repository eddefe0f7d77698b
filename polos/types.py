"""The data an agent run produces and hooks, guardrails and stop conditions see.

The names and fields are the original Polos SDK's (``polos.types``): ``AgentResult``,
``Step``, ``ToolCall``, ``ToolCallFunction``, ``ToolResult``, ``Usage``, ``AgentConfig``.
``AgentResult`` and ``Usage`` keep Polos's own fields beside them (``run_id``, ``text``,
``steps``, ``stop_reason``; ``prompt_tokens``, ``cost_usd``, ``llm_calls``...): the original's
names are properties or fields of the same objects, so there is one result type, not two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from polos.converter import from_json, to_json

T = TypeVar("T")


@dataclass
class Usage:
    """Tokens and dollars over every LLM call of an agent run (cost None if a model has no
    price). ``input_tokens`` / ``output_tokens`` / ``cache_read_input_tokens`` are the
    original's names for ``prompt_tokens`` / ``completion_tokens`` / ``cached_tokens``."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = 0.0
    llm_calls: int = 0
    tool_calls: int = 0

    @property
    def input_tokens(self) -> int:
        return self.prompt_tokens

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens

    @property
    def cache_read_input_tokens(self) -> int | None:
        return self.cached_tokens or None

    @property
    def cache_creation_input_tokens(self) -> int | None:
        return None  # OpenAI-compatible providers do not report it

    def add(self, usage: dict[str, Any], cost: float | None) -> None:
        self.prompt_tokens += int(usage.get("prompt_tokens", 0) or 0)
        self.completion_tokens += int(usage.get("completion_tokens", 0) or 0)
        self.cached_tokens += int(usage.get("cached_tokens", 0) or 0)
        self.total_tokens += int(usage.get("total_tokens", 0) or 0)
        self.cost_usd = (
            None if cost is None or self.cost_usd is None else round(self.cost_usd + cost, 10)
        )
        self.llm_calls += 1


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as the model sent it


class ToolCall(BaseModel):
    """One tool call an LLM answer asked for (guardrails may edit or drop them)."""

    id: str
    type: str = "function"
    function: ToolCallFunction
    call_id: str | None = None


class ToolResult(BaseModel):
    """One tool call's outcome. ``status`` is ``"completed"`` or ``"failed"`` (then ``error``
    says why; ``result`` is what the model was told)."""

    tool_name: str
    status: str
    result: Any | None = None
    result_schema: str | None = None
    error: str | None = None
    tool_call_id: str
    tool_call_call_id: str


class Step(BaseModel):
    """One agent step: an LLM call and the tool calls it made. ``step`` counts from 1."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    step: int
    content: Any | None = None
    tool_calls: list[ToolCall] = []
    tool_results: list[ToolResult] = []
    usage: Usage | None = None
    raw_output: Any | None = None


class AgentConfig(BaseModel):
    """An agent's LLM configuration, as hooks and guardrails see it."""

    name: str
    provider: str
    model: str
    tools: list[dict[str, Any]] = []
    system_prompt: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    provider_base_url: str | None = None
    provider_llm_api: str | None = None
    provider_kwargs: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    output_schema_name: str | None = None
    guardrail_max_retries: int | None = None


@dataclass
class AgentStep:
    """One recorded step of an agent run: an LLM call (``kind="llm"``) or a tool call
    (``kind="tool"``), with the key it is recorded under."""

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
    """What an agent run produced. ``result`` is typed by ``output_schema`` (else the final
    text). ``stop_reason``: completed, max_steps, max_tokens, tool_called, or the name of the
    stop condition that ended the run (``executed_tool``, ``has_text``, a custom one).

    The original's fields: ``agent_run_id`` (= ``run_id``), ``result``, ``result_schema``,
    ``tool_results``, ``total_steps``, ``usage``."""

    result: T | None
    text: str | None
    agent: str
    usage: Usage
    steps: list[AgentStep]
    stop_reason: str = "completed"
    messages: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None  # the run whose history holds the steps (the child run)
    tool_results: list[ToolResult] = field(default_factory=list)
    total_steps: int = 0
    result_schema: str | None = None

    @property
    def agent_run_id(self) -> str | None:
        return self.run_id

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
            "tool_results": to_json(self.tool_results, what="tool results"),
            "total_steps": self.total_steps,
            "result_schema": self.result_schema,
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
            tool_results=[ToolResult.model_validate(t) for t in data.get("tool_results") or []],
            total_steps=int(data.get("total_steps") or 0),
            result_schema=data.get("result_schema"),
        )


__all__ = [
    "AgentConfig",
    "AgentResult",
    "AgentStep",
    "Step",
    "ToolCall",
    "ToolCallFunction",
    "ToolResult",
    "Usage",
]

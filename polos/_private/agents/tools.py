"""Tools an agent can call, and the one interface between the agent loop and them.

Two shapes of tool function, both described to the model by JSON schema:

- **Workflow-style** (the original Polos's): ``async def f(ctx: WorkflowContext, input: Model)``
  or ``async def f(ctx: WorkflowContext)``. The model sees ``Model.model_json_schema()`` itself
  (not nested under ``input``); ``ctx.step`` works inside (its steps are recorded under the tool
  call's step, so they replay like the agent's own), and so does ``ctx.step.suspend`` (the run
  waits for a human holding no worker).
- **Plain functions**: ``def f(sku: str, quantity: int = 1)``; the schema comes from the type
  hints and the docstring (``Args:`` or ``:param x:`` lines describe the parameters). A function
  whose only parameter is a pydantic model is described by that model's schema, like the above.

``@tool(id=, description=, parameters=, on_start=, on_end=, approval="always")`` (``name`` is
an alias of ``id``). ``approval="always"`` suspends the run before each call until a human
approves it (the UI's approval page, ``polos resume``, or ``client.resume``).

The loop uses exactly two things (see docs/agents.md, "Tools"):

- ``tool.definition()`` (``{"type": "function", "name", "description", "parameters"}``) or
  ``tool.openai_schema()`` (the Chat Completions shape) to describe the tool to the model;
- ``await tool.call(arguments, ToolScope(execution, step_id, ...))`` inside the tool call's
  step: it returns the JSON result, or raises (the loop hands the error to the model).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import re
import typing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

import pydantic

from polos._private.agents.provider import AgentConfigError
from polos._private.model.values import Queue, WorkflowDefinition
from polos._private.run import waits
from polos._private.run.definitions import _type_hints, workflow
from polos._private.run.execution import step_scope
from polos._private.run.hooks import run_hooks
from polos.converter import to_json
from polos.middleware.hook import HookContext, check_hooks

if TYPE_CHECKING:
    from polos._private.run.execution import RunExecution

_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ToolApproval = Literal["always", "none"]

# The context a workflow-style tool receives. polos.workflow (a layer above this one) registers
# WorkflowContext here when it is imported, which every process running workflows does.
_context_factory: Callable[[RunExecution], Any] | None = None


def set_context_factory(factory: Callable[[RunExecution], Any]) -> None:
    global _context_factory
    _context_factory = factory


@dataclass(frozen=True)
class ToolScope:
    """Where a tool call runs: the run's execution (None in plain code, ``Agent.run`` without a
    workflow) and the step the loop records the call under; the tool's own steps (hooks,
    approval, ``ctx.step`` calls) are recorded as ``<step_id>/<key>``."""

    execution: RunExecution | None
    step_id: str
    agent: str | None = None
    session_id: str | None = None
    user_id: str | None = None


_current_scope: contextvars.ContextVar[ToolScope | None] = contextvars.ContextVar(
    "polos_tool_scope", default=None
)


def current_tool_scope() -> ToolScope | None:
    """Inside a tool call: where it runs (the agent, the session, the step)."""
    return _current_scope.get()


class ToolRejectedError(RuntimeError):
    """A human rejected the tool call (the model gets this message as the tool's error)."""


def _doc_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The description and per-parameter descriptions from a Google or Sphinx style docstring."""
    doc = inspect.getdoc(fn) or ""
    params: dict[str, str] = {}
    desc_lines: list[str] = []
    in_args = False
    current: str | None = None
    for line in doc.splitlines():
        stripped = line.strip()
        sphinx = re.match(r":param\s+(?:\w+\s+)?(\w+):\s*(.*)", stripped)
        if sphinx:
            params[sphinx.group(1)] = sphinx.group(2).strip()
            current, in_args = sphinx.group(1), False
            continue
        if stripped.lower() in {"args:", "arguments:", "parameters:"}:
            in_args, current = True, None
            continue
        if stripped.lower() in {"returns:", "raises:", "yields:", "examples:", "example:"} or (
            stripped.startswith(":") and not sphinx
        ):
            in_args, current = False, None
            continue
        if in_args:
            m = re.match(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", stripped)
            if m and line.startswith((" ", "\t")) and len(line) - len(line.lstrip()) <= 8:
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif current and stripped:
                params[current] = f"{params[current]} {stripped}".strip()
            continue
        if current and stripped and not in_args:
            params[current] = f"{params[current]} {stripped}".strip()
            continue
        desc_lines.append(line)
    description = "\n".join(desc_lines).strip().split("\n\n")[0].strip()
    return description, params


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def _is_context(param: inspect.Parameter, hint: Any) -> bool:
    """The first parameter of a workflow-style tool: annotated ``WorkflowContext`` (the class or
    a string naming it), or untyped and named ``ctx``."""
    if hint is inspect.Parameter.empty or hint is None:
        return param.name in ("ctx", "context")
    if isinstance(hint, str):
        return hint.split(".")[-1] == "WorkflowContext"
    return getattr(hint, "__name__", None) == "WorkflowContext"


def _model_schema(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    return schema


def _approval(value: Any, where: str) -> ToolApproval | None:
    if value is True:
        return "always"
    if value is None or value is False:
        return None
    if value in ("always", "none"):
        return typing.cast(ToolApproval, value)
    raise ValueError(f"{where}: approval must be 'always' or 'none', got {value!r}")


@dataclass(eq=False)
class Tool:
    """A function the model can call. Build one with ``@tool`` or ``Tool.from_function``.

    ``name`` is the tool's id (``.id`` reads it too): what the model calls it by."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any] | None = None
    approval: ToolApproval | None = None
    args_model: type[pydantic.BaseModel] | None = field(default=None, repr=False)
    # The pydantic model the function takes whole (workflow-style tools, or a plain function
    # whose only parameter is a model): the model's arguments are validated into it.
    input_model: type[pydantic.BaseModel] | None = field(default=None, repr=False)
    takes_context: bool = False
    on_start: list[Callable[..., Any]] = field(default_factory=list, repr=False)
    on_end: list[Callable[..., Any]] = field(default_factory=list, repr=False)
    # A queued tool runs as a child run of its own workflow (``polos_tool_<id>``) on this queue:
    # the agent's run waits holding no worker until the queue admits the call and it completes.
    queue: Queue | str | dict[str, Any] | None = field(default=None, repr=False)
    workflow: WorkflowDefinition[Any, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not _TOOL_NAME_RE.match(self.name):
            raise ValueError(
                f"tool name (id) {self.name!r} must be 1-64 letters, digits, '_' or '-' (OpenAI's rule)"
            )
        self.approval = _approval(self.approval, f"tool {self.name!r}")
        self.on_start = check_hooks(self.on_start or None, where=f"tool {self.name!r} on_start")
        self.on_end = check_hooks(self.on_end or None, where=f"tool {self.name!r} on_end")
        if self.queue is not None:
            self.queue = _queue(self.queue, self.name)
            self.workflow = _tool_workflow(self)

    @property
    def id(self) -> str:
        return self.name

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        id: str | None = None,
        description: str | None = None,
        parameters: dict[str, Any] | None = None,
        approval: ToolApproval | bool | None = None,
        on_start: Any = None,
        on_end: Any = None,
        queue: Queue | str | dict[str, Any] | None = None,
    ) -> Tool:
        if name is not None and id is not None and name != id:
            raise ValueError(f"tool: name={name!r} and id={id!r} disagree (name is an alias of id)")
        tool_id = id or name or getattr(fn, "__name__", None) or ""
        if not callable(fn):
            raise TypeError(f"a tool needs a function, got {fn!r}")
        if parameters is not None and not (
            isinstance(parameters, dict) and parameters.get("type") == "object"
        ):
            raise ValueError(
                f"tool {tool_id!r}: parameters must be a JSON schema object "
                "({'type': 'object', 'properties': {...}})"
            )
        doc_desc, param_docs = _doc_parts(fn)
        hints = _type_hints(fn)
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        common: dict[str, Any] = {
            "name": tool_id,
            "description": (description or doc_desc or tool_id).strip(),
            "fn": fn,
            "approval": approval,
            "on_start": check_hooks(on_start, where=f"tool {tool_id!r} on_start"),
            "on_end": check_hooks(on_end, where=f"tool {tool_id!r} on_end"),
            "queue": queue,
        }
        if params and _is_context(params[0], hints.get(params[0].name, inspect.Parameter.empty)):
            if len(params) > 2:
                raise TypeError(
                    f"tool {tool_id!r} takes (ctx) or (ctx, input: SomeModel), got "
                    f"{len(params)} parameters"
                )
            model = hints.get(params[1].name) if len(params) == 2 else None
            if len(params) == 2 and not _is_model(model):
                raise TypeError(
                    f"tool {tool_id!r}: the input parameter {params[1].name!r} must be annotated "
                    f"with a pydantic BaseModel subclass, got {model!r}"
                )
            return cls(
                parameters=parameters
                or (_model_schema(model) if model else {"type": "object", "properties": {}}),
                input_model=model,
                takes_context=True,
                **common,
            )
        if len(params) == 1 and _is_model(hints.get(params[0].name)):
            model = hints[params[0].name]
            return cls(parameters=parameters or _model_schema(model), input_model=model, **common)
        fields: dict[str, Any] = {}
        for p in params:
            ann = hints.get(p.name, Any)
            default = ... if p.default is p.empty else p.default
            fields[p.name] = (ann, pydantic.Field(default, description=param_docs.get(p.name)))
        args_model = pydantic.create_model(f"{tool_id}_args", **fields)
        schema = args_model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        schema.setdefault("properties", {})
        return cls(parameters=parameters or schema, args_model=args_model, **common)

    # ------------------------------------------------------------------ what the model sees

    def definition(self) -> dict[str, Any]:
        """The tool as the model sees it, provider-neutral (the OpenAI Responses shape)."""
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }

    def openai_schema(self) -> dict[str, Any]:
        """The Chat Completions shape of ``definition()``."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    to_llm_tool_definition = openai_schema  # the original's name

    # ------------------------------------------------------------------ the call

    @property
    def needs_run(self) -> bool:
        """Whether a call needs a durable run (a context, an approval, hooks)."""
        return bool(self.takes_context or self.approval == "always" or self.on_start or self.on_end)

    async def call(self, arguments: dict[str, Any], scope: ToolScope | None = None) -> Any:
        """Validate the model's arguments, run the tool inside ``scope`` (hooks, approval, the
        function; sync functions in a thread) and return its result as JSON. Raises what the
        function raises, a ``ValueError`` for arguments that do not validate, or
        ``ToolRejectedError`` when a human said no. A suspend (an approval, ``ask_user``)
        propagates: the run waits, and the replayed call finds the answer."""
        exe = scope.execution if scope is not None else None
        if exe is None or scope is None:
            if self.needs_run:
                raise AgentConfigError(
                    f"tool {self.name!r} needs a durable run (it takes a WorkflowContext, needs "
                    "approval or has hooks): run the agent in a workflow "
                    "(ctx.step.agent_invoke_and_wait)"
                )
            return await self._execute(None, arguments)
        token = _current_scope.set(scope)
        try:
            async with _tool_step(exe, scope.step_id):
                if self.workflow is not None:
                    self._validate(arguments)  # bad arguments fail here, before a child starts
                    request = {
                        "arguments": arguments,
                        "agent": scope.agent,
                        "session_id": scope.session_id,
                        "user_id": scope.user_id,
                    }
                    return await waits.invoke_and_wait(exe, "queued", self.workflow, request)
                return await self._durable_call(exe, scope, arguments)
        finally:
            _current_scope.reset(token)

    async def _durable_call(
        self, exe: RunExecution, scope: ToolScope, arguments: dict[str, Any]
    ) -> Any:
        ctx = _context_factory(exe) if _context_factory is not None else None
        self._validate(arguments)  # bad arguments fail before any hook or approval
        if self.on_start:
            decided = await run_hooks(
                exe, ctx, "on_start", self.on_start, self._hook_context(scope, arguments)
            )
            if decided.modified_payload is not None:
                arguments = {**arguments, **decided.modified_payload}
        if self.approval == "always":
            await approve(exe, self.name, arguments, agent=scope.agent)
        output = await self._execute(ctx, arguments)
        if self.on_end:
            decided = await run_hooks(
                exe,
                ctx,
                "on_end",
                self.on_end,
                self._hook_context(scope, arguments, output),
            )
            if decided.modified_output is not None:
                output = to_json(decided.modified_output, what=f"tool {self.name!r} on_end output")
        return output

    def _hook_context(
        self, scope: ToolScope, arguments: dict[str, Any], output: Any = None
    ) -> HookContext:
        return HookContext(
            workflow_id=self.name,
            session_id=scope.session_id,
            user_id=scope.user_id,
            current_tool=self.name,
            current_payload=arguments,
            current_output=output,
        )

    def _validate(self, arguments: dict[str, Any]) -> Any:
        model = self.input_model or self.args_model
        if model is None:
            return arguments
        try:
            return model.model_validate(arguments)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', ())) or '(root)'}: {e.get('msg')}"
                for e in exc.errors()[:5]
            )
            raise ValueError(
                f"invalid arguments for tool {self.name!r}: {problems} (got {arguments!r})"
            ) from None

    async def _execute(self, ctx: Any, arguments: dict[str, Any]) -> Any:
        """Run the function with validated arguments; its result as JSON."""
        if self.fn is None:
            raise NotImplementedError(f"tool {self.name!r} has no function")
        parsed = self._validate(arguments)
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}
        if self.takes_context:
            args = (ctx, parsed) if self.input_model is not None else (ctx,)
        elif self.input_model is not None:
            args = (parsed,)
        elif self.args_model is not None:
            kwargs = {k: getattr(parsed, k) for k in type(parsed).model_fields}
        else:
            kwargs = dict(arguments)
        if inspect.iscoroutinefunction(self.fn):
            result = await self.fn(*args, **kwargs)
        else:
            result = await asyncio.to_thread(self.fn, *args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        return to_json(result, what=f"the result of tool {self.name!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling a tool calls its function, so decorated functions stay usable."""
        if self.fn is None:
            raise TypeError(f"tool {self.name!r} has no function to call")
        return self.fn(*args, **kwargs)


@contextlib.asynccontextmanager
async def _tool_step(exe: RunExecution, step_id: str) -> AsyncIterator[None]:
    """Inside a tool call: its steps are keyed under ``step_id``, and the run counts it as a step
    running user code, so a sibling's suspend lets it finish and record first."""
    token = step_scope.set(step_id)
    exe.inflight += 1
    exe._idle.clear()
    try:
        yield
    finally:
        step_scope.reset(token)
        exe.inflight -= 1
        if exe.inflight == 0:
            exe._idle.set()


def _approval_fields() -> list[dict[str, Any]]:
    return [
        {
            "key": "approved",
            "type": "boolean",
            "label": "Approve this tool call?",
            "required": True,
            "default": False,
        },
        {
            "key": "feedback",
            "type": "textarea",
            "label": "Feedback for the agent (optional)",
            "description": "If rejecting, tell the agent what to do instead.",
            "required": False,
        },
    ]


def decision(data: Any) -> tuple[bool, str | None]:
    """A resume's answer to an approval: ``{"approved": bool, "feedback"?: str}`` (``reason``
    is read too; a bare true/false is the decision itself)."""
    if not isinstance(data, dict):
        return data is True, None
    feedback = data.get("feedback") or data.get("reason")
    return data.get("approved") is True, str(feedback) if feedback else None


async def approve(
    exe: RunExecution, tool_id: str, arguments: Any, *, agent: str | None = None
) -> None:
    """Suspend (key ``approval`` in the tool call's scope) until a human decides; raise
    ``ToolRejectedError`` with their feedback when they reject."""
    resumed = await waits.suspend(
        exe,
        "approval",
        {
            "_form": {
                "title": f"Approve tool: {tool_id}",
                "description": f'The agent wants to use the "{tool_id}" tool.',
                "fields": _approval_fields(),
                "context": {"tool": tool_id, "input": arguments},
            },
            "_source": "tool_approval",
            "_tool": tool_id,
            "agent": agent,
        },
    )
    approved, feedback = decision(resumed.data)
    if not approved:
        raise ToolRejectedError(
            f'Tool "{tool_id}" was rejected by the user.'
            + (f" Feedback: {feedback}" if feedback else "")
        )


def _queue(value: Any, tool_id: str) -> Queue | str:
    if isinstance(value, Queue | str):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"name", "concurrency_limit", "concurrency"}
        if unknown or not isinstance(value.get("name"), str):
            raise ValueError(
                f"tool {tool_id!r}: a queue dict is {{'name': str, 'concurrency_limit': int}}, "
                f"got {value!r}"
            )
        return Queue(
            value["name"], concurrency=value.get("concurrency_limit") or value.get("concurrency")
        )
    raise TypeError(f"tool {tool_id!r}: queue must be a name, a Queue or a dict, got {value!r}")


def _tool_workflow(tool: Tool) -> WorkflowDefinition[Any, Any]:
    """The workflow a queued tool's calls run as (serve it: a worker loading the module that
    defines the tool serves it)."""

    async def run_tool(ctx: Any, request: dict[str, Any]) -> Any:
        exe: RunExecution = ctx._x
        scope = ToolScope(
            exe,
            "",
            agent=request.get("agent"),
            session_id=request.get("session_id"),
            user_id=request.get("user_id"),
        )
        token = _current_scope.set(scope)
        try:
            return await tool._durable_call(exe, scope, dict(request.get("arguments") or {}))
        finally:
            _current_scope.reset(token)

    run_tool.__name__ = run_tool.__qualname__ = f"polos_tool_{tool.name}"
    queue = tool.queue if isinstance(tool.queue, Queue | str) else None
    return workflow(name=f"polos_tool_{tool.name}", queue=queue)(run_tool)


def as_tool(obj: Tool | Callable[..., Any]) -> Tool:
    """A ``Tool`` for a tool or a plain function."""
    if isinstance(obj, Tool):
        return obj
    if callable(obj):
        return Tool.from_function(obj)
    raise TypeError(f"a tool must be a function or a polos.tools.Tool, got {obj!r}")


_OPTIONS = ("id", "name", "description", "parameters", "queue", "on_start", "on_end", "approval")


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *,
    id: str | None = None,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
    queue: Queue | str | dict[str, Any] | None = None,
    on_start: Any = None,
    on_end: Any = None,
    approval: ToolApproval | bool | None = None,
    **options: Any,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    id: str | None = None,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
    queue: Queue | str | dict[str, Any] | None = None,
    on_start: Any = None,
    on_end: Any = None,
    approval: ToolApproval | bool | None = None,
    **options: Any,
) -> Any:
    """Declare a tool: ``@tool`` bare, or ``@tool(id=..., description=..., parameters=...,
    on_start=..., on_end=..., approval="always")``; ``name`` is an alias of ``id``.

    ``approval="always"`` suspends the run before each call until a human approves it."""
    if options:
        raise TypeError(
            f"@tool got unknown option(s) {', '.join(sorted(options))}; "
            f"it accepts {', '.join(_OPTIONS)}"
        )
    if fn is not None:
        return Tool.from_function(fn)

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(
            f,
            id=id,
            name=name,
            description=description,
            parameters=parameters,
            approval=approval,
            on_start=on_start,
            on_end=on_end,
            queue=queue,
        )

    return wrap


__all__ = [
    "Tool",
    "ToolApproval",
    "ToolRejectedError",
    "ToolScope",
    "approve",
    "as_tool",
    "current_tool_scope",
    "decision",
    "set_context_factory",
    "tool",
]

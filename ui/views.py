"""What the pages show, built from the log: a run's timeline, an agent's trace, forms.

Nothing here renders HTML: it builds plain data for the templates, which escape everything
(Jinja2 autoescape), so a run's input or output of ``<script>...`` is shown as text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from polos import history as ev

from .source import LLMTotals, RawEvent, children_named, decision_of

INLINE_LIMIT = 64 * 1024  # a payload shown in the page up to this size; bigger ones on demand


# --------------------------------------------------------------------------- values


def pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()


def compact(value: Any, limit: int = 120) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def ts(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def ms(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    return ms(max(0.0, now - t)) + " ago"


@dataclass
class Payload:
    """A value to show: inline (pretty JSON, up to ``INLINE_LIMIT``), or a reference to an
    Object Store object fetched when asked for."""

    label: str
    text: str | None = None
    ref: str | None = None  # object name
    truncated: bool = False
    size: int = 0
    empty: bool = False


def payload(label: str, value: Any, refs: dict[str, str], fld: str) -> Payload:
    ref = refs.get(fld)
    if ref is not None:
        return Payload(label, ref=ref)
    if value is None:
        members = {k: v for k, v in refs.items() if k.startswith(fld + ".")}
        if not members:
            return Payload(label, text="null", empty=True)
    text = pretty(value)
    members = {k[len(fld) + 1 :]: v for k, v in refs.items() if k.startswith(fld + ".")}
    if members:
        text += "\n// in the object store: " + ", ".join(sorted(members))
        first = sorted(members.items())[0][1]
        return Payload(label, text=text, ref=first, size=len(text))
    if len(text) > INLINE_LIMIT:
        return Payload(label, text=text[:INLINE_LIMIT], truncated=True, size=len(text))
    return Payload(label, text=text, size=len(text))


# --------------------------------------------------------------------------- timeline


@dataclass
class Item:
    """One line of a run's timeline."""

    seq: int
    at: float
    offset: float
    kind: str  # css class: claim, step, llm, tool, retry, fail, wait, wake, end-ok, end-fail...
    title: str
    detail: str = ""
    key: str | None = None
    duration: float | None = None
    payloads: list[Payload] = field(default_factory=list)
    error: dict[str, Any] | None = None
    children: list[str] = field(default_factory=list)
    approve: str | None = None  # the step key of a suspend still waiting
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunView:
    run_id: str
    state: ev.RunState
    requested: ev.RunRequested | None
    items: list[Item]
    input: Payload | None
    output: Payload | None
    error: dict[str, Any] | None
    children: list[str]
    totals: LLMTotals
    started_at: float | None
    ended_at: float | None
    is_agent: bool
    waiting_key: str | None
    requested_refs: dict[str, str]


def build_run(run_id: str, history: list[RawEvent]) -> RunView:
    state = ev.RunState(run_id=run_id)
    for r in history:
        state.apply(r.seq, r.event)
    t0 = history[0].event.at if history else 0.0
    items: list[Item] = []
    suspended_at: dict[str, float] = {}
    children: list[str] = []
    totals = LLMTotals()
    requested = None
    requested_refs: dict[str, str] = {}
    inp = out = None
    ended_at = None
    is_agent = False
    for r in history:
        e, seq = r.event, r.seq
        off = e.at - t0
        named = [c for c in children_named(e) if c not in children]
        children.extend(named)
        it: Item | None = None
        if isinstance(e, ev.RunRequested):
            requested, requested_refs = e, r.refs
            inp = payload("input", e.input, r.refs, "input")
            src = f"from {e.source}" + (f", parent {e.parent_run_id}" if e.parent_run_id else "")
            queue = f" queue {e.queue}" if e.queue else ""
            key = f" key {e.concurrency_key}" if e.concurrency_key else ""
            it = Item(seq, e.at, off, "request", f"requested {e.workflow}", f"{src}{queue}{key}")
        elif isinstance(e, ev.RunClaimed):
            it = Item(seq, e.at, off, "claim", f"claimed by {e.worker_id}", f"attempt {e.attempt}")
        elif isinstance(e, ev.StepCompleted):
            it = _step_item(r, off)
            if e.kind == "llm":
                totals.add_step(e.meta)
                is_agent = True
            elif e.kind == "tool":
                is_agent = True
        elif isinstance(e, ev.StepAttemptFailed):
            it = Item(
                seq,
                e.at,
                off,
                "retry",
                f"{e.key}: attempt {e.attempt} failed",
                f"retry in {e.retry_in:g} s",
                key=e.key,
                error=e.error,
            )
        elif isinstance(e, ev.StepFailed):
            it = Item(
                seq,
                e.at,
                off,
                "fail",
                f"{e.key}: failed after {e.attempts} attempt(s)",
                key=e.key,
                error=e.error,
            )
        elif isinstance(e, ev.RunSuspended):
            suspended_at[e.step] = e.at
            bits = []
            if e.topic:
                bits.append(f"topic {e.topic}")
            if e.wake_at:
                bits.append(f"until {ts(e.wake_at)}")
            if e.timeout_at:
                bits.append(f"timeout {ts(e.timeout_at)}")
            if e.children:
                bits.append(f"{len(e.children)} child run(s)")
            it = Item(
                seq,
                e.at,
                off,
                "wait",
                f"waits for {_wait_what(e.kind)} at {e.step}",
                ", ".join(bits),
                key=e.step,
            )
            if e.data is not None or "data" in r.refs:
                it.payloads.append(payload("data", e.data, r.refs, "data"))
        elif isinstance(e, ev.RunWoken):
            waited = e.at - suspended_at.get(e.step, e.at)
            if isinstance(e, ev.RunAdmitted):
                title = f"admitted to queue {e.queue}"
                detail = f"after {ms(waited)}" + (
                    f", key {e.concurrency_key}" if e.concurrency_key else ""
                )
            else:
                title = f"woken at {e.step} by {e.reason}"
                detail = f"after {ms(waited)}"
            it = Item(seq, e.at, off, "wake", title, detail, key=e.step, duration=waited)
            if e.output is not None or "output" in r.refs:
                it.payloads.append(payload("outcome", e.output, r.refs, "output"))
        elif isinstance(e, ev.RunCompleted):
            out = payload("output", e.output, r.refs, "output")
            ended_at = e.at
            it = Item(seq, e.at, off, "end-ok", "completed", f"in {ms(e.at - t0)}")
        elif isinstance(e, ev.RunFailed):
            ended_at = e.at
            it = Item(seq, e.at, off, "end-fail", "failed", f"in {ms(e.at - t0)}", error=e.error)
        elif isinstance(e, ev.RunCancelled):
            ended_at = e.at
            it = Item(seq, e.at, off, "end-fail", "cancelled", e.reason or "")
        if it is not None:
            it.children = named
            items.append(it)
    waiting_key = None
    if (
        state.status == "suspended"
        and state.suspended is not None
        and state.suspended.kind == "suspend"
    ):
        waiting_key = state.suspended.step
        for it in reversed(items):
            if it.kind == "wait" and it.key == waiting_key:
                it.approve = waiting_key
                break
    return RunView(
        run_id=run_id,
        state=state,
        requested=requested,
        items=items,
        input=inp,
        output=out,
        error=state.error,
        children=children,
        totals=totals,
        started_at=t0 if history else None,
        ended_at=ended_at,
        is_agent=is_agent,
        waiting_key=waiting_key,
        requested_refs=requested_refs,
    )


def _wait_what(kind: str) -> str:
    return {
        "suspend": "a human (suspend)",
        "event": "an event",
        "sleep": "a timer",
        "child": "child runs",
        "retry": "a retry back-off",
        "slot": "a concurrency slot",
        "rate": "a rate limit",
    }.get(kind, kind)


def _step_item(r: RawEvent, off: float) -> Item:
    e = r.event
    assert isinstance(e, ev.StepCompleted)
    meta = e.meta if isinstance(e.meta, dict) else {}
    tries = f", {e.attempts} attempts" if e.attempts > 1 else ""
    if e.kind == "llm":
        usage = meta.get("usage") or {}
        cost = meta.get("cost_usd")
        title = f"{e.key}: LLM {meta.get('model') or e.name}"
        detail = (
            f"tokens {usage.get('total_tokens', '?')}"
            + (f", ${float(cost):.4f}" if isinstance(cost, int | float) else "")
            + tries
        )
        it = Item(r.seq, e.at, off, "llm", title, detail, key=e.key, duration=_dur(e))
    elif e.kind == "tool":
        title = f"{e.key}: tool {e.name}"
        detail = ("ERROR " + str(meta["error"])) if meta.get("error") else ""
        it = Item(r.seq, e.at, off, "tool", title, detail, key=e.key, duration=_dur(e))
        if "arguments" in meta:
            it.payloads.append(payload("arguments", meta.get("arguments"), {}, "arguments"))
    else:
        name = f" {e.name}" if e.name and e.kind == "run" else ""
        it = Item(
            r.seq,
            e.at,
            off,
            "step",
            f"{e.key}: {e.kind}{name}",
            tries.lstrip(", "),
            key=e.key,
            duration=_dur(e),
        )
    it.payloads.append(payload("output", e.output, r.refs, "output"))
    return it


def _dur(e: ev.StepCompleted) -> float | None:
    return None if e.duration_ms is None else e.duration_ms / 1000.0


# --------------------------------------------------------------------------- agent trace


@dataclass
class LLMCall:
    key: str
    agent: str | None
    model: str | None
    provider: str | None
    at: float
    latency_ms: float | None
    usage: dict[str, Any]
    cost: float | None
    messages: list[dict[str, Any]]
    answer: str | None
    tool_calls: list[dict[str, Any]]
    offered: list[str]
    chosen: list[str]
    alternatives: list[str]
    reason: Any
    finish_reason: str | None
    attempts: int
    guardrail: str | None  # an output guardrail's rejection this call answers
    output: Payload
    messages_ref: str | None


@dataclass
class ToolCall:
    key: str
    name: str | None
    agent: str | None
    at: float
    duration_ms: float | None
    arguments: Payload
    result: Payload
    error: str | None
    decision: str | None
    handoff: str | None
    rewritten: Payload | None
    guardrail: str | None


@dataclass
class TraceNode:
    run: RunView
    workflow: str | None
    entries: list[Any]  # LLMCall | ToolCall | Item (waits, failures) | TraceNode (a child run)
    totals: LLMTotals  # this run and every run under it
    depth: int


def trace_entries(view: RunView, history: list[RawEvent]) -> list[Any]:
    """The agent-level entries of one run: LLM calls, tool calls, waits and failures."""
    out: list[Any] = []
    items = {it.seq: it for it in view.items}
    for r in history:
        e = r.event
        if isinstance(e, ev.StepCompleted) and e.kind == "llm":
            out.append(_llm_call(r))
        elif isinstance(e, ev.StepCompleted) and e.kind == "tool":
            out.append(_tool_call(r))
        elif r.seq in items and items[r.seq].kind in (
            "wait",
            "wake",
            "fail",
            "retry",
            "end-fail",
            "end-ok",
        ):
            out.append(items[r.seq])
    return out


def _llm_call(r: RawEvent) -> LLMCall:
    e = r.event
    assert isinstance(e, ev.StepCompleted)
    meta = e.meta if isinstance(e.meta, dict) else {}
    o = e.output if isinstance(e.output, dict) else {}
    choice = decision_of(o, meta)
    offered = [str(t) for t in meta.get("tools_offered") or []]
    raw_messages = meta.get("messages")
    messages: list[Any] = raw_messages if isinstance(raw_messages, list) else []
    guard = None
    if messages:
        last = messages[-1]
        content = str(last.get("content") or "") if isinstance(last, dict) else ""
        if (
            isinstance(last, dict)
            and last.get("role") == "user"
            and content.startswith(("Your answer was rejected", "Your answer is not valid JSON"))
        ):
            guard = content
    cost = meta.get("cost_usd")
    return LLMCall(
        key=e.key,
        agent=meta.get("agent"),
        model=meta.get("model") or e.name,
        provider=meta.get("provider"),
        at=e.at,
        latency_ms=meta.get("latency_ms") or e.duration_ms,
        usage=meta.get("usage") or {},
        cost=float(cost) if isinstance(cost, int | float) else None,
        messages=[m for m in messages if isinstance(m, dict)],
        answer=o.get("content") if isinstance(o.get("content"), str) else None,
        tool_calls=[c for c in o.get("tool_calls") or [] if isinstance(c, dict)],
        offered=offered,
        chosen=[str(c) for c in choice.get("chosen") or []],
        alternatives=[str(c) for c in choice.get("alternatives") or []],
        reason=choice.get("reason"),
        finish_reason=meta.get("finish_reason"),
        attempts=e.attempts,
        guardrail=guard,
        output=payload("output", e.output, r.refs, "output"),
        messages_ref=r.refs.get("meta") or r.refs.get("meta.messages"),
    )


def _tool_call(r: RawEvent) -> ToolCall:
    e = r.event
    assert isinstance(e, ev.StepCompleted)
    meta = e.meta if isinstance(e.meta, dict) else {}
    err = meta.get("error")
    guard = None
    if isinstance(err, str) and err.startswith("GuardrailViolation"):
        guard = err
    rewritten = None
    if "rewritten_arguments" in meta:
        rewritten = payload("rewritten by a guardrail", meta["rewritten_arguments"], {}, "x")
    return ToolCall(
        key=e.key,
        name=e.name,
        agent=meta.get("agent"),
        at=e.at,
        duration_ms=e.duration_ms,
        arguments=payload("arguments", meta.get("arguments"), {}, "arguments"),
        result=payload("result", e.output, r.refs, "output"),
        error=err if err else None,
        decision=meta.get("decision"),
        handoff=meta.get("handoff"),
        rewritten=rewritten,
        guardrail=guard,
    )


# --------------------------------------------------------------------------- forms


@dataclass
class Field:
    name: str
    label: str
    type: str  # text | textarea | number | integer | boolean | select | json
    required: bool = False
    description: str | None = None
    default: Any = None
    options: list[tuple[str, str]] = field(default_factory=list)

    @property
    def default_text(self) -> str:
        if self.default is None:
            return ""
        if self.type == "json":
            return pretty(self.default)
        return str(self.default)


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    options = schema.get("anyOf")
    if isinstance(options, list):
        real = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
        if len(real) == 1:
            merged = {
                **_resolve(real[0], root),
                **{k: v for k, v in schema.items() if k != "anyOf"},
            }
            merged["nullable"] = True
            return merged
    return schema


def _field_type(s: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    if isinstance(s.get("enum"), list) and all(isinstance(v, str | int | float) for v in s["enum"]):
        return "select", [(str(v), str(v)) for v in s["enum"]]
    t = s.get("type")
    if t == "boolean":
        return "boolean", []
    if t in ("integer", "number"):
        return str(t), []
    if t == "string":
        return ("textarea" if s.get("maxLength", 0) > 200 else "text"), []
    return "json", []


def schema_fields(schema: Any) -> tuple[list[Field], bool]:
    """Form fields for a workflow's input schema, and whether the input is an object of them
    (False: one field that is the whole input). Nested objects and lists are JSON fields."""
    if not isinstance(schema, dict) or not schema:
        return [Field("input", "input (JSON)", "json")], False
    root = schema
    s = _resolve(schema, root)
    props = s.get("properties")
    if s.get("type") == "object" and isinstance(props, dict):
        required = set(s.get("required") or [])
        fields: list[Field] = []
        for name, sub in props.items():
            sub = _resolve(sub if isinstance(sub, dict) else {}, root)
            ftype, options = _field_type(sub)
            fields.append(
                Field(
                    name,
                    str(sub.get("title") or name),
                    ftype,
                    name in required,
                    sub.get("description"),
                    sub.get("default"),
                    options,
                )
            )
        return fields, True
    ftype, options = _field_type(s)
    return [
        Field(
            "input",
            str(s.get("title") or "input"),
            ftype,
            True,
            s.get("description"),
            s.get("default"),
            options,
        )
    ], False


class FormError(ValueError):
    """A form value that does not fit its field: says which and why."""


def parse_field(f: Field, raw: str | None) -> tuple[bool, Any]:
    """(present, value) of one submitted field."""
    if f.type == "boolean":
        return True, raw in ("on", "true", "1", "yes")
    text = (raw or "").strip() if f.type != "textarea" else (raw or "")
    if text == "":
        if f.required:
            raise FormError(f"{f.name}: a value is required")
        return False, None
    if f.type == "integer":
        try:
            return True, int(text)
        except ValueError:
            raise FormError(f"{f.name}: {text!r} is not a whole number") from None
    if f.type == "number":
        try:
            return True, float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise FormError(f"{f.name}: {text!r} is not a number") from None
    if f.type == "json":
        try:
            return True, orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise FormError(f"{f.name}: not valid JSON ({exc})") from None
    if f.type == "select" and f.options and text not in {v for v, _ in f.options}:
        raise FormError(f"{f.name}: {text!r} is not one of the choices")
    return True, text


def parse_json(label: str, text: str | None, *, default: Any = None) -> Any:
    if text is None or not text.strip():
        return default
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FormError(f"{label}: not valid JSON ({exc})") from None


# --------------------------------------------------------------------------- approvals


@dataclass
class ApprovalForm:
    """What the approval page shows for one suspend: the ``_form`` convention of the suspend
    data (title, description, fields keyed by ``key`` or ``name``, context), else approve /
    reject buttons for an agent's gated tool or any other data."""

    title: str
    description: str | None
    fields: list[Field]
    context: Any
    source: str | None
    tool: str | None
    data: Any
    mode: str  # form | approve


def approval_form(data: Any) -> ApprovalForm:
    d = data if isinstance(data, dict) else {}
    form = d.get("_form") if isinstance(d.get("_form"), dict) else None
    shown = (
        {k: v for k, v in d.items() if k not in ("_form", "_approval_url", "_notify")}
        if isinstance(data, dict)
        else data
    )
    if form is not None:
        fields: list[Field] = []
        for raw in form.get("fields") or []:
            if not isinstance(raw, dict):
                continue
            name = raw.get("key") or raw.get("name")
            if not isinstance(name, str) or not name:
                continue
            ftype = str(raw.get("type") or "text")
            if ftype not in ("text", "textarea", "number", "boolean", "select"):
                ftype = "text"
            options = [
                (str(o.get("value")), str(o.get("label") or o.get("value")))
                for o in raw.get("options") or []
                if isinstance(o, dict)
            ]
            fields.append(
                Field(
                    name,
                    str(raw.get("label") or name),
                    ftype,
                    bool(raw.get("required")),
                    raw.get("description"),
                    raw.get("default"),
                    options,
                )
            )
        if not fields:
            fields = [Field("response", "Response", "textarea", True)]
        return ApprovalForm(
            str(form.get("title") or "Approval required"),
            form.get("description"),
            fields,
            form.get("context"),
            d.get("_source"),
            d.get("_tool"),
            shown,
            "form",
        )
    title = "Approval required"
    if d.get("tool"):
        title = f"Approve tool call: {d['tool']}"
    return ApprovalForm(
        title, None, [], None, d.get("_source"), d.get("tool") or d.get("_tool"), shown, "approve"
    )

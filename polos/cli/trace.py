"""``polos trace RUN_ID``: a run as a tree of steps, decisions, tool calls, waits and child runs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import singledispatch
from typing import Any

import orjson

from polos import history as ev
from polos._private.agents.decisions import decision_of
from polos._private.agents.pricing import LLMTotals
from polos._private.model.lineage import children_named
from polos._private.ops import output
from polos._private.ops.commands import command, settings_for
from polos._private.store import Names, connect, read_history, valid_token
from polos.cli.core import TIMELINE_STYLES, retries_text


def _dumps(value: Any, limit: int = 120) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- trace


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 10_000 else f"{seconds:.1f} s"


Item = list[str] | str  # the lines of one tree item, or the id of a child run to draw there


@dataclass
class _Walk:
    """What drawing one event needs from the events before it."""

    t0: float
    suspended_at: dict[str, float] = field(default_factory=dict)  # step -> when it began to wait

    def at(self, e: ev.Event) -> str:
        return f"+{_ms(e.at - self.t0)}"


@singledispatch
def _item(e: ev.Event, walk: _Walk) -> list[str] | None:
    """One event's tree item (its lines), or None for an event the tree leaves out."""
    return [f"{walk.at(e)}  {type(e).__name__}"]


@_item.register
def _requested(e: ev.RunRequested, walk: _Walk) -> None:
    return None  # the head line says it


@_item.register
def _claimed(e: ev.RunClaimed, walk: _Walk) -> list[str]:
    return [f"{walk.at(e)}  claimed by {e.worker_id} (claim {e.attempt})"]


def _llm_step(e: ev.StepCompleted, at: str) -> list[str]:
    meta = e.meta if isinstance(e.meta, dict) else {}
    out = e.output if isinstance(e.output, dict) else {}
    usage = meta.get("usage") or {}
    lines = [
        f"{at}  {e.key}  llm {meta.get('model') or e.name}"
        f"  {e.duration_ms or 0:.1f} ms  tokens {usage.get('total_tokens', '?')}"
        f"  cost ${float(meta.get('cost_usd') or 0):.4f}"
    ]
    offered = [str(t) for t in meta.get("tools_offered") or []]
    choice = decision_of(out, meta)
    reason = choice.get("reason")
    if choice["chosen"]:
        chosen = [str(t) for t in choice["chosen"]]
        lines.append(f"decision: chose {', '.join(chosen)} of [{', '.join(offered)}]")
    elif offered:
        lines.append(f"decision: answered without a tool (offered [{', '.join(offered)}])")
    if reason:
        lines.append(f"reason: {_dumps(reason)}")
    return lines


def _tool_step(e: ev.StepCompleted, at: str) -> list[str]:
    meta = e.meta if isinstance(e.meta, dict) else {}
    status = f"ERROR {meta['error']}" if meta.get("error") else f"-> {_dumps(e.output, 80)}"
    decision = f"  (decision {meta['decision']})" if meta.get("decision") else ""
    return [
        f"{at}  {e.key}  tool {e.name}({_dumps(meta.get('arguments'), 60)})"
        f"  {e.duration_ms or 0:.1f} ms  {status}{decision}"
    ]


@_item.register
def _step_completed(e: ev.StepCompleted, walk: _Walk) -> list[str]:
    at = walk.at(e)
    if e.kind == "llm":
        return _llm_step(e, at)
    if e.kind == "tool":
        return _tool_step(e, at)
    took = f"  {e.duration_ms:.1f} ms" if e.duration_ms is not None else ""
    tries = f"  after {e.attempts} attempts" if e.attempts > 1 else ""
    return [f"{at}  {e.key}  {e.kind}{took}{tries} -> {_dumps(e.output, 80)}"]


@_item.register
def _attempt_failed(e: ev.StepAttemptFailed, walk: _Walk) -> list[str]:
    return [
        f"{walk.at(e)}  {e.key}  attempt {e.attempt} failed: "
        f"{e.error.get('type')}: {e.error.get('message')}"
    ]


@_item.register
def _step_failed(e: ev.StepFailed, walk: _Walk) -> list[str]:
    return [
        f"{walk.at(e)}  {e.key}  FAILED after {e.attempts} attempts: "
        f"{e.error.get('type')}: {e.error.get('message')}"
    ]


@_item.register
def _suspended(e: ev.RunSuspended, walk: _Walk) -> list[str]:
    walk.suspended_at[e.step] = e.at
    if e.topic:
        what = f"topic {e.topic}"
    else:
        what = f"data {_dumps(e.data, 60)}" if e.data is not None else ""
    return [f"{walk.at(e)}  wait {e.kind} {e.step!r} {what}".rstrip()]


@_item.register
def _woken(e: ev.RunWoken, walk: _Walk) -> list[str]:  # an admission too (a RunWoken)
    waited = e.at - walk.suspended_at.get(e.step, e.at)
    return [f"{walk.at(e)}  woken at {e.step!r} by {e.reason} after {_ms(waited)}"]


@_item.register
def _completed(e: ev.RunCompleted, walk: _Walk) -> list[str]:
    return [f"{walk.at(e)}  completed -> {_dumps(e.output)}"]


@_item.register
def _failed(e: ev.RunFailed, walk: _Walk) -> list[str]:
    return [f"{walk.at(e)}  FAILED {e.error.get('type')}: {e.error.get('message')}"]


@_item.register
def _cancelled(e: ev.RunCancelled, walk: _Walk) -> list[str]:
    return [f"{walk.at(e)}  cancelled" + (f": {e.reason}" if e.reason else "")]


def render_run(run_id: str, history: list[tuple[int, ev.Event]]) -> tuple[str, list[Item]]:
    """The head line of one run and its tree items; a child run is its id, placed right after
    the event that names it."""
    if not history:
        return f"run {run_id}: no events", []
    state = ev.RunState.fold(run_id, history)
    t0 = history[0][1].at
    own = own_totals(history)
    end = history[-1][1].at
    head = (
        f"run {run_id}  {state.workflow}  {state.status}  {_ms(end - t0)}  "
        f"{retries_text(history)}  steps {len(state.steps)}"
    )
    if own.llm_calls:
        head += f"  tokens {own.total_tokens}  cost ${own.cost_usd:.4f}"
    items: list[Item] = []
    children: list[str] = []
    walk = _Walk(t0)
    for _, e in history:
        named = [c for c in children_named(e) if c not in children]
        children.extend(named)
        item = _item(e, walk)
        if item is not None:
            items.append(item)
        items.extend(named)
    return head, items


def draw(head: str, items: list[list[str]]) -> list[str]:
    """A head line and its items as a tree; an item's further lines hang below its first."""
    lines = [head]
    for i, item in enumerate(items):
        last = i == len(items) - 1
        lines.append(("└─ " if last else "├─ ") + item[0])
        lines.extend(("   " if last else "│  ") + extra for extra in item[1:])
    return lines


def own_totals(history: list[tuple[int, ev.Event]]) -> LLMTotals:
    """The LLM calls, tokens and cost recorded in one run's own history."""
    totals = LLMTotals()
    for _, e in history:
        if isinstance(e, ev.StepCompleted) and e.kind == "llm":
            totals.add_step(e.meta)
    return totals


async def trace_tree(
    nc: Any, names: Names, run_id: str, depth: int = 0
) -> tuple[list[str], LLMTotals]:
    """A run as a tree, with its child runs drawn (recursively) where they were started, and
    the LLM totals of the run and every run under it (also on its head line when children
    add to them)."""
    history = await read_history(nc, names, run_id)
    head, items = render_run(run_id, history)
    own = own_totals(history)
    totals = LLMTotals()
    totals.add(own)
    under = 0
    drawn: list[list[str]] = []
    for item in items:
        if isinstance(item, str):
            if depth >= 16:
                drawn.append([f"child run {item} (too deep to draw)"])
                continue
            sub, sub_totals = await trace_tree(nc, names, item, depth + 1)
            totals.add(sub_totals)
            under += 1
            drawn.append(["child " + sub[0], *sub[1:]])
        else:
            # Detail lines (decision, reason) sit under the item's text, not its connector.
            drawn.append([item[0], *("   " + extra for extra in item[1:])])
    if totals.llm_calls > own.llm_calls:
        runs = "1 child run" if under == 1 else f"{under} child runs"
        head += (
            f"  total with {runs}: {totals.llm_calls} llm calls  "
            f"tokens {totals.total_tokens}  cost ${totals.cost_usd:.4f}"
        )
    return draw(head, drawn), totals


async def trace_lines(nc: Any, names: Names, run_id: str, depth: int = 0) -> list[str]:
    """A run as a tree, with its child runs drawn (recursively) where they were started."""
    lines, _ = await trace_tree(nc, names, run_id, depth)
    return lines


def _add_trace(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id")


@command("trace", "a run as a tree: steps, decisions, tool calls, waits, child runs, cost")(
    _add_trace
)
async def cmd_trace(args: argparse.Namespace) -> int:
    settings = settings_for(args, role="service")  # reads every stream of the namespace
    nc = await connect(settings, name="polos-trace")
    try:
        if not valid_token(args.run_id):
            output.error(f"{args.run_id!r} is not a run id")
            return 2
        lines = await trace_lines(nc, Names(settings.prefix), args.run_id)
    finally:
        await nc.close()
    if lines[0].endswith("no events"):
        output.error(f"no run {args.run_id!r}")
        return 1
    print(output.lines(lines, highlights=TIMELINE_STYLES))
    return 0

"""``polos trace RUN_ID``: a run as a tree of steps, decisions, tool calls, waits and child runs."""

from __future__ import annotations

import argparse
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
    suspended_at: dict[str, float] = {}
    for _, e in history:
        at = f"+{_ms(e.at - t0)}"
        named = [c for c in children_named(e) if c not in children]
        children.extend(named)
        if isinstance(e, ev.RunClaimed):
            items.append([f"{at}  claimed by {e.worker_id} (claim {e.attempt})"])
        elif isinstance(e, ev.StepCompleted) and e.kind == "llm":
            meta = e.meta if isinstance(e.meta, dict) else {}
            out = e.output if isinstance(e.output, dict) else {}
            usage = meta.get("usage") or {}
            line = [
                f"{at}  {e.key}  llm {meta.get('model') or e.name}"
                f"  {e.duration_ms or 0:.1f} ms  tokens {usage.get('total_tokens', '?')}"
                f"  cost ${float(meta.get('cost_usd') or 0):.4f}"
            ]
            offered = [str(t) for t in meta.get("tools_offered") or []]
            choice = decision_of(out, meta)
            reason = choice.get("reason")
            if choice["chosen"]:
                chosen = [str(t) for t in choice["chosen"]]
                line.append(f"decision: chose {', '.join(chosen)} of [{', '.join(offered)}]")
            elif offered:
                line.append(f"decision: answered without a tool (offered [{', '.join(offered)}])")
            if reason:
                line.append(f"reason: {_dumps(reason)}")
            items.append(line)
        elif isinstance(e, ev.StepCompleted) and e.kind == "tool":
            meta = e.meta if isinstance(e.meta, dict) else {}
            status = f"ERROR {meta['error']}" if meta.get("error") else f"-> {_dumps(e.output, 80)}"
            items.append(
                [
                    f"{at}  {e.key}  tool {e.name}({_dumps(meta.get('arguments'), 60)})"
                    f"  {e.duration_ms or 0:.1f} ms  {status}"
                    + (f"  (decision {meta['decision']})" if meta.get("decision") else "")
                ]
            )
        elif isinstance(e, ev.StepCompleted):
            took = f"  {e.duration_ms:.1f} ms" if e.duration_ms is not None else ""
            tries = f"  after {e.attempts} attempts" if e.attempts > 1 else ""
            items.append([f"{at}  {e.key}  {e.kind}{took}{tries} -> {_dumps(e.output, 80)}"])
        elif isinstance(e, ev.StepAttemptFailed):
            items.append(
                [
                    f"{at}  {e.key}  attempt {e.attempt} failed: "
                    f"{e.error.get('type')}: {e.error.get('message')}"
                ]
            )
        elif isinstance(e, ev.StepFailed):
            items.append(
                [
                    f"{at}  {e.key}  FAILED after {e.attempts} attempts: "
                    f"{e.error.get('type')}: {e.error.get('message')}"
                ]
            )
        elif isinstance(e, ev.RunSuspended):
            suspended_at[e.step] = e.at
            what = (
                f"topic {e.topic}"
                if e.topic
                else (f"data {_dumps(e.data, 60)}" if e.data is not None else "")
            )
            items.append([f"{at}  wait {e.kind} {e.step!r} {what}".rstrip()])
        elif isinstance(e, ev.RunWoken):
            waited = e.at - suspended_at.get(e.step, e.at)
            items.append([f"{at}  woken at {e.step!r} by {e.reason} after {_ms(waited)}"])
        elif isinstance(e, ev.RunCompleted):
            items.append([f"{at}  completed -> {_dumps(e.output)}"])
        elif isinstance(e, ev.RunFailed):
            items.append([f"{at}  FAILED {e.error.get('type')}: {e.error.get('message')}"])
        elif isinstance(e, ev.RunCancelled):
            items.append([f"{at}  cancelled" + (f": {e.reason}" if e.reason else "")])
        elif not isinstance(e, ev.RunRequested):
            items.append([f"{at}  {type(e).__name__}"])
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

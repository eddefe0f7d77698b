"""Agents written with the original SDK's options, served by worker subprocesses in
tests/test_parity_agent*.py (``python -m polos_services.worker tests.test_parity_agent_workers``).
No tests here.

Every tool call, hook and guardrail appends a line to $POLOS_TEST_LOG, so a test counts real
executions across a SIGKILLed worker. Each agent's system prompt names it, so the tests' fake
LLM answers per agent. The agents talk to the fake LLM at $POLOS_DEVLLM_URL.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from polos import (
    ExecutedToolConfig,
    GuardrailContext,
    GuardrailResult,
    HookContext,
    HookResult,
    MaxStepsConfig,
    StopConditionContext,
    WorkflowContext,
    executed_tool,
    guardrail,
    hook,
    max_steps,
    stop_condition,
    workflow,
)
from polos.agent import Agent, agent_workflow  # noqa: F401 - served as a workflow too
from polos.middleware import limit_tool_calls

URL = os.environ.get("POLOS_DEVLLM_URL", "http://127.0.0.1:9/v1")


def mark(text: str) -> None:
    with open(os.environ["POLOS_TEST_LOG"], "a") as f:
        f.write(text + "\n")


def lookup(sku: str) -> dict[str, Any]:
    """Stock of an item.

    Args:
        sku: the item
    """
    mark(f"tool lookup {sku}")
    return {"sku": sku, "stock": 3}


def audit(note: str) -> str:
    """Write an audit note.

    Args:
        note: what to note
    """
    mark(f"tool audit {note}")
    return "noted"


class Answer(BaseModel):
    sku: str
    stock: int


@hook
def rewrite_input(ctx: Any, hc: HookContext) -> HookResult:
    mark("hook on_start")
    assert isinstance(hc.current_payload, dict)
    return HookResult.continue_with(
        modified_payload={"input": f"{hc.current_payload['input']} (checked)"}
    )


@hook
def step_start(ctx: Any, hc: HookContext) -> None:
    assert isinstance(hc.current_payload, dict)
    mark(f"hook step_start {hc.current_payload['step']}")


@hook
def step_end(ctx: Any, hc: HookContext) -> None:
    mark(f"hook step_end {hc.current_output.step}")  # type: ignore[union-attr]


@hook
def force_sku(ctx: Any, hc: HookContext) -> HookResult:
    mark(f"hook on_tool_start {hc.current_tool}")
    return HookResult.continue_with(modified_payload={"sku": "FORCED"})


@hook
def annotate(ctx: Any, hc: HookContext) -> HookResult:
    mark(f"hook on_tool_end {hc.current_tool}")
    assert isinstance(hc.current_output, dict)
    return HookResult.continue_with(modified_output={**hc.current_output, "annotated": True})


@hook
def bump_stock(ctx: Any, hc: HookContext) -> HookResult:
    mark("hook on_end")
    answer = hc.current_output.result  # type: ignore[union-attr]
    return HookResult.continue_with(
        modified_output={"sku": answer.sku, "stock": answer.stock + 100}
    )


hooked = Agent(
    id="hooked",
    provider="openai",
    model="gpt-4o-mini",
    system_prompt="hooked: you check stock.",
    tools=[lookup],
    temperature=0.1,
    max_output_tokens=300,
    provider_base_url=URL,
    output_schema=Answer,
    stop_conditions=[max_steps(MaxStepsConfig(count=5))],
    on_start=[rewrite_input],
    on_end=bump_stock,
    on_agent_step_start=step_start,
    on_agent_step_end=step_end,
    on_tool_start=force_sku,
    on_tool_end=annotate,
)


until_lookup = Agent(
    id="until_lookup",
    system_prompt="until_lookup",
    tools=[lookup, audit],
    provider_base_url=URL,
    stop_conditions=[executed_tool(ExecutedToolConfig(tool_names=["lookup"]))],
)

capped = Agent(
    id="capped",
    system_prompt="capped",
    tools=[lookup],
    provider_base_url=URL,
    stop_conditions=[max_steps(MaxStepsConfig(count=2))],
)


@stop_condition
def audited_twice(ctx: StopConditionContext) -> bool:
    mark(f"stop check {len(ctx.steps)}")
    return sum(1 for s in ctx.steps for c in s.tool_calls if c.function.name == "audit") >= 2


custom_stop = Agent(
    id="custom_stop",
    system_prompt="custom_stop",
    tools=[audit],
    provider_base_url=URL,
    stop_conditions=[audited_twice],
)


@guardrail
def no_forbidden(ctx: Any, gc: GuardrailContext) -> GuardrailResult:
    mark(f"guard {gc.content}")
    if gc.content and "forbidden" in gc.content:
        return GuardrailResult.fail("do not say forbidden")
    if gc.content and "secret" in gc.content:
        return GuardrailResult.continue_with(modified_content=gc.content.replace("secret", "[x]"))
    return GuardrailResult.continue_with()


double_guarded = Agent(
    id="double_guarded",
    system_prompt="double_guarded",
    provider_base_url=URL,
    guardrails=[no_forbidden, "The answer must be polite."],
    guardrail_max_retries=2,
)

stubborn = Agent(
    id="stubborn",
    system_prompt="stubborn",
    provider_base_url=URL,
    guardrails=no_forbidden,
    guardrail_max_retries=1,
)

tool_limited = Agent(
    id="tool_limited",
    system_prompt="tool_limited",
    tools=[lookup, audit],
    provider_base_url=URL,
    guardrails=[limit_tool_calls(1)],
)

crash_guarded = Agent(
    id="crash_guarded",
    system_prompt="crash_guarded",
    tools=[lookup],
    provider_base_url=URL,
    guardrails=[no_forbidden],
    on_start=rewrite_input,
    on_agent_step_start=step_start,
    on_tool_start=force_sku,
)

live_streamer = Agent(id="live_streamer", system_prompt="live_streamer", provider_base_url=URL)

stream_guarded = Agent(
    id="stream_guarded",
    system_prompt="stream_guarded",
    provider_base_url=URL,
    guardrails=[no_forbidden],
)

queued = Agent(id="queued", system_prompt="queued", provider_base_url=URL, queue="agents_q")


def audit_plain(note: str) -> str:
    """Note something (no side effect: for plain-code runs).

    Args:
        note: what to note
    """
    return f"noted {note}"


@hook
def who_am_i(ctx: Any, hc: HookContext) -> None:
    mark(f"hook ids {hc.session_id} {hc.user_id} {type(ctx).__name__}")


tuned = Agent(id="tuned", system_prompt="tuned", provider_base_url=URL, on_start=who_am_i)


@workflow
async def tuned_wf(ctx: WorkflowContext, text: str) -> dict[str, Any]:
    r = await ctx.step.agent_invoke_and_wait(
        "tuned", tuned.with_input(text, session_id="s-1", user_id="u-1", top_p=0.25, seed=7)
    )
    return {"text": r.result, "steps": r.total_steps}


judged_tools = Agent(
    id="judged_tools",
    system_prompt="judged_tools",
    tools=[lookup],
    provider_base_url=URL,
    guardrails=["Be polite."],
)

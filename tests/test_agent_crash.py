"""An agent SIGKILLed mid-loop resumes where it was: no LLM call answered twice, no tool call
run twice. A worker subprocess drives the real openai client against the dev LLM served here."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import pytest

from polos import history as ev
from polos.devllm import DevLLM, Reply
from tests.helpers import counts, kill, marks, spawn, stop

pytestmark = pytest.mark.slow

WORKER = ["-m", "polos_services.worker", "tests.test_agent_workers"]
UNITS = 8
HOLD_AT = 5  # the 6th LLM call is held open until the worker is killed


@pytest.mark.parametrize("inline", [False, True], ids=["child_run", "inline"])
async def test_sigkill_mid_agent_loop_repeats_no_llm_call_and_no_tool(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path, inline: bool
) -> None:
    held = asyncio.Event()
    never = asyncio.Event()
    holds = 0

    async def responder(body: dict[str, Any]) -> Reply:
        nonlocal holds
        done = sum(1 for m in body["messages"] if m.get("role") == "tool")
        if done == HOLD_AT and holds == 0:
            holds += 1
            held.set()
            await never.wait()  # the worker dies while waiting for this answer
        if done < UNITS:
            return Reply.tools(("work", {"i": done + 1}))
        return Reply.text(f"all {UNITS} units done")

    log = tmp_path / "marks.log"
    async with DevLLM(responder=responder) as llm:
        subprocess_env.update(POLOS_TEST_LOG=str(log), POLOS_DEVLLM_URL=llm.url)
        env = await env_factory([], with_worker=False)
        w1 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w1.out")
        w2 = None
        try:
            handle = await env.client.start("agent_crash", {"units": UNITS, "inline": inline})
            await asyncio.wait_for(held.wait(), 30)
            kill(w1)  # SIGKILL while LLM call 6 of 9 is in flight
            t0 = time.perf_counter()
            w2 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w2.out")
            out = await handle.result(timeout=30)
            resumed_s = time.perf_counter() - t0
        finally:
            never.set()
            stop(w1)
            if w2:
                stop(w2)
        requests = llm.chat_requests

    agent_run = out.pop("run_id")
    assert out == {"text": f"all {UNITS} units done", "llm_calls": UNITS + 1, "tool_calls": UNITS}
    assert (agent_run == handle.run_id) is inline
    # The request log: every answered LLM call was made once; the only repeat is the call that
    # was in flight at the kill, whose first request was never answered.
    answered = collections.Counter(r.step for r in requests if r.answered)
    unanswered = [r.step for r in requests if not r.answered]
    assert all(n == 1 for n in answered.values()), answered
    assert len(answered) == UNITS + 1
    assert len(unanswered) == 1 and unanswered[0] in answered
    assert unanswered[0].endswith(f"loop/llm/{HOLD_AT + 1}")
    # The tool counters: each unit of work ran exactly once across both workers.
    started, done = counts(log)
    for i in range(1, UNITS + 1):
        assert started[str(i)] == 1 and done[str(i)] == 1, marks(log)
    # The run's history: one event per LLM call and per tool call, none duplicated.
    history = await env.client.history(agent_run)
    steps = [e for _, e in history if isinstance(e, ev.StepCompleted)]
    kinds = collections.Counter(e.kind for e in steps)
    assert kinds == {"llm": UNITS + 1, "tool": UNITS, "run": 1}  # run: the stop record
    assert len({e.key for e in steps}) == len(steps)
    claims = [e for _, e in history if isinstance(e, ev.RunClaimed)]
    assert len(claims) == 2
    print(
        f"\n[{'inline' if inline else 'child run'}] {len(requests)} HTTP requests for {UNITS + 1} LLM calls (1 abandoned at SIGKILL); "
        f"{UNITS} tools once each; resumed and finished {resumed_s:.2f}s after the kill"
    )

"""Tools as in the original Polos, through real agent runs under authentication, the real
openai client against the dev LLM: ``(ctx, input: Model)`` tools, ``@tool`` options, hooks,
approval, and ``create_ask_user_tool`` across a SIGKILLed worker (answered with ``polos
resume``), no completed tool call repeated."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, Field

from polos import Agent, HookContext, HookResult, Queue, WorkflowContext, hook, tool, workflow
from polos import history as ev
from polos._private.run import waits as waiting
from polos.agent import agent_workflow
from polos.devllm import DevLLM, Reply
from polos.tools import Tool, create_ask_user_tool
from tests.helpers import ROOT, counts, kill, marks, spawn, stop

CALLS: collections.Counter[str] = collections.Counter()


@pytest.fixture
async def llm() -> Any:
    async with DevLLM() as server:
        yield server


class WeatherInput(BaseModel):
    city: str = Field(description="The city")
    unit: str = "celsius"


class WeatherOutput(BaseModel):
    city: str
    temperature: float
    unit: str


@hook
def shout_city(ctx: WorkflowContext, hc: HookContext) -> HookResult:
    CALLS["on_start"] += 1
    return HookResult.continue_with(modified_payload={"city": hc.current_payload["city"].upper()})


@hook
async def add_source(ctx: WorkflowContext, hc: HookContext) -> HookResult:
    CALLS["on_end"] += 1
    return HookResult.continue_with(modified_output={**hc.current_output, "source": "hooked"})


@tool(
    id="get_weather",
    description="Current weather of a city",
    on_start=shout_city,
    on_end=[add_source],
)
async def get_weather(ctx: WorkflowContext, input: WeatherInput) -> WeatherOutput:
    CALLS["get_weather"] += 1
    reading = await ctx.step.run("reading", lambda: 21.5)
    return WeatherOutput(city=input.city, temperature=reading, unit=input.unit)


@tool(name="whoami")
async def whoami(ctx: WorkflowContext) -> str:
    """The run the tool runs in."""
    return ctx.run_id


class Only(BaseModel):
    sku: str


def plain(order: Only) -> str:
    return order.sku


def test_ctx_tools_show_the_input_models_own_schema_and_check_options() -> None:
    assert get_weather.id == get_weather.name == "get_weather"
    d = get_weather.definition()
    assert d["name"] == "get_weather" and d["description"] == "Current weather of a city"
    assert d["parameters"] == WeatherInput.model_json_schema()  # not nested under "input"
    assert set(d["parameters"]["properties"]) == {"city", "unit"}
    assert whoami.definition()["parameters"] == {"type": "object", "properties": {}}
    assert whoami.description == "The run the tool runs in."
    custom = {"type": "object", "properties": {"q": {"type": "string"}}}
    assert tool(parameters=custom)(get_weather.fn).parameters == custom

    assert Tool.from_function(plain).parameters["properties"] == {
        "sku": {"title": "Sku", "type": "string"}
    }
    with pytest.raises(TypeError, match=r"unknown option\(s\) retries, timeout"):
        tool(retries=3, timeout=1)
    with pytest.raises(ValueError, match="a queue dict is"):
        tool(queue={"name": "q", "size": 3})(plain)
    queued = tool(queue={"name": "q", "concurrency_limit": 2})(plain)
    assert queued.workflow is not None and queued.workflow.name == "polos_tool_plain"
    assert queued.workflow.queue == "q"
    with pytest.raises(ValueError, match="approval must be"):
        tool(approval="sometimes")(plain)
    with pytest.raises(TypeError, match="pydantic BaseModel"):

        @tool
        async def bad(ctx: WorkflowContext, input: dict[str, Any]) -> None: ...

    with pytest.raises(TypeError, match="a hook must be a function"):
        tool(on_start="not a hook")(plain)


weather_agent = Agent("parity_weather", model="gpt-4o", tools=[get_weather, whoami])


@workflow
async def weather_wf(ctx: WorkflowContext, text: str) -> dict[str, Any]:
    r = await ctx.step.agent_invoke_and_wait("weather", weather_agent.with_input(text))
    return {"text": r.result, "run_id": r.run_id}


async def test_ctx_tool_runs_in_the_run_with_hooks_and_durable_steps(
    env_factory: Any, llm: DevLLM
) -> None:
    weather_agent.config = dataclasses.replace(weather_agent.config, base_url=llm.url)
    CALLS.clear()
    llm.script(
        Reply.tools(("get_weather", {"city": "paris"}), ("whoami", {})),
        Reply.text("21.5 in PARIS"),
    )
    env = await env_factory([weather_wf, agent_workflow])
    h = await env.client.start(weather_wf, "weather in paris?")
    out = await h.result(timeout=20)
    assert out["text"] == "21.5 in PARIS"
    offered = llm.chat_requests[0].body["tools"]
    assert offered[0]["function"]["parameters"] == WeatherInput.model_json_schema()
    tool_msgs = [m for m in llm.chat_requests[1].body["messages"] if m["role"] == "tool"]
    assert orjson.loads(tool_msgs[0]["content"]) == {
        "city": "PARIS",  # on_start rewrote the argument
        "temperature": 21.5,
        "unit": "celsius",
        "source": "hooked",  # on_end rewrote the output
    }
    assert tool_msgs[1]["content"] == out["run_id"]  # ctx is the agent's run
    assert CALLS == {"on_start": 1, "on_end": 1, "get_weather": 1}
    # The tool's own steps are recorded under its call: hooks, ctx.step.run, then the call.
    history = await env.client.history(out["run_id"])
    keys = [e.key for _, e in history if isinstance(e, ev.StepCompleted)]
    # (the two calls ran concurrently: compare as sets, then the order within the first call)
    assert sorted(keys) == sorted(
        [
            "weather/llm/1",
            "weather/tool/1/get_weather/on_start.shout_city.0",
            "weather/tool/1/get_weather/reading",
            "weather/tool/1/get_weather/on_end.add_source.0",
            "weather/tool/1/get_weather",
            "weather/tool/2/whoami",
            "weather/llm/2",
            "weather/stopped",  # why the agent stopped, recorded
        ]
    )
    first = [k for k in keys if k.startswith("weather/tool/1/")]
    assert first == [
        "weather/tool/1/get_weather/on_start.shout_city.0",
        "weather/tool/1/get_weather/reading",
        "weather/tool/1/get_weather/on_end.add_source.0",
        "weather/tool/1/get_weather",
    ]


async def test_bad_arguments_go_back_to_the_model(env_factory: Any, llm: DevLLM) -> None:
    weather_agent.config = dataclasses.replace(weather_agent.config, base_url=llm.url)
    CALLS.clear()
    llm.script(Reply.tools(("get_weather", {"town": "paris"})), Reply.text("sorry"))
    env = await env_factory([weather_wf, agent_workflow])
    out = await (await env.client.start(weather_wf, "weather?")).result(timeout=20)
    assert out["text"] == "sorry"
    [msg] = [m for m in llm.chat_requests[1].body["messages"] if m["role"] == "tool"]
    assert "invalid arguments for tool 'get_weather': city: Field required" in msg["content"]
    assert CALLS == {}  # neither the hooks nor the tool ran


async def test_plain_agent_run_refuses_a_ctx_tool_clearly(llm: DevLLM) -> None:
    a = Agent("parity_plain", tools=[get_weather], base_url=llm.url)
    llm.script(Reply.tools(("get_weather", {"city": "x"})), Reply.text("no"))
    r = await a.run("weather?")
    assert "needs a durable run" in str(r.steps[1].error)


# --------------------------------------------------------------------------- queue=

ACTIVE = {"now": 0, "max": 0}


class Render(BaseModel):
    frame: int


@tool(queue=Queue("parity_render", concurrency=1))
async def render(ctx: WorkflowContext, input: Render) -> str:
    """Render one frame (one at a time, system-wide)."""
    ACTIVE["now"] += 1
    ACTIVE["max"] = max(ACTIVE["max"], ACTIVE["now"])
    try:
        await asyncio.sleep(0.05)  # room for a second call to overlap, if the queue let it
        CALLS[f"render {input.frame}"] += 1
        return f"frame {input.frame} on run {ctx.run_id}"
    finally:
        ACTIVE["now"] -= 1


renderer = Agent("parity_renderer", model="gpt-4o", tools=[render])


@workflow
async def render_wf(ctx: WorkflowContext, text: str) -> dict[str, Any]:
    r = await ctx.step.agent_invoke_and_wait("render", renderer.with_input(text))
    return {"text": r.result, "run_id": r.run_id}


async def test_a_queued_tool_runs_as_its_own_run_on_its_queue(
    env_factory: Any, llm: DevLLM
) -> None:
    renderer.config = dataclasses.replace(renderer.config, base_url=llm.url)
    CALLS.clear()
    ACTIVE.update(now=0, max=0)
    llm.script(
        Reply.tools(("render", {"frame": 1}), ("render", {"frame": 2}), ("render", {"frame": 3})),
        Reply.text("3 frames"),
    )
    assert render.workflow is not None
    env = await env_factory([render_wf, agent_workflow, render.workflow])
    out = await (await env.client.start(render_wf, "render 3 frames")).result(timeout=30)
    assert out["text"] == "3 frames"
    assert CALLS == {"render 1": 1, "render 2": 1, "render 3": 1}
    assert ACTIVE["max"] == 1  # the queue admitted one call at a time
    results = [m["content"] for m in llm.chat_requests[1].body["messages"] if m["role"] == "tool"]
    children = [r.rsplit(" ", 1)[-1] for r in results]
    assert len(set(children)) == 3 and out["run_id"] not in children  # each call its own run
    for i, child in enumerate(children, start=1):
        info = await env.client.get(child)
        assert info.workflow == "polos_tool_render" and info.status == "completed"
        assert child == waiting.child_run_id(out["run_id"], f"render/tool/{i}/render/queued", 0)


# --------------------------------------------------------------------------- ask_user


def test_ask_user_tool_shape() -> None:
    ask = create_ask_user_tool()
    d = ask.definition()
    assert d["name"] == "ask_user" and d["description"].startswith("Ask the user a question")
    assert set(d["parameters"]["properties"]) == {"question", "title", "fields"}
    assert "AskUserField" in d["parameters"]["$defs"]


WORKER = ["-m", "polos_services.worker", "tests.test_parity_tools_workers"]


async def _suspended_at(env: Any, run_id: str, n: int = 1) -> ev.RunSuspended:
    for _ in range(1500):
        history = await env.client.history(run_id)
        if history and isinstance(history[-1][1], ev.RunSuspended):
            found = [e for _, e in history if isinstance(e, ev.RunSuspended)]
            if len(found) == n:
                return found[-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} never suspended")


async def test_ask_user_waits_across_a_sigkilled_worker_and_resumes_from_the_cli(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    question = {
        "question": "Which color?",
        "title": "Pick one",
        "fields": [
            {
                "key": "color",
                "type": "select",
                "label": "Color",
                "required": True,
                "options": [{"label": "Red", "value": "red"}, {"label": "Blue", "value": "blue"}],
            },
            {"key": "count", "type": "number", "label": "How many"},
        ],
    }

    def responder(body: dict[str, Any]) -> Reply:
        results = [m for m in body["messages"] if m.get("role") == "tool"]
        if not results:  # the work and the question in one turn: the work runs, the run waits
            return Reply.tools(("log_work", {"unit": 1}), ("ask_user", question))
        answer = orjson.loads(results[-1]["content"])
        return Reply.text(f"painting {answer['count']} {answer['color']}")

    log = tmp_path / "marks.log"
    async with DevLLM(responder=responder) as llm:
        subprocess_env.update(POLOS_TEST_LOG=str(log), POLOS_DEVLLM_URL=llm.url)
        env = await env_factory([], with_worker=False)
        w1 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w1.out")
        w2 = None
        try:
            h = await env.client.start("parity_ask", "paint something")
            child = waiting.child_run_id(h.run_id, "ask", 0)
            sus = await _suspended_at(env, child)
            kill(w1)  # SIGKILL while the question waits: the run holds no worker anyway
            assert sus.step == "ask/tool/2/ask_user/ask_user"
            assert sus.data["_source"] == "ask_user" and sus.data["_tool"] == "ask_user"
            assert sus.data["_form"]["title"] == "Pick one"
            assert sus.data["_form"]["description"] == "Which color?"
            assert [f["key"] for f in sus.data["_form"]["fields"]] == ["color", "count"]
            assert counts(log) == ({"1": 1}, {"1": 1}), marks(log)
            done = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "polos",
                    "resume",
                    child,
                    sus.step,
                    "--data",
                    '{"color": "blue", "count": 3}',
                ],
                env=subprocess_env.as_role("client"),
                capture_output=True,
                text=True,
                timeout=60,
                cwd=str(ROOT),
            )
            assert done.returncode == 0, done.stderr
            w2 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w2.out")
            out = await h.result(timeout=30)
        finally:
            stop(w1)
            if w2:
                stop(w2)
        requests = llm.chat_requests

    assert out["text"] == "painting 3 blue" and out["tool_calls"] == 2
    # Nothing completed was repeated: the work ran once, each LLM call was answered once.
    assert counts(log) == ({"1": 1}, {"1": 1}), marks(log)
    answered = collections.Counter(r.step for r in requests if r.answered)
    assert len(answered) == 2 and all(n == 1 for n in answered.values()), answered
    [answer_msg] = [
        m
        for m in requests[-1].body["messages"]
        if m.get("role") == "tool" and "blue" in m["content"]
    ]
    assert orjson.loads(answer_msg["content"]) == {"color": "blue", "count": 3}
    history = await env.client.history(child)
    steps = [e for _, e in history if isinstance(e, ev.StepCompleted)]
    # "run": the work's own step and the record of why the agent stopped
    assert collections.Counter(e.kind for e in steps) == {"llm": 2, "tool": 2, "run": 2}
    [woken] = [e for _, e in history if isinstance(e, ev.RunWoken)]  # the answer, once
    assert woken.step == sus.step
    assert len({e.key for e in steps}) == len(steps)
    assert len([e for _, e in history if isinstance(e, ev.RunClaimed)]) == 2

"""Three agents over shared working memory: researcher -> writer -> editor.

    python -m examples.research_team

The agents do not pass text to each other through the workflow: each reads and writes the
team's working memory (``Agent(memory=True)``: the tools ``memory_get``, ``memory_set``,
``memory_append``) in the session the workflow gives them, here the workflow run's own id.

* the researcher appends facts to ``facts`` (parallel appends: each is a compare-and-set on
  the entry, so none is lost);
* the writer reads ``facts`` and writes a draft to ``draft``;
* the editor reads ``draft``, writes the final text to ``final`` and answers with it.

Every LLM call and every memory call is a durable step of its agent's run: a worker that dies
mid-way resumes where it was, and a replayed read returns what it read then.

With ``OPENAI_API_KEY`` set the agents talk to OpenAI. Without it, this script starts the
**Polos dev LLM** (polos/devllm.py) with ``dev_team``, a script that follows the instructions
below literally; it is *not a model*.

A worker serving this module: ``polos worker examples.research_team``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from typing import Any

import orjson
from pydantic import BaseModel

from polos import WorkflowContext, workflow
from polos.agent import Agent, agent_workflow  # agents run as child runs of this workflow

researcher = Agent(
    "researcher",
    model="gpt-4o-mini",
    instructions="You are a researcher. Find three facts on the topic and save each one with "
    "memory_append(key='facts', item=<fact>). Then say how many facts you saved.",
    memory=True,
)
writer = Agent(
    "writer",
    model="gpt-4o-mini",
    instructions="You are a writer. Read the facts with memory_get(key='facts'), write a "
    "short paragraph from them and save it with memory_set(key='draft', value=<paragraph>).",
    memory=True,
)
editor = Agent(
    "editor",
    model="gpt-4o-mini",
    instructions="You are an editor. Read memory_get(key='draft'), tighten it, save the result "
    "with memory_set(key='final', value=<text>) and answer with the final text only.",
    memory=True,
)


class Brief(BaseModel):
    topic: str


class Article(BaseModel):
    topic: str
    text: str
    llm_calls: int


@workflow
async def research_team(ctx: WorkflowContext, brief: Brief) -> Article:
    # One session for the team: the memory entries are <session>.facts, .draft, .final.
    session = ctx.run_id
    calls = 0
    for key, agent, task in (
        ("research", researcher, f"Research this topic: {brief.topic}"),
        ("write", writer, f"Write about {brief.topic} from the facts in memory."),
        ("edit", editor, "Edit the draft in memory."),
    ):
        done = await ctx.step.agent_invoke_and_wait(key, agent.with_input(task, session=session))
        calls += done.usage.llm_calls
    return Article(topic=brief.topic, text=str(done.result), llm_calls=calls)


def _value(content: str) -> Any:
    # A tool's JSON output, or its text (a string output is sent as it is).
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return content


def dev_team(body: dict[str, Any]) -> Any:
    """A script for the dev LLM that does what each agent's instructions say (not a model)."""
    from polos.devllm import Reply

    messages = body["messages"]
    role = str(messages[0].get("content", ""))
    outputs = [_value(m["content"]) for m in messages if m.get("role") == "tool"]
    topic = str(next(m["content"] for m in messages if m.get("role") == "user"))
    if role.startswith("You are a researcher"):
        if not outputs:
            facts = [f"fact {i} on {topic.split(': ', 1)[-1]}" for i in (1, 2, 3)]
            return Reply.tools(*(("memory_append", {"key": "facts", "item": f}) for f in facts))
        return Reply.text(f"I saved {len(outputs)} facts.")
    if role.startswith("You are a writer"):
        if not outputs:
            return Reply.tools(("memory_get", {"key": "facts"}))
        if len(outputs) == 1:
            draft = "Draft: " + "; ".join(outputs[0]) + "."
            return Reply.tools(("memory_set", {"key": "draft", "value": draft}))
        return Reply.text("The draft is saved.")
    if not outputs:
        return Reply.tools(("memory_get", {"key": "draft"}))
    if len(outputs) == 1:
        final = str(outputs[0]).replace("Draft: ", "")
        return Reply.tools(("memory_set", {"key": "final", "value": final}))
    return Reply.text(str(outputs[1]))


async def main() -> None:
    from polos.agent import SharedMemory
    from polos.devllm import LABEL, DevLLM
    from polos.testing import EmbeddedServer, PolosEnvironment, fast_settings

    devllm = None
    if not os.environ.get("OPENAI_API_KEY") and not os.environ.get("OPENAI_BASE_URL"):
        devllm = await DevLLM(responder=dev_team).start()
        os.environ["OPENAI_BASE_URL"] = devllm.url
        print(f"OPENAI_API_KEY is not set: using the {LABEL} at {devllm.url}, scripted")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedServer(tmp, port=0) as server:
        async with PolosEnvironment(
            fast_settings(server.url, prefix="example"),
            [research_team, agent_workflow],
        ) as env:
            handle = await env.client.start(research_team, Brief(topic="durable execution"))
            article = await handle.result(timeout=120)
            print(f"run {handle.run_id}: {article!r}")
            memory = SharedMemory(env.client.js, env.settings.prefix, handle.run_id)
            for name, value in sorted((await memory.snapshot()).items()):
                print(f"  memory {name}: {value!r}")
    if devllm is not None:
        with contextlib.suppress(Exception):
            await devllm.stop()


if __name__ == "__main__":
    asyncio.run(main())

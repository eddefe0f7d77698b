"""The built-in tools through real agent runs under authentication, the real openai client
against the dev LLM: ``create_web_search_tool`` against a fake Tavily server this test runs,
``sandbox_tools`` in a local workspace (exec allowlist, approvals through suspend, files) and
the Docker environment's clear refusal where no Docker daemon answers."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from polos import Agent, WorkflowContext, workflow
from polos import history as ev
from polos._private.run import waits as waiting
from polos.agent import agent_workflow
from polos.devllm import DevLLM, Reply
from polos.tools import (
    DockerEnvironmentConfig,
    ExecToolConfig,
    LocalEnvironmentConfig,
    SandboxToolsConfig,
    WebSearchToolConfig,
    create_web_search_tool,
    docker_status,
    evaluate_allowlist,
    sandbox_tools,
)


@pytest.fixture
async def llm() -> Any:
    async with DevLLM() as server:
        yield server


# --------------------------------------------------------------------------- a fake Tavily


class FakeTavily:
    """Tavily's ``POST /search`` on a free port: records what it gets, answers like Tavily."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((dict(self.headers), body))
                if self.path != "/search":
                    return self._send(404, {"detail": "not found"})
                if self.headers.get("Authorization") != f"Bearer {fake.key}":
                    return self._send(
                        401, {"detail": {"error": "Unauthorized: missing or invalid API key."}}
                    )
                self._send(
                    200,
                    {
                        "query": body["query"],
                        "answer": f"an answer about {body['query']}",
                        "results": [
                            {
                                "title": f"Result {i}",
                                "url": f"https://example.com/{i}",
                                "content": f"content {i}",
                                "score": 0.9 - i / 10,
                                "published_date": "2026-01-0" + str(i + 1),
                            }
                            for i in range(body["max_results"])
                        ],
                    },
                )

            def _send(self, status: int, payload: Any) -> None:
                raw = orjson.dumps(payload)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tavily() -> Iterator[FakeTavily]:
    fake = FakeTavily("tvly-test-key")
    yield fake
    fake.close()


searcher = Agent("parity_searcher", model="gpt-4o", tools=[create_web_search_tool()])


@workflow
async def search_wf(ctx: WorkflowContext, text: str) -> dict[str, Any]:
    r = await ctx.step.agent_invoke_and_wait("search", searcher.with_input(text))
    return {"text": r.result, "run_id": r.run_id}


def _tool_outputs(llm: DevLLM, n: int) -> list[str]:
    return [m["content"] for m in llm.chat_requests[n].body["messages"] if m["role"] == "tool"]


async def test_web_search_calls_tavily_once_and_gives_the_model_its_results(
    env_factory: Any, llm: DevLLM, tavily: FakeTavily, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAVILY_API_KEY", "tvly-test-key")
    tool = create_web_search_tool(WebSearchToolConfig(base_url=tavily.url, max_results=3))
    searcher.tools = [tool]
    searcher.config = dataclasses.replace(searcher.config, base_url=llm.url)
    llm.script(
        Reply.tools(("web_search", {"query": "durable agents", "maxResults": 2})),
        Reply.tools(("web_search", {"query": "nats", "topic": "news"})),
        Reply.text("found it"),
    )
    env = await env_factory([search_wf, agent_workflow])
    out = await (await env.client.start(search_wf, "search")).result(timeout=20)
    assert out["text"] == "found it"
    schema = llm.chat_requests[0].body["tools"][0]["function"]["parameters"]
    assert set(schema["properties"]) == {"query", "maxResults", "topic"}
    headers, body = tavily.requests[0]
    assert headers["Authorization"] == "Bearer tvly-test-key"
    assert body == {
        "query": "durable agents",
        "max_results": 2,
        "search_depth": "basic",
        "include_answer": True,
        "include_raw_content": False,
        "topic": "general",
    }
    assert tavily.requests[1][1]["max_results"] == 3 and tavily.requests[1][1]["topic"] == "news"
    assert len(tavily.requests) == 2  # once per call
    [first] = _tool_outputs(llm, 1)
    assert orjson.loads(first) == {
        "query": "durable agents",
        "answer": "an answer about durable agents",
        "results": [
            {
                "title": f"Result {i}",
                "url": f"https://example.com/{i}",
                "content": f"content {i}",
                "score": pytest.approx(0.9 - i / 10),
                "publishedDate": f"2026-01-0{i + 1}",
            }
            for i in range(2)
        ],
    }
    # The search is a durable step inside the tool call: a replay returns it, never searches.
    history = await env.client.history(out["run_id"])
    keys = [e.key for _, e in history if isinstance(e, ev.StepCompleted)]
    assert "search/tool/1/web_search/web_search" in keys and "search/tool/1/web_search" in keys


async def test_web_search_errors_reach_the_model_in_one_line(
    env_factory: Any, llm: DevLLM, tavily: FakeTavily, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    searcher.tools = [
        create_web_search_tool(WebSearchToolConfig(base_url=tavily.url)),
    ]
    searcher.config = dataclasses.replace(searcher.config, base_url=llm.url)
    llm.script(
        Reply.tools(("web_search", {"query": "x"})),
        Reply.text("no key"),
    )
    env = await env_factory([search_wf, agent_workflow])
    await (await env.client.start(search_wf, "search")).result(timeout=20)
    [err] = _tool_outputs(llm, 1)
    assert "web_search needs a Tavily API key: set TAVILY_API_KEY" in err
    assert tavily.requests == []
    searcher.tools = [
        create_web_search_tool(WebSearchToolConfig(base_url=tavily.url, api_key="wrong")),
    ]
    llm.script(Reply.tools(("web_search", {"query": "x"})), Reply.text("refused"))
    await (await env.client.start(search_wf, "search")).result(timeout=20)
    [err] = _tool_outputs(llm, 3)
    assert "Tavily API error (401)" in err and "Unauthorized" in err


# --------------------------------------------------------------------------- sandbox, local


def test_allowlist_refuses_shell_syntax() -> None:
    allow = ["echo *", "ls", "sh *"]
    assert evaluate_allowlist("echo hi", allow) and evaluate_allowlist("ls", allow)
    assert not evaluate_allowlist("ls -la", allow)
    assert not evaluate_allowlist("echo hi; rm -rf ~", allow)
    assert not evaluate_allowlist("echo $(whoami)", allow)
    assert not evaluate_allowlist("echo hi > /tmp/x", allow)
    assert not evaluate_allowlist("echo a && b", allow)


def test_sandbox_options_are_checked_when_configured() -> None:
    names = [t.name for t in sandbox_tools(SandboxToolsConfig(env="local"))]
    assert names == ["exec", "read", "write", "edit", "glob", "grep"]
    assert [t.name for t in sandbox_tools(SandboxToolsConfig(env="local", tools=["read"]))] == [
        "read"
    ]
    with pytest.raises(NotImplementedError, match="e2b"):
        sandbox_tools(SandboxToolsConfig(env="e2b"))
    with pytest.raises(NotImplementedError, match="idle_destroy_timeout"):
        sandbox_tools(SandboxToolsConfig(env="local", idle_destroy_timeout="1h"))
    with pytest.raises(ValueError, match="allowlist"):
        sandbox_tools(SandboxToolsConfig(env="local", exec=ExecToolConfig(security="allowlist")))
    with pytest.raises(ValueError, match="extra"):
        SandboxToolsConfig(env="local", sandbox_size="big")  # type: ignore[call-arg]


worker_bee = Agent("parity_sandbox", model="gpt-4o", tools=[], max_steps=30)


@workflow
async def sandbox_wf(ctx: WorkflowContext, text: str) -> dict[str, Any]:
    r = await ctx.step.agent_invoke_and_wait("box", worker_bee.with_input(text))
    return {"text": r.result, "run_id": r.run_id}


async def _suspended_at(env: Any, run_id: str, n: int) -> ev.RunSuspended:
    for _ in range(1500):
        history = await env.client.history(run_id)
        found = [e for _, e in history if isinstance(e, ev.RunSuspended)]
        if history and isinstance(history[-1][1], ev.RunSuspended) and len(found) == n:
            return found[-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} never suspended {n} times")


async def test_local_sandbox_files_exec_allowlist_and_approvals(
    env_factory: Any, llm: DevLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLOS_NATS_URL", "nats://worker:secret@127.0.0.1:1")
    ws = tmp_path / "ws"
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    worker_bee.tools = sandbox_tools(
        SandboxToolsConfig(
            env="local",
            local=LocalEnvironmentConfig(cwd=str(ws)),
            exec=ExecToolConfig(security="allowlist", allowlist=["echo *", "sh *"]),
        )
    )
    worker_bee.config = dataclasses.replace(worker_bee.config, base_url=llm.url)
    llm.script(
        Reply.tools(("write", {"path": "notes/a.txt", "content": "hello world\nsecond line\n"})),
        Reply.tools(
            (
                "write",
                {
                    "path": "count.sh",
                    "content": 'echo ran >> count.log\necho "$WHO [$POLOS_NATS_URL]"\n',
                },
            )
        ),
        Reply.tools(("exec", {"command": "sh count.sh", "env": {"WHO": "bee"}})),
        Reply.tools(("read", {"path": "notes/a.txt", "offset": 1})),
        Reply.tools(("edit", {"path": "notes/a.txt", "old_text": "world", "new_text": "there"})),
        Reply.tools(("glob", {"pattern": "**/*.txt"})),
        Reply.tools(("grep", {"pattern": "th.re", "context_lines": 1})),
        Reply.tools(("exec", {"command": "echo hi; cat /etc/passwd"})),  # not allowlisted
        Reply.tools(("read", {"path": str(outside)})),  # outside the workspace
        Reply.tools(("edit", {"path": "notes/a.txt", "old_text": "absent", "new_text": "x"})),
        Reply.text("done"),
    )
    env = await env_factory([sandbox_wf, agent_workflow])
    h = await env.client.start(sandbox_wf, "work in the box")
    child = waiting.child_run_id(h.run_id, "box", 0)
    sus = await _suspended_at(env, child, 1)
    assert sus.step == "box/tool/8/exec/approve_exec"
    assert sus.data["_source"] == "exec_security"
    assert sus.data["_form"]["context"]["command"] == "echo hi; cat /etc/passwd"
    await env.client.resume(child, sus.step, {"approved": False, "feedback": "no chaining"})
    sus = await _suspended_at(env, child, 2)
    assert sus.step == "box/tool/9/read/approve_read"
    assert sus.data["_source"] == "path_approval"
    assert sus.data["_form"]["context"]["path"] == str(outside.resolve())
    await env.client.resume(child, sus.step, {"approved": True})
    out = await h.result(timeout=30)
    assert out["text"] == "done"

    outputs = [orjson.loads(c) for c in _tool_outputs(llm, 10)]
    assert outputs[0] == {"success": True, "path": str((ws / "notes/a.txt").resolve())}
    assert outputs[2]["exit_code"] == 0 and outputs[2]["truncated"] is False
    assert outputs[2]["stdout"] == "bee []\n"  # its env, not the worker's credentials
    assert outputs[3] == {"content": "second line\n", "path": str((ws / "notes/a.txt").resolve())}
    assert outputs[4]["success"] is True
    assert outputs[5] == {"files": [str((ws / "notes/a.txt").resolve())]}
    assert outputs[6] == {
        "matches": [
            {
                "path": str((ws / "notes/a.txt").resolve()),
                "line": 1,
                "text": "hello there",
                "context": ["hello there", "second line"],
            }
        ]
    }
    assert outputs[7] == {
        "exit_code": -1,
        "stdout": "",
        "stderr": "Command rejected by user: echo hi; cat /etc/passwd\nUser feedback: no chaining",
        "duration_ms": 0,
        "truncated": False,
    }
    assert outputs[8]["content"] == "secret\n"
    assert "old_text not found in" in outputs[9]["error"]
    assert (ws / "notes/a.txt").read_text() == "hello there\nsecond line\n"
    # Two suspends, so the loop replayed twice: the command that completed never ran again.
    assert (ws / "count.log").read_text() == "ran\n"
    history = await env.client.history(out["run_id"])
    tools = [e for _, e in history if isinstance(e, ev.StepCompleted) and e.kind == "tool"]
    assert len(tools) == 10 and len({e.key for e in tools}) == 10


async def test_docker_sandbox_refuses_clearly_without_a_daemon(
    env_factory: Any, llm: DevLLM
) -> None:
    reason = docker_status()
    if reason is None:
        pytest.skip("a Docker daemon answers here: test_docker_sandbox_runs_commands covers it")
    worker_bee.tools = sandbox_tools(
        SandboxToolsConfig(env="docker", exec=ExecToolConfig(security="allow-always"))
    )
    worker_bee.config = dataclasses.replace(worker_bee.config, base_url=llm.url)
    llm.script(Reply.tools(("exec", {"command": "echo hi"})), Reply.text("no docker"))
    env = await env_factory([sandbox_wf, agent_workflow])
    out = await (await env.client.start(sandbox_wf, "docker")).result(timeout=20)
    assert out["text"] == "no docker"
    [err] = _tool_outputs(llm, 1)
    assert "SandboxUnavailableError: sandbox_tools(env='docker') needs a Docker daemon" in err
    assert reason in orjson.loads(err)["error"]


@pytest.mark.skipif(
    docker_status() is not None,
    reason=f"no Docker daemon here ({docker_status()}): the Docker sandbox is not exercised",
)
async def test_docker_sandbox_runs_commands(env_factory: Any, llm: DevLLM, tmp_path: Path) -> None:
    worker_bee.tools = sandbox_tools(
        SandboxToolsConfig(
            env="docker",
            docker=DockerEnvironmentConfig(image="busybox", workspace_dir=str(tmp_path)),
        )
    )
    worker_bee.config = dataclasses.replace(worker_bee.config, base_url=llm.url)
    llm.script(
        Reply.tools(("write", {"path": "a.txt", "content": "in the box\n"})),
        Reply.tools(("exec", {"command": "cat /workspace/a.txt"})),
        Reply.text("ok"),
    )
    env = await env_factory([sandbox_wf, agent_workflow])
    await (await env.client.start(sandbox_wf, "docker")).result(timeout=120)
    [w, e] = [orjson.loads(c) for c in _tool_outputs(llm, 2)]
    assert w == {"success": True, "path": "/workspace/a.txt"}
    assert e["exit_code"] == 0 and e["stdout"] == "in the box\n"

"""The UI's approval page answers an agent's ``ask_user`` question and a gated tool's approval
in a real headless Chromium, under authentication (tests/uistack.py); the agent then goes on
with the answer."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from polos import Agent, RunNotFoundError, WorkflowContext, tool, workflow
from polos._private.run import waits as waiting
from polos.agent import agent_workflow
from polos.devllm import Reply
from polos.tools import create_ask_user_tool
from tests.uistack import browser, logged_in_page, shot, stack_fixture, until

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["browser"]


@tool(approval="always")
def send_email(to: str, subject: str) -> str:
    """Send an email.

    Args:
        to: the address
        subject: the subject line
    """
    return f"sent {subject!r} to {to}"


painter = Agent(
    "ui_painter", model="gpt-4o", tools=[create_ask_user_tool(), send_email], max_steps=10
)


@workflow
async def ui_paint(ctx: WorkflowContext, text: str) -> str:
    r = await ctx.step.agent_invoke_and_wait("paint", painter.with_input(text))
    return str(r.result)


ui_stack = stack_fixture(lambda: [ui_paint, agent_workflow])


async def _waiting(stack: Any, run_id: str) -> dict[str, Any]:
    async def check() -> Any:
        try:
            info = await stack.client.get(run_id)
        except RunNotFoundError:  # the child run is not started yet
            return None
        return info.waiting if info.waiting and info.waiting.get("data") else None

    return dict(await until(check, timeout=20, what="the agent to wait"))


async def test_ask_user_question_and_tool_approval_answered_in_the_page(
    ui_stack: Any, browser: Any
) -> None:
    painter.config = painter.config.__class__(
        **{**painter.config.__dict__, "base_url": ui_stack.llm.url}
    )
    question = {
        "question": "Which color, and how many coats?",
        "title": "Paint job",
        "fields": [
            {
                "key": "color",
                "type": "select",
                "label": "Color",
                "required": True,
                "options": [{"label": "Red", "value": "red"}, {"label": "Blue", "value": "blue"}],
            },
            {"key": "coats", "type": "number", "label": "Coats"},
            {"key": "glossy", "type": "boolean", "label": "Glossy finish"},
            {"key": "notes", "type": "textarea", "label": "Notes", "description": "Anything else"},
        ],
    }
    ui_stack.llm.script(
        Reply.tools(("ask_user", question)),
        Reply.tools(("send_email", {"to": "a@example.com", "subject": "paint"})),
        Reply.text("painting booked"),
    )
    h = await ui_stack.client.start(ui_paint, "paint my fence")
    child = waiting.child_run_id(h.run_id, "paint", 0)
    w = await _waiting(ui_stack, child)
    assert w["step"] == "paint/tool/1/ask_user/ask_user"
    url = w["data"]["_approval_url"]
    page = await logged_in_page(browser, ui_stack)
    await page.goto(url)
    await page.wait_for_selector("#approval-form")
    assert await page.locator("h1").inner_text() == "Paint job"
    body = await page.locator(".card").inner_text()
    assert "Which color, and how many coats?" in body and "Anything else" in body
    assert "source ask_user" in await page.locator("p.small").first.inner_text()
    await page.select_option("#f-color", "blue")
    await page.fill("#f-coats", "2")
    await page.check("input[name=glossy]")
    await page.fill("#f-notes", "mind the roses")
    await shot(page, "ask-user")
    await page.click("button[value=submit]")
    await page.wait_for_selector("#approval-done")

    # The agent got the answer, then asks for approval of a gated tool: the same page.
    w = await _waiting(ui_stack, child)
    assert w["step"] == "paint/tool/2/send_email/approval"
    await page.goto(w["data"]["_approval_url"])
    await page.wait_for_selector("#approval-form")
    assert await page.locator("h1").inner_text() == "Approve tool: send_email"
    assert '"subject": "paint"' in await page.locator(".card pre").first.inner_text()
    await page.click("button[value=approve]")
    await page.wait_for_selector("#approval-done")
    assert await h.result(timeout=20) == "painting booked"
    answer = [
        m["content"] for m in ui_stack.llm.chat_requests[1].body["messages"] if m["role"] == "tool"
    ]
    assert orjson.loads(answer[0]) == {
        "color": "blue",
        "coats": 2,
        "glossy": True,
        "notes": "mind the roses",
    }
    sent = [m for m in ui_stack.llm.chat_requests[2].body["messages"] if m["role"] == "tool"]
    assert sent[-1]["content"] == "sent 'paint' to a@example.com"
    await page.context.close()

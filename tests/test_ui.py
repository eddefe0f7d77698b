"""The web UI in a real headless Chromium, against a real namespace under authentication: the
UI connects as the client role, the worker as the worker role, the services as the service
role (tests/uistack.py). One server, one UI and one browser for the module.

Screenshots of every page go to $POLOS_UI_SCREENSHOTS when it is set (docs/ui.md keeps a few).
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
from pydantic import BaseModel

from polos import Agent, RetryPolicy, WorkflowContext, workflow
from polos.agent import agent_workflow
from polos.devllm import Reply
from tests.uistack import browser, http, logged_in_page, shot, stack_fixture, until

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["browser"]

ATTEMPTS: collections.Counter[str] = collections.Counter()


class Order(BaseModel):
    id: str
    amount: float
    express: bool = False


def validate(order: Order) -> dict[str, Any]:
    return {"ok": order.amount > 0}


def charge(order: Order) -> dict[str, Any]:
    ATTEMPTS[order.id] += 1
    if ATTEMPTS[order.id] < 2:
        raise ConnectionError(f"card network timed out for {order.id}")
    return {"charged": order.amount}


@workflow
async def ui_order(ctx: WorkflowContext, order: Order) -> dict[str, Any]:
    """Validate, charge (retried), done."""
    v = await ctx.step.run("validate", validate, order)
    c = await ctx.step.run(
        "charge", charge, order, retry=RetryPolicy(max_attempts=3, initial_interval=0.01)
    )
    return {"valid": v["ok"], **c}


@workflow
async def ui_review(ctx: WorkflowContext, order: Order) -> dict[str, Any]:
    """A human approves the refund."""
    link = ctx.approval_url("refund_review")
    decision = await ctx.step.suspend(
        "refund_review",
        data={
            "_form": {
                "title": f"Refund {order.id}?",
                "description": "The customer asks for a refund.",
                "fields": [
                    {"key": "approved", "type": "boolean", "label": "Approve the refund"},
                    {"key": "note", "type": "text", "label": "Note to the customer"},
                ],
                "context": {"order": order.id, "amount": order.amount},
            },
            "link_before": link,
        },
    )
    return {"decision": decision.data}


@workflow
async def ui_echo(ctx: WorkflowContext, text: str) -> str:
    await ctx.step.run("echo", lambda: text)
    return text


def check_inventory(sku: str) -> dict[str, Any]:
    """How many items are in stock.

    Args:
        sku: the stock keeping unit
    """
    return {"sku": sku, "in_stock": 7}


def ship(sku: str) -> str:
    """Ship an item.

    Args:
        sku: the stock keeping unit
    """
    return "shipped"


clerk = Agent(
    "ui_clerk", model="gpt-4o", instructions="You check stock.", tools=[check_inventory, ship]
)


@workflow
async def ui_agent(ctx: WorkflowContext, text: str) -> str:
    r = await ctx.step.agent_invoke_and_wait("stock", clerk.with_input(text))
    return str(r.result)


ui_stack = stack_fixture(lambda: [ui_order, ui_review, ui_echo, ui_agent, agent_workflow])


async def test_runs_page_lists_a_new_run_without_a_reload(ui_stack: Any, browser: Any) -> None:
    page = await logged_in_page(browser, ui_stack)
    await page.goto(f"{ui_stack.url}/runs")
    await page.wait_for_selector("#runs-live[data-live]")
    marker = await page.evaluate("window.__marker = Math.random()")
    h = await ui_stack.client.start(ui_order, Order(id="o-1", amount=12.5))
    row = page.locator(f'tr[data-run="{h.run_id}"]')
    await row.wait_for(timeout=15000)
    await page.wait_for_selector(
        f'tr[data-run="{h.run_id}"][data-status="completed"]', timeout=15000
    )
    assert await page.evaluate("window.__marker") == marker  # the same page: pushed, not reloaded
    assert "ui_order" in await row.inner_text()
    await shot(page, "runs")
    # Filters: by status and workflow, and a run id search goes to the run.
    await page.goto(f"{ui_stack.url}/runs?status=completed&workflow=ui_order")
    assert await page.locator(f'tr[data-run="{h.run_id}"]').count() == 1
    await page.goto(f"{ui_stack.url}/runs?status=failed")
    assert await page.locator(f'tr[data-run="{h.run_id}"]').count() == 0
    await page.goto(f"{ui_stack.url}/runs?q={h.run_id}")
    assert page.url.endswith(f"/runs/{h.run_id}")
    # A phone-sized window: one column, nothing cut off sideways.
    phone = await logged_in_page(browser, ui_stack, width=390, height=844)
    await phone.goto(f"{ui_stack.url}/runs")
    await phone.locator(f'tr[data-run="{h.run_id}"]').wait_for()
    assert await phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    await shot(phone, "runs-phone")
    await page.context.close()
    await phone.context.close()


async def test_run_page_shows_steps_retries_and_output(ui_stack: Any, browser: Any) -> None:
    h = await ui_stack.client.start(ui_order, Order(id="o-2", amount=30))
    await h.result(timeout=20)
    page = await logged_in_page(browser, ui_stack)
    await page.goto(f"{ui_stack.url}/runs/{h.run_id}")
    timeline = page.locator("ol.timeline")
    text = await timeline.inner_text()
    assert "validate: run" in text and "charge: run" in text
    assert "attempt 1 failed" in text and "card network timed out for o-2" in text
    assert "claimed by" in text and "completed" in text
    assert await page.locator('li[data-kind="step"][data-key="charge"] .dur').count() == 1
    assert await page.locator("#run-status").get_attribute("data-status") == "completed"
    assert '"charged": 30' in await page.locator("#p-output pre").inner_text()
    await shot(page, "run")
    # Re-run: a new run with the same input.
    page.once("dialog", lambda d: d.accept())
    await page.click("text=Re-run with the same input")
    await page.wait_for_url("**done=started")
    new_id = page.url.rsplit("/", 1)[-1].split("?")[0]
    assert new_id != h.run_id
    rerun = await ui_stack.client.get_handle(new_id, "ui_order").result(timeout=20)
    assert rerun == {"valid": True, "charged": 30}
    await page.context.close()


async def test_approving_in_the_approvals_page_completes_the_run(
    ui_stack: Any, browser: Any
) -> None:
    page = await logged_in_page(browser, ui_stack)
    await page.goto(f"{ui_stack.url}/approvals")
    h = await ui_stack.client.start(ui_review, Order(id="o-3", amount=99))
    row = page.locator(f'tr[data-run="{h.run_id}"]')
    await row.wait_for(timeout=15000)  # pushed to the open inbox
    assert "Refund o-3?" in await row.inner_text()
    await shot(page, "approvals")
    await row.locator("text=Open").click()
    await page.wait_for_selector("#approval-form")
    # The stable link: the same page the workflow was told about before it suspended.
    info = await ui_stack.client.get(h.run_id)
    data = info.waiting["data"]
    assert data["_approval_url"] == f"{ui_stack.url}/approve/{h.run_id}/refund_review"
    assert data["link_before"] == data["_approval_url"]
    assert page.url == data["_approval_url"]
    assert '"amount": 99' in await page.locator("pre").first.inner_text()
    await page.fill("#f-note", "refunded in full")
    await shot(page, "approve")
    await page.click("button[value=approve]")
    await page.wait_for_selector("#approval-done")
    assert await h.result(timeout=20) == {
        "decision": {"approved": True, "note": "refunded in full"}
    }
    # Answered: the page says so, a second answer changes nothing.
    await page.goto(data["_approval_url"])
    await page.wait_for_selector("#approval-handled")
    await page.context.close()


async def test_a_signed_link_opens_one_approval_and_nothing_else(
    ui_stack: Any, browser: Any
) -> None:
    h = await ui_stack.client.start(ui_review, Order(id="o-4", amount=5))
    await until(
        lambda: (
            ui_stack.ui.index.get(h.run_id) is not None
            and ui_stack.ui.index.get(h.run_id).status == "suspended"
        ),
        what="the suspend",
    )
    sig = ui_stack.ui.secrets.link_sig(h.run_id, "refund_review")
    link = f"{ui_stack.url}/approve/{h.run_id}/refund_review?sig={sig}"
    ctx = await browser.new_context()  # no session cookie: only the link
    page = await ctx.new_page()
    await page.goto(link)
    await page.wait_for_selector("#approval-form")
    assert await page.locator("nav.main").count() == 0
    await page.click("button[value=reject]")
    await page.wait_for_selector("#approval-done")
    assert await h.result(timeout=20) == {"decision": {"approved": False}}
    for path in ["/runs", f"/runs/{h.run_id}", f"/approve/{h.run_id}/other?sig={sig}"]:
        await page.goto(ui_stack.url + path)
        assert "/login" in page.url or await page.locator("#approval-form").count() == 0
    await ctx.close()


async def test_agent_trace_shows_decisions_tool_calls_and_totals(
    ui_stack: Any, browser: Any
) -> None:
    clerk.config = clerk.config.__class__(**{**clerk.config.__dict__, "base_url": ui_stack.llm.url})
    ui_stack.llm.script(
        Reply.tools(("check_inventory", {"sku": "A-1"}), reasoning="I must know the stock first"),
        Reply.text("7 in stock."),
    )
    h = await ui_stack.client.start(ui_agent, "how many A-1?")
    assert await h.result(timeout=30) == "7 in stock."
    page = await logged_in_page(browser, ui_stack)
    await page.goto(f"{ui_stack.url}/runs/{h.run_id}")
    assert "polos_agent" in await page.inner_text("#child-runs")  # the agent's child run
    await page.click("text=Agent trace")
    llm = page.locator('.llm-call[data-step="stock/llm/1"]')
    text = await llm.inner_text()
    assert "chose check_inventory" in text and "not chosen: ship" in text
    assert "I must know the stock first" in text and "gpt-4o" in text
    tool = page.locator('.tool-call[data-step="stock/tool/1/check_inventory"]')
    tool_text = await tool.inner_text()
    assert '"sku":"A-1"' in tool_text.replace(" ", "") and '"in_stock": 7' in tool_text
    assert "chosen by stock/llm/1" in tool_text
    totals = await page.locator(".card").first.inner_text()
    assert "2 LLM call(s)" in totals  # the child agent run's calls, rolled up to the root
    await page.click("#msgs-stock-llm-1 summary")
    assert "how many A-1?" in await llm.inner_text()
    await shot(page, "trace")
    await page.context.close()


async def test_a_script_in_a_run_input_renders_as_text(ui_stack: Any, browser: Any) -> None:
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    h = await ui_stack.client.start(ui_echo, evil)
    await h.result(timeout=20)
    page = await logged_in_page(browser, ui_stack)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    for path in [f"/runs/{h.run_id}", "/runs", f"/traces/{h.run_id}"]:
        await page.goto(ui_stack.url + path)
        await page.wait_for_load_state("load")
    await page.goto(f"{ui_stack.url}/runs/{h.run_id}")
    shown = await page.locator("#p-input pre").inner_text()
    assert evil in shown
    assert await page.locator("#p-input pre script, #p-input pre img").count() == 0
    assert dialogs == []
    await page.context.close()


async def test_without_the_credential_nothing_answers(ui_stack: Any, browser: Any) -> None:
    h = await ui_stack.client.start(ui_echo, "secret-input-7")
    await h.result(timeout=20)
    ctx = await browser.new_context()
    page = await ctx.new_page()
    await page.goto(f"{ui_stack.url}/runs/{h.run_id}")
    assert "/login" in page.url and "secret-input-7" not in await page.content()
    await shot(page, "login")
    await page.fill("#token", "not-the-token")
    await page.click("button[type=submit]")
    assert "not this UI's token" in await page.content()
    paths = [
        "/",
        "/runs",
        f"/runs/{h.run_id}",
        f"/runs/{h.run_id}/json?seq=1&field=input",
        f"/traces/{h.run_id}",
        "/approvals",
        f"/approve/{h.run_id}/x",
        "/workflows",
        "/workflows/ui_echo",
        "/events",
        "/queues",
        "/workers",
        "/schedules",
        "/dlq",
        "/sql",
        "/live/runs",
        f"/live/runs/{h.run_id}",
        "/live/approvals",
        "/api/runs",
    ]
    for path in paths:
        for headers in ({}, {"accept": "text/html"}, {"authorization": "Bearer wrong"}):
            got = await http(ui_stack.url + path, headers=headers)
            assert got.status in (303, 401), (path, headers, got.status)
            assert "secret-input-7" not in got.body and h.run_id not in got.body
    got = await http(f"{ui_stack.url}/runs/{h.run_id}/cancel", method="POST", data=b"")
    assert got.status == 401
    # The token as a bearer works for scripts; a wrong token in the URL sets no cookie.
    ok = await http(
        f"{ui_stack.url}/runs/{h.run_id}",
        headers={"authorization": f"Bearer {ui_stack.ui.secrets.token}"},
    )
    assert ok.status == 200 and "secret-input-7" in ok.body
    bad = await http(f"{ui_stack.url}/runs?token=wrong")
    assert bad.status == 401 and "set-cookie" not in bad.headers
    await ctx.close()


async def test_actions_need_this_sessions_csrf_token_and_origin(
    ui_stack: Any, browser: Any
) -> None:
    h = await ui_stack.client.start(ui_review, Order(id="o-5", amount=1))
    await until(
        lambda: (
            ui_stack.ui.index.get(h.run_id) is not None
            and ui_stack.ui.index.get(h.run_id).status == "suspended"
        ),
        what="the suspend",
    )
    page = await logged_in_page(browser, ui_stack)
    cookies = await page.context.cookies()
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in cookies)
    form = {"content-type": "application/x-www-form-urlencoded", "cookie": cookie}
    no_token = await http(
        f"{ui_stack.url}/runs/{h.run_id}/cancel", method="POST", data=b"reason=x", headers=form
    )
    assert no_token.status == 403 and "CSRF" in no_token.body
    await page.goto(f"{ui_stack.url}/runs/{h.run_id}")
    token = await page.locator("input[name=_csrf]").first.get_attribute("value")
    cross = await http(
        f"{ui_stack.url}/runs/{h.run_id}/cancel",
        method="POST",
        data=f"_csrf={token}".encode(),
        headers={**form, "origin": "http://evil.example", "sec-fetch-site": "cross-site"},
    )
    assert cross.status == 403
    assert (await ui_stack.client.get(h.run_id)).status == "suspended"
    # With the token, from the page itself: the cancel goes through.
    page.once("dialog", lambda d: d.accept())
    await page.click("text=Cancel run")
    await page.wait_for_url("**done=cancelled")
    await until(lambda: _status_is(ui_stack, h.run_id, "cancelled"), what="the cancel")
    await page.context.close()


async def _status_is(stack: Any, run_id: str, status: str) -> bool:
    return (await stack.client.get(run_id)).status == status


async def test_workflow_form_events_and_the_other_pages(ui_stack: Any, browser: Any) -> None:
    page = await logged_in_page(browser, ui_stack)
    await page.goto(f"{ui_stack.url}/workflows")
    assert "ui_order" in await page.content()
    await shot(page, "workflows")
    await page.goto(f"{ui_stack.url}/workflows/ui_order")
    await page.fill("#i-amount", "4.5")  # the required id left empty
    await page.click("#start-form button[type=submit]")
    assert "id: a value is required" in await page.content()  # said, nothing started
    await page.fill("#i-id", "o-9")
    await page.fill("#i-amount", "4.5")
    await page.check("input[name=express]")
    await shot(page, "workflow")
    await page.click("#start-form button[type=submit]")
    await page.wait_for_url("**/runs/*")
    run_id = page.url.rsplit("/", 1)[-1].split("?")[0]
    assert await ui_stack.client.get_handle(run_id, "ui_order").result(timeout=20) == {
        "valid": True,
        "charged": 4.5,
    }
    await page.goto(f"{ui_stack.url}/events")
    await page.fill("#topic", "warehouse.pickup/42")
    await page.fill("#data", '{"by": "ada"}')
    await page.click("button[type=submit]")
    assert "published on 'warehouse.pickup/42'" in await page.inner_text("#event-result")
    await shot(page, "events")
    for path, what in [
        ("/queues", "Queues"),
        ("/workers", "ui_order"),
        ("/schedules", "Schedules"),
        ("/dlq", "Dead letters"),
        ("/sql", "SQL"),
    ]:
        await page.goto(ui_stack.url + path)
        assert what in await page.content(), path
        await shot(page, path.strip("/"))
    await page.goto(f"{ui_stack.url}/runs")  # by now with every kind of run of this module
    await shot(page, "runs-many")
    await page.context.close()

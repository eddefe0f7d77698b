"""One namespace under authentication with the web UI in front of it, for a whole test module:
orchestrator and scheduler as the service role, a worker as the worker role, the UI as the
client role (as `polos up` runs them), a dev LLM for agents, and a real headless Chromium
(Debian's ``chromium``, driven by Playwright's Python package; never a downloaded browser).

A module takes ``ui_stack`` (and ``browser`` for pages) and marks its tests
``pytest.mark.asyncio(loop_scope="module")``: one server, one UI and one browser per module.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from polos import PolosClient, Worker
from polos._private.ops import auth
from polos._private.ops.server import default_config
from polos.config import Settings
from polos.devllm import DevLLM
from polos.testing import EmbeddedServer, fast_settings
from polos_ui import UIConfig, UIServer

CHROMIUM = (
    os.environ.get("POLOS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
# Chromium on a machine without network: no background connections to refuse, no sandbox
# (root in CI), a fresh profile (Playwright makes one per launch).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("POLOS_UI_SCREENSHOTS") or "")


@dataclass
class UIStack:
    server: EmbeddedServer
    creds: dict[str, dict[str, str]]
    prefix: str
    client: PolosClient
    ui: UIServer
    llm: DevLLM
    data_dir: Path
    services: list[Any] = field(default_factory=list)

    def settings(self, role: str) -> Settings:
        return fast_settings(
            auth.url_for(self.creds, f"{self.prefix}-{role}", self.server.url), prefix=self.prefix
        )

    @property
    def url(self) -> str:
        return self.ui.base_url


async def start_stack(
    tmp: Path,
    workflows: list[Any],
    *,
    export_dir: Path | None = None,
    ui_url_for_workers: bool = True,
) -> UIStack:
    from polos_services.orchestrator import Orchestrator
    from polos_services.scheduler import Scheduler

    prefix = f"u{uuid.uuid4().hex[:8]}"
    creds = auth.ensure_credentials(tmp / "credentials.json", [prefix])
    conf = auth.write_server_config(tmp / "nats-auth.conf", default_config(), creds)
    server = EmbeddedServer(tmp / "data", port=0, config=conf)
    server.start()

    def settings(role: str) -> Settings:
        return fast_settings(auth.url_for(creds, f"{prefix}-{role}", server.url), prefix=prefix)

    llm = DevLLM()
    await llm.start()
    orch = Orchestrator(settings("service"))
    await orch.start()
    sched = Scheduler(settings("service"))
    await sched.start()
    ui = UIServer(
        UIConfig(
            settings=settings("client"),
            port=0,
            data_dir=tmp / "ui",
            export_dir=export_dir,
            live_interval=0.05,
        )
    )
    await ui.start()
    worker_settings = settings("worker")
    if ui_url_for_workers:
        worker_settings = worker_settings.with_(ui_url=ui.base_url)
    services: list[Any] = [ui, sched, orch]
    if workflows:
        worker = Worker(workflows, settings=worker_settings)
        await worker.start()
        services.insert(0, worker)
    client = await PolosClient.connect(settings=settings("client"))
    return UIStack(server, creds, prefix, client, ui, llm, tmp, services)


async def stop_stack(s: UIStack) -> None:
    await s.client.close()
    for svc in s.services:
        await svc.stop()
    await s.llm.stop()
    s.server.stop()


def stack_fixture(workflows: Callable[[], list[Any]], **kw: Any) -> Any:
    """A module-scoped ``ui_stack`` fixture serving ``workflows()``."""

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def ui_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[UIStack]:
        s = await start_stack(tmp_path_factory.mktemp("ui"), workflows(), **kw)
        try:
            yield s
        finally:
            await stop_stack(s)

    return ui_stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    if not CHROMIUM:
        pytest.skip(
            "no chromium found (apt-get install chromium; .ci/run installs it): "
            "the browser tests need a real Chromium"
        )
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    pw = await async_playwright().start()
    b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
    try:
        yield b
    finally:
        await b.close()
        await pw.stop()


async def logged_in_page(
    browser: Any, stack: UIStack, *, width: int = 1280, height: int = 900
) -> Any:
    """A page of a new browser context that opened the UI's token URL (the session cookie)."""
    ctx = await browser.new_context(viewport={"width": width, "height": height})
    page = await ctx.new_page()
    await page.goto(stack.ui.login_url)
    return page


async def shot(page: Any, name: str) -> None:
    """A screenshot of the page, when POLOS_UI_SCREENSHOTS names a directory."""
    if str(SHOTS) and str(SHOTS) != ".":
        SHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


async def until(check: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: str


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None


async def http(
    url: str,
    *,
    method: str = "GET",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One plain HTTP request (no redirects followed), off the event loop."""

    def go() -> Answer:
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=10) as r:
                return Answer(
                    r.status,
                    {k.lower(): v for k, v in r.headers.items()},
                    r.read().decode(errors="replace"),
                )
        except urllib.error.HTTPError as e:
            return Answer(
                e.code,
                {k.lower(): v for k, v in e.headers.items()},
                e.read().decode(errors="replace"),
            )

    return await asyncio.to_thread(go)

"""A namespace under authentication, every process on its own role's user (as `polos up` runs
it): orchestrator and scheduler as the service, workers as the worker, the client as the
client. A test module takes the fixtures with ``secured, stack = authstack.secured,
authstack.stack``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from polos import PolosClient, Worker
from polos._private.ops import auth
from polos._private.ops.server import default_config
from polos.config import Settings
from polos.testing import EmbeddedServer, fast_settings

# Users exist for these namespaces only (made before the server starts); one per test.
_PREFIXES = [f"s{uuid.uuid4().hex[:8]}" for _ in range(24)]


@dataclass
class Secured:
    server: EmbeddedServer
    creds: dict[str, dict[str, str]]
    free: list[str] = field(default_factory=lambda: list(_PREFIXES))

    def settings(self, prefix: str, role: str) -> Settings:
        return fast_settings(auth.url_for(self.creds, f"{prefix}-{role}", self.server.url),
                             prefix=prefix)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    d = tmp_path_factory.mktemp("auth")
    creds = auth.ensure_credentials(d / "credentials.json", _PREFIXES)
    conf = auth.write_server_config(d / "nats-auth.conf", default_config(), creds)
    server = EmbeddedServer(d / "data", port=0, config=conf)
    server.start()
    yield Secured(server, creds)
    server.stop()


@dataclass
class Stack:
    secured: Secured
    prefix: str
    client: PolosClient
    orchestrator: Any
    scheduler: Any
    workers: list[Worker]

    def settings(self, role: str) -> Settings:
        return self.secured.settings(self.prefix, role)

    async def worker(self, workflows: list[Any]) -> Worker:
        w = Worker(workflows, settings=self.settings("worker"))
        await w.start()
        self.workers.append(w)
        return w


@pytest.fixture
async def stack(secured: Secured) -> AsyncIterator[Stack]:
    """A fresh namespace with an orchestrator, a scheduler and a client (no worker yet:
    ``await stack.worker([...])``)."""
    from polos_services.orchestrator import Orchestrator
    from polos_services.scheduler import Scheduler

    prefix = secured.free.pop()
    orch = Orchestrator(secured.settings(prefix, "service"))
    await orch.start()
    sched = Scheduler(secured.settings(prefix, "service"))
    await sched.start()
    client = await PolosClient.connect(settings=secured.settings(prefix, "client"))
    s = Stack(secured, prefix, client, orch, sched, [])
    try:
        yield s
    finally:
        await client.close()
        for w in s.workers:
            await w.stop()
        await s.scheduler.stop()
        await s.orchestrator.stop()

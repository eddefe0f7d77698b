"""The testing point of view: a real nats-server and a whole Polos namespace in one object.

    with EmbeddedServer(tmp_path) as server:
        async with PolosEnvironment(server.url, [my_workflow]) as env:
            handle = await env.client.start(my_workflow, {...})

Timings default to tiny values so crash and failover tests run in seconds.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from polos._private.server import EmbeddedServer, server_binary
from polos.client import PolosClient
from polos.config import Settings
from polos.worker import Worker
from polos.workflow import WorkflowDefinition


def fast_settings(nats_url: str, prefix: str | None = None, **overrides: Any) -> Settings:
    """Settings with test-sized timings and a fresh namespace."""
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "prefix": prefix or f"t{uuid.uuid4().hex[:10]}",
        "task_ack_wait": 1.0,
        "heartbeat_interval": 0.25,
        "worker_ttl": 3.0,
        "service_ack_wait": 2.0,
        "request_timeout": 5.0,
        "telemetry_retry_initial": 0.05,
        "telemetry_retry_max": 0.4,
        "reconnect_max_wait": 0.5,
    }
    values.update(overrides)
    return Settings(**values)


class PolosEnvironment:
    """An orchestrator, a scheduler, optionally a worker, and a client on one namespace."""

    def __init__(
        self,
        settings: Settings,
        workflows: Iterable[WorkflowDefinition[Any, Any]] | None = None,
        *,
        with_worker: bool = True,
    ) -> None:
        self.settings = settings
        self.workflows = list(workflows or [])
        self.with_worker = with_worker and bool(self.workflows)
        self.orchestrator: Any = None
        self.scheduler: Any = None
        self.worker: Worker | None = None
        self._client: PolosClient | None = None

    @property
    def client(self) -> PolosClient:
        assert self._client is not None, "environment not started"
        return self._client

    async def start(self) -> PolosEnvironment:
        from polos_services.orchestrator import Orchestrator
        from polos_services.scheduler import Scheduler

        self._client = await PolosClient.connect(settings=self.settings)
        self.orchestrator = Orchestrator(self.settings)
        await self.orchestrator.start()
        self.scheduler = Scheduler(self.settings)
        await self.scheduler.start()
        if self.with_worker:
            self.worker = Worker(self.workflows, settings=self.settings)
            await self.worker.start()
        return self

    async def stop(self) -> None:
        for svc in (self.worker, self.scheduler, self.orchestrator):
            if svc is not None:
                await svc.stop()
        if self._client is not None:
            await self._client.close()

    async def __aenter__(self) -> PolosEnvironment:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


__all__ = ["EmbeddedServer", "PolosEnvironment", "fast_settings", "server_binary"]

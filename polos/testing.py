"""The testing point of view: a real nats-server and a whole Polos namespace in one object.

    with EmbeddedServer(tmp_path) as server:
        async with PolosEnvironment(fast_settings(server.url), [my_workflow]) as env:
            handle = await env.client.start(my_workflow, {...})

With authentication on, as ``polos up`` runs it, every component connects as its own role:

    with SecuredServer(tmp_path) as server:
        settings = server.namespace()            # a client's settings; .service, .worker too
        async with PolosEnvironment(settings, [my_workflow]) as env:
            ...                                  # orchestrator and scheduler as service,
                                                 # the worker as worker, env.client as client

Timings default to tiny values so crash and failover tests run in seconds.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from polos._private.ops import auth, plugins
from polos._private.ops.server import EmbeddedServer, default_config, server_binary
from polos._private.store import Names, connect, disconnect, ensure_topology
from polos.client import PolosClient
from polos.config import Settings
from polos.worker import Worker
from polos.workflow import WorkflowDefinition

ROLES = auth.ROLES


def _fast(nats_url: str, prefix: str | None) -> dict[str, Any]:
    return {
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
        "snapshot_events": 50,
    }


def fast_settings(nats_url: str, prefix: str | None = None, **overrides: Any) -> Settings:
    """Settings with test-sized timings and a fresh namespace."""
    values = _fast(nats_url, prefix)
    values.update(overrides)
    return Settings(**values)


@dataclass(frozen=True)
class RoleSettings(Settings):
    """Settings of one role of a namespace that also know the other roles' URLs (credentials),
    so one object hands each component its own role: ``s.service``, ``s.worker``, ``s.client``.

    ``with_`` keeps the roles; ``nats_url`` is the URL of ``role``.
    """

    role: str = "client"
    role_urls: tuple[tuple[str, str], ...] = ()

    def as_role(self, role: str) -> RoleSettings:
        urls = dict(self.role_urls)
        if role not in urls:
            raise ValueError(f"no credentials for role {role!r}; roles are {', '.join(urls)}")
        return replace(self, role=role, nats_url=urls[role])

    @property
    def service(self) -> RoleSettings:
        return self.as_role("service")

    @property
    def worker(self) -> RoleSettings:
        return self.as_role("worker")

    @property
    def client(self) -> RoleSettings:
        return self.as_role("client")

    def env(self, role: str | None = None) -> dict[str, str]:
        """The ``POLOS_*`` variables of ``role`` (default: this one's) for a subprocess."""
        return (self.as_role(role) if role else self).to_env()


def as_role(settings: Settings, role: str) -> Settings:
    """``settings`` for ``role``: its own URL when it knows the roles (``RoleSettings``), else
    the same settings (a server without authentication)."""
    return settings.as_role(role) if isinstance(settings, RoleSettings) else settings


async def create_topology(settings: Settings) -> None:
    """What ``polos up`` (or ``polos init``) does first: the service role creates every stream
    and bucket of the namespace."""

    service = as_role(settings, "service")
    nc = await connect(service, name="polos-test-init")
    try:
        await ensure_topology(
            nc.jetstream(timeout=service.request_timeout), Names(service.prefix), service
        )
    finally:
        await disconnect(nc)


class SecuredServer(EmbeddedServer):
    """An ``EmbeddedServer`` with authentication on, the way ``polos up`` runs it: every
    namespace has a service, a worker and a client user, each with its role's permissions
    (generated from the topology).

    Users are per namespace, so namespaces come from a pool made ahead (``pool`` at a time):
    ``namespace()`` takes the next one; when none is left, the server's configuration is
    rewritten with a new batch and reloaded (SIGHUP), dropping the namespaces ``release``d
    since, so the configuration stays the size of what is in use.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        pool: int = 48,
        base_config: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("config", None)
        super().__init__(data_dir, config=Path(data_dir) / "nats-auth.conf", **kwargs)
        self.base_config = Path(base_config) if base_config else default_config()
        self.pool_size = pool
        self.creds: dict[str, dict[str, str]] = {}
        self._free: list[str] = []
        self._released: set[str] = set()
        self.reloads = 0

    # ------------------------------------------------------------------ configuration

    def _add(self, prefixes: Iterable[str]) -> None:
        for prefix in prefixes:
            for role in ROLES:
                self.creds[f"{prefix}-{role}"] = {
                    "password": uuid.uuid4().hex,
                    "role": role,
                    "prefix": prefix,
                }

    def _write(self) -> None:
        for prefix in self._released:
            for role in ROLES:
                self.creds.pop(f"{prefix}-{role}", None)
        self._released.clear()
        auth.write_server_config(self.config, self.base_config, self.creds)

    def _batch(self) -> list[str]:
        return [f"t{uuid.uuid4().hex[:10]}" for _ in range(self.pool_size)]

    def start(self, timeout: float = 15.0) -> str:
        if not self._free and not self.creds:
            self._free = self._batch()
            self._add(self._free)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write()
        return super().start(timeout)

    def _reload(self, timeout: float = 15.0) -> None:
        """Rewrite the config and have the running server load it; returns once it has."""
        assert self.proc is not None, "server not running"
        log = self.log_file
        before = log.read_text(errors="replace").count("Reloaded server configuration")
        self._write()
        os.kill(self.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if text.count("Reloaded server configuration") > before:
                self.reloads += 1
                return
            if "Failed to reload" in text[-2000:]:
                raise RuntimeError(f"nats-server could not reload {self.config}: see {log}")
            time.sleep(0.01)
        raise TimeoutError(f"nats-server did not reload its configuration within {timeout}s")

    # ------------------------------------------------------------------ namespaces

    def namespace(
        self, prefix: str | None = None, role: str = "client", **overrides: Any
    ) -> RoleSettings:
        """Test-sized settings of a fresh namespace (``prefix`` to choose it), as ``role``."""
        if prefix is None:
            if not self._free:
                self._free = self._batch()
                self._add(self._free)
                self._reload()
            prefix = self._free.pop()
        elif f"{prefix}-client" not in self.creds:
            self._add([prefix])
            if self.proc is not None:
                self._reload()
        urls = tuple((r, auth.url_for(self.creds, f"{prefix}-{r}", self.url)) for r in ROLES)
        values = _fast(dict(urls)[role], prefix)
        values.update(overrides)
        return RoleSettings(**values, role=role, role_urls=urls)

    def release(self, prefix: str) -> None:
        """The namespace is done with: its users go at the next reload."""
        if prefix not in self._free:
            self._released.add(prefix)

    def violations(self, prefix: str, offset: int = 0) -> list[str]:
        """The server's permission violations by ``prefix``'s users, logged after ``offset``."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if "Violation" in ln and f"user:{prefix}-" in ln]

    def log_offset(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0


class PolosEnvironment:
    """An orchestrator, a scheduler, optionally a worker, and a client on one namespace.

    With ``RoleSettings`` each connects as its role: orchestrator and scheduler as service
    (they create the topology), the worker as worker, ``client`` as client.
    """

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
        # Every worker running on the namespace: ``worker`` and those ``add_worker`` started.
        self.workers: list[Worker] = []
        self._client: PolosClient | None = None

    @property
    def prefix(self) -> str:
        return self.settings.prefix

    def as_role(self, role: str) -> Settings:
        """This environment's settings for ``role`` (the same settings without auth)."""
        return as_role(self.settings, role)

    @property
    def client(self) -> PolosClient:
        assert self._client is not None, "environment not started"
        return self._client

    async def start(self) -> PolosEnvironment:
        # Services first: they create the topology the client and the worker only check.
        self.orchestrator = plugins.service("orchestrator")(self.as_role("service"))
        await self.orchestrator.start()
        self.scheduler = plugins.service("scheduler")(self.as_role("service"))
        await self.scheduler.start()
        self._client = await PolosClient.connect(settings=self.as_role("client"))
        if self.with_worker:
            self.worker = await self.add_worker(self.workflows)
        return self

    async def add_worker(
        self, workflows: Iterable[WorkflowDefinition[Any, Any]], **options: Any
    ) -> Worker:
        """Start one more worker (as the worker role) serving ``workflows``; stopped with the
        environment, or before with ``stop_worker``."""
        worker = Worker(workflows, settings=self.as_role("worker"), **options)
        await worker.start()
        self.workers.append(worker)
        return worker

    async def stop_worker(self, worker: Worker, timeout: float | None = None) -> None:
        await worker.stop(timeout=timeout)
        self.workers.remove(worker)

    async def stop(self) -> None:
        for w in list(self.workers):
            await w.stop()
        for svc in (self.scheduler, self.orchestrator):
            if svc is not None:
                await svc.stop()
        if self._client is not None:
            await self._client.close()

    async def __aenter__(self) -> PolosEnvironment:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


__all__ = [
    "EmbeddedServer",
    "PolosEnvironment",
    "RoleSettings",
    "SecuredServer",
    "as_role",
    "create_topology",
    "fast_settings",
    "server_binary",
]

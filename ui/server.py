"""The UI server: a Starlette app on uvicorn, in the process that starts it (``polos up`` or
``polos ui``), connected to NATS as the client role.

    server = UIServer(UIConfig(settings=client_settings, data_dir=Path(".polos")))
    await server.start()          # binds, connects, starts watching the run index
    print(server.login_url)       # http://127.0.0.1:4280/?token=...
    await server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn

from polos.client import PolosClient
from polos.config import Settings

from .projection import RunIndex
from .security import SECRETS_FILE, Secrets

log = logging.getLogger("polos_ui")

DEFAULT_PORT = 4280
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class UIConfig:
    """How the UI runs. ``settings`` must carry the client role's credentials."""

    settings: Settings
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # True: a busy ``port`` is not an error, the next free one is taken (the default port of
    # `polos up`); False: a busy port fails the start.
    port_fallback: bool = False
    auth: bool = True
    data_dir: Path | None = None  # where ui.json (token and signing key) is kept
    token: str | None = None  # overrides the stored token (POLOS_UI_TOKEN)
    export_dir: Path | None = None  # the analytics export the SQL page reads
    public_url: str | None = None  # the URL users reach it by, if not http://host:port
    allowed_hosts: list[str] = field(default_factory=list)  # Host headers accepted besides ours
    page_size: int = 50
    live_interval: float = 0.05  # the most often one page is re-sent while runs change
    sql_timeout: float = 20.0
    sql_row_limit: int = 1000


def service_role_refused(url: str) -> str | None:
    """Why ``url`` must not be used by the UI (it carries the service role's user), or None."""
    for one in url.split(","):
        user = urlsplit(one.strip()).username or ""
        if user.endswith("-service"):
            return (
                f"the UI acts with the client role's permissions, not the service role's "
                f"({user!r}): give it the client's URL (`polos credentials client`)"
            )
    return None


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the process that embeds it owns the signals
    (``polos up`` stops all its services on one Ctrl-C)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class UIServer:
    """The web UI as a service (``start`` / ``stop``), like the orchestrator and scheduler."""

    def __init__(self, config: UIConfig) -> None:
        self.config = config
        self.client: PolosClient | None = None
        self.index: RunIndex | None = None
        self.secrets = Secrets.load_or_create(
            (config.data_dir / SECRETS_FILE) if config.data_dir is not None else None,
            config.token or os.environ.get("POLOS_UI_TOKEN") or None,
        )
        self.port: int | None = None
        self.closing = asyncio.Event()
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    # ------------------------------------------------------------------ urls

    @property
    def base_url(self) -> str:
        """The UI's URL without credentials (approval links are made from it)."""
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        host = self.config.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}"

    @property
    def login_url(self) -> str:
        """The URL to open: with the token when auth is on (it sets the session cookie)."""
        return (
            f"{self.base_url}/?token={self.secrets.token}"
            if self.config.auth
            else f"{self.base_url}/"
        )

    @property
    def cookie_name(self) -> str:
        return f"polos-ui-{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def _bind(self) -> socket.socket:
        host, port = self.config.host, self.config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tries = 20 if self.config.port_fallback and port else 1
        last: OSError | None = None
        for n in range(tries):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host.strip("[]"), port + n if port else 0))
            except OSError as exc:
                sock.close()
                last = exc
                if exc.errno != errno.EADDRINUSE:
                    break
                continue
            sock.listen(128)
            sock.setblocking(False)
            return sock
        hint = " (--ui-port picks another, --no-ui starts none)" if self.config.port else ""
        raise OSError(f"the UI cannot listen on {host}:{port}: {last}{hint}")

    async def start(self) -> None:
        if self.config.auth and (why := service_role_refused(self.config.settings.nats_url)):
            raise ValueError(why)
        self._sock = self._bind()
        self.port = int(self._sock.getsockname()[1])
        self.client = await PolosClient.connect(settings=self.config.settings)
        self.index = RunIndex(self.client)
        await self.index.start()
        from .app import create_app

        app = create_app(self)
        cfg = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=2,
            proxy_headers=False,
        )
        self._server = _Uvicorn(cfg)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the UI server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        if self.index is not None:
            await self.index.stop()
        if self.client is not None:
            await self.client.close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()

    async def __aenter__(self) -> UIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def host_allowed(self, host_header: str) -> bool:
        """DNS rebinding defence: a UI bound to loopback answers only loopback host names (and
        the configured ones), so a page of another site that resolves to 127.0.0.1 gets nothing."""
        name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
        if name.startswith("[") and "]" in name:
            name = name[: name.index("]") + 1]
        allowed = {h.lower() for h in self.config.allowed_hosts}
        if self.config.public_url:
            allowed.add((urlsplit(self.config.public_url).hostname or "").lower())
        if self.config.host not in LOOPBACK and self.config.host not in ("0.0.0.0", "::"):
            allowed.add(self.config.host.lower())
        if self.config.host in ("0.0.0.0", "::") and not allowed:
            return True  # told to listen everywhere, with no name given: any name
        return name.lower() in LOOPBACK or name.lower() in allowed

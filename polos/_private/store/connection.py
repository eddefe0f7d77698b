"""Connecting to NATS, and what a process does when the server is not there.

Two kinds of caller, told apart by the function they call:

- ``connect``: a command or a client call. The first connection is tried once per server of
  the URL; if none answers it raises ``ConnectionFailedError`` within seconds, one line naming
  the URL (without its password) and the cause.
- ``connect_service``: a long-running process (orchestrator, scheduler, worker). It waits for
  the server with back-off, saying so once, and gives up only on what waiting cannot fix: an
  authorization or TLS failure raises at once, and when one happens on a later reconnect its
  ``on_fatal`` is called so the process can stop with a non-zero exit.

Once connected, both kinds reconnect forever with back-off (a lost server is tried again at
once, then after waits doubling up to ``Settings.reconnect_max_wait``), logging one line when
the connection is lost and one when it is back, never one per attempt. nats-py's own error
callback logs every failed attempt with a traceback; ours replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.client import Server

from polos._private.store.natspy import coalesce_writes, write_batches
from polos.config import Settings
from polos.errors import ConnectionFailedError

log = logging.getLogger("polos.connection")

FATAL_REASONS = ("authorization", "tls")
_FIRST_WAIT = 0.25


def display_url(url: str) -> str:
    """``url`` (or a comma-separated cluster list) as it may be shown: the user stays, the
    password goes."""
    out = []
    for one in (u.strip() for u in url.split(",")):
        if not one:
            continue
        full = one if "://" in one else f"nats://{one}"
        try:
            parts = urlsplit(full)
            host = parts.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            if parts.port:
                netloc += f":{parts.port}"
            if parts.username:
                netloc = f"{unquote(parts.username)}@{netloc}"
            out.append(f"{parts.scheme}://{netloc}")
        except ValueError:  # a malformed port: at least never show the password
            out.append(re.sub(r"(//[^/@:]*):[^@]*@", r"\1@", full))
    return ",".join(out)


def _has_user(url: str) -> bool:
    return all(
        "@" in (u if "://" in u else "//" + u).split("//", 1)[1]
        for u in url.split(",")
        if u.strip()
    )


def classify(exc: BaseException, *, has_user: bool, timeout: float) -> tuple[str, str]:
    """(reason, one-line detail) for a connection failure; reasons as in ConnectionFailedError."""
    text = str(exc).strip()
    low = text.lower()
    if (
        isinstance(exc, nats.errors.AuthorizationError)
        or "authorization violation" in low
        or "authentication" in low
    ):
        if has_user:
            return "authorization", (
                "authorization violation: the server refused this user and password "
                "(`polos credentials ROLE` prints the ones of the `polos up` in the data dir)"
            )
        return "authorization", (
            "authorization violation: the server requires a user and password (`polos "
            "credentials ROLE` prints a URL with them; `polos` commands find them with "
            "--data-dir or POLOS_DATA_DIR)"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls", f"TLS: {exc.verify_message or exc.reason} (POLOS_TLS_CA names a CA to trust)"
    if isinstance(exc, ssl.SSLError):
        return "tls", f"TLS: {exc.reason or text}"
    if "tls required" in low or "secure connection" in low:
        return "tls", "TLS: the server requires TLS (use a tls:// URL)"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", "connection refused (no server listening there)"
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        return "timeout", f"timed out after {timeout:g} s (no answer from the server)"
    if isinstance(exc, socket.gaierror):
        return "unreachable", f"unknown host ({exc.strerror})"
    if isinstance(exc, nats.errors.UnexpectedEOF):
        return "error", "the server closed the connection"
    if isinstance(exc, nats.errors.StaleConnectionError):
        return "error", "no answer to pings (stale connection)"
    if isinstance(exc, OSError):
        return "unreachable", exc.strerror or text or type(exc).__name__
    return "error", text or type(exc).__name__


def client_tls() -> ssl.SSLContext | None:
    """A TLS context trusting ``$POLOS_TLS_CA`` (a self-made CA), or None to use the defaults.

    ``tls://`` URLs work without it when the server's certificate chains to a public CA.
    """
    ca = os.environ.get("POLOS_TLS_CA")
    if not ca:
        return None
    ctx = ssl.create_default_context(cafile=ca)
    cert, key = os.environ.get("POLOS_TLS_CERT"), os.environ.get("POLOS_TLS_KEY")
    if cert and key:  # mutual TLS, when the server verifies clients
        ctx.load_cert_chain(cert, key)
    return ctx


class _GiveUp(Exception):
    """Raised from the error callback to end nats-py's first-connection loop, which never
    ends by itself when reconnects are unlimited."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Fatal:
    """Where a long-running process learns that its connection failed for good (the server
    refused its credentials on a reconnect). ``runtime.run_until_signal`` stops the process
    and re-raises ``error`` when a service's ``fatal`` is set."""

    def __init__(self) -> None:
        self.error: ConnectionFailedError | None = None
        self._event = asyncio.Event()

    def __call__(self, error: ConnectionFailedError) -> None:
        if self.error is None:
            self.error = error
            self._event.set()

    async def wait(self) -> ConnectionFailedError:
        await self._event.wait()
        assert self.error is not None
        return self.error


class _Link:
    """One connection's callbacks and the state they share."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        on_reconnect: Callable[[], Awaitable[None]] | None,
        on_fatal: Callable[[ConnectionFailedError], None] | None,
    ) -> None:
        self.nc = NATS()
        self.settings = settings
        self.name = name
        self.servers = [u.strip() for u in settings.nats_url.split(",") if u.strip()]
        self.url = display_url(settings.nats_url)
        self.has_user = _has_user(settings.nats_url)
        self.on_reconnect = on_reconnect
        self.on_fatal = on_fatal
        self.connecting = True
        self.failures = 0
        self.last_error: BaseException | None = None
        self.lost_at = 0.0
        self.attempt = 0
        self.failed: ConnectionFailedError | None = None
        self.abandoned = False
        self._closing: asyncio.Task[None] | None = None

    def error(self, exc: BaseException) -> ConnectionFailedError:
        reason, detail = classify(
            exc, has_user=self.has_user, timeout=self.settings.request_timeout
        )
        return ConnectionFailedError(self.url, reason, detail)

    # ------------------------------------------------------------------ nats-py callbacks

    async def error_cb(self, exc: Exception) -> None:
        self.last_error = exc
        if self.connecting:
            self.failures += 1
            if not self.error(exc).retryable or self.failures >= len(self.servers):
                raise _GiveUp(exc)
            return
        if self.abandoned or self.nc.is_closed:
            return
        if self.nc.is_reconnecting or self.nc.is_connecting:
            if not self.error(exc).retryable:
                self._fail(self.error(exc))
            # Otherwise one more failed attempt of an outage the "lost" line already announced.
            return
        if isinstance(exc, OSError | nats.errors.StaleConnectionError):
            return  # the connection is going: the "lost" line says why
        # Anything else while connected (a permission violation, a slow consumer) is one line.
        log.warning("%s: %s", self.name, exc)

    async def disconnected_cb(self) -> None:
        if not self.nc.is_reconnecting:
            return  # a close, not a loss
        self.lost_at = time.monotonic()
        self.attempt = 0
        cause = self.error(self.last_error).detail if self.last_error else "disconnected"
        log.warning("%s: lost the connection to %s (%s); reconnecting", self.name, self.url, cause)

    async def reconnected_cb(self) -> None:
        log.warning(
            "%s: the connection to %s is back after %.1f s",
            self.name,
            self.url,
            time.monotonic() - self.lost_at,
        )
        if self.on_reconnect is not None:
            await self.on_reconnect()

    async def closed_cb(self) -> None:
        # The server ends a connection whose credentials it no longer accepts with an error
        # that nats-py reports only as the connection's last error, then closes it.
        err = self.nc.last_error
        if not (self.connecting or self.abandoned) and isinstance(
            err, nats.errors.AuthorizationError
        ):
            self._fail(self.error(err))

    def pick_server(self, servers: list[Server], _info: dict[str, Any]) -> tuple[Server, float]:
        """Round robin over the servers; the first round at once, each later round after a
        wait doubling up to reconnect_max_wait (with jitter, so many processes losing one
        server do not come back in lockstep)."""
        chosen = servers[self.attempt % len(servers)]
        rounds = self.attempt // len(servers)
        self.attempt += 1
        if rounds == 0:
            return chosen, 0.0
        cap = self.settings.reconnect_max_wait
        wait = min(cap, min(_FIRST_WAIT, cap) * 2 ** (rounds - 1))
        return chosen, wait * random.uniform(0.8, 1.0)

    def _fail(self, error: ConnectionFailedError) -> None:
        if self.failed is not None:
            return
        self.failed = error
        # Retrying cannot help: stop the reconnect loop (from a task of its own, since this
        # may run inside that loop).
        self._closing = asyncio.get_running_loop().create_task(self.nc.close())
        if self.on_fatal is not None:
            self.on_fatal(error)
        else:
            log.error("%s: %s; the connection is closed", self.name, error)

    # ------------------------------------------------------------------ connecting

    async def open(self) -> NATS:
        """One round over the servers: connected, or ConnectionFailedError."""
        tls = client_tls()  # None: nats-py's default context for tls:// URLs
        timeout = self.settings.request_timeout
        try:
            # A backstop only: every step of an attempt has its own timeout.
            await asyncio.wait_for(
                self.nc.connect(
                    self.servers,
                    name=self.name,
                    error_cb=self.error_cb,
                    disconnected_cb=self.disconnected_cb,
                    reconnected_cb=self.reconnected_cb,
                    closed_cb=self.closed_cb,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_to_server_handler=self.pick_server,
                    connect_timeout=timeout,  # type: ignore[arg-type]  # a float works
                    tls=tls,
                ),
                timeout=3 * timeout * len(self.servers) + 1,
            )
        except _GiveUp as exc:
            await self._abandon()
            raise self.error(exc.cause) from None
        except TimeoutError:
            await self._abandon()
            raise self.error(self.last_error or TimeoutError()) from None
        except BaseException:
            await self._abandon()
            raise
        coalesce_writes(self.nc, self.settings.write_coalesce)
        write_batches(self.nc, self.settings.write_batch)
        self.connecting = False
        return self.nc

    async def _abandon(self) -> None:
        self.connecting = False
        self.abandoned = True
        # A half-open connection may fail to close; it is gone either way.
        with contextlib.suppress(Exception):
            await self.nc.close()


async def connect(
    settings: Settings,
    name: str,
    *,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect for a command or a client: raise ``ConnectionFailedError`` if no server of the
    URL answers (within about ``request_timeout``, at once when refused or refusing the
    credentials). Once connected, reconnects forever; an authorization failure on a reconnect
    closes the connection with one logged line."""
    return await _Link(settings, name, on_reconnect, None).open()


async def connect_service(
    settings: Settings,
    name: str,
    *,
    on_fatal: Callable[[ConnectionFailedError], None],
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect for a long-running process: wait for the server with back-off (one log line
    when it does not answer, one when it does), raise ``ConnectionFailedError`` at once on an
    authorization or TLS failure, and call ``on_fatal`` when one ends a later reconnect."""
    waited_since: float | None = None
    rounds = 0
    while True:
        try:
            nc = await _Link(settings, name, on_reconnect, on_fatal).open()
        except ConnectionFailedError as exc:
            if not exc.retryable:
                raise
            if waited_since is None:
                waited_since = time.monotonic()
                log.warning("%s: %s; waiting for it", name, exc)
            cap = settings.reconnect_max_wait
            await asyncio.sleep(
                min(cap, min(_FIRST_WAIT, cap) * 2**rounds) * random.uniform(0.8, 1.0)
            )
            rounds += 1
            continue
        if waited_since is not None:
            log.warning(
                "%s: connected to %s after %.1f s",
                name,
                display_url(settings.nats_url),
                time.monotonic() - waited_since,
            )
        return nc


async def disconnect(nc: NATS, *, flush_timeout: float = 2.0) -> None:
    """Close a connection whose owner has already stopped its own consumers.

    Not ``drain()``: nats-py's drain waits (up to 30 s) for every subscription's pending
    messages to be consumed, and an iterator subscription nobody reads any more (a KV watcher
    of a cancelled task) never empties. Unacknowledged JetStream messages are redelivered to
    another instance anyway; what matters is that our own publishes are flushed.
    """
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.flush(), timeout=flush_timeout)
    with contextlib.suppress(Exception):
        await nc.close()


__all__ = ["Fatal", "classify", "connect", "connect_service", "disconnect", "display_url"]

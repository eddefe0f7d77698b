"""Stopping asyncio tasks for sure; sharing one lookup among the callers waiting for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

log = logging.getLogger("polos.tasks")


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, patience: float = 5.0) -> None:
    """Cancel ``tasks`` and wait until they are done.

    On Python 3.11 ``asyncio.wait_for`` (used inside nats-py: KV watchers, requests) can swallow
    a cancel that lands just as the awaited thing completes, and a loop around it then runs on
    forever. So cancel again until each task is gone; after ``patience`` seconds give up with a
    log line rather than hang a shutdown.
    """
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
        if pending and loop.time() > deadline:
            log.warning(
                "%d task(s) ignored cancellation: %s",
                len(pending),
                ", ".join(t.get_name() for t in pending),
            )
            return
    for t in tasks:
        if t.done() and not t.cancelled():
            with contextlib.suppress(BaseException):
                t.exception()  # retrieved: no "exception was never retrieved" noise


_V = TypeVar("_V")


class Flights(Generic[_V]):
    """Lookups by key where concurrent callers share the one in flight.

    A cache that expires under load otherwise sends a read per caller until the first read
    returns (hundreds of dispatches at once each re-reading a queue's limit). A shared read is
    as fresh as one of the caller's own: it started after the caller's cache entry expired.
    """

    def __init__(self) -> None:
        self._flying: dict[Hashable, asyncio.Future[_V]] = {}
        self.fetches = 0

    async def get(
        self,
        key: Hashable,
        fetch: Callable[[], Awaitable[_V]],
        store: Callable[[_V], None] | None = None,
    ) -> _V:
        """``fetch()``'s value, shared with every caller asking for ``key`` meanwhile;
        ``store`` keeps it (a cache), unless ``forget(key)`` was called during the fetch."""
        flying = self._flying.get(key)
        if flying is not None:
            return await asyncio.shield(flying)
        flying = asyncio.get_running_loop().create_future()
        self._flying[key] = flying
        self.fetches += 1
        try:
            value = await fetch()
        except BaseException as exc:
            # Those sharing it see the error and may ask again; none is left waiting.
            shared = (
                exc
                if isinstance(exc, Exception)
                else RuntimeError(f"the lookup of {key!r} they shared was stopped ({exc!r})")
            )
            flying.set_exception(shared)
            flying.exception()  # retrieved: no "never retrieved" warning when no one shared it
            raise
        else:
            if store is not None and self._flying.get(key) is flying:
                store(value)
            flying.set_result(value)
            return value
        finally:
            if self._flying.get(key) is flying:
                del self._flying[key]

    def forget(self, key: Hashable) -> None:
        """A fetch in flight for ``key`` began before what the caller knows changed: later
        callers start their own, and its value is not stored."""
        self._flying.pop(key, None)

    def __len__(self) -> int:
        return len(self._flying)

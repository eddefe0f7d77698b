"""Stopping asyncio tasks for sure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

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

"""Following the log: call a pass whenever new messages arrive on some subjects, without
polling and without missing the last message of a burst.

The analytics exporter and the span follower both read streams by sequence from a position
they keep; what they need from a loop is to be woken when there is something new. New
messages are noticed by plain subscriptions on the streams' subjects, each good for one
message (the server drops it after the first delivery) and armed again before every read, so a
busy system sends a follower at most one notification per subject per pass, not a copy of
every message, and nothing stored after a read goes unnoticed.

A subscriber can hear of a message before the stream has stored it, so a pass woken by a
notification may not read that message yet: one more pass always follows a woken one (with
nothing new it costs a millisecond), and passes go on while they find something.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS

log = logging.getLogger("polos.follow")


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)


async def follow(
    nc: NATS,
    subjects: list[str],
    stop: asyncio.Event,
    run_pass: Callable[[], Awaitable[int]],
    *,
    name: str,
    interval: float = 0.0,
    idle: float = 0.0,
    max_lag: float = 30.0,
    error_delay: float = 0.5,
) -> None:
    """Run ``run_pass`` (which returns how much it handled) once at start and then whenever
    messages arrive on ``subjects``, until ``stop`` is set.

    ``interval``: at least this long between passes (batches rows into fewer files). ``idle``:
    pass only once the subjects have been quiet that long, or ``max_lag`` after the first new
    message, quiet or not, so a pass does not compete with a burst of appends. A failing pass
    is logged and tried again after ``error_delay``.
    """
    dirty = asyncio.Event()
    dirty.set()  # what accumulated while nobody followed
    notified = False
    subs: list[Any] = []

    async def poke(_msg: Any) -> None:
        nonlocal notified
        notified = True
        dirty.set()

    async def arm() -> None:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # fired ones are gone already
        subs[:] = [await nc.subscribe(s, cb=poke, max_msgs=1) for s in subjects]

    try:
        while not stop.is_set():
            waiter = asyncio.ensure_future(stop.wait())
            woken = asyncio.ensure_future(dirty.wait())
            await asyncio.wait({waiter, woken}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            woken.cancel()
            if stop.is_set():
                break
            if idle and notified:
                latest = time.monotonic() + max_lag
                while time.monotonic() < latest and not stop.is_set():
                    notified = False
                    await arm()
                    await _sleep_unless(stop, idle)
                    if not notified:
                        break
                if stop.is_set():
                    break
                notified = True  # the pass below was woken by news: one more follows it
            dirty.clear()
            by_notification, notified = notified, False
            try:
                await arm()
                handled = await run_pass()
            except Exception:
                log.exception("%s: a pass failed; trying again", name)
                dirty.set()
                await _sleep_unless(stop, error_delay)
                continue
            if by_notification or handled:
                dirty.set()
            await _sleep_unless(stop, interval)
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


__all__ = ["follow"]

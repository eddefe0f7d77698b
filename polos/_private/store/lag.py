"""Reads and a replica behind the leader: the pauses a read that must reach a known message is
made again over, and the error it ends with when it never does.

Its own module so that both the reads (``read``) and the payload objects (``payloads``, which
``read`` imports) use them without an import cycle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

_T = TypeVar("_T")


class StaleRead(Exception):
    """A read that does not reach a message the reader knows is stored.

    On a cluster every replica of a stream answers direct gets, and a follower applies what the
    leader stored a moment after the leader acknowledged it; a consumer's delivery comes from the
    leader. A hook reacting to a delivered event therefore reads "through" its sequence (and a
    read that decides on a message's absence, through the leader's last: ``leader_last``), and
    an answer from a replica still behind it is read again rather than taken as the truth.
    """

    def __init__(self, what: str, seq: int, got: int) -> None:
        super().__init__(
            f"{what}: the replica that answered holds it up to seq {got}, not yet seq {seq}"
        )
        self.what = what
        self.seq = seq
        self.got = got


# The pauses between reads that must reach a known sequence, while the replica that answered
# is behind (seconds, about 0.2 in all): a follower applies within milliseconds, and the
# caller's own retry (a nak and redelivery) covers a longer lag.
STALE_RETRIES: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


async def reread_until(
    read: Callable[[], Awaitable[_T]], reaches: Callable[[_T], bool]
) -> tuple[_T, bool]:
    """``read()``, and again after each of ``STALE_RETRIES`` while its answer does not
    ``reach`` what the caller knows is stored; the last answer, and whether it did."""
    got = await read()
    for pause in STALE_RETRIES:
        if reaches(got):
            return got, True
        await asyncio.sleep(pause)
        got = await read()
    return got, reaches(got)


__all__ = ["STALE_RETRIES", "StaleRead", "reread_until"]

"""``Flights``: concurrent lookups of one key share the one in flight, its value or its error."""

from __future__ import annotations

import asyncio

import pytest

from polos._private.model.aio import Flights


async def test_callers_share_one_fetch_and_its_value_is_stored_once() -> None:
    flights: Flights[int] = Flights()
    stored: list[int] = []
    gate = asyncio.Event()

    async def fetch() -> int:
        await gate.wait()
        return 7

    callers = [asyncio.ensure_future(flights.get("k", fetch, stored.append)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*callers) == [7] * 50
    assert (flights.fetches, stored, len(flights)) == (1, [7], 0)


async def test_a_failed_fetch_is_every_sharers_error_and_the_next_caller_fetches_again() -> None:
    flights: Flights[int] = Flights()
    gate = asyncio.Event()

    async def broken() -> int:
        await gate.wait()
        raise ConnectionError("no server")

    callers = [asyncio.ensure_future(flights.get("k", broken)) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)

    async def ok() -> int:
        return 1

    assert await flights.get("k", ok) == 1 and flights.fetches == 2


async def test_a_fetch_forgotten_meanwhile_is_not_stored_nor_shared_with_later_callers() -> None:
    flights: Flights[str] = Flights()
    stored: list[str] = []
    gate = asyncio.Event()

    async def old() -> str:
        await gate.wait()
        return "old"

    async def new() -> str:
        return "new"

    first = asyncio.ensure_future(flights.get("k", old, stored.append))
    await asyncio.sleep(0)
    flights.forget("k")  # what it reads changed after it began
    assert await flights.get("k", new, stored.append) == "new"
    gate.set()
    assert await first == "old"  # its own caller still gets what it read
    assert stored == ["new"]


async def test_a_cancelled_fetch_leaves_no_sharer_waiting() -> None:
    flights: Flights[int] = Flights()

    async def forever() -> int:
        await asyncio.Event().wait()
        return 0

    leader = asyncio.ensure_future(flights.get("k", forever))
    await asyncio.sleep(0)
    sharer = asyncio.ensure_future(flights.get("k", forever))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(RuntimeError, match="they shared was stopped"):
        await asyncio.wait_for(sharer, 1.0)
    assert not len(flights)

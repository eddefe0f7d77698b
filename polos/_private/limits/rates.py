"""Rate limits that hold across every process: token buckets in the slots bucket.

A **rate bucket** is the key ``rate.<scope>``: a token bucket (``tok`` tokens, ``req``
requests, refilled continuously at the per-minute rate, capped at the burst) updated by
compare-and-set. Reservations take from it, settlements give back or take more, a provider's
429 blocks it until its Retry-After. LLM steps book in line (``reserve_for_step``); a wait
longer than ``rate_wait_limit`` suspends the run on a durable timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos import history as ev
from polos._private.limits.config import LimitsConfig, put_rate_limit, rate_key
from polos._private.limits.slots import SlotStore, store_for
from polos._private.model.values import RateLimit
from polos._private.run.signals import Suspend
from polos._private.store import (
    Names,
    namespace,
)

if TYPE_CHECKING:
    from polos._private.run.execution import RunExecution
    from polos.config import Settings
    from polos.workflow import WorkflowContext

log = logging.getLogger("polos.limits")


# --------------------------------------------------------------------------- rate limits


class RateLimited(Exception):
    """A reservation would have to wait longer than allowed. ``retry_at`` is when to try again
    (epoch seconds): an LLM step suspends durably until then instead of holding its worker."""

    def __init__(self, scope: str, retry_at: float) -> None:
        super().__init__(f"rate limit {scope!r}: capacity again at {retry_at:.3f}")
        self.scope = scope
        self.retry_at = retry_at


class RateStore:
    """Token buckets in the slots bucket, shared by every process, updated by compare-and-set."""

    def __init__(self, store: SlotStore) -> None:
        self.store = store

    @staticmethod
    def _refill(value: dict[str, Any] | None, limit: RateLimit, now: float) -> dict[str, float]:
        if value is None:
            return {
                "tok": limit.token_capacity,
                "req": limit.request_capacity,
                "at": now,
                "until": 0.0,
                "due": 0.0,
                "booked": 0.0,
            }
        dt = max(0.0, now - float(value.get("at", now)))
        tok = float(value.get("tok", 0.0))
        req = float(value.get("req", 0.0))
        if limit.tokens_per_minute:
            tok = min(limit.token_capacity, tok + dt * limit.tokens_per_minute / 60.0)
        if limit.requests_per_minute:
            req = min(limit.request_capacity, req + dt * limit.requests_per_minute / 60.0)
        return {
            "tok": tok,
            "req": req,
            "at": now,
            "until": float(value.get("until", 0.0)),
            "due": float(value.get("due", 0.0)),
            "booked": float(value.get("booked", 0.0)),
        }

    async def _update(
        self,
        scope: str,
        limit: RateLimit,
        change: Callable[[dict[str, float], float], float],
    ) -> float:
        """Apply ``change`` (returns seconds to wait; 0 = it applied) by compare-and-set."""
        key = rate_key(scope)
        for _ in range(50):
            e = await self.store.get(key)
            now = time.time()
            state = self._refill(e.value if e else None, limit, now)
            wait = change(state, now)
            if wait > 0:
                return wait
            state["scope"] = scope  # type: ignore[assignment]
            if await self.store.put(key, state, expected=e.revision if e else 0) is not None:
                return 0.0
        raise RuntimeError(f"rate limit {scope!r}: too much contention")

    async def take(self, scope: str, limit: RateLimit, *, tokens: float, requests: float) -> float:
        """Take ``tokens`` and ``requests`` now, or return how long until they are there."""

        def change(s: dict[str, float], now: float) -> float:
            if max(s["until"], s["due"]) > now:
                return max(s["until"], s["due"]) - now  # blocked, or bookings wait ahead
            wait = 0.0
            if limit.tokens_per_minute and tokens > 0:
                # A request bigger than the burst waits until the bucket is full, then goes
                # (the balance goes negative): it must not wait forever.
                need = min(tokens, limit.token_capacity)
                if s["tok"] < need:
                    wait = max(wait, (need - s["tok"]) * 60.0 / limit.tokens_per_minute)
            if limit.requests_per_minute and requests > 0 and s["req"] < requests:
                wait = max(wait, (requests - s["req"]) * 60.0 / limit.requests_per_minute)
            if wait > 0:
                return wait
            s["tok"] -= tokens if limit.tokens_per_minute else 0
            s["req"] -= requests if limit.requests_per_minute else 0
            return 0.0

        return await self._update(scope, limit, change)

    async def book(
        self, scope: str, limit: RateLimit, *, tokens: float, requests: float
    ) -> tuple[float, int, float]:
        """Take ``tokens`` and ``requests`` in line: at once, whether or not the bucket holds
        them. The balance may go negative; whoever books next waits behind this booking, so
        bookings are served in the order they were made (FIFO). Returns when the booking's
        capacity should be there (epoch seconds, ``<= now``: at once), the bucket revision it
        was written at (the bookings of a scope are ordered by it) and its place in line (the
        tokens booked so far, this booking included) for ``shortfall``."""
        key = rate_key(scope)
        for _ in range(50):
            e = await self.store.get(key)
            now = time.time()
            s = self._refill(e.value if e else None, limit, now)
            # Never before a booking made earlier: capacity given back (a settled over-estimate)
            # must not let a newer booking overtake one that already waits for its time.
            ready = max(now, s["until"], s["due"])
            if limit.tokens_per_minute and tokens > 0:
                # A booking bigger than the burst waits for a full bucket, then goes (as in
                # ``take``): it must not wait forever.
                need = min(tokens, limit.token_capacity)
                if s["tok"] < need:
                    ready = max(ready, now + (need - s["tok"]) * 60.0 / limit.tokens_per_minute)
                s["tok"] -= tokens
                s["booked"] += tokens
            if limit.requests_per_minute and requests > 0:
                if s["req"] < requests:
                    wait = (requests - s["req"]) * 60.0 / limit.requests_per_minute
                    ready = max(ready, now + wait)
                s["req"] -= requests
            s["due"] = ready
            value: dict[str, Any] = {**s, "scope": scope}
            rev = await self.store.put(key, value, expected=e.revision if e else 0)
            if rev is not None:
                return ready, rev, s["booked"]
        raise RuntimeError(f"rate limit {scope!r}: too much contention")

    async def shortfall(
        self, scope: str, limit: RateLimit, *, place: float, tokens: float
    ) -> float:
        """Seconds until a booking of ``tokens`` at ``place`` in line (``book``) is covered:
        0 when it is. The time ``book`` gave is an estimate made before the calls ahead settled;
        one that used more than it reserved is charged to the balance, and so delays every
        booking behind it (and a 429 since blocks them all)."""
        e = await self.store.get(rate_key(scope))
        now = time.time()
        s = self._refill(e.value if e else None, limit, now)
        wait = max(0.0, s["until"] - now)
        if limit.tokens_per_minute and tokens > 0:
            # The balance as it would be had this booking just been made: plus its own
            # tokens, plus those booked after it.
            available = s["tok"] + tokens + (s["booked"] - place)
            need = min(tokens, limit.token_capacity)
            if available < need:
                wait = max(wait, (need - available) * 60.0 / limit.tokens_per_minute)
        return wait

    async def give(
        self, scope: str, limit: RateLimit, *, tokens: float, requests: float = 0
    ) -> None:
        """Settle: ``tokens`` > 0 gives back an over-estimate, < 0 charges an under-estimate
        (the balance may go negative: the next callers wait the debt off). ``requests``: a
        booking given back unused."""
        tokens = tokens if limit.tokens_per_minute else 0
        requests = requests if limit.requests_per_minute else 0
        if tokens == 0 and requests == 0:
            return

        def change(s: dict[str, float], now: float) -> float:
            s["tok"] = min(limit.token_capacity, s["tok"] + tokens)
            s["req"] = min(limit.request_capacity, s["req"] + requests)
            return 0.0

        await self._update(scope, limit, change)

    async def block(self, scope: str, limit: RateLimit, until: float) -> None:
        """Nobody takes from this bucket before ``until`` (a provider's 429 Retry-After)."""

        def change(s: dict[str, float], now: float) -> float:
            s["until"] = max(s["until"], until)
            return 0.0

        await self._update(scope, limit, change)


def scopes(model: str | None, provider: str | None) -> list[str]:
    out = []
    if provider:
        out.append(f"provider:{provider}")
    if model:
        out.append(f"model:{model}")
    return out


@dataclass
class Reservation:
    """Tokens reserved for one LLM call. Call ``settle(actual)`` with the usage the provider
    reported; without it the estimate stands."""

    limiter: TokenLimiter
    held: list[tuple[str, RateLimit]]
    estimate: float
    settled: float | None = None

    def settle(self, actual_tokens: float) -> None:
        self.settled = float(actual_tokens)

    async def _finish(self) -> None:
        if self.settled is None:
            return
        delta = self.estimate - self.settled
        for scope, limit in self.held:
            await self.limiter.rates.give(scope, limit, tokens=delta)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._finish()


@dataclass
class Booking:
    """Capacity taken in line from every scope of a call (``TokenLimiter.book``): it is the
    caller's at ``ready_at``. ``order``: each scope's bucket revision of this booking."""

    held: list[tuple[str, RateLimit]]
    tokens: float
    requests: float
    ready_at: float
    order: dict[str, int]
    place: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "requests": self.requests,
            "ready_at": self.ready_at,
            "order": self.order,
            "place": self.place,
            "scopes": [{"scope": sc, **lim.to_dict()} for sc, lim in self.held],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Booking:
        return cls(
            held=[(str(d["scope"]), RateLimit.from_dict(d)) for d in data.get("scopes") or []],
            tokens=float(data.get("tokens") or 0),
            requests=float(data.get("requests") or 0),
            ready_at=float(data.get("ready_at") or 0),
            order=dict(data.get("order") or {}),
            place={k: float(v) for k, v in (data.get("place") or {}).items()},
        )


class TokenLimiter:
    """System-wide request and token limits for LLM calls, per model and per provider.

    ::

        limiter = TokenLimiter.shared(nc, js, names)
        async with limiter.reserve(model="gpt-4o", provider="openai", tokens=est) as r:
            response = await client.chat.completions.create(...)
            r.settle(response.usage.total_tokens)

    ``reserve`` waits (in the worker) up to ``max_wait`` seconds for capacity, then raises
    ``RateLimited`` with the time to come back, so the caller can suspend durably instead.
    A provider's 429: ``await limiter.backoff(provider=..., retry_after=seconds)``.
    """

    def __init__(self, nc: NATS, js: JetStreamContext, names: Names, settings: Settings) -> None:
        self.nc = nc
        self.js = js
        self.names = names
        self.settings = settings
        self.rates = RateStore(store_for(nc, js, names))
        self.config = LimitsConfig(js, names)
        self.local: dict[str, RateLimit] = {}  # limits given in code, before the KV ones
        self.waited = 0.0

    @classmethod
    def shared(
        cls, nc: NATS, js: JetStreamContext, names: Names, settings: Settings
    ) -> TokenLimiter:
        """The namespace's one limiter on this connection (the first caller's settings)."""
        ns = namespace(js, names, settings, nc=nc)
        return ns.feature(TokenLimiter, lambda: cls(nc, js, names, settings))

    @classmethod
    def for_context(cls, ctx: WorkflowContext) -> TokenLimiter:
        """The limiter of the worker executing ``ctx`` (a ``WorkflowContext``)."""
        x = ctx._x
        return cls.shared(x.nc, x.js, x.names, x.settings)

    async def configure(self, scope: str, limit: RateLimit | None) -> None:
        """Set (or with None remove) the system-wide limit of ``model:<m>`` / ``provider:<p>``."""
        await put_rate_limit(self.js, self.names, scope, limit)
        self.config._cache.clear()

    async def _limits(self, model: str | None, provider: str | None) -> list[tuple[str, RateLimit]]:
        out = []
        for scope in scopes(model, provider):
            limit = self.local.get(scope) or await self.config.rate_limit(scope)
            if limit is not None and limit.limited:
                out.append((scope, limit))
        return out

    @contextlib.asynccontextmanager
    async def reserve(
        self,
        *,
        model: str | None = None,
        provider: str | None = None,
        tokens: float = 0,
        requests: float = 1,
        max_wait: float | None = None,
    ) -> AsyncIterator[Reservation]:
        held = await self._take_all(model, provider, tokens, requests, max_wait)
        r = Reservation(self, held, float(tokens))
        try:
            yield r
        finally:
            await r._finish()

    async def book(
        self,
        *,
        model: str | None = None,
        provider: str | None = None,
        tokens: float = 0,
        requests: float = 1,
    ) -> Booking:
        """Take ``tokens`` and ``requests`` from every configured scope, in line: the booking
        is the caller's at ``ready_at`` (now, or when the bookings made before it have been
        served). ``cancel`` gives an unused booking back."""
        held = await self._limits(model, provider)
        ready, order, place = time.time(), {}, {}
        for scope, limit in held:
            at, order[scope], place[scope] = await self.rates.book(
                scope, limit, tokens=tokens, requests=requests
            )
            ready = max(ready, at)
        return Booking(held, float(tokens), float(requests), ready, order, place)

    async def cancel(self, booking: Booking) -> None:
        for scope, limit in booking.held:
            await self.rates.give(scope, limit, tokens=booking.tokens, requests=booking.requests)

    async def shortfall(self, booking: Booking) -> float:
        """Seconds until every scope of ``booking`` covers it (0: go), as the buckets say now:
        calls ahead of it that used more than they reserved, or a 429, push it back."""
        wait = 0.0
        for scope, limit in booking.held:
            wait = max(
                wait,
                await self.rates.shortfall(
                    scope, limit, place=booking.place.get(scope, 0.0), tokens=booking.tokens
                ),
            )
        return wait

    async def _take_all(
        self,
        model: str | None,
        provider: str | None,
        tokens: float,
        requests: float,
        max_wait: float | None,
    ) -> list[tuple[str, RateLimit]]:
        booking = await self.book(model=model, provider=provider, tokens=tokens, requests=requests)
        # Granted at once when it was covered at booking time; else wait for the time it gave,
        # and check then (calls ahead may have used more than they reserved).
        wait = booking.ready_at - time.time()
        while wait > 0:
            if max_wait is not None and wait > max_wait:
                # This call does not happen now: the capacity goes back to the others.
                await self.cancel(booking)
                scope = booking.held[0][0] if booking.held else "?"
                raise RateLimited(scope, time.time() + wait)
            if max_wait is not None:
                max_wait -= wait
            self.waited += wait
            await asyncio.sleep(wait)
            wait = await self.shortfall(booking)
        return booking.held

    async def backoff(
        self, *, model: str | None = None, provider: str | None = None, retry_after: float
    ) -> None:
        """Every process stops calling this model/provider for ``retry_after`` seconds."""
        until = time.time() + max(0.0, retry_after)
        for scope, limit in await self._limits(model, provider):
            await self.rates.block(scope, limit, until)


async def reserve_for_step(
    exe: RunExecution,
    step_id: str,
    limiter: TokenLimiter,
    *,
    model: str | None,
    provider: str | None,
    tokens: float,
) -> Reservation:
    """The tokens of the LLM step ``step_id`` of a run, waited for without holding a worker.

    The capacity is booked in line (``TokenLimiter.book``: FIFO per scope). If it is there
    within ``settings.rate_wait_limit`` the step waits here. Otherwise the run suspends with
    ``RunSuspended(kind="rate", step=step_id, wake_at=<when it is there>)`` holding the booking
    in its data: no task and no slot on any worker. The scheduler wakes it at that
    time (a durable timer), and the step, replayed to this point on whichever worker gets the
    run, calls with the booked tokens instead of taking them again, so runs waiting on one
    scope go in the order they booked.

    A booking counts once: if the execution that was woken with it died before the step was
    recorded (the call may have been made), the next one books again.
    """
    sus = exe.state.rate_waits.get(step_id)
    data = sus.data if sus is not None and isinstance(sus.data, dict) else None
    if data is not None and data.get("attempt") == exe.attempt - 1:
        # Woken with its booking, by the first execution since the wait: the tokens are ours
        # once the bucket says the calls ahead (and any 429 since) are paid for.
        booking = Booking.from_json(data)
        wait = await limiter.shortfall(booking)
    else:
        booking = await limiter.book(model=model, provider=provider, tokens=tokens)
        wait = booking.ready_at - time.time()
    while wait > 0:
        _suspend_if_long(exe, step_id, booking, wait)
        limiter.waited += wait
        await asyncio.sleep(wait)
        wait = await limiter.shortfall(booking)
    return Reservation(limiter, booking.held, booking.tokens)


def _suspend_if_long(exe: RunExecution, step_id: str, booking: Booking, wait: float) -> None:
    """Suspend the run for a wait longer than ``settings.rate_wait_limit``."""
    if wait <= exe.settings.rate_wait_limit:
        return
    event = ev.RunSuspended(
        run_id=exe.run_id,
        step=step_id,
        kind="rate",
        wake_at=time.time() + wait,
        data={**booking.to_json(), "attempt": exe.attempt},
    )
    raise Suspend(event, msg_id=f"{exe.run_id}/w/{step_id}/rate/{exe.attempt}")


def retry_after_seconds(headers: Any, default: float = 1.0) -> float:
    """Seconds to wait from a 429's headers (``retry-after-ms``, ``retry-after``)."""
    if headers is None:
        return default
    get = headers.get
    with contextlib.suppress(TypeError, ValueError):
        ms = get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
    raw = get("retry-after")
    if raw is None:
        return default
    try:
        return max(0.0, float(raw))
    except ValueError:
        from email.utils import parsedate_to_datetime

        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
    return default


__all__ = [
    "Booking",
    "RateLimited",
    "RateStore",
    "Reservation",
    "TokenLimiter",
    "reserve_for_step",
    "retry_after_seconds",
    "scopes",
]

"""Shared working memory for the agents of one session: a KV bucket, updated by compare-and-set.

Bucket ``<prefix>_memory``; one key per entry, ``<session>.<name>``. Every write is
``update(key, last=revision)`` (or ``create`` for a new key), retried on a revision conflict
with the freshly read value, so concurrent writers never lose an update. Inside a run, the
agents reach memory only through tool steps, so what a read returned is in the run's history
and a replay sees the same value even if the bucket changed since.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import nats.js.errors
import orjson

from polos._private.store.names import Names
from polos._private.store.topology import missing

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-=]{1,128}$")


def memory_bucket(prefix: str) -> str:
    return Names(prefix).memory_bucket


class MemoryConflictError(RuntimeError):
    """Too many concurrent writers in a row: the update gave up (raise ``max_tries``)."""


class SharedMemory:
    """The working memory of one session. Values are JSON."""

    def __init__(
        self, js: JetStreamContext, prefix: str, session: str, *, max_tries: int = 200
    ) -> None:
        if not _TOKEN_RE.match(session):
            raise ValueError(
                f"session {session!r} must be 1-128 letters, digits, '_', '-' or '=' (a KV key token)"
            )
        self.js = js
        self.prefix = prefix
        self.session = session
        self.max_tries = max_tries
        self._kv: KeyValue | None = None
        self.conflicts = 0  # how many CAS retries this object needed (a figure for tests)

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            # A row of the topology the services create; never made here (workers and clients
            # may not create buckets).
            try:
                self._kv = await self.js.key_value(memory_bucket(self.prefix))
            except nats.js.errors.BucketNotFoundError:
                raise missing(Names(self.prefix), "memory_bucket") from None
        return self._kv

    def _key(self, name: str) -> str:
        if not _TOKEN_RE.match(name):
            raise ValueError(f"memory key {name!r} must be 1-128 letters, digits, '_', '-' or '='")
        return f"{self.session}.{name}"

    async def read(self, name: str) -> tuple[Any, int]:
        """The value and its revision (``None, 0`` when absent)."""
        kv = await self._bucket()
        try:
            entry = await kv.get(self._key(name))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None, 0
        if entry.value is None:
            return None, entry.revision or 0
        return orjson.loads(entry.value), entry.revision or 0

    async def get(self, name: str, default: Any = None) -> Any:
        value, rev = await self.read(name)
        return default if rev == 0 or value is None else value

    async def update(self, name: str, fn: Callable[[Any], Any]) -> Any:
        """Apply ``fn(current) -> new`` atomically (CAS on the revision); returns the new value."""
        kv = await self._bucket()
        key = self._key(name)
        for attempt in range(self.max_tries):
            current, rev = await self.read(name)
            new = fn(current)
            data = orjson.dumps(new)
            try:
                if rev == 0:
                    await kv.create(key, data)
                else:
                    await kv.update(key, data, last=rev)
                return new
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
                self.conflicts += 1
                # A short, growing pause spreads writers that keep colliding.
                await asyncio.sleep(min(0.05, 0.001 * attempt))
        raise MemoryConflictError(
            f"memory {key!r}: gave up after {self.max_tries} conflicting writes"
        )

    async def set(self, name: str, value: Any) -> Any:
        return await self.update(name, lambda _old: value)

    async def append(self, name: str, item: Any) -> list[Any]:
        def add(old: Any) -> list[Any]:
            items = list(old) if isinstance(old, list) else ([] if old is None else [old])
            items.append(item)
            return items

        return list(await self.update(name, add))

    async def snapshot(self) -> dict[str, Any]:
        """Every entry of the session (one watch on ``<session>.>``)."""
        kv = await self._bucket()
        out: dict[str, Any] = {}
        watcher = await kv.watch(f"{self.session}.>", ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:
                    break  # the initial values are all delivered
                if entry.value is not None and entry.key is not None:
                    out[entry.key.split(".", 1)[1]] = orjson.loads(entry.value)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return out


__all__ = ["MemoryConflictError", "SharedMemory", "memory_bucket"]

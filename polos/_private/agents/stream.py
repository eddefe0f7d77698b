"""``agent.stream(polos, input)``: the live side of a durable agent run.

The run streams its LLM text deltas on ``<prefix>.stream.<run_id>.<step>`` (NATS core, live
only); this handle subscribes before the run starts, keeps every event it receives, and ends
with the run's recorded result. Several iterators (``text_chunks``, ``events``) each see every
event from the first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from polos.types import AgentResult


@dataclass
class StreamEvent:
    """One event of a streamed agent run: ``text_delta`` (``data["content"]``),
    ``step_finish`` (an LLM step ended: ``data["step"]``, ``data["finish_reason"]``) or, last,
    ``agent_finish`` (``data["result"]``: the ``AgentResult`` as JSON)."""

    event_type: str
    data: dict[str, Any] = field(default_factory=dict)


class AgentStream:
    """A streamed agent run: ``agent_run_id``, ``handle``, ``text_chunks``, ``events``,
    ``await text()``, ``await result()``."""

    def __init__(
        self, client: Any, agent: Any, run_id: str, finish: Callable[[Any], AgentResult[Any]]
    ) -> None:
        self.client = client
        self.agent = agent
        self.agent_run_id = run_id
        self._finish = finish
        self._events: list[StreamEvent] = []
        self._changed = asyncio.Event()
        self._done = False
        self._result: AgentResult[Any] | None = None
        self._error: BaseException | None = None
        self._sub: Subscription | None = None
        self._nc: NATS | None = None
        self._waiter: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"AgentStream(agent_run_id={self.agent_run_id!r})"

    @property
    def id(self) -> str:
        return self.agent_run_id

    @property
    def handle(self) -> Any:
        return self.client.get_handle(self.agent_run_id, "polos_agent")

    async def subscribe(self, nc: NATS, subject: str) -> None:
        self._nc = nc

        async def on_msg(msg: Msg) -> None:
            body = orjson.loads(msg.data)
            if body.get("done"):
                data = {k: body.get(k) for k in ("step", "agent", "finish_reason")}
                self._add(StreamEvent("step_finish", data))
            else:
                data = {k: body.get(k) for k in ("step", "agent", "seq")}
                self._add(StreamEvent("text_delta", {"content": body.get("delta", ""), **data}))

        self._sub = await nc.subscribe(subject, cb=on_msg)

    def start_waiting(self) -> None:
        self._waiter = asyncio.ensure_future(self._wait())

    async def _wait(self) -> None:
        try:
            output = await self.handle.result()
            if self._nc is not None:
                await self._nc.flush()  # deltas published before the end are delivered first
                await asyncio.sleep(0)
            self._result = self._finish(output)
            self._add(StreamEvent("agent_finish", {"result": self._result.to_json()}))
        except BaseException as exc:
            self._error = exc
        finally:
            self._done = True
            self._changed.set()
            await self.close()

    def _add(self, event: StreamEvent) -> None:
        if self._done:
            return
        self._events.append(event)
        self._changed.set()

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    @property
    def events(self) -> AsyncIterator[StreamEvent]:
        """Every event of the run (deltas, step ends, ``agent_finish`` last)."""
        return self._iter()

    def _iter(self) -> AsyncIterator[StreamEvent]:
        async def gen() -> AsyncIterator[StreamEvent]:
            i = 0
            while True:
                while i < len(self._events):
                    yield self._events[i]
                    i += 1
                if self._done:
                    if self._error is not None:
                        raise self._error
                    return
                self._changed.clear()
                if i < len(self._events) or self._done:
                    continue
                await self._changed.wait()

        return gen()

    @property
    def text_chunks(self) -> AsyncIterator[str]:
        """The text as the model writes it, chunk by chunk, until the run ends."""

        async def gen() -> AsyncIterator[str]:
            async for event in self._iter():
                if event.event_type == "text_delta":
                    yield str(event.data.get("content", ""))

        return gen()

    async def text(self) -> str:
        """Every chunk, joined (waits for the run's end)."""
        return "".join([chunk async for chunk in self.text_chunks])

    async def result(self) -> AgentResult[Any]:
        """The run's ``AgentResult`` (waits for its end; raises what the run raised)."""
        async for _ in self._iter():
            pass
        assert self._result is not None
        return self._result


__all__ = ["AgentStream", "StreamEvent"]

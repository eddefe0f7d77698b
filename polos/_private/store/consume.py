"""Consuming streams: durable consumers and the pull loop every service and worker runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from polos._private.model.aio import cancel_and_wait
from polos._private.store.natspy import subscribe_handing_over

log = logging.getLogger("polos.consume")


async def ensure_consumer(
    js: JetStreamContext,
    stream: str,
    durable: str,
    filter_subject: str,
    *,
    ack_wait: float,
    max_ack_pending: int = 10_000,
    max_deliver: int = -1,
) -> None:
    cfg = ConsumerConfig(
        durable_name=durable,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_ack_pending=max_ack_pending,
        max_deliver=max_deliver,
        max_waiting=4096,
    )
    try:
        await js.add_consumer(stream, cfg)
    except nats.js.errors.APIError as exc:
        # It exists with another config: another process made it first, or an operator made
        # it to start elsewhere in the stream (10012: another deliver policy). Use theirs:
        # where a consumer stands is its own state, not something a restart should reset.
        if exc.err_code not in (10148, 10013, 10012):
            raise


Handler = Callable[[Msg], Awaitable[None]]

# A delivery's reply subject: $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
# seq>.<timestamp>.<pending> (9 tokens), or with <domain>.<account hash> after ACK (11 or 12).
_V1_TOKENS = 9
_V2_MIN_TOKENS = 11


def stream_seq(msg: Msg) -> int:
    """The stream sequence of a JetStream delivery, read from its reply subject alone.

    ``msg.metadata.sequence.stream`` gives the same, but nats-py builds all of the metadata for
    it: two frozen dataclasses and a datetime, 5 % of the orchestrator's CPU on resumes (every
    command and control event asks for it). Any other reply form is left to nats-py's parser,
    which raises what it raises for a message that is not a delivery."""
    reply = msg.reply
    if reply and reply.startswith("$JS.ACK."):
        tokens = reply.split(".")
        n = len(tokens)
        if n == _V1_TOKENS:
            return int(tokens[5])
        if n >= _V2_MIN_TOKENS:
            return int(tokens[7])
    return msg.metadata.sequence.stream


class PullLoop:
    """Keeps pull requests outstanding on a durable consumer and hands each message to a handler.

    Messages are handled as soon as the server delivers them (no fetch-and-wait batches), with
    at most ``capacity`` in flight. A pull expires every ``expires`` seconds and is renewed, so
    a lost pull (a reconnect) costs at most that long.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        durable: str,
        handler: Handler,
        *,
        capacity: int = 64,
        expires: float = 5.0,
        name: str = "pull",
    ) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._handler = handler
        self._capacity = capacity
        self._expires = expires
        self._name = name
        self._free = capacity
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"{self._name}-loop")

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def stop(self, drain_timeout: float | None = None) -> None:
        self._stopping = True
        if self._main:
            await cancel_and_wait([self._main])
        if self._tasks and drain_timeout:
            await asyncio.wait(self._tasks, timeout=drain_timeout)
        await cancel_and_wait(list(self._tasks))

    async def _handle(self, msg: Msg) -> None:
        try:
            await self._handler(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: handler failed on %s", self._name, msg.subject)
        finally:
            self._release(1)

    def _release(self, n: int) -> None:
        self._free += n
        self._room.set()

    async def _run(self) -> None:
        # Each message is handed to its handler's task from nats-py's read loop as it is parsed
        # (``subscribe_handing_over``): a queue in between cost a task turn and a ``wait_for``
        # per message, and it took one message per turn of the loop, which under load made
        # commands wait longer for their handler than their handling took. One wait per pull.
        pull = _Pull()

        def on_msg(msg: Msg) -> None:
            status = msg.headers.get("Status") if msg.headers else None
            if status:
                if status != "100":  # not an idle heartbeat: this pull is over
                    # 404/408/409: no messages, expired, or the server's limits.
                    pull.busy = status == "409"
                    pull.over.set()
                return
            if pull.left > 0:
                pull.left -= 1
                if pull.left == 0:
                    pull.over.set()
            else:
                # A message of a pull given up on (its answer came after its deadline): it is
                # handled all the same, on room it takes from the next pull.
                self._free -= 1
            t = asyncio.create_task(self._handle(msg))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

        inbox = self._nc.new_inbox()
        sub = await subscribe_handing_over(self._nc, inbox, on_msg)
        try:
            while not self._stopping:
                # Room for at least one: late messages of an abandoned pull may have taken the
                # count below zero, and one release need not bring it back above.
                while self._free <= 0:
                    self._room.clear()
                    await self._room.wait()
                want, self._free = self._free, 0
                pull.left, pull.busy = want, False
                pull.over.clear()
                req = {"batch": want, "expires": int(self._expires * 1e9)}
                try:
                    await self._nc.publish(self._api, orjson.dumps(req), reply=inbox)
                except Exception:
                    pull.left = 0
                    self._release(want)
                    await asyncio.sleep(0.25)
                    continue
                with contextlib.suppress(TimeoutError):
                    # No answer by then: the pull was lost (a reconnect) or expired silently.
                    await asyncio.wait_for(pull.over.wait(), self._expires + 1.0)
                left, pull.left = pull.left, 0
                self._release(left)
                if pull.busy:
                    await asyncio.sleep(0.05)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class _Pull:
    """The pull request outstanding: how many messages it may still deliver, and its end."""

    __slots__ = ("busy", "left", "over")

    def __init__(self) -> None:
        self.left = 0
        self.busy = False
        self.over = asyncio.Event()


__all__ = ["Handler", "PullLoop", "ensure_consumer", "stream_seq"]

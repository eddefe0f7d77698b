"""The scheduler: durable timers. (Timers arrive with the waiting issue; the service exists so
`polos up` and the tests run the full set of processes from the start.)"""

from __future__ import annotations

import contextlib
import logging

from nats.aio.client import Client as NATS

from polos._private import jetstream as jsl
from polos.config import Settings

log = logging.getLogger("polos.scheduler")


class Scheduler:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.names = jsl.Names(self.settings.prefix)
        self._nc: NATS | None = None

    async def start(self) -> None:
        self._nc = await jsl.connect(self.settings, name="polos-scheduler")
        js = self._nc.jetstream(timeout=self.settings.request_timeout)
        await jsl.ensure_topology(js, self.names, self.settings)
        log.info("scheduler started on namespace %r", self.settings.prefix)

    async def stop(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()

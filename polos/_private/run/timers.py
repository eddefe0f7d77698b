"""Time: a run's timers and the keyed cron schedules, both JetStream message schedules the
server holds (durable across restarts) and fires onto the timers' fire subjects."""

from __future__ import annotations

import contextlib
import time
import zoneinfo
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos._private.store import (
    MSG_ID,
    Names,
    connection_of,
    last_per_subject,
    leader_last,
    valid_token,
)
from polos.converter import to_json

if TYPE_CHECKING:
    pass

from polos._private.store.tokens import iso_time

TIMER_LEAD = 0.5  # seconds a timer fires early; more than the server's schedule tick (250 ms)


async def schedule_timer(
    js: JetStreamContext, names: Names, run_id: str, seq: int, due: float, body: dict[str, Any]
) -> None:
    """A one-shot timer for the run suspended at ``seq``: a message schedule the server holds
    (durable across restarts) and fires onto the timers' fire subject at ``due``."""
    target = names.timer_fire_subject(run_id, seq)
    payload = orjson.dumps({**body, "run_id": run_id, "seq": seq, "due": due})
    # The server checks schedules every ~250 ms; it fires TIMER_LEAD early and the scheduler
    # sleeps the rest in memory, so a timer is on time to the millisecond, not to the tick.
    fire_at = due - TIMER_LEAD
    if fire_at <= time.time() + 0.01:
        await js.publish(target, payload, headers={MSG_ID: f"fire/{run_id}/{seq}"})
        return
    await js.publish(
        names.timer_subject(run_id, seq),
        payload,
        headers={
            "Nats-Schedule": f"@at {iso_time(fire_at)}",
            "Nats-Schedule-Target": target,
            MSG_ID: f"timer/{run_id}/{seq}",
        },
    )


async def clear_timers(js: JetStreamContext, names: Names, run_id: str) -> None:
    """Drop a run's pending timers (a cancelled run)."""
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.purge_stream(names.timers_stream, subject=f"{names.prefix}.timer.at.{run_id}.>")


# --------------------------------------------------------------------------- cron schedules


CRON_TOMBSTONE_TTL = "60s"  # how long a deleted schedule's empty tombstone stays


def cron_expression(spec: str) -> str:
    """The server's cron form (seconds first) of a 5-field cron, a 6-field cron or ``@every``."""
    spec = " ".join(spec.split())
    if spec.startswith("@"):
        return spec
    fields = spec.split(" ")
    if len(fields) == 5:
        return "0 " + spec
    if len(fields) == 6:
        return spec
    raise ValueError(f"schedule {spec!r}: expected 5 cron fields (min hour day month weekday)")


async def put_schedule(
    js: JetStreamContext,
    names: Names,
    key: str,
    workflow: str,
    cron: str,
    *,
    timezone: str | None = None,
    input: Any = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create or replace the keyed schedule ``key``; ``extra`` fields go into its document
    (which each firing carries)."""
    if not valid_token(key):
        raise ValueError(f"schedule key {key!r} must be 1-128 letters, digits, '_' or '-'")
    if not valid_token(workflow):
        raise ValueError(f"workflow name {workflow!r} is not valid")
    if timezone is not None:
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {timezone!r}") from exc
    doc = {
        "kind": "cron",
        "key": key,
        "workflow": workflow,
        "cron": cron,
        "timezone": timezone,
        "input": to_json(input, what="the schedule's input"),
        "created_at": time.time(),
        **(extra or {}),
    }
    headers = {
        "Nats-Schedule": cron_expression(cron),
        "Nats-Schedule-Target": names.cron_fire_subject(key),
        "Nats-Rollup": "sub",  # replaces the key's previous schedule
    }
    if timezone:
        headers["Nats-Schedule-Time-Zone"] = timezone
    try:
        await js.publish(names.cron_subject(key), orjson.dumps(doc), headers=headers)
    except nats.js.errors.APIError as exc:
        raise ValueError(f"schedule {cron!r} rejected by the server: {exc.description}") from exc
    return doc


async def list_schedules(nc: NATS, names: Names) -> list[dict[str, Any]]:
    msgs = await last_per_subject(nc, names.timers_stream, f"{names.prefix}.timer.cron.>")
    out = []
    for m in msgs:
        with contextlib.suppress(orjson.JSONDecodeError):
            out.append(orjson.loads(m.data))
    return sorted(out, key=lambda d: str(d.get("key")))


async def delete_schedule(js: JetStreamContext, names: Names, key: str) -> bool:
    if not valid_token(key):
        raise ValueError(f"schedule key {key!r} is not valid")
    # On the leader: "no such schedule" from a replica behind it would be wrong.
    last = await leader_last(connection_of(js), names.timers_stream, names.cron_subject(key))
    if last is None or not last.data:
        return False
    # Rolled up to an empty tombstone that expires, not purged: a client may write its
    # schedules' subjects but not purge the timers stream (every run's timers are in it).
    await js.publish(
        names.cron_subject(key),
        b"",
        headers={"Nats-Rollup": "sub", "Nats-TTL": CRON_TOMBSTONE_TTL},
    )
    return True


__all__ = [
    "CRON_TOMBSTONE_TTL",
    "TIMER_LEAD",
    "clear_timers",
    "cron_expression",
    "delete_schedule",
    "list_schedules",
    "put_schedule",
    "schedule_timer",
]

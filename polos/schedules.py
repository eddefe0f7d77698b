"""Cron schedules, under the original Polos's names::

    from polos import schedules

    schedule_id = await schedules.create(polos, workflow="daily_report", cron="0 8 * * *",
                                         timezone="Europe/Paris", key="user-42")

A schedule is one of Polos's keyed cron schedules (``client.create_schedule``, docs/waiting.md):
the server itself fires it (a message schedule), each firing starts one run. The original keys
a schedule by ``(workflow, key)``; here its id is ``<workflow>--<key>``, and creating it again
replaces it (an upsert, as in the original). ``client.list_schedules()`` and
``client.delete_schedule(schedule_id)`` list and remove them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polos._private.model.values import SchedulePayload
from polos._private.store import valid_token

if TYPE_CHECKING:
    from polos.client import PolosClient
    from polos.workflow import WorkflowDefinition


def schedule_id(workflow: str, key: str = "global") -> str:
    """The id of ``workflow``'s schedule ``key``."""
    if not valid_token(key):
        raise ValueError(
            f"schedule key {key!r} must be 1-128 letters, digits, '_' or '-' (it names the "
            "schedule's subject)"
        )
    sid = f"{workflow}--{key}"
    if not valid_token(sid):
        raise ValueError(f"schedule id {sid!r} (workflow--key) is longer than 128 characters")
    return sid


async def create(
    client: PolosClient,
    workflow: str | WorkflowDefinition[Any, Any],
    cron: str,
    timezone: str = "UTC",
    key: str = "global",
) -> str:
    """Create or replace ``workflow``'s schedule ``key`` (standard 5-field cron, IANA time
    zone); returns its id. Raises ``ValueError`` for a bad cron, time zone or key."""
    name = workflow if isinstance(workflow, str) else workflow.name
    sid = schedule_id(name, key)
    await client.create_schedule(sid, name, cron, timezone=timezone)
    return sid


__all__ = ["SchedulePayload", "create", "schedule_id"]

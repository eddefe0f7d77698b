"""``polos queues``: runs waiting for admission and slots held, per queue and concurrency key.
Registered on import by the ``polos`` command."""

from __future__ import annotations

import argparse

from polos._private import limits
from polos._private.ops.commands import command, dumps, table
from polos.cli.core import client_for


def _add_queues(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


@command("queues", "queue depth (runs waiting for a slot) and active slots per concurrency key")(
    _add_queues
)
async def cmd_queues(args: argparse.Namespace) -> int:
    client = await client_for(args)
    try:
        rows = await limits.queue_stats(client.nc, client.js, client.names)
    finally:
        await client.close()
    if args.json:
        print(dumps(rows))
        return 0
    if not rows:
        print("no run waits for a slot and no slot is held")
        return 0
    cells = [
        [
            r["queue"],
            r["key"],
            str(r["waiting"]),
            str(r["active"]),
            "-" if r["limit"] is None else str(r["limit"]),
            "-" if r["per_key"] is None else str(r["per_key"]),
        ]
        for r in rows
    ]
    print(table(cells, ["QUEUE", "KEY", "WAITING", "ACTIVE", "LIMIT", "PER KEY"]))
    print("KEY * counts the queue-wide slots; other keys count per-key slots and waiting runs.")
    return 0


__all__ = ["cmd_queues"]

"""CLI subcommands of waiting: ``polos resume``, ``cancel``, ``event``, ``schedules``.

``polos runs --waiting`` lives with ``runs`` in polos/cli.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from polos._private.ops.commands import command, dumps, table, ts
from polos.cli.core import client_for
from polos.errors import CommandRejectedError


def _json_arg(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"--data is not valid JSON: {exc}") from exc


def _add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id")
    p.add_argument("key", help="the key of the ctx.step.suspend to resume")
    p.add_argument("--data", help="the resume's data, as JSON (default null)")


@command("resume", "resume a run suspended at ctx.step.suspend(KEY) with --data JSON")(_add_resume)
async def cmd_resume(args: argparse.Namespace) -> int:
    data = _json_arg(args.data)
    client = await client_for(args)
    try:
        answer = await client.resume(args.run_id, args.key, data)
    except CommandRejectedError as exc:
        print(f"rejected: {exc.reason}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    print(answer.get("message") or f"run {args.run_id}: {args.key!r} {answer['status']}")
    return 0


def _add_cancel(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id")
    p.add_argument("--reason")


@command("cancel", "cancel a run (and its children)")(_add_cancel)
async def cmd_cancel(args: argparse.Namespace) -> int:
    client = await client_for(args)
    try:
        await client.cancel(args.run_id, args.reason)
    except CommandRejectedError as exc:
        print(f"rejected: {exc.reason}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    print(f"run {args.run_id} cancelled")
    return 0


def _add_event(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", help="e.g. warehouse.pickup/42")
    p.add_argument("--data", help="the event's data, as JSON (default null)")


@command("event", "publish an external event on a topic")(_add_event)
async def cmd_event(args: argparse.Namespace) -> int:
    data = _json_arg(args.data)
    client = await client_for(args)
    try:
        seq = await client.publish_event(args.topic, data)
    finally:
        await client.close()
    print(f"event {seq} published on {args.topic!r}")
    return 0


def _add_schedules(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["list", "create", "delete"], default="list")
    p.add_argument("key", nargs="?")
    p.add_argument("--workflow")
    p.add_argument("--cron", help="5-field cron (min hour day month weekday), or '@every 10m'")
    p.add_argument("--timezone")
    p.add_argument("--input", help="each run's input, as JSON")
    p.add_argument("--json", action="store_true")


@command("schedules", "list, create or delete keyed cron schedules")(_add_schedules)
async def cmd_schedules(args: argparse.Namespace) -> int:
    client = await client_for(args)
    try:
        if args.action == "create":
            if not (args.key and args.workflow and args.cron):
                raise ValueError("schedules create KEY --workflow NAME --cron SPEC")
            await client.create_schedule(
                args.key,
                args.workflow,
                args.cron,
                timezone=args.timezone,
                input=_json_arg(args.input),
            )
            print(f"schedule {args.key!r} created")
            return 0
        if args.action == "delete":
            if not args.key:
                raise ValueError("schedules delete KEY")
            found = await client.delete_schedule(args.key)
            print(f"schedule {args.key!r} {'deleted' if found else 'did not exist'}")
            return 0 if found else 1
        docs = await client.list_schedules()
    finally:
        await client.close()
    if args.json:
        print(dumps(docs))
        return 0
    if not docs:
        print("no schedules")
        return 0
    rows = [
        [d["key"], d["workflow"], d["cron"], d.get("timezone") or "UTC", ts(d.get("created_at"))]
        for d in docs
    ]
    print(table(rows, ["KEY", "WORKFLOW", "CRON", "TIMEZONE", "CREATED"]))
    return 0

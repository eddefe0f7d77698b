"""Operations commands, registered on import (see ``polos.cli.PLUGINS``):

- ``polos credentials ROLE``: the NATS URL (with user and password) a role connects with when
  ``polos up --auth`` runs;
- ``polos retention``: archive finished runs that analytics has exported (docs/operations.md);
- ``polos init``: create (or update) the namespace's streams and buckets as the service role,
  then exit; ``--check`` only says what is missing, as any role.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from polos._private import auth
from polos.cli import _settings, command
from polos.client import PolosClient
from polos.config import DEFAULT_NATS_URL


def _add_credentials(p: argparse.ArgumentParser) -> None:
    p.add_argument("role", choices=auth.ROLES)
    p.add_argument("--data-dir", default=os.environ.get("POLOS_DATA_DIR", ".polos"),
                   help="the data dir of `polos up --auth` (default ./.polos)")


@command("credentials", "print the NATS URL with credentials for a role (polos up --auth)")(
    _add_credentials
)
async def cmd_credentials(args: argparse.Namespace) -> int:
    path = Path(args.data_dir) / auth.CREDENTIALS_FILE
    if not path.exists():
        print(f"no credentials at {path}: start `polos up --auth --data-dir {args.data_dir}` first")
        return 1
    creds = json.loads(path.read_text())
    settings = _settings(args)
    user = f"{settings.prefix}-{args.role}"
    if user not in creds:
        print(f"{path} has no user {user!r} (namespace {settings.prefix!r})")
        return 1
    base = args.nats_url or os.environ.get("POLOS_NATS_URL") or DEFAULT_NATS_URL
    print(auth.url_for(creds, user, base))
    return 0


def _add_retention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export-dir", required=True,
                   help="the analytics export directory (its history table is the safe point)")
    p.add_argument("--older-than", type=float, default=7 * 24 * 3600,
                   help="seconds a run must have been finished (default 7 days)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be archived")


@command("retention", "remove finished, exported runs from the hot history stream")(_add_retention)
async def cmd_retention(args: argparse.Namespace) -> int:
    from polos._private.retention import archive_exported_runs
    from polos_analytics.export import exported_upto

    upto = exported_upto(Path(args.export_dir) / "history")
    # Purging history is the services' right, not a client's.
    client = await PolosClient.connect(settings=_settings(args, role="service"))
    try:
        result = await archive_exported_runs(
            client.nc, client.js, client.names, exported_upto=upto,
            older_than=args.older_than, dry_run=args.dry_run,
        )
    finally:
        await client.close()
    verb = "would archive" if args.dry_run else "archived"
    print(f"{verb} {len(result.archived)} runs (exported up to seq {upto}); kept "
          f"{result.kept_not_exported} not yet exported, {result.kept_too_recent} too recent; "
          f"{result.payload_objects_deleted} payload objects deleted")
    return 0


def _add_init(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true",
                   help="create nothing: say what is missing (any role may check)")


@command("init", "create the namespace's streams and buckets (service role) and exit")(_add_init)
async def cmd_init(args: argparse.Namespace) -> int:
    from polos._private import jetstream as jsl
    from polos._private.store import TOPOLOGY, Names, check_topology, ensure_topology

    settings = _settings(args, role="client" if args.check else "service")
    names = Names(settings.prefix)
    nc = await jsl.connect(settings, name="polos-init")
    try:
        js = nc.jetstream(timeout=settings.request_timeout)
        if args.check:
            await check_topology(js, names)
        else:
            await ensure_topology(js, names, settings)
    finally:
        await jsl.close(nc)
    kinds = [row.kind for row in TOPOLOGY]
    print(f"namespace {settings.prefix!r} {'has' if args.check else 'is ready:'} "
          f"{kinds.count('stream')} streams, {kinds.count('kv')} KV buckets and "
          f"{kinds.count('object')} object store{'s' if kinds.count('object') != 1 else ''}")
    return 0

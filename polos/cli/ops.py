"""Operations commands, registered on import (by the ``polos`` command):

- ``polos credentials ROLE [--format url|env|context|json]``: the user and password a role
  connects with to the running ``polos up``, and that server's URL;
- ``polos retention``: archive finished runs that analytics has exported (docs/operations.md);
- ``polos init``: create (or update) the namespace's streams and buckets as the service role,
  then exit; ``--check`` only says what is missing, as any role.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any
from urllib.parse import urlsplit

from polos._private.ops import auth
from polos._private.ops.commands import command, data_dir, settings_for
from polos._private.ops.instance import running
from polos._private.store import connect, disconnect

CREDENTIAL_FORMATS = ("url", "env", "context", "json")


def _add_credentials(p: argparse.ArgumentParser) -> None:
    p.add_argument("role", choices=auth.ROLES)
    p.add_argument(
        "--format",
        choices=CREDENTIAL_FORMATS,
        default="url",
        help="url: nats://user:password@host:port (Polos, nats.py); env: NATS_URL, NATS_USER, "
        "NATS_PASSWORD and POLOS_NATS_URL lines (for clients that ignore a password in "
        "a URL, such as the Node clients); context: a NATS CLI context file; json",
    )


def _without_credentials(url: str) -> str:
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        netloc = parts.hostname or "127.0.0.1"
        if parts.port:
            netloc += f":{parts.port}"
        out.append(f"{parts.scheme or 'nats'}://{netloc}")
    return ",".join(out)


def credentials_text(creds: dict[str, dict[str, str]], user: str, base: str, fmt: str) -> str:
    """``user``'s credentials for the server at ``base`` in format ``fmt``."""
    with_creds = auth.url_for(creds, user, base)
    plain = _without_credentials(base)
    password = creds[user]["password"]
    if fmt == "url":
        return with_creds
    if fmt == "env":
        # Passwords are URL-safe tokens and the URLs hold no shell metacharacters, so these
        # lines work unquoted in a shell, `docker --env-file` and systemd alike.
        return "\n".join(
            [
                f"NATS_URL={plain}",
                f"NATS_USER={user}",
                f"NATS_PASSWORD={password}",
                f"POLOS_NATS_URL={with_creds}",
                f"POLOS_PREFIX={creds[user]['prefix']}",
            ]
        )
    doc: dict[str, Any]
    if fmt == "context":
        # The NATS CLI's context file (~/.config/nats/context/NAME.json).
        doc = {
            "description": f"Polos {creds[user]['role']} of namespace {creds[user]['prefix']}",
            "url": plain,
            "user": user,
            "password": password,
        }
        if os.environ.get("POLOS_TLS_CA"):
            doc["ca"] = os.environ["POLOS_TLS_CA"]
        return json.dumps(doc, indent=2)
    doc = {
        "url": plain,
        "servers": plain.split(","),
        "user": user,
        "password": password,
        "role": creds[user]["role"],
        "prefix": creds[user]["prefix"],
        "nats_url": with_creds,
    }
    return json.dumps(doc, indent=2)


@command("credentials", "print a role's credentials for the running `polos up` (--format)")(
    _add_credentials
)
async def cmd_credentials(args: argparse.Namespace) -> int:
    ddir = data_dir(args)
    path = ddir / auth.CREDENTIALS_FILE
    if not path.exists():
        print(
            f"error: no credentials in {ddir}: `polos up` makes them on its first start "
            "there (not with --no-auth); --data-dir or POLOS_DATA_DIR names another data dir",
            file=sys.stderr,
        )
        return 1
    creds = json.loads(path.read_text())
    settings = settings_for(args)
    user = f"{settings.prefix}-{args.role}"
    if user not in creds:
        print(
            f"error: {path} has no user {user!r} (namespace {settings.prefix!r}; --prefix "
            "picks another)",
            file=sys.stderr,
        )
        return 1
    # The server that actually runs on this data dir, unless told another (a remote host).
    base = args.nats_url or os.environ.get("POLOS_NATS_URL")
    if not base:
        instance = running(ddir)
        if instance is None or not instance.url:
            print(
                f"error: no `polos up` runs on {ddir.resolve()}, so its URL is unknown: "
                "start it, or name the server with --nats-url",
                file=sys.stderr,
            )
            return 1
        base = instance.url
    print(credentials_text(creds, user, base, args.format))
    return 0


def _add_init(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--check",
        action="store_true",
        help="create nothing: say what is missing (any role may check)",
    )


@command("init", "create the namespace's streams and buckets (service role) and exit")(_add_init)
async def cmd_init(args: argparse.Namespace) -> int:
    from polos._private.store import TOPOLOGY, Names, check_topology, ensure_topology

    settings = settings_for(args, role="client" if args.check else "service")
    names = Names(settings.prefix)
    nc = await connect(settings, name="polos-init")
    try:
        js = nc.jetstream(timeout=settings.request_timeout)
        if args.check:
            await check_topology(js, names)
        else:
            await ensure_topology(js, names, settings)
    finally:
        await disconnect(nc)
    kinds = [row.kind for row in TOPOLOGY]
    print(
        f"namespace {settings.prefix!r} {'has' if args.check else 'is ready:'} "
        f"{kinds.count('stream')} streams, {kinds.count('kv')} KV buckets and "
        f"{kinds.count('object')} object store{'s' if kinds.count('object') != 1 else ''}"
    )
    return 0

"""``polos ui`` and the UI part of ``polos up`` (``--ui-port``, ``--ui-host``, ``--no-ui``).
Registered on import (the ``polos.commands`` entry point ``ui``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from polos._private.ops.commands import command, data_dir, settings_for, up_extension
from polos._private.ops.runtime import run_until_signal
from polos.config import Settings

from .server import DEFAULT_PORT, UIConfig, UIServer, service_role_refused


def _port_default() -> int:
    return int(os.environ.get("POLOS_UI_PORT", str(DEFAULT_PORT)))


def add_ui_args(p: argparse.ArgumentParser, *, for_up: bool) -> None:
    """The UI's flags, on ``polos up`` and ``polos ui``."""
    if for_up:
        p.add_argument(
            "--ui",
            action=argparse.BooleanOptionalAction,
            default=os.environ.get("POLOS_UI", "1") != "0",
            help="serve the web UI (the default; --no-ui or POLOS_UI=0 turns it off)",
        )
    p.add_argument(
        "--ui-port",
        type=int,
        default=None,
        help=f"the UI's port (env POLOS_UI_PORT, default {DEFAULT_PORT}; 0 = any free "
        "port; a busy default port moves to the next free one)",
    )
    p.add_argument(
        "--ui-host",
        default=os.environ.get("POLOS_UI_HOST", "127.0.0.1"),
        help="the address the UI listens on (default 127.0.0.1: this machine only)",
    )
    p.add_argument(
        "--ui-url",
        default=os.environ.get("POLOS_UI_PUBLIC_URL"),
        help="the URL people reach the UI by, when it is behind a proxy "
        "(approval links are made from it)",
    )
    if not for_up:  # `polos up` has its own --export-dir: the export it keeps, the SQL page reads
        p.add_argument(
            "--export-dir",
            dest="ui_export_dir",
            default=None,
            help="the analytics export the SQL page reads (env POLOS_ANALYTICS_DIR; "
            "default: DATA_DIR/exports, where `polos up` keeps it)",
        )


def ui_config(args: argparse.Namespace, settings: Settings, *, auth: bool) -> UIConfig:
    ddir = data_dir(args)
    explicit = (
        args.ui_port
        if args.ui_port is not None
        else (int(os.environ["POLOS_UI_PORT"]) if os.environ.get("POLOS_UI_PORT") else None)
    )
    export = (
        getattr(args, "ui_export_dir", None)
        or getattr(args, "export_dir", None)
        or os.environ.get("POLOS_ANALYTICS_DIR")
        or str(ddir / "exports")
    )
    return UIConfig(
        settings=settings,
        host=args.ui_host,
        port=_port_default() if explicit is None else explicit,
        port_fallback=explicit is None,
        auth=auth,
        data_dir=ddir,
        export_dir=Path(export),
        public_url=args.ui_url,
    )


def ui_for_up(args: argparse.Namespace, client_settings: Settings) -> UIServer | None:
    """The UI service `polos up` runs beside the orchestrator and scheduler, or None with
    ``--no-ui`` (or when all it has is a service role's URL)."""
    if not getattr(args, "ui", True):
        return None
    why = service_role_refused(client_settings.nats_url)
    if why:
        print(f"ui: not started: {why}", flush=True)
        return None
    return UIServer(ui_config(args, client_settings, auth=bool(getattr(args, "auth", True))))


def _add_ui(p: argparse.ArgumentParser) -> None:
    add_ui_args(p, for_up=False)
    p.add_argument(
        "--token",
        default=os.environ.get("POLOS_UI_TOKEN"),
        help="the UI's token (env POLOS_UI_TOKEN; default: the one kept in the data "
        "dir's ui.json, made on first start)",
    )
    p.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="require the token (the default; --no-auth serves every page to anyone "
        "who can reach the port)",
    )


@command("ui", "serve the web UI against a running server or cluster (--nats-url)")(_add_ui)
async def cmd_ui(args: argparse.Namespace) -> int:
    settings = settings_for(args, role="client")
    why = service_role_refused(settings.nats_url)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    config = ui_config(args, settings, auth=args.auth)
    config.token = args.token
    ui = UIServer(config)
    await run_until_signal(ui, on_started=lambda: print(f"ui: {ui.login_url}", flush=True))
    return 0


up_extension(lambda p: add_ui_args(p, for_up=True), ui_for_up)

__all__ = ["add_ui_args", "cmd_ui", "ui_for_up"]

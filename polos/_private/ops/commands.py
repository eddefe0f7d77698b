"""The ``polos`` command's registry and what its subcommands share: a subcommand is added with
``@command(name, help)(add_args)(handler)`` by the module that implements it (``polos.cli``
for the SDK's own, and the plugins the ``polos.commands`` entry points name: the analytics,
the web UI, the benchmark). Settings come from flags and ``POLOS_*`` variables, else from the
``polos up`` running on the data dir, with the credentials of the role a command acts as.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Collection, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from polos._private.ops import output
from polos._private.ops.instance import data_dir_from, running
from polos._private.ops.runtime import settings_from_args
from polos.config import Settings

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(
    name: str, help: str
) -> Callable[[Callable[[argparse.ArgumentParser], None]], Callable[[Handler], Handler]]:
    """Register a subcommand: ``@command("x", "...")(add_args)(handler)``."""

    def with_args(
        add_args: Callable[[argparse.ArgumentParser], None],
    ) -> Callable[[Handler], Handler]:
        def with_handler(handler: Handler) -> Handler:
            COMMANDS[name] = (add_args, handler, help)
            return handler

        return with_handler

    return with_args


DATA_DIR_HELP = (
    "the data dir of `polos up`: where it keeps its streams and credentials, and where "
    "other commands find it (env POLOS_DATA_DIR, default ./.polos)"
)
URL_FILE = "url"  # in the data dir while `polos up` runs: the embedded server's URL


def data_dir(args: argparse.Namespace) -> Path:
    """``--data-dir``, else ``$POLOS_DATA_DIR``, else ``./.polos``."""
    return data_dir_from(getattr(args, "data_dir", None))


def local_url(role: str, prefix: str, data_dir: Path) -> str | None:
    """The URL of the `polos up` running on ``data_dir``, with ``role``'s credentials."""
    from polos._private.ops import auth

    instance = running(data_dir)
    if instance is None or not instance.url:
        return None  # none runs there (a `url` file left by a killed one is stale)
    url = instance.url

    try:
        creds = orjson.loads((data_dir / auth.CREDENTIALS_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return url  # polos up --no-auth
    user = f"{prefix}-{role}"
    return auth.url_for(creds, user, url) if user in creds else url


def settings_for(args: argparse.Namespace, role: str = "client") -> Settings:
    """Settings from flags and POLOS_* variables; with neither naming a server, the
    `polos up` of the data dir (``--data-dir``, ``POLOS_DATA_DIR``, ``./.polos``) and its
    credentials for ``role``, when one runs."""
    settings = settings_from_args(args)
    if getattr(args, "nats_url", None) or os.environ.get("POLOS_NATS_URL"):
        return settings
    local = local_url(role, settings.prefix, data_dir(args))
    if local and settings.ui_url is None:
        # Workers of this `polos up` make approval links to its UI (docs/ui.md).
        instance = running(data_dir(args))
        if instance is not None and instance.ui_url:
            settings = settings.with_(ui_url=instance.ui_url)
    return settings.with_(nats_url=local) if local else settings


def ts(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def table(
    rows: Sequence[Sequence[output.Cell]],
    headers: Sequence[str],
    *,
    wrap: Collection[str] | None = None,
) -> str:
    """A table for stdout: fitted to a terminal, plain and whole when piped (see output)."""
    return output.table(rows, headers, wrap=wrap)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``polos worker`` and ``python -m polos_services.worker``."""
    p.add_argument("module", help="module name or .py file that defines @workflow functions")
    p.add_argument("--max-concurrent-runs", type=int, default=200)
    p.add_argument("--worker-id")
    p.add_argument(
        "--dev-llm",
        action="store_true",
        help="agents talk to the Polos dev LLM, a scripted OpenAI-compatible test "
        "server started in this process (not a model: it calls each offered "
        "tool once, then answers from the output schema)",
    )


# `polos up` runs what its extensions add (the web UI): each adds its flags to `up`'s parser and
# makes, from the parsed flags and the client role's settings, something to run beside the
# services (``start``/``stop``), or None.
UpExtension = tuple[
    Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, Settings], Any]
]
UP_EXTENSIONS: list[UpExtension] = []


def up_extension(
    add_args: Callable[[argparse.ArgumentParser], None],
    make: Callable[[argparse.Namespace, Settings], Any],
) -> None:
    """Add something `polos up` runs (see ``UP_EXTENSIONS``)."""
    UP_EXTENSIONS.append((add_args, make))


__all__ = [
    "COMMANDS",
    "DATA_DIR_HELP",
    "UP_EXTENSIONS",
    "URL_FILE",
    "Handler",
    "add_worker_args",
    "command",
    "data_dir",
    "dumps",
    "local_url",
    "settings_for",
    "table",
    "ts",
    "up_extension",
]

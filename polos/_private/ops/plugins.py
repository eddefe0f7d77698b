"""The small entry-point registry through which the SDK reaches what is installed beside it.

``polos`` itself never imports the server side (``polos_services``), the analytics
(``polos_analytics``) or the web UI (``polos_ui``): they sit above it. Where the SDK needs them
(``polos up``, the demo, ``polos.testing``'s environment, the ``polos`` command's subcommands)
it looks them up by name in the entry points the wheel declares (``pyproject.toml``):

- ``polos.services``: the service classes (``orchestrator``, ``scheduler``), each with
  ``start()``/``stop()`` and a ``Settings`` argument;
- ``polos.commands``: modules that add ``polos`` subcommands when imported.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Any

SERVICES = "polos.services"
COMMANDS = "polos.commands"


class PluginMissingError(LookupError):
    """An entry point Polos needs is not installed (a broken or partial installation)."""


def _points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def service(name: str) -> Any:
    """The service class installed under ``name`` (``orchestrator``, ``scheduler``)."""
    point = _points(SERVICES).get(name)
    if point is None:
        raise PluginMissingError(
            f"the Polos service {name!r} is not installed (no entry point {SERVICES}:{name}): "
            "reinstall polos (`pip install polos`, or `pip install -e .` in a checkout)"
        )
    return point.load()


def load_commands() -> list[str]:
    """Import every module that adds ``polos`` subcommands; returns their names."""
    loaded = []
    for point in sorted(_points(COMMANDS).values(), key=lambda p: p.name):
        importlib.import_module(point.value)
        loaded.append(point.value)
    return loaded


__all__ = ["COMMANDS", "SERVICES", "PluginMissingError", "load_commands", "service"]

"""Process plumbing shared by the services and the CLI: settings, signals, module loading."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, Protocol

from polos._private.model.aio import cancel_and_wait
from polos._private.model.values import WorkflowDefinition
from polos.config import Settings


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the environment, overridden by ``--nats-url`` / ``--prefix`` flags."""
    changes = {k: v for k, v in extra.items() if v is not None}
    if getattr(args, "nats_url", None):
        changes["nats_url"] = args.nats_url
    if getattr(args, "prefix", None):
        changes["prefix"] = args.prefix
    return Settings().with_(**changes) if changes else Settings()


def default_export_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where `polos up` keeps the Parquet export current and `polos sql` reads it:
    ``$POLOS_ANALYTICS_DIR``, else ``exports`` in the data dir (``data_dir``, else
    ``$POLOS_DATA_DIR``, else ``.polos``)."""
    explicit = os.environ.get("POLOS_ANALYTICS_DIR")
    if explicit:
        return Path(explicit)
    return Path(data_dir or os.environ.get("POLOS_DATA_DIR") or ".polos") / "exports"


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_for_signal() -> None:
    await _stop_event().wait()


def tune_gc(settings: Settings) -> None:
    """The collector of a Polos service process (``Settings.gc_threshold``). Young collections
    every ``gc_threshold`` allocations instead of 700, and older generations after 20 of the
    one below instead of 10: a service allocates a future, a message and a task per request,
    nearly all freed by reference counting, and each whole-heap collection walks every run
    the orchestrator keeps in its index cache while every request of the process waits."""
    if settings.gc_threshold > 0:
        gc.set_threshold(settings.gc_threshold, 20, 20)


def service_main(args: argparse.Namespace, make: Callable[[Settings], Service]) -> None:
    """A service's ``__main__`` (orchestrator, scheduler): its settings from the environment
    and ``args``, its collector (``tune_gc``), then ``make(settings)`` until a signal. A setting
    that is wrong ends the process with one line and exit code 2, before anything starts."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    tune_gc(settings)
    run_main(run_until_signal(make(settings)))


async def run_until_signal(
    *services: Service, on_started: Callable[[], None] | None = None
) -> None:
    """Start the services, run until SIGINT/SIGTERM, stop them in reverse order.

    The signal handlers go in before anything starts: a Ctrl-C while a service is still
    starting (a server recovering its streams) must stop the process, not be lost. A service
    whose connection failed for good (its ``fatal``, see ``store.connect_service``) stops
    them all too, and its ``ConnectionFailedError`` is raised once they are stopped.
    """
    from polos._private.store.connection import Fatal

    stop = _stop_event()
    started: list[Service] = []
    failures = [f for f in (getattr(s, "fatal", None) for s in services) if isinstance(f, Fatal)]
    try:
        for s in services:
            if stop.is_set():
                break
            # A start may wait for the server for as long as it takes: a signal ends the wait.
            starting = asyncio.ensure_future(s.start())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not starting.done():
                await cancel_and_wait([starting])
                started.append(s)  # stopped below: whatever it had opened is closed
                break
            started.append(s)
            starting.result()  # a start that failed raises here
        if not stop.is_set():
            if on_started is not None:
                on_started()
            waiters = [
                asyncio.ensure_future(stop.wait()),
                *(asyncio.ensure_future(f.wait()) for f in failures),
            ]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
    finally:
        for s in reversed(started):
            with contextlib.suppress(Exception):
                await s.stop()
    for f in failures:
        if f.error is not None:
            raise f.error


def log_to_file(path: str | os.PathLike[str]) -> None:
    """The original Polos's ``log_file=``: every log line of the process (the root logger,
    INFO and up) goes to ``path``, appended, and none to the terminal."""
    import logging

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def run_main(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(main)`` for a service's ``__main__``: a Polos error (the server refused
    the credentials) ends the process with one line and exit code 1, not a traceback."""
    from polos.errors import PolosError

    try:
        asyncio.run(main)
    except KeyboardInterrupt:
        sys.exit(130)
    except PolosError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def terminate_all(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every process still running (all at once, so they shut down in parallel), wait
    for each, and SIGKILL whichever has not exited after ``timeout`` seconds."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _module_for_path(path: Path) -> str:
    """The dotted module name of a ``.py`` file, with the directory above its package put on
    ``sys.path`` (as pytest does): ``examples/order.py`` in a directory whose ``examples/``
    has an ``__init__.py`` is ``examples.order``, so the file's own imports of its package
    (``from .validation import ...`` or ``from examples.validation import ...``) work."""
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return ".".join(parts)


def load_workflows(target: str) -> list[WorkflowDefinition[Any, Any]]:
    """Import a module (``pkg.mod``) or a file (``path/to/file.py``) and return its workflows."""
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise ImportError(f"no such file: {target}")
        name = _module_for_path(path)
    else:
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        name = target
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise ImportError(
                f"cannot import {target!r}: no module {exc.name!r} (from {Path.cwd()}); "
                "give a module name importable from here or a path to a .py file"
            ) from exc
        raise
    found = [v for v in vars(module).values() if isinstance(v, WorkflowDefinition)]
    # A queued tool's calls run as its own workflow: serve it beside the module's workflows,
    # whether the tool is a module name or only in an agent's tools.
    for v in vars(module).values():
        if isinstance(v, type):
            continue
        tools = getattr(v, "tools", None)
        for t in [v, *(tools if isinstance(tools, list) else [])]:
            wf = getattr(t, "workflow", None)
            if isinstance(wf, WorkflowDefinition):
                found.append(wf)
    if not found:
        raise ImportError(f"module {target!r} defines no @workflow")
    # A module may import the same workflow under two names.
    unique: dict[str, WorkflowDefinition[Any, Any]] = {}
    for wf in found:
        unique[wf.name] = wf
    return list(unique.values())

"""The original Polos's verbs, mapped onto ours (docs/migrating.md).

``polos server start|stop|status`` is ``polos up`` in the background, its stop and its status;
``run`` / ``invoke`` / ``status`` / ``result`` / ``logs`` act on runs ("executions" there);
``workflow|agent|tool list|describe`` read what live workers registered, or what a module
defines (``--module``). Each acts as the client role, as every command but ``up`` and ``worker``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from polos import history as ev
from polos._private.agents import catalog
from polos._private.agents.tools import Tool
from polos._private.model.values import WorkflowDefinition
from polos._private.ops import output
from polos._private.ops.commands import command, data_dir, dumps, settings_for, table
from polos._private.ops.instance import running
from polos._private.ops.runtime import _module_for_path
from polos._private.store import kv_entries, read_history
from polos.cli.core import client_for
from polos.client import PolosClient
from polos.converter import json_schema
from polos.errors import PolosError, WorkflowCancelledError, WorkflowFailedError

# --------------------------------------------------------------------------- server

UP_LOG = "up.log"  # in the data dir: what the `polos up` started by `polos server start` says
_UP_READY = "Polos is up:"


def _add_server(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for it to start or stop"
    )
    p.add_argument(
        "up_args",
        nargs=argparse.REMAINDER,
        help="start: flags for `polos up` (--port, --no-auth, --no-ui, ...)",
    )


def _global_flags(args: argparse.Namespace) -> tuple[Path, list[str], list[str]]:
    """The data dir; the flags `polos up` gets besides the user's; and the user's flags that
    are not global ones (REMAINDER keeps global flags given after the verb in ``up_args``)."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--data-dir")
    extra.add_argument("--prefix")
    extra.add_argument("--nats-url")
    known, rest = extra.parse_known_args(args.up_args)
    for name in ("data_dir", "prefix", "nats_url"):
        if getattr(known, name) is not None:
            setattr(args, name, getattr(known, name))
    flags = [] if known.prefix or not getattr(args, "prefix", None) else ["--prefix", args.prefix]
    return data_dir(args), flags, rest


@command("server", "the original's `polos server start|stop|status`: `polos up` in the background")(
    _add_server
)
async def cmd_server(args: argparse.Namespace) -> int:
    ddir, flags, rest = _global_flags(args)
    if args.action == "start":
        return await _server_start(ddir, flags, args)
    if rest:
        output.error(f"polos server {args.action} takes no flags of `polos up`: {rest}")
        return 2
    if args.action == "stop":
        return await _server_stop(ddir, args.timeout)
    return await _server_status(ddir, args)


def _spawn_up(flags: list[str], ddir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    ddir.mkdir(parents=True, exist_ok=True)
    start_at = log_path.stat().st_size if log_path.exists() else 0
    cmd = [sys.executable, "-m", "polos", "up", "--data-dir", str(ddir), *flags]
    with open(log_path, "ab") as log:
        # Its own session: it outlives this command, and a Ctrl-C here does not reach it.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, start_at


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def _server_start(ddir: Path, flags: list[str], args: argparse.Namespace) -> int:
    instance = running(ddir)
    if instance is not None:
        print(f"Polos is already running on {ddir.resolve()} ({instance.describe()})")
        return 0
    log_path = ddir / UP_LOG
    proc, start_at = await asyncio.to_thread(_spawn_up, [*flags, *args.up_args], ddir, log_path)
    deadline = time.monotonic() + args.timeout
    said = ""
    while time.monotonic() < deadline:
        said = await asyncio.to_thread(_read_from, log_path, start_at)
        if _UP_READY in said:
            break
        if proc.poll() is not None:
            output.error(f"polos up exited with code {proc.returncode}; its log ({log_path}):")
            print(said.strip(), file=sys.stderr)
            return 1
        await asyncio.sleep(0.1)
    else:
        output.error(f"polos up did not come up within {args.timeout:g}s; its log: {log_path}")
        return 1
    for line in said.splitlines():
        if not line.startswith("Ctrl-C"):
            print(line)
    print(f"Polos runs in the background (pid {proc.pid}); its log: {log_path}")
    print("To stop it: polos server stop; its status: polos server status")
    return 0


async def _server_stop(ddir: Path, timeout: float) -> int:
    instance = running(ddir)
    if instance is None or not instance.pid:
        print(f"No running Polos found on {ddir.resolve()}.")
        return 0
    print(f"Stopping Polos (pid {instance.pid})...", flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(instance.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running(ddir) is None:
            print("Polos stopped.")
            return 0
        await asyncio.sleep(0.1)
    output.error(f"Polos (pid {instance.pid}) did not stop within {timeout:g}s")
    return 1


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def _server_status(ddir: Path, args: argparse.Namespace) -> int:
    instance = running(ddir)
    if instance is None:
        print(f"Polos is not running on {ddir.resolve()} (start it: polos server start)")
        return 1
    print("Polos Server Status")
    print(f"  polos up:  running (pid {instance.pid})")
    print(f"  NATS:      {_without_password(instance.url or 'starting')}")
    if instance.ui_url:
        print(f"  UI:        {instance.ui_url}")
    try:
        client = await PolosClient.connect(settings=settings_for(args))
    except PolosError as exc:
        print(f"  answers:   no ({exc})")
        return 1
    try:
        workers = await client.workers()
    finally:
        await client.close()
    print(f"  answers:   yes, as the client role ({len(workers)} live worker(s))")
    print(f"  data dir:  {ddir.resolve()}")
    log_path = ddir / UP_LOG
    if log_path.exists():
        print(f"  log:       {log_path.resolve()}")
    return 0


# --------------------------------------------------------------------------- runs


def _input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a workflow, or an agent that a live worker serves")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--input", help="the input: JSON for a workflow, text for an agent")
    given.add_argument("--file", help="read the input from this file")


async def _start(client: PolosClient, args: argparse.Namespace) -> tuple[Any, bool] | None:
    """Start ``args.name`` with its input; the handle, and whether it is an agent's run."""
    text = args.input
    if args.file is not None:
        text = Path(args.file).read_text()
    workers = await client.workers()
    served = {name for w in workers for name in w.get("workflows", [])}
    agents = {a["id"] for w in workers for a in w.get("agents", [])}
    if args.name in agents and args.name not in served:
        if "polos_agent" not in served:
            output.error(
                f"no live worker runs agents: the module of the worker that defines {args.name!r} "
                "must import polos.agent.agent_workflow (docs/agents.md)"
            )
            return None
        if text is None:
            output.error(
                f"polos {args.command} {args.name} needs --input TEXT or --file: the original's "
                "interactive chat is not supported here"
            )
            return None
        handle: Any = await client.start(
            "polos_agent", {"agent": args.name, "input": text, "key": "agent"}
        )
        return handle, True
    try:
        value = orjson.loads(text) if text is not None else None
    except orjson.JSONDecodeError as exc:
        output.error(f"the input of workflow {args.name!r} is not valid JSON: {exc}")
        return None
    if args.name not in served:
        output.hint(f"no live worker serves {args.name!r} yet: the run waits for one")
    return await client.start(args.name, value), False


def _add_run(p: argparse.ArgumentParser) -> None:
    _input_flags(p)
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the result")


@command("run", "run a workflow (or an agent) and print its result (the original's `polos run`)")(
    _add_run
)
async def cmd_run(args: argparse.Namespace) -> int:
    client = await client_for(args)
    try:
        started = await _start(client, args)
        if started is None:
            return 2
        handle, is_agent = started
        output.hint(f"run {handle.run_id} started")
        code, value = await _outcome(handle, args.timeout)
        if code == 0:
            if is_agent and isinstance(value, dict):
                value = value.get("result")
            print(value if isinstance(value, str) else dumps(value))
        return code
    finally:
        await client.close()


@command("invoke", "start a workflow (or an agent) and print the run id (`polos invoke`)")(
    _input_flags
)
async def cmd_invoke(args: argparse.Namespace) -> int:
    if args.input is None and args.file is None:
        output.error(
            "Either --input or --file is required for invoke. Use 'polos run' to wait for "
            "the result."
        )
        return 2
    client = await client_for(args)
    try:
        started = await _start(client, args)
        if started is None:
            return 2
        run_id = started[0].run_id
    finally:
        await client.close()
    print(f"Execution started: {run_id}")
    print("Track progress:")
    for verb in ("status", "logs", "result"):
        print(f"  polos {verb} {run_id}")
    return 0


async def _outcome(handle: Any, timeout: float | None) -> tuple[int, Any]:
    """``polos result``'s outcome: (0, the output), or (1, None) having said why on stderr."""
    try:
        return 0, await handle.result(timeout=timeout)
    except WorkflowFailedError as exc:
        print(
            f"Execution failed: {exc.error.get('type')}: {exc.error.get('message')}",
            file=sys.stderr,
        )
    except WorkflowCancelledError:
        print("Execution was cancelled", file=sys.stderr)
    except TimeoutError:
        status = await handle.status()
        print(
            f"Timed out after {timeout:g}s waiting for execution to complete. Status: {status}\n"
            f"Check progress: polos status {handle.run_id}",
            file=sys.stderr,
        )
    return 1, None


def _add_run_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id")


def ago(t: float | None, now: float | None = None) -> str:
    """``2 minutes ago``: how long ago ``t`` (epoch seconds) was."""
    if not t:
        return "-"
    seconds = max(0.0, (now or time.time()) - t)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return f"{int(seconds)} second{'s' if int(seconds) != 1 else ''} ago"


@command("status", "a run's status (the original's `polos status`)")(_add_run_id)
async def cmd_status(args: argparse.Namespace) -> int:
    client = await client_for(args)
    try:
        info = await client.get(args.run_id)
    finally:
        await client.close()
    out = output.console()
    print(f"Execution: {info.run_id}")
    print(f"Workflow:  {info.workflow}")
    out.print(output.styled("Status:    ", ""), output.status(info.status), sep="")
    started = datetime.fromtimestamp(info.created_at, tz=UTC) if info.created_at else None
    print(
        f"Started:   {ago(info.created_at)}"
        + (f" ({started:%Y-%m-%d %H:%M:%S} UTC)" if started else "")
    )
    if info.waiting:
        print(f"Waiting:   {info.waiting.get('kind')} at step {info.waiting.get('step')!r}")
    if info.error:
        print(f"Error:     {info.error.get('type')}: {info.error.get('message')}")
    return 0


def _add_result(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")


@command("result", "wait for a run's result and print it (the original's `polos result`)")(
    _add_result
)
async def cmd_result(args: argparse.Namespace) -> int:
    client = await client_for(args)
    try:
        await client.get(args.run_id)  # RunNotFoundError: a clear error, not a 300 s wait
        code, value = await _outcome(client.get_handle(args.run_id), args.timeout)
    finally:
        await client.close()
    if code == 0:
        print(
            "Execution completed (no result data)"
            if value is None
            else orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()
        )
    return code


def _add_logs(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id")
    p.add_argument("--last", type=int, help="only the last N events, and do not follow")


_ENDINGS = (ev.RunCompleted, ev.RunFailed, ev.RunCancelled)


def log_line(event: ev.Event) -> str:
    """``[HH:MM:SS] [EventType] {fields}``, as the original's ``polos logs`` prints."""
    fields = {k: v for k, v in ev.encode_dict(event).items() if k != "at" and v is not None}
    clock = datetime.fromtimestamp(event.at, tz=UTC).strftime("%H:%M:%S")
    return f"[{clock}] [{type(event).__name__}] {dumps(fields)}"


@command("logs", "a run's events; follows it until it ends unless --last (`polos logs`)")(_add_logs)
async def cmd_logs(args: argparse.Namespace) -> int:
    client = await client_for(args)
    try:
        return await _logs(client, args.run_id, args.last)
    finally:
        await client.close()


async def _logs(client: PolosClient, run_id: str, last: int | None) -> int:
    await client.get(run_id)  # RunNotFoundError for an unknown id
    if last is not None:
        for _, event in (await client.history(run_id))[-last:] if last > 0 else []:
            print(log_line(event))
        return 0
    news: asyncio.Queue[None] = asyncio.Queue()

    async def nudge(msg: Any) -> None:
        news.put_nowait(None)

    # Subscribed before the first read, so nothing appended in between is missed; each nudge
    # reads what came after the last event printed (the log is the truth, not the message).
    subs = [
        await client.nc.subscribe(client.names.run_subject(run_id, kind), cb=nudge)
        for kind in ("ctl", "step")
    ]
    try:
        print(f"Following run {run_id} (Ctrl-C stops)", file=sys.stderr, flush=True)
        seq = 0
        while True:
            new = await read_history(client.nc, client.names, run_id, start_seq=seq + 1)
            for _, event in new:
                print(log_line(event), flush=True)
            if new:
                seq = new[-1][0]
            # The ending as the log holds it (a fenced-out writer's ending never got there).
            if any(isinstance(e, _ENDINGS) for _, e in new):
                return 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(news.get(), timeout=30.0)
            while not news.empty():
                news.get_nowait()
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


# --------------------------------------------------------------------------- catalog


def _add_catalog(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "describe"])
    p.add_argument("id", nargs="?", help="describe: which one")
    p.add_argument(
        "--module",
        help="list what this module (or .py file) defines instead of what live workers serve",
    )
    p.add_argument("--json", action="store_true")


async def _registered(
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The workflows' registrations and the live workers (or what ``--module`` defines)."""
    if args.module:
        module = _import(args.module)
        wfs = [v for v in vars(module).values() if isinstance(v, WorkflowDefinition)]

        docs = [
            {
                "name": wf.name,
                "queue": wf.queue,
                "trigger_on_event": wf.trigger_on_event,
                "schedule": wf.schedule,
                "timezone": wf.timezone,
                "doc": (wf.fn.__doc__ or "").strip() or None,
                "input_schema": json_schema(wf.input_type),
                "output_schema": json_schema(wf.output_type),
            }
            for wf in wfs
        ]
        extra = [v for v in vars(module).values() if isinstance(v, Tool)]
        worker = {
            "id": f"module {args.module}",
            "workflows": [d["name"] for d in docs],
            "agents": catalog.agents(),
            "tools": catalog.tools(extra),
        }
        return docs, [worker]
    client = await client_for(args)
    try:
        entries = await kv_entries(client.nc, client.names.workflows_bucket)
        workers = await client.workers()
    finally:
        await client.close()
    return [orjson.loads(e.value) for e in entries], workers


def _import(target: str) -> ModuleType:
    """The module ``target`` names (a module or a ``.py`` file), imported as ``polos worker``
    imports it; it need not define a workflow (an agents-only module)."""
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise ImportError(f"no such file: {target}")
        return importlib.import_module(_module_for_path(path))
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    return importlib.import_module(target)


def _kind(doc: dict[str, Any]) -> str:
    if doc.get("trigger_on_event"):
        return "event-triggered"
    if doc.get("schedule"):
        return "scheduled"
    return "agent" if doc.get("name") == "polos_agent" else "workflow"


def _status_of(online: bool, module: bool) -> output.Cell:
    if module:
        return "defined"
    return output.styled("online", "green") if online else output.styled("offline", "dim")


def _need_id(args: argparse.Namespace, what: str) -> str | None:
    if args.action == "describe" and not args.id:
        output.error(f"polos {what} describe needs the {what}'s id")
    return str(args.id) if args.id else None


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()


@command("workflow", "workflow list|describe ID: registered workflows (the original's verbs)")(
    _add_catalog
)
async def cmd_workflow(args: argparse.Namespace) -> int:
    wid = _need_id(args, "workflow")
    if args.action == "describe" and wid is None:
        return 2
    docs, workers = await _registered(args)
    online = {
        name: [w["id"] for w in workers if name in w.get("workflows", [])]
        for d in docs
        for name in [d["name"]]
    }
    if args.action == "list":
        if args.json:
            print(dumps([{**d, "workers": online[d["name"]]} for d in docs]))
            return 0
        if not docs:
            print("No workflows registered.")
            output.hint("Start a worker to register workflows: polos worker MODULE")
            return 0
        rows = [
            [
                d["name"],
                _kind(d),
                d.get("queue") or "-",
                _status_of(bool(online[d["name"]]), bool(args.module)),
            ]
            for d in sorted(docs, key=lambda d: d["name"])
        ]
        print(table(rows, ["ID", "TYPE", "QUEUE", "STATUS"]))
        return 0
    doc = next((d for d in docs if d["name"] == wid), None)
    if doc is None:
        output.error(f"no workflow {wid!r} is registered (polos workflow list shows them)")
        return 1
    if args.json:
        print(dumps({**doc, "workers": online[wid]}))
        return 0
    print(f"Workflow:      {wid}")
    print(f"Type:          {_kind(doc)}")
    print(f"Queue:         {doc.get('queue') or '-'}")
    if doc.get("trigger_on_event"):
        print(f"Trigger:       events on {doc['trigger_on_event']}")
    if doc.get("schedule"):
        print(f"Schedule:      {doc['schedule']} ({doc.get('timezone') or 'UTC'})")
    print(f"Description:   {doc.get('doc') or '-'}")
    print(f"Served by:     {', '.join(online[wid]) or 'no live worker'}")
    print(f"Input schema:  {_pretty(doc.get('input_schema'))}")
    print(f"Output schema: {_pretty(doc.get('output_schema'))}")
    return 0


def _by_id(
    workers: list[dict[str, Any]], key: str
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    found: dict[str, dict[str, Any]] = {}
    served: dict[str, list[str]] = {}
    for w in workers:
        for item in w.get(key, []):
            found.setdefault(item["id"], item)
            served.setdefault(item["id"], []).append(w["id"])
    return found, served


@command("agent", "agent list|describe ID: agents live workers serve (the original's verbs)")(
    _add_catalog
)
async def cmd_agent(args: argparse.Namespace) -> int:
    aid = _need_id(args, "agent")
    if args.action == "describe" and aid is None:
        return 2
    _, workers = await _registered(args)
    agents, served = _by_id(workers, "agents")
    if args.action == "list":
        if args.json:
            print(dumps(list(agents.values())))
            return 0
        if not agents:
            print("No agents registered.")
            output.hint("Start a worker whose module defines agents: polos worker MODULE")
            return 0
        rows = []
        for a in sorted(agents.values(), key=lambda a: a["id"]):
            tools = a.get("tools", [])
            shown = ", ".join(tools[:3]) + (f", +{len(tools) - 3} more" if len(tools) > 3 else "")
            rows.append(
                [a["id"], a.get("model") or "-", shown or "-", _status_of(True, bool(args.module))]
            )
        print(table(rows, ["ID", "MODEL", "TOOLS", "STATUS"]))
        return 0
    found = agents.get(aid or "")
    if found is None:
        output.error(f"no agent {aid!r} is served by a live worker (polos agent list shows them)")
        return 1
    a = found
    if args.json:
        print(dumps(a))
        return 0
    print(f"Agent:             {a['id']}")
    print(f"Provider:          {a.get('provider')}")
    print(f"Model:             {a.get('model')}")
    print(f"Tools:             {', '.join(a.get('tools', [])) or '-'}")
    print(f"Temperature:       {a.get('temperature') if a.get('temperature') is not None else '-'}")
    print(f"Max Output Tokens: {a.get('max_tokens') or '-'}")
    print(f"Served by:         {', '.join(served.get(a['id'], []))}")
    print(f"System Prompt:     {a.get('instructions') or '-'}")
    return 0


@command(
    "tool", "tool list|describe ID: tools of the agents live workers serve (original's verbs)"
)(_add_catalog)
async def cmd_tool(args: argparse.Namespace) -> int:
    tid = _need_id(args, "tool")
    if args.action == "describe" and tid is None:
        return 2
    _, workers = await _registered(args)
    tools, served = _by_id(workers, "tools")
    if args.action == "list":
        if args.json:
            print(dumps(list(tools.values())))
            return 0
        if not tools:
            print("No tools registered.")
            output.hint(
                "Start a worker whose module defines agents with tools: polos worker MODULE"
            )
            return 0
        rows = []
        for t in sorted(tools.values(), key=lambda t: t["id"]):
            desc = t.get("description") or ""
            cut = desc if len(desc) <= 32 else desc[:32] + "..."
            kind = "tool (approval)" if t.get("approval") else "tool"
            rows.append([t["id"], kind, cut, _status_of(True, bool(args.module))])
        print(table(rows, ["ID", "TYPE", "DESCRIPTION", "STATUS"]))
        return 0
    got = tools.get(tid or "")
    if got is None:
        output.error(f"no tool {tid!r} is served by a live worker (polos tool list shows them)")
        return 1
    t = got
    if args.json:
        print(dumps(t))
        return 0
    print(f"Tool:        {t['id']}")
    print(f"Type:        {'tool (needs approval)' if t.get('approval') else 'tool'}")
    print(f"Description: {t.get('description') or '-'}")
    print(f"Served by:   {', '.join(served.get(t['id'], []))}")
    print(f"Parameters:  {_pretty(t.get('parameters'))}")
    return 0

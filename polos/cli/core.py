"""The ``polos`` command's core subcommands: up, worker, start, runs, show, workers, dlq."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from polos import history as ev
from polos._private.ops import output, plugins
from polos._private.ops.commands import (
    UP_EXTENSIONS,
    URL_FILE,
    add_worker_args,
    command,
    data_dir,
    dumps,
    settings_for,
    table,
    ts,
)
from polos._private.ops.instance import (
    DataDirInUseError,
    DataDirLock,
    leftover_server,
)
from polos._private.ops.runtime import (
    run_until_signal,
    tune_gc,
)
from polos._private.store import read_history, read_run, read_subject
from polos.client import PolosClient, RunInfo
from polos.config import Settings
from polos.errors import WorkflowCancelledError, WorkflowFailedError
from polos.worker import serve_module

if TYPE_CHECKING:
    from polos._private.ops.analytics_process import AnalyticsProcess

# --------------------------------------------------------------------------- up


def _add_up(p: argparse.ArgumentParser) -> None:
    # --data-dir is a global flag: where `polos up` keeps its streams, and where every other
    # command finds it.
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("POLOS_PORT", "4222")),
        help="client port of the embedded server (0 = any free port)",
    )
    p.add_argument("--config", help="nats-server config file (default: ./nats.conf)")
    p.add_argument(
        "--sync",
        choices=("always", "interval"),
        default=os.environ.get("POLOS_SYNC"),
        help="when JetStream fsyncs: always = every write before its ack; interval = "
        "every 10 s (the shipped nats.conf); unset: as the config says "
        "(env POLOS_SYNC; docs/operations.md#durability)",
    )
    p.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("POLOS_AUTH", "1") != "0",
        help="require credentials (the default; --no-auth or POLOS_AUTH=0 turns it "
        "off): per-role users made on first start, kept 0600 in the data dir "
        "(`polos credentials ROLE` prints a role's URL)",
    )
    p.add_argument(
        "--export",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("POLOS_EXPORT", "1") != "0",
        help="keep the Parquet export that `polos sql` reads current (the default; "
        "--no-export or POLOS_EXPORT=0 turns it off)",
    )
    p.add_argument(
        "--export-dir",
        help="where the export goes (default $POLOS_ANALYTICS_DIR, else DATA_DIR/exports)",
    )
    for add_args, _ in UP_EXTENSIONS:
        add_args(p)  # the web UI's --ui-port, --ui-host, --no-ui (docs/ui.md)


def _analytics_child(args: argparse.Namespace, settings: Settings) -> AnalyticsProcess | None:
    """The analytics child `polos up` runs: the export unless --no-export, spans when OTEL_*
    ask for them; None for neither."""
    from polos._private.ops.analytics_process import AnalyticsProcess, otel_configured

    otel = otel_configured()
    if not (args.export or otel):
        return None
    ddir = data_dir(args)
    export_dir = None
    if args.export:
        export_dir = Path(
            args.export_dir or os.environ.get("POLOS_ANALYTICS_DIR") or ddir / "exports"
        )
    return AnalyticsProcess(
        settings,
        export_dir=export_dir,
        otel=otel,
        log_file=ddir / "analytics.log",
        flush_interval=float(os.environ.get("POLOS_ANALYTICS_FLUSH_INTERVAL", "1")),
    )


@command("up", "start nats-server (embedded) with the orchestrator and the scheduler")(_add_up)
async def cmd_up(args: argparse.Namespace) -> int:
    from polos._private.ops.server import EmbeddedServer

    server = None
    lock = None
    ddir = data_dir(args)
    url = args.nats_url or os.environ.get("POLOS_NATS_URL")
    service_url = None
    if url and args.sync:  # not ours to configure: refused, never ignored
        print(
            "error: --sync (POLOS_SYNC) configures the embedded server, and --nats-url "
            "(POLOS_NATS_URL) names another: set sync_interval in its jetstream block",
            file=sys.stderr,
        )
        return 2
    if not url:
        # One `polos up` per data dir, refused before anything in it is touched. The lock is
        # held until this process ends, however it ends.
        lock = _lock_data_dir(ddir)
        config = args.config
        if args.sync:
            from polos._private.ops.server import default_config, sync_config

            try:
                config = sync_config(ddir, config or default_config(), args.sync)
            except (OSError, ValueError) as exc:
                print(f"error: --sync {args.sync}: {exc}", file=sys.stderr)
                lock.release()
                return 2
        if args.auth:
            from polos._private.ops import auth
            from polos._private.ops.server import default_config

            creds, config = auth.secure_server_config(
                ddir, settings_for(args).prefix, config or default_config()
            )
        server = EmbeddedServer(ddir, port=args.port, config=config, die_with_parent=True)
        try:
            url = server.start()
        except RuntimeError as exc:  # the server's own reason, from its log
            print(f"error: {exc}", file=sys.stderr)
            return 1
        assert server.proc is not None
        lock.record(url=url, server_pid=server.proc.pid)
        print(f"nats-server {server.url} (data in {ddir.resolve()})", flush=True)
        if args.auth:
            service_url = auth.url_for(creds, f"{settings_for(args).prefix}-service", url)
            print(f"auth on: credentials in {ddir.resolve() / auth.CREDENTIALS_FILE}", flush=True)
    settings = settings_for(args).with_(nats_url=service_url or url)
    tune_gc(settings)  # this process runs the orchestrator and the scheduler
    # The UI acts as the client role, never as the service role (docs/ui.md).
    client_url = auth.url_for(creds, f"{settings.prefix}-client", url) if service_url else url
    extras = [
        made
        for _, make in UP_EXTENSIONS
        if (made := make(args, settings.with_(nats_url=client_url))) is not None
    ]
    ui = next((e for e in extras if hasattr(e, "login_url")), None)

    url_file = ddir / URL_FILE

    def ready() -> None:
        if server is not None:
            # For tools that read the URL from a file; `polos` commands use the lock file.
            url_file.write_text(url + "\n")
        # Printed once the services run, so whoever waits for this line can use Polos at once.
        if analytics is not None:
            print(f"analytics: {analytics.describe()} (log {analytics.log_file})", flush=True)
        if ui is not None:
            if lock is not None:
                lock.record(ui_url=ui.base_url)  # workers make approval links from it
            print(f"ui: {ui.login_url}", flush=True)
        print(f"Polos is up: NATS_URL={url} prefix={settings.prefix}", flush=True)
        print("Ctrl-C stops it; the data stays for the next start.", flush=True)

    # Started after the orchestrator and the scheduler, stopped before them (and the server).
    analytics = _analytics_child(args, settings)
    services = [plugins.service("orchestrator")(settings), plugins.service("scheduler")(settings)]
    try:
        await run_until_signal(
            *services, *([analytics] if analytics else []), *extras, on_started=ready
        )
    finally:
        if server is not None:
            url_file.unlink(missing_ok=True)
            server.stop()
        if lock is not None:
            lock.release()
        print("Polos stopped.", flush=True)
    return 0


def _lock_data_dir(data_dir: Path) -> DataDirLock:
    """The data dir's lock, or ``DataDirInUseError`` naming who uses it: a running `polos up`,
    or a nats-server one left behind where it could not die with it."""
    lock = DataDirLock(data_dir)
    lock.acquire()
    stray = leftover_server(data_dir)
    if stray is not None:
        lock.release()
        raise DataDirInUseError(
            f"a nats-server (pid {stray}) left by an earlier `polos up` still runs on "
            f"{data_dir.resolve()}: stop it (kill {stray}) and start again"
        )
    return lock


# --------------------------------------------------------------------------- worker


async def client_for(args: argparse.Namespace) -> PolosClient:
    return await PolosClient.connect(settings=settings_for(args))


@command("worker", "serve the workflows of a module")(add_worker_args)
async def cmd_worker(args: argparse.Namespace) -> int:
    # Stops on SIGINT/SIGTERM, or with the error when the server refuses the credentials.
    await serve_module(
        args.module,
        settings_for(args, role="worker"),
        max_concurrent_runs=args.max_concurrent_runs,
        worker_id=args.worker_id,
        dev_llm=args.dev_llm,
    )
    return 0


# --------------------------------------------------------------------------- start


def _add_start(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow")
    p.add_argument("--input", default="null", help="the input as JSON")
    p.add_argument("--run-id")
    p.add_argument("--queue")
    p.add_argument("--concurrency-key")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the result and print it (a live status on stderr meanwhile)",
    )
    p.add_argument("--timeout", type=float, default=None)


def _progress(run_id: str, event: ev.Event | None, workflow: str, served: bool) -> str:
    """What a run waited on with `polos start --wait` is doing, after its last control event."""
    head = f"run {run_id}: "
    if isinstance(event, ev.RunCompleted | ev.RunFailed | ev.RunCancelled):
        return head + type(event).__name__.removeprefix("Run").lower()
    if isinstance(event, ev.RunClaimed):
        return head + f"running on worker {event.worker_id}"
    if isinstance(event, ev.RunSuspended):
        what = {
            "suspend": f"a resume (polos resume {run_id} {event.step})",
            "event": f"an event on {event.topic}",
            "sleep": "its timer",
            "child": "its child runs",
            "retry": "its retry back-off",
            "slot": "a concurrency slot",
        }.get(event.kind, event.kind)
        return head + f"suspended at {event.step!r}, waiting for {what}"
    if isinstance(event, ev.RunAdmitted):
        return head + f"admitted to queue {event.queue!r}, waiting for a worker"
    if isinstance(event, ev.RunWoken):
        return head + f"woken ({event.reason}), waiting for a worker"
    if served:
        return head + "queued, waiting for a worker"
    return head + f"queued: no worker serves {workflow!r} yet (start one: polos worker MODULE)"


async def _follow_progress(
    client: PolosClient, run_id: str, workflow: str, say: Callable[[str], None]
) -> None:
    """Keeps the status line of `polos start --wait` current from the run's control events
    (a subscription, as the wait itself uses; no polling)."""
    news: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_ctl(msg: Any) -> None:
        news.put_nowait(msg.data)

    sub = await client.nc.subscribe(client.names.run_subject(run_id, "ctl"), cb=on_ctl)
    try:
        served = any(workflow in w.get("workflows", []) for w in await client.workers())
        history = await read_history(client.nc, client.names, run_id, kinds=("ctl",))
        say(_progress(run_id, history[-1][1] if history else None, workflow, served))
        while True:
            data = await news.get()
            with contextlib.suppress(ev.EventDecodeError):
                say(_progress(run_id, ev.decode(data), workflow, served))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


@command("start", "start a run of a workflow")(_add_start)
async def cmd_start(args: argparse.Namespace) -> int:
    try:
        value = orjson.loads(args.input)
    except orjson.JSONDecodeError as exc:
        output.error(f"--input is not valid JSON: {exc}")
        return 2
    client = await client_for(args)
    try:
        handle = await client.start(
            args.workflow,
            value,
            run_id=args.run_id,
            queue=args.queue,
            concurrency_key=args.concurrency_key,
        )
        print(f"run {handle.run_id} started", flush=True)
        if not args.wait:
            return 0
        out = output.console()
        try:
            with output.waiting(f"run {handle.run_id}: starting") as say:
                follow = None
                if output.is_terminal(sys.stderr):
                    follow = asyncio.create_task(
                        _follow_progress(client, handle.run_id, args.workflow, say)
                    )
                try:
                    result = await handle.result(timeout=args.timeout)
                finally:
                    if follow is not None:
                        follow.cancel()
                        with contextlib.suppress(BaseException):
                            await follow
        except WorkflowFailedError as exc:
            out.print(
                output.styled(
                    f"run {handle.run_id} failed: {exc.error.get('type')}: "
                    f"{exc.error.get('message')}",
                    "red",
                )
            )
            output.hint(
                f"polos show {handle.run_id}: its events; polos trace {handle.run_id}: "
                "its steps as a tree"
            )
            return 1
        except WorkflowCancelledError:
            out.print(output.styled(f"run {handle.run_id} was cancelled", "yellow"))
            return 1
        print(dumps(result))
        return 0
    finally:
        await client.close()


# --------------------------------------------------------------------------- runs / show


def _add_runs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", action="append", help="only runs in this status (repeatable)")
    p.add_argument("--workflow")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--waiting",
        action="store_true",
        help="only runs suspended for a human (ctx.step.suspend), with their data",
    )


def _waiting_text(r: RunInfo) -> str:
    if r.note:
        return r.note
    w = r.waiting or {}
    if not w:
        return ""
    bits = [f"{w.get('kind')} {w.get('step')!r}"]
    if w.get("topic"):
        bits.append(f"topic={w['topic']}")
    if w.get("data") is not None:
        bits.append(f"data={dumps(w['data'])}")
    return " ".join(bits)


_WAKES = ("RunRequested", "RunWoken", "RunAdmitted")


def retries(types: list[str]) -> tuple[int, int]:
    """A run's retries from its event types in order: (step attempts that failed and were
    tried again, restarts). A claim is a restart when nothing made the run claimable (a request
    or a wake) since the previous claim or suspension: the worker that had it was lost, and
    another took it up from its history. A claim after a wake is how a run resumes, not a retry,
    so a run that suspended three times and never failed has none."""
    failed = restarts = 0
    claimable = False
    for t in types:
        if t == "StepAttemptFailed":
            failed += 1
        elif t == "RunClaimed":
            restarts += not claimable
            claimable = False
        elif t in _WAKES:
            claimable = True
        elif t == "RunSuspended":
            claimable = False
    return failed, restarts


def _types(history: list[tuple[int, ev.Event]]) -> list[str]:
    return [type(e).__name__ for _, e in history]


async def _retries_of(client: PolosClient, run_ids: list[str]) -> dict[str, int]:
    """Retries of each run, from its history (the run index counts claims, which are not)."""
    sem = asyncio.Semaphore(16)

    async def one(run_id: str) -> tuple[str, int]:
        async with sem:
            msgs = await read_run(
                client.nc, client.names, run_id, timeout=client.settings.request_timeout
            )
        types = []
        for m in msgs:
            # The type only: large fields (stubs) need no resolving for it.
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                types.append(str(orjson.loads(m.data).get("t")))
        return run_id, sum(retries(types))

    return dict(await asyncio.gather(*(one(r) for r in run_ids)))


@command("runs", "list runs, newest first")(_add_runs)
async def cmd_runs(args: argparse.Namespace) -> int:
    client = await client_for(args)
    try:
        if getattr(args, "waiting", False):
            runs = [
                r
                for r in await client.waiting(limit=args.limit)
                if not args.workflow or r.workflow == args.workflow
            ]
        else:
            runs = await client.list_runs(
                status=args.status, workflow=args.workflow, limit=args.limit
            )
        counted = {} if args.json else await _retries_of(client, [r.run_id for r in runs])
    finally:
        await client.close()
    if args.json:
        print(dumps([r.__dict__ for r in runs]))
        return 0
    if not runs:
        print("no runs waiting for a human" if getattr(args, "waiting", False) else "no runs")
        return 0

    def retried(run_id: str) -> output.Cell:
        n = counted.get(run_id, 0)
        return output.styled(str(n), "yellow") if n else "0"

    rows = [
        [
            r.run_id,
            r.workflow or "?",
            output.status(r.status),
            ts(r.created_at),
            retried(r.run_id),
            _waiting_text(r),
        ]
        for r in runs
    ]
    print(table(rows, ["RUN", "WORKFLOW", "STATUS", "CREATED", "RETRIES", "NOTE"]))
    return 0


def describe(event: ev.Event) -> str:
    """One line for one event, for `polos show`."""
    if isinstance(event, ev.RunRequested):
        return f"requested {event.workflow} input={dumps(event.input)[:200]}"
    if isinstance(event, ev.RunClaimed):
        return f"claimed by worker {event.worker_id} (claim {event.attempt})"
    if isinstance(event, ev.StepCompleted):
        took = f" in {event.duration_ms:.1f} ms" if event.duration_ms is not None else ""
        tries = f" after {event.attempts} attempts" if event.attempts > 1 else ""
        return f"step {event.key!r} ({event.kind}{' ' + event.name if event.name else ''}) completed{took}{tries} -> {dumps(event.output)[:200]}"
    if isinstance(event, ev.StepAttemptFailed):
        return f"step {event.key!r} attempt {event.attempt} failed: {event.error.get('type')}: {event.error.get('message')} (retry in {event.retry_in:g}s)"
    if isinstance(event, ev.StepFailed):
        return f"step {event.key!r} failed: {event.error.get('type')}: {event.error.get('message')}"
    if isinstance(event, ev.RunSuspended):
        return f"suspended at {event.step!r} waiting for {event.kind}" + (
            f" data={dumps(event.data)[:200]}" if event.data is not None else ""
        )
    if isinstance(event, ev.RunAdmitted):
        key = f" key {event.concurrency_key!r}" if event.concurrency_key else ""
        return f"admitted to queue {event.queue!r}{key} ({len(event.slots)} slot(s))"
    if isinstance(event, ev.RunWoken):
        carried = f" -> {dumps(event.output)[:200]}" if event.output is not None else ""
        return f"woken at {event.step!r}: {event.reason}{carried}"
    if isinstance(event, ev.RunCompleted):
        return f"completed -> {dumps(event.output)[:300]}"
    if isinstance(event, ev.RunFailed):
        return f"FAILED {event.error.get('type')}: {event.error.get('message')}"
    if isinstance(event, ev.RunCancelled):
        return f"cancelled{': ' + event.reason if event.reason else ''}"
    return f"{type(event).__name__}"


# Colours of `polos show` and `polos trace` lines (on a terminal only).
TIMELINE_STYLES: list[tuple[str, str]] = [
    (r"^\s*\d+\s+\+\s*[\d.]+ ms", "dim"),
    (r"\+\d[\d.]* m?s\b", "dim"),
    (r"^run \S+|child run \S+", "bold"),
    (r"\bFAILED\b.*|\bfailed: .*|\bERROR\b.*", "red"),
    (r"\bcompleted\b", "green"),
    (r"\bsuspended at\b|\bwoken at\b|\bwait \w+\b", "magenta"),
    (r"claimed by (worker )?\S+", "cyan"),
    (r"\brestarted\b.*", "yellow"),
    (r"\bcancelled\b", "yellow"),
]


def timeline(history: list[tuple[int, ev.Event]]) -> str:
    if not history:
        return "(no events)"
    t0 = history[0][1].at
    lines = []
    claimable = False
    for seq, e in history:
        line = f"{seq:>8}  +{(e.at - t0) * 1000:9.1f} ms  {describe(e)}"
        if isinstance(e, ev.RunClaimed):
            if not claimable:
                line += ", restarted: the worker that had the run was lost"
            claimable = False
        elif isinstance(e, ev.RunRequested | ev.RunWoken):
            claimable = True
        elif isinstance(e, ev.RunSuspended):
            claimable = False
        lines.append(line)
    return "\n".join(lines)


def _add_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")


def retries_text(history: list[tuple[int, ev.Event]]) -> str:
    failed, restarts = retries(_types(history))
    if not failed + restarts:
        return "retries 0"
    parts = []
    if failed:
        parts.append(f"{failed} failed step attempt{'s' * (failed != 1)}")
    if restarts:
        parts.append(f"{restarts} restart{'s' * (restarts != 1)} after a lost worker")
    return f"retries {failed + restarts} ({', '.join(parts)})"


@command("show", "a run's events as a timeline")(_add_show)
async def cmd_show(args: argparse.Namespace) -> int:
    client = await client_for(args)
    try:
        history = await client.history(args.run_id)
    finally:
        await client.close()
    if not history:
        output.error(f"no run {args.run_id!r}")
        return 1
    if args.json:
        print(
            dumps([{"seq": s, "event": type(e).__name__, **ev.encode_dict(e)} for s, e in history])
        )
        return 0
    state = ev.RunState.fold(args.run_id, history)
    out = output.console()
    head = output.Text()
    head.append(f"run {args.run_id}", style="bold")
    head.append(f"  workflow {state.workflow}  status ")
    head.append_text(output.status(state.status))
    head.append(f"  created {ts(state.created_at)}  {retries_text(history)}")
    out.print(head)
    print(output.lines(timeline(history).splitlines(), highlights=TIMELINE_STYLES))
    return 0


# --------------------------------------------------------------------------- workers / dlq


def _add_nothing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


@command("workers", "live workers and what they serve")(_add_nothing)
async def cmd_workers(args: argparse.Namespace) -> int:
    client = await client_for(args)
    try:
        workers = await client.workers()
    finally:
        await client.close()
    if args.json:
        print(dumps(workers))
        return 0
    if not workers:
        print("no live workers (start one: polos worker MODULE)")
        return 0
    rows = [
        [
            w["id"],
            str(w.get("active_runs", 0)),
            ", ".join(w.get("workflows", [])),
            f"{time.time() - w.get('at', 0):.0f}s ago",
        ]
        for w in workers
    ]
    print(table(rows, ["WORKER", "ACTIVE", "WORKFLOWS", "SEEN"], wrap=["WORKFLOWS"]))
    return 0


def _add_dlq(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        nargs="?",
        choices=["list", "show"],
        default="list",
        help="list (default): the newest letters; show ID: one letter whole",
    )
    p.add_argument("id", nargs="?", type=int, help="with show: the letter's ID (its DLQ sequence)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")


_RUN_SUBJECTS = {
    ("run",): 2,
    ("cmd", "cancel"): 3,
    ("cmd", "resume"): 3,
    ("cmd", "child"): 3,
    ("timer", "at"): 3,
    ("timer", "fire"): 3,
}


def letter_run(letter: dict[str, Any]) -> str | None:
    """The run a dead letter is about, when it names one: in its details, its original subject
    (a run's history, a command or a timer of a run) or its payload."""
    details = letter.get("details")
    if isinstance(details, dict) and isinstance(details.get("run_id"), str):
        return str(details["run_id"])
    parts = str(letter.get("subject") or "").split(".")
    for head, index in _RUN_SUBJECTS.items():
        if (
            tuple(parts[1 : 1 + len(head)]) == head
            and len(parts) > index
            and parts[index] != "cron"
        ):
            return parts[index]
    with contextlib.suppress(orjson.JSONDecodeError, TypeError):
        body = orjson.loads(letter.get("data") or b"")
        if isinstance(body, dict) and isinstance(body.get("run_id"), str):
            return str(body["run_id"])
    return None


def _payload(letter: dict[str, Any]) -> str:
    """The letter's original payload: JSON pretty-printed, text as it is, bytes as base64."""
    if letter.get("data_b64"):
        return f"(binary, base64) {letter['data_b64']}"
    data = letter.get("data")
    if data is None:
        return "(none)"
    try:
        return orjson.dumps(orjson.loads(data), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return str(data)


@command("dlq", "dead-lettered messages and why they were kept aside (show ID: one whole)")(
    _add_dlq
)
async def cmd_dlq(args: argparse.Namespace) -> int:
    if args.action == "show" and args.id is None:
        output.error("polos dlq show ID: which letter (the ID column of `polos dlq`)")
        return 2
    client = await client_for(args)
    try:
        if args.action == "list" and args.json:
            print(dumps(await client.dead_letters(limit=args.limit)))
            return 0
        stream = client.names.dlq_stream
        subjects = f"{client.settings.prefix}.dlq.>"
        if args.action == "show":
            msgs = await read_subject(client.nc, stream, subjects, start_seq=args.id, limit=1)
            msgs = [m for m in msgs if m.seq == args.id]
        else:
            msgs = (await read_subject(client.nc, stream, subjects))[-args.limit :]
    finally:
        await client.close()
    letters = [(m.seq, orjson.loads(m.data)) for m in msgs]
    if args.action == "show":
        if not letters:
            output.error(f"no dead letter {args.id} (the ID column of `polos dlq`)")
            return 1
        seq, d = letters[0]
        if args.json:
            print(dumps({"seq": seq, **d}))
            return 0
        out = output.console()
        fields = [
            ("ID", str(seq)),
            ("at", ts(d.get("at"))),
            ("source", d.get("source", "")),
            ("run", letter_run(d) or "-"),
            ("subject", d.get("subject", "")),
            ("reason", d.get("reason", "")),
        ]
        if d.get("details") is not None:
            fields.append(("details", dumps(d["details"])))
        if d.get("headers"):
            fields.append(("headers", dumps(d["headers"])))
        for name, value in fields:
            line = output.Text()
            line.append(f"{name:>8}  ", style="bold")
            line.append(value, style="red" if name == "reason" else "")
            out.print(line)
        out.print(output.styled(f"{'payload':>8}", "bold"))
        print(_payload(d))
        return 0
    if not letters:
        print("no dead letters")
        return 0
    rows = [
        [
            str(seq),
            ts(d.get("at")),
            d.get("source", ""),
            letter_run(d) or "-",
            d.get("subject", ""),
            d.get("reason", ""),
        ]
        for seq, d in letters
    ]
    print(table(rows, ["ID", "AT", "SOURCE", "RUN", "SUBJECT", "REASON"]))
    output.hint("polos dlq show ID: a letter's payload and details")
    return 0

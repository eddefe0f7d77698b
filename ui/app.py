"""The pages and actions of the UI (server-rendered, Jinja2 templates, a little JavaScript).

Every action goes through ``PolosClient`` (cancel, resume, start, publish_event) on the UI's
client-role connection; every page reads the in-memory run index or the log.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import orjson
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from polos.errors import CommandRejectedError, PolosError

from . import views
from .projection import STATUSES, Page, Query, decode_key, encode_key
from .security import LOGIN_PATH, AuthMiddleware, approval_url, approve_path
from .source import (
    LLMTotals,
    load_payload,
    queue_rows,
    raw_history,
    run_subjects,
    workflow_docs,
)

if TYPE_CHECKING:
    from .server import UIServer

HERE = Path(__file__).parent
RANGES = {"1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
MAX_TRACE_RUNS = 200


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ts=views.ts,
        ms=views.ms,
        pretty=views.pretty,
        compact=views.compact,
        urlq=lambda s: quote(str(s), safe=""),
        domid=lambda s: "".join(c if c.isalnum() else "-" for c in str(s)),
    )
    env.globals.update(approve_path=approve_path, STATUSES=STATUSES)
    return env


def create_app(ui: UIServer) -> Starlette:
    """The ASGI app of ``ui``."""
    env = _env()
    env.globals["kept_qs"] = lambda kept, **kw: _qs(kept, kw)
    index = ui.index
    assert index is not None and ui.client is not None
    client = ui.client
    config = ui.config

    # ------------------------------------------------------------------ helpers

    def csrf(request: Request) -> str:
        nonce = request.scope.get("polos_ui", {}).get("nonce")
        return ui.secrets.csrf_for(nonce) if nonce else ""

    def render_html(name: str, request: Request | None, **ctx: Any) -> str:
        ctx.setdefault("now", time.time())
        if request is not None:
            ctx.setdefault("csrf", csrf(request))
            ctx.setdefault("path", request.url.path)
            ctx.setdefault("link_only", request.scope.get("polos_ui", {}).get("via") == "link")
        ctx.setdefault("prefix", client.settings.prefix)
        ctx.setdefault("ready", index.ready.is_set())
        ctx.setdefault("approvals", index.human_waits())
        ctx.setdefault("auth", config.auth)
        return env.get_template(name).render(**ctx)

    def page(name: str, request: Request, status: int = 200, **ctx: Any) -> HTMLResponse:
        started = time.perf_counter()
        html = render_html(name, request, **ctx)
        took = (time.perf_counter() - started) * 1000
        return HTMLResponse(
            html, status_code=status, headers={"server-timing": f"render;dur={took:.2f}"}
        )

    async def checked_form(request: Request) -> FormData:
        """The posted form, refused without this session's CSRF token."""
        form = await request.form()
        info = request.scope.get("polos_ui", {})
        if info.get("via") == "bearer":
            return form
        expected = csrf(request)
        got = str(form.get("_csrf") or request.headers.get("x-csrf-token") or "")
        if not expected or not hmac.compare_digest(got, expected):
            raise HTTPException(
                403,
                "refused: the form's CSRF token is missing or wrong "
                "(reload the page and try again)",
            )
        return form

    def error_page(request: Request, status: int, message: str) -> HTMLResponse:
        return page("error.html", request, status=status, message=message)

    def valid_run_id(run_id: str) -> None:
        if not run_id or len(run_id) > 128 or not all(c.isalnum() or c in "_-" for c in run_id):
            raise HTTPException(404, f"{run_id!r} is not a run id")

    # ------------------------------------------------------------------ login

    async def login(request: Request) -> Response:
        if request.method == "POST":
            form = await request.form()
            target = str(form.get("next") or "/runs")
            if not target.startswith("/") or target.startswith("//"):
                target = "/runs"
            if ui.secrets.token_ok(str(form.get("token") or "")):
                cookie, _ = ui.secrets.new_session()
                resp = RedirectResponse(target, status_code=303)
                resp.set_cookie(
                    ui.cookie_name, cookie, httponly=True, samesite="lax", max_age=14 * 24 * 3600
                )
                return resp
            return page(
                "login.html",
                request,
                status=401,
                next=target,
                message="That is not this UI's token.",
            )
        target = str(request.query_params.get("next") or "/runs")
        return page("login.html", request, next=target, message=None)

    async def home(request: Request) -> Response:
        return RedirectResponse("/runs", status_code=303)

    # ------------------------------------------------------------------ runs

    def runs_query(request: Request) -> tuple[Query, dict[str, str]]:
        p = request.query_params
        q = Query(limit=config.page_size)
        q.status = p.get("status") or None
        q.workflow = p.get("workflow") or None
        q.queue = p.get("queue") or None
        q.roots_only = p.get("roots") == "1"
        rng = p.get("range") or ""
        now = time.time()
        if rng in RANGES:
            q.since = now - RANGES[rng]
        q.since = _when(p.get("since")) or q.since
        q.until = _when(p.get("until"))
        try:
            q.before = decode_key(p.get("before"))
            q.after = decode_key(p.get("after"))
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        search = (p.get("q") or "").strip()
        if search:
            q.id_prefix = search
        kept = {
            k: v
            for k, v in p.items()
            if k in ("status", "workflow", "queue", "range", "since", "until", "roots", "q") and v
        }
        return q, kept

    def runs_table(q: Query, kept: dict[str, str], request: Request | None) -> tuple[str, Page]:
        result = index.page(q)
        html = render_html(
            "_runs_table.html",
            request,
            page=result,
            kept=kept,
            older=encode_key(result.older),
            newer=encode_key(result.newer),
            qs=lambda **kw: _qs(kept, kw),
            index=index,
            counts=index.counts(),
        )
        return html, result

    async def runs(request: Request) -> Response:
        started = time.perf_counter()
        q, kept = runs_query(request)
        if q.id_prefix and index.get(q.id_prefix) is not None:
            return RedirectResponse(f"/runs/{q.id_prefix}", status_code=303)
        table, _ = runs_table(q, kept, request)
        live = "/live/runs" + (f"?{request.url.query}" if request.url.query else "")
        resp = page(
            "runs.html",
            request,
            table=table,
            kept=kept,
            workflows=index.values("workflow"),
            queues=index.values("queue"),
            live=live,
            ranges=list(RANGES),
        )
        took = (time.perf_counter() - started) * 1000
        resp.headers["server-timing"] = f"app;dur={took:.2f}"
        return resp

    async def live_runs(request: Request) -> Response:
        q, kept = runs_query(request)

        async def render() -> str:
            return runs_table(q, kept, None)[0]

        return sse(request, render, lambda ids: True)

    # ------------------------------------------------------------------ one run

    async def run_view(run_id: str) -> tuple[views.RunView, list[Any]]:
        history = await raw_history(client, run_id)
        if not history:
            raise HTTPException(404, f"no run {run_id!r} in namespace {client.settings.prefix!r}")
        return views.build_run(run_id, history), history

    def child_tree(run_id: str, named: list[str], budget: list[int], depth: int = 0) -> list[Any]:
        """(run or id, its own children) for each child of ``run_id``, down the index."""
        out: list[Any] = []
        for c in dict.fromkeys([*named, *index.children.get(run_id, [])]):
            if budget[0] <= 0:
                break
            budget[0] -= 1
            below = child_tree(c, [], budget, depth + 1) if depth < 8 else []
            out.append((index.get(c) or c, below))
        return out

    def run_ctx(view: views.RunView) -> dict[str, Any]:
        kids = child_tree(view.run_id, view.children, [MAX_TRACE_RUNS])
        parent = view.requested.parent_run_id if view.requested else None
        return {"v": view, "kids": kids, "parent": parent, "entry": index.get(view.run_id)}

    async def run_page(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        valid_run_id(run_id)
        try:
            view, _ = await run_view(run_id)
        except HTTPException as exc:
            return error_page(request, exc.status_code, str(exc.detail))
        body = render_html("_run_body.html", request, **run_ctx(view))
        return page(
            "run.html",
            request,
            body=body,
            live=f"/live/runs/{run_id}",
            done=request.query_params.get("done"),
            **run_ctx(view),
        )

    async def live_run(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        valid_run_id(run_id)
        csrf_token = csrf(request)

        async def render() -> str:
            view, _ = await run_view(run_id)
            return render_html("_run_body.html", None, csrf=csrf_token, **run_ctx(view))

        def interested(ids: set[str]) -> bool:
            return run_id in ids or bool(ids & set(index.children.get(run_id, [])))

        return sse(request, render, interested, subjects=run_subjects(client, run_id))

    async def payload_object(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        valid_run_id(run_id)
        name = request.query_params.get("name") or ""
        try:
            value = await load_payload(client, run_id, name)
        except (ValueError, PolosError, RuntimeError) as exc:
            return PlainTextResponse(str(exc), status_code=404)
        return PlainTextResponse(views.pretty(value))

    async def payload_full(request: Request) -> Response:
        """A payload too big to show inline, whole, as JSON."""
        run_id = request.path_params["run_id"]
        valid_run_id(run_id)
        try:
            seq = int(request.query_params.get("seq") or "0")
        except ValueError:
            raise HTTPException(400, "seq must be a number") from None
        fld = request.query_params.get("field") or "output"
        for r in await raw_history(client, run_id):
            if r.seq == seq:
                value = (
                    getattr(r.event, fld, None)
                    if fld != "arguments"
                    else (getattr(r.event, "meta", None) or {}).get("arguments")
                )
                return PlainTextResponse(views.pretty(value))
        return PlainTextResponse(f"no event {seq} in run {run_id}", status_code=404)

    async def run_action(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        action = request.path_params["action"]
        valid_run_id(run_id)
        form = await checked_form(request)
        try:
            if action == "cancel":
                await client.cancel(run_id, str(form.get("reason") or "cancelled in the UI"))
                return RedirectResponse(f"/runs/{run_id}?done=cancelled", status_code=303)
            if action == "resume":
                key = str(form.get("key") or "")
                data = views.parse_json("resume data", str(form.get("data") or ""))
                answer = await client.resume(run_id, key, data)
                return RedirectResponse(
                    f"/runs/{run_id}?done={answer.get('status', 'resumed')}", status_code=303
                )
            if action == "rerun":
                view, _ = await run_view(run_id)
                req = view.requested
                if req is None:
                    raise views.FormError(f"run {run_id} has no request to repeat")
                value = req.input
                if "input" in view.requested_refs:
                    value = await load_payload(client, run_id, view.requested_refs["input"])
                handle: Any = await client.start(
                    req.workflow, value, queue=req.queue, concurrency_key=req.concurrency_key
                )
                return RedirectResponse(f"/runs/{handle.run_id}?done=started", status_code=303)
        except CommandRejectedError as exc:
            return error_page(request, 409, f"{action} refused: {exc.reason}")
        except (views.FormError, ValueError, PolosError) as exc:
            return error_page(request, 400, f"{action}: {exc}")
        raise HTTPException(404, f"no action {action!r}")

    # ------------------------------------------------------------------ agent trace

    async def trace_node(run_id: str, depth: int, budget: list[int]) -> views.TraceNode:
        view, history = await run_view(run_id)
        entries = views.trace_entries(view, history)
        totals = LLMTotals()
        totals.add(view.totals)
        kids = list(dict.fromkeys([*view.children, *index.children.get(run_id, [])]))
        placed: set[str] = set()
        out: list[Any] = []
        for ent in entries:
            out.append(ent)
            if isinstance(ent, views.Item):
                for c in ent.children:
                    placed.add(c)
                    out.append(await child_node(c, depth, budget, totals))
        for c in kids:
            if c not in placed:
                out.append(await child_node(c, depth, budget, totals))
        return views.TraceNode(view, view.state.workflow, out, totals, depth)

    async def child_node(c: str, depth: int, budget: list[int], totals: Any) -> Any:
        if depth >= 16 or budget[0] <= 0:
            return views.Item(
                0, 0, 0, "note", f"child run {c}", "not drawn (too deep or too many)", children=[c]
            )
        budget[0] -= 1
        try:
            node = await trace_node(c, depth + 1, budget)
        except HTTPException:
            return views.Item(
                0, 0, 0, "note", f"child run {c}", "no events (not started yet)", children=[c]
            )
        totals.add(node.totals)
        return node

    async def trace_page(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        valid_run_id(run_id)
        try:
            root = await trace_node(run_id, 0, [MAX_TRACE_RUNS])
        except HTTPException as exc:
            return error_page(request, exc.status_code, str(exc.detail))
        return page(
            "trace.html",
            request,
            root=root,
            live=f"/live/traces/{run_id}",
            body=render_html("_trace_body.html", request, root=root),
        )

    async def live_trace(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        valid_run_id(run_id)

        async def render() -> str:
            root = await trace_node(run_id, 0, [MAX_TRACE_RUNS])
            return render_html("_trace_body.html", None, root=root)

        def interested(ids: set[str]) -> bool:
            seen: set[str] = set()
            todo = [run_id]
            while todo:
                r = todo.pop()
                if r in ids:
                    return True
                if r not in seen and len(seen) < MAX_TRACE_RUNS:
                    seen.add(r)
                    todo.extend(index.children.get(r, []))
            return False

        return sse(request, render, interested, subjects=run_subjects(client, run_id))

    # ------------------------------------------------------------------ approvals

    def approvals_table(request: Request | None) -> str:
        rows = []
        for r in index.waiting_for_human():
            w = r.waiting or {}
            form = views.approval_form(w.get("data"))
            rows.append((r, w, form))
        return render_html("_approvals_table.html", request, rows=rows)

    async def approvals(request: Request) -> Response:
        return page(
            "approvals.html", request, table=approvals_table(request), live="/live/approvals"
        )

    async def live_approvals(request: Request) -> Response:
        return sse(request, lambda: _now(approvals_table(None)), lambda ids: True)

    async def approve(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        step = request.path_params["step"]
        valid_run_id(run_id)
        info = request.scope.get("polos_ui", {})
        if info.get("via") == "link" and info.get("link") != (run_id, step):
            raise HTTPException(403, "this link opens another approval")
        history = await raw_history(client, run_id)
        if not history:
            return error_page(request, 404, f"no run {run_id!r}")
        view = views.build_run(run_id, history)
        sus = None
        for r in history:
            e = r.event
            if (
                getattr(e, "step", None) == step
                and type(e).__name__ == "RunSuspended"
                and getattr(e, "kind", None) == "suspend"
            ):
                sus = r
        if sus is None:
            return error_page(request, 404, f"run {run_id} never waited at {step!r}")
        data = sus.event.data  # type: ignore[attr-defined]
        if "data" in sus.refs:
            data = await load_payload(client, run_id, sus.refs["data"])
        form = views.approval_form(data)
        waiting = view.waiting_key == step
        sig = ui.secrets.link_sig(run_id, step)
        share = approval_url(ui.base_url, run_id, step) + f"?sig={sig}"
        message = None
        status = 200
        if request.method == "POST":
            posted = await checked_form(request)
            if not waiting:
                return page(
                    "approve.html",
                    request,
                    status=409,
                    v=view,
                    step=step,
                    form=form,
                    waiting=False,
                    share=share,
                    sig=info.get("via") == "link" and sig,
                    message="This run no longer waits at this step.",
                    done=None,
                )
            try:
                answer = _approval_answer(form, posted)
                await client.resume(run_id, step, answer)
                q = "?done=1" + (f"&sig={sig}" if info.get("via") == "link" else "")
                return RedirectResponse(approve_path(run_id, step) + q, status_code=303)
            except views.FormError as exc:
                message, status = str(exc), 400
            except CommandRejectedError as exc:
                message, status = f"refused: {exc.reason}", 409
        return page(
            "approve.html",
            request,
            status=status,
            v=view,
            step=step,
            form=form,
            waiting=waiting,
            share=share,
            sig=sig if info.get("via") == "link" else None,
            message=message,
            done=request.query_params.get("done"),
        )

    # ------------------------------------------------------------------ workflows, events

    async def workflows(request: Request) -> Response:
        docs = await workflow_docs(client)
        served: dict[str, int] = {}
        for w in await client.workers():
            for name in w.get("workflows", []):
                served[name] = served.get(name, 0) + 1
        return page("workflows.html", request, docs=docs, served=served)

    async def workflow(request: Request) -> Response:
        name = request.path_params["name"]
        docs = {d.get("name"): d for d in await workflow_docs(client)}
        doc = docs.get(name)
        if doc is None:
            return error_page(request, 404, f"no worker registered a workflow {name!r}")
        fields, is_object = views.schema_fields(doc.get("input_schema"))
        message = None
        status = 200
        if request.method == "POST":
            form = await checked_form(request)
            try:
                if form.get("mode") == "json":
                    value = views.parse_json("input", str(form.get("json") or ""))
                elif is_object:
                    value = {}
                    for f in fields:
                        present, v = views.parse_field(f, _str(form.get(f.name)))
                        if present:
                            value[f.name] = v
                else:
                    _, value = views.parse_field(fields[0], _str(form.get(fields[0].name)))
                handle = await client.start(
                    name,
                    value,
                    run_id=_str(form.get("run_id")) or None,
                    queue=_str(form.get("queue")) or None,
                    concurrency_key=_str(form.get("concurrency_key")) or None,
                )
                return RedirectResponse(f"/runs/{handle.run_id}?done=started", status_code=303)
            except (views.FormError, ValueError, PolosError) as exc:
                message, status = str(exc), 400
        recent = index.page(Query(workflow=name, limit=10)).runs
        return page(
            "workflow.html",
            request,
            status=status,
            doc=doc,
            fields=fields,
            is_object=is_object,
            message=message,
            recent=recent,
        )

    async def events(request: Request) -> Response:
        message = None
        status = 200
        if request.method == "POST":
            form = await checked_form(request)
            topic = _str(form.get("topic")).strip()
            try:
                if not topic:
                    raise views.FormError("topic: a topic is required")
                data = views.parse_json("data", _str(form.get("data")))
                seq = await client.publish_event(topic, data)
                message = f"event {seq} published on {topic!r}"
            except (views.FormError, ValueError, PolosError) as exc:
                message, status = str(exc), 400
        return page(
            "events.html",
            request,
            status=status,
            message=message,
            ok=status == 200 and message is not None,
        )

    async def queues(request: Request) -> Response:
        rows, rates = await queue_rows(client)
        return page("queues.html", request, rows=rows, rates=rates)

    async def workers(request: Request) -> Response:
        ws = sorted(await client.workers(), key=lambda w: str(w.get("id")))
        return page("workers.html", request, workers=ws)

    async def schedules(request: Request) -> Response:
        return page("schedules.html", request, schedules=await client.list_schedules())

    async def dlq(request: Request) -> Response:
        letters = list(reversed(await client.dead_letters(limit=200)))
        return page("dlq.html", request, letters=letters)

    # ------------------------------------------------------------------ SQL

    async def sql(request: Request) -> Response:
        query = ""
        result: dict[str, Any] | None = None
        message = None
        status = 200
        if request.method == "POST":
            form = await checked_form(request)
            query = _str(form.get("q"))
        elif request.query_params.get("q"):
            query = request.query_params["q"]
        if query.strip():
            try:
                result = await asyncio.to_thread(
                    _run_sql, config.export_dir, query, config.sql_row_limit, config.sql_timeout
                )
            except Exception as exc:  # DuckDB says what is wrong with the query
                message, status = f"{type(exc).__name__}: {exc}", 400
        from polos_analytics.sql import VIEW_NAMES

        return page(
            "sql.html",
            request,
            status=status,
            query=query,
            result=result,
            message=message,
            views_=VIEW_NAMES,
            export_dir=config.export_dir,
        )

    # ------------------------------------------------------------------ live updates

    def sse(
        request: Request,
        render: Callable[[], Awaitable[str]],
        interested: Callable[[set[str]], bool],
        subjects: list[str] | None = None,
    ) -> Response:
        """Server-sent events: the fragment ``render`` makes, sent again whenever a change
        the page is ``interested`` in arrives (from the index watch, or a NATS subscription of
        the run's own subjects), at most every ``live_interval``; a comment every 15 s keeps
        proxies from closing an idle stream."""

        async def stream() -> AsyncIterator[bytes]:
            wake = asyncio.Event()

            def on_change(ids: set[str]) -> None:
                if interested(ids):
                    wake.set()

            stop = index.listen(on_change)
            subs = []
            try:
                for subject in subjects or []:

                    async def nudge(_msg: Any) -> None:
                        wake.set()

                    subs.append(await client.nc.subscribe(subject, cb=nudge))
                yield b"retry: 1000\n\n"
                last = None
                while not ui.closing.is_set():
                    try:
                        html = await render()
                    except HTTPException:
                        html = last or ""
                    if html != last:
                        last = html
                        data = "".join(f"data: {line}\n" for line in html.split("\n"))
                        yield f"event: update\n{data}\n".encode()
                        # At most one update per interval: changes meanwhile are one update.
                        await asyncio.sleep(config.live_interval)
                    waiter = asyncio.ensure_future(wake.wait())
                    closer = asyncio.ensure_future(ui.closing.wait())
                    try:
                        done, _ = await asyncio.wait(
                            {waiter, closer}, timeout=15, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        waiter.cancel()
                        closer.cancel()
                    if not done:
                        yield b": ping\n\n"
                        continue
                    wake.clear()
            finally:
                stop()
                for s in subs:
                    try:
                        await s.unsubscribe()
                    except Exception:  # the connection may be closing
                        pass

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    # ------------------------------------------------------------------ app

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith(("/live/", "/api/")) or (
            request.method != "GET" and "text/html" not in request.headers.get("accept", "")
        ):
            return PlainTextResponse(str(exc.detail), status_code=exc.status_code)
        return error_page(request, exc.status_code, str(exc.detail))

    routes = [
        Route("/", home),
        Route(LOGIN_PATH, login, methods=["GET", "POST"]),
        Route("/runs", runs),
        Route("/live/runs", live_runs),
        Route("/runs/{run_id}", run_page),
        Route("/runs/{run_id}/payload", payload_object),
        Route("/runs/{run_id}/json", payload_full),
        Route("/runs/{run_id}/{action}", run_action, methods=["POST"]),
        Route("/live/runs/{run_id}", live_run),
        Route("/traces/{run_id}", trace_page),
        Route("/live/traces/{run_id}", live_trace),
        Route("/approvals", approvals),
        Route("/live/approvals", live_approvals),
        Route("/approve/{run_id}/{step:path}", approve, methods=["GET", "POST"]),
        Route("/workflows", workflows),
        Route("/workflows/{name}", workflow, methods=["GET", "POST"]),
        Route("/events", events, methods=["GET", "POST"]),
        Route("/queues", queues),
        Route("/workers", workers),
        Route("/schedules", schedules),
        Route("/dlq", dlq),
        Route("/sql", sql, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: on_http_error})
    app.state.ui = ui
    guarded = AuthMiddleware(
        app, secrets_=ui.secrets, auth=config.auth, cookie_name=lambda: ui.cookie_name
    )
    return _HostCheck(guarded, ui)  # type: ignore[return-value]


class _HostCheck:
    """Answer only requests whose Host header names this UI (see ``UIServer.host_allowed``)."""

    def __init__(self, app: Any, ui: UIServer) -> None:
        self.app = app
        self.ui = ui

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = next(
                (v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), ""
            )
            if not self.ui.host_allowed(host):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 421,
                        "headers": [(b"content-type", b"text/plain")],
                    }
                )
                await send(
                    {
                        "type": "http.response.body",
                        "body": f"this UI does not answer for host {host!r}\n".encode(),
                    }
                )
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- helpers


async def _now(value: str) -> str:
    return value


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _when(text: str | None) -> float | None:
    """A time from a ``datetime-local`` field (UTC) or epoch seconds."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise HTTPException(400, f"{text!r} is not a time (use YYYY-MM-DDTHH:MM)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _qs(kept: dict[str, str], changes: dict[str, Any]) -> str:
    merged = {**kept, **changes}
    return urlencode({k: v for k, v in merged.items() if v not in (None, "")})


def _approval_answer(form: views.ApprovalForm, posted: FormData) -> Any:
    """The resume data for a submitted approval page."""
    decision = _str(posted.get("decision"))
    if decision == "json":
        return views.parse_json("answer", _str(posted.get("json")))
    if form.mode == "approve":
        if decision not in ("approve", "reject"):
            raise views.FormError("choose approve or reject")
        answer: dict[str, Any] = {"approved": decision == "approve"}
        reason = _str(posted.get("reason")).strip()
        if reason:
            answer["reason"] = reason
        return answer
    values: dict[str, Any] = {}
    for f in form.fields:
        present, v = views.parse_field(
            f,
            _str(posted.get(f.name))
            if f.type != "boolean"
            else ("on" if posted.get(f.name) else ""),
        )
        if f.type == "boolean" and decision in ("approve", "reject") and f.name == "approved":
            v, present = decision == "approve", True
        if present:
            values[f.name] = v
    return values


READ_ONLY = ("SELECT", "EXPLAIN")


def _run_sql(export_dir: Path | None, query: str, limit: int, timeout: float) -> dict[str, Any]:
    """One read-only query over the export: the DuckDB connection may read the export
    directory and nothing else on the machine (no other file, no network), and only
    SELECT-like statements run (no COPY, ATTACH, SET, INSTALL...)."""
    import threading

    from polos_analytics.sql import connect

    if export_dir is None or not Path(export_dir).is_dir():
        raise FileNotFoundError(
            f"no analytics export in {export_dir}: `polos analytics export --dir DIR` makes one "
            "(`polos ui --export-dir DIR` points the UI at it)"
        )
    root = str(Path(export_dir).resolve())
    con = connect(root)
    try:
        stmts = con.extract_statements(query)
        if not stmts:
            raise ValueError("no statement in the query")
        for st in stmts:
            if st.type.name not in READ_ONLY:
                raise PermissionError(
                    f"only queries run here (SELECT, WITH, EXPLAIN, DESCRIBE, "
                    f"SHOW, SUMMARIZE), not {st.type.name}"
                )
        con.execute("SET allowed_directories = [" + "'" + root.replace("'", "''") + "'" + "]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        timer = threading.Timer(timeout, con.interrupt)
        timer.start()
        started = time.perf_counter()
        try:
            for st in stmts[:-1]:
                con.execute(st.query)
            cur = con.execute(stmts[-1].query)
            columns = [d[0] for d in cur.description or []]
            rows = cur.fetchmany(limit + 1)
        finally:
            timer.cancel()
        return {
            "columns": columns,
            "rows": [[_cell(v) for v in r] for r in rows[:limit]],
            "more": len(rows) > limit,
            "seconds": time.perf_counter() - started,
        }
    finally:
        con.close()


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:
        return str(value)


__all__ = ["create_app"]

"""The web server: routes, the token guard, the event streams, and `serve`.

Reads go straight to the study databases on read-only connections; everything that changes
something is a request to the daemon, the same request the CLI sends, so the daemon applies the
same ownership rules (the server runs as the user who started it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mosaic_client import analysis, contract, protocol, study_reading
from mosaic_client.connection import Client, DaemonUnavailable
from mosaic_client.web import live, pages, security, studies

STATIC = Path(__file__).parent / "static"
KEEPALIVE = 15.0  # seconds between comments on an idle event stream (proxies drop silence)
RUN_POLL = 0.25  # seconds between two looks at a run's database and log
CONTROL_TIMEOUT = 30.0
COUNTS_KEPT = 128
POINT_RUNS_SHOWN = 100  # run ids sent per comparison point (its size n is always sent)
HEADERS = {
    # The pages load nothing from elsewhere (the chart library ships in the package), and no
    # other site may frame them or learn the URL (with its token) from a Referer.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' "
    "'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class Settings:
    token: str
    port: int
    host: str = "127.0.0.1"
    socket_path: str | None = None
    dbs: list[str] = field(default_factory=list)  # named on the command line, absolute


class Guard:
    """ASGI middleware: every request needs the token (security.py says how); a page opened
    with ?token= gets the cookie and is redirected to its URL without the token."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        query = scope.get("query_string", b"").decode("latin-1")
        why = security.refusal(
            scope["method"],
            scope["path"],
            query,
            headers,
            self.settings.token,
            self.settings.port,
            self.settings.host,
        )
        if why is not None:
            await PlainTextResponse(f"403 Forbidden: {why}\n", status_code=403, headers=HEADERS)(
                scope, receive, send
            )
            return
        if (
            scope["method"] == "GET"
            and security.matches(self.settings.token, security.query_token(query))
            and not scope["path"].startswith(("/api/", "/events", "/static/"))
        ):
            rest = urlencode([(k, v) for k, v in parse_qsl(query) if k != "token"])
            response = RedirectResponse(
                scope["path"] + (f"?{rest}" if rest else ""), 303, headers=HEADERS
            )
            response.set_cookie(
                security.cookie_name(self.settings.port),
                self.settings.token,
                httponly=True,
                samesite="strict",
                path="/",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class NotFound(Exception):
    pass


def files_stamp(db: str) -> tuple[int, ...]:
    """Changes whenever a study database changes: a commit writes its -wal file (WAL mode), a
    checkpoint the file itself."""
    out: list[int] = []
    for suffix in ("", "-wal"):
        try:
            st = os.stat(db + suffix)
            out += [st.st_mtime_ns, st.st_size]
        except OSError:
            out += [0, 0]
    return tuple(out)


def log_size(path: str | None) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0


class WebState:
    """What the routes share: settings, the live hub and the daemon poller."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hub = live.Hub()
        self.poller = live.Poller(
            settings.socket_path, live.LocalStudies(settings.dbs), self._publish_threadsafe
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        # Run counts of filtered views, by database state and filter: paging or re-sorting a
        # filtered view of a large study does not count its runs again.
        self._counts: dict[tuple[Any, ...], int] = {}
        self._counts_lock = threading.Lock()
        self.compare_cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def cached_count(self, key: tuple[Any, ...]) -> int | None:
        with self._counts_lock:
            return self._counts.get(key)

    def remember_count(self, key: tuple[Any, ...], total: int) -> None:
        with self._counts_lock:
            self._counts[key] = total
            while len(self._counts) > COUNTS_KEPT:
                self._counts.pop(next(iter(self._counts)))

    def _publish_threadsafe(self, snapshot: dict[str, Any]) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.hub.publish, snapshot)

    def study_path(self, db: str | None) -> str:
        """A study this server shows: named on the command line or served by the daemon.
        Any other path is refused, so the token opens no other file."""
        if not db:
            raise NotFound("say which study with ?db=PATH")
        path = os.path.realpath(db)
        known = set(self.settings.dbs) | set(self.hub.snapshot.get("studies", {}))
        if path not in known and db not in known:
            raise NotFound(
                f"{db} is not a study of this server: the daemon does not serve it "
                "and it was not named on `mosaic web`'s command line"
            )
        return db if db in known else path

    def connect(self, db: str | None) -> sqlite3.Connection:
        path = self.study_path(db)
        try:
            return analysis.open_readonly(path)
        except analysis.AnalysisError as exc:
            raise NotFound(str(exc)) from None


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=HEADERS)


def _error(message: str, status: int) -> JSONResponse:
    return _json({"ok": False, "error": message}, status)


def _page(state: WebState, name: str, title: str, charts: bool = False) -> HTMLResponse:
    return HTMLResponse(pages.render(name, state.settings.token, title, charts), headers=HEADERS)


def _int(value: str | None, default: int, what: str) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except ValueError:
        raise studies.QueryError(f"{what} must be a whole number, got {value!r}") from None


def routes(state: WebState) -> list[Any]:
    """Every URL of the server. The groups keep the order Starlette tries them in: the
    POST-only /api/{action} comes after every GET /api/... route it would also match."""
    return [
        *_page_routes(state),
        *_live_routes(state),
        *_study_routes(state),
        *_compare_routes(state),
        *_control_routes(state),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


def _event_stream(stream: AsyncIterator[str]) -> StreamingResponse:
    # X-Accel-Buffering: a proxy such as nginx would otherwise hold the events back.
    return StreamingResponse(
        stream, media_type="text/event-stream", headers={**HEADERS, "X-Accel-Buffering": "no"}
    )


def _page_routes(state: WebState) -> list[Route]:
    """The HTML pages; each names its study (?db=), which must be one this server shows."""

    def overview(request: Request) -> Response:
        return _page(state, "overview", "overview")

    def study_page(request: Request) -> Response:
        state.study_path(request.query_params.get("db"))
        return _page(state, "study", os.path.basename(request.query_params["db"]))

    def run_page(request: Request) -> Response:
        state.study_path(request.query_params.get("db"))
        return _page(state, "run", f"run {request.query_params.get('id', '')}", charts=True)

    def compare_page(request: Request) -> Response:
        state.study_path(request.query_params.get("db"))
        return _page(state, "compare", "comparison", charts=True)

    return [
        Route("/", overview),
        Route("/study", study_page),
        Route("/run", run_page),
        Route("/compare", compare_page),
    ]


def _live_routes(state: WebState) -> list[Route]:
    """What the daemon is doing: the overview's snapshot, once or as a stream of changes."""

    def snapshot(request: Request) -> Response:
        return _json({"version": state.hub.version, **state.hub.snapshot})

    async def events(request: Request) -> Response:
        hub = state.hub

        async def stream() -> AsyncIterator[str]:
            seen = hub.version
            yield live.sse("snapshot", {"version": seen, **hub.snapshot})
            while not hub.closed:
                await hub.wait(seen, KEEPALIVE)
                if hub.version == seen:
                    yield ": keepalive\n\n"
                    continue
                pending = hub.since(seen)
                seen = hub.version
                if pending is None:
                    yield live.sse("snapshot", {"version": seen, **hub.snapshot})
                else:
                    for change in pending:
                        yield live.sse("diff", change)

        return _event_stream(stream())

    return [Route("/events", events), Route("/api/snapshot", snapshot)]


def _study_routes(state: WebState) -> list[Route]:
    """One study read from its database: its summary, a page of its runs, one run (also as a
    stream of its new epochs and log)."""

    def study_api(request: Request) -> Response:
        db = state.study_path(request.query_params.get("db"))
        with contextlib.closing(state.connect(db)) as conn:
            return _json({"db": db, **studies.study_summary(conn)})

    def runs_api(request: Request) -> Response:
        q = request.query_params
        query = studies.RunQuery(
            states=[s for s in q.get("status", "").split(",") if s],
            filters=[studies.parse_filter(f) for f in q.getlist("filter") if f.strip()],
            sort=q.get("sort", "run_id"),
            descending=q.get("desc") in ("1", "true"),
            offset=_int(q.get("offset"), 0, "offset"),
            limit=_int(q.get("limit"), 50, "limit"),
        )
        shown = [s for s in q.get("show", "").split(",") if s]
        db = state.study_path(q.get("db"))
        key = (
            db,
            files_stamp(db),
            tuple(query.states),
            tuple((f.name, f.op, repr(f.value)) for f in query.filters),
        )
        with contextlib.closing(state.connect(db)) as conn:
            page = studies.runs_page(conn, query, shown, state.cached_count(key))
        state.remember_count(key, page["total"])
        return _json(page)

    def run_api(request: Request) -> Response:
        run_id = _int(request.query_params.get("id"), 0, "id")
        with contextlib.closing(state.connect(request.query_params.get("db"))) as conn:
            detail = studies.run_detail(conn, run_id)
        if detail is None:
            raise NotFound(f"no run {run_id} in {request.query_params.get('db')}")
        path = studies.log_path(detail["params"], run_id)
        detail["log"], detail["log_size"] = studies.log_tail(path)
        detail["log_path"] = path
        return _json(detail)

    async def run_events(request: Request) -> Response:
        """New epochs, state changes and log growth of one run, as they happen."""
        q = request.query_params
        db = state.study_path(q.get("db"))
        run_id = _int(q.get("id"), 0, "id")
        after = _int(q.get("after"), 0, "after")
        return _event_stream(_run_event_stream(state, db, run_id, after))

    return [
        Route("/api/study", study_api),
        Route("/api/runs", runs_api),
        Route("/api/run", run_api),
        Route("/api/run/events", run_events),
    ]


def _run_news(
    state: WebState, db: str, run_id: int, last: int
) -> tuple[list[dict[str, Any]], tuple[str, str | None] | None, str | None]:
    """A run's epochs after `last`, its state, and its log file's path (run in a thread)."""
    with contextlib.closing(state.connect(db)) as conn:
        new = study_reading.epochs_after(conn, run_id, last)
        run_state = study_reading.run_state(conn, run_id)
        params = dict(
            conn.execute(
                "SELECT param_name, param_value FROM params WHERE run_id = ? AND "
                "param_name = 'run_files_path'",
                (run_id,),
            ).fetchall()
        )
    return new, run_state, studies.log_path(params, run_id)


async def _run_event_stream(
    state: WebState, db: str, run_id: int, after: int
) -> AsyncIterator[str]:
    """The run's events. The database is looked at only when its files changed (WAL mode: a
    commit touches the -wal file), the log only when it grew."""
    last_epoch, last_state, last_size, stamp = after, None, -1, None
    idle = 0.0
    log_file: str | None = None
    while not state.hub.closed:
        now_stamp = await run_in_threadpool(files_stamp, db)
        if now_stamp != stamp:
            stamp = now_stamp
            try:
                new, run_state, log_file = await run_in_threadpool(
                    _run_news, state, db, run_id, last_epoch
                )
            except (NotFound, sqlite3.Error) as exc:  # the study went away
                yield live.sse("gone", {"error": str(exc)})
                return
            if new:
                last_epoch = new[-1]["epoch"]
                yield live.sse("epochs", new)
            if run_state != last_state:
                last_state = run_state
                if run_state is not None:
                    yield live.sse("state", {"status": run_state[0], "return_status": run_state[1]})
        size = log_size(log_file)
        if size != last_size:  # read the tail only when the file grew
            text, last_size = await run_in_threadpool(studies.log_tail, log_file)
            yield live.sse("log", {"text": text, "size": last_size})
            idle = 0.0
        await asyncio.sleep(RUN_POLL)
        idle += RUN_POLL
        if idle >= KEEPALIVE:
            idle = 0.0
            yield ": keepalive\n\n"


def _compare_routes(state: WebState) -> list[Route]:
    """The comparison page's data: the metaplot's points, and the verdict table to come."""

    def compare_api(request: Request) -> Response:
        q = request.query_params
        db = state.study_path(q.get("db"))
        stamp = files_stamp(db)
        cache_key = (db, stamp, q.get("dataset_key"), q.get("criterion"), q.get("size_by"))
        cached = state.compare_cache.get(cache_key)
        if cached is not None:
            return _json(cached)
        with contextlib.closing(state.connect(db)) as conn:
            keys = study_reading.dataset_keys(conn)
            key = q.get("dataset_key") or (keys[0] if keys else "")
            criterion = q.get("criterion") or "test_loss"
            out: dict[str, Any] = {
                "dataset_keys": keys,
                "dataset_key": key,
                "criterion": criterion,
                "criteria": list(analysis.CRITERIA),
                # The size axis (`metaplot --x`, `compare --size-by`: docs/resources.md).
                "size_by": q.get("size_by") or "nb_params",
                "sizes": list(contract.SIZE_COLUMNS),
            }
            try:
                # The metaplot's own computation (mosaic metaplot draws the same points).
                meta = analysis.metaplot_data(conn, key, criterion, x=out["size_by"]).as_json()
                out["size_by"] = meta["x"]
                for points in meta["series"].values():
                    for point in points:  # the page lists a point's runs, not thousands
                        point["run_ids"] = point["run_ids"][:POINT_RUNS_SHOWN]
                out["meta"] = meta
            except analysis.AnalysisError as exc:
                out["meta"], out["error"] = None, str(exc)
        state.compare_cache = {cache_key: out}  # the last one: re-reading a study is cheap
        return _json(out)

    def verdict_api(request: Request) -> Response:
        # VERDICT: `mosaic compare` (mosaic_client/verdict/) is another helper's work in
        # progress; once it lands, this route returns its table for ?db=&dataset_key=&criterion=
        # and compare.js draws it in the page's #verdict section.
        return _json(
            {"available": False, "note": "the verdict table of `mosaic compare` will be shown here"}
        )

    def pareto_api(request: Request) -> Response:
        # `mosaic pareto` on the page's criterion against its size axis (docs/resources.md):
        # the same front, points dominated only by compare's test.
        q = request.query_params
        db = state.study_path(q.get("db"))
        metric = q.get("criterion") or "test_loss"
        try:
            cost = contract.size_column(q.get("size_by") or "nb_params")
        except ValueError as exc:
            return _json({"available": False, "note": str(exc)})
        from mosaic_client.verdict import pareto, reading

        with contextlib.closing(state.connect(db)) as conn:
            try:
                values = reading.study_values(conn, metric, cost)
            except (analysis.AnalysisError, reading.VerdictError) as exc:
                return _json({"available": False, "note": str(exc)})
        key = q.get("dataset_key")
        front = pareto.pareto(values, db, data_keys=[key] if key else None)
        return _json({"available": True, **front.as_json()})

    return [
        Route("/api/compare", compare_api),
        Route("/api/verdict", verdict_api),
        Route("/api/pareto", pareto_api),
    ]


def _control_fields(state: WebState, name: str, body: dict[str, Any]) -> dict[str, Any] | Response:
    """The daemon request's fields for a control action, or the error answered instead."""
    if name == "pause":
        return {"now": bool(body.get("now"))}
    if name == "resume":
        return {}
    if name == "cancel":
        ids = body.get("ids")
        if not (
            isinstance(ids, list)
            and ids
            and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            return _error("cancel needs {db, ids: [run ids]}", 400)
        return {
            "db": state.study_path(body.get("db")),
            "selection": {"kind": "ids", "ids": ids},
            "reason": "cancelled from the web view",
        }
    return _error(f"unknown action {name!r}; use pause, resume or cancel", 404)


def _control_routes(state: WebState) -> list[Route]:
    """The actions: pause, resume, cancel, sent to the daemon as the CLI sends them, so the
    daemon applies its ownership rules."""

    async def control(request: Request) -> Response:
        name = request.path_params["action"]
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = {}
        if not isinstance(body, dict):
            return _error("the body must be a JSON object", 400)
        fields = _control_fields(state, name, body)
        if isinstance(fields, Response):
            return fields

        def call() -> Any:
            with Client(state.settings.socket_path, timeout=CONTROL_TIMEOUT) as client:
                return client.request(name, **fields)

        try:
            reply = await run_in_threadpool(call)
        except DaemonUnavailable as exc:
            return _error(str(exc), 503)
        except protocol.ProtocolError as exc:
            status = {protocol.ErrorCode.PERMISSION: 403, protocol.ErrorCode.NOT_FOUND: 404}.get(
                exc.code, 400
            )
            return _error(exc.message, status)
        state.poller.poll_now()
        return _json({"ok": True, "reply": reply})

    return [Route("/api/{action}", control, methods=["POST"])]


def create_app(settings: Settings) -> Starlette:
    state = WebState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        state.hub.bind()
        state.poller.start()
        try:
            yield
        finally:
            state.hub.close()
            state.poller.stop()
            state.poller.join(timeout=5)

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(str(exc), 404)

    async def bad_query(request: Request, exc: Exception) -> Response:
        return _error(str(exc), 400)

    app = Starlette(
        routes=routes(state),
        lifespan=lifespan,
        exception_handlers={NotFound: not_found, studies.QueryError: bad_query},
    )
    app.state.web = state
    # Outermost: nothing, not even a 404 or a static file, answers without the token.
    app.add_middleware(Guard, settings=settings)
    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port), made before the server starts so that the
    printed URL has the real port and a port in use is reported plainly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, sock: socket.socket) -> None:
    import uvicorn

    app = create_app(settings)
    state: WebState = app.state.web

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn waits for open responses before it stops, and an event stream never
            # ends by itself: end them all first, so Ctrl-C stops the server at once and
            # cleanly. (A signal handler may only hand work to the loop this way.)
            if state.loop is not None and not state.loop.is_closed():
                state.loop.call_soon_threadsafe(state.hub.close)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=3, lifespan="on"
    )
    Server(config).run(sockets=[sock])

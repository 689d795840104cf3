"""`mosaic web`: the pages in a real headless Chromium, against a real daemon and real studies.

One daemon, one trained study and one `mosaic web` server for the module; the browser drives
the pages as a person would (click, hover, read). Screenshots of each page go to
$MOSAIC_WEB_SCREENSHOTS when it is set (docs/images/ for the docs), else to a temporary folder.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import ini
import psutil
import pytest
from conftest import Daemon, example_config, query, require_tools

from mosaic_client import study_reading
from mosaic_client.web import live, security, studies

# -- units: the guard, the table queries, the diffs --------------------------------------------


def test_token_host_and_origin_rules() -> None:
    token, port = "s3cret", 8765
    good = {"host": "127.0.0.1:8765"}

    def refused(
        method: str, headers: dict[str, str], qs: str = "", bind: str = "127.0.0.1"
    ) -> bool:
        return security.refusal(method, "/", qs, headers, token, port, bind) is not None

    assert refused("GET", good)
    assert not refused("GET", good, "token=s3cret")
    assert refused("GET", good, "token=s3cre")
    assert not refused("GET", {**good, "cookie": f"mosaic_token_{port}=s3cret"})
    assert refused("GET", {**good, "cookie": "mosaic_token_9999=s3cret"})  # another server's
    assert not refused("GET", {**good, security.TOKEN_HEADER: "s3cret"})
    # DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends its own Host.
    assert refused("GET", {"host": "evil.example:8765"}, "token=s3cret")
    assert not refused("GET", {"host": "localhost:8765"}, "token=s3cret")
    assert not refused("GET", {"host": "evil.example"}, "token=s3cret", bind="0.0.0.0")
    # POST: the header token, never the cookie or the query, and the same origin.
    post = {**good, security.TOKEN_HEADER: "s3cret"}
    assert not refused("POST", post)
    assert not refused(
        "POST", {**post, "origin": "http://127.0.0.1:8765", "sec-fetch-site": "same-origin"}
    )
    assert refused("POST", {**good, "cookie": f"mosaic_token_{port}=s3cret"})
    assert refused("POST", good, "token=s3cret")
    assert refused("POST", {**post, "origin": "http://evil.example"})
    assert refused("POST", {**post, "origin": "http://127.0.0.1:9999"})
    assert refused("POST", {**post, "origin": "null"})
    assert refused("POST", {**post, "sec-fetch-site": "same-site"})
    assert refused("POST", {**post, "sec-fetch-site": "cross-site"})


def synthetic_study(path: Path, n: int) -> None:
    """A study database of n runs made with the daemon's own schema (mosaicd.storage.store)."""
    from mosaicd.storage.store import Store

    Store(str(path)).close()
    conn = sqlite3.connect(path)
    states = ["done", "done", "done", "failed", "running", "queued"]
    with conn:
        conn.executemany(
            "INSERT INTO runs VALUES (?, ?, ?, NULL)",
            [(i, states[i % 6], f"p{i % 7}") for i in range(1, n + 1)],
        )
        conn.executemany(
            'INSERT INTO run_results (run_id, test_loss, "duration(s)") VALUES (?, ?, ?)',
            [
                (i, ((i * 7919) % 1000) / 1000, float(i))
                for i in range(1, n + 1)
                if states[i % 6] == "done"
            ],
        )
        conn.executemany(
            "INSERT INTO params VALUES (?, ?, ?)",
            [
                (i, name, value)
                for i in range(1, n + 1)
                for name, value in (("lr", [0.1, 0.01, 0.001][i % 3]), ("mlp_key", f"m{i % 4}"))
                if name != "mlp_key" or i % 10
            ],
        )  # every 10th run has no key


def test_host_check_accepts_only_exact_loopback_names_and_addresses() -> None:
    # Outside review: any Host starting with "127." passed, but 127.evil.example is a DNS name
    # the attacker controls, resolved to 127.0.0.1 for a rebinding attack.
    hostile = [
        "127.evil.example",
        "127.evil.example:8765",
        "127.0.0.1.evil.example",
        "127.0.0.1.nip.io:8765",
        "localhost.evil.example",
        "127.0.0.1@evil.example",
        "evil.example#127.0.0.1",
        "127.0.0.1:8765/evil",
        "[::1].evil.example",
        "127.1",
        "",
        None,
    ]
    for host in hostile:
        assert not security.host_allowed(host, "127.0.0.1"), host
    for host in ["127.0.0.1", "127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765"]:
        assert security.host_allowed(host, "127.0.0.1"), host
    # Literal loopback addresses are loopback whoever names them: no name to rebind.
    assert security.host_allowed("127.0.0.2:8765", "127.0.0.1")
    assert security.is_loopback("::1") and not security.is_loopback("127.evil.example")


def test_runs_page_pages_sorts_and_filters_in_sql(tmp: Path) -> None:
    db = tmp / "s.db"
    synthetic_study(db, 300)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = conn.execute(
        "SELECT r.run_id, r.status, rr.test_loss FROM runs r LEFT JOIN "
        "run_results rr USING (run_id)"
    ).fetchall()
    lr = dict(conn.execute("SELECT run_id, param_value FROM params WHERE param_name='lr'"))
    key = dict(conn.execute("SELECT run_id, param_value FROM params WHERE param_name='mlp_key'"))
    # The independent computation: filter and sort in Python, NULLs last, run_id breaking ties.
    wanted = [
        r
        for r in rows
        if r[1] in ("done", "failed") and lr[r[0]] <= 0.01 and r[0] in key and key[r[0]] != "m2"
    ]
    wanted.sort(key=lambda r: (r[2] is None, -(r[2] or 0), r[0]))
    q = studies.RunQuery(
        states=["done", "failed"],
        filters=[studies.parse_filter("lr<=0.01"), studies.parse_filter("mlp_key!=m2")],
        sort="test_loss",
        descending=True,
        offset=10,
        limit=25,
    )
    page = studies.runs_page(conn, q, ["mlp_key", "lr"])
    assert page["total"] == len(wanted)
    assert [r["run_id"] for r in page["rows"]] == [r[0] for r in wanted[10:35]]
    assert all(r["params"]["mlp_key"] == key[r["run_id"]] for r in page["rows"])
    # By a param: runs with it in value order, then those without it by run_id, page by page.
    without = sorted(r[0] for r in rows if r[0] not in key)
    for desc in (False, True):
        with_key = sorted(key, key=lambda i: (key[i], i), reverse=desc)
        for states, expected in (
            (["done", "failed", "queued", "running"], with_key + without),
            (["failed"], [i for i in with_key + without if i % 6 == 3]),
        ):
            seen = []
            for offset in range(0, 320, 7):
                page = studies.runs_page(
                    conn,
                    studies.RunQuery(
                        states=states, sort="param:mlp_key", descending=desc, offset=offset, limit=7
                    ),
                    [],
                )
                seen += [r["run_id"] for r in page["rows"]]
            assert seen == expected
    assert study_reading.status_counts(conn)["done"] == sum(1 for r in rows if r[1] == "done")
    assert study_reading.param_names(conn) == ["lr", "mlp_key"]
    assert studies.count_matching(conn, q) == len(wanted)
    for bad in (
        studies.RunQuery(sort="nope"),
        studies.RunQuery(states=["lost"]),
        studies.RunQuery(limit=0),
    ):
        with pytest.raises(studies.QueryError):
            studies.runs_page(conn, bad, [])
    with pytest.raises(studies.QueryError, match="NAME=VALUE"):
        studies.parse_filter("no operator")
    conn.close()


def test_dataset_keys_and_log_tail(tmp: Path) -> None:
    db = tmp / "k.db"
    synthetic_study(db, 12)
    conn = sqlite3.connect(db)
    with conn:  # two data types joined, as analysis.data_key joins them
        conn.executemany(
            "INSERT INTO params VALUES (?, ?, ?)",
            [
                (i, n, v)
                for i in range(1, 13)
                for n, v in (
                    ("data_scheme", "src, noise" if i % 2 else "src"),
                    ("src_key", f"s{i % 3}"),
                    ("noise_key", "n1"),
                )
            ],
        )
    from mosaic_client.analysis import data_key
    from mosaic_client.study_reading import run_params

    expected = sorted({data_key(p) for p in run_params(conn).values()})
    assert study_reading.dataset_keys(conn) == expected and len(expected) == 6
    conn.close()
    log = tmp / "out.log"
    assert studies.log_tail(str(log)) == ("", 0)
    log.write_text("".join(f"line {i}\n" for i in range(5000)))
    text, size = studies.log_tail(str(log), max_bytes=1000)
    assert size == log.stat().st_size and text.endswith("line 4999\n")
    assert text.startswith("line ") and len(text) <= 1000  # no partial first line


def apply_diff(snapshot: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """The page's side of live.diff, as app.js merges a change: what these tests replay."""
    merged = {**snapshot, **{k: v for k, v in change.items() if k in ("daemon", "workers")}}
    merged["studies"] = {**snapshot.get("studies", {}), **change.get("studies", {})}
    for db in change.get("removed", []):
        merged["studies"].pop(db, None)
    return merged


def test_a_diff_applied_to_the_old_snapshot_gives_the_new_one() -> None:
    def snap(paused: bool, epoch: int, dbs: tuple[str, ...]) -> dict[str, Any]:
        status = {
            "paused": paused,
            "queued": 1,
            "paused_owners": [],
            "workers": [
                {
                    "id": "w1",
                    "slot": "cpu0",
                    "state": "busy",
                    "pid": 1,
                    "run_id": 3,
                    "runs_done": 0,
                    "cpu_percent": 99.4,
                    "rss": 50 * 2**20,
                }
            ],
            "studies": [
                {
                    "db": db,
                    "counts": {"running": 1},
                    "done": [],
                    "failed": [],
                    "running": [
                        {
                            "run_id": 3,
                            "pipeline": "p",
                            "epoch": epoch,
                            "epochs": 9,
                            "train_loss": 0.1,
                            "test_loss": 0.2,
                            "worker": "w1",
                            "slot": "cpu0",
                            "owner": "me",
                            "elapsed": 10.2,
                        }
                    ],
                }
                for db in dbs
            ],
        }
        return live.snapshot_of(status, None, {}, 1000.0)

    a = snap(False, 1, ("/a.db", "/b.db"))
    assert live.diff(a, snap(False, 1, ("/a.db", "/b.db"))) == {}
    for b in (
        snap(True, 1, ("/a.db", "/b.db")),
        snap(False, 2, ("/a.db", "/b.db")),
        snap(False, 1, ("/b.db",)),
        snap(False, 3, ("/c.db", "/a.db")),
    ):
        change = live.diff(a, b)
        assert change and apply_diff(a, change) == b
        assert "workers" not in change  # unchanged parts are not sent
    down = live.snapshot_of(None, "no daemon", {"/f.db": {"done": 2}}, 0.0)
    assert down["daemon"]["up"] is False and down["studies"]["/f.db"]["counts"] == {"done": 2}


def test_the_hub_wakes_streams_and_replays_or_resends() -> None:
    import asyncio

    async def scenario() -> None:
        hub = live.Hub()
        hub.bind()
        base = live.snapshot_of(None, "down", {}, 0.0)
        hub.publish(base)
        seen = hub.version
        waiter = asyncio.ensure_future(hub.wait(seen, timeout=5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        hub.publish(live.snapshot_of(None, "still down", {}, 0.0))  # a change wakes it
        await asyncio.wait_for(waiter, 1)
        hub.publish(live.snapshot_of(None, "still down", {}, 0.0))  # no change, no version
        assert hub.version == seen + 1
        replayed = base
        for change in hub.since(seen) or []:
            replayed = apply_diff(replayed, change)
        assert replayed == hub.snapshot
        for i in range(live.KEPT_CHANGES + 1):
            hub.publish(live.snapshot_of(None, f"error {i}", {}, 0.0))
        assert hub.since(seen) is None  # too far behind: the stream sends a snapshot
        assert hub.since(hub.version - 3) is not None
        hub.close()
        await asyncio.wait_for(hub.wait(hub.version, timeout=5), 1)

    asyncio.run(scenario())


# -- a real daemon, a trained study, a server and a browser ------------------------------------


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mosweb-"))  # short: ipc paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(root: Path) -> Iterator[Daemon]:
    d = Daemon(root).start()
    yield d
    d.stop()


def family_config(root: Path) -> Path:
    """Two families (model keys) on one dataset, two runs per point: a metaplot to compare."""
    return ini.write(
        root,
        ini.process(root, 2),
        ini.monitor(2, 2),
        ini.dataset(120),
        ini.mlp(2, "2, 4"),
        ini.mlp(2, "2, 4", name="mlp_brick"),
    )


@pytest.fixture(scope="module")
def study(daemon: Daemon, root: Path) -> str:
    """8 finished runs in two families, and one failed run (its class refuses width 0)."""
    project = root / "study"
    project.mkdir()
    db = str(project / "study.db")
    daemon.cli("run", str(family_config(project)), db, "--follow", check=True)
    broken = root / "broken"
    broken.mkdir()
    daemon.cli("run", str(example_config(broken, epochs=1, mlp_width="0")), db, check=True)
    daemon.wait_for(db, total=9)
    return db


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url
        parts = urlsplit(url)
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.port = parts.port or 0
        self.token = url.rsplit("token=", 1)[1]

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server(daemon: Daemon, study: str, root: Path) -> Iterator[Server]:
    """`mosaic web` as a user starts it, on any free port, showing the daemon's studies."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mosaic_client.cli", "web", "--port", "0"],
        env=daemon.env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(x) for x in proc.stdout],  # type: ignore[union-attr]
        daemon=True,
    ).start()
    try:
        first = lines.get(timeout=30)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"mosaic web printed nothing: {proc.stderr.read()}") from None  # type: ignore[union-attr]
    assert first.startswith("Mosaic web view: http://127.0.0.1:"), first
    server = Server(proc, first.split()[-1])
    yield server
    try:
        # Ctrl-C while a page still holds an event stream: a prompt, clean stop, and the CLI's
        # "interrupted" exit code.
        stream = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        stream.request("GET", "/events", headers={"X-Mosaic-Token": server.token})
        response = stream.getresponse()
        assert response.status == 200 and response.read1(100).startswith(b"event: snapshot")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130
        assert time.monotonic() - started < 5
        assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
        stream.close()
    finally:
        if proc.poll() is None:  # a failed check above must not leave the server running
            proc.kill()
            proc.wait()


def _screens() -> Path:
    folder = os.environ.get("MOSAIC_WEB_SCREENSHOTS")
    path = Path(folder) if folder else Path(tempfile.gettempdir()) / "mosaic-web-screens"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(server: Server) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_tools("chromium", "chromedriver", packages="chromium chromium-driver")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    driver.get(server.url)  # the printed URL: sets the cookie, lands on the overview
    yield driver
    driver.quit()


def wait_until(what: Callable[[], Any], timeout: float = 15.0, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = what()
            if last:
                return last
        except Exception as exc:  # the page may be mid-render
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out: {message} (last: {last!r})")


def texts_of(browser: Any, css: str) -> list[str] | None:
    """The texts of the elements `css` selects, or None if the page re-rendered them while
    they were read (the live pages replace their tables on each update)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return [str(e.text) for e in browser.find_elements(By.CSS_SELECTOR, css)]
    except StaleElementReferenceException:
        return None


def text_of(browser: Any, css: str) -> str:
    texts = wait_until(lambda: texts_of(browser, css) or None, message=css)
    return texts[0]


def shot(browser: Any, name: str) -> None:
    browser.save_screenshot(str(_screens() / f"web-{name}.png"))


# -- security ----------------------------------------------------------------------------------


def test_the_server_listens_on_the_loopback_only(server: Server) -> None:
    proc = psutil.Process(server.proc.pid)
    connections = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
    listening = [c for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}
    assert {c.laddr.port for c in listening} == {server.port}


def test_requests_without_the_token_are_refused(server: Server) -> None:
    for path in ("/", "/api/snapshot", "/events", "/static/app.js", "/study?db=x", "/nope"):
        status, _, body = server.request("GET", path)
        assert status == 403, path
        assert b"token" in body
        assert server.request("GET", path, {"X-Mosaic-Token": "wrong"})[0] == 403
    status, headers, _ = server.request("GET", f"/?token={server.token}")
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    value = cookie.split(";")[0]
    assert server.request("GET", "/api/snapshot", {"Cookie": value})[0] == 200
    # DNS rebinding: the right token under another site's name is still refused.
    assert (
        server.request(
            "GET",
            "/api/snapshot",
            {"Host": f"evil.example:{server.port}", "X-Mosaic-Token": server.token},
        )[0]
        == 403
    )


def test_cross_site_posts_are_refused(
    server: Server, daemon: Daemon, browser: Any, root: Path
) -> None:
    cookie = f"{security.cookie_name(server.port)}={server.token}"
    for headers in (
        {"Cookie": cookie},  # what a cross-site form carries: the cookie, no header
        {"X-Mosaic-Token": server.token, "Origin": "http://evil.example"},
        {"X-Mosaic-Token": server.token, "Sec-Fetch-Site": "cross-site"},
    ):
        status, _, _ = server.request(
            "POST", "/api/pause", {**headers, "Content-Type": "application/json"}, b"{}"
        )
        assert status == 403, headers
    # A real page of another origin (another port of this host: same site, other origin)
    # posting to the server from the browser that holds the cookie.
    got: list[str] = []

    class Evil(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            page = (
                f'<form id="f" method="post" action="{server.base}/api/pause" '
                'enctype="text/plain"><input name=\'{"now": true, "x":"\' value=\'"}\'>'
                "</form><script>fetch('" + server.base + "/api/resume', {method: 'POST', "
                "mode: 'no-cors', credentials: 'include', body: '{}'}).then("
                "() => document.title = 'sent').catch(() => document.title = 'sent');"
                "document.getElementById('f').submit();</script>"
            )
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page.encode())
            got.append(self.path)

        def log_message(self, *args: Any) -> None:
            pass

    evil = ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{evil.server_address[1]}/")
        wait_until(lambda: "403" in browser.page_source, message="the form post refused")
    finally:
        evil.shutdown()
    assert got
    assert daemon.request("status", limit=0)["paused"] is False


# -- the pages ---------------------------------------------------------------------------------


def test_overview_shows_daemon_workers_and_studies(
    server: Server, browser: Any, study: str
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server.base + "/")
    wait_until(
        lambda: (
            browser.find_element(By.ID, "daemon-state").get_attribute("data-state") == "running"
        ),
        message="daemon state",
    )

    def two_workers() -> list[str] | None:
        texts = texts_of(browser, "#workers tbody tr")
        return texts if texts and len(texts) == 2 else None

    rows = wait_until(two_workers, message="two workers")
    assert all("cpu" in text for text in rows)  # the slot names
    studies_text = text_of(browser, "#studies tbody")
    assert study in studies_text and "8 done" in studies_text and "1 failed" in studies_text


def test_study_page_sorts_filters_and_pages_in_the_server(
    server: Server, browser: Any, study: str
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def ids() -> list[int]:
        return [
            int(tr.get_attribute("data-run"))
            for tr in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr[data-run]")
        ]

    def settled(why: str, before: float | None) -> bool:
        stamp = browser.execute_script(f"return window.mosaic.timing.{why} || null")
        return stamp is not None and (before is None or stamp > before)

    def stamp(why: str) -> float | None:
        return browser.execute_script(f"return window.mosaic.timing.{why} || null")

    browser.get(f"{server.base}/study?db={quote(study)}")
    wait_until(lambda: text_of(browser, "#range") == "runs 1–9 of 9", message="all 9 runs")
    assert ids() == list(range(1, 10))
    assert "8 done" in text_of(browser, "#counts") and "1 failed" in text_of(browser, "#counts")
    # Sort by test_loss, ascending then descending: the order SQLite gives, failed run last.
    expected = [
        r
        for (r,) in query(
            study,
            "SELECT r.run_id FROM runs r LEFT JOIN run_results rr "
            "USING (run_id) ORDER BY rr.test_loss IS NULL, "
            "rr.test_loss, r.run_id",
        )
    ]
    before = stamp("sorted")
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="test_loss"]').click()
    wait_until(lambda: settled("sorted", before) and ids() == expected, message="sorted asc")
    before = stamp("sorted")
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="test_loss"]').click()
    desc = [
        r
        for (r,) in query(
            study,
            "SELECT r.run_id FROM runs r LEFT JOIN run_results rr "
            "USING (run_id) ORDER BY rr.test_loss IS NULL, "
            "rr.test_loss DESC, r.run_id",
        )
    ]
    wait_until(lambda: settled("sorted", before) and ids() == desc, message="sorted desc")
    shot(browser, "study")
    # Filter by state, then by a key, then by a parameter.
    browser.find_element(By.CSS_SELECTOR, '#states input[value="failed"]').click()
    wait_until(lambda: ids() == [9], message="only the failed run")
    browser.find_element(By.CSS_SELECTOR, '#states input[value="failed"]').click()
    browser.find_element(By.CSS_SELECTOR, '#states input[value="done"]').click()
    Select(
        browser.find_element(By.CSS_SELECTOR, 'select[data-key="mlp_key"]')
    ).select_by_visible_text("mlp_mlp_brick")
    bricks = [
        r
        for (r,) in query(
            study,
            "SELECT run_id FROM params WHERE param_name='mlp_key' AND param_value='mlp_mlp_brick'",
        )
    ]
    wait_until(
        lambda: sorted(ids()) == sorted(bricks) and len(bricks) == 4, message="the brick family"
    )
    field = browser.find_element(By.ID, "param-filter")
    field.send_keys("mlp_brick_width>=3\n")
    wide = [
        r
        for (r,) in query(
            study,
            "SELECT run_id FROM params WHERE param_name='mlp_brick_width' AND param_value >= 3",
        )
    ]
    wait_until(lambda: sorted(ids()) == sorted(wide) and len(wide) == 2, message="param filter")
    assert "mlp_brick_width>=3" in text_of(browser, "#chips")
    # Paging: 25 rows a page of 9 runs is one page; the next button is off.
    assert browser.find_element(By.ID, "next").get_attribute("disabled")


def test_failed_run_page_shows_the_traceback(server: Server, browser: Any, study: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{server.base}/run?db={quote(study)}&id=9")
    wait_until(
        lambda: browser.find_element(By.ID, "run-status").get_attribute("data-state") == "failed",
        message="failed state",
    )
    trace = text_of(browser, "#traceback")
    assert "Traceback" in trace and "width must be at least 1" in trace
    assert "mlp_funnel_width" in text_of(browser, "#params")


def test_run_page_curve_grows_as_epochs_arrive_and_cancel(
    server: Server, browser: Any, daemon: Daemon, study: str, root: Path
) -> None:
    from selenium.webdriver.common.by import By

    # A run slow enough to watch (about 0.2 s an epoch), in the study the page already shows.
    slow = root / "slow"
    slow.mkdir()
    cfg = example_config(slow, epochs=200, seed=3)
    cfg.write_text(
        cfg.read_text()
        .replace("data_size = 200", "data_size = 4000")
        .replace("batch_size = 20", "batch_size = 10")
    )
    daemon.cli("run", str(cfg), study, check=True)
    run_id = 10
    wait_until(
        lambda: query(study, "SELECT count(*) FROM run_epochs WHERE run_id=?", run_id)[0][0] >= 1,
        timeout=60,
        message="first epoch",
    )
    browser.get(f"{server.base}/run?db={quote(study)}&id={run_id}")

    def points() -> int:
        return int(browser.find_element(By.ID, "loss-chart").get_attribute("data-points") or 0)

    start = wait_until(points, message="the curve's first points")
    wait_until(lambda: points() >= start + 3, timeout=20, message="the curve gains points")
    chart_len = browser.execute_script("return window.mosaic.charts.loss.data[0].length")
    assert chart_len == points()
    assert wait_until(lambda: text_of(browser, "#log").strip(), message="log tail")
    shot(browser, "run")
    # The overview while it trains: its progress under the study, its worker busy.
    browser.get(server.base + "/")
    wait_until(
        lambda: f"run {run_id}" in text_of(browser, "#studies tbody"),
        message="the running run on the overview",
    )
    assert str(run_id) in text_of(browser, "#workers tbody")
    shot(browser, "overview")
    browser.back()
    wait_until(
        lambda: browser.find_element(By.ID, "run-status").get_attribute("data-state") == "running",
        message="back on the run page",
    )
    browser.find_element(By.ID, "cancel-run").click()
    wait_until(
        lambda: (
            browser.find_element(By.ID, "run-status").get_attribute("data-state") == "cancelled"
        ),
        message="cancelled on the page",
    )
    assert query(study, "SELECT status FROM runs WHERE run_id=?", run_id) == [("cancelled",)]


def test_comparison_hover_shows_the_runs_and_families_toggle(
    server: Server, browser: Any, study: str
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(f"{server.base}/compare?db={quote(study)}")
    wait_until(
        lambda: browser.find_element(By.ID, "meta-chart").get_attribute("data-families") == "2",
        message="two families",
    )
    over = browser.find_element(By.CSS_SELECTOR, "#meta-chart .u-over")

    def hover(family: int, index: int) -> None:
        x, y, w, h = browser.execute_script(
            "const c = window.mosaic.charts, u = c.meta, f = c.families[arguments[0]];"
            "const r = u.over.getBoundingClientRect();"
            "return [u.valToPos(c.xs[arguments[1]], 'x'), "
            "u.valToPos(f.points[arguments[1]].mean, 'y'), r.width, r.height];",
            family,
            index,
        )
        ActionChains(browser).move_to_element_with_offset(
            over, int(x - w / 2), int(y - h / 2)
        ).perform()

    meta = browser.execute_script("return window.mosaic.last.meta")
    name, points = sorted(meta["series"].items())[0]
    family = list(meta["series"]).index(name)
    point = points[0]
    index = browser.execute_script("return window.mosaic.charts.xs").index(point["nb_params"])
    hover(family, index)
    wait_until(lambda: name in text_of(browser, "#point"), message="the hovered point")
    runs = text_of(browser, "#point")
    assert all(str(r) in runs for r in point["run_ids"]) and len(point["run_ids"]) == 2
    shot(browser, "compare")
    # Hide that family from the legend: its points leave the chart and the hover panel.
    legend = browser.find_elements(By.CSS_SELECTOR, ".u-legend .u-series")[family + 1]
    legend.click()
    assert (
        browser.execute_script(f"return window.mosaic.charts.meta.series[{family + 1}].show")
        is False
    )
    ActionChains(browser).move_to_element_with_offset(over, 0, 0).perform()
    hover(family, index)
    wait_until(lambda: name not in text_of(browser, "#point"), message="family hidden")
    legend.click()
    assert browser.execute_script(f"return window.mosaic.charts.meta.series[{family + 1}].show")
    assert "verdict" in text_of(browser, "#verdict").lower()


def test_comparison_takes_any_size_axis(server: Server, browser: Any, study: str) -> None:
    """Issue 26: the comparison page's size axis is any size or cost column (metaplot --x)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def compare(**query: str) -> dict[str, Any]:
        path = "/api/compare?" + urlencode({"db": study, **query})
        status, _, body = server.request("GET", path, {"X-Mosaic-Token": server.token})
        assert status == 200
        return json.loads(body)

    by_params, by_flops = compare(), compare(size_by="flops")
    assert by_params["size_by"] == "nb_params" and by_flops["size_by"] == "flops_per_sample"
    assert "latency_ms" in by_flops["sizes"] and by_flops["meta"]["x"] == "flops_per_sample"
    flops = {p["nb_params"] for points in by_flops["meta"]["series"].values() for p in points}
    expected = query(
        study, "SELECT DISTINCT flops_per_sample FROM run_results WHERE flops_per_sample > 0"
    )
    assert flops == {float(f"{f:.4g}") for (f,) in expected}
    bad = compare(size_by="weight")
    assert bad["meta"] is None and "not a size or cost column" in bad["error"]
    browser.get(f"{server.base}/compare?db={quote(study)}")
    wait_until(
        lambda: browser.find_element(By.ID, "meta-chart").get_attribute("data-families") == "2",
        message="two families",
    )
    Select(browser.find_element(By.ID, "size-by")).select_by_visible_text("latency_ms")
    wait_until(
        lambda: browser.execute_script("return window.mosaic.last.size_by") == "latency_ms",
        message="the latency axis",
    )
    # Drawn against latency, on a logarithmic x scale (uPlot's distribution 3).
    assert "latency_ms" in text_of(browser, "#meta-chart")
    assert browser.execute_script("return window.mosaic.charts.meta.scales.x.distr") == 3
    # The Pareto front of the page's criterion against its axis: `mosaic pareto`'s own.
    wait_until(
        lambda: browser.execute_script("return (window.mosaic.pareto || {}).cost === 'latency_ms'"),
        message="the front against latency",
    )
    shown = browser.execute_script("return window.mosaic.pareto")
    cli = subprocess.run(
        [sys.executable, "-m", "mosaic_client.cli", "pareto", study, "--cost", "latency",
         "--metric", shown["metric"], "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    front = json.loads(cli.stdout)
    assert [(p["family"], p["cost"], p["on_front"]) for p in shown["points"]] == [
        (p["family"], p["cost"], p["on_front"]) for p in front["points"]
    ]
    rows = browser.find_elements(By.CSS_SELECTOR, "#pareto-table tr[data-front]")
    assert len(rows) == len(front["points"]) > 0


def test_pause_and_resume_buttons_drive_the_daemon(
    server: Server, browser: Any, daemon: Daemon
) -> None:
    from selenium.webdriver.common.by import By

    def page_state() -> str:
        return str(browser.find_element(By.ID, "daemon-state").get_attribute("data-state"))

    browser.get(server.base + "/")
    wait_until(lambda: page_state() == "running", message="running first")
    browser.find_element(By.ID, "pause").click()
    wait_until(lambda: page_state() == "paused", timeout=5, message="paused on the page")
    assert "PAUSED" in daemon.cli("status", check=True).stdout.splitlines()[0]
    assert "paused" in text_of(browser, "#message")
    browser.find_element(By.ID, "resume").click()
    wait_until(lambda: page_state() == "running", timeout=5, message="running again")
    assert daemon.cli("status", check=True).stdout.startswith("mosaicd: running")


def test_other_commands_do_not_import_the_web_stack(daemon: Daemon) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mosaic_client.cli", "status"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules = {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if "|" in line
    }
    assert "mosaic_client" in modules or "json" in modules  # importtime did report
    assert not modules & {"starlette", "uvicorn", "anyio", "selenium"}, modules
    assert "mosaic_client.web" not in result.stderr


def test_web_refuses_a_file_that_is_not_a_study(daemon: Daemon, root: Path) -> None:
    junk = root / "junk.db"
    junk.write_text("not a database")
    result = daemon.cli("web", "--port", "0", str(junk), timeout=60)
    assert result.returncode == 2 and "not a readable SQLite database" in result.stderr
    missing = daemon.cli("web", "--port", "0", str(root / "missing.db"), timeout=60)
    assert missing.returncode == 2 and "no database at" in missing.stderr


def test_json_of_the_snapshot_matches_the_daemon(
    server: Server, daemon: Daemon, study: str
) -> None:
    def same() -> bool:
        status, _, body = server.request("GET", "/api/snapshot", {"X-Mosaic-Token": server.token})
        assert status == 200
        snap = json.loads(body)
        reply = daemon.request("status", limit=0)
        return (
            snap["daemon"]["paused"] == reply["paused"]
            and [w["id"] for w in snap["workers"]] == [w["id"] for w in reply["workers"]]
            and snap["studies"][study]["counts"] == reply["studies"][0]["counts"]
        )

    wait_until(same, timeout=5, message="the snapshot agrees with `status`")

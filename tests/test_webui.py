"""gpuctld's web page (runtime.webui): who may see what, signing in, escaping, the plots; and
the page of a live gpuctld in a real headless browser (Debian's Chromium), with no console
errors."""

from __future__ import annotations

import io
import shutil
import subprocess
import urllib.parse
from dataclasses import replace
from datetime import timedelta
from wsgiref.util import setup_testing_defaults

import pytest

from gpuctl.api.auth import SessionBook
from gpuctl.core.plugins import build_policy
from gpuctl.runtime.clock import FakeClock
from gpuctl.runtime.controller import Controller
from gpuctl.runtime.logstore import LogStore
from gpuctl.runtime.webui import COOKIE, History, Sources, WebUi
from gpuctl.store.memory import MemoryStore
from tests.auth_rig import Tokens, guard_for
from tests.test_controller import h100_node, training


@pytest.fixture
def site(tmp_path):
    store = MemoryStore()
    ctl = Controller(
        store, FakeClock(), build_policy("default"), LogStore(tmp_path / "l", max_bytes_per_rank=1)
    )
    sources = Sources(
        nodes=store.list_nodes,
        active=ctl.active_jobs,
        leases=store.list_leases,
        usage=ctl.node_usage,
        events=lambda job_id: store.list_events("job", str(job_id)),
        now=ctl.clock.now,
        kept=lambda: {x.id: "warm pool (1 of 1 kept)" for x in store.list_leases()},
    )
    history = History(sources)
    guard = guard_for(ctl)
    ui = WebUi(sources, history, auth=guard.auth, sessions=SessionBook(), secure=False)
    ui.ctl, ui.tokens = ctl, Tokens(ctl)  # type: ignore[attr-defined]
    yield ui
    store.close()


def call(app, method: str, path: str, *, body: bytes = b"", cookie: str = ""):
    environ: dict = {"REQUEST_METHOD": method, "PATH_INFO": path}
    setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    if cookie:
        environ["HTTP_COOKIE"] = f"{COOKIE}={cookie}"
    got: dict = {}

    def start_response(status, headers):
        got["status"], got["headers"] = status, dict(headers)

    text = b"".join(app(environ, start_response)).decode()
    return got["status"], got["headers"], text


def sign_in(ui, token: str) -> str:
    status, headers, _ = call(
        ui, "POST", "/ui/login", body=urllib.parse.urlencode({"token": token}).encode()
    )
    assert status.startswith("303"), status
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/ui" in cookie
    return cookie.split(";")[0].split("=", 1)[1]


def test_signing_in_takes_a_persons_token_and_nothing_else(site):
    status, headers, _ = call(site, "GET", "/ui")
    assert status.startswith("303") and headers["Location"] == "/ui/login"
    status, headers, text = call(site, "GET", "/ui/login")
    assert status == "200 OK" and "<form method=post" in text
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for token in ("", "gpuctl.nope.nope", site.tokens.node("gpu-1")):
        body = urllib.parse.urlencode({"token": token}).encode()
        status, _, text = call(site, "POST", "/ui/login", body=body)
        assert status.startswith("401") and "not valid" in text
    big = b"token=" + b"x" * 20_000
    assert call(site, "POST", "/ui/login", body=big)[0].startswith("413")
    assert call(site, "GET", "/ui", cookie="made-up")[0].startswith("303")
    cookie = sign_in(site, site.tokens.user("alice"))
    assert call(site, "GET", "/ui", cookie=cookie)[0] == "200 OK"
    assert call(site, "POST", "/ui", cookie=cookie)[0].startswith("405")  # read-only


def test_people_see_what_the_api_shows_them_escaped(site):
    ctl = site.ctl
    ctl.register_node(h100_node("a"))
    mine = ctl.submit(replace(training(nodes=1, gpus=8), owner="alice", name="mine"))
    theirs = ctl.submit(replace(training(nodes=1, gpus=8), owner="bob", name="theirs"))
    ctl.run_cycle()  # mine runs, theirs waits
    waiting = ctl.store.get_job(theirs.id)
    ctl.write_jobs([replace(waiting, reason="<script>alert(1)</script> no room")], [])
    alice = sign_in(site, site.tokens.user("alice"))
    _, _, page = call(site, "GET", "/ui", cookie=alice)
    assert "mine" in page and "theirs" not in page
    assert "Leases" not in page and "$/h" not in page  # dollars are operators'
    assert 'class=gpu style="background:hsl(' in page  # a's GPUs held, in the map
    assert call(site, "GET", f"/ui/jobs/{theirs.id}", cookie=alice)[0].startswith("404")
    status, _, detail = call(site, "GET", f"/ui/jobs/{mine.id}", cookie=alice)
    assert status == "200 OK" and "Placement" in detail and "Submitted" in detail
    olga = sign_in(site, site.tokens.user("olga"))  # an operator
    _, _, page = call(site, "GET", "/ui", cookie=olga)
    assert "theirs" in page and "<h2>Leases</h2>" in page and "$24.00" in page
    assert "warm pool (1 of 1 kept)" in page  # why the lease keeper keeps it
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; no room" in page
    assert call(site, "GET", "/ui/jobs/999", cookie=olga)[0].startswith("404")
    assert call(site, "GET", "/ui/jobs/" + "9" * 5000, cookie=olga)[0].startswith("404")
    assert call(site, "GET", "/ui/nothing", cookie=olga)[0].startswith("404")


def test_the_day_is_plotted_from_samples(site):
    site.ctl.register_node(h100_node("a"))
    olga = sign_in(site, site.tokens.user("olga"))
    assert "collecting" in call(site, "GET", "/ui", cookie=olga)[2]
    site.ctl.submit(training(nodes=1, gpus=8))
    site.ctl.run_cycle()  # runs, on all of a
    for _ in range(3):
        site.ctl.submit(training(nodes=1, gpus=8))  # waits for a
        site.history.sample()
        site.ctl.clock.advance(timedelta(minutes=1))
    samples = site.history.samples()
    assert [s.pending for s in samples] == [1, 2, 3]
    assert samples[0].paid_per_hour == 24.0 and samples[0].gpus_allocated == 8
    page = call(site, "GET", "/ui", cookie=olga)[2]
    assert page.count("<polyline") == 4 and "now 3, max 3, over 2m" in page


# -- a live gpuctld in a real browser -----------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_the_page_of_a_live_gpuctld_renders_in_chromium_without_console_errors(tmp_path):
    from gpuctl.demo import INFERENCE_NODES, TRAINING_NODES
    from gpuctl.testbed import LocalCluster
    from tests.test_e2e import wait_until

    cluster = LocalCluster(tmp_path / "cluster", metrics=True)
    try:
        cluster.start_daemon()
        for spec in (TRAINING_NODES[0], INFERENCE_NODES[0]):
            cluster.start_agent(spec)
        wait_until(lambda: "infer-1" in cluster.gpuctl("nodes").stdout, what="the nodes")
        cluster.gpuctl(
            "submit", "--kind", "inference", "--replicas", "2", "--gpu-share", "0.5",
            "--name", "chat", "--", "sleep", "60",
        )  # fmt: skip
        for name in ("hog", "big"):  # the first takes train-1, the second waits for it
            cluster.gpuctl(
                "submit", "--kind", "training", "--nodes", "1", "--gpus-per-node", "8",
                "--name", name, "--", "sleep", "60",
            )  # fmt: skip
        made = cluster.gpuctl("token", "create", "--description", "browser").stdout
        token = next(w for w in made.split() if w.startswith("gpuctl."))
        base = f"http://127.0.0.1:{cluster.metrics_port}"
        # A page that signs in as a person would: the form, posted; then the browser
        # follows the redirect to /ui with its session cookie.
        login = tmp_path / "login.html"
        login.write_text(
            '<!doctype html><html><body onload="document.forms[0].submit()">'
            f'<form method=post action="{base}/ui/login">'
            f'<input name=token value="{token}"></form></body></html>'
        )
        browse = [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000",
            "--window-size=1400,1200",
        ]  # fmt: skip
        for _ in range(3):
            # Headless Chromium sometimes dumps the page before the sign-in's redirect lands
            # (its virtual time runs while the POST is in flight): then it is asked again.
            dom = subprocess.run(
                [*browse, "--dump-dom", login.as_uri()], capture_output=True, text=True, timeout=90
            )
            if "signed in as" in dom.stdout:
                break
        assert "<h2>Nodes</h2>" in dom.stdout, dom.stderr[-2000:]
        assert "infer-1" in dom.stdout and "train-1" in dom.stdout
        assert "chat" in dom.stdout and "hog" in dom.stdout  # running
        assert "Queue (1: 1 resources)" in dom.stdout and "big" in dom.stdout  # and why not
        console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
        assert console == [], console
    finally:
        cluster.stop_all()

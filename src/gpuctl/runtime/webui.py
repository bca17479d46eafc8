"""gpuctld's read-only web page (`/ui`), for a site without Grafana: the queue with what each
job waits for, the nodes with their measured profiles and a GPU-by-GPU map of what runs where,
each job's placement and why, the leases, and the last day of queue, GPUs and dollars as plots.

Served beside /metrics (runtime.exposition), with the API's rules: a person signs in with an
API token (`gpuctl token create`), which becomes a browser session (an HttpOnly cookie for
this path only, as short-lived as the API's own sessions); they see what the API would show
them (their own jobs, or every job for operators; leases and dollars for operators).
Everything shown is escaped; the page loads nothing from elsewhere and runs no script.
"""

from __future__ import annotations

import html
import threading
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from typing import Protocol

from gpuctl.core.cost import charged_now, lease_dollars, prices_of
from gpuctl.core.errors import GpuctlError
from gpuctl.core.fleetstats import (
    LIVE_LEASES,
    fragmented_gpus,
    gpu_states,
    paid_per_hour,
    reason_class,
    views_now,
)
from gpuctl.core.model import Job, JobState, Node, NodeLease, NodeState
from gpuctl.core.text import age, job_size
from gpuctl.core.trust import Permission, Principal

COOKIE = "gpuctl_ui"
SAMPLE_EVERY_S = 60.0
SAMPLES = 24 * 60  # a day at one a minute
MAX_FORM_BYTES = 16 * 1024
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'"


class Credentials(Protocol):
    """Who a token is (the API's Authenticator)."""

    def principal_of(self, credential: str) -> Principal: ...


class Sessions(Protocol):
    """Short-lived sessions for people already known (the API's SessionBook)."""

    def issue(self, principal: Principal) -> str: ...

    def lookup(self, text: str) -> Principal | None: ...


@dataclass(frozen=True, slots=True)
class Sample:
    at: datetime
    pending: int
    running: int
    gpus_allocated: float
    gpus: float
    fragmented: float
    paid_per_hour: float
    charged_per_hour: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Sources:
    """What the page reads: gpuctld's store and controller, as callables."""

    nodes: Callable[[], Sequence[Node]]
    active: Callable[[], Sequence[Job]]
    leases: Callable[[], Sequence[NodeLease]]
    usage: Callable[[], Mapping[str, Mapping[int, tuple[int, list[int]]]]]  # node_usage
    events: Callable[[int], Sequence]  # a job's events
    now: Callable[[], datetime]
    kept: Callable[[], Mapping[str, str]] = dict  # idle leases the last cycle kept -> why


def measure(
    now: datetime, nodes: Sequence[Node], jobs: Sequence[Job], leases: Sequence[NodeLease]
) -> Sample:
    """The figures of one moment (what the plots draw)."""
    views, pending = views_now(nodes, jobs, now)
    states = gpu_states(views)
    return Sample(
        at=now,
        pending=sum(j.state is JobState.PENDING for j in jobs),
        running=sum(j.state is not JobState.PENDING for j in jobs),
        gpus_allocated=sum(n for (_, s), n in states.items() if s == "allocated"),
        gpus=sum(states.values()),
        fragmented=fragmented_gpus(views, pending),
        paid_per_hour=sum(paid_per_hour(leases).values()),
        charged_per_hour=sum(rate for _, rate in charged_now(jobs, prices_of(nodes))),
    )


class History:
    """The last day of samples, one a minute (kept in memory: a restarted gpuctld starts over;
    Prometheus keeps the long history)."""

    def __init__(self, sources: Sources, *, keep: int = SAMPLES) -> None:
        self.sources = sources
        self._samples: deque[Sample] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def sample(self) -> None:
        src = self.sources
        taken = measure(src.now(), src.nodes(), src.active(), src.leases())
        with self._lock:
            self._samples.append(taken)

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)


class WebUi:
    """The WSGI application under /ui."""

    def __init__(
        self,
        sources: Sources,
        history: History,
        *,
        auth: Credentials,
        sessions: Sessions,
        secure: bool,
    ) -> None:
        self.sources = sources
        self.history = history
        self.auth = auth
        self.sessions = sessions
        self.secure = secure  # served over TLS: the cookie is Secure

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/ui/login":
            return self._login(environ, start_response, method)
        who = self._who(environ)
        if who is None:
            return _redirect(start_response, "/ui/login")
        if method != "GET":
            return _page(start_response, "405 Method Not Allowed", "gpuctl", "<p>read-only</p>")
        if path in ("/ui", "/ui/"):
            return _page(start_response, "200 OK", "gpuctl", self._overview(who))
        job_id = path[len("/ui/jobs/") :]
        if path.startswith("/ui/jobs/") and job_id.isdigit() and len(job_id) <= 18:
            body = self._job(who, int(job_id))
            if body is None:
                return _page(start_response, "404 Not Found", "gpuctl", "<p>no such job</p>")
            return _page(start_response, "200 OK", "gpuctl: job", body)
        return _page(start_response, "404 Not Found", "gpuctl", "<p>not found</p>")

    # -- who is asking ----------------------------------------------------------------------

    def _who(self, environ: dict) -> Principal | None:
        cookie = SimpleCookie()
        try:
            cookie.load(environ.get("HTTP_COOKIE", ""))
        except Exception:  # a malformed header from a hostile client: not signed in
            return None
        morsel = cookie.get(COOKIE)
        return self.sessions.lookup(morsel.value) if morsel is not None else None

    def _login(self, environ: dict, start_response: Callable, method: str) -> Iterable[bytes]:
        if method == "GET":
            return _page(start_response, "200 OK", "gpuctl: sign in", _LOGIN.format(error=""))
        if method != "POST":
            return _page(start_response, "405 Method Not Allowed", "gpuctl", "<p>no</p>")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_FORM_BYTES:
            return _page(start_response, "413 Content Too Large", "gpuctl", "<p>too large</p>")
        form = urllib.parse.parse_qs(environ["wsgi.input"].read(length).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        try:
            who = self.auth.principal_of(token) if token else None
        except GpuctlError:
            who = None
        if who is None or who.role.value == "node":
            error = '<p class="err">That token is not valid here.</p>'
            return _page(start_response, "401 Unauthorized", "gpuctl", _LOGIN.format(error=error))
        session = self.sessions.issue(who)
        flags = "; HttpOnly; SameSite=Lax; Path=/ui" + ("; Secure" if self.secure else "")
        start_response(
            "303 See Other",
            [("Location", "/ui"), ("Set-Cookie", f"{COOKIE}={session}{flags}"), *_HEADERS],
        )
        return [b""]

    # -- pages ------------------------------------------------------------------------------

    def _visible(self, who: Principal, jobs: Iterable[Job]) -> list[Job]:
        if who.can(Permission.JOBS_ALL):
            return list(jobs)
        return [j for j in jobs if j.spec.owner == who.name]

    def _overview(self, who: Principal) -> str:
        now = self.sources.now()
        every_node = self.sources.nodes()
        nodes = [n for n in every_node if n.state is not NodeState.RELEASED]
        everything = self.sources.active()
        leases = self.sources.leases()
        jobs = self._visible(who, everything)
        samples = self.history.samples()
        now_sample = measure(now, every_node, everything, leases)
        money = who.can(Permission.COST_ALL)
        parts = [
            f"<p class=me>signed in as {_e(who.name)} ({_e(who.role.value)})</p>",
            _cards(now_sample, money),
            "<h2>Over the last day</h2>",
            "<div class=plots>",
            _plot("Jobs pending", [(s.at, s.pending) for s in samples], "#d97706"),
            _plot("GPUs allocated", [(s.at, s.gpus_allocated) for s in samples], "#2563eb"),
            _plot("Fragmented GPUs", [(s.at, s.fragmented) for s in samples], "#7c3aed"),
        ]
        if money:
            parts.append(
                _plot("Leases, $/h", [(s.at, s.paid_per_hour) for s in samples], "#059669")
            )
        parts.append("</div>")
        parts.append(_queue(jobs, now))
        parts.append(_running(jobs, now))
        parts.append(_nodes(nodes, self.sources.usage(), now))
        if money:
            parts.append(_leases(leases, self.sources.kept(), now))
        return "\n".join(parts)

    def _job(self, who: Principal, job_id: int) -> str | None:
        job = next((j for j in self._visible(who, self.sources.active()) if j.id == job_id), None)
        if job is None:
            return None
        now = self.sources.now()
        spec = job.spec
        rows = [
            ("State", job.state.value),
            ("Kind", spec.kind.value),
            ("Owner", spec.owner),
            ("Queue", spec.queue),
            ("Priority", spec.priority),
            ("Asks for", _asks(job)),
            ("Submitted", _when(job.created_at, now)),
            ("Started", _when(job.started_at, now)),
            ("Reason", job.reason or "-"),
        ]
        parts = [f"<p><a href=/ui>&larr; overview</a></p><h2>Job {job.id} {_e(spec.name)}</h2>"]
        parts.append(_table(["", ""], rows))
        if job.placement is not None:
            parts.append(f"<h3>Placement</h3><p class=why>{_e(job.placement.reason)}</p>")
            parts.append(
                _table(
                    ["RANK", "NODE", "GPUS", "SHARE", "STATE"],
                    [
                        (
                            r.rank,
                            r.node_id,
                            ",".join(map(str, r.gpu_indices)),
                            f"{r.gpu_milli / 1000:g}",
                            r.state.value,
                        )
                        for r in job.placement.ranks
                    ],
                )
            )
        events = self.sources.events(job.id)
        if events:
            parts.append("<h3>Events</h3>")
            parts.append(
                _table(
                    ["WHEN", "TYPE", "MESSAGE"],
                    [(_when(e.time, now), e.type, e.message) for e in events[-30:]],
                )
            )
        return "\n".join(parts)


# -- pieces of a page ----------------------------------------------------------------------

_HEADERS = [
    ("Content-Security-Policy", _CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#111;background:#fafafa}
h1{font-size:20px;margin:0 0 .2em}h2{font-size:16px;margin:1.4em 0 .4em}h3{font-size:14px}
table{border-collapse:collapse;background:#fff;margin:.3em 0}
td,th{padding:3px 8px;border-bottom:1px solid #e5e5e5;text-align:left;vertical-align:top}
th{font-size:12px;color:#555}.me{color:#555;font-size:12px}.why{color:#333}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#fff;border:1px solid #e5e5e5;
padding:8px 14px;border-radius:6px}.card b{display:block;font-size:20px}
.plots{display:flex;gap:12px;flex-wrap:wrap}.plot{background:#fff;border:1px solid #e5e5e5;
border-radius:6px;padding:6px}.gpus{white-space:nowrap}.gpu{display:inline-block;width:14px;
height:14px;margin:0 2px 0 0;border-radius:2px;border:1px solid #bbb;vertical-align:middle}
.free{background:#fff}.err{color:#b91c1c}.st-pending{color:#b45309}.st-running{color:#047857}
"""
_LOGIN = """<h2>Sign in</h2>{error}
<form method=post action=/ui/login><p>An API token (<code>gpuctl token create</code>):</p>
<p><input name=token type=password size=60 autocomplete=off autofocus>
<button type=submit>Sign in</button></p></form>"""


def _page(start_response: Callable, status: str, title: str, body: str) -> list[bytes]:
    text = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width">'
        "<meta http-equiv=refresh content=15>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>gpuctl</h1>{body}</body></html>"
    ).encode()
    start_response(
        status,
        [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Length", str(len(text))),
            *_HEADERS,
        ],
    )
    return [text]


def _redirect(start_response: Callable, where: str) -> list[bytes]:
    start_response("303 See Other", [("Location", where), *_HEADERS])
    return [b""]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], raw: int = -1) -> str:
    """An HTML table; the cell in column `raw` is HTML already (made here), the rest escaped."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers) if any(headers) else ""
    body = "".join(
        "<tr>"
        + "".join(f"<td>{c if i == raw else _e(c)}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table>{'<tr>' + head + '</tr>' if head else ''}{body}</table>"


def _cards(s: Sample, money: bool) -> str:
    cards = [
        ("Pending", s.pending),
        ("Running", s.running),
        ("GPUs allocated", f"{s.gpus_allocated:g} of {s.gpus:g}"),
        ("Fragmented GPUs", f"{s.fragmented:g}"),
    ]
    if money:
        cards += [
            ("Leases", f"${s.paid_per_hour:,.2f}/h"),
            ("Charged to jobs", f"${s.charged_per_hour:,.2f}/h"),
        ]
    return (
        "<div class=cards>"
        + "".join(f"<div class=card>{_e(name)}<b>{_e(value)}</b></div>" for name, value in cards)
        + "</div>"
    )


def _plot(title: str, points: list[tuple[datetime, float]], colour: str) -> str:
    """An SVG line of the samples, with the last value and the range in words."""
    width, height, pad = 300, 90, 4
    if len(points) < 2:
        return (
            f"<div class=plot><b>{_e(title)}</b><br><small>collecting: a sample a minute"
            "</small></div>"
        )
    t0, t1 = points[0][0], points[-1][0]
    span = max((t1 - t0).total_seconds(), 1.0)
    top = max(max(v for _, v in points), 1e-9)
    xy = " ".join(
        f"{pad + (t - t0).total_seconds() / span * (width - 2 * pad):.1f},"
        f"{height - pad - v / top * (height - 2 * pad):.1f}"
        for t, v in points
    )
    return (
        f"<div class=plot><b>{_e(title)}</b> <small>now {points[-1][1]:g}, "
        f"max {top:g}, over {age(span)}</small><br>"
        f'<svg width={width} height={height} role=img aria-label="{_e(title)}">'
        f'<polyline fill=none stroke="{colour}" stroke-width=1.5 points="{xy}"/></svg></div>'
    )


def _gpu_map(node: Node, usage: Mapping[int, tuple[int, list[int]]]) -> str:
    """A square a GPU: white when free, else in its first job's colour, filled as far as it
    is held (`usage`: GPU index -> milli held and the jobs holding it)."""
    cells = []
    for g in node.profile.gpus:
        milli, held = usage.get(g.index, (0, []))
        if not held:
            cells.append(f'<span class="gpu free" title="GPU {g.index}: free"></span>')
            continue
        fill = f"hsl({held[0] * 47 % 360},65%,55%)"
        style = (
            f"background:{fill}"
            if milli >= 1000
            else f"background:linear-gradient(to top,{fill} {milli / 10:.0f}%,#fff 0)"
        )
        who = f"{', '.join(f'job {j}' for j in held)} ({min(milli, 1000) / 1000:g} GPU held)"
        cells.append(f'<span class=gpu style="{style}" title="GPU {g.index}: {_e(who)}"></span>')
    return "<span class=gpus>" + "".join(cells) + "</span>"


def _nodes(nodes: Sequence[Node], usage: Mapping, now: datetime) -> str:
    rows = []
    for n in sorted(nodes, key=lambda x: x.id):
        p = n.profile
        net = f"{p.network.kind.value} {p.network.total_gbps:g} Gb/s" if p.network.ports else "-"
        heard = f"{(now - n.last_heartbeat).total_seconds():.0f}s ago" if n.last_heartbeat else "-"
        rows.append(
            (
                n.id,
                n.state.value,
                f"{len(p.gpus)}x {p.gpu_model}" if p.gpus else "-",
                f"{p.hbm_gbps:g}",
                f"{p.nvlink_gbps:g}",
                net,
                n.fabric or "-",
                f"${n.price_per_hour:.2f}",
                heard,
                _gpu_map(n, usage.get(n.id, {})),
            )
        )
    return "<h2>Nodes</h2>" + _table(
        ["NODE", "STATE", "GPUS", "HBM GB/s", "NVLINK GB/s", "NETWORK", "FABRIC", "$/H", "HEARD",
         "GPU MAP"],
        rows,
        raw=9,
    )  # fmt: skip


def _job_link(job: Job) -> str:
    return f"<a href=/ui/jobs/{job.id}>{job.id}</a>"


def _queue(jobs: Sequence[Job], now: datetime) -> str:
    pending = sorted(
        (j for j in jobs if j.state is JobState.PENDING),
        key=lambda j: (-j.spec.priority, j.id),
    )
    counts = Counter(reason_class(j.reason) for j in pending)
    summary = ", ".join(f"{n} {c}" for c, n in counts.most_common()) or "empty"
    rows = [
        (
            _job_link(j),
            j.spec.name or "-",
            j.spec.kind.value,
            j.spec.owner,
            j.spec.queue,
            _asks(j),
            _age(j.created_at, now),
            reason_class(j.reason),
            j.reason or "waiting for the next cycle",
        )
        for j in pending[:200]
    ]
    more = f"<p>and {len(pending) - 200} more</p>" if len(pending) > 200 else ""
    return (
        f"<h2>Queue ({len(pending)}: {_e(summary)})</h2>"
        + _table(
            ["JOB", "NAME", "KIND", "USER", "QUEUE", "ASKS FOR", "WAITING", "FOR", "WHY"],
            rows,
            raw=0,
        )
        + more
    )


def _running(jobs: Sequence[Job], now: datetime) -> str:
    running = [j for j in jobs if j.state is not JobState.PENDING]
    rows = [
        (
            _job_link(j),
            j.spec.name or "-",
            j.spec.kind.value,
            j.spec.owner,
            j.state.value,
            _age(j.started_at, now),
            ", ".join(sorted(set(j.placement.node_ids))) if j.placement else "-",
            j.placement.reason if j.placement else "-",
        )
        for j in running[:200]
    ]
    return f"<h2>Running ({len(running)})</h2>" + _table(
        ["JOB", "NAME", "KIND", "USER", "STATE", "FOR", "NODES", "WHY THERE"], rows, raw=0
    )


def _leases(leases: Sequence[NodeLease], kept: Mapping[str, str], now: datetime) -> str:
    live = [x for x in leases if x.state in LIVE_LEASES]
    rows = [
        (
            x.id,
            x.provider,
            x.sku or "-",
            x.node_id or "-",
            x.state.value,
            f"${x.price_per_hour:.2f}",
            f"${lease_dollars(x, now=now):,.2f}",
            f"job {x.for_job_id}" if x.for_job_id else "-",
            kept.get(x.id, "-"),
        )
        for x in live
    ]
    return "<h2>Leases</h2>" + _table(
        ["LEASE", "PROVIDER", "SKU", "NODE", "STATE", "$/H", "SO FAR", "FOR", "KEPT IDLE"], rows
    )


def _asks(job: Job) -> str:
    model = job.spec.gpu_model.replace("|", " or ")
    return job_size(job.spec) + (f" of {model}" if model else "")


def _age(then: datetime | None, now: datetime) -> str:
    return age((now - then).total_seconds()) if then is not None else "-"


def _when(then: datetime | None, now: datetime) -> str:
    if then is None:
        return "-"
    return f"{then.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z ({_age(then, now)} ago)"

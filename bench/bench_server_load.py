"""The server's part of the load target, without browsers: N sessions speaking Bokeh's protocol as pages do.

    python bench/bench_server_load.py                 # 10 sessions for 5 minutes on the demo
    python bench/bench_server_load.py --sessions 20 --minutes 2
    python bench/bench_server_load.py --quick         # 3 sessions for 1 minute

``bench/bench_load.py`` measures what a user sees: ten Chromium pages on the same 2 cores as the server. There
the pages themselves use three quarters of the machine (``docs/serving-performance.md``): one page alone
needs about 0.2 of a core of Chromium with 3-s pauses, so ten need more than the machine has, and their
latency says as much about the benchmark's browsers as about the server. In a lab the browsers run on the
users' own machines. This benchmark gives the server the machine: each session is a small Python client that
does what a page's BokehJS does on the wire, and nothing more:

- ``GET /`` (the server builds the session's document and its HTML page) and the static files the page names,
- the websocket with the page's session token, the document pulled (``PULL-DOC``), ``document_ready`` sent,
- a query: the ``enter-pressed`` event of the query box (what Enter sends), timed until the session's document
  holds the colour note for the query (its PATCH-DOC messages received and applied),
- zero-shot labels and a top-vs-bottom DE: a tab switch (``Tabs.active``), a ``button_click``, timed until the
  result table's data arrives, and back to the query tab,

in the cycle of ``bench_load.py`` (all pages requested at once, the minutes counted once the last is open, or
from the first request with ``--query-while-opening``; query; zero-shot after the 1st, 5th, ... query; DE after
the 3rd, 7th, ...; a pause of ``--think`` seconds on average before each action; no box selection). Nothing is
drawn: the latencies are the server's (compute, Bokeh messages, the network stack) plus the client's decoding, which
is small (its process's CPU is printed). Printed: errors, isolation failures (another session's tag in the
colour note or query history), p50/p95 latency of queries (also per minute), of zero-shot and of DE runs,
the CPU seconds of the server and of the clients, the server's RSS at the start and the end.

The latency target of issue 18 (p95 <= 2 s for 10 sessions on 2 cores) is about what users see; this
benchmark says how much of it the server can meet, and from how many sessions on it cannot.
"""
from __future__ import annotations

import argparse
import asyncio
import html
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_load as bl  # noqa: E402 - the same server start, queries, tags and CPU readings

# the Python classes of every model the page holds must be imported for the client to decode the document
import importlib  # noqa: E402
import pkgutil  # noqa: E402

import holoviews.plotting.bokeh  # noqa: E402,F401
import panel.models  # noqa: E402
import app.browser_fixes  # noqa: E402,F401 - the page's own component (its model is Lexicell's)
from bokeh.document import Document  # noqa: E402
from bokeh.client.websocket import WebSocketClientConnectionWrapper  # noqa: E402
from bokeh.core.serialization import Serializable  # noqa: E402
from bokeh.document.events import MessageSentEvent, ModelChangedEvent  # noqa: E402
from bokeh.models import Button, ColumnDataSource, Select, Tabs, TextAreaInput, TextInput  # noqa: E402
from bokeh.protocol import Protocol  # noqa: E402
from bokeh.protocol.receiver import Receiver  # noqa: E402
from tornado.httpclient import AsyncHTTPClient  # noqa: E402
from tornado.websocket import websocket_connect  # noqa: E402

for _mod in pkgutil.iter_modules(panel.models.__path__):
    try:
        importlib.import_module(f"panel.models.{_mod.name}")
    except ImportError:  # a model of an optional package the page cannot hold then
        pass

HISTORY = "History (click to go back)"
LABELS = "Labels (one per line, editable)"
_TOKEN = re.compile(r'"token":\s*"([^"]+)"')
_STATIC = re.compile(r'<(?:script[^>]*\ssrc|link[^>]*\shref)="((?:\./)?static/[^"]+)"')
#: the column that marks each run's result table
DONE_COLUMN = {"zero-shot": "mean_confidence", "DE": "logfoldchange"}


_PROPS: dict[type, set[str]] = {}


def _has(model, prop: str) -> bool:
    """Whether ``model`` has the Bokeh property ``prop`` (``getattr`` on a missing one costs a fuzzy search for
    the nearest name in Bokeh, tens of microseconds per model)."""
    cls = type(model)
    if cls not in _PROPS:
        _PROPS[cls] = set(cls.properties())
    return prop in _PROPS[cls]


class _UIEvent(Serializable):
    """A UI event as BokehJS encodes it (``{"type": "event", "name": ..., "values": ...}``); the server decodes
    it into its ``bokeh.events`` class by name (Panel's ``enter-pressed`` included)."""

    def __init__(self, name: str, values: dict):
        self.name, self.values = name, values

    def to_serializable(self, serializer):
        return {"type": "event", "name": self.name, "values": serializer.encode(self.values)}


class ProtocolSession:
    """One session as a browser page holds it, on the wire: see the module's docstring.

    Parameters
    ----------
    url : str
        The served app's page, e.g. ``http://127.0.0.1:5006/``.
    """

    def __init__(self, url: str):
        self.url = url
        self.doc = Document()
        self.protocol = Protocol()
        self.receiver = Receiver(self.protocol)
        self.changed = asyncio.Condition()
        self.table_changes: dict[str, int] = {key: 0 for key in DONE_COLUMN.values()}
        self.ws = None
        self.reader: asyncio.Task | None = None
        self.closed_reason: str | None = None
        self.default_labels: list[str] | None = None  # the zero-shot tab's label list as first shown
        self._note = None  # the colour note's model, once found
        self.patches = 0  # PATCH-DOC messages received since the document was pulled

    # -- connection ------------------------------------------------------------------------------------------
    async def open(self, timeout: float) -> None:
        """Load the page (HTML and its static files), connect, pull the document and announce it ready."""
        client = AsyncHTTPClient()
        page = (await client.fetch(self.url, request_timeout=timeout)).body.decode()
        token = _TOKEN.search(page)
        if token is None:
            raise RuntimeError("the page holds no session token")
        for path in dict.fromkeys(_STATIC.findall(page)):  # the files the page names (a browser fetches them)
            await client.fetch(self.url + path.removeprefix("./"), request_timeout=timeout)
        ws_url = self.url.replace("http://", "ws://").replace("https://", "wss://") + "ws"
        ws = await websocket_connect(ws_url, subprotocols=["bokeh", token.group(1)], max_message_size=1 << 30)
        self.ws = WebSocketClientConnectionWrapper(ws)  # the write lock Bokeh's Message.send expects
        ack = await asyncio.wait_for(self._read(), timeout)
        if ack is None or ack.msgtype != "ACK":
            raise RuntimeError(f"expected ACK, got {ack and ack.msgtype}")
        req = self.protocol.create("PULL-DOC-REQ")
        await req.send(self.ws)
        while True:
            msg = await asyncio.wait_for(self._read(), timeout)
            if msg is None:
                raise RuntimeError("the server closed the websocket before sending the document")
            if msg.msgtype == "PULL-DOC-REPLY":
                msg.push_to_document(self.doc)
                # the server knows every model it sent: later patches refer to them by id (a browser's do;
                # otherwise each patch would carry the models it names whole, and the server warn)
                self.doc.models.flush_synced()
                break
        self.doc.on_change(self._on_change)
        self.reader = asyncio.ensure_future(self._read_loop())
        await self.send_event("document_ready", {})

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.ws is not None:
            self.ws.close()

    async def _read(self):
        while True:
            fragment = await self.ws.read_message()
            if fragment is None:
                return None
            msg = await self.receiver.consume(fragment)
            if msg is not None:
                return msg

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await self._read()
                if msg is None:
                    self.closed_reason = "the server closed the websocket"
                    break
                if msg.msgtype == "PATCH-DOC":
                    self.patches += 1
                    msg.apply_to_document(self.doc, self)
                elif msg.msgtype == "ERROR":
                    self.closed_reason = f"the server answered ERROR: {msg.content}"
                async with self.changed:
                    self.changed.notify_all()
        except Exception as err:  # noqa: BLE001 - a message the client could not apply ends the session
            self.closed_reason = f"{type(err).__name__}: {str(err)[:200]}"
        async with self.changed:
            self.changed.notify_all()

    def _on_change(self, event) -> None:
        model = getattr(event, "model", None)
        if isinstance(model, ColumnDataSource):
            for key in self.table_changes:
                if key in model.data:
                    self.table_changes[key] += 1

    # -- what a page sends -----------------------------------------------------------------------------------
    async def send_event(self, name: str, values: dict) -> None:
        """A UI event as BokehJS sends it (``{"type": "event", "name": ..., "values": ...}``)."""
        event = MessageSentEvent(self.doc, "bokeh_event", _UIEvent(name, values))
        await self.protocol.create("PATCH-DOC", [event]).send(self.ws)

    async def set_property(self, model, attr: str, value) -> None:
        """A property changed in the page (``Tabs.active`` on a tab click)."""
        await self.set_properties(model, **{attr: value})

    async def set_properties(self, model, **values) -> None:
        """Properties changed in the page at once, in one message (a text box's ``value_input`` and ``value``
        when Enter is pressed)."""
        events = []
        for attr, value in values.items():
            setattr(model, attr, value)
            events.append(ModelChangedEvent(self.doc, model, attr, value))
        await self.protocol.create("PATCH-DOC", events).send(self.ws)

    async def wait_for(self, predicate, timeout: float) -> None:
        """Wait until ``predicate()`` holds for the session's document (checked after each applied message)."""
        async def until():
            async with self.changed:
                while not predicate():
                    if self.closed_reason:
                        raise RuntimeError(self.closed_reason)
                    await self.changed.wait()
        await asyncio.wait_for(until(), timeout)

    # -- what a page shows -----------------------------------------------------------------------------------
    def find(self, cls, **props):
        for m in self.doc.models:
            if isinstance(m, cls) and all(_has(m, k) and getattr(m, k) == v for k, v in props.items()):
                return m
        return None

    def texts(self) -> list[str]:
        """The text of every HTML-like model (Panel's Markdown and HTML panes, Bokeh's Div), unescaped."""
        return [html.unescape(m.text) for m in self.doc.models if _has(m, "text") and isinstance(m.text, str)]

    def colour_note(self) -> str | None:
        """The colour note's text (the model found once, again when its pane was rebuilt)."""
        note = self._note
        if note is None or note.document is None or "colour-note-text" not in note.text:
            note = self._note = next((m for m in self.doc.models if _has(m, "text") and isinstance(m.text, str)
                                      and "colour-note-text" in m.text), None)
        return None if note is None else re.sub(r"<[^>]+>", "", html.unescape(note.text))

    def history(self) -> str:
        select = self.find(Select, title=HISTORY)
        options = select.options if select is not None else []
        return "\n".join(o if isinstance(o, str) else " ".join(map(str, o)) for o in options)

    def main_tabs(self):
        for m in self.doc.models:
            if isinstance(m, Tabs) and any(p.title == "Zero-shot labels" for p in m.tabs):
                return m
        return None


class Stats:
    def __init__(self):
        self.latencies: list[float] = []
        self.times: list[float] = []
        self.runs: dict[str, list[float]] = {"zero-shot": [], "DE": []}
        self.errors: list[str] = []
        self.isolation: list[str] = []
        self.page_loads: list[float] = []


async def _query(s: ProtocolSession, text: str, timeout: float) -> float:
    box = s.find(TextInput, placeholder=bl.QUERY_BOX)
    if box is None:
        raise RuntimeError("no query box in the document")
    shown = text if len(text) <= 40 else text[:39] + "…"  # the colour note shortens long queries
    t0 = time.perf_counter()
    # as a page: the box's text (typed, then committed by Enter), then Enter's event
    await s.set_properties(box, value_input=text, value=text)
    await s.send_event("enter-pressed", {"model": box, "value_input": text})
    await s.wait_for(lambda: f"score: {shown}" in (s.colour_note() or ""), timeout)
    return time.perf_counter() - t0


async def _tab(s: ProtocolSession, title: str) -> None:
    tabs = s.main_tabs()
    index = next(i for i, p in enumerate(tabs.tabs) if p.title == title)
    if tabs.active != index:
        await s.set_property(tabs, "active", index)


async def _run(s: ProtocolSession, what: str, tab: str, label: str, timeout: float, run: int = 0) -> float:
    """Open ``tab``, click its ``label`` button (the tab's models arrive when it is first opened), wait for the
    result table, go back to the query tab; returns the seconds from the click to the table.

    The page sends nothing when a result equals the one shown, so each zero-shot run (``run``: 0, 1, ...) leaves
    out one of the default labels in turn (as a user trying label sets); each DE run follows a query of its own
    (the session's tag and count make every query text differ)."""
    await _tab(s, tab)
    await s.wait_for(lambda: s.find(Button, label=label) is not None, timeout)
    if what == "zero-shot":
        box = s.find(TextAreaInput, title=LABELS)
        if box is None:
            raise RuntimeError("no label list in the zero-shot tab")
        if s.default_labels is None:
            s.default_labels = [x for x in box.value.splitlines() if x.strip()]
        labels = list(s.default_labels)
        labels.pop(run % len(labels))
        await s.set_property(box, "value", "\n".join(labels))
    key = DONE_COLUMN[what]
    before = s.table_changes[key]
    t0 = time.perf_counter()
    await s.send_event("button_click", {"model": s.find(Button, label=label)})
    await s.wait_for(lambda: s.table_changes[key] > before, timeout)
    took = time.perf_counter() - t0
    await _tab(s, "Query")
    return took


def _check(s: ProtocolSession, idx: int, st: Stats, what: str) -> None:
    if any(bl.BAD_TEXT.search(t) for t in s.texts()):
        st.errors.append(f"session {idx:02d} {what}: 'Unexpected error' or 'Traceback' in the document")
    others = {int(m) for m in bl.TAG.findall(f"{s.history()} {s.colour_note() or ''}")} - {idx}
    if others:
        st.isolation.append(f"session {idx:02d} {what}: sees session(s) {sorted(others)}")


async def session(url: str, idx: int, opening: "bl.Opening", st: Stats, timeout: float, think: float) -> None:
    rng = random.Random(idx)
    s = ProtocolSession(url)

    async def pause():
        if think > 0:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * think)

    waited = False
    try:
        t0 = time.perf_counter()
        try:
            await s.open(timeout)
            await s.wait_for(lambda: s.find(TextInput, placeholder=bl.QUERY_BOX) is not None and s.main_tabs()
                             is not None, timeout)
            st.page_loads.append(time.perf_counter() - t0)
        finally:
            waited = True
            deadline = await opening.wait()  # (a session that failed to open still lets the others begin)
        n = 0
        runs = {"zero-shot": 0, "DE": 0}
        while time.time() < deadline:
            n += 1
            await pause()
            text = f"{rng.choice(bl.QUERIES)} (client {idx:02d} #{n})"
            try:
                st.latencies.append(await _query(s, text, timeout))
                st.times.append(time.time())
            except Exception as err:  # noqa: BLE001 - counted
                st.errors.append(f"session {idx:02d} query {text!r}: {type(err).__name__} {err}")
                continue
            _check(s, idx, st, f"query {n}")
            for what, when, tab, label in (("zero-shot", 1, "Zero-shot labels", "Label cells"),
                                           ("DE", 3, "DE + enrichment", "Run DE")):
                if n % 4 == when and time.time() < deadline:
                    await pause()
                    try:
                        st.runs[what].append(await _run(s, what, tab, label, timeout, runs[what] + idx))
                    except Exception as err:  # noqa: BLE001 - counted
                        st.errors.append(f"session {idx:02d} {what}: {type(err).__name__} {err}")
                        await _tab(s, "Query")
                    runs[what] += 1
    except Exception as err:  # noqa: BLE001
        st.errors.append(f"session {idx:02d}: {type(err).__name__}: {str(err)[:200]}")
    finally:
        if not waited:
            opening.arrived()
        await s.close()


async def _warm_up(url: str, timeout: float) -> None:
    """One session first (the model, the embeddings and the neighbour graph are loaded or built on first
    use): a query, retried until the embeddings are ready, and one zero-shot run."""
    s = ProtocolSession(url)
    try:
        await s.open(timeout)
        await s.wait_for(lambda: s.find(TextInput, placeholder=bl.QUERY_BOX) is not None, timeout)
        deadline = time.time() + timeout
        while True:
            try:
                await _query(s, "B cells", 10)
                break
            except asyncio.TimeoutError:
                if time.time() > deadline:
                    raise
        await _run(s, "zero-shot", "Zero-shot labels", "Label cells", timeout)
    finally:
        await s.close()


def _pct(values: list[float]) -> str:
    v = sorted(values)
    if not v:
        return "none"
    return f"p50 {statistics.median(v):.2f} s, p95 {bl._p95(v):.2f} s"


async def run(args) -> dict:
    """Serve the app, run the sessions, print the figures; returns them."""
    port = args.port or bl._free_port()
    url = f"http://127.0.0.1:{port}/"
    st = Stats()
    with tempfile.TemporaryDirectory(prefix="lexicell-server-load-") as save_dir:
        t0 = time.perf_counter()
        server = bl.start_server(args, port, save_dir)
        print(f"server pid {server.pid} up in {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            await _warm_up(url, args.first_timeout)
            print(f"first session, query and zero-shot done after {time.perf_counter() - t0:.1f} s", flush=True)
            await asyncio.sleep(2)
            rss = [("start", bl.rss_mb(server.pid))]
            meter, stop = bl.CpuMeter(server.pid), asyncio.Event()
            metering = asyncio.ensure_future(meter.run(stop))
            opening = bl.Opening(args.sessions, args.minutes * 60, together=not args.query_while_opening)
            await asyncio.gather(*(session(url, i, opening, st, args.timeout, args.think)
                                   for i in range(args.sessions)))
            stop.set()
            await metering
            await asyncio.sleep(args.settle)  # closed sessions are destroyed after Bokeh's unused lifetime
            rss.append(("end", bl.rss_mb(server.pid)))
        finally:
            bl.stop_server(server)
    lat = sorted(st.latencies)
    p95 = bl._p95(lat)
    print(f"\nprotocol sessions {args.sessions}, {args.minutes:g} min, think time {args.think:g} s; "
          f"cpu cores {os.cpu_count()}; no browser")
    print(f"queries {len(lat)}, zero-shot runs {len(st.runs['zero-shot'])}, DE runs {len(st.runs['DE'])}")
    print(f"errors {len(st.errors)}")
    for e in st.errors[:30]:
        print("   ", e)
    print(f"isolation failures {len(st.isolation)}")
    for e in st.isolation[:20]:
        print("   ", e)
    print(f"page load (GET / to the document pulled and built): {_pct(st.page_loads)}")
    print(f"query latency (enter-pressed sent -> the session's document holds the colour note): {_pct(lat)}")
    for minute, part in bl.per_minute(st.latencies, st.times, opening.began):
        print(f"    minute {minute}: {len(part)} queries, {_pct(part)}")
    for what, values in st.runs.items():
        print(f"{what} run (click -> result table): {_pct(values)}")
    cpu = meter.totals()
    wall = meter.t1 - meter.t0
    print(f"CPU while the sessions ran ({wall:.0f} s x {os.cpu_count()} cores = {wall * os.cpu_count():.0f} "
          f"CPU-s): " + ", ".join(f"{k.replace('benchmark (Python)', 'clients (Python)')} {v:.0f} s"
                                for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])))
    start, end = rss[0][1], rss[-1][1]
    print(f"server RSS start {start:.0f} MB, end {end:.0f} MB; growth {100 * (end - start) / start:+.1f} %")
    return dict(errors=st.errors, isolation=st.isolation, latencies=st.latencies, p95=p95, runs=st.runs,
                page_loads=st.page_loads, cpu=cpu, rss=rss)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10, help="sessions at once (default 10)")
    ap.add_argument("--minutes", type=float, default=5.0, help="duration (default 5)")
    ap.add_argument("--think", type=float, default=3.0, metavar="S",
                    help="a user's pause before each action, uniform in 0.5-1.5 x S seconds (default 3)")
    ap.add_argument("--quick", action="store_true", help="3 sessions for 1 minute")
    ap.add_argument("--query-while-opening", action="store_true",
                    help="each session acts as soon as its own page is open and the minutes count from the first "
                         "page's request (default: all pages are requested at once and the minutes begin when the "
                         "last is open)")
    bl.add_server_args(ap)
    ap.add_argument("--timeout", type=float, default=60, help="seconds one action may take (default 60)")
    ap.add_argument("--first-timeout", type=float, default=300, help="seconds the first session may take")
    ap.add_argument("--settle", type=float, default=45.0,
                    help="seconds to wait before the last RSS reading (default 45: Bokeh frees closed sessions "
                         "after 15-17 s, and ten at once took longer)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sessions, args.minutes = 3, 1.0
    return args


def main(argv=None) -> int:
    res = asyncio.run(run(parse_args(argv)))
    return 0 if not res["errors"] and not res["isolation"] else 1


if __name__ == "__main__":
    sys.exit(main())

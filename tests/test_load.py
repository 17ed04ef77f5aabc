"""A short load run (issue 18 item 4): three browser sessions at once on a served demo, each querying, labelling
zero-shot and running DE for 40 seconds. The full run (10 sessions, 5 minutes, latency and memory figures) is
``python bench/bench_load.py``; this one checks what must hold at any load: no errors or tracebacks in any
page, no session seeing another's query, every session answered."""
from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path

import pytest

pytest.importorskip("playwright.async_api")

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "bench_load"):
    """A benchmark module of ``bench/`` (not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_three_sessions_at_once_stay_correct_and_isolated(tmp_path):
    bl = _bench()
    if not Path(bl.CHROMIUM).exists():
        pytest.skip(f"no Chromium at {bl.CHROMIUM}")
    args = bl.parse_args(["--contexts", "3", "--minutes", "0.67", "--think", "1", "--settle", "2",
                          "--timeout", "90", "--server-log", str(tmp_path / "server.log")])
    res = asyncio.run(bl.run(args))
    log = (tmp_path / "server.log").read_text()
    assert res["errors"] == [], f"{res['errors']}\nserver log tail:\n{log[-3000:]}"
    assert res["isolation"] == []
    assert len(res["latencies"]) >= 6  # every session answered queries
    assert res["zero_shot"] >= 3 and res["de"] >= 1 and res["selections"] == 3  # each session box-selected
    assert _app_tracebacks(log) == []


def _app_tracebacks(log: str) -> list[str]:
    """Tracebacks in the server log other than Tornado's harmless ones for a browser tab closed mid-send."""
    import re

    blocks = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log)
    return [b[:2000] for b in blocks if "Traceback" in b
            and not ("WebSocketClosedError" in b or "StreamClosedError" in b)]


def test_the_load_check_reads_shadow_roots_and_finds_an_error_shown():
    """The load benchmark's one-call page check (``_PAGE_STATE``) finds the history menu, colour note and
    selection count inside shadow roots, as Bokeh's pages hold them, and an error message wherever it shows."""
    from playwright.sync_api import sync_playwright

    bl = _bench()
    if not Path(bl.CHROMIUM).exists():
        pytest.skip(f"no Chromium at {bl.CHROMIUM}")
    page_html = """<body><div id="a"></div><div id="b"></div><script>
      const a = document.getElementById('a').attachShadow({mode: 'open'});
      a.innerHTML = '<label for="h">History (click to go back)</label><select id="h">'
        + '<option>B cells (client 03 #2)</option><option>T cells (client 03 #1)</option></select>';
      const inner = document.createElement('div'); a.appendChild(inner);
      inner.attachShadow({mode: 'open'}).innerHTML =
        '<span class="colour-note-text">Colour: score: B cells (client 03 #2)</span>'
        + '<span class="selection-count-text"> 42 cells selected </span>';
    </script></body>"""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=bl.CHROMIUM, args=bl.ARGS)
        page = browser.new_page()
        page.set_content(page_html)
        clean = page.evaluate(bl._PAGE_STATE, bl.BAD_TEXT.pattern)
        page.evaluate("""() => { const b = document.getElementById('b').attachShadow({mode: 'open'});
                                  b.innerHTML = '<div class="alert">Unexpected error (ValueError): boom</div>'; }""")
        shown = page.evaluate(bl._PAGE_STATE, bl.BAD_TEXT.pattern)
        browser.close()
    assert clean == {"bad": False, "history": "B cells (client 03 #2)\nT cells (client 03 #1)",
                     "note": "Colour: score: B cells (client 03 #2)", "count": " 42 cells selected "}
    st = bl.Stats()
    asyncio.run(_check(bl, clean, st))
    assert st.errors == [] and st.isolation == []
    assert shown["bad"] is True
    st = bl.Stats()
    asyncio.run(_check(bl, shown, st, idx=4, selected="41 cells selected"))
    assert len(st.errors) == 1 and "Unexpected error" in st.errors[0]
    assert len(st.isolation) == 2  # client 04 sees client 03's queries, and another selection count


async def _check(bl, shown: dict, st, idx: int = 3, selected: str | None = "42 cells selected") -> None:
    class _Page:  # _check_page's one call to the page, answered with ``shown``
        async def evaluate(self, *_):
            return shown

    await bl._check_page(_Page(), idx, st, "query 1", selected)


# ---------------------------------------------------------------------- the server alone (bench/bench_server_load.py)
def test_protocol_sessions_at_once_stay_correct_and_isolated(tmp_path):
    """Three sessions of the browserless load benchmark (Bokeh's protocol, as a page speaks it) for 30 s: each
    loads the page, queries, labels zero-shot and runs DE; every action is answered, no error text reaches a
    session's document, none sees another's query, and the server logs no traceback."""
    sl = _bench("bench_server_load")
    args = sl.parse_args(["--sessions", "3", "--minutes", "0.5", "--think", "0.5", "--settle", "2",
                          "--timeout", "90", "--server-log", str(tmp_path / "server.log")])
    res = asyncio.run(sl.run(args))
    log = (tmp_path / "server.log").read_text()
    assert res["errors"] == [], f"{res['errors']}\nserver log tail:\n{log[-3000:]}"
    assert res["isolation"] == []
    assert len(res["page_loads"]) == 3 and len(res["latencies"]) >= 9
    assert len(res["runs"]["zero-shot"]) >= 3 and len(res["runs"]["DE"]) >= 1
    assert _app_tracebacks(log) == []
    assert "reference already known" not in log  # patches name the models the server sent by id


def test_the_protocol_check_finds_another_sessions_query_and_an_error():
    """The browserless benchmark's check reads the history menu and colour note of a session's document, and
    counts another session's tag there as an isolation failure and an error text as an error."""
    from bokeh.models import Div, Select

    sl = _bench("bench_server_load")
    s = sl.ProtocolSession("http://127.0.0.1:1/")
    note = Div(text='<span class="colour-note-text">Colour: <b>score: B cells (client 03 #2)</b></span>')
    history = Select(title=sl.HISTORY, options=["B cells (client 03 #2)", "T cells (client 03 #1)"])
    s.doc.add_root(note)
    s.doc.add_root(history)
    st = sl.Stats()
    sl._check(s, 3, st, "query 2")
    assert st.errors == [] and st.isolation == []
    assert s.colour_note() == "Colour: score: B cells (client 03 #2)"
    history.options = ["NK cells (client 05 #1)"] + history.options
    s.doc.add_root(Div(text="Unexpected error (ValueError): boom"))
    sl._check(s, 3, st, "query 3")
    assert len(st.errors) == 1 and st.isolation == ["session 03 query 3: sees session(s) [5]"]


def test_a_query_and_a_de_run_reach_the_page_in_one_or_two_messages(tmp_path):
    """``app.messages.combine_patch_messages`` and ``Job`` applying results under the session's lock: a query
    reaches its page as at most two websocket messages (its results, then the map recoloured on the next tick;
    eight before 2026-12-03), a DE run as one (three before), and the page's document then holds all of it."""
    import socket

    from bokeh.models import Select

    bl, sl = _bench(), _bench("bench_server_load")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = bl.parse_args(["--server-log", str(tmp_path / "server.log")])
    server = bl.start_server(args, port, str(tmp_path / "exports"))
    url = f"http://127.0.0.1:{port}/"

    async def messages_for(s, action, settle=1.5):
        n0 = s.patches
        await action()
        await asyncio.sleep(settle)  # anything the action sends late would arrive meanwhile
        return s.patches - n0

    async def go():
        await sl._warm_up(url, 240)  # the model and embeddings loaded, one query answered
        s = sl.ProtocolSession(url)
        await s.open(240)
        try:
            await s.wait_for(lambda: s.find(sl.TextInput, placeholder=bl.QUERY_BOX) is not None, 240)
            await sl._query(s, "warm-up query", 240)
            await asyncio.sleep(1.5)
            query = await messages_for(s, lambda: sl._query(s, "B cells", 120))
            history = s.find(Select, title=sl.HISTORY).options
            await sl._tab(s, "DE + enrichment")  # the tab's models arrive when it is first opened
            await s.wait_for(lambda: s.find(sl.Button, label="Run DE") is not None, 120)
            await asyncio.sleep(1.5)
            t0 = time.perf_counter()
            de = await messages_for(s, lambda: sl._run(s, "DE", "DE + enrichment", "Run DE", 240))
            de_seconds = time.perf_counter() - t0 - 1.5
            return query, history, de, de_seconds, s.colour_note()
        finally:
            await s.close()

    try:
        query, history, de, de_seconds, note = asyncio.run(go())
    finally:
        bl.stop_server(server)
    assert 1 <= query <= 2, f"{query} messages for a query"
    assert history[0] == "B cells" and "score: B cells" in note
    # the results in one message; a run slower than Job.SHOW_AFTER (0.4 s) also shows its progress row and
    # updates its label once a second (the click and the tab switch back are the page's own changes: no echo)
    allowed = 1 + (2 + int(de_seconds) if de_seconds > 0.4 else 0)
    assert de <= allowed, f"{de} messages for a DE run ({de_seconds:.1f} s)"
    assert _app_tracebacks((tmp_path / "server.log").read_text()) == []


def test_pages_opened_while_the_server_loads_the_data_answer_their_first_query(tmp_path):
    """Three Chromium pages opened together as soon as the server answers, while it still reads the demo and
    loads the model (each page is built when the data arrive), each answer a first query typed once as soon as
    the query box shows (it waits for the embeddings, and the page says so), no page reports a JavaScript
    error, and no page requests anything from outside the server (``run_app.py`` serves them, as in a lab).
    (A score map drawn ahead of the first query, tried on 2026-12-04 and withdrawn, broke such pages in a
    one-off script: they were sent changes naming map models they had never received, "reference pNNNN isn't
    known", in 5 of 6 runs. This test, run twice against that code, passed: the failure depends on timing,
    and this is a check of the scenario, not a reproduction of it.)"""
    bl = _bench()
    if not Path(bl.CHROMIUM).exists():
        pytest.skip(f"no Chromium at {bl.CHROMIUM}")
    from playwright.async_api import async_playwright

    log = tmp_path / "server.log"
    port = bl._free_port()
    server = bl.start_server(bl.parse_args(["--server-log", str(log)]), port, str(tmp_path / "exports"))
    url = f"http://127.0.0.1:{port}/"
    errors: list[str] = []
    answered: list[int] = []
    queued: list[int] = []
    outside: list[str] = []  # requests to anyone but the Lexicell server

    async def one(browser, i: int) -> None:
        ctx = await browser.new_context(viewport={"width": 1400, "height": 1100})
        page = await ctx.new_page()
        page.set_default_timeout(240_000)
        page.on("pageerror", lambda exc: errors.append(f"page {i}: {str(exc)[:200]}"))
        page.on("request", lambda r: r.url.split("/", 3)[:3] != url.split("/", 3)[:3]
                and not r.url.startswith(("blob:", "data:")) and outside.append(r.url))
        await page.goto(url)
        # a query typed as soon as the box shows, while the data, the model or the embeddings may still load, is
        # kept and answered once the cells are embedded: typed once, never again
        box = page.get_by_placeholder(bl.QUERY_BOX)
        await box.fill(f"B cells {i}")
        await box.press("Enter")
        try:
            await page.get_by_text("will be scored as soon as the cells are embedded").first.wait_for(timeout=5_000)
            queued.append(i)
        except Exception:  # noqa: BLE001 - the page was built after the embeddings: answered at once
            pass
        await page.locator(".colour-note-text", has_text=f"score: B cells {i}").first.wait_for(timeout=240_000)
        if i in queued:  # the page's notice names the query it is scoring, not "type a query"
            await page.get_by_text(f"embeddings ready for 700 cells: scoring “B cells {i}”").first.wait_for()
        if i == 0:
            await page.screenshot(path=str(tmp_path / "first_query_while_loading.png"))
            for name in ("Zero-shot labels", "Describe selection", "DE + enrichment", "Perturbation",
                         "Save / export", "About", "Query"):  # every tab's scripts and styles requested
                await page.locator(".bk-tab", has_text=name).first.click()
                await page.wait_for_timeout(300)
        answered.append(i)
        await ctx.close()

    async def go():
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=bl.CHROMIUM)
            try:
                await asyncio.gather(*(one(browser, i) for i in range(3)))
            finally:
                await browser.close()

    try:
        asyncio.run(go())
    finally:
        bl.stop_server(server)
    assert errors == []
    assert sorted(answered) == [0, 1, 2]
    assert queued, "no page said its query waits for the embeddings: none was typed while they were computed"
    # the pages, with every tab opened, loaded nothing from outside the server (Panel's template linked
    # Google's Lato stylesheet until 2026-12-04)
    assert outside == []
    assert _app_tracebacks(log.read_text()) == []

"""Many users at once: one served app, one headless Chromium, N browser contexts (sessions) working in parallel.

    python bench/bench_load.py                    # 10 sessions for 5 minutes on the demo (issue 18 item 4)
    python bench/bench_load.py --quick            # 3 sessions for 1 minute
    python bench/bench_load.py --contexts 8 --minutes 2 --rounds 3   # sessions closed and reopened per round
    python bench/bench_load.py --think 0          # no pauses: every session fires its next action at once

The pages of all sessions are requested at once (printed: the seconds each took to open); the measured minutes
begin when the last is open, so that they are N open sessions at work (``--query-while-opening``: from the first
request, each session acting as soon as its own page is open, its first queries competing with the other
pages' loads). Each session loops: a query (its text carries the session's tag), now and then zero-shot labels
and a top-vs-bottom DE (after its second query it also box-selects a region of its own size), with a user's pause
(``--think``, default 3 s on average) before each action; ``--think 0`` is a saturation test (10 sessions
clicking without pause on 2 cores shared with their 10 browser pages). Printed: errors (timeouts,
"Unexpected error"/"Traceback" in the page), isolation failures (a session whose colour note or query history
shows another session's tag, or whose selection count changed without its own action), p50/p95 query latency
(Enter -> the page shows the new colouring; also per minute) and the server's RSS at the start, after each
round and at the end (the server is a separate ``run_app.py`` process; RSS from ``/proc``), and the CPU seconds
each kind of process used while the sessions ran (server, Chromium renderer / browser / gpu-process, Playwright's
driver, the benchmark; ``LEXICELL_BENCH_DEBUG`` also prints them per process, and per page its main-thread
time from CDP and its running animations, and saves each page's last screenshot in
``$TMPDIR/lexicell-bench-pages/``). Targets (issue 18):
0 errors, 0 isolation failures, RSS growth <= 20 % (issue 20: <= 5 % after the first round), p95 <= 2 s on a
2-core machine.
Debian's Chromium drives it (``LEXICELL_CHROMIUM``); Playwright never downloads a browser. The ten pages need more
CPU than a 2-core machine has (one alone about 0.19 of a core, 2026-12-03); ``bench/bench_server_load.py`` runs
the same sessions without browsers, for the server's own figures.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_debug  # noqa: E402 - what LEXICELL_BENCH_DEBUG prints (busy renderers, page reports)
CHROMIUM = os.environ.get("LEXICELL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUERY_BOX = 'e.g. "B cells", "T cells MINUS regulatory T cells"'
QUERIES = ["B cells", "T cells", "monocytes", "NK cells", "dendritic cells", "platelets", "cytotoxic cells",
           "naive T cells", "proliferating cells", "T cells MINUS regulatory T cells"]
TAG = re.compile(r"client (\d\d)")
BAD_TEXT = re.compile("Unexpected error|Traceback")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` in seconds (``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


EXITING = "exiting"


def _kind(pid: int, server_pid: int) -> str | None:
    """What process ``pid`` is (server, benchmark, a kind of Chromium process, Playwright's driver), None for
    others, :data:`EXITING` for a Chromium process whose command line can no longer be read."""
    if pid == server_pid:
        return "server"
    if pid == os.getpid():
        return "benchmark (Python)"
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    if comm.startswith(("chromium", "chrome")):
        # (Chromium rewrites its children's command lines as one string: split on spaces too)
        args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
        if not args:  # an exiting process (a closed page's renderer): its command line reads empty
            return EXITING
        kind = next((a[7:].decode() for a in args if a.startswith(b"--type=")), "browser")
        return f"Chromium {kind}"  # renderer (the pages), gpu-process (compositing, also without a GPU), ...
    if comm.startswith("node"):  # node-MainThread
        return "Playwright driver"
    return None


class CpuMeter:
    """CPU seconds of the server, all Chromium processes, Playwright's driver and this process while the
    sessions run: every process is read every ``every`` seconds and its last reading kept, so that the renderers
    of closed contexts (gone from ``/proc``) still count, up to their last reading."""

    def __init__(self, server_pid: int, every: float = 2.0):
        self.server_pid, self.every = server_pid, every
        self.first: dict[int, tuple[str, float]] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.t0 = self.t1 = time.time()

    def sample(self) -> None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            pid = int(proc.name)
            try:
                kind = _kind(pid, self.server_pid)
                if kind == EXITING:
                    # keeps the kind it had: closed pages' renderers, exiting when the last reading is taken,
                    # were counted as the browser process before 2026-12-03 (their command line reads empty)
                    kind = self.last.get(pid, (None,))[0]
                if kind is None:
                    continue
                reading = (kind, cpu_seconds(pid))
            except OSError:  # the process ended meanwhile
                continue
            self.first.setdefault(pid, reading)
            self.last[pid] = reading
        self.t1 = time.time()

    async def run(self, stop: asyncio.Event) -> None:
        self.sample()
        self.t0 = time.time()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.every)
            except asyncio.TimeoutError:
                pass
            self.sample()

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if os.environ.get("LEXICELL_BENCH_DEBUG"):
            for pid, (kind, last) in sorted(self.last.items()):
                print(f"    pid {pid} {kind}: {last - self.first[pid][1]:.1f} CPU-s")
        for pid, (kind, last) in self.last.items():
            out[kind] = out.get(kind, 0.0) + last - self.first[pid][1]
        return out


def start_server(args, port: int, save_dir: str) -> subprocess.Popen:
    script = args.server_script or str(ROOT / "run_app.py")
    cmd = [sys.executable, script, "--no-show", "--port", str(port), "--host", "127.0.0.1", "--save-dir", save_dir]
    if args.data:
        cmd += ["--data", args.data]
    if args.model:
        cmd += ["--model", args.model]
    # the server's output goes to a file: an unread pipe fills up (64 KB) and then blocks the server
    log = open(args.server_log or os.devnull, "w")
    proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = Path(args.server_log).read_text()[-2000:] if args.server_log else "(see --server-log)"
            raise SystemExit(f"the server exited: {tail}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not answer within 5 minutes")



def stop_server(proc: subprocess.Popen) -> None:
    """Stop the served app (SIGTERM; killed after 30 s)."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def per_minute(latencies: list[float], times: list[float], start: float | None = None
               ) -> list[tuple[int, list[float]]]:
    """The latencies answered in each minute of a run (``times``: wall-clock time of each answer; ``start``:
    when minute 1 began, default the first answer), as ``[(minute, sorted latencies), ...]`` from minute 1,
    minutes without an answer left out."""
    if not times:
        return []
    t_start = min(times) if start is None else min(start, min(times))
    out = []
    for m in range(int((max(times) - t_start) // 60) + 1):
        part = sorted(v for v, t in zip(latencies, times) if m * 60 <= t - t_start < (m + 1) * 60)
        if part:
            out.append((m + 1, part))
    return out


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """The served app's flags every load benchmark takes: ``--data``, ``--model``, ``--port``, ``--server-log``
    (and the hidden ``--server-script``, a wrapper of ``run_app.py`` for profiling or another version)."""
    ap.add_argument("--data", help="dataset (default: the demo)")
    ap.add_argument("--model", help="model folder (default: the bundled model)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--server-log", metavar="FILE", help="write the server's output to FILE (default: discarded)")
    ap.add_argument("--server-script", metavar="PY", help=argparse.SUPPRESS)

# Timing a query in the page itself, on the page's clock: from the Enter key (a capture listener on ``window``,
# which sees keys typed inside Bokeh's shadow roots) to the moment the colour note in the DOM shows the query (a
# MutationObserver on the note's shadow root; a 100-ms check also finds a note whose pane was rebuilt). Waiting
# with a Playwright locator instead polls at 0, 20, 70, 170 and 270 ms and then every 500 ms, each poll searching
# every shadow root of the page: the time it notices overstates the latency by up to half a second and the
# polling of ten pages costs the browsers CPU. That polled figure is printed too ("as the benchmark noticed").
_ARM_QUERY_TIMER = """([note, expected]) => {
  const bench = window.__lexicellBench = {t0: null, t1: null};
  if (!window.__lexicellEnterTimer) {
    window.__lexicellEnterTimer = true;
    window.addEventListener('keydown', (e) => {
      const b = window.__lexicellBench;
      if (e.key === 'Enter' && b && b.t0 === null) b.t0 = performance.now();
    }, true);
  }
  const deep = (root) => {
    const found = root.querySelector('.colour-note-text');
    if (found) return found;
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) { const f = deep(el.shadowRoot); if (f) return f; }
    }
    return null;
  };
  let root = note.getRootNode();
  const observer = new MutationObserver(() => check());
  const timer = setInterval(() => check(), 100);
  const check = () => {
    if (bench.t1 !== null) return;
    let el = root.querySelector('.colour-note-text');
    if (!el) {
      el = deep(document);
      if (el && el.getRootNode() !== root) {
        root = el.getRootNode();
        observer.observe(root, {subtree: true, childList: true, characterData: true});
      }
    }
    if (el && el.textContent.includes(expected)) {
      bench.t1 = performance.now();
      observer.disconnect();
      clearInterval(timer);
    }
  };
  observer.observe(root, {subtree: true, childList: true, characterData: true});
}"""


class Opening:
    """When the measured minutes of a round begin: by default once every session's page is open (the ten pages
    are requested at once, and no session acts before the last is open: the 5 minutes are ten open sessions at
    work); with ``together=False`` (``--query-while-opening``) at the first page's request, each session acting
    as soon as its own page is open, so that the first queries compete with the other pages' loads.

    Each session calls :meth:`wait` once its page is open (or failed to open) and gets the round's deadline."""

    def __init__(self, sessions: int, seconds: float, together: bool = True):
        self.left, self.seconds, self.together = sessions, seconds, together
        self.began = time.time()
        self.deadline = self.began + seconds
        self.all_open = asyncio.Event()

    def arrived(self) -> None:
        """One session's page is open, or failed to open (called once per session)."""
        self.left -= 1
        if self.left == 0:
            if self.together:
                self.began = time.time()
                self.deadline = self.began + self.seconds
            self.all_open.set()

    async def wait(self) -> float:
        """Mark this session's page open and return the deadline (with ``together``, once all are open)."""
        self.arrived()
        if self.together:
            await self.all_open.wait()
        return self.deadline


class Stats:
    def __init__(self):
        self.opened: list[float] = []  # seconds from a page's request to its map and tabs showing
        self.latencies: list[float] = []  # Enter -> the page shows the new colouring, timed in the page
        self.observed: list[float] = []  # the same, as the benchmark's polling noticed it
        self.times: list[float] = []  # wall-clock time of each answered query
        self.errors: list[str] = []
        self.isolation: list[str] = []
        self.zero_shot = 0
        self.de = 0
        self.selections = 0


# What a session checks after each query, read in one call: the page's text (its light DOM and every shadow
# root; style sheets hold neither phrase) for an error, the history menu's options, the colour note and the
# selection count (the first of each, in document order). Playwright locators would search every shadow root
# once per item: four calls per query, each with a renderer task of its own.
_PAGE_STATE = """(badPattern) => {
  const out = {bad: false, history: null, note: null, count: null};
  const bad = new RegExp(badPattern);
  const walk = (root) => {
    const text = root === document ? (document.body ? document.body.textContent : '') : root.textContent;
    if (bad.test(text || '')) out.bad = true;
    if (out.note === null) { const el = root.querySelector('.colour-note-text'); if (el) out.note = el.textContent; }
    if (out.count === null) { const el = root.querySelector('.selection-count-text'); if (el) out.count = el.textContent; }
    if (out.history === null) {
      for (const label of root.querySelectorAll('label')) {
        if (label.textContent.trim() === 'History (click to go back)') {
          const select = root.querySelector('select');
          if (select) out.history = Array.from(select.options, (o) => o.textContent).join('\\n');
          break;
        }
      }
    }
    for (const el of root.querySelectorAll('*')) { if (el.shadowRoot) walk(el.shadowRoot); }
  };
  walk(document);
  return out;
}"""


async def _check_page(page, idx: int, st: Stats, what: str, selected: str | None = None) -> None:
    """Count an error shown in the page and an isolation failure (another session's tag in the history or the
    colour note; a selection count other than the session's own), from one read of the page (``_PAGE_STATE``)."""
    shown = await page.evaluate(_PAGE_STATE, BAD_TEXT.pattern)
    if shown["bad"]:
        st.errors.append(f"client {idx:02d} {what}: 'Unexpected error' or 'Traceback' in the page")
    others = {int(m) for m in TAG.findall(f"{shown['history'] or ''} {shown['note'] or ''}")} - {idx}
    if others:
        st.isolation.append(f"client {idx:02d} {what}: sees client(s) {sorted(others)}")
    if shown["note"] is None or shown["history"] is None:
        st.errors.append(f"client {idx:02d} {what}: no colour note or query history in the page")
    if selected is not None:  # the session's own box selection, unchanged by the other sessions
        count = (shown["count"] or "").strip()
        if count != selected:
            st.isolation.append(f"client {idx:02d} {what}: selection shows {count!r}, expected {selected!r}")


async def _select_box(page, idx: int, tries: int = 3) -> str:
    """Box-select a region of the map whose size depends on the session (so sessions' counts differ); returns
    the selection count the page shows. A drag made before the Box Select tool is active pans the map
    instead (a busy page may not have taken the click yet): the tool's active state is awaited, and a drag that
    selected nothing within 20 s is made again, as a user would (a drag made while the map is being redrawn,
    e.g. its colour bar just changed, can be lost)."""
    tool = page.get_by_title("Box Select", exact=True).filter(visible=True).first
    shown = page.locator(".selection-count-text", has_text="cells selected").first
    for attempt in range(tries):
        t0 = time.perf_counter()
        handle = await tool.element_handle()
        # a click toggles the tool: only when it is not active yet (after a failed drag it still is)
        if not await handle.evaluate("el => el.classList.contains('bk-active')"):
            await tool.click()
        await page.wait_for_function("el => el.classList.contains('bk-active')", arg=handle, polling=100)
        box = await page.locator(".bk-Canvas:visible").first.bounding_box()
        x0, y0 = box["x"] + box["width"] * 0.05, box["y"] + box["height"] * 0.05
        await page.mouse.move(x0, y0)
        await page.mouse.down()
        frac = 0.3 + 0.06 * (idx % 10)
        await page.mouse.move(x0 + box["width"] * frac, y0 + box["height"] * 0.9, steps=5)
        await page.mouse.up()
        t1 = time.perf_counter()
        await page.mouse.move(5, 5)  # off the map, as a user heading for the query box (no hover tooltip left open)
        try:
            await shown.wait_for(state="visible", timeout=20_000)
        except Exception:  # noqa: BLE001 - the drag selected nothing: again
            if os.environ.get("LEXICELL_BENCH_DEBUG"):
                await load_debug.failed_selection(page, idx, attempt, tool, box)
            if attempt == tries - 1:
                raise
            continue
        if os.environ.get("LEXICELL_BENCH_DEBUG"):
            print(f"client {idx:02d} selection (try {attempt + 1}): drag {t1 - t0:.1f} s, answered "
                  f"{time.perf_counter() - t1:.1f} s", flush=True)
        return (await shown.evaluate("el => el.textContent")).strip()  # as _check_page reads it
    raise RuntimeError("unreachable")


#: What shows that a run is done. Zero-shot labels colour the map (each run follows a query, so the colour note
#: turns from the query's score to the labels); a DE run's summary line appears (from the second run on it
#: already shows, as the volcano and table do: later DE runs are not waited for). Both tables show their columns
#: before the first run (since 2026-12-03; their headers were waited for before).
DONE = {"zero-shot": lambda page: page.locator(".colour-note-text", has_text="zero-shot label").first,
        "DE": lambda page: page.get_by_text(re.compile(r"\d+ top vs \d+ bottom cells")).first}


async def _run_tab(page, tab: str, button: str, idx: int, st: Stats, what: str) -> bool:
    """Open ``tab``, click ``button`` and wait until the run shows (:data:`DONE`); an error is counted, not
    raised."""
    try:
        await page.locator(".bk-tab", has_text=tab).first.click()
        await page.get_by_role("button", name=button).click()
        await DONE[what](page).wait_for(state="visible")
        return True
    except Exception as err:  # noqa: BLE001 - counted
        st.errors.append(f"client {idx:02d} {what}: {type(err).__name__}")
        return False


async def _think(rng: random.Random, think: float) -> None:
    """A user's pause between actions: uniform in [0.5, 1.5] x ``think`` seconds (none when ``think`` is 0)."""
    if think > 0:
        await asyncio.sleep(rng.uniform(0.5, 1.5) * think)


async def session(browser, url: str, idx: int, opening: Opening, st: Stats, timeout_ms: int,
                  think: float = 0.0, select: bool = True) -> None:
    ctx = await browser.new_context(viewport={"width": 1400, "height": 1200})
    page = await ctx.new_page()
    page.set_default_timeout(timeout_ms)
    # errors of the page's JavaScript (a Bokeh patch it could not apply leaves the page stale) count as errors
    page.on("pageerror", lambda exc: st.errors.append(f"client {idx:02d}: page error: {str(exc)[:200]}"))
    # (not the web fonts the page's theme asks for: the benchmark's machine is offline)
    page.on("console", lambda msg: msg.type == "error" and "ERR_NAME_NOT_RESOLVED" not in msg.text
            and st.errors.append(f"client {idx:02d}: console error: {msg.text[:200]}"))
    rng = random.Random(idx)
    waited = False
    if os.environ.get("LEXICELL_BENCH_DEBUG"):  # the page's main-thread metrics from its start (load_debug)
        page.cdp = await ctx.new_cdp_session(page)
        await page.cdp.send("Performance.enable")
    try:
        t0 = time.perf_counter()
        try:
            await page.goto(url)
            await page.locator(".bk-Canvas:visible").first.wait_for(state="visible")
            await page.locator(".bk-tab", has_text="Zero-shot labels").first.wait_for(state="visible")
            st.opened.append(time.perf_counter() - t0)
        finally:
            waited = True
            deadline = await opening.wait()  # (a page that failed to open still lets the others begin)
        selected = None
        n = 0
        while time.time() < deadline:
            n += 1
            await _think(rng, think)
            await page.locator(".bk-tab", has_text="Query").first.click()  # the history lives in this tab
            text = f"{rng.choice(QUERIES)} (client {idx:02d} #{n})"
            box = page.get_by_placeholder(QUERY_BOX)
            await box.fill(text)
            shown = text if len(text) <= 40 else text[:39] + "…"  # the colour note shortens long queries
            try:
                note = await page.locator(".colour-note-text").first.element_handle()
                await page.evaluate(_ARM_QUERY_TIMER, [note, f"score: {shown}"])
                t0 = time.perf_counter()
                await box.press("Enter")
                await page.wait_for_function("() => window.__lexicellBench.t1 !== null", polling=50)
                observed = time.perf_counter() - t0
                in_page = await page.evaluate(
                    "() => { const b = window.__lexicellBench; return b.t0 === null ? null : (b.t1 - b.t0) / 1000; }")
                st.latencies.append(observed if in_page is None else in_page)
                st.observed.append(observed)
                st.times.append(time.time())
            except Exception as err:  # noqa: BLE001 - counted
                st.errors.append(f"client {idx:02d} query {text!r}: {type(err).__name__}")
                continue
            await _check_page(page, idx, st, f"query {n}", selected)
            if n == 2 and select:  # a user selects cells once the map is coloured (the selection feeds the side chart)
                try:
                    selected = await _select_box(page, idx)
                    st.selections += 1
                except Exception as err:  # noqa: BLE001 - counted
                    st.errors.append(f"client {idx:02d} box selection: {type(err).__name__}")
            if n % 4 in (1, 3):
                await _think(rng, think)
            if n % 4 == 1 and await _run_tab(page, "Zero-shot labels", "Label cells", idx, st, "zero-shot"):
                st.zero_shot += 1
            elif n % 4 == 3 and await _run_tab(page, "DE + enrichment", "Run DE", idx, st, "DE"):
                st.de += 1
    except Exception as err:  # noqa: BLE001
        st.errors.append(f"client {idx:02d}: {type(err).__name__}: {str(err)[:200]}")
    finally:
        if not waited:
            opening.arrived()
        if os.environ.get("LEXICELL_BENCH_DEBUG"):
            await load_debug.page_report(page, idx)
        await ctx.close()


def _p95(sorted_values: list[float]) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(round(0.95 * (len(sorted_values) - 1))))]


async def run(args) -> dict:
    """Serve the app, run the sessions, print the figures; returns them (``errors``, ``isolation``,
    ``latencies``, ``zero_shot``, ``de``, ``rss``: ``[(when, MB), ...]``)."""
    from playwright.async_api import async_playwright

    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory(prefix="lexicell-load-") as save_dir:
        t0 = time.perf_counter()
        server = start_server(args, port, save_dir)
        print(f"server pid {server.pid} up in {time.perf_counter() - t0:.1f} s; load average {os.getloadavg()}",
              flush=True)
        st = Stats()
        rss = []
        try:
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                # one session loaded first, so that "start" is the server after its first page
                warm = await browser.new_context()
                page = await warm.new_page()
                page.set_default_timeout(args.first_timeout * 1000)  # the first page waits for model and embeddings
                await page.goto(url)
                await page.locator(".bk-tab", has_text="Zero-shot labels").first.wait_for(state="visible")
                box = page.get_by_placeholder(QUERY_BOX)
                first_deadline = time.time() + args.first_timeout
                while True:  # a query before the embeddings are ready is refused: retry until it works
                    await box.fill("B cells")
                    await box.press("Enter")
                    try:
                        await page.locator(".colour-note-text", has_text="score: B cells").first.wait_for(
                            state="visible", timeout=10_000)
                        break
                    except Exception:  # noqa: BLE001
                        if time.time() > first_deadline:
                            raise
                # and one zero-shot run: the server's warm-up ends with the neighbour graph behind smoothed labels
                await page.locator(".bk-tab", has_text="Zero-shot labels").first.click()
                await page.get_by_role("button", name="Label cells").click()
                await DONE["zero-shot"](page).wait_for(state="visible")
                await warm.close()
                print(f"first page, query and zero-shot done after {time.perf_counter() - t0:.1f} s", flush=True)
                await asyncio.sleep(2)
                rss.append(("start", rss_mb(server.pid)))
                per_round = args.minutes * 60 / args.rounds
                began: list[float] = []  # when each round's measured minutes began
                meter, stop = CpuMeter(server.pid), asyncio.Event()
                metering = asyncio.ensure_future(meter.run(stop))
                if os.environ.get("LEXICELL_BENCH_DEBUG"):  # a trace of any renderer that stays busy
                    busy = load_debug.BusyWatch(browser, server.pid, _kind, cpu_seconds)
                    watching = asyncio.ensure_future(busy.run(stop))
                for r in range(args.rounds):
                    opening = Opening(args.contexts, per_round, together=not args.query_while_opening)
                    await asyncio.gather(*(session(browser, url, i, opening, st, args.timeout * 1000, args.think,
                                                   not args.no_select) for i in range(args.contexts)))
                    began.append(opening.began)
                    if r == args.rounds - 1:
                        stop.set()
                        await metering
                        if os.environ.get("LEXICELL_BENCH_DEBUG"):
                            await watching
                    await asyncio.sleep(args.settle)  # closed sessions are destroyed after Bokeh's unused lifetime
                    rss.append((f"after round {r + 1}", rss_mb(server.pid)))
                    print(f"  round {r + 1}: RSS {rss[-1][1]:.0f} MB, {len(st.latencies)} queries, "
                          f"{len(st.errors)} errors", flush=True)
                await browser.close()
        finally:
            stop_server(server)
    lat = sorted(st.latencies)
    p50 = statistics.median(lat) if lat else float("nan")
    p95 = _p95(lat)
    start, end = rss[0][1], rss[-1][1]
    first = rss[1][1] if len(rss) > 1 else end
    print(f"\nsessions {args.contexts} x {args.rounds} round(s), {args.minutes:g} min, think time {args.think:g} s; "
          f"cpu cores {os.cpu_count()}")
    opened = sorted(st.opened)
    print(f"pages opened {len(opened)} ({args.contexts} requested at once per round): "
          f"p50 {statistics.median(opened) if opened else float('nan'):.1f} s, "
          f"last {max(opened, default=float('nan')):.1f} s; "
          + ("sessions acted as soon as their own page was open (--query-while-opening)" if args.query_while_opening
             else "the measured minutes began when all were open"))
    print(f"queries {len(lat)}, zero-shot runs {st.zero_shot}, DE runs {st.de}, box selections {st.selections}")
    print(f"errors {len(st.errors)}")
    for e in st.errors[:40]:
        print("   ", e)
    print(f"isolation failures {len(st.isolation)}")
    for e in st.isolation[:20]:
        print("   ", e)
    print(f"query latency p50 {p50:.2f} s, p95 {p95:.2f} s (target p95 <= 2 s; Enter -> the colour note shows the "
          f"query, timed in the page)")
    obs = sorted(st.observed)
    if obs:
        print(f"    as the benchmark noticed it (Playwright polls): p50 {statistics.median(obs):.2f} s, "
              f"p95 {_p95(obs):.2f} s")
    for minute, part in per_minute(st.latencies, st.times, began[0] if args.rounds == 1 else None):
        print(f"    minute {minute}: {len(part)} queries, p50 {statistics.median(part):.2f} s, p95 {_p95(part):.2f} s")
    cpu = meter.totals()
    wall = meter.t1 - meter.t0
    print(f"CPU while the sessions ran ({wall:.0f} s x {os.cpu_count()} cores = {wall * os.cpu_count():.0f} CPU-s): "
          + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])))
    print("server RSS " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss)
          + f"; growth {100 * (end - start) / start:+.1f} % (target <= 20 %), after the first round "
            f"{100 * (end - first) / first:+.1f} % (target <= 5 %)")
    return dict(errors=st.errors, isolation=st.isolation, latencies=st.latencies, observed=st.observed,
                opened=st.opened,
                zero_shot=st.zero_shot,
                de=st.de, selections=st.selections, rss=rss, p50=p50, p95=p95, cpu=cpu)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``argv``: a list of strings; None: ``sys.argv``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, default=10, help="browser contexts (sessions) at once (default 10)")
    ap.add_argument("--minutes", type=float, default=5.0, help="total duration (default 5)")
    ap.add_argument("--rounds", type=int, default=1, help="close and reopen every session this many times")
    ap.add_argument("--think", type=float, default=3.0, metavar="S",
                    help="a user's pause before each action, uniform in 0.5-1.5 x S seconds (default 3; 0: every "
                         "session fires its next action at once, a saturation test)")
    ap.add_argument("--quick", action="store_true", help="3 sessions for 1 minute")
    ap.add_argument("--no-select", action="store_true", help="sessions never box-select cells")
    ap.add_argument("--query-while-opening", action="store_true",
                    help="each session acts as soon as its own page is open and the minutes count from the first "
                         "page's request (default: all pages are requested at once and the minutes begin when the "
                         "last is open)")
    add_server_args(ap)
    ap.add_argument("--timeout", type=int, default=60, help="seconds one page action may take (default 60)")
    ap.add_argument("--first-timeout", type=int, default=300, help="seconds the first page may take (default 300)")
    ap.add_argument("--settle", type=float, default=25.0,
                    help="seconds to wait after a round before reading RSS (Bokeh frees a closed session after "
                         "about 15-17 s)")
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.minutes = 3, 1.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    res = asyncio.run(run(args))
    return 0 if not res["errors"] and not res["isolation"] else 1


if __name__ == "__main__":
    sys.exit(main())

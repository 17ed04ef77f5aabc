"""What ``bench/bench_load.py`` prints with ``LEXICELL_BENCH_DEBUG`` set: a trace of any Chromium renderer that
stays busy (:class:`BusyWatch`), each page's main-thread figures, running animations, an idle JavaScript profile
and last screenshot when its session ends (:func:`page_report`), and what a page showed when a box selection
failed (:func:`failed_selection`). Screenshots and traces go to ``$TMPDIR/lexicell-bench-pages/``."""
from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

SHOTS = Path(tempfile.gettempdir()) / "lexicell-bench-pages"


class BusyWatch:
    """``LEXICELL_BENCH_DEBUG``: every ``every`` seconds, the CPU rate of each Chromium renderer; when one uses
    more than ``limit`` of a core, a 3-s trace of the browser (at most ``traces`` in a run), and what that
    renderer's main thread did in it: its trace events by name (inclusive durations), the script functions its
    ``FunctionCall`` events ran and the nodes it painted. The trace is saved in
    ``$TMPDIR/lexicell-bench-pages/trace_<pid>.json``."""

    CATEGORIES = ("devtools.timeline", "disabled-by-default-devtools.timeline", "v8.execute", "blink",
                  "disabled-by-default-devtools.timeline.frame", "toplevel", "cc")

    def __init__(self, browser, server_pid: int, kind, cpu_seconds, every: float = 20.0, limit: float = 0.3,
                 traces: int = 3):
        """``kind(pid, server_pid)`` names a process and ``cpu_seconds(pid)`` reads its CPU time
        (``bench_load._kind`` and ``bench_load.cpu_seconds``)."""
        self.browser, self.server_pid, self.every, self.limit, self.traces = browser, server_pid, every, limit, traces
        self.kind, self.cpu_seconds = kind, cpu_seconds
        self.seen: dict[int, tuple[float, float]] = {}

    def _rates(self) -> dict[int, float]:
        now, rates = time.time(), {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            pid = int(proc.name)
            try:
                if self.kind(pid, self.server_pid) != "Chromium renderer":
                    continue
                cpu = self.cpu_seconds(pid)
            except OSError:
                continue
            if pid in self.seen:
                t, c = self.seen[pid]
                rates[pid] = (cpu - c) / max(now - t, 1e-6)
            self.seen[pid] = (now, cpu)
        return rates

    async def run(self, stop: asyncio.Event) -> None:
        self._rates()
        while not stop.is_set() and self.traces > 0:
            try:
                await asyncio.wait_for(stop.wait(), self.every)
                return
            except asyncio.TimeoutError:
                pass
            rates = self._rates()
            busy = {pid: r for pid, r in rates.items() if r > self.limit}
            print(f"    renderer CPU rates (cores): {sorted((round(r, 2) for r in rates.values()), reverse=True)}",
                  flush=True)
            if busy:
                self.traces -= 1
                await self.trace(busy)

    async def trace(self, busy: dict[int, float]) -> None:
        try:
            await self.browser.start_tracing(categories=list(self.CATEGORIES))
            await asyncio.sleep(3)
            events = json.loads(await self.browser.stop_tracing())["traceEvents"]
        except Exception as err:  # noqa: BLE001 - a report only
            print(f"    busy renderers {busy}: no trace ({type(err).__name__}: {err})", flush=True)
            return
        SHOTS.mkdir(exist_ok=True)
        main = {(e["pid"], e["tid"]) for e in events
                if e.get("ph") == "M" and e.get("name") == "thread_name" and e["args"].get("name") == "CrRendererMain"}
        for pid, rate in busy.items():
            (SHOTS / f"trace_{pid}.json").write_text(json.dumps([e for e in events if e.get("pid") == pid]))
            mine = [e for e in events if (e.get("pid"), e.get("tid")) in main and e.get("pid") == pid
                    and e.get("ph") == "X"]
            by_name: dict[str, float] = {}
            calls: dict[str, float] = {}
            for e in mine:
                by_name[e["name"]] = by_name.get(e["name"], 0.0) + e.get("dur", 0) / 1000
                data = e.get("args", {}).get("data", {}) or {}
                if e["name"] in ("FunctionCall", "TimerFire", "FireAnimationFrame", "EventDispatch", "Paint"):
                    key = (f"{e['name']} {data.get('functionName') or data.get('type') or ''} "
                           f"{str(data.get('url') or data.get('nodeName') or '').rsplit('/', 1)[-1][:60]}")
                    calls[key] = calls.get(key, 0.0) + e.get("dur", 0) / 1000
            top = sorted(by_name.items(), key=lambda kv: -kv[1])[:14]
            top_calls = sorted(calls.items(), key=lambda kv: -kv[1])[:10]
            print(f"    busy renderer {pid} ({rate:.2f} cores): main-thread events in 3 s (ms): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in top), flush=True)
            print("      calls: " + "; ".join(f"{k.strip()} {v:.0f}" for k, v in top_calls), flush=True)


async def failed_selection(page, idx: int, attempt: int, tool, box) -> None:
    """``LEXICELL_BENCH_DEBUG``: what the page showed when a drag selected nothing (printed, and a screenshot
    in the temporary folder)."""
    active = await tool.evaluate("el => el.classList.contains('bk-active')")
    count = await page.locator(".selection-count-text").first.inner_text()
    note = await page.locator(".colour-note-text").first.inner_text()
    canvases = await page.locator(".bk-Canvas").count()
    path = Path(tempfile.gettempdir()) / f"lexicell-bench-selection-{idx:02d}-{attempt + 1}.png"
    await page.screenshot(path=str(path))
    print(f"client {idx:02d} selection try {attempt + 1} failed: tool active {active}, count {count!r}, "
          f"colour note {note!r}, {canvases} canvases, first canvas at {box}; screenshot {path}", flush=True)


_ANIMATIONS = """() => document.getAnimations().filter(a => a.playState === 'running').map(a => {
  const t = a.effect && a.effect.target;
  return `${a.animationName || a.constructor.name} on ${t ? t.tagName.toLowerCase() + '.' + [...t.classList].join('.') : '?'}`;
})"""

#: Elements that show Panel's loading spinner (an SVG mask animated by SMIL, which ``getAnimations`` does not
#: list), looked for inside shadow roots too.
_SPINNERS = """() => { let n = 0; const walk = root => { for (const el of root.querySelectorAll('*')) {
  if (el.classList.contains('pn-loading') || el.tagName === 'svg' && el.querySelector('animate, animateTransform')) n++;
  if (el.shadowRoot) walk(el.shadowRoot); } }; walk(document); return n; }"""

#: The state of each Tabulator view in the page (Panel's ``DataTabulatorView``, found through ``Bokeh.index``):
#: what its resize flush (``_flush_resize_when_root_ready``, which re-polls with ``defer`` while any of these
#: holds it back) waits for.
_TABULATORS = """() => [...Bokeh.index.query(v => v.tabulator !== undefined && v._resize_pending !== undefined)].map(v => {
  const sheets = v._initialized_stylesheets ? [...v._initialized_stylesheets.entries()] : [];
  const held = [v._is_scrolling && 'scrolling', v._initializing && 'initializing', v.container === null && 'no container',
    v._building && 'building', v._redrawing && 'redrawing', !v.has_finished() && 'not finished',
    sheets.some(([, ok]) => !ok) && 'sheets: ' + sheets.filter(([, ok]) => !ok).map(([h]) => h.split('/').pop()).join(',')
  ].filter(Boolean);
  const links = (v._applied_stylesheets || []).map(st => st.el).filter(el => el instanceof HTMLLinkElement);
  const stuck = links.filter(el => sheets.some(([h, ok]) => h === el.href && !ok));
  const detail = stuck.length ? ` stuck links: connected ${stuck.filter(el => el.isConnected).length}/${stuck.length}, `
    + `with sheet ${stuck.filter(el => el.sheet != null).length}, in shadow ${stuck.filter(el => el.getRootNode() === v.shadow_el).length}` : '';
  return `${v.model.name || v.model.id}:${detail} pending ${v._resize_pending}, flushing ${v._resize_flush !== null}, `
    + `held by [${held.join('; ')}], el ${v.el.clientWidth}x${v.el.clientHeight}, shown ${v.el.offsetParent !== null}`;
})"""


async def page_report(page, idx: int) -> None:
    """``LEXICELL_BENCH_DEBUG``: a page's main-thread time since it opened (CDP ``Performance.getMetrics``),
    its running animations and loading spinners (a page that keeps repainting shows up here), what its
    JavaScript does in 3 s once its session ended (sampling profiler), its screenshot, and each Tabulator whose
    resize redraw is pending or held (every Tabulator with ``LEXICELL_BENCH_DEBUG=all``)."""
    try:
        metrics = {m["name"]: m["value"] for m in (await page.cdp.send("Performance.getMetrics"))["metrics"]}
        busy = [metrics.get(k, 0.0) for k in ("TaskDuration", "ScriptDuration", "LayoutDuration",
                                                  "RecalcStyleDuration", "LayoutCount", "RecalcStyleCount")]
        animations = await page.evaluate(_ANIMATIONS)
        spinners = await page.evaluate(_SPINNERS)
        tables = await page.evaluate(_TABULATORS)
        # what the page's JavaScript does now, idle between actions: 3 s of the sampling profiler
        await page.cdp.send("Profiler.enable")
        await page.cdp.send("Profiler.start")
        await asyncio.sleep(3)
        profile = (await page.cdp.send("Profiler.stop"))["profile"]
        nodes = {node["id"]: node for node in profile["nodes"]}
        parent = {child: node["id"] for node in profile["nodes"] for child in node.get("children", ())}

        def name(node_id):
            frame = nodes[node_id]["callFrame"]
            return f"{frame['functionName'] or '(anonymous)'} {frame['url'].rsplit('/', 1)[-1].split('?')[0]}"

        hits: dict[str, int] = {}
        for node_id, node in nodes.items():  # each sample under its function and the two functions calling it
            chain, up = [name(node_id)], parent.get(node_id)
            while up is not None and len(chain) < 3:
                chain.append(name(up))
                up = parent.get(up)
            key = " < ".join(chain)
            hits[key] = hits.get(key, 0) + node.get("hitCount", 0)
        total = len(profile.get("samples", ()))
        top = sorted(((n, k) for k, n in hits.items() if not k.startswith("(idle)")), reverse=True)[:4]
        top = [f"{n / max(total, 1):.0%} {k}" for n, k in top] + [f"{total} samples in 3 s"]
        SHOTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(SHOTS / f"client_{idx:02d}.png"), full_page=True)
        print(f"    client {idx:02d}: main thread {busy[0]:.1f} s (script {busy[1]:.1f}, layout {busy[2]:.1f} in "
              f"{busy[4]:.0f}, style {busy[3]:.1f} in {busy[5]:.0f}); running animations {len(animations)}: "
              f"{sorted(set(animations))[:6]}; spinners {spinners}; 3 s idle profile, samples: {top}", flush=True)
        for t in tables:
            if "flushing true" in t or "held by []" not in t or os.environ.get("LEXICELL_BENCH_DEBUG") == "all":
                print(f"      tabulator {t}", flush=True)
    except Exception as err:  # noqa: BLE001 - a report only
        print(f"    client {idx:02d}: no report ({type(err).__name__})", flush=True)

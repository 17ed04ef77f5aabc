"""What one action costs on the server and in the browser, for one session alone.

    python bench/bench_page_cost.py                 # 20 queries
    python bench/bench_page_cost.py --action zero-shot --n 6
    python bench/bench_page_cost.py --action de --n 6
    python bench/bench_page_cost.py --action page-load --n 3
    python bench/bench_page_cost.py --after-tabs    # queries once the zero-shot and DE tabs have been opened
    python bench/bench_page_cost.py --action cycle --n 4   # a load-benchmark session's cycle, step by step

Serves the demo (``run_app.py``, as ``bench/bench_load.py`` does), opens one page in Debian's Chromium and
repeats one action. Printed per action: the server process's CPU time (``/proc``), the page's main-thread time
from the Chrome DevTools Protocol (``Performance.getMetrics``: task, script, style recalculation, layout) and
the CPU time of all Chromium processes (rendering and compositing happen outside the main thread) and
the latency the page shows. ``zero-shot`` and ``de`` include their tab switches there and back, as a user's.
Used for ``docs/serving-performance.md``; ratios between runs of one machine are what to compare.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_load as bl  # noqa: E402 - the same server start, browser and query box

METRICS = ("TaskDuration", "ScriptDuration", "RecalcStyleDuration", "LayoutDuration")


cpu_seconds = bl.cpu_seconds  # user + system CPU seconds of a process (``/proc``)


def chromium_seconds() -> float:
    """CPU time of every Chromium process on the machine (renderers, GPU/compositor, browser), in seconds;
    the benchmark's browser is meant to be the only one running."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip().startswith(("chromium", "chrome")):
                total += cpu_seconds(int(proc.name))
        except OSError:  # the process ended meanwhile
            continue
    return total


async def _metrics(cdp) -> dict:
    return {m["name"]: m["value"] for m in (await cdp.send("Performance.getMetrics"))["metrics"]}


async def _query(page, text: str) -> None:
    box = page.get_by_placeholder(bl.QUERY_BOX)
    await box.fill(text)
    await box.press("Enter")
    await page.locator(".colour-note-text", has_text=f"score: {text}").first.wait_for()


async def _first_query(page) -> None:
    """A first query, retried (up to 60 times, 10 s each) until it works: the first page waits for the model
    and embeddings."""
    for i in range(60):
        try:
            await asyncio.wait_for(_query(page, f"warm-up {i}"), 10)
            return
        except Exception:  # noqa: BLE001 - a timeout: the embeddings are not ready yet
            continue


async def _tab_action(page, tab: str, button: str, what: str) -> None:
    """Open ``tab``, click ``button``, wait until the run shows (``bench_load.DONE[what]``), back to the query tab."""
    await page.locator(".bk-tab", has_text=tab).first.click()
    await page.get_by_role("button", name=button).click()
    await bl.DONE[what](page).wait_for(state="visible")
    await page.locator(".bk-tab", has_text="Query").first.click()


async def _open(browser, url: str):
    ctx = await browser.new_context(viewport={"width": 1400, "height": 1200})
    page = await ctx.new_page()
    page.set_default_timeout(300_000)
    cdp = await ctx.new_cdp_session(page)
    await cdp.send("Performance.enable")
    await cdp.send("Network.enable")
    frames = cdp.frames = {"n": 0, "bytes": 0, "patches": 0}

    def _frame(event):
        data = event["response"].get("payloadData", "")
        frames["n"] += 1
        frames["bytes"] += len(data)
        frames["patches"] += "PATCH-DOC" in data[:300] and '"msgtype"' in data[:300]

    cdp.on("Network.webSocketFrameReceived", _frame)
    await page.goto(url)
    await page.locator(".bk-Canvas:visible").first.wait_for(state="visible")
    await page.locator(".bk-tab", has_text="Zero-shot labels").first.wait_for(state="visible")
    return ctx, page, cdp


async def _settle(pid: int) -> None:
    """Wait until the server and the browser are both idle (under 6 % and 10 % of a core over 0.5 s)."""
    while True:
        c0, b0 = cpu_seconds(pid), chromium_seconds()
        await asyncio.sleep(0.5)
        if cpu_seconds(pid) - c0 < 0.03 and chromium_seconds() - b0 < 0.05:
            return


async def _cycle(page, pid: int, n: int) -> None:
    """The load benchmark's cycle of one session, step by step: a query, zero-shot labels (the map turns to
    categories), back to the query tab, another query (the map turns back to scores), a DE run, back again.
    Each step is measured until server and browser are idle; prints server and all-Chromium CPU per step."""
    def tab(name):
        return page.locator(".bk-tab", has_text=name).first.click()

    steps = [("query", lambda: _query(page, "B cells")),
             ("zero-shot tab", lambda: tab("Zero-shot labels")),
             ("zero-shot run", lambda: page.get_by_role("button", name="Label cells").click()),
             ("query tab", lambda: tab("Query")),
             ("query after zero-shot", lambda: _query(page, "T cells")),
             ("DE tab", lambda: tab("DE + enrichment")),
             ("DE run", lambda: page.get_by_role("button", name="Run DE").click()),
             ("query tab", lambda: tab("Query"))]
    first = [[0.0, 0.0] for _ in steps]  # a new page's first cycle: its first query draws the score map, the
    totals = [[0.0, 0.0] for _ in steps]  # tabs' first opening builds their views
    for k in range(n + 1):
        for i, (_, step) in enumerate(steps):
            b0, c0 = chromium_seconds(), cpu_seconds(pid)
            await step()
            await _settle(pid)
            into = first if k == 0 else totals
            into[i][0] += chromium_seconds() - b0
            into[i][1] += cpu_seconds(pid) - c0
    print(f"cycle, {n} times after a new page's first, one session; cpu cores {os.cpu_count()}; CPU per step (each "
          "measured until idle, so it includes up to 0.05 s of the browser's idle time):")
    for (name, _), (b, c), (b1, c1) in zip(steps, totals, first):
        print(f"    {name:22s} all Chromium {1000 * b / n:5.0f} ms, server {1000 * c / n:5.0f} ms; "
              f"first cycle {1000 * b1:5.0f} / {1000 * c1:5.0f} ms")
    print(f"    {'whole cycle':22s} all Chromium {1000 * sum(t[0] for t in totals) / n:5.0f} ms, "
          f"server {1000 * sum(t[1] for t in totals) / n:5.0f} ms; first cycle "
          f"{1000 * sum(t[0] for t in first):5.0f} / {1000 * sum(t[1] for t in first):5.0f} ms")


async def _idle(pid: int, window: float = 2.0, limit: float = 180.0) -> None:
    """Wait until the server is idle (under 5 % of a core over ``window`` seconds): its warm-up (embeddings,
    layout, neighbour graph) runs in the background after the first page and would be counted otherwise."""
    t_end = time.time() + limit
    while time.time() < t_end:
        c0 = cpu_seconds(pid)
        await asyncio.sleep(window)
        if cpu_seconds(pid) - c0 < 0.05 * window:
            return


async def run(args) -> None:
    from playwright.async_api import async_playwright

    port = bl._free_port()
    url = f"http://127.0.0.1:{port}/"
    server_args = argparse.Namespace(data=None, model=None, server_log=None,
                                     server_script=os.environ.get("LEXICELL_BENCH_SERVER_SCRIPT"))
    with tempfile.TemporaryDirectory(prefix="lexicell-cost-") as save_dir:
        server = bl.start_server(server_args, port, save_dir)
        try:
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=bl.CHROMIUM, args=bl.ARGS)
                ctx, page, cdp = await _open(browser, url)  # the first page waits for model and embeddings
                await _first_query(page)
                if args.action == "page-load":
                    await ctx.close()
                    for i in range(args.n):
                        c0, t0 = cpu_seconds(server.pid), time.perf_counter()
                        ctx, page, cdp = await _open(browser, url)
                        dt = time.perf_counter() - t0
                        await asyncio.sleep(1)
                        m = await _metrics(cdp)
                        print(f"page {i + 1}: ready in {dt:.2f} s; server CPU {cpu_seconds(server.pid) - c0:.2f} s, "
                              f"browser main thread {m['TaskDuration']:.2f} s")
                        await ctx.close()
                    return
                if args.action == "cycle":  # on a second page: the first one's query waited for the model
                    # and one zero-shot run, as bench_load.py's warm-up: the neighbour graph behind smoothed labels
                    # and the default labels' text embeddings are built once per process
                    await _tab_action(page, "Zero-shot labels", "Label cells", "zero-shot")
                    await ctx.close()
                    ctx, page, cdp = await _open(browser, url)
                    await _idle(server.pid)
                    await _cycle(page, server.pid, args.n)
                    return
                if args.after_tabs:  # as in a longer visit: zero-shot and DE done once, their tabs on the page
                    await _tab_action(page, "Zero-shot labels", "Label cells", "zero-shot")
                    await _tab_action(page, "DE + enrichment", "Run DE", "DE")
                await _idle(server.pid)
                m0, c0, b0, lat = await _metrics(cdp), cpu_seconds(server.pid), chromium_seconds(), []
                f0 = dict(cdp.frames)
                for i in range(args.n):
                    t0 = time.perf_counter()
                    if args.action == "query":
                        await _query(page, f"B cells {i}")
                    elif args.action == "zero-shot":
                        await _tab_action(page, "Zero-shot labels", "Label cells", "zero-shot")
                    else:
                        await _tab_action(page, "DE + enrichment", "Run DE", "DE")
                    lat.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.5)
                m1, c1, b1 = await _metrics(cdp), cpu_seconds(server.pid), chromium_seconds()
                f1 = dict(cdp.frames)
                await browser.close()
        finally:
            server.terminate()
            server.wait(30)
    n = args.n
    print(f"{args.action}, {n} times, one session; cpu cores {os.cpu_count()}")
    print(f"server CPU per action {1000 * (c1 - c0) / n:.0f} ms")
    print("browser main thread per action: " + ", ".join(
        f"{k.replace('Duration', '').lower()} {1000 * (m1[k] - m0.get(k, 0)) / n:.0f} ms" for k in METRICS))
    print(f"all Chromium processes (renderer, compositor, browser) per action {1000 * (b1 - b0) / n:.0f} ms CPU")
    print(f"latency median {statistics.median(lat):.2f} s, max {max(lat):.2f} s")
    print(f"websocket to the page per action: {(f1['patches'] - f0['patches']) / n:.1f} PATCH-DOC messages, "
          f"{(f1['n'] - f0['n']) / n:.1f} frames, {(f1['bytes'] - f0['bytes']) / n / 1024:.0f} KB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--action", choices=["query", "zero-shot", "de", "page-load", "cycle"], default="query")
    ap.add_argument("--n", type=int, default=20, help="how many times (default 20)")
    ap.add_argument("--after-tabs", action="store_true",
                    help="run zero-shot and DE once before measuring (their tabs' content is then on the page)")
    args = ap.parse_args(argv)
    if not Path(bl.CHROMIUM).exists():
        raise SystemExit(f"no Chromium at {bl.CHROMIUM} (apt-get install chromium)")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two versions of the app side by side: the load benchmark's cycle, its steps alternated between them.

    git archive HEAD~1 | tar -x -C /tmp/lexicell-base      # the code to compare against
    python bench/bench_ab.py --base /tmp/lexicell-base/run_app.py --n 5

Serves the demo twice (``--base``'s ``run_app.py`` and this tree's), opens one page of each in one Debian
Chromium and runs the cycle of ``bench/bench_page_cost.py --action cycle`` (a query, the zero-shot tab and a run,
back to the query tab, another query, the DE tab and a run, back) step by step, each step on both pages in turn
(which one goes first alternates), each measured until server and browser are idle. Printed per step, the median
over ``--n`` cycles (after one unmeasured) of: the page's main-thread time and its JavaScript part (Chrome
DevTools Protocol ``Performance.getMetrics``, that page alone), its server's CPU and the CPU of all Chromium
processes (both pages' share the browser, so this column is the noisier). Single runs of one version on this
machine vary by up to 40 %; alternating the versions step by step exposes both to the same moments.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_load as bl  # noqa: E402 - the same server start and browser
import bench_page_cost as pc  # noqa: E402 - the same page, query, idle checks and metrics


STEPS = ("query", "zero-shot tab", "zero-shot run", "query tab", "query after zero-shot", "DE tab", "DE run",
         "query tab again")


def _steps(page) -> list:
    def tab(name):
        return page.locator(".bk-tab", has_text=name).first.click()

    return [lambda: pc._query(page, "B cells"),
            lambda: tab("Zero-shot labels"),
            lambda: page.get_by_role("button", name="Label cells").click(),
            lambda: tab("Query"),
            lambda: pc._query(page, "T cells"),
            lambda: tab("DE + enrichment"),
            lambda: page.get_by_role("button", name="Run DE").click(),
            lambda: tab("Query")]


async def run(base_script: str, n: int) -> dict:
    """Serve both versions, run ``n`` measured cycles (after one unmeasured), print the medians; returns
    ``{(step, version): [(main-thread ms, script ms, server CPU ms, all-Chromium CPU ms), ...]}``."""
    from playwright.async_api import async_playwright

    servers, pages = {}, {}
    tmp = tempfile.TemporaryDirectory(prefix="lexicell-ab-")
    res = collections.defaultdict(list)
    try:
        for version, script in (("base", base_script), ("new", None)):
            port = bl._free_port()
            args = argparse.Namespace(data=None, model=None, server_log=None, server_script=script)
            servers[version] = (bl.start_server(args, port, tmp.name), f"http://127.0.0.1:{port}/")
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=bl.CHROMIUM, args=bl.ARGS)
            for version, (server, url) in servers.items():
                _, page, cdp = await pc._open(browser, url)
                await pc._first_query(page)
                pages[version] = (page, cdp, server, _steps(page))
            for _, _, server, _ in pages.values():
                await pc._idle(server.pid)
            for rep in range(n + 1):
                for i, name in enumerate(STEPS):
                    for version in (("base", "new") if (rep + i) % 2 == 0 else ("new", "base")):
                        page, cdp, server, steps = pages[version]
                        m0, c0, b0 = await pc._metrics(cdp), pc.cpu_seconds(server.pid), pc.chromium_seconds()
                        await steps[i]()
                        await pc._settle(server.pid)
                        m1, c1, b1 = await pc._metrics(cdp), pc.cpu_seconds(server.pid), pc.chromium_seconds()
                        if rep > 0:
                            res[(name, version)].append(
                                (1000 * (m1["TaskDuration"] - m0["TaskDuration"]),
                                 1000 * (m1["ScriptDuration"] - m0["ScriptDuration"]),
                                 1000 * (c1 - c0), 1000 * (b1 - b0)))
            await browser.close()
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(30)
        tmp.cleanup()
    print(f"{n} cycles; median per step, ms: page main thread / its JavaScript / server CPU / all Chromium")
    totals = collections.Counter()
    for name in STEPS:
        row = []
        for version in ("base", "new"):
            med = [statistics.median(x[k] for x in res[(name, version)]) for k in range(4)]
            for k in range(4):
                totals[(version, k)] += med[k]
            row.append(f"{version} {med[0]:4.0f} / {med[1]:4.0f} / {med[2]:4.0f} / {med[3]:4.0f}")
        print(f"  {name:22s} " + "   ".join(row))
    print(f"  {'whole cycle':22s} " + "   ".join(
        f"{v} " + " / ".join(f"{totals[(v, k)]:4.0f}" for k in range(4)) for v in ("base", "new")))
    return dict(res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="run_app.py of the version to compare against")
    ap.add_argument("--n", type=int, default=5, help="measured cycles (default 5)")
    args = ap.parse_args(argv)
    if not Path(bl.CHROMIUM).exists():
        raise SystemExit(f"no Chromium at {bl.CHROMIUM} (apt-get install chromium)")
    asyncio.run(run(args.base, args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

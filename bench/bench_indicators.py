"""What an animated progress indicator costs a browser page while it shows.

    python bench/bench_indicators.py            # 5 pages per indicator, 10 s each

Serves small Panel pages, each showing one indicator (Panel's animated indeterminate ``Progress``, the same
with its CSS animation stepped, a still one as ``app.views.common.Job`` shows, Panel's ``LoadingSpinner``),
opens ``--pages`` of each in Debian's Chromium (headless, no GPU: software rendering, as the load benchmark's
pages) and prints the CPU time of all Chromium processes over ``--seconds``, as a percentage of one core.
Used for ``docs/serving-performance.md`` (2026-12-03: 65-76 % of a core for 5 pages with the animated bar,
0.4 % with a still one), which is why a job's progress bar stands still.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import panel as pn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_load as bl  # noqa: E402 - the same browser and CPU readings
import bench_page_cost as bpc  # noqa: E402

STEPPED = ("progress.active:not([value])::-webkit-progress-bar, progress.active:not([value])::before "
           "{ animation-timing-function: steps(4, end); animation-duration: 2s; }")
PAGES = {
    "animated Progress (Panel's default)": lambda: pn.indicators.Progress(value=-1, active=True, width=160,
                                                                          height=16, bar_color="primary"),
    "animated Progress, stepped CSS": lambda: pn.indicators.Progress(value=-1, active=True, width=160, height=16,
                                                                     bar_color="primary", stylesheets=[STEPPED]),
    "still Progress (Lexicell's Job)": lambda: pn.indicators.Progress(value=-1, active=False, width=160,
                                                                      height=16, bar_color="primary"),
    "LoadingSpinner": lambda: pn.indicators.LoadingSpinner(value=True, width=30, height=30),
}


async def run(args) -> None:
    from playwright.async_api import async_playwright

    port = bl._free_port()
    routes = {f"p{i}": fn for i, fn in enumerate(PAGES.values())}
    server = pn.serve(routes, port=port, show=False, threaded=True)
    time.sleep(2)
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=bl.CHROMIUM, args=bl.ARGS)
            print(f"{args.pages} pages per indicator, {args.seconds:g} s; cpu cores {bl.os.cpu_count()}")
            for route, name in zip(routes, PAGES):
                contexts = []
                for _ in range(args.pages):
                    ctx = await browser.new_context()
                    page = await ctx.new_page()
                    await page.goto(f"http://127.0.0.1:{port}/{route}")
                    contexts.append(ctx)
                await asyncio.sleep(3)  # loaded and drawn
                c0 = bpc.chromium_seconds()
                await asyncio.sleep(args.seconds)
                used = bpc.chromium_seconds() - c0
                print(f"    {name:38s} all Chromium {100 * used / args.seconds:5.1f} % of a core", flush=True)
                for ctx in contexts:
                    await ctx.close()
            await browser.close()
    finally:
        server.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=5, help="pages showing each indicator at once (default 5)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds measured per indicator (default 10)")
    args = ap.parse_args(argv)
    if not Path(bl.CHROMIUM).exists():
        raise SystemExit(f"no Chromium at {bl.CHROMIUM} (apt-get install chromium)")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An in-place recolouring of the map, in-process: Lexicell's direct path against HoloViews' operations.

    python bench/bench_recolour.py            # 24 queries each way on the demo, alternating, 3 repeats
    python bench/bench_recolour.py --n 48

One session's state and map view (no server, no browser) with the map rendered into a Bokeh document, as in
a page. Each query is scored and the shown map recoloured: once through ``app.plots.recolour_rendered``
(datashader on the canvas shown, Bokeh models replaced directly; the app's path) and once with it disabled,
so the pipe is triggered and HoloViews' operation chain redraws (the path before 2026-12-03). Both run in the
same process, alternating in blocks, and the ratio is what to compare between machines. Printed: median
milliseconds per query (scoring + map redraw + side chart) for each path and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QUERIES = ["B cells", "NK cells", "monocytes", "dendritic cells", "platelets", "megakaryocytes",
           "CD8 T cells", "naive T cells"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="queries per path and repeat (default 24)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating blocks per path (default 3)")
    args = ap.parse_args(argv)

    from bokeh.document import Document

    import engine
    from app import cache, plots
    from app.state import AppState
    from app.views import map as map_view

    adata = cache.dataset_future(None).result()
    model = cache.model_future(None).result()
    if "transcriptome_embeds" not in adata.obsm:
        engine.embed_cells(adata, model, progress=False)
    plots.warm_up()
    state = AppState(cache.session_adata(adata), model)
    view = map_view.MapView(state)
    state.run_query("T cells")
    view.plot.get_root(Document())  # rendered, as in a page

    direct = plots.recolour_rendered
    times: dict[str, list[float]] = {"direct (recolour_rendered)": [], "HoloViews operations": []}
    k = 0
    for _ in range(args.repeats):
        for name in times:
            # the app's MapView looks the function up on app.plots at each call
            plots.recolour_rendered = direct if name.startswith("direct") else (lambda *a, **kw: False)
            try:
                for _ in range(args.n):
                    k += 1
                    t0 = time.perf_counter()
                    state.run_query(f"{QUERIES[k % len(QUERIES)]} {k}")  # a new text each time: scored anew
                    times[name].append(time.perf_counter() - t0)
            finally:
                plots.recolour_rendered = direct
    print(f"demo, {state.n_cells:,} cells; {args.n} queries x {args.repeats} blocks per path; cpu cores {os.cpu_count()}")
    med = {name: 1000 * statistics.median(v) for name, v in times.items()}
    for name, ms in med.items():
        print(f"  {name}: median {ms:.1f} ms per query (scoring + map redraw + side chart)")
    a, b = med.values()
    print(f"  ratio HoloViews / direct: {b / a:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

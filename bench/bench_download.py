"""Memory and event-loop time of "Download .h5ad": the old in-memory path against the file-based one.

    python bench/bench_download.py                      # 50,000 synthetic cells x 2,000 genes
    python bench/bench_download.py --cells 100000

Each path runs in a fresh process on the same synthetic dataset and prints its peak RSS above the loaded data
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) and the
time it would hold the event loop:

- ``old``: what the page did before (issue 20 item 2): write the .h5ad to a temporary file, read all its bytes,
  base64-encode them (``FileDownload`` sends a data URL), all inside the click callback on the event loop;
- ``new``: ``AppState.download_file`` in a worker thread (the event loop only awaits it), then the size check;
  files above ``--max-download-mb`` are never read back; smaller ones are read and encoded when the user clicks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> float:
    """A /proc/self/status figure in MB (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> float:
    """Reset the peak-RSS counter (Linux: ``echo 5 > /proc/self/clear_refs``); returns the RSS now in MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # pragma: no cover - not Linux: the peak then includes building the data
        pass
    return _status("VmRSS")


def child(mode: str, cells: int, genes: int, limit_mb: float) -> dict:
    sys.path.insert(0, str(ROOT))
    import asyncio
    import base64

    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from app.state import AppState

    rng = np.random.default_rng(0)
    X = sp.random(cells, genes, density=0.05, format="csr", dtype=np.float32, random_state=rng)
    X.data = np.ceil(X.data * 20)
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(cells)]),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(genes)]))
    adata.obsm["X_umap"] = rng.normal(size=(cells, 2)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        st = AppState(adata, None, save_dir=d, max_download_bytes=int(limit_mb * 2**20))
        base = _reset_peak()
        if mode == "old":
            t0 = time.perf_counter()
            data = st.h5ad_bytes()
            b64 = base64.b64encode(data).decode("utf-8")
            loop_s = time.perf_counter() - t0
            size = len(data)
            del data, b64
        else:
            async def run():
                t0 = time.perf_counter()
                p = await asyncio.to_thread(st.download_file)
                total = time.perf_counter() - t0
                t1 = time.perf_counter()
                refused = st.download_too_large(p) is not None
                return p.stat().st_size, total, time.perf_counter() - t1, refused

            size, _total, loop_s, refused = asyncio.run(run())
        peak = _status("VmHWM")
    out = {"mode": mode, "file_mb": size / 2**20, "rss_before_mb": base, "peak_rss_mb": peak, "loop_s": loop_s}
    if mode == "new":
        out["refused"] = refused
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--max-download-mb", type=float, default=20.0,
                    help="the limit used by the new path here (the app's default is 200)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.cells, args.genes, args.max_download_mb)))
        return 0
    print(f"{args.cells:,} cells x {args.genes:,} genes (5 % non-zero); load average {os.getloadavg()}")
    for mode in ("old", "new"):
        res = subprocess.run([sys.executable, __file__, "--child", mode, "--cells", str(args.cells), "--genes",
                              str(args.genes), "--max-download-mb", str(args.max_download_mb)],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        extra = f", refused above {args.max_download_mb:g} MB: {r['refused']}" if mode == "new" else ""
        print(f"  {mode}: file {r['file_mb']:.0f} MB, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['peak_rss_mb'] - r['rss_before_mb']:.0f} MB over the loaded data), "
              f"event loop held {r['loop_s']:.2f} s{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

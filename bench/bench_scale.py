"""Atlas scale (issue 17): embedding, layout and scoring of a synthetic 1M x 20k counts file opened backed.

    python bench/bench_scale.py                      # 1,000,000 cells (the file is written once to /tmp)
    python bench/bench_scale.py --cells 100000       # smaller
    nice -n 10 python bench/bench_scale.py --skip-layout

The file (``/tmp/lexicell_scale_{cells}x{genes}.h5ad``) holds raw counts with a realistic sparsity: genes per
cell log-normal around 1,000 (clipped to 200-6,000, so ~5 % of 20,000 genes non-zero), genes drawn from a
power-law popularity, counts >= 1 with a geometric tail. 18,539 genes are the bundled model's Ensembl IDs, the
rest unmapped names. It is written chunk by chunk with h5py in anndata's CSR layout.

Each stage runs in its own process, so its peak RSS (``VmHWM``) is its own:

1. in process: ``engine.embed_cells(engine.read(path, backed=True), model, store=...)`` (2 torch threads);
2. distributed: the same on a ``LocalCluster`` of 2 single-threaded worker processes; peak RSS of the client
   and of each worker (``ru_maxrss`` read on the workers before the cluster closes);
3. layout: ``engine.umap`` on the embeddings (sampled fit + transform above 200,000 cells);
4. scoring: ``engine.zero_shot`` with 16 labels and ``engine.score_text`` (a query recolour) over all cells.

Targets (issue 17, 2 cores): peak RSS <= 4 GB in both embedding modes, distributed >= 0.8 x the in-process
cells/s, layout <= 10 min, zero-shot over 1M cells <= 5 s, a query recolour <= 1 s. The app's first paint is
the app's own benchmark (printed as not measured here).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LABELS = ["T cell", "B cell", "natural killer cell", "monocyte", "dendritic cell", "plasma cell", "platelet",
          "erythrocyte", "neutrophil", "hematopoietic stem cell", "regulatory T cell", "CD8-positive T cell",
          "CD4-positive T cell", "macrophage", "mast cell", "plasmacytoid dendritic cell"]


def peak_rss_gb() -> float:
    """This process's peak resident set size (``VmHWM``) in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# --------------------------------------------------------------------------- synthetic data
def write_counts(path: Path, n_cells: int, n_genes: int, seed: int = 0, chunk: int = 50_000) -> None:
    """A cells x genes counts .h5ad written chunk by chunk (never the whole matrix in memory)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from tqdm.auto import tqdm

    from engine.models.checkpoint import load_model

    vocab = list(load_model().tokenizer.gene_ids)[:n_genes]
    names = vocab + [f"SYNTH{i:05d}" for i in range(n_genes - len(vocab))]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_genes)  # which gene is popular
    tmp = path.with_suffix(".partial.h5ad")
    obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)]))
    ad.AnnData(X=sp.csr_matrix((n_cells, n_genes), dtype=np.float32), obs=obs,
               var=pd.DataFrame(index=pd.Index(names))).write_h5ad(tmp)
    with h5py.File(tmp, "r+") as f:
        del f["X"]
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 20,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 20,))
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        nnz = 0
        for start in tqdm(range(0, n_cells, chunk), desc="Writing synthetic counts", unit="chunk"):
            m = min(chunk, n_cells - start)
            k = np.clip(rng.lognormal(np.log(1000), 0.45, size=m), 200, 6000).astype(np.int64)
            rows = np.repeat(np.arange(m), k)
            cols = perm[(n_genes * rng.random(rows.size) ** 2.2).astype(np.int64)]  # power-law popularity
            vals = rng.geometric(0.55, size=rows.size).astype(np.float32)
            block = sp.csr_matrix((vals, (rows, cols)), shape=(m, n_genes))
            block.sum_duplicates()
            block.sort_indices()
            data.resize((nnz + block.nnz,))
            indices.resize((nnz + block.nnz,))
            data[nnz:] = block.data
            indices[nnz:] = block.indices
            indptr[start + 1 : start + m + 1] = block.indptr[1:] + nnz
            nnz += block.nnz
        g.create_dataset("indptr", data=indptr)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- stages (each in its own process)
def stage_embed(path: str, store: str, workers: int, chunk: int | None) -> dict:
    import engine

    model = engine.load_model()
    adata = engine.read(path, backed=True)
    rss_before = peak_rss_gb()
    client = cluster = None
    if workers:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    t0 = time.perf_counter()
    emb = engine.embed_cells(adata, model, store=store, scheduler=client, chunk_size=chunk, progress=True)
    dt = time.perf_counter() - t0
    params = adata.uns["transcriptome_embeds"]["params"]
    out = {"seconds": dt, "cells_per_s": adata.n_obs / dt, "peak_rss_gb": peak_rss_gb(),
           "chunk_seconds_mean": params.get("chunk_seconds_mean"), "n_chunks": params.get("n_chunks"),
           "rss_after_model_gb": rss_before, "shape": list(emb.shape)}
    if client is not None:
        import resource

        def worker_peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

        peaks = client.run(worker_peak)
        out["worker_peak_rss_gb"] = sorted(peaks.values())
        client.close()
        cluster.close()
    return out


def stage_layout_and_scores(path: str, store: str, fit_cells: int) -> dict:
    import engine

    model = engine.load_model()
    t0 = time.perf_counter()
    adata = engine.read(path, backed=True)
    engine.read_embeddings(adata, store, model=model)
    open_s = time.perf_counter() - t0
    out = {"open_and_read_embeddings_s": open_s}
    engine.zero_shot(adata, model, LABELS[:2])  # warm the text tower once
    t0 = time.perf_counter()
    engine.zero_shot(adata, model, LABELS)
    out["zero_shot_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.score_text(adata, model, "cytotoxic lymphocytes MINUS naive cells")
    out["query_recolour_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.gene_values(adata, adata.var_names[0])
    out["gene_colour_s"] = time.perf_counter() - t0
    if fit_cells:
        t0 = time.perf_counter()
        engine.umap(adata, fit_cells=fit_cells)
        out["layout_s"] = time.perf_counter() - t0
        out["layout"] = dict(adata.uns["lexicell_layout"]["X_umap"])
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def run_stage(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--stage", *args]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--fit-cells", type=int, default=50_000, help="cells the sampled UMAP fit uses")
    p.add_argument("--skip-layout", action="store_true")
    p.add_argument("--keep-stores", action="store_true")
    p.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stage:
        kind, *rest = a.stage
        if kind == "embed":
            res = stage_embed(rest[0], rest[1], int(rest[2]), int(rest[3]) or None)
        else:
            res = stage_layout_and_scores(rest[0], rest[1], int(rest[2]))
        print(json.dumps(res))
        return 0
    path = Path(tempfile.gettempdir()) / f"lexicell_scale_{a.cells}x{a.genes}.h5ad"
    if not path.exists():
        t0 = time.perf_counter()
        write_counts(path, a.cells, a.genes)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lexicell_scale_"))
    chunk = str(a.chunk_size or 0)
    try:
        local = run_stage(["embed", str(path), str(work / "inproc.zarr"), "0", chunk])
        dist = run_stage(["embed", str(path), str(work / "dask.zarr"), str(a.workers), chunk])
        rest = run_stage(["scores", str(path), str(work / "dask.zarr"), "0" if a.skip_layout else str(a.fit_cells)])
    finally:
        if not a.keep_stores:
            shutil.rmtree(work, ignore_errors=True)
    n = a.cells
    print(f"\n== bench_scale: {n:,} cells x {a.genes:,} genes, backed .h5ad ({path.stat().st_size / 1e9:.1f} GB), "
          f"{os.cpu_count()} cores")
    print(f"embedding in process     : {local['cells_per_s']:,.0f} cells/s ({local['seconds']:.0f} s), "
          f"peak RSS {local['peak_rss_gb']:.2f} GB (model loaded: {local['rss_after_model_gb']:.2f} GB); "
          f"{local['chunk_seconds_mean']:.2f} s per chunk task")
    wk = dist.get("worker_peak_rss_gb", [])
    print(f"embedding on dask ({a.workers} wk) : {dist['cells_per_s']:,.0f} cells/s ({dist['seconds']:.0f} s), "
          f"peak RSS client {dist['peak_rss_gb']:.2f} GB, workers {', '.join(f'{w:.2f}' for w in wk)} GB "
          f"(sum {dist['peak_rss_gb'] + sum(wk):.2f} GB); {dist['chunk_seconds_mean']:.2f} s per chunk task")
    print(f"throughput ratio dask / in process: {dist['cells_per_s'] / local['cells_per_s']:.2f} (target >= 0.8)")
    if "layout_s" in rest:
        lay = rest["layout"]
        print(f"layout                   : {rest['layout_s']:.0f} s ({lay['method']}, fit on {lay['n_fit']:,} cells; "
              "target <= 600 s)")
    else:
        print("layout                   : skipped (--skip-layout)")
    print(f"zero-shot, 16 labels     : {rest['zero_shot_s']:.2f} s over {n:,} cells (target <= 5 s)")
    print(f"query recolour (engine)  : {rest['query_recolour_s']:.2f} s (engine.score_text; target <= 1 s)")
    print(f"gene colouring (backed)  : {rest['gene_colour_s']:.1f} s (engine.gene_values, one pass over the file)")
    print(f"open + read embeddings   : {rest['open_and_read_embeddings_s']:.1f} s (engine.read backed + "
          "engine.read_embeddings)")
    print("app first paint          : not measured here (the app serves backed files through its own code; "
          "see the app's benchmark)")
    print(json.dumps({"cells": n, "in_process": local, "dask": dist, "scores_layout": rest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

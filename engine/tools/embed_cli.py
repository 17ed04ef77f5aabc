"""``python -m engine.embed``: embed a (large) dataset in row chunks into a resumable zarr store.

::

    python -m engine.embed atlas.h5ad --out atlas.embeds.zarr                     # LocalCluster, 2 workers
    python -m engine.embed atlas.h5ad --workers 8 --out atlas.embeds.zarr
    python -m engine.embed atlas.zarr --scheduler tcp://10.0.0.5:8786 --out atlas.embeds.zarr
    python -m engine.embed atlas.h5ad --in-process --out atlas.embeds.zarr

The data are opened backed (``.h5ad``/``.zarr``: expression stays on disk); the model goes to each worker once;
each chunk is written to the store as it finishes, and a rerun skips finished chunks. Serve the result with
``engine.read_embeddings(adata, STORE)`` (or ``engine.embed_cells(adata, model, store=STORE)``, which then
computes nothing).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 done, 2 refused: bad input, output or data)."""
    p = argparse.ArgumentParser(prog="python -m engine.embed",
                                description="Embed every cell of a dataset in row chunks into a resumable zarr store.")
    p.add_argument("data", help=".h5ad or .zarr (opened backed), or any format engine.read reads (into memory)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--out", required=True, help="zarr store to write, e.g. embeds.zarr (resumed when it exists)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, help="dask scheduler address, e.g. tcp://HOST:8786")
    where.add_argument("--workers", type=int, default=2, help="workers of the LocalCluster started when no "
                       "--scheduler is given (default 2)")
    where.add_argument("--in-process", action="store_true", help="no Dask: embed chunk after chunk in this process")
    p.add_argument("--threads-per-worker", type=int, default=1, help="LocalCluster threads per worker (default 1)")
    p.add_argument("--chunk-size", type=int, default=None, help="cells per chunk (default 10,000)")
    p.add_argument("--batch-size", type=int, default=2048, help="cells per forward pass")
    p.add_argument("--overwrite", action="store_true", help="replace a store that holds other data or another model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..errors import LexicellError
    from ..io.outputs import check_output_path
    from ..io.readers import read
    from ..models.checkpoint import load_model
    from .embed import embed_cells

    t0 = time.perf_counter()
    try:
        from pathlib import Path

        out = Path(args.out).expanduser()
        if not out.exists():  # an existing store is resumed; anything else is checked like every CLI output
            check_output_path(out, inputs=[args.data, args.model], flag="--out")
        elif out.resolve() in {Path(x).expanduser().resolve() for x in (args.data, args.model) if x}:
            check_output_path(out, inputs=[args.data, args.model], flag="--out")
        adata = read(args.data, backed=True)
        model = load_model(args.model) if args.model else load_model()
        scheduler = None if args.in_process else (args.scheduler or "local")
        if scheduler == "local":
            from distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=args.workers, threads_per_worker=args.threads_per_worker,
                                   dashboard_address=None)
            scheduler = Client(cluster)
        try:
            emb = embed_cells(adata, model, store=out, chunk_size=args.chunk_size, batch_size=args.batch_size,
                              scheduler=scheduler, overwrite=args.overwrite, progress=not args.quiet)
        finally:
            if scheduler is not None and not isinstance(scheduler, str):
                cluster = getattr(scheduler, "cluster", None)
                scheduler.close()
                if cluster is not None:
                    cluster.close()
    except LexicellError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = adata.uns["transcriptome_embeds"]["params"]
    dt = time.perf_counter() - t0
    print(f"{emb.shape[0]:,} cells x {emb.shape[1]} embedded into {out} ({params['chunks_computed']} chunks computed, "
          f"{params['chunks_skipped']} already done; {params['scheduler']}; {dt:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

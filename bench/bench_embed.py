"""Embedding throughput and query latency (issue 2 / issue 3 targets).

Prints:
- cells/s of the bundled default model's transcriptome tower (or ``--model``), on synthetic sparse counts (default 100,000 cells x 20,000 genes, ~1,000 expressed genes per cell,
  like 10x PBMC data), split into rank encoding and forward passes;
- same-run baselines: the pooling step through ``nn.EmbeddingBag(padding_idx=...)`` vs the functional call the
  tower makes, and a dense matrix product of the same cells with a random (n_genes, 384) matrix
  (``X @ W``), i.e. the cheapest linear "encoder" over all genes;
- query latency: text embedding of one query (all-MiniLM-L6-v2), and scoring 100k and 1M cells;
- neighbour smoothing of the embedded cells (``engine.smooth_embeds``), as a ratio to the embedding time.

Usage: ``python bench/bench_embed.py [--cells 100000] [--genes 20000] [--nnz 1000]``
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_counts(n_cells: int, n_genes: int, nnz: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    p = rng.pareto(1.2, n_genes) + 1e-3
    p /= p.sum()
    indptr = np.arange(0, (n_cells + 1) * nnz, nnz, dtype=np.int64)
    indices = np.empty(n_cells * nnz, dtype=np.int32)
    block = 10_000
    for s in range(0, n_cells, block):
        e = min(n_cells, s + block)
        cols = rng.choice(n_genes, size=(e - s, nnz * 2), p=p)
        cols.sort(axis=1)
        for i in range(e - s):  # unique genes per cell
            u = np.unique(cols[i])[:nnz]
            if u.size < nnz:
                u = np.unique(np.concatenate([u, rng.choice(n_genes, nnz, replace=False)]))[:nnz]
            indices[(s + i) * nnz : (s + i + 1) * nnz] = np.sort(u)
    data = rng.negative_binomial(2, 0.5, size=indices.size).astype(np.float32) + 1
    return sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--nnz", type=int, default=1_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from engine.models.checkpoint import load_model

    model = load_model(args.model, device="cpu").eval()
    tok = model.transcriptome_tower.tokenizer
    print(f"model: {args.model or 'bundled default'}; tower {model.transcriptome_tower.config()['type']} "
          f"{ {k: v for k, v in model.transcriptome_tower.config().items() if k not in ('type', 'tokenizer')} }, "
          f"max_length {tok.max_length}, vocabulary {tok.vocab_size:,}", flush=True)
    rng = np.random.default_rng(1)
    # the dataset's genes: most of the vocabulary plus genes the model does not know
    known = list(tok.gene_ids)
    genes = list(rng.permutation(known))[: int(args.genes * 0.925)]
    genes += [f"UNKNOWN{i}" for i in range(args.genes - len(genes))]
    print(f"synthetic data: {args.cells} cells x {args.genes} genes, {args.nnz} expressed genes per cell", flush=True)
    X = synthetic_counts(args.cells, args.genes, args.nnz)
    tok.encode_matrix(X[:100], genes)  # compile the numba kernel outside the timing
    t0 = time.perf_counter()
    enc = tok.encode_matrix(X, genes)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = model.embed_encoding(enc, batch_size=4096)
    t_fwd = time.perf_counter() - t0
    total = t_enc + t_fwd
    print(f"rank encoding: {t_enc:.2f} s ({args.cells / t_enc:,.0f} cells/s)")
    print(f"tower + projection: {t_fwd:.2f} s ({args.cells / t_fwd:,.0f} cells/s)")
    print(f"default tower, end to end: {args.cells / total:,.0f} cells/s (goal >= 20,000)")

    # same-run baseline for the pooling step: nn.EmbeddingBag called with padding_idx (the slow CPU path the
    # tower used before) vs the functional call without it that SparseRankTower.forward makes
    tower = model.transcriptome_tower
    n_pool = min(args.cells, 16_384)
    ids = torch.from_numpy(enc.input_ids[:n_pool])
    mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(enc.lengths[:n_pool])[:, None]
    with torch.no_grad():
        w = tower.rank_weights(mask)
        bag = torch.nn.EmbeddingBag.from_pretrained(tower.gene_embeddings.weight, mode="sum",
                                                    padding_idx=tok.pad_token_id)
        timings = {}
        for label, fn in (("nn.EmbeddingBag(padding_idx=pad)", lambda i, ww: bag(i, per_sample_weights=ww)),
                          ("functional embedding_bag, no padding_idx",
                           lambda i, ww: torch.nn.functional.embedding_bag(i, tower.gene_embeddings.weight, mode="sum",
                                                                           per_sample_weights=ww))):
            fn(ids[:256], w[:256])
            t0 = time.perf_counter()
            for s in range(0, n_pool, 4096):
                fn(ids[s : s + 4096], w[s : s + 4096])
            timings[label] = time.perf_counter() - t0
            print(f"pooling only, {label}: {n_pool / timings[label]:,.0f} cells/s")
    slow, fast = timings.values()
    print(f"pooling speed-up of the functional call: {slow / fast:.1f}x")

    W = np.random.default_rng(2).standard_normal((args.genes, 384)).astype(np.float32)
    t0 = time.perf_counter()
    _ = X @ W
    t_lin = time.perf_counter() - t0
    print(f"baseline X @ W (all genes, sparse x dense): {t_lin:.2f} s ({args.cells / t_lin:,.0f} cells/s); "
          f"tower / baseline time ratio {total / t_lin:.2f}")

    model.embed_texts(["warm-up"])
    t0 = time.perf_counter()
    q = model.embed_texts(["structural cells with immune functions"], cache=False)
    t_text = time.perf_counter() - t0
    print(f"text embedding of one query: {t_text * 1000:.1f} ms")
    scale = float(model.logit_scale.detach().exp())
    for n in (100_000, 1_000_000):
        E = np.resize(emb, (n, emb.shape[1])).astype(np.float32)
        E @ q[0]
        reps = []
        for _ in range(5):
            t0 = time.perf_counter()
            s = (E @ q[0]) * scale
            reps.append(time.perf_counter() - t0)
        print(f"scoring {n:,} cells: {min(reps) * 1000:.1f} ms (goal < 100 ms for 1M)")
    del s

    # neighbour smoothing (the app's zero-shot default; computed once per dataset): the kNN graph dominates
    import anndata as ad

    import engine

    a = ad.AnnData(obsm={"transcriptome_embeds": emb}, shape=(emb.shape[0], 0))
    t0 = time.perf_counter()
    engine.smooth_embeds(a)
    t_smooth = time.perf_counter() - t0
    print(f"neighbour smoothing of {emb.shape[0]:,} cells (k = 15 graph + averaging): {t_smooth:.1f} s; "
          f"smoothing / embedding time ratio {t_smooth / total:.2f}")


if __name__ == "__main__":
    main()

"""Speed of in-silico perturbation (engine.tools.perturbation.perturb / perturb_scan).

Builds a random model (SparseRankTower, hidden 256, 2 blocks, over a vocabulary of
~20,000 genes, rank encoding of max_length 256; a tiny random 2-layer BERT as text
tower) and a synthetic dataset (default 1,000 cells, ~1,000 expressed genes per cell,
gene detection rates spread Zipf-like so that some genes are in almost every cell),
then times

* as the same-run baseline, embedding the 1,000 unperturbed cells: end to end
  (``embed_cells``, no cache) and the forward passes alone (``model.embed_encoding``);
* ``perturb(adata, model, gene, query=...)`` deleting one gene in all 1,000 cells (the
  most frequently expressed gene, so nearly every cell is re-embedded), and the same
  with ``mode="overexpress"``;
* ``perturb_scan(adata, model, query=..., max_cells=500, max_genes=200)`` (delete).

Targets: one gene deleted in 1,000 cells under 2 s; a scan of 200 genes x 500 cells
under 60 s. A warm-up call first compiles the numba tokenizer and loads the gene
tables, so the figures are steady-state (best of ``--repeats``).

Usage: ``python bench/bench_perturb.py [--cells 1000] [--genes 20000] [--expressed 1000]
[--scan-cells 500] [--scan-genes 200] [--repeats 3] [--overexpress-scan]``
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def synthetic(n_cells: int, n_genes: int, n_expressed: int, seed: int = 0):
    """Counts with ~``n_expressed`` detected genes per cell; gene popularity decays Zipf-like."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    pop = 1.0 / (np.arange(n_genes) + 50.0) ** 0.9
    pop = pop[rng.permutation(n_genes)]
    p = pop / pop.sum()
    rows, cols, vals = [], [], []
    for i in range(n_cells):
        k = int(np.clip(rng.normal(n_expressed, n_expressed * 0.15), 50, n_genes))
        g = rng.choice(n_genes, size=k, replace=False, p=p)
        rows.append(np.full(k, i))
        cols.append(g)
        vals.append(1 + rng.poisson(rng.gamma(0.6, 4.0, size=k)))
    X = sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_cells, n_genes),
    )
    var = pd.DataFrame(index=[f"ENSG{j:011d}" for j in range(n_genes)])
    obs = pd.DataFrame({"state": pd.Categorical(rng.choice(["a", "b"], size=n_cells))},
                       index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=X, obs=obs, var=var)


def build_model(var_names, max_length: int, seed: int = 0):
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from engine.models.model import TranscriptomeTextModel
    from engine.models.tokenizer import RankTokenizer
    from engine.models.towers import SparseRankTower, TextTower, default_text_model_path

    torch.manual_seed(seed)
    text_dir = Path(tempfile.mkdtemp(prefix="lexicell_bench_bert_"))
    tok = BertTokenizerFast(vocab_file=str(default_text_model_path() / "vocab.txt"), do_lower_case=True)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(text_dir)
    tok.save_pretrained(text_dir)
    rng = np.random.default_rng(seed)
    medians = rng.lognormal(0.0, 0.5, size=len(var_names))
    rank_tok = RankTokenizer(list(var_names), gene_medians=medians, symbols=[f"G{j}" for j in range(len(var_names))],
                             max_length=max_length)
    tower = SparseRankTower(rank_tok, hidden_size=256, n_layers=2, dropout=0.0)
    text = TextTower(text_dir, pooling="mean", max_length=32)
    return TranscriptomeTextModel(tower, text, projection_dim=256, name="bench").eval()


def best(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--expressed", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--scan-cells", type=int, default=500)
    ap.add_argument("--scan-genes", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overexpress-scan", action="store_true", help="also time an overexpress scan")
    args = ap.parse_args()

    import torch

    from engine.tools.embed import embed_cells
    from engine.tools.perturbation import perturb, perturb_scan

    t0 = time.perf_counter()
    adata = synthetic(args.cells, args.genes, args.expressed)
    model = build_model(adata.var_names, args.max_length)
    print(f"synthetic data: {adata.n_obs} cells x {adata.n_vars} genes, "
          f"{adata.X.nnz / adata.n_obs:.0f} expressed genes per cell; model: SparseRankTower hidden 256, 2 blocks, "
          f"max_length {args.max_length}, vocab {len(model.tokenizer.gene_ids)}; built in {time.perf_counter() - t0:.1f} s; "
          f"CPUs: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, device: {model.device}")

    query = "A sample of B cells MINUS T cells"
    # warm-up: numba compilation, gene tables, text embedding cache
    perturb(adata[:50].copy(), model, "G0", query=query, progress=False)
    embed_cells(adata[:50].copy(), model, use_cache=False, progress=False)

    t_embed, _ = best(lambda: embed_cells(adata, model, use_cache=False, progress=False), args.repeats)
    enc = model.tokenizer.encode_matrix(adata.X, adata.var).trimmed()
    t_fwd, _ = best(lambda: model.embed_encoding(enc, batch_size=512), args.repeats)
    print(f"baseline: embedding {adata.n_obs} unperturbed cells: {t_embed:.2f} s end to end (embed_cells, no cache), "
          f"{t_fwd:.2f} s forward passes alone")

    counts = np.bincount(enc.input_ids[enc.attention_mask], minlength=model.tokenizer.vocab_size)
    top_token = int(counts.argmax())
    gene = model.tokenizer.token_to_gene([top_token])[0]
    t_del, df = best(lambda: perturb(adata, model, gene, query=query, progress=False), args.repeats)
    print(f"perturb delete 1 gene ({gene}, present in {int(df['gene_present'].sum())} cells) in {len(df)} cells: "
          f"{t_del:.2f} s (target < 2 s; mean delta_logit {df['delta_logit'].mean():+.4f})")
    t_ov, df = best(lambda: perturb(adata, model, gene, mode="overexpress", query=query, progress=False), args.repeats)
    print(f"perturb overexpress 1 gene in {len(df)} cells: {t_ov:.2f} s")
    goal = (adata.obs["state"] == "b").to_numpy()
    t_goal, df = best(lambda: perturb(adata, model, gene, query=query, goal=goal, progress=False), args.repeats)
    print(f"perturb delete 1 gene with query and goal cells (goal re-embedded, no obsm): {t_goal:.2f} s")

    t_scan, res = best(lambda: perturb_scan(adata, model, query=query, max_cells=args.scan_cells,
                                            max_genes=args.scan_genes, progress=False), 1)
    n_rows = int(res["n_cells_perturbed"].sum())
    print(f"perturb_scan delete {len(res)} genes x {res.attrs['n_cells']} cells ({n_rows} perturbed cells embedded): "
          f"{t_scan:.1f} s (target < 60 s; {n_rows / t_scan:,.0f} perturbed cells/s)")
    if args.overexpress_scan:
        t_scan, res = best(lambda: perturb_scan(adata, model, query=query, mode="overexpress", max_cells=args.scan_cells,
                                                max_genes=args.scan_genes, progress=False), 1)
        n_rows = int(res["n_cells_perturbed"].sum())
        print(f"perturb_scan overexpress {len(res)} genes x {res.attrs['n_cells']} cells ({n_rows} embedded): {t_scan:.1f} s")


if __name__ == "__main__":
    main()

"""Embedding throughput: Geneformer 12L-30M tower vs Lexicell's default sparse rank tower, same run, same cells.

* Geneformer V1 ``gf-12L-30M`` at full size (``BertForMaskedLM`` config: hidden 512, 12 layers, 8 heads,
  intermediate 1,024, ReLU, 2,048 positions, vocabulary 25,426), random weights, as
  :class:`engine.models.geneformer.GeneformerTower` (second-to-last layer, mean over genes; the last layer is
  skipped), input up to 2,048 tokens;
* :class:`engine.models.towers.SparseRankTower` (hidden 256, 2 blocks) over a 20,000-gene vocabulary, input
  ``max_length`` 256.

Synthetic cells: 20,000 genes (a subset of the Geneformer vocabulary), each cell with about ``--genes-per-cell``
(default 1,500) expressed genes, geometric counts. Both towers see the same cells (Geneformer the first
``--gf-cells``). Throughput counts tokenization (rank encoding) plus the tower's forward pass
(``torch.no_grad``, ``eval``, batches of 8 and 2,048 cells), after one warm-up batch; the projection heads are
excluded (they cost the same for both). CPU times are printed too, which helps on a shared machine; Geneformer
stops early after ``--gf-budget`` seconds so the run stays under 5 minutes.

Usage: ``python bench/bench_geneformer.py [--quick] [--gf-cells 64] [--sparse-cells 20000] [--device cpu]``
(``--quick``: 8 Geneformer cells, 2,000 sparse cells). Finishes in well under 5 minutes on 2 CPU cores.

Teacher vs distilled student (``engine.training.distill``), same cells, same run: the full path of each model (rank
encoding + tower + head, :func:`engine.training.distill.throughput`) in cells/s and their ratio. With
``--teacher DIR --student DIR [--data FILE.h5ad]`` the real folders are timed (default cells: synthetic
counts over the teacher's genes, ``--gf-cells`` of them, ``--genes-per-cell`` expressed); without them the
tiny test formats are used: the golden CellWhisperer checkpoint of ``tests/cw_lightning.py`` (tiny
Geneformer, tiny BERT) converted with ``python -m engine.convert cellwhisperer`` and distilled on 300
synthetic cells (those figures describe tiny models, not the real ones). ``--distilled-only`` skips the
Geneformer-vs-sparse comparison above; ``--skip-distilled`` skips this one.
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

GF_VOCAB = 25_426  # <pad>, <mask> + 25,424 genes
DATA_GENES = 20_000


def synthetic_counts(n_cells: int, n_genes: int, per_cell: int, seed: int = 0, block: int = 500) -> sp.csr_matrix:
    """Each cell expresses exactly ``per_cell`` distinct genes, drawn without replacement with log-normal gene
    popularity (Gumbel top-k), with geometric counts."""
    rng = np.random.default_rng(seed)
    logp = rng.normal(0, 1.5, size=n_genes).astype(np.float32)
    per_cell = min(per_cell, n_genes)
    cols = np.empty((n_cells, per_cell), dtype=np.int32)
    for s in range(0, n_cells, block):
        m = min(block, n_cells - s)
        keys = logp[None, :] + rng.gumbel(size=(m, n_genes)).astype(np.float32)
        cols[s : s + m] = np.argpartition(-keys, per_cell - 1, axis=1)[:, :per_cell]
    cols.sort(axis=1)
    data = rng.geometric(0.35, size=cols.size).astype(np.float32)
    indptr = np.arange(0, cols.size + 1, per_cell, dtype=np.int64)
    return sp.csr_matrix((data, cols.ravel(), indptr), shape=(n_cells, n_genes))


def gene_ids(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(1, n + 1)]


def build_geneformer(device):
    from transformers import BertConfig

    from engine.models.geneformer import GeneformerTokenizer, GeneformerTower

    rng = np.random.default_rng(1)
    ids = gene_ids(GF_VOCAB - 2)
    tok = GeneformerTokenizer(ids, np.arange(2, GF_VOCAB), rng.lognormal(0, 1, size=len(ids)), max_length=2048)
    cfg = BertConfig(
        vocab_size=GF_VOCAB, hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=1024,
        hidden_act="relu", max_position_embeddings=2048, hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return GeneformerTower(tok, cfg, version="V1").eval().to(device)


def build_sparse(device):
    from engine.models.tokenizer import RankTokenizer
    from engine.models.towers import SparseRankTower

    rng = np.random.default_rng(2)
    tok = RankTokenizer(gene_ids(DATA_GENES), gene_medians=rng.lognormal(0, 1, size=DATA_GENES), max_length=256)
    torch.manual_seed(0)
    return SparseRankTower(tok, hidden_size=256, n_layers=2, dropout=0.0).eval().to(device)


def embed(tower, X, genes, batch: int, device, budget_s: float | None = None):
    """Tokenize + forward in batches until done or ``budget_s`` is spent.

    Returns (cells done, wall s, cpu s, tokenize wall s, mean tokens per cell).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    enc = tower.tokenizer.encode_matrix(X, genes)
    t_tok = time.perf_counter() - t0
    done = 0
    with torch.no_grad():
        for s in range(0, len(enc), batch):
            idx = np.arange(s, min(s + batch, len(enc)))
            w = max(int(enc.lengths[idx].max()), 1)
            ids = torch.from_numpy(enc.input_ids[idx, :w]).to(device)
            mask = torch.arange(w, device=device)[None, :] < torch.from_numpy(enc.lengths[idx]).to(device)[:, None]
            tower(ids, mask)
            done += idx.size
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
    # tokenization of cells that were not embedded is not counted
    wall = time.perf_counter() - t0 - t_tok * (1 - done / len(enc))
    return done, wall, time.process_time() - c0, t_tok * done / len(enc), float(enc.lengths[:done].mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 Geneformer cells, 2,000 sparse-tower cells")
    ap.add_argument("--gf-cells", type=int, default=None, help="cells through Geneformer (default 64)")
    ap.add_argument("--sparse-cells", type=int, default=None, help="cells through the sparse tower (default 20,000)")
    ap.add_argument("--genes-per-cell", type=int, default=1500, help="expressed genes per cell (default 1,500)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--gf-budget", type=float, default=120.0,
                    help="stop Geneformer after this many seconds (keeps the run under 5 minutes on a busy machine)")
    ap.add_argument("--teacher", type=Path, help="teacher model folder (e.g. converted CellWhisperer) for the distillation timing")
    ap.add_argument("--student", type=Path, help="its distilled student (python -m engine.distill --out)")
    ap.add_argument("--data", type=Path, help="cells to time teacher and student on (default: synthetic counts)")
    ap.add_argument("--distilled-only", action="store_true", help="only the teacher-vs-student comparison")
    ap.add_argument("--skip-distilled", action="store_true", help="skip the teacher-vs-student comparison")
    args = ap.parse_args(argv)
    if (args.teacher is None) != (args.student is None):
        ap.error("--teacher and --student go together")
    if args.distilled_only:
        return compare_distilled(args)
    gf_cells = args.gf_cells or (8 if args.quick else 64)
    sp_cells = args.sparse_cells or (2000 if args.quick else 20_000)
    device = torch.device(args.device)
    n_data = max(gf_cells, sp_cells)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    t = time.perf_counter()
    n_unique = min(n_data, 2000)
    X = synthetic_counts(n_unique, DATA_GENES, args.genes_per_cell)
    if n_data > n_unique:  # tile: throughput does not depend on which cells repeat
        X = sp.vstack([X] * -(-n_data // n_unique), format="csr")[:n_data]
    genes = gene_ids(DATA_GENES)
    print(f"synthetic data: {n_data:,} cells ({n_unique:,} distinct) x {DATA_GENES:,} genes, "
          f"{X.nnz / n_data:,.0f} expressed genes per cell ({time.perf_counter() - t:.1f} s)")

    gf = build_geneformer(device)
    sr = build_sparse(device)
    n_params = sum(p.numel() for p in gf.parameters())
    print(f"Geneformer 12L-30M (random weights): {n_params / 1e6:.1f} M parameters; sparse rank tower: "
          f"{sum(p.numel() for p in sr.parameters()) / 1e6:.1f} M parameters")

    # warm-up (numba, oneDNN kernels, allocator)
    embed(gf, X[:2], genes, 2, device)
    embed(sr, X[:256], genes, 2048, device)

    gf_done, gf_wall, gf_cpu, gf_tok, gf_len = embed(gf, X[:gf_cells], genes, 8, device, budget_s=args.gf_budget)
    sp_done, sr_wall, sr_cpu, sr_tok, sr_len = embed(sr, X[:sp_cells], genes, 2048, device)
    gf_rate, sr_rate = gf_done / gf_wall, sp_done / sr_wall
    if gf_done < gf_cells:
        print(f"(Geneformer stopped after {gf_done} of {gf_cells} cells: --gf-budget {args.gf_budget:.0f} s)")
    print()
    print(f"{'tower':<34}{'cells':>8}{'tokens/cell':>13}{'wall s':>9}{'cpu s':>9}{'tokenize s':>12}"
          f"{'cells/s':>10}{'cells/cpu-s':>13}")
    rows = [("Geneformer 12L-30M (V1, 2,048)", gf_done, gf_len, gf_wall, gf_cpu, gf_tok),
            ("SparseRankTower h256 x2 (256)", sp_done, sr_len, sr_wall, sr_cpu, sr_tok)]
    for name, n, length, wall, cpu, tok in rows:
        print(f"{name:<34}{n:>8,}{length:>13,.0f}{wall:>9.2f}{cpu:>9.2f}{tok:>12.3f}{n / wall:>10,.2f}{n / cpu:>13,.2f}")
    print()
    print(f"sparse rank tower / Geneformer throughput: {sr_rate / gf_rate:,.0f}x (wall), "
          f"{(sp_done / sr_cpu) / (gf_done / gf_cpu):,.0f}x (CPU time)")
    print(f"time for 10,000 cells at this rate: Geneformer {10_000 / gf_rate / 60:,.1f} min, sparse tower {10_000 / sr_rate:,.1f} s")
    if not args.skip_distilled:
        print()
        compare_distilled(args)
    return 0


def _tiny_teacher_and_student(workdir: Path):
    """The tiny formats: golden CellWhisperer checkpoint -> convert -> distil on 300 synthetic cells."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    from conftest import GENES
    from cw_lightning import tiny_cellwhisperer
    from test_distill import make_cells

    from engine.io.data import expression_matrix
    from engine.training.distill import distill

    cells = make_cells(300)
    _, var = expression_matrix(cells, kind="counts")
    medians = np.random.default_rng(0).lognormal(0, 0.5, len(GENES))
    genes = [(e, s, float(m)) for e, s, m in zip(var["ensembl_id"], var["gene_symbol"], medians)]
    teacher = tiny_cellwhisperer(workdir, genes=genes)
    data = workdir / "cells.h5ad"
    cells.write_h5ad(data)
    student = workdir / "cellwhisperer-fast"
    distill(teacher, [data], student, hidden_size=64, batch_size=32, epochs=20, lr=3e-3, speed_budget_s=1.0,
            progress=False, verbose=False)
    return teacher, student, data


def compare_distilled(args) -> int:
    """Teacher vs distilled student: cells/s of each on the same cells in this run, and the ratio."""
    import tempfile

    import engine
    from engine.io.data import expression_matrix
    from engine.training.distill import throughput

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = args.teacher is None
        if tiny:
            print("teacher vs distilled student: tiny test formats (tests/cw_lightning.py), not the real models")
            teacher_dir, student_dir, data = _tiny_teacher_and_student(Path(tmp))
        else:
            teacher_dir, student_dir, data = args.teacher, args.student, args.data
        teacher = engine.load_model(teacher_dir, device=device)
        student = engine.load_model(student_dir, device=device)
        if data is not None:
            adata = engine.read(data)
            kind = "counts" if getattr(teacher.transcriptome_tower, "requires_counts", False) else "normalized"
            X, var = expression_matrix(adata, kind=kind)
            n = min(X.shape[0], args.gf_cells or X.shape[0])
            X = X[:n]
        else:
            genes = list(teacher.tokenizer.gene_ids)
            n = args.gf_cells or (8 if args.quick else 64)
            X, var = synthetic_counts(n, len(genes), args.genes_per_cell), genes
        throughput(teacher, X[:2], var)  # warm-up
        throughput(student, X[:2], var)
        t = throughput(teacher, X, var, budget_s=args.gf_budget)
        s = throughput(student, X, var, min_s=1.0)
    print(f"{'model':<44}{'cells':>8}{'wall s':>9}{'cpu s':>9}{'cells/s':>12}")
    for label, m, r in (("teacher " + teacher.name, teacher, t), ("student " + student.name, student, s)):
        print(f"{label[:43]:<44}{r['cells']:>8,}{r['seconds']:>9.2f}{r['cpu_seconds']:>9.2f}{r['cells_per_s']:>12,.1f}")
    print(f"student / teacher throughput: {s['cells_per_s'] / t['cells_per_s']:,.1f}x on {device} "
          f"({n} cells; the student repeats them for >= 1 s{', tiny models' if tiny else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

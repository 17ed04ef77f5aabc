"""Print the model card's demo figures for a model folder (default: the bundled model).

The zero-shot table itself comes from ``python -m engine.evaluate demo``; this prints the two summary ROC-AUCs
and the free-text table: Spearman rho of each query's score with scanpy's ``G2M_score`` / ``S_score`` over the
700 cells of ``pbmc68k_reduced`` (issue 3's proliferation target). Same code as the run tables
(``bench/recipe_run.py``'s ``demo_figures``). For reporting only: nothing is chosen by these figures.

``--cycle`` adds the analysis of what that target measures (model card, "What did not work"): which cell-cycle
genes the demo holds, how many cells scanpy calls G2M, how much of each score the cell types explain, and the
queries' correlations with the same scores computed on the 559 reference PBMCs (all genes). The cycle genes are
pegasus's "Cell cycle G1/S" / "Cell cycle G2/M" signatures (shipped in ``assets/genesets``), the Tirosh et al.
lists behind scanpy's scores.

Usage::

    python bench/card_figures.py [MODEL_DIR] [--cycle] [--smooth]

``--smooth`` adds the 2026-12-01 refinement (neighbour-smoothed embeddings, ``engine.smooth_embeds``): the demo's
per-cell ROC-AUC on smoothed embeddings beside the seed's protocol, the per-class ROC-AUCs with and without, and
how the app's 16-label "Immune / blood
cell types" set labels the 700 demo cells with and without smoothing (label counts only; no labels are used).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="model folder (default: the bundled default model)")
    ap.add_argument("--cycle", action="store_true", help="also print the cell-cycle target analysis")
    ap.add_argument("--smooth", action="store_true", help="also print the neighbour-smoothing figures")
    args = ap.parse_args()

    import engine
    from recipe_run import demo_figures

    model = engine.load_model(args.model)
    fig = demo_figures(model)
    print(f"model {model.name}: bulk_labels macro ROC-AUC per cell {fig['per_cell']:.3f}, "
          f"per class {fig['per_class']:.3f} (default template)")
    print("\n| query | rho G2M | rho S |\n|---|---|---|")
    for text, (g2m, s) in fig["queries"].items():
        print(f'| "{text}" | {g2m:.3f} | {s:.3f} |')
    if args.cycle:
        cycle_analysis(model)
    if args.smooth:
        smoothing_figures(model)


def smoothing_figures(model) -> None:
    """Demo per-cell ROC-AUC with smoothed embeddings, and the app label set's label counts with and without."""
    import pandas as pd

    import engine
    from app.label_sets import label_names
    from engine.training.evaluate import evaluate

    demo = engine.demo_dataset()
    engine.embed_cells(demo, model, progress=False)
    ev = evaluate(demo, model, "bulk_labels", smooth=True)
    print(f"\nbulk_labels macro ROC-AUC per cell: {ev['per_cell']['roc_auc']:.3f} (seed protocol), "
          f"{ev['refined']['roc_auc']:.3f} (neighbour-smoothed); accuracy {ev['per_cell']['accuracy']:.3f} / "
          f"{ev['refined']['accuracy']:.3f}; macro F1 {ev['per_cell']['f1_macro']:.3f} / {ev['refined']['f1_macro']:.3f}")
    # per-class one-vs-rest AUC with and without smoothing (reported only; nothing is chosen by it)
    from engine.training.evaluate import _knn_graph
    from engine.training.metrics import roc_auc_ovr
    from engine.tools.score import label_logits, label_texts

    classes = list(demo.obs["bulk_labels"].cat.categories)
    y = demo.obs["bulk_labels"].cat.codes.to_numpy()
    emb = engine.get_embeds(demo, model)
    text = model.embed_texts(label_texts(classes))
    scale = float(model.logit_scale.detach().exp())
    _, plain = roc_auc_ovr(label_logits(emb, text, scale), y)
    _, smooth = roc_auc_ovr(label_logits(engine.tools.embed.smoothed(emb, _knn_graph(emb), 0.5), text, scale), y)
    print("\n| bulk_labels class | cells | ROC-AUC unsmoothed | smoothed |\n|---|---|---|---|")
    for c, lab in enumerate(classes):
        print(f"| {lab} | {int((y == c).sum())} | {plain['per_class'][c]:.3f} | {smooth['per_class'][c]:.3f} |")

    engine.smooth_embeds(demo)
    labels = label_names("Immune / blood cell types")
    counts = {}
    for name, key in (("unsmoothed", "transcriptome_embeds"), ("smoothed", "transcriptome_embeds_smoothed")):
        p = engine.zero_shot(demo, model, labels, obsm_key=key, write=False)
        counts[name] = p.idxmax(axis=1).value_counts()
    table = pd.DataFrame(counts).fillna(0).astype(int).sort_values("unsmoothed", ascending=False)
    print("\n'Immune / blood cell types' (16 labels) on the 700 demo cells, cells per predicted label:\n")
    print("| label | unsmoothed | smoothed |\n|---|---|---|")
    for lab, row in table.iterrows():
        print(f"| {lab} | {row['unsmoothed']} | {row['smoothed']} |")


def cycle_analysis(model) -> None:
    """Print what the demo's G2M_score / S_score can see, and the queries' correlations on reference cells."""
    import warnings

    import anndata as ad
    import pandas as pd
    import scanpy as sc
    from scipy.stats import spearmanr

    import engine
    from engine.io.genesets import load_library
    from engine.training.knowledge import reference_expression
    from recipe_run import QUERIES

    lib = load_library("Pegasus_Signatures_Human")
    s_genes, g2m_genes = lib["Cell cycle G1/S"], lib["Cell cycle G2/M"]
    demo = sc.datasets.pbmc68k_reduced()
    present = set(demo.raw.var_names)
    print(f"\ncycle genes among the demo's {demo.raw.n_vars} genes: S {sorted(present & set(s_genes))} of "
          f"{len(s_genes)}, G2M {sorted(present & set(g2m_genes))} of {len(g2m_genes)}")
    print(f"demo cells per phase: {demo.obs['phase'].value_counts().to_dict()}")
    for col in ("G2M_score", "S_score"):
        y = demo.obs[col].astype(float)
        top = y.groupby(demo.obs["bulk_labels"], observed=True).mean().sort_values(ascending=False)
        means = demo.obs["bulk_labels"].map(top).astype(float)
        r2 = 1 - ((y - means) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        print(f"{col}: variance explained by bulk_labels R2 = {r2:.3f}; highest mean {top.index[0]} {top.iloc[0]:.3f}, "
              f"lowest {top.index[-1]} {top.iloc[-1]:.3f}")

    X, genes = reference_expression()
    ref = ad.AnnData(X=X.copy(), var=pd.DataFrame({"gene_symbol": genes["symbol"].to_numpy()}, index=genes.index.copy()))
    logged = ad.AnnData(X=X.copy())
    logged.var_names = pd.Index(genes["symbol"].astype(str).to_numpy())
    logged.var_names_make_unique()
    sc.pp.log1p(logged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.score_genes_cell_cycle(logged, s_genes=[g for g in s_genes if g in logged.var_names],
                                     g2m_genes=[g for g in g2m_genes if g in logged.var_names])
    print(f"\nreference PBMCs ({ref.n_obs} cells, all genes): phases {logged.obs['phase'].value_counts().to_dict()}")
    engine.embed_cells(ref, model, progress=False, use_cache=False)
    print("| query | rho G2M (reference) | rho S (reference) |\n|---|---|---|")
    for text in QUERIES:
        sc_ = engine.score_text(ref, model, text, write=False)
        print(f'| "{text}" | {spearmanr(sc_, logged.obs["G2M_score"]).statistic:.3f} | '
              f'{spearmanr(sc_, logged.obs["S_score"]).statistic:.3f} |')


if __name__ == "__main__":
    main()

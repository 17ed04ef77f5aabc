"""Free-text queries of one or more models, side by side: what the model card's "free text" table prints.

For each model (default: the bundled model; pass folders to compare, e.g. the previous release kept under
``runs/``):

- **B cells**: ROC-AUC of the query "B cells" for the demo's ``CD19+ B`` cells (``pbmc68k_reduced``);
- **proliferation**: Spearman rho of "proliferating cells" with the demo's ``G2M_score`` and ``S_score``, and
  the best rho among the cell-type queries B / T / NK cells, monocytes, dendritic cells;
- **interferon**: the 559 celltypist sample cells (PBMC-like counts, no labels) are split in half and the
  first half gets an interferon-stimulated-gene programme (ISG15, IFI6, IFIT1, IFIT3, MX1, OAS1, ISG20,
  IFITM3, LY6E, IFI44L multiplied by 8, the order of the response in IFN-beta stimulated PBMCs); printed:
  ROC-AUC of "cells responding to interferon beta" for the stimulated half, and of the ten-gene marker score
  for comparison. Synthetic by construction: it checks that the query reads the ISG programme.

Usage::

    python bench/free_text.py [MODEL_DIR ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ISGS = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "OAS1", "ISG20", "IFITM3", "LY6E", "IFI44L"]


def _ifn_cells(seed: int = 0):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from engine.training.knowledge import reference_expression

    X, genes = reference_expression()
    X = X.tocsr().astype(np.float32).copy()
    sym = genes["symbol"].to_numpy()
    cols = [int(np.flatnonzero(sym == g)[0]) for g in ISGS if (sym == g).any()]
    n = X.shape[0]
    stim = np.zeros(n, dtype=bool)
    stim[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    D = X.toarray()
    base = np.maximum(D[:, cols], np.median(D[D > 0]))
    D[np.ix_(stim, cols)] = base[stim] * 8.0
    a = ad.AnnData(X=sp.csr_matrix(D), var=pd.DataFrame({"gene_symbol": sym}, index=genes.index.astype(str)))
    a.obs["stimulated"] = stim
    marker = np.log1p(D[:, cols]).mean(axis=1)
    return a, marker


def figures(model_dir: str | None) -> dict:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    import engine

    model = engine.load_model(model_dir) if model_dir else engine.load_model()
    demo = engine.demo_dataset()
    engine.embed_cells(demo, model, progress=False, use_cache=False)
    out = {}
    b = engine.score_text(demo, model, "B cells", write=False)
    out["B cells ROC-AUC"] = roc_auc_score(demo.obs["bulk_labels"] == "CD19+ B", b)
    prolif = engine.score_text(demo, model, "proliferating cells", write=False)
    for ph in ("G2M_score", "S_score"):
        out[f"prolif rho {ph}"] = spearmanr(prolif, demo.obs[ph]).statistic
        best = max(spearmanr(engine.score_text(demo, model, q, write=False), demo.obs[ph]).statistic
                   for q in ("B cells", "T cells", "NK cells", "monocytes", "dendritic cells"))
        out[f"best cell-type rho {ph}"] = best
    cells, marker = _ifn_cells()
    engine.embed_cells(cells, model, progress=False, use_cache=False)
    q = engine.score_text(cells, model, "cells responding to interferon beta", write=False)
    out["IFN query ROC-AUC"] = roc_auc_score(cells.obs["stimulated"], q)
    out["IFN 10-gene score ROC-AUC"] = roc_auc_score(cells.obs["stimulated"], marker)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="model folders (default: the bundled model)")
    args = ap.parse_args()
    models = args.models or [None]
    rows = {m or "bundled": figures(m) for m in models}
    keys = list(next(iter(rows.values())))
    print("figure".ljust(32) + "".join(str(m)[-28:].rjust(30) for m in rows))
    for k in keys:
        print(k.ljust(32) + "".join(f"{rows[m][k]:30.3f}" for m in rows))


if __name__ == "__main__":
    main()

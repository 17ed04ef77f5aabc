"""Proxy benchmarks for choosing training recipes without the public evaluation labels.

The held-out reference cells (:func:`~engine.training.knowledge.genes.holdout_cells`, never seen by a model
trained with the same hold-out) are labelled by marker scores (:func:`~engine.training.knowledge.labels.weak_labels`)
and scored zero-shot with :func:`engine.training.evaluate.evaluate` (seed 000 appendix D) in three
conditions: all genes, a highly-variable-gene panel, and the panel after shallow re-sampling.
:func:`proxy_benchmark` offers only names of the types present; :func:`proxy_long_list` scores a long label
list that names absent types too, judged at the lineage level.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import AnalysisError, DataError
from .genes import holdout_cells, reference_expression, strip_tissue, variable_gene_ranking
from .labels import lineage, marker_set_terms, panhuman_name, weak_labels

__all__ = ["PROXY_CONDITIONS", "proxy_benchmark", "proxy_long_list"]

# --------------------------------------------------------------------------- proxy benchmark (no evaluation labels)
def proxy_benchmark(
    model,
    *,
    holdout_fraction: float = 0.2,
    panel_size: int = 800,
    depth: float = 1500.0,
    template: str = "cellwhisperer",
    level: str = "main",
    seed: int = 0,
    holdout_fold: int | None = None,
    smooth: bool = False,
    center: float = 0.0,
    csls: int = 0,
) -> dict:
    """Zero-shot accuracy on held-out reference cells with marker-derived labels, for choosing recipes.

    The public evaluation set (``pbmc68k_reduced``) must not steer training choices, so recipes are compared
    on reference cells that :func:`build_pairs` left out (``holdout_fraction``, the same cells every time),
    labelled by :func:`weak_labels` (``level="main"``: main immune types; ``"sub"``: the subtype where one was
    assigned, else the main type; cell names without the tissue suffix; ``"panhuman"``: the same cells named in
    a scheme no recipe trains on, :func:`panhuman_name` of the subtype, else of the main type, so "CD8 TCM"
    becomes "Memory CD8 T cell"; cells without a pan-human name are left out). ``holdout_fold``: see
    :func:`holdout_cells` (the model must have been trained with the same ``holdout_fraction`` and fold).
    ``smooth`` / ``center`` / ``csls``: score the label-free refinements of :func:`engine.training.evaluate.evaluate` instead of the
    seed's protocol (neighbours and mean over the scored held-out cells). The protocol
    is :func:`engine.training.evaluate.evaluate` (seed 000 appendix D), with all genes (``full``), restricted to the
    ``panel_size`` most variable reference genes (``panel``, like data subset to HVGs), and restricted to the
    panel after Poisson re-sampling at ``depth`` UMIs per cell (``shallow``, like low-depth 10x data).

    Returns
    -------
    dict
        ``{"full": {...}, "panel": {...}, "shallow": {...}, "n_cells": int, "labels": [...], "level": str}``;
        each inner dict holds per-cell ``roc_auc``, ``accuracy``, ``f1_macro`` and ``roc_auc_per_class_mean``.

    Raises
    ------
    engine.errors.DataError
        When ``holdout_fraction`` leaves fewer than 20 labelled cells.
    engine.errors.AnalysisError
        For a ``level`` other than ``"main"``, ``"sub"`` or ``"panhuman"``.
    """
    from ..evaluate import evaluate

    if level not in ("main", "sub", "panhuman"):
        raise AnalysisError("Unknown label level for the proxy benchmark", found=repr(level),
                            expected="'main', 'sub' or 'panhuman'")
    cells = _proxy_cells(holdout_fraction, holdout_fold, level, panel_size, depth, seed)
    out = {"n_cells": cells["full"].n_obs, "labels": sorted(set(cells["full"].obs["label"])), "level": level}
    for key in PROXY_CONDITIONS:
        r = evaluate(cells[key], model, "label", template=template, smooth=smooth, center=center, csls=csls)
        out[key] = {k: r.get("refined", r["per_cell"])[k] for k in ("roc_auc", "accuracy", "f1_macro")}
        out[key]["roc_auc_per_class_mean"] = r["per_class"]["roc_auc"]
    return out


PROXY_CONDITIONS = ("full", "panel", "shallow")


def _proxy_cells(holdout_fraction: float, holdout_fold: int | None, level: str, panel_size: int = 800,
                 depth: float = 1500.0, seed: int = 0) -> dict:
    """The proxy's held-out, weakly labelled reference cells as AnnData per condition (see :func:`proxy_benchmark`).

    ``obs['label']`` holds the ``level``'s names, ``obs['main']`` the weak main type (marker-set name).
    """
    import anndata as ad

    X, genes = reference_expression()
    held = holdout_cells(holdout_fraction, holdout_fold)
    weak = weak_labels()
    lab = weak["main"].to_numpy()[held]
    if level in ("sub", "panhuman"):
        sub = weak["sub"].to_numpy()[held]
        lab = np.where(sub != "", sub, lab)
    if level == "panhuman":
        main = weak["main"].to_numpy()[held]
        named = []
        for s_, m_ in zip(lab, main):
            hit = (panhuman_name(s_) if s_ else None) or (panhuman_name(m_) if m_ else None)
            named.append(hit[0] if hit else "")
        lab = np.array(named, dtype=object)
    keep = held[lab != ""]
    lab = lab[lab != ""]
    if keep.size < 20:
        raise DataError("Too few held-out reference cells for the proxy benchmark", found=f"{keep.size} labelled cells",
                        expected=">= 20", fix="raise holdout_fraction")
    names = np.array([strip_tissue(s) for s in lab], dtype=object)
    var = pd.DataFrame({"gene_symbol": genes["symbol"].to_numpy()}, index=genes.index.copy())
    obs = pd.DataFrame({"label": pd.Categorical(names), "main": weak["main"].to_numpy()[keep]},
                       index=[f"ref{i}" for i in keep])
    a = ad.AnnData(X=X[keep].copy(), obs=obs, var=var)
    panel = variable_gene_ranking().index[:panel_size]
    pa = a[:, a.var_names.isin(panel)].copy()
    sh = a.copy()
    rng = np.random.default_rng(seed)
    sh.X = sp.csr_matrix(rng.poisson(np.asarray(a.X.toarray(), dtype=np.float64) * depth / 1e4).astype(np.float32))
    sh = sh[:, sh.var_names.isin(panel)].copy()
    return {"full": a, "panel": pa, "shallow": sh}


def proxy_long_list(
    model,
    labels: Sequence[tuple[str, str | None]],
    *,
    holdout_fraction: float = 0.5,
    holdout_fold: int | None = 0,
    template: str = "cellwhisperer",
    smooth: bool = False,
    center: float = 0.0,
    csls: int = 0,
) -> dict:
    """Zero-shot against a long label list that names absent types too, on held-out reference cells.

    SEL-CV (:func:`proxy_benchmark`) offers only label names of types present in the cells, so it cannot see
    a label text that attracts cells it does not describe (a "hub"), which long lists such as the app's
    16-label blood set suffer from. Here the held-out, weakly labelled reference cells of
    :func:`proxy_benchmark` are labelled from ``labels`` (softmax over all of them, as :func:`engine.zero_shot`),
    and each prediction is judged at the lineage level (:func:`lineage`) against the cell's weak main type.

    Parameters
    ----------
    model
        The transcriptome-text model (trained with the same ``holdout_fraction`` / ``holdout_fold``).
    labels
        ``(label name, Cell Ontology id)`` pairs; labels without an id count as off-lineage when predicted.
    smooth, center, csls
        Score neighbour-smoothed embeddings (:func:`engine.tools.embed.smoothed`, k = 15 over the scored cells) and/or
        with distribution normalisation (:func:`engine.tools.score.centered`) or CSLS (:func:`engine.tools.score.csls_offsets`).

    Returns
    -------
    dict
        Per condition (``full``, ``panel``, ``shallow``): ``lineage_accuracy`` (share of cells whose top label
        lies in their weak type's lineage), ``absent_rate`` (share whose top label lies in a lineage no weakly
        labelled cell has) and ``counts`` (cells per predicted label); plus ``n_cells``.

    Raises
    ------
    engine.errors.QueryError
        Fewer than two labels.
    """
    from ...tools.embed import smoothed
    from ..evaluate import _cell_embeddings, _knn_graph
    from ...tools.score import label_logits, label_texts

    names = [str(n) for n, _ in labels]
    if len(names) < 2:
        from ...errors import QueryError

        raise QueryError("The long-list proxy needs at least two labels", found=names, expected="a list of (label, CL id)")
    label_lineage = np.array([lineage(t) for _, t in labels], dtype=object)
    text = model.embed_texts(label_texts(names, template))
    scale = float(model.logit_scale.detach().exp().cpu())
    cells = _proxy_cells(holdout_fraction, holdout_fold, "main")
    truth = np.array([lineage((marker_set_terms(m) or [None])[0]) for m in cells["full"].obs["main"]], dtype=object)
    present = set(truth) - {""}
    out = {"n_cells": int(truth.size)}
    for key in PROXY_CONDITIONS:
        a = cells[key]
        e = _cell_embeddings(a, model, np.arange(a.n_obs), progress=False)
        if smooth and a.n_obs >= 3:
            e = smoothed(e, _knn_graph(e), 0.5)
        pred = label_logits(e, text, scale, center=center, csls=csls).argmax(1)
        lin = label_lineage[pred]
        out[key] = {
            "lineage_accuracy": float(np.mean(lin == truth)),
            "absent_rate": float(np.mean([x not in present for x in lin])),
            "counts": pd.Series(np.asarray(names, dtype=object)[pred]).value_counts().to_dict(),
        }
    return out

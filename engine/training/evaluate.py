"""Zero-shot cell-type evaluation and paired retrieval (CellWhisperer, seed 000 appendices B and D).

``python -m engine.evaluate DATA --label-key COL [--model PATH] [--template T] [--json]
[--confusion FILE.csv [--overwrite]] [--max-cells-per-class N] [--smooth] [--center W] [--csls K]``

``--confusion`` writes a new file: an existing one needs ``--overwrite``, and the data file or a file of the
model folder is refused even then (exit status 2).

``--smooth`` / ``--center`` / ``--csls`` add a column of label-free refinements (neighbour-smoothed embeddings,
distribution normalisation, CSLS) beside the protocol's figures, which they never change.

Zero-shot protocol (appendix D): every cell is embedded (:func:`engine.embed_cells`), every label is embedded
as a sentence through a template (default ``"A sample of {label} from a healthy individual"``), cells are
scored against all label texts (cosine x ``exp(logit_scale)``) and a softmax over labels gives the
predictions. Reported: macro ROC-AUC one-vs-rest, accuracy, macro F1 and recall@1/5/10, at two levels:

- ``per_cell``: every (capped) cell is one item;
- ``per_class``: the mean embedding of each true class's cells (re-normalised) is one item.

The paper caps cells at 100 per class (``--max-cells-per-class 100``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from ..errors import EmptySelectionError, MissingKeyError, ModelMismatchError, MissingEmbeddingError, QueryError
from .metrics import DEFAULT_KS, classification_metrics, confusion_matrix, retrieval_metrics

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..models.model import TranscriptomeTextModel
    from .pairs import PairedData

__all__ = ["evaluate", "retrieval", "format_report", "main"]

log = logging.getLogger(__name__)


def _cap_per_class(labels: np.ndarray, max_per_class: int | None, seed: int) -> np.ndarray:
    """Positions of the kept cells (all, or a random ``max_per_class`` per class), in original order."""
    pos = np.arange(labels.size)
    if max_per_class is None:
        return pos
    rng = np.random.default_rng(seed)
    keep = []
    for lab in pd.unique(labels):
        p = pos[labels == lab]
        if p.size > max_per_class:
            p = rng.choice(p, size=int(max_per_class), replace=False)
        keep.append(p)
    return np.sort(np.concatenate(keep)) if keep else pos[:0]


def _cell_embeddings(adata: "AnnData", model: "TranscriptomeTextModel", idx: np.ndarray, *, progress: bool) -> np.ndarray:
    """Embeddings of cells ``idx``: reused from ``obsm`` when made by ``model``, else computed on a copy."""
    from ..tools.embed import embed_cells, get_embeds

    try:
        return get_embeds(adata, model)[idx]
    except (MissingEmbeddingError, ModelMismatchError):
        pass
    sub = adata[idx].copy() if idx.size < adata.n_obs else adata.copy()
    return embed_cells(sub, model, progress=progress)


def evaluate(
    adata: "AnnData",
    model: "TranscriptomeTextModel",
    label_key: str,
    *,
    template: str = "cellwhisperer",
    labels: Sequence[str] | None = None,
    max_cells_per_class: int | None = None,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    smooth: bool = False,
    center: float = 0.0,
    csls: int = 0,
    progress: bool = False,
) -> dict:
    """Zero-shot classification of cells against their own label names (seed 000 appendix D).

    Parameters
    ----------
    adata
        Cells x genes with ``obs[label_key]``. Not modified (embeddings are computed on a copy unless
        ``obsm['transcriptome_embeds']`` of ``model`` is already present).
    model
        The transcriptome-text model.
    label_key
        ``obs`` column of true labels (e.g. ``cell_ontology_class``). Cells with a missing label are left out.
    template
        Label template (key of :data:`engine.tools.score.TEMPLATES` or a format string with ``{label}``).
    labels
        Candidate labels (default: the labels present, in category order). Cells whose label is not a
        candidate are left out; candidates absent from the cells are still scored (they can be predicted)
        but skipped for ROC-AUC.
    max_cells_per_class
        Random cap per class (``seed``); the paper uses 100.
    smooth, center
        Label-free refinements, reported **besides** the seed's protocol under ``refined`` (``per_cell`` and
        ``per_class`` are never refined): ``smooth`` scores neighbour-smoothed embeddings
        (:func:`engine.tools.embed.smoothed` over a k = 15 graph of all of ``adata``'s cells), ``center`` is the
        distribution-normalisation weight (:func:`engine.tools.score.centered`, mean over all cells).
    csls
        CSLS hubness correction with this many cells per label (:func:`engine.tools.score.csls_offsets`, over all
        cells), also reported under ``refined`` only.

    Returns
    -------
    dict
        JSON-serialisable: ``n_cells``, ``n_classes`` (classes present), ``n_labels`` (candidates),
        ``template`` (the format string), ``label_key``, ``model``, ``labels``, ``per_cell`` and
        ``per_class`` (each ``roc_auc``, ``accuracy``, ``f1_macro``, ``recall@k``, ``n_items``,
        ``n_classes_scored``, ``note``), ``confusion`` (``labels`` and ``matrix``: rows true, columns
        predicted, per cell), and with ``smooth``, ``center`` or ``csls`` also ``refined`` (the per-cell metrics
        of the refined scores plus ``smooth``, ``center`` and ``csls``).

    Raises
    ------
    MissingKeyError
        ``label_key`` not in ``obs`` (the message lists the available columns).
    EmptySelectionError
        No labelled cell left.
    QueryError
        Fewer than two candidate labels, empty labels, given labels without letters or digits, or a bad template
        (:func:`engine.tools.score.check_template`). Labels of the data without letters or digits (e.g. ``"?"``)
        are left out as classes, with a note.
    """
    from ..tools.score import TEMPLATES, check_template, clean_labels, label_logits, label_texts

    check_template(template)  # a bad template fails before any embedding work
    if label_key not in adata.obs.columns:
        raise MissingKeyError(
            f"The label column {label_key!r} is not in obs",
            found=f"obs columns {list(adata.obs.columns)}",
            expected="a column of cell-type labels",
            fix="pass --label-key with one of the listed columns",
        )
    col = adata.obs[label_key]
    present = col.notna().to_numpy()
    values = col.astype(object).where(col.notna(), "").astype(str).map(lambda s: " ".join(s.split())).to_numpy()
    present &= values != ""
    if labels is None:
        cats = list(col.cat.categories) if isinstance(col.dtype, pd.CategoricalDtype) else sorted(set(values[present]))
        cand = [" ".join(str(c).split()) for c in cats]
        cand = [c for c in dict.fromkeys(cand) if c and c in set(values[present])]
        unusable = []
        for c in cand:
            try:
                clean_labels([c])
            except QueryError:
                unusable.append(c)
        cand = [c for c in cand if c not in unusable]
    else:
        unusable = []
        cand = clean_labels(labels, "candidate label")
        if len(set(cand)) != len(cand):
            raise QueryError("Candidate labels must be distinct", found=cand, expected="each label once")
    if len(cand) < 2:
        raise QueryError("Zero-shot evaluation needs at least two labels", found=cand, expected="two or more classes")
    lab_pos = {c: i for i, c in enumerate(cand)}
    in_cand = present & np.isin(values, cand)
    dropped = int(present.sum() - in_cand.sum())
    pos = np.flatnonzero(in_cand)
    if pos.size == 0:
        raise EmptySelectionError("No cell has one of the candidate labels", found=f"{label_key}: {pd.unique(values[present])[:5]}", expected=f"labels among {cand[:5]}")
    keep = pos[_cap_per_class(values[pos], max_cells_per_class, seed)]
    y = np.array([lab_pos[v] for v in values[keep]], dtype=np.int64)
    refine = bool(smooth) or float(center) != 0.0 or bool(csls)
    if refine:  # smoothing and centring look at every cell of the dataset, labelled or not
        emb_all = _cell_embeddings(adata, model, np.arange(adata.n_obs), progress=progress)
        emb = emb_all[keep]
    else:
        emb = _cell_embeddings(adata, model, keep, progress=progress)
    texts = label_texts(cand, template)
    text_emb = model.embed_texts(texts)
    scale = float(model.logit_scale.detach().exp().cpu())
    logits = label_logits(emb, text_emb, scale)
    per_cell = classification_metrics(logits, y, ks=ks)
    # class-averaged embeddings
    classes = np.unique(y)
    means = np.stack([emb[y == c].mean(0) for c in classes])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    per_class = classification_metrics(means @ text_emb.T.astype(np.float64) * scale, classes, ks=ks)
    conf = confusion_matrix(logits, y)
    refined = None
    if refine:
        from ..tools.embed import smoothed

        e = emb_all
        if smooth and e.shape[0] >= 3:
            e = smoothed(e, _knn_graph(e), 0.5)
        refined = classification_metrics(label_logits(e, text_emb, scale, center=center, csls=csls)[keep], y, ks=ks)
        refined.update({"smooth": bool(smooth), "center": float(center), "csls": int(csls)})
    notes = []
    if unusable:
        notes.append(f"label(s) without letters or digits (or unusable as text) were left out as classes: "
                     f"{[u[:40] for u in unusable[:5]]}")
    if dropped:
        notes.append(f"{dropped} cell(s) with labels outside the candidates were left out")
    if int((~present).sum()):
        notes.append(f"{int((~present).sum())} cell(s) without a label were left out")
    return {
        "n_cells": int(keep.size),
        "n_classes": int(classes.size),
        "n_labels": len(cand),
        "label_key": label_key,
        "template": TEMPLATES.get(template, template),
        "model": getattr(model, "name", "model"),
        "max_cells_per_class": max_cells_per_class,
        "labels": cand,
        "label_texts": texts,
        "per_cell": per_cell,
        "per_class": per_class,
        "confusion": {"labels": cand, "matrix": conf.tolist()},
        "notes": notes,
        **({"refined": refined} if refined is not None else {}),
    }


def _knn_graph(emb: np.ndarray, n_neighbors: int = 15):
    """Connectivities of :func:`engine.umap`'s graph (scanpy ``neighbors``, k = 15) on bare embeddings."""
    import anndata as ad

    from ..tools.embed import _neighbor_graph

    a = ad.AnnData(obsm={"e": np.asarray(emb, dtype=np.float32)}, shape=(emb.shape[0], 0))
    return _neighbor_graph(a, "e", n_neighbors)


def retrieval(paired_data: "PairedData", model: "TranscriptomeTextModel", *, ks: Sequence[int] = DEFAULT_KS, batch_size: int = 1024, progress: bool = False) -> dict:
    """Cross-modal retrieval on paired data (seed 000 appendix B).

    Every pair's transcriptome is rank-encoded with the model's tokenizer and embedded; every unique text is
    embedded once; recall@k is computed over unique texts (see :func:`engine.training.metrics.retrieval_metrics`), so
    pairs with identical texts count as correct matches.

    Returns
    -------
    dict
        ``transcriptome_to_text_R@k``, ``text_to_transcriptome_R@k``, ``mean_R@k``, ``R@k``, ``roc_auc``,
        ``n_pairs``, ``n_texts``, ``model``, ``data``.
    """
    if len(paired_data) == 0:
        raise EmptySelectionError("No pairs to evaluate", found="0 pairs", expected="at least one pair")
    texts, tidx = paired_data.unique_texts()
    enc = model.tokenizer.encode_matrix(paired_data.X, paired_data.var)
    tx = model.embed_encoding(enc, batch_size=batch_size, progress=progress)
    xt = model.embed_texts(texts, cache=False)
    out = retrieval_metrics(tx.astype(np.float64) @ xt.T.astype(np.float64), tidx, ks=ks)
    out["model"] = getattr(model, "name", "model")
    out["data"] = paired_data.name
    return out


# --------------------------------------------------------------------------- CLI
def format_report(res: dict) -> str:
    """A readable table of an :func:`evaluate` result."""
    keys = ["roc_auc", "accuracy", "f1_macro"] + sorted((k for k in res["per_cell"] if k.startswith("recall@")), key=lambda k: int(k.split("@")[1]))
    lines = [
        f"Zero-shot evaluation of {res['model']!r} on {res['n_cells']} cells, {res['n_classes']} classes "
        f"({res['n_labels']} candidate labels, column {res['label_key']!r})",
        f"Template: {res['template']}",
        "",
        f"{'metric':<12}{'per cell':>10}{'per class':>11}" + (f"{'per cell, refined':>19}" if "refined" in res else ""),
    ]
    for k in keys:
        a, b = res["per_cell"].get(k, float("nan")), res["per_class"].get(k, float("nan"))
        extra = f"{res['refined'].get(k, float('nan')):>19.3f}" if "refined" in res else ""
        lines.append(f"{k:<12}{a:>10.3f}{b:>11.3f}{extra}")
    if "refined" in res:
        r = res["refined"]
        how = [w for w, on in (("neighbour-smoothed embeddings", r["smooth"]), (f"DN centring {r['center']:g}", r["center"]),
                               (f"CSLS k = {r.get('csls', 0)}", r.get("csls", 0))) if on]
        lines.append(f"refined: {' + '.join(how)} (label-free; not the seed's protocol)")
    for n in [res["per_cell"].get("note"), *res.get("notes", [])]:
        if n:
            lines.append(f"note: {n}")
    return "\n".join(lines)


def _strict_json(obj):
    """Replace NaN/inf by None and numpy scalars by Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def _load_data(spec: str):
    if spec == "demo":
        try:
            from ..io.data import demo_dataset
        except ImportError:  # pragma: no cover
            import scanpy as sc

            return sc.datasets.pbmc68k_reduced()
        return demo_dataset()
    try:
        from ..io.data import read
    except ImportError:  # pragma: no cover
        import anndata as ad

        return ad.read_h5ad(spec)
    return read(spec)


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.evaluate DATA --label-key COL [...]``; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m engine.evaluate", description="Zero-shot cell-type evaluation (CellWhisperer appendix D).")
    p.add_argument("data", help="an .h5ad (or any format engine.read reads), or 'demo' for scanpy's pbmc68k_reduced")
    p.add_argument("--label-key", default=None, help="obs column with the true labels (default for demo: bulk_labels)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled default model)")
    p.add_argument("--template", default="cellwhisperer", help="template name (cellwhisperer, langcell, plain) or a format string with {label}")
    p.add_argument("--labels", default=None, help="comma-separated candidate labels (default: the labels present)")
    p.add_argument("--max-cells-per-class", type=int, default=None, help="random cap per class (the paper uses 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--smooth", action="store_true", help="also report per-cell metrics on neighbour-smoothed embeddings")
    p.add_argument("--center", type=float, default=0.0, help="also report per-cell metrics with distribution normalisation (0.5 = DN)")
    p.add_argument("--csls", type=int, default=0, metavar="K", help="also report per-cell metrics with the CSLS hub correction (k cells per label)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--confusion", default=None, metavar="FILE.csv", help="write the per-cell confusion matrix (a new file)")
    p.add_argument("--overwrite", action="store_true", help="let --confusion replace an existing file (never an input)")
    args = p.parse_args(argv)
    from ..models.checkpoint import default_model_path, load_model
    from ..io.data import check_output_path
    from ..errors import LexicellError

    label_key = args.label_key or ("bulk_labels" if args.data == "demo" else None)
    if label_key is None:
        p.error("--label-key is required")
    try:
        if args.confusion:
            inputs = [] if args.data == "demo" else [args.data]
            inputs.append(args.model if args.model not in (None, "default") else default_model_path())
            check_output_path(args.confusion, inputs=inputs, overwrite=args.overwrite, flag="--confusion")
        adata = _load_data(args.data)
        model = load_model(args.model, device=args.device)
        labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
        res = evaluate(adata, model, label_key, template=args.template, labels=labels, max_cells_per_class=args.max_cells_per_class, seed=args.seed, smooth=args.smooth, center=args.center, csls=args.csls, progress=not args.json)
    except LexicellError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    res["data"] = args.data
    if args.confusion:
        conf = pd.DataFrame(res["confusion"]["matrix"], index=res["confusion"]["labels"], columns=res["confusion"]["labels"])
        conf.index.name = "true \\ predicted"
        conf.to_csv(args.confusion)
    if args.json:
        print(json.dumps(_strict_json(res), allow_nan=False))
    else:
        print(format_report(res))
        if args.confusion:
            print(f"confusion matrix written to {args.confusion}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

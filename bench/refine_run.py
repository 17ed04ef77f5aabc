"""Score label-free zero-shot refinements on the 2-fold proxy (the smoothing rule of 2026-12-01 in docs/model-development.md).

For each ``--cv`` run of ``bench/recipe_run.py`` (``runs/NAME/fold0``, ``fold1``), the fold models are scored by
:func:`engine.training.knowledge.proxy_benchmark` four ways: the seed's protocol (``none``), neighbour-smoothed embeddings
(``smooth``, :func:`engine.tools.embed.smoothed`), distribution normalisation (``dn``, :func:`engine.tools.score.centered`
with weight 0.5), both (``smooth+dn``), and CSLS with k = 10 without and with smoothing (``csls``,
``smooth+csls``, :func:`engine.tools.score.csls_offsets`; the CSLS rule of 2026-12-01). It prints SEL-CV (mean of the 18 per-cell ROC-AUCs: 2 folds x
main / sub / panhuman x full / panel / shallow) per run and refinement, the gain over ``none``, and, for
transparency only, the demo's per-cell ROC-AUC (fold mean) under each refinement. One JSON line per run is
appended to ``--log``.

``--long-list`` (the long-list rule of 2026-12-01) instead scores each refinement with :func:`engine.training.knowledge.proxy_long_list`
against the app's 16-label "Immune / blood cell types" set: lineage accuracy and absent rate, means over the
2 folds x full / panel / shallow, and the soup's predicted-label counts (fold 0, full genes).

``--diagnose`` (with ``--long-list``) adds, for fold 0 of each run (full genes, unsmoothed), the weak main types
of the cells given an absent-lineage label and how often those cells express platelet genes (PPBP, PF4)
compared with the other cells (model card, the 2026-12-01 long-list measurement).

Usage::

    python bench/refine_run.py s6_base_s0 s6_base_s1i0 s6_base_s4i0 s6_base_s5i0 s6_soup4 [--log runs/refine.jsonl] [--long-list]

About 1.5 minutes per run on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFINEMENTS = {"none": (False, 0.0, 0), "smooth": (True, 0.0, 0), "dn": (False, 0.5, 0), "smooth+dn": (True, 0.5, 0),
               "csls": (False, 0.0, 10), "smooth+csls": (True, 0.0, 10)}
LEVELS = ("main", "sub", "panhuman")
CONDITIONS = ("full", "panel", "shallow")


def score_run(name: str) -> dict:
    """SEL-CV and demo per-cell ROC-AUC of each refinement for the fold models of run ``name``."""
    import numpy as np

    import engine
    from engine.training.evaluate import evaluate
    from engine.training.knowledge import proxy_benchmark

    demo = engine.demo_dataset()
    aucs = {r: [] for r in REFINEMENTS}
    levels = {r: {lvl: [] for lvl in LEVELS} for r in REFINEMENTS}
    demo_auc = {r: [] for r in REFINEMENTS}
    for fold in (0, 1):
        model = engine.load_model(ROOT / "runs" / name / f"fold{fold}")
        for r, (smooth, center, csls) in REFINEMENTS.items():
            for lvl in LEVELS:
                res = proxy_benchmark(model, holdout_fraction=0.5, holdout_fold=fold, level=lvl, smooth=smooth,
                                      center=center, csls=csls)
                vals = [res[c]["roc_auc"] for c in CONDITIONS]
                aucs[r] += vals
                levels[r][lvl] += vals
            ev = evaluate(demo, model, "bulk_labels", smooth=smooth, center=center, csls=csls)
            demo_auc[r].append(ev.get("refined", ev["per_cell"])["roc_auc"])
    return {
        "name": name,
        "SEL_CV": {r: float(np.mean(v)) for r, v in aucs.items()},
        "levels": {r: {lvl: float(np.mean(v)) for lvl, v in d.items()} for r, d in levels.items()},
        "demo_per_cell": {r: float(np.mean(v)) for r, v in demo_auc.items()},
    }


def score_long_list(name: str) -> dict:
    """Lineage accuracy and absent rate of each refinement with the app's 16-label blood set."""
    import numpy as np

    import engine
    from app.label_sets import LABEL_SETS
    from engine.training.knowledge import proxy_long_list

    labels = LABEL_SETS["Immune / blood cell types"]["labels"]
    acc = {r: [] for r in REFINEMENTS}
    absent = {r: [] for r in REFINEMENTS}
    counts = {}
    for fold in (0, 1):
        model = engine.load_model(ROOT / "runs" / name / f"fold{fold}")
        for r, (smooth, center, csls) in REFINEMENTS.items():
            res = proxy_long_list(model, labels, holdout_fraction=0.5, holdout_fold=fold, smooth=smooth, center=center,
                                  csls=csls)
            acc[r] += [res[c]["lineage_accuracy"] for c in CONDITIONS]
            absent[r] += [res[c]["absent_rate"] for c in CONDITIONS]
            if fold == 0:
                counts[r] = res["full"]["counts"]
    return {"name": name, "long_list": True,
            "lineage_accuracy": {r: float(np.mean(v)) for r, v in acc.items()},
            "absent_rate": {r: float(np.mean(v)) for r, v in absent.items()}, "counts_fold0_full": counts}


def diagnose(name: str) -> None:
    """Print who the absent-lineage labels of fold 0 go to, and whether platelet genes explain them."""
    import numpy as np
    import pandas as pd

    import engine
    from app.label_sets import LABEL_SETS
    from engine.training.knowledge.labels import lineage, marker_set_terms
    from engine.training.knowledge.proxy import _proxy_cells
    from engine.tools.score import label_logits, label_texts

    labels = LABEL_SETS["Immune / blood cell types"]["labels"]
    names = np.array([n for n, _ in labels], dtype=object)
    model = engine.load_model(ROOT / "runs" / name / "fold0")
    a = _proxy_cells(0.5, 0, "main")["full"]
    emb = engine.embed_cells(a, model, progress=False, use_cache=False)
    text = model.embed_texts(label_texts(list(names)))
    pred = names[label_logits(emb, text, float(model.logit_scale.detach().exp())).argmax(1)]
    present = {lineage((marker_set_terms(m) or [None])[0]) for m in set(a.obs["main"])} - {""}
    lin = {n: lineage(t) for n, t in labels}
    sym = a.var["gene_symbol"].str.upper().to_numpy()
    X = a.X.tocsc()
    for lab in [n for n in pd.Series(pred).value_counts().index if lin[n] not in present]:
        s = pred == lab
        mains = a.obs["main"][s].str.replace(r"\s*\(human \w+\)$", "", regex=True).value_counts().to_dict()
        expr = []
        for g in ("PPBP", "PF4"):
            j = np.flatnonzero(sym == g)
            if j.size:
                x = np.asarray(X[:, j[0]].todense()).ravel() > 0
                expr.append(f"{g} in {x[s].mean():.0%} of them vs {x[~s].mean():.0%} of the others")
        print(f"  {name} fold 0: '{lab}' given to {int(s.sum())} cells, weak types {mains}; {'; '.join(expr)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="names of --cv runs under runs/")
    ap.add_argument("--log", default="runs/refine.jsonl")
    ap.add_argument("--long-list", action="store_true", help="the long-label-list proxy (long-list rule) instead")
    ap.add_argument("--diagnose", action="store_true", help="with --long-list: who gets the absent-lineage labels")
    args = ap.parse_args()
    for name in args.runs:
        if args.long_list:
            res = score_long_list(name)
            with open(args.log, "a") as fh:
                fh.write(json.dumps(res) + "\n")
            base = res["lineage_accuracy"]["none"]
            print(f"{name} (16 labels):")
            for r, v in res["lineage_accuracy"].items():
                top = sorted(res["counts_fold0_full"][r].items(), key=lambda x: -x[1])[:4]
                print(f"  {r:<10} lineage accuracy {v:.3f} ({v - base:+.3f}) | absent rate {res['absent_rate'][r]:.3f} | "
                      f"fold-0 top labels {top}")
            if args.diagnose:
                diagnose(name)
            continue
        res = score_run(name)
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        with open(args.log, "a") as fh:
            fh.write(json.dumps(res) + "\n")
        base = res["SEL_CV"]["none"]
        print(f"{name}:")
        for r, v in res["SEL_CV"].items():
            lv = " / ".join(f"{res['levels'][r][lvl]:.3f}" for lvl in LEVELS)
            print(f"  {r:<10} SEL-CV {v:.3f} ({v - base:+.3f}) | main / sub / panhuman {lv} | "
                  f"demo per cell {res['demo_per_cell'][r]:.3f} (transparency only)")


if __name__ == "__main__":
    main()

"""Train one default-model recipe variant and print the figures the model card's run tables list.

The default model's recipe is chosen by :func:`engine.training.knowledge.proxy_benchmark` (held-out reference cells),
never by the demo's labels (CONTRIBUTING.md, "The default model"; docs/model-development.md). This script is how the card's runs were
made: it overrides parts of ``assets/train_default.json``, trains into ``--out``, and prints

- ``SEL``: the mean of the six proxy ROC-AUCs (main / sub labels x full / HVG panel / shallow panel), what
  recipes are compared by;
- validation R@10 and best epoch (not comparable across recipes: each makes its own validation pairs);
- the demo's (``pbmc68k_reduced`` ``bulk_labels``) per-cell / per-class macro ROC-AUC, for transparency only;
- Spearman rho of free-text queries with the demo's ``G2M_score`` / ``S_score``.

Each run appends one JSON line to ``--log``.

``--cv`` (the rule since 2026-11-22): 2-fold cross-fitting instead of one 20 % hold-out. Two models are trained, each with one
half of the reference cells held out (``holdout_fraction`` 0.5, ``holdout_fold`` 0 / 1), and each is scored on
the half it did not see, at three label levels: ``main``, ``sub`` and ``panhuman`` (the same cells named in the
Azimuth pan-human scheme that no recipe trains on). ``SEL-CV`` is the mean of the 18 per-cell ROC-AUCs
(2 folds x 3 levels x full / panel / shallow); demo figures are the mean over the two fold models.

Usage::

    python bench/recipe_run.py NAME '{"data": {"cell_ontology_map": true}, "train": {"seed": 1}}' \\
        [--out runs/NAME] [--log runs/results.jsonl] [--skip-train]

``data`` updates the ``build_pairs`` kwargs, ``tower`` the tower config, ``train`` the training options and
``model`` top-level model keys. Keep ``holdout_fraction`` at 0.2 (the default here) so that the proxy's cells
stay out of training. About 3 minutes of training plus 1 minute of evaluation on 2 cores with a warm text cache.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERIES = [
    "proliferating cells", "cycling cells", "cells in G2/M phase", "B cells", "NK cells", "T cells", "monocytes",
    "dendritic cells",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name")
    ap.add_argument("overrides", nargs="?", default="{}", help="JSON with data / tower / train / model keys")
    ap.add_argument("--out", default=None, help="model folder (default: runs/NAME)")
    ap.add_argument("--log", default="runs/results.jsonl")
    ap.add_argument("--skip-train", action="store_true", help="only evaluate the model already in --out")
    ap.add_argument("--cv", action="store_true", help="2-fold cross-fitted proxy (SEL-CV), see the module doc")
    ap.add_argument("--soup", nargs="+", metavar="RUN", help="with --cv: instead of training, average the fold "
                    "models of these --cv runs (engine.training.train.soup) into runs/NAME/foldF and score that")
    ap.add_argument("--wise", metavar="RUN", help="with --cv: WiSE-FT, the weight mean of RUN's fold models and "
                    "their knowledge-initialised starts (rebuilt from RUN's configs), mixed by --alpha")
    ap.add_argument("--alpha", type=float, default=0.5, help="WiSE-FT weight of the trained model")
    args = ap.parse_args()
    if args.soup or args.wise:
        posthoc(args)
        args.skip_train = True
        args.cv = True
    if args.cv:
        return main_cv(args)
    over = json.loads(args.overrides)
    out = Path(args.out or f"runs/{args.name}").resolve()
    hold = over.get("data", {}).get("holdout_fraction", 0.2)
    cfg_path = _config(over, out, holdout_fraction=hold)

    t0 = time.perf_counter()
    if not args.skip_train:
        subprocess.run([sys.executable, "-m", "engine.training.train", "--config", str(cfg_path), "--out", str(out)],
                       check=True, cwd=ROOT)
    train_s = time.perf_counter() - t0

    import numpy as np

    import engine
    from engine.training.knowledge import proxy_benchmark

    model = engine.load_model(out)
    res = {"name": args.name, "overrides": over, "train_s": round(train_s)}
    log = json.loads((out / "train_log.json").read_text())
    res["val"] = {"best_epoch": log["best_epoch"], "R@10": log["best_value"]}
    res["proxy"] = {lvl: proxy_benchmark(model, holdout_fraction=hold, level=lvl) for lvl in ("main", "sub")}
    aucs = [res["proxy"][lvl][k]["roc_auc"] for lvl in ("main", "sub") for k in ("full", "panel", "shallow")]
    res["SEL"] = float(np.mean(aucs))
    demo = demo_figures(model)
    res["queries"] = demo.pop("queries")
    res["demo"] = demo
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as fh:
        fh.write(json.dumps(res, default=str) + "\n")
    main_s = ", ".join(f"{res['proxy']['main'][k]['roc_auc']:.3f}" for k in ("full", "panel", "shallow"))
    sub_s = ", ".join(f"{res['proxy']['sub'][k]['roc_auc']:.3f}" for k in ("full", "panel", "shallow"))
    print(f"{args.name}: SEL {res['SEL']:.3f} (proxy main {main_s}; sub {sub_s}) | "
          f"val R@10 {res['val']['R@10']:.3f} (epoch {res['val']['best_epoch']}) | "
          f"demo ROC-AUC {res['demo']['per_cell']:.3f} per cell / {res['demo']['per_class']:.3f} per class | "
          f"train {train_s:.0f} s")
    for q, (g, s) in res["queries"].items():
        print(f"  rho({q!r}) G2M {g:+.3f}  S {s:+.3f}")


def _config(over: dict, out: Path, **data) -> Path:
    """``assets/train_default.json`` with ``over`` applied, as one run (its ``soup`` section dropped), saved
    beside ``out``; ``data`` sets ``build_pairs`` kwargs before the overrides."""
    cfg = json.loads((ROOT / "assets" / "train_default.json").read_text())
    cfg.pop("soup", None)
    kwargs = cfg["data"][0]["kwargs"]
    kwargs.update(data)
    kwargs.update(over.get("data", {}))
    cfg["model"]["tower"].update(over.get("tower", {}))
    cfg["train"].update(over.get("train", {}))
    cfg["model"].update({k: v for k, v in over.get("model", {}).items()})
    out.mkdir(parents=True, exist_ok=True)
    cfg["out"] = str(out)
    path = out.with_suffix(".json")
    path.write_text(json.dumps(cfg, indent=1))
    return path


def demo_figures(model) -> dict:
    """Demo ROC-AUCs (per cell / per class) and query correlations; for transparency only."""
    import scanpy as sc
    from scipy.stats import spearmanr

    import engine
    from engine.training.evaluate import evaluate

    demo = sc.datasets.pbmc68k_reduced()
    ev = evaluate(demo, model, "bulk_labels")
    engine.embed_cells(demo, model, use_cache=False, progress=False)
    q = {}
    for text in QUERIES:
        s = engine.score_text(demo, model, text, write=False)
        q[text] = [float(spearmanr(s, demo.obs[c]).statistic) for c in ("G2M_score", "S_score")]
    return {"per_cell": ev["per_cell"]["roc_auc"], "per_class": ev["per_class"]["roc_auc"], "queries": q}


LEVELS = ("main", "sub", "panhuman")
CONDITIONS = ("full", "panel", "shallow")


def posthoc(args) -> None:
    """Write runs/NAME/fold{0,1} as soups of other runs' fold models (or WiSE-FT mixes with their starts)."""
    import shutil

    from engine.models.checkpoint import save_model
    from engine.training.config import load_config
    from engine.training.soup import soup
    from engine.training.trainer import _Trainer

    root = Path(args.out or f"runs/{args.name}").resolve()
    for fold in (0, 1):
        out = root / f"fold{fold}"
        if args.soup:
            paths = [(ROOT / "runs" / r / f"fold{fold}") for r in args.soup]
            soup(paths, out)
            first = paths[0]
        else:
            first = ROOT / "runs" / args.wise / f"fold{fold}"
            start = root / f"fold{fold}_start"
            cfg = load_config(str(first.with_suffix(".json")))
            tr = _Trainer(cfg, device="cpu", out=start, resume=False, max_steps=None, progress=False)
            tr.setup()
            save_model(tr.model, start)
            soup([start, first], out, weights=[1.0 - args.alpha, args.alpha])
        shutil.copy(first / "train_log.json", out / "train_log.json")


def main_cv(args) -> None:
    import numpy as np

    import engine
    from engine.training.knowledge import proxy_benchmark

    over = json.loads(args.overrides)
    root = Path(args.out or f"runs/{args.name}").resolve()
    res = {"name": args.name, "overrides": over, "cv": True, "folds": []}
    for fold in (0, 1):
        out = root / f"fold{fold}"
        cfg_path = _config(over, out, holdout_fraction=0.5, holdout_fold=fold)
        cfg = json.loads(cfg_path.read_text())
        if cfg["model"].get("init_from"):  # e.g. "runs/s6_base_s0/fold{fold}": continue that run's fold model
            cfg["model"]["init_from"] = str((ROOT / cfg["model"]["init_from"].format(fold=fold)).resolve())
            cfg_path.write_text(json.dumps(cfg, indent=1))
        t0 = time.perf_counter()
        if not args.skip_train:
            subprocess.run([sys.executable, "-m", "engine.training.train", "--config", str(cfg_path), "--out", str(out)],
                           check=True, cwd=ROOT)
        model = engine.load_model(out)
        f = {"fold": fold, "train_s": round(time.perf_counter() - t0)}
        log = json.loads((out / "train_log.json").read_text())
        f["val"] = {"best_epoch": log["best_epoch"], "R@10": log["best_value"]}
        f["proxy"] = {lvl: proxy_benchmark(model, holdout_fraction=0.5, holdout_fold=fold, level=lvl) for lvl in LEVELS}
        f["demo"] = demo_figures(model)
        res["folds"].append(f)
    auc = {(lvl, c): float(np.mean([f["proxy"][lvl][c]["roc_auc"] for f in res["folds"]])) for lvl in LEVELS for c in CONDITIONS}
    res["proxy_mean"] = {f"{lvl}/{c}": v for (lvl, c), v in auc.items()}
    res["SEL_CV"] = float(np.mean(list(auc.values())))
    res["NEW"] = float(np.mean([auc[("panhuman", c)] for c in CONDITIONS]))
    res["demo"] = {k: float(np.mean([f["demo"][k] for f in res["folds"]])) for k in ("per_cell", "per_class")}
    res["queries"] = {q: np.mean([f["demo"]["queries"][q] for f in res["folds"]], 0).tolist() for q in QUERIES}
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as fh:
        fh.write(json.dumps(res, default=str) + "\n")
    print(f"{args.name}: SEL-CV {res['SEL_CV']:.3f} | " + " | ".join(
        f"{lvl} " + ", ".join(f"{auc[(lvl, c)]:.3f}" for c in CONDITIONS) for lvl in LEVELS))
    print(f"  val R@10 {[f['val']['R@10'] for f in res['folds']]} | demo ROC-AUC (fold mean) "
          f"{res['demo']['per_cell']:.3f} per cell / {res['demo']['per_class']:.3f} per class "
          f"(folds {[round(f['demo']['per_cell'], 3) for f in res['folds']]}) | train {[f['train_s'] for f in res['folds']]} s")
    for q, (g, s_) in res["queries"].items():
        print(f"  rho({q!r}) G2M {g:+.3f}  S {s_:+.3f}")


if __name__ == "__main__":
    main()

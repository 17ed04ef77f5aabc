"""Leave-one-data-set-out (LODO) evaluation of a default-model recipe on the real-data corpus.

For each held-out corpus data set, train the recipe (``assets/train_default.json`` with ``--overrides``, one
run, no soup) with that data set left out of the corpus pairs, then score it zero-shot: simulated single cells
drawn from its profiles (:func:`engine.training.corpus.heldout_cells`, 20 per profile, 1,000–10,000 UMIs) against
the Cell Ontology names of its cell types through the default template ("A sample of {label} from a healthy
individual"; seed 000 appendix D protocol, :func:`engine.training.evaluate.evaluate`). Prints per-cell macro ROC-AUC
and accuracy per data set, their mean and standard deviation, and (for transparency only, never for
choosing) the demo's figures of each run. Each run appends a JSON line to ``--log``.

Usage::

    python bench/lodo_run.py NAME [--overrides JSON] [--holdout DS ...] [--corpus PATH] [--log runs/lodo.jsonl]
        [--skip-train] [--no-demo] [--model DIR]

``--overrides`` updates the config like ``bench/recipe_run.py``: ``data`` the knowledge pairs' kwargs,
``corpus`` the corpus pairs' kwargs, ``train`` the training options, ``model`` top-level model keys.
Without ``--holdout`` the fixed LODO subset :data:`LODO_SUBSET` is used.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The fixed held-out subset every recipe is judged on: data sets of different tissues, species and assays
#: whose cell types are (at least partly) named in other data sets too.
LODO_SUBSET = [
    "novershtern2011_hema",          # human blood/bone marrow, sorted bulk, microarray
    "cpl_lung_hca",                  # human lung, pseudo-bulk scRNA-seq
    "benayoun2019_mouse_rnaseq",     # mouse, many tissues, sorted bulk RNA-seq
    "cpl_liver_hca",                 # human liver, pseudo-bulk scRNA-seq
    "haber2017_intestine_epithelium_scref",  # mouse gut epithelium, pseudo-bulk
]


def _config(over: dict, out: Path, holdout: str | None, corpus: str | None) -> Path:
    cfg = json.loads((ROOT / "assets" / "train_default.json").read_text())
    cfg["soup"] = None
    cfg["out"] = str(out)
    for src in cfg["data"]:
        if src.get("callable") == "engine.training.knowledge:build_pairs":
            src["kwargs"].update(over.get("data", {}))
        if src.get("callable") == "engine.training.corpus:build_pairs":
            src["kwargs"].update(over.get("corpus", {}))
            if corpus:
                src["kwargs"]["path"] = corpus
            src["kwargs"]["holdout_datasets"] = [holdout] if holdout else []
    cfg["train"].update(over.get("train", {}))
    cfg["model"].update(over.get("model", {}))
    if "tower" in over:
        cfg["model"]["tower"].update(over["tower"])
    out.mkdir(parents=True, exist_ok=True)
    p = out / "config.run.json"
    p.write_text(json.dumps(cfg, indent=2))
    return p


def score_heldout(model_dir: Path, dataset: str, corpus: str | None) -> dict:
    import engine
    from engine.training.corpus import heldout_cells, load_corpus
    from engine.training.evaluate import evaluate

    cells = heldout_cells(dataset, corpus=load_corpus(corpus))
    model = engine.load_model(model_dir)
    res = evaluate(cells, model, "cell_type", template="cellwhisperer")
    return {"roc_auc": res["per_cell"]["roc_auc"], "accuracy": res["per_cell"]["accuracy"],
            "n_cells": res["n_cells"], "n_classes": res["n_classes"]}


def score_demo(model_dir: Path) -> dict:
    import engine
    from engine.training.evaluate import evaluate

    res = evaluate(engine.demo_dataset(), engine.load_model(model_dir), "bulk_labels", template="cellwhisperer")
    return {"roc_auc": res["per_cell"]["roc_auc"], "accuracy": res["per_cell"]["accuracy"],
            "per_class_roc_auc": res["per_class"]["roc_auc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name")
    ap.add_argument("--overrides", default="{}")
    ap.add_argument("--holdout", nargs="+", default=None)
    ap.add_argument("--corpus", default=None, help="built corpus (default: assets/corpus/corpus.h5ad)")
    ap.add_argument("--log", default="runs/lodo.jsonl")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--model", default=None, help="score this model on every held-out set instead of training "
                    "(the knowledge-only baseline, which never saw the corpus)")
    args = ap.parse_args()
    over = json.loads(args.overrides)
    rows, demo_cache = [], {}
    for ds in args.holdout or LODO_SUBSET:
        out = Path(args.model).resolve() if args.model else (ROOT / "runs" / args.name / ds).resolve()
        t0 = time.perf_counter()
        if not (args.skip_train or args.model):
            cfg = _config(copy.deepcopy(over), out, ds, args.corpus)
            subprocess.run([sys.executable, "-m", "engine.training.train", "--config", str(cfg), "--out", str(out)], check=True, cwd=ROOT)
        train_s = time.perf_counter() - t0
        r = {"name": args.name, "heldout": ds, "overrides": over, "train_s": round(train_s, 1), **score_heldout(out, ds, args.corpus)}
        if not args.no_demo:
            r["demo"] = demo_cache.get(out) or score_demo(out)
            demo_cache[out] = r["demo"]
        rows.append(r)
        print(f"{ds}: ROC-AUC {r['roc_auc']:.3f}  accuracy {r['accuracy']:.3f}  ({r['n_classes']} classes, {r['n_cells']} cells)"
              + (f"  | demo {r['demo']['roc_auc']:.3f} / acc {r['demo']['accuracy']:.3f}" if "demo" in r else ""), flush=True)
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        with open(args.log, "a") as fh:
            fh.write(json.dumps(r) + "\n")
    aucs = [r["roc_auc"] for r in rows]
    accs = [r["accuracy"] for r in rows]
    sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
    print(f"LODO {args.name}: per-cell macro ROC-AUC mean {statistics.mean(aucs):.3f} (SD {sd:.3f}, "
          f"min {min(aucs):.3f}, max {max(aucs):.3f}); accuracy mean {statistics.mean(accs):.3f} over {len(rows)} data sets")
    if rows and "demo" in rows[0]:
        print(f"demo (transparency only): per-cell ROC-AUC mean {statistics.mean(r['demo']['roc_auc'] for r in rows):.3f}")


if __name__ == "__main__":
    main()

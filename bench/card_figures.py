"""Print the model card's demo figures for a model folder (default: the bundled model).

The zero-shot table itself comes from ``python -m engine.evaluate demo``; this prints the two summary ROC-AUCs
and the free-text table: Spearman rho of each query's score with scanpy's ``G2M_score`` / ``S_score`` over the
700 cells of ``pbmc68k_reduced`` (issue 3's proliferation target). Same code as the run tables
(``bench/recipe_run.py``'s ``demo_figures``). For reporting only: nothing is chosen by these figures.

Usage::

    python bench/card_figures.py [MODEL_DIR]
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


if __name__ == "__main__":
    main()

"""Zero-shot labels: built-in or custom label sets, templates, metrics against a ground-truth column."""
from __future__ import annotations

import numpy as np
import pandas as pd
import panel as pn

import engine
from engine.errors import QueryError
from engine.tools.score import check_template

from .. import plots
from ..cache import SMOOTH_KEY
from ..label_sets import LABEL_SETS, label_names
from ..state import AppState
from .common import Job, StateView, csv_download, plain, set_table, table_widget
from . import panes

__all__ = ["ZeroShotView"]

CUSTOM = "Custom list"
NO_TRUTH = "(none)"


def _definitions(set_name: str) -> pd.DataFrame:
    """Label, CL id and Cell Ontology definition of a built-in set."""
    rows = []
    table = None
    try:
        from engine.io.ontology import cell_ontology_table

        table = cell_ontology_table()
    except Exception:  # noqa: BLE001 - definitions are a nicety
        table = None
    for label, cl in LABEL_SETS[set_name]["labels"]:
        d = ""
        if cl and table is not None and cl in table.index:
            d = str(table.loc[cl, "definition"] or "")
        rows.append({"label": label, "CL id": cl or "", "definition": d})
    return pd.DataFrame(rows)


#: The zero-shot summary's columns (one row per predicted label): ``label``, ``cells``, ``mean_confidence``.
SUMMARY_COLUMNS = pd.DataFrame({"label": pd.Series(dtype=object), "cells": pd.Series(dtype="int64"),
                                "mean_confidence": pd.Series(dtype="float64")})


class ZeroShotView(StateView):
    """Pick or edit labels, run zero-shot labelling, evaluate against a ground-truth column, accept labels."""

    def __init__(self, state: AppState, **params):
        super().__init__(state, **params)
        self.job = Job()
        first = next(iter(LABEL_SETS))
        self.label_set = pn.widgets.Select(label="Label set", options=list(LABEL_SETS) + [CUSTOM], value=first, width=240)
        self.labels = pn.widgets.TextAreaInput(label="Labels (one per line, editable)", value="\n".join(label_names(first)),
                                               height=200, sizing_mode="stretch_width")
        templates = dict(engine.TEMPLATES)
        self.template = pn.widgets.Select(label="Template", options=list(templates) + ["custom"],
                                          value=LABEL_SETS[first]["template"] if LABEL_SETS[first]["template"] in templates else "custom",
                                          width=160)
        self.custom_template = pn.widgets.TextInput(label="Custom template ({label}, {definition})",
                                                    value="A sample of {label}", width=300)
        self.template_text = panes.Markdown("", margin=(0, 5))
        self.smooth = pn.widgets.Checkbox(label="Smooth over neighbours", value=state.zs_smooth, margin=(8, 5, 0, 5))
        self.smooth_help = pn.widgets.TooltipIcon(
            value="Score each cell's embedding averaged with its 15 nearest neighbours (label-free; fewer isolated "
                  "mislabelled cells, but populations of under ~15 cells blur into their neighbours).",
            margin=(8, 0, 0, 0))
        self.run_button = pn.widgets.Button(label="Label cells", color="primary", width=130)
        # the summary's columns from the start: a run then sends its rows only (a first run that brought the
        # columns made the browser set the table up again)
        self.summary = table_widget(value=SUMMARY_COLUMNS.copy(), height=260, page_size=10)
        self.truth = pn.widgets.Select(label="Ground-truth column", options=[NO_TRUTH] + state.truth_columns(), width=220)
        self.eval_button = pn.widgets.Button(label="Evaluate", color="default", width=110, margin=(23, 5, 5, 5))
        self.metrics = table_widget(height=260, page_size=12, layout="fit_columns")
        self.confusion = pn.pane.HoloViews(None, width=560, height=460)
        self.eval_info = panes.Markdown("", css_classes=["eval-info"])
        self.accept_name = pn.widgets.TextInput(label="Accept as obs column", value="zero_shot", width=200)
        self.accept = pn.widgets.Button(label="Accept labels", color="success", width=130, margin=(23, 5, 5, 5))
        self.definitions = table_widget(height=220, page_size=8, layout="fit_columns")
        self.definitions_card = pn.Card(self.definitions, title="Cell Ontology definitions", collapsed=True,
                                        sizing_mode="stretch_width")
        self.definitions_card.param.watch(self._fill_definitions, "collapsed")

        self.label_set.param.watch(self._on_set, "value")
        self.template.param.watch(self._show_template, "value")
        self.custom_template.param.watch(self._show_template, "value")
        self.run_button.on_click(self._run)
        self.eval_button.on_click(self._evaluate)
        self.accept.on_click(lambda event: self.job.guard(lambda: self.state.accept_labels(self.accept_name.value)))
        self.state.param.watch(self._on_map_version, "map_version")
        self._template_error = False
        self._show_template()

    def __panel__(self):
        left = pn.Column(
            # wraps: with the custom template shown the three are wider than this half of the tab (in a Row the
            # template box was drawn under the "Predicted labels" heading beside it)
            pn.FlexBox(self.label_set, self.template, self.custom_template, flex_wrap="wrap",
                       align_items="flex-start", sizing_mode="stretch_width"),
            pn.Row(self.template_text, self.smooth, self.smooth_help), self.labels, self.definitions_card,
            pn.Row(self.run_button, self.accept_name, self.accept), self.job,
            sizing_mode="stretch_width")
        right = pn.Column(
            panes.Markdown("#### Predicted labels"), self.summary,
            pn.Row(self.truth, self.eval_button), self.eval_info, self.metrics, self.confusion,
            sizing_mode="stretch_width")
        return pn.Row(left, right, sizing_mode="stretch_width")

    # ------------------------------------------------------------------ reactions
    def template_value(self) -> str:
        return self.custom_template.value if self.template.value == "custom" else self.template.value

    def _show_template(self, *_):
        """Show the label text; a custom template that cannot be used shows its error in the page at once."""
        fmt = engine.TEMPLATES.get(self.template.value, self.custom_template.value)
        self.custom_template.visible = self.template.value == "custom"
        try:
            fmt = check_template(fmt)
        except QueryError as err:
            self.template_text.object = "Label text: (not usable, see below)"
            self.job.show(str(err), "danger")
            self._template_error = True
            return
        if self._template_error:
            self.job.clear()
            self._template_error = False
        self.template_text.object = f"Label text: *{plain(fmt)}*"

    def _on_set(self, event):
        if event.new == CUSTOM:
            return
        info = LABEL_SETS[event.new]
        self.labels.value = "\n".join(label_names(event.new))
        if info["template"] in engine.TEMPLATES:
            self.template.value = info["template"]
        else:
            self.custom_template.value = info["template"]
            self.template.value = "custom"
        self._fill_definitions()

    def _fill_definitions(self, *_):
        """Fill the definitions table lazily (the ontology takes a few seconds to load the first time)."""
        if self.definitions_card.collapsed or self.label_set.value == CUSTOM:
            return
        set_table(self.definitions, _definitions(self.label_set.value))

    def _on_map_version(self, *_):
        opts = [NO_TRUTH] + self.state.truth_columns()
        if opts != self.truth.options:
            self.truth.options = opts

    async def _run(self, event=None):
        labels = [x.strip() for x in self.labels.value.splitlines() if x.strip()]
        template = self.template_value()
        smooth = self.smooth.value
        st = self.state

        def apply(probs):
            st.apply_zero_shot(probs, template, smooth)
            self._show_summary()

        first = smooth and SMOOTH_KEY not in st.adata.obsm
        label = "Smoothing embeddings over neighbours (once per dataset), then labelling cells" if first else "Labelling cells"
        await self.job.run(lambda: st.compute_zero_shot(labels, template, smooth), apply, label=label,
                           disable=[self.run_button])

    def _show_summary(self):
        """The summary table: cells and mean confidence per predicted label (:data:`SUMMARY_COLUMNS`)."""
        st = self.state
        labels = st.zs_labels()
        conf = st.zs_probs.to_numpy().max(axis=1)
        df = pd.DataFrame({"label": np.asarray(labels, dtype=object), "confidence": conf})
        summ = df.groupby("label", observed=True).agg(cells=("confidence", "size"), mean_confidence=("confidence", "mean"))
        summ = summ.reset_index().sort_values("cells", ascending=False)
        summ["mean_confidence"] = summ["mean_confidence"].round(3)
        set_table(self.summary, summ)

    async def _evaluate(self, event=None):
        key = self.truth.value
        if key in (None, NO_TRUTH):
            self.job.show("Choose a ground-truth obs column (e.g. bulk_labels) first.", "warning")
            return
        template = self.template_value()
        smooth = self.smooth.value
        st = self.state

        def apply(res):
            st.apply_evaluate(res)
            self._show_metrics(res)

        await self.job.run(lambda: st.compute_evaluate(key, template, smooth), apply, label="Evaluating",
                           disable=[self.eval_button])

    def _show_metrics(self, res: dict):
        levels = {"per cell": res.get("per_cell") or {}, "per class (mean embedding)": res.get("per_class") or {}}
        if res.get("refined"):
            levels["per cell, smoothed"] = res["refined"]
        keys = [k for k in (levels["per cell"] or levels["per class (mean embedding)"])
                if k not in ("note", "skipped_classes")]
        rows = []
        for k in keys:
            row = {"metric": k}
            for level, m in levels.items():
                v = m.get(k)
                row[level] = round(v, 3) if isinstance(v, float) else v
            rows.append(row)
        set_table(self.metrics, pd.DataFrame(rows))
        pc = res.get("per_cell") or {}
        notes = " ".join(f"Note: {n}." for n in res.get("notes") or [])
        self.eval_info.object = (
            f"**Zero-shot vs {plain(res.get('label_key', ''))}**: {res.get('n_cells', '?')} cells, "
            f"{res.get('n_classes', '?')} classes (labels from the column, template *{plain(res.get('template', ''))}*); "
            f"per-cell accuracy {pc.get('accuracy', float('nan')):.3f}, macro F1 {pc.get('f1_macro', float('nan')):.3f}, "
            f"ROC-AUC {pc.get('roc_auc', float('nan')):.3f} (CellWhisperer's protocol, unsmoothed"
            + (f"; on smoothed embeddings {res['refined']['roc_auc']:.3f}" if res.get("refined") else "")
            + "). Confusion matrix below (rows: true labels, unsmoothed). " + plain(notes))
        conf = res.get("confusion") or {}
        if conf.get("labels") is not None:
            self.confusion.object = plots.confusion_heatmap(
                conf["labels"], conf["matrix"], title=f"Confusion: {res.get('label_key', '')} (rows true, row-normalised)")

    def downloads(self) -> list:
        return [csv_download(lambda: self.state.zs_probs, "zero_shot_probabilities.csv", "Zero-shot probabilities CSV")]

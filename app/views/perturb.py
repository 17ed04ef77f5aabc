"""In-silico perturbation of the selected cells, and a scan ranking genes by their effect."""
from __future__ import annotations

import pandas as pd
import panel as pn

from .. import plots
from ..state import AppState
from .common import Job, StateView, csv_download, plain, show_table, set_table, table_widget
from . import panes

__all__ = ["PerturbView"]


class PerturbView(StateView):
    """Delete or overexpress genes in the selected cells; show the per-cell score change; scan genes."""

    def __init__(self, state: AppState, **params):
        super().__init__(state, **params)
        self.job = Job(cancellable=True)
        self.scan_job = Job(cancellable=True)
        self.genes = pn.widgets.MultiChoice(label="Genes to perturb", options=state.model_genes(), max_items=50,
                                            sizing_mode="stretch_width", placeholder="type gene symbols")
        self.mode = pn.widgets.RadioButtonGroup(label="Mode", options=["delete", "overexpress"], value="delete",
                                                margin=(23, 5, 5, 5))
        self.goal = pn.widgets.AutocompleteInput(label="Goal state (label, optional)", options=[], restrict=False,
                                                 min_characters=0, case_sensitive=False, width=240,
                                                 placeholder="e.g. B cell")
        self.run_button = pn.widgets.Button(label="Perturb", color="primary", width=110, margin=(23, 5, 5, 5))
        self.scope = panes.Markdown("")
        self.hist = pn.pane.HoloViews(None, width=460, height=320)
        self.summary = panes.Markdown("")
        self.cells_table = table_widget(height=320, page_size=10)
        self.scan_cells = pn.widgets.IntInput(label="Max cells", value=200, start=10, end=5000, step=50, width=110)
        self.scan_genes = pn.widgets.IntInput(label="Max genes", value=50, start=5, end=2000, step=10, width=110)
        self.scan_button = pn.widgets.Button(label="Scan genes", color="primary", width=120, margin=(23, 5, 5, 5))
        self.scan_table = table_widget(height=360, page_size=12)
        self.scan_holder = pn.Column(self.scan_table, sizing_mode="stretch_width")
        self.cells_csv = csv_download(lambda: self.state.perturb_table, "perturbation_cells.csv", "Per-cell CSV")
        self.scan_csv = csv_download(lambda: self.state.scan_table, "perturbation_scan.csv", "Scan CSV")

        self.run_button.on_click(self._run)
        self.scan_button.on_click(self._scan)
        self.state.param.watch(self._update_scope, ["selection", "query", "zs_probs"])
        self._update_scope()

    def __panel__(self):
        return pn.Column(
            panes.Markdown("Edit the rank encoding of the selected cells (delete genes, or move them to the top = "
                             "overexpress), re-embed them, and measure the change of the current query's score, "
                             "cos(original, perturbed) and the shift toward a goal label."),
            self.scope,
            pn.Row(self.genes, self.mode, self.goal, self.run_button, sizing_mode="stretch_width"),
            self.job, self.summary,
            pn.Row(self.hist, pn.Column(self.cells_table, self.cells_csv, sizing_mode="stretch_width"),
                   sizing_mode="stretch_width"),
            panes.HTML("<hr style='border:0;border-top:1px solid #ddd;margin:8px 0'>", sizing_mode="stretch_width"),
            panes.Markdown("#### Scan: rank genes by their effect (each gene perturbed alone)"),
            pn.Row(self.scan_cells, self.scan_genes, self.scan_button), self.scan_job,
            self.scan_holder, self.scan_csv,
            sizing_mode="stretch_width",
        )

    def _update_scope(self, *_):
        st = self.state
        cells = (f"the **{st.n_selected:,} selected cells**" if st.selection is not None
                 else f"**all {st.n_cells:,} cells** (no selection; at most 2,000 are sampled)")
        query = f"the query **{plain(st.query)}**" if st.query else "no query (type one to measure its score change)"
        self.scope.object = f"Perturbs {cells}; reports {query}."
        if st.zs_probs is not None and list(st.zs_probs.columns) != list(self.goal.options):
            self.goal.options = list(st.zs_probs.columns)  # only when changed: each set is a message to the page

    async def _run(self, event=None):
        st = self.state
        genes, mode, goal = list(self.genes.value), self.mode.value, (self.goal.value or self.goal.value_input or None)

        def apply(table: pd.DataFrame):
            st.apply_perturb(table)
            metric = next(c for c in ("delta_logit", "goal_shift", "cos_original_perturbed") if c in table.columns)
            name = {"delta_logit": f"Δ score ({st.query})", "goal_shift": "goal shift",
                    "cos_original_perturbed": "cos(original, perturbed)"}[metric]
            center = 1.0 if metric == "cos_original_perturbed" else 0.0
            self.hist.object = plots.histogram(table[metric].to_numpy(), name=name, diverging_center=center,
                                               title=f"{mode} {', '.join(genes[:4])}: {name}")
            parts = [f"**{len(table):,} cells** perturbed ({plain(mode)} {plain(', '.join(genes))})",
                     f"mean cos(original, perturbed) = {table['cos_original_perturbed'].mean():.4f}"]
            if "delta_logit" in table:
                parts.append(f"mean Δ score = {table['delta_logit'].mean():+.3f}")
            if "goal_shift" in table:
                parts.append(f"mean goal shift toward '{plain(goal)}' = {table['goal_shift'].mean():+.4f}")
            self.summary.object = "; ".join(parts) + "."
            shown = table.rename_axis("cell").reset_index()
            for c in shown.columns:
                if shown[c].dtype.kind == "f":
                    shown[c] = shown[c].round(4)
            set_table(self.cells_table, shown)

        await self.job.run(lambda: st.compute_perturb(genes, mode=mode, goal_label=goal, cancel=self.job.cancel_requested),
                           apply, label="Perturbing cells", disable=[self.run_button])

    async def _scan(self, event=None):
        st = self.state
        mode, goal = self.mode.value, (self.goal.value or None)
        max_cells, max_genes = int(self.scan_cells.value), int(self.scan_genes.value)

        def apply(table: pd.DataFrame):
            st.apply_scan(table)
            self.scan_table = show_table(self.scan_holder, table, height=360, page_size=12)

        await self.scan_job.run(
            lambda: st.compute_scan(mode=mode, goal_label=goal, max_cells=max_cells, max_genes=max_genes,
                                    cancel=self.scan_job.cancel_requested),
            apply, label="Scanning genes", disable=[self.scan_button])

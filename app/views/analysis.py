"""Describe a selection with keywords, and top-vs-bottom DE followed by enrichment."""
from __future__ import annotations

import pandas as pd
import panel as pn

import engine

from .. import plots
from ..state import QUERY, AppState
from .common import (Job, StateView, csv_download, display_table, plain, plain_bokeh, show_table, set_table,
                     table_widget)
from . import panes

__all__ = ["DescribeView", "DEView"]


#: Libraries described by default: cell types and compact pathway sets (about 3,600 terms).
DEFAULT_LIBRARIES = ("Cell_Ontology", "CellType_Markers_Human_pegasus", "MSigDB_Hallmark_v7.5.1",
                     "MSigDB_C2_CP_PID_v7.5.1", "Pegasus_Signatures_Human")


def _library_names() -> list[str]:
    try:
        import engine

        names = list(engine.list_libraries())
    except Exception:  # noqa: BLE001 - the list is a convenience; describe() reports real errors
        names = []
    return names + ["Cell_Ontology"]


class DescribeView(StateView):
    """Keywords per term library for the selected cells (CellWhisperer's "describe selection")."""

    def __init__(self, state: AppState, **params):
        super().__init__(state, **params)
        self.job = Job()
        libs = _library_names()
        default = [lib for lib in DEFAULT_LIBRARIES if lib in libs] or libs
        self.libraries = pn.widgets.MultiChoice(label="Term libraries", options=libs, value=default,
                                                sizing_mode="stretch_width")
        self.top_n = pn.widgets.IntInput(label="Terms per library", value=5, start=1, end=50, width=130)
        self.run_button = pn.widgets.Button(label="Describe selection", color="primary", width=160,
                                            margin=(23, 5, 5, 5))
        self.table = table_widget(groupby=["library"], height=420, page_size=40)
        self.info = panes.Markdown(
            "Select cells on the map (box or lasso), then describe them: their mean embedding is scored against "
            "every term of the libraries, z-scored across terms, and the best terms per library are listed. "
            "The first run embeds the libraries' terms once (cached on disk): about 15 s for the default "
            "libraries on a CPU, a minute more with GO Biological Process and Reactome.")
        self.run_button.on_click(self._run)

    def __panel__(self):
        return pn.Column(self.info, pn.Row(self.libraries, self.top_n, self.run_button, sizing_mode="stretch_width"),
                         self.job, self.table, sizing_mode="stretch_width")

    async def _run(self, event=None):
        st = self.state
        libs = list(self.libraries.value) or None
        top_n = int(self.top_n.value)

        def apply(table):
            st.apply_describe(table)
            t = table.copy()
            t["zscore"] = t["zscore"].round(2)
            t["logit"] = t["logit"].round(2)
            set_table(self.table, t)

        await self.job.run(lambda: st.compute_describe(libraries=libs, top_n=top_n), apply, label="Describing selection", disable=[self.run_button])


class DEView(StateView):
    """Top-vs-bottom DE by the current score (volcano + table) and enrichment of the top genes (bars + table)."""

    def __init__(self, state: AppState, **params):
        super().__init__(state, **params)
        self.job = Job()
        self.source = pn.widgets.Select(label="Rank cells by", options=self._sources(), width=220)
        self.mode = pn.widgets.RadioButtonGroup(label="Group size", options=["n cells", "fraction"], value="n cells",
                                                margin=(23, 5, 5, 5))
        self.n = pn.widgets.IntInput(label="Top / bottom cells (n)", value=100, start=3, step=10, width=150)
        self.fraction = pn.widgets.FloatInput(label="Fraction", value=0.1, start=0.01, end=0.5, step=0.01, width=110,
                                              visible=False)
        self.within = pn.widgets.Checkbox(label="Only inside the current selection", value=False, margin=(30, 5, 5, 5))
        self.de_button = pn.widgets.Button(label="Run DE", color="primary", width=110, margin=(23, 5, 5, 5))
        self.volcano_plot = plots.Volcano(width=500, height=400)  # updated in place by every DE run
        self.volcano_plot.figure.title.text = "Run DE to draw the volcano plot"
        self.volcano = pn.pane.Bokeh(self.volcano_plot.figure)
        # the result's columns from the start: the first run then sends its rows only, as every later run does
        # (a first run that replaced an empty table made the browser build a new one)
        shown, fmt = display_table(engine.empty_de_table())
        self.de_table = table_widget(value=shown, formatters=fmt, height=400, page_size=12)
        self.de_holder = pn.Column(self.de_table, sizing_mode="stretch_width")
        self.de_info = panes.Markdown("")
        self.n_genes = pn.widgets.IntInput(label="Top up-regulated genes", value=50, start=5, end=500, width=170)
        self.online = pn.widgets.Checkbox(label="Try Enrichr online", value=False, margin=(30, 5, 5, 5))
        self.enrich_button = pn.widgets.Button(label="Run enrichment", color="primary", width=140,
                                               margin=(23, 5, 5, 5))
        self.bars = pn.pane.HoloViews(None, width=900, height=400)
        self.enrich_table = table_widget(height=400, page_size=12)
        self.enrich_holder = pn.Column(self.enrich_table, sizing_mode="stretch_width")
        self.enrich_info = panes.Markdown("")
        self.de_csv = csv_download(lambda: self.state.de_table, "de_top_vs_bottom.csv", "DE table CSV")
        self.enrich_csv = csv_download(lambda: self.state.enrich_table, "enrichment.csv", "Enrichment CSV")

        self.mode.param.watch(self._on_mode, "value")
        self.de_button.on_click(self._run_de)
        self.enrich_button.on_click(self._run_enrich)
        self.state.param.watch(self._refresh_sources, ["scores", "map_version"])

    def _sources(self) -> dict:
        st = self.state
        opts = {"Current query score": QUERY}
        for c in st.adata.obs.columns:
            s = st.adata.obs[c]
            if s.dtype.kind in "fi":
                opts[f"obs: {c}"] = c
        return opts

    def _refresh_sources(self, *_):
        opts = self._sources()
        if opts != self.source.options:
            value = self.source.value
            self.source.options = opts
            self.source.value = value if value in opts.values() else QUERY

    def _on_mode(self, event):
        self.n.visible = event.new == "n cells"
        self.fraction.visible = event.new == "fraction"

    def __panel__(self):
        return pn.Column(
            panes.Markdown("Compare the cells that match the current score best (top) with those that match worst "
                             "(bottom), as CellWhisperer does; then test the top up-regulated genes for enrichment "
                             "(offline gene-set libraries by default)."),
            pn.Row(self.source, self.mode, self.n, self.fraction, self.within, self.de_button),
            self.job, self.de_info,
            pn.Row(self.volcano, pn.Column(self.de_holder, self.de_csv, sizing_mode="stretch_width"),
                   sizing_mode="stretch_width"),
            panes.HTML("<hr style='border:0;border-top:1px solid #ddd;margin:8px 0'>", sizing_mode="stretch_width"),
            pn.Row(self.n_genes, self.online, self.enrich_button), self.enrich_info,
            self.bars, self.enrich_holder, self.enrich_csv,
            sizing_mode="stretch_width",
        )

    async def _run_de(self, event=None):
        st = self.state
        kw = dict(source=self.source.value, within_selection=bool(self.within.value))
        if self.mode.value == "fraction":
            kw.update(fraction=float(self.fraction.value), n=None)
        else:
            kw.update(n=int(self.n.value), fraction=None)

        def apply(table):
            st.apply_de(table)
            with plain_bokeh():  # plain Bokeh models: changed with the document's events held and sent
                self.volcano_plot.update(table, title=f"Top vs bottom {table.attrs.get('n_used', '')} cells")
            self.de_table = show_table(self.de_holder, table, height=400, page_size=12)
            n_up = int(((table["direction"] == "up") & (table["pval_adj"] < 0.05)).sum())
            n_down = int(((table["direction"] == "down") & (table["pval_adj"] < 0.05)).sum())
            msgs = " ".join(table.attrs.get("messages") or [])
            n_used = plain(table.attrs.get("n_used"))
            self.de_info.object = (f"**{n_used} top vs {n_used} bottom cells** "
                                   f"({plain(table.attrs.get('method', ''))}); {n_up} genes up and {n_down} down at "
                                   f"FDR < 0.05. {plain(msgs)}")
            if len(self.enrich_table.value):
                self.enrich_table = show_table(self.enrich_holder, pd.DataFrame(), height=400, page_size=12)
            self.bars.object = None

        await self.job.run(lambda: st.compute_de(**kw), apply, label="Testing genes", disable=[self.de_button])

    async def _run_enrich(self, event=None):
        st = self.state
        n_genes, online = int(self.n_genes.value), bool(self.online.value)

        def apply(table):
            st.apply_enrich(table)
            self.bars.object = plots.enrichment_bars(table, width=880)
            self.enrich_table = show_table(self.enrich_holder, table, height=400, page_size=12)
            self.enrich_info.object = plain(" ".join(table.attrs.get("messages") or []))

        await self.job.run(lambda: st.compute_enrich(n_genes=n_genes, online=online), apply,
                           label="Enrichment", disable=[self.enrich_button])

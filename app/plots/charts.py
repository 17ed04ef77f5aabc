"""Side charts: score histogram, category bars, volcano, enrichment bars and confusion heat map."""
from __future__ import annotations

from typing import Sequence

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401
import numpy as np
import pandas as pd

from .colours import _short

__all__ = ["histogram", "histogram_data", "ScoreHistogram", "category_bars", "volcano", "enrichment_bars",
           "confusion_heatmap"]


def histogram_data(values: np.ndarray, *, selected: np.ndarray | None = None, bins: int = 50,
                   diverging_center: float | None = None) -> tuple[dict, float, bool]:
    """Bins of a histogram: ``({left, right, top, sel}, centre, any selected)`` (NaN ignored)."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    edges = np.histogram_bin_edges(v[finite], bins=bins) if finite.any() else np.linspace(0, 1, bins + 1)
    counts, _ = np.histogram(v[finite], bins=edges)
    sel = np.zeros_like(finite) if selected is None else (np.asarray(selected, dtype=bool) & finite)
    c2, _ = np.histogram(v[sel], bins=edges)
    center = diverging_center if diverging_center is not None else (float(np.median(v[finite])) if finite.any() else 0.0)
    return {"left": edges[:-1], "right": edges[1:], "top": counts, "sel": c2}, float(center), bool(sel.any())


class ScoreHistogram:
    """The side histogram as one plain Bokeh figure whose data are replaced in place.

    A new query only sends new bin heights to the browser (milliseconds on the server), instead of
    HoloViews rebuilding an overlay (a tenth of a second of the event loop shared by every session).
    """

    def __init__(self, *, width: int = 330, height: int = 300):
        from bokeh.models import ColumnDataSource, HoverTool, Span
        from bokeh.plotting import figure

        self.source = ColumnDataSource({"left": [], "right": [], "top": [], "sel": []})
        fig = figure(width=width, height=height, toolbar_location=None, tools="", x_axis_label="value",
                     y_axis_label="cells", title="")
        fig.quad(left="left", right="right", bottom=0, top="top", source=self.source, color="#9aa4b1",
                 line_color=None, legend_label="all cells")
        self._selected = fig.quad(left="left", right="right", bottom=0, top="sel", source=self.source,
                                  color="#f28e2b", alpha=0.85, line_color=None, legend_label="selected")
        self.span = Span(location=0, dimension="height", line_color="black", line_dash="dashed", line_width=1)
        fig.add_layout(self.span)
        fig.add_tools(HoverTool(tooltips=[("value", "@left{0.000} to @right{0.000}"), ("cells", "@top"),
                                          ("selected", "@sel")], renderers=fig.renderers[:1]))
        fig.legend.location = "top_right"
        fig.legend.label_text_font_size = "8pt"
        fig.title.text_font_size = "10pt"
        fig.y_range.start = 0
        self.figure = fig

    def update(self, values: np.ndarray, *, selected: np.ndarray | None = None, name: str = "score",
               diverging_center: float | None = None, title: str = "", bins: int = 50) -> None:
        """Show ``values`` (see :func:`histogram` for the arguments)."""
        data, center, any_sel = histogram_data(values, selected=selected, bins=bins, diverging_center=diverging_center)
        self.source.data = data
        self.span.location = center
        self.figure.title.text = title
        self.figure.xaxis.axis_label = name
        self.figure.legend.visible = any_sel
        self._selected.visible = any_sel


def histogram(values: np.ndarray, *, selected: np.ndarray | None = None, name: str = "score", bins: int = 50,
              width: int = 320, height: int = 240, diverging_center: float | None = None, title: str = ""):
    """Histogram of per-cell values: all cells in grey, the selected ones in orange, a dashed line at the centre.

    Always an overlay of the same three layers (so a plot can be updated in place).

    Parameters
    ----------
    values
        ``(n_cells,)`` float; NaN ignored.
    selected
        Optional boolean mask ``(n_cells,)`` of selected cells.
    diverging_center
        Position of the dashed line (e.g. 0 for score changes; default: the median).
    """
    data, center, any_sel = histogram_data(values, selected=selected, bins=bins, diverging_center=diverging_center)
    edges = np.append(data["left"], data["right"][-1:])
    counts, c2 = data["top"], data["sel"]
    dim = hv.Dimension("value", label=name)
    opts = dict(width=width, height=height, tools=["hover"], line_color=None, xlabel=name, ylabel="cells",
                toolbar=None, framewise=True)
    return (hv.Histogram((edges, counts), kdims=[dim], vdims=["cells"], label="all cells").opts(color="#9aa4b1", **opts)
            * hv.Histogram((edges, c2), kdims=[dim], vdims=["cells"], label="selected").opts(
                color="#f28e2b", alpha=0.85, **opts)
            * hv.VLine(center).opts(color="black", line_dash="dashed", line_width=1)).opts(
        title=title, legend_position="top_right", show_legend=any_sel, framewise=True)


def category_bars(values, *, selected: np.ndarray | None = None, name: str = "category", colors: dict | None = None,
                  width: int = 320, height: int = 300, max_bars: int = 20):
    """Horizontal bars of cells per category (selected cells in orange when there is a selection)."""
    cat = pd.Series(pd.Categorical(values))
    counts = cat.value_counts()
    counts = counts[counts > 0].iloc[:max_bars]
    labels = [_short(str(c), 28) for c in counts.index]
    df = pd.DataFrame({"category": labels, "cells": counts.to_numpy()})
    cols = colors or {}
    df["fill"] = [cols.get(str(c), "#9aa4b1") for c in counts.index]
    if selected is not None and np.asarray(selected).any():
        sc = cat[np.asarray(selected, dtype=bool)].value_counts()
        df["selected"] = [int(sc.get(c, 0)) for c in counts.index]
        df["fill"] = "#f28e2b"
        vdims = ["selected", "cells", "fill"]
        title = f"{_short(name, 22)}: selected"
    else:
        vdims = ["cells", "fill"]
        # the frame starts after the long category ticks, so the title gets little room; the axis says "cells"
        title = _short(name, 24)
    df = df.iloc[::-1]
    return hv.Bars(df, kdims=[hv.Dimension("category", label=name)], vdims=vdims).opts(
        invert_axes=True, width=width, height=height, tools=["hover"], color="fill", xlabel="", ylabel="cells",
        title=title, fontsize={"yticks": "8pt", "title": "10pt"}, toolbar=None)


def volcano(table: pd.DataFrame, *, fdr: float = 0.05, lfc: float = 0.5, width: int = 480, height: int = 380,
            n_labels: int = 10, title: str = "Top vs bottom", max_lfc: float = 10.0):
    """Volcano plot of a DE table (``gene``, ``logfoldchange``, ``pval_adj``).

    Genes with ``pval_adj < fdr`` and ``|logfoldchange| > lfc`` are coloured (red = up, blue = down) and the
    ``n_labels`` most significant of them labelled. Fold changes are drawn within ±``max_lfc`` (scanpy reports
    about ±30 when a group does not express a gene at all); the hover shows the exact value.
    """
    df = pd.DataFrame({
        "gene": table["gene"].astype(str).to_numpy(),
        "logfoldchange": pd.to_numeric(table["logfoldchange"], errors="coerce").to_numpy(dtype=np.float64),
        "pval_adj": pd.to_numeric(table["pval_adj"], errors="coerce").to_numpy(dtype=np.float64),
    })
    df = df[np.isfinite(df["logfoldchange"]) & np.isfinite(df["pval_adj"])]
    df["neg_log10_padj"] = -np.log10(np.clip(df["pval_adj"].to_numpy(), 1e-300, 1.0))
    df["lfc_exact"] = df["logfoldchange"]
    df["logfoldchange"] = df["logfoldchange"].clip(-max_lfc, max_lfc)
    up = (df["pval_adj"] < fdr) & (df["logfoldchange"] > lfc)
    down = (df["pval_adj"] < fdr) & (df["logfoldchange"] < -lfc)
    df["class"] = np.where(up, "up in top", np.where(down, "up in bottom", "not significant"))
    cmap = {"up in top": "#d62728", "up in bottom": "#1f77b4", "not significant": "#b0b0b0"}
    scatter = hv.Scatter(df, kdims=[hv.Dimension("logfoldchange", label="log2 fold change")],
                         vdims=[hv.Dimension("neg_log10_padj", label="-log10 adj. p"), "gene", "class",
                                hv.Dimension("lfc_exact", label="log2 fold change (exact)")]).opts(
        color="class", cmap=cmap, size=5, alpha=0.8, tools=["hover"], width=width, height=height, title=title,
        legend_position="bottom_right", show_legend=True)
    top = df[up | down].nlargest(n_labels, "neg_log10_padj")
    labels = hv.Labels(top, kdims=["logfoldchange", "neg_log10_padj"], vdims=["gene"]).opts(
        text_font_size="8pt", yoffset=0.0, text_color="#333333", text_baseline="bottom")
    return (scatter * labels).opts(width=width, height=height, shared_axes=False)


def enrichment_bars(table: pd.DataFrame, *, n: int = 15, width: int = 520, height: int = 380,
                    title: str = "Enrichment of top genes"):
    """Horizontal bars of ``-log10(pval_adj)`` for the ``n`` best terms of an enrichment table."""
    if table is None or len(table) == 0:
        return hv.Bars(pd.DataFrame({"term": [], "neg_log10_padj": []}), kdims=["term"], vdims=["neg_log10_padj"]).opts(
            width=width, height=height, title=title + " (no terms)")
    df = table.copy()
    df["neg_log10_padj"] = -np.log10(np.clip(pd.to_numeric(df["pval_adj"], errors="coerce").fillna(1.0), 1e-300, 1.0))
    df = df.sort_values("neg_log10_padj", ascending=False).head(n)
    df["label"] = [_short(f"{t} ({lib})", 60) for t, lib in zip(df["term"], df["library"])]
    df = df.iloc[::-1]
    return hv.Bars(df, kdims=[hv.Dimension("label", label="term")],
                   vdims=[hv.Dimension("neg_log10_padj", label="-log10 adj. p"), "overlap", "library"]).opts(
        invert_axes=True, width=width, height=height, tools=["hover"], color="#4c78a8", title=title,
        yaxis="left", fontsize={"yticks": "7pt"}, shared_axes=False)  # not linked to the volcano's -log10 p axis



def confusion_heatmap(labels: Sequence[str], matrix, *, predicted_labels: Sequence[str] | None = None,
                      width: int = 520, height: int = 440, normalize: bool = True, title: str = "Confusion matrix"):
    """Heat map of a confusion matrix (rows = true labels, columns = predicted), row-normalised by default."""
    m = np.asarray(matrix, dtype=np.float64)
    truth = [str(x) for x in labels]
    pred = [str(x) for x in (predicted_labels if predicted_labels is not None else labels)]
    if normalize:
        rows = m.sum(axis=1, keepdims=True)
        m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    recs = [(p, t, m[i, j]) for i, t in enumerate(truth) for j, p in enumerate(pred)]
    df = pd.DataFrame(recs, columns=["predicted", "true", "fraction" if normalize else "cells"])
    return hv.HeatMap(df, kdims=["predicted", "true"]).opts(
        cmap="Blues", colorbar=True, width=width, height=height, tools=["hover"], xrotation=60, title=title,
        invert_yaxis=True, clim=(0, 1) if normalize else (None, None), fontsize={"xticks": "7pt", "yticks": "7pt"})

"""Side charts: score histogram, category bars, volcano, enrichment bars and confusion heat map."""
from __future__ import annotations

from typing import Sequence

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401
import numpy as np
import pandas as pd

from .colours import _short
from .text import no_tex

__all__ = ["histogram", "histogram_data", "ScoreHistogram", "category_bars", "category_counts", "CategoryBars",
           "volcano", "volcano_frame", "Volcano", "VOLCANO_COLORS", "enrichment_bars", "confusion_heatmap"]


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
        self.figure.title.text = no_tex(title)
        self.figure.xaxis.axis_label = no_tex(name)
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
    dim = hv.Dimension("value", label=no_tex(name))
    opts = dict(width=width, height=height, tools=["hover"], line_color=None, xlabel=no_tex(name), ylabel="cells",
                toolbar=None, framewise=True)
    return (hv.Histogram((edges, counts), kdims=[dim], vdims=["cells"], label="all cells").opts(color="#9aa4b1", **opts)
            * hv.Histogram((edges, c2), kdims=[dim], vdims=["cells"], label="selected").opts(
                color="#f28e2b", alpha=0.85, **opts)
            * hv.VLine(center).opts(color="black", line_dash="dashed", line_width=1)).opts(
        title=no_tex(title), legend_position="top_right", show_legend=any_sel, framewise=True)


def category_bars(values, *, selected: np.ndarray | None = None, name: str = "category", colors: dict | None = None,
                  width: int = 320, height: int = 300, max_bars: int = 20):
    """Horizontal bars of cells per category (selected cells in orange when there is a selection) as a HoloViews
    element (notebooks, exports; the served map's side chart is :class:`CategoryBars`, updated in place)."""
    df = category_counts(values, selected=selected, colors=colors, max_bars=max_bars)
    if selected is not None and np.asarray(selected).any():
        df["fill"] = "#f28e2b"
        vdims = ["selected", "cells", "fill"]
        title = f"{_short(name, 22)}: selected"
    else:
        vdims = ["cells", "fill"]
        # the frame starts after the long category ticks, so the title gets little room; the axis says "cells"
        title = _short(name, 24)
    df = df.drop(columns="category").rename(columns={"label": "category"})
    df = df.iloc[::-1]
    return hv.Bars(df, kdims=[hv.Dimension("category", label=no_tex(name))], vdims=vdims).opts(
        invert_axes=True, width=width, height=height, tools=["hover"], color="fill", xlabel="", ylabel="cells",
        title=no_tex(title), fontsize={"yticks": "8pt", "title": "10pt"}, toolbar=None)


def category_counts(values, *, selected: np.ndarray | None = None, colors: dict | None = None,
                    max_bars: int = 20, label_chars: int = 28) -> pd.DataFrame:
    """Cells per category, largest first, for the side bars.

    Parameters
    ----------
    values
        ``(n_cells,)`` categories (a ``pandas.Categorical`` or anything it accepts).
    selected
        Optional boolean mask ``(n_cells,)``; its counts go to the ``selected`` column.
    colors
        Category -> colour (``fill``; grey for categories without one).
    max_bars
        The most frequent categories kept.
    label_chars
        Labels are shortened to this many characters, made unique with a `` (2)``-style suffix.

    Returns
    -------
    pandas.DataFrame
        Columns ``category`` (full name, str), ``label`` (str, unique), ``cells`` and ``selected`` (int64),
        ``fill`` (str), at most ``max_bars`` rows; categories without cells are left out.
    """
    cat = pd.Series(pd.Categorical(values))
    counts = cat.value_counts()
    counts = counts[counts > 0].iloc[:max_bars]
    names = [str(c) for c in counts.index]
    labels, seen = [], {}
    for name in names:
        label = _short(name, label_chars)
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    if selected is not None and np.asarray(selected).any():
        sc = cat[np.asarray(selected, dtype=bool)].value_counts()
        sel = [int(sc.get(c, 0)) for c in counts.index]
    else:
        sel = [0] * len(names)
    cols = colors or {}
    return pd.DataFrame({"category": names, "label": labels, "cells": counts.to_numpy(dtype=np.int64),
                         "selected": np.asarray(sel, dtype=np.int64),
                         "fill": [cols.get(n, "#9aa4b1") for n in names]})


class CategoryBars:
    """Cells per category (horizontal bars) as one plain Bokeh figure whose data are replaced in place.

    Without a selection the bars have their categories' map colours; with one, every category's cells are
    drawn light grey and its selected cells orange over them. An update sends new column data, factors and
    title, never new Bokeh models (a HoloViews chart was rebuilt on every selection and recolouring).

    Parameters
    ----------
    width, height
        Size of the figure in pixels.
    max_bars
        The most frequent categories shown.

    Attributes
    ----------
    figure : bokeh.plotting.figure
        Shown with ``pn.pane.Bokeh(bars.figure)``; created once.
    source : bokeh.models.ColumnDataSource
        The columns of :func:`category_counts` plus ``colour`` (the fill drawn), in drawing order (largest on
        top).
    """

    def __init__(self, *, width: int = 330, height: int = 300, max_bars: int = 20):
        from bokeh.models import ColumnDataSource, FactorRange, HoverTool
        from bokeh.plotting import figure

        self.max_bars = max_bars
        self.source = ColumnDataSource({c: [] for c in ("category", "label", "cells", "selected", "fill", "colour")})
        fig = figure(width=width, height=height, y_range=FactorRange(factors=[]), toolbar_location=None, tools="",
                     x_axis_label="cells", title="")
        self._all = fig.hbar(y="label", right="cells", height=0.8, source=self.source, fill_color="colour",
                             line_color=None)
        self._selected = fig.hbar(y="label", right="selected", height=0.8, source=self.source,
                                  fill_color="#f28e2b", line_color=None, visible=False)
        fig.add_tools(HoverTool(renderers=[self._all], tooltips=[("category", "@category"), ("cells", "@cells"),
                                                                 ("selected", "@selected")]))
        fig.x_range.start = 0
        fig.yaxis.major_label_text_font_size = "8pt"
        fig.title.text_font_size = "10pt"
        fig.ygrid.grid_line_color = None
        self.figure = fig

    def update(self, values, *, selected: np.ndarray | None = None, name: str = "category",
               colors: dict | None = None) -> None:
        """Show the counts of ``values`` (see :func:`category_counts`); sets ``source.data``, the factors of the
        y range, the title and which bars are drawn."""
        df = category_counts(values, selected=selected, colors=colors, max_bars=self.max_bars).iloc[::-1]
        any_sel = selected is not None and bool(np.asarray(selected).any())
        data = {c: df[c].tolist() for c in ("category", "label", "fill")}
        data.update(cells=df["cells"].to_numpy(), selected=df["selected"].to_numpy(),
                    colour=["#d9dde3"] * len(df) if any_sel else df["fill"].tolist())
        self.source.data = data
        self.figure.y_range.factors = df["label"].tolist()
        self._selected.visible = any_sel
        # the frame starts after the long category ticks, so the title gets little room; the axis says "cells"
        self.figure.title.text = no_tex(f"{_short(name, 22)}: selected" if any_sel else _short(name, 24))


#: Volcano classes in drawing order (grey first, so that significant genes are drawn on top) and their colours.
VOLCANO_COLORS = {"not significant": "#b0b0b0", "up in bottom": "#1f77b4", "up in top": "#d62728"}
_VOLCANO_COLUMNS = ("gene", "logfoldchange", "neg_log10_padj", "lfc_exact", "class")


def volcano_frame(table: pd.DataFrame, *, fdr: float = 0.05, lfc: float = 0.5, max_lfc: float = 10.0,
                  n_labels: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The points and labels of a volcano plot of a DE table (``gene``, ``logfoldchange``, ``pval_adj``).

    Parameters
    ----------
    table
        A DE table with one row per gene; rows whose fold change or adjusted p-value is not finite are
        dropped. A table without these columns (e.g. an empty ``pd.DataFrame()``) gives empty frames.
    fdr, lfc
        A gene is significant when ``pval_adj < fdr`` and ``|logfoldchange| > lfc``.
    max_lfc
        Fold changes are clipped to ``±max_lfc`` for drawing (scanpy reports about ±30 when a group does
        not express a gene at all); ``lfc_exact`` keeps the exact value.
    n_labels
        How many of the most significant significant genes are labelled.

    Returns
    -------
    points
        ``(n_genes, 6)``: ``gene`` (str), ``logfoldchange`` (float64, clipped log2 fold change),
        ``neg_log10_padj`` (float64, ``-log10`` of the adjusted p-value, p clipped at 1e-300),
        ``lfc_exact`` (float64), ``class`` (str: ``"up in top"``, ``"up in bottom"`` or
        ``"not significant"``) and ``pval_adj`` (float64); ordered as :data:`VOLCANO_COLORS` (grey first),
        the table's order within a class.
    labels
        At most ``n_labels`` rows of ``points``: the significant genes with the largest ``neg_log10_padj``.
    """
    if not {"gene", "logfoldchange", "pval_adj"} <= set(table.columns):
        empty = pd.DataFrame({"gene": pd.Series([], dtype=object), **{
            c: pd.Series([], dtype=np.float64) for c in ("logfoldchange", "neg_log10_padj", "lfc_exact")},
            "class": pd.Series([], dtype=object), "pval_adj": pd.Series([], dtype=np.float64)})
        return empty, empty.copy()
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
    order = {c: i for i, c in enumerate(VOLCANO_COLORS)}
    df = df.iloc[np.argsort(df["class"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)
    df = df[["gene", "logfoldchange", "neg_log10_padj", "lfc_exact", "class", "pval_adj"]]
    labels = df[df["class"] != "not significant"].nlargest(n_labels, "neg_log10_padj").reset_index(drop=True)
    return df, labels


def _padded(lo: float, hi: float, *, fraction: float = 0.05, empty: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return empty
    pad = fraction * (hi - lo) if hi > lo else 0.5
    return float(lo - pad), float(hi + pad)


class Volcano:
    """The DE volcano plot as one plain Bokeh figure whose data are replaced in place.

    The same content as :func:`volcano` (points coloured by class with a legend, a hover with the gene, its
    exact log2 fold change and ``-log10`` adjusted p-value, the ``n_labels`` most significant significant genes
    labelled), but a new DE table only sends new column data, ranges and title to the browser instead of
    new Bokeh models: no HoloViews overlay is built on the server and no plot is built anew in the browser.

    Parameters
    ----------
    fdr, lfc, max_lfc, n_labels
        As in :func:`volcano_frame`.
    width, height
        Size of the figure in pixels.

    Attributes
    ----------
    figure : bokeh.plotting.figure
        Shown with ``pn.pane.Bokeh(volcano.figure)``; created once.
    source : bokeh.models.ColumnDataSource
        The points: columns ``gene``, ``logfoldchange`` (clipped, drawn), ``neg_log10_padj``, ``lfc_exact``,
        ``class`` (see :func:`volcano_frame`).
    label_source : bokeh.models.ColumnDataSource
        The labelled genes: ``gene``, ``logfoldchange``, ``neg_log10_padj``.
    """

    def __init__(self, *, fdr: float = 0.05, lfc: float = 0.5, max_lfc: float = 10.0, n_labels: int = 10,
                 width: int = 500, height: int = 400):
        from bokeh.models import ColumnDataSource, HoverTool, LabelSet, Range1d
        from bokeh.plotting import figure
        from bokeh.transform import factor_cmap

        self.fdr, self.lfc, self.max_lfc, self.n_labels = fdr, lfc, max_lfc, n_labels
        self.source = ColumnDataSource({c: [] for c in _VOLCANO_COLUMNS})
        self.label_source = ColumnDataSource({"gene": [], "logfoldchange": [], "neg_log10_padj": []})
        # explicit ranges set on every update (with their reset values): a DataRange1d stops following the
        # data once the user has zoomed or panned
        fig = figure(width=width, height=height, title="", x_axis_label="log2 fold change",
                     y_axis_label="-log10 adj. p", x_range=Range1d(-1, 1), y_range=Range1d(0, 1),
                     tools="pan,wheel_zoom,box_zoom,save,reset", active_scroll="wheel_zoom",
                     toolbar_location="right")
        points = fig.scatter(x="logfoldchange", y="neg_log10_padj", source=self.source, size=5, alpha=0.8,
                             color=factor_cmap("class", palette=list(VOLCANO_COLORS.values()),
                                               factors=list(VOLCANO_COLORS)),
                             legend_field="class")
        fig.add_layout(LabelSet(x="logfoldchange", y="neg_log10_padj", text="gene", source=self.label_source,
                                text_font_size="8pt", text_color="#333333", text_baseline="bottom",
                                text_align="center"))
        fig.add_tools(HoverTool(renderers=[points], tooltips=[
            ("gene", "@gene"), ("log2 fold change (exact)", "@lfc_exact"), ("-log10 adj. p", "@neg_log10_padj"),
            ("class", "@class")]))
        fig.legend.location = "bottom_right"
        self.figure = fig

    def update(self, table: pd.DataFrame, *, title: str = "Top vs bottom") -> None:
        """Show the DE ``table`` (``gene``, ``logfoldchange``, ``pval_adj``; see :func:`volcano_frame`).

        Sets ``source.data``, ``label_source.data``, the title and both ranges (start, end and their reset
        values: the data's extent with 5 % padding, 10 % above for the labels); an empty table empties the plot.
        """
        df, top = volcano_frame(table, fdr=self.fdr, lfc=self.lfc, max_lfc=self.max_lfc, n_labels=self.n_labels)
        self.source.data = {"gene": df["gene"].tolist(), "class": df["class"].tolist(),
                            **{c: df[c].to_numpy() for c in ("logfoldchange", "neg_log10_padj", "lfc_exact")}}
        self.label_source.data = {"gene": top["gene"].tolist(), "logfoldchange": top["logfoldchange"].to_numpy(),
                                  "neg_log10_padj": top["neg_log10_padj"].to_numpy()}
        x0, x1 = _padded(df["logfoldchange"].min(), df["logfoldchange"].max(), empty=(-1.0, 1.0))
        y0, y1 = _padded(min(0.0, df["neg_log10_padj"].min()) if len(df) else np.nan, df["neg_log10_padj"].max())
        y1 += 0.05 * (y1 - y0)  # room for the labels above the highest points
        self.figure.x_range.update(start=x0, end=x1, reset_start=x0, reset_end=x1)
        self.figure.y_range.update(start=y0, end=y1, reset_start=y0, reset_end=y1)
        self.figure.title.text = no_tex(title)


def volcano(table: pd.DataFrame, *, fdr: float = 0.05, lfc: float = 0.5, width: int = 480, height: int = 380,
            n_labels: int = 10, title: str = "Top vs bottom", max_lfc: float = 10.0):
    """Volcano plot of a DE table (``gene``, ``logfoldchange``, ``pval_adj``) as a HoloViews overlay.

    Genes with ``pval_adj < fdr`` and ``|logfoldchange| > lfc`` are coloured (red = up, blue = down) and the
    ``n_labels`` most significant of them labelled. Fold changes are drawn within ±``max_lfc`` (scanpy reports
    about ±30 when a group does not express a gene at all); the hover shows the exact value. The served app
    uses :class:`Volcano` (updated in place); this function is for notebooks and exports.
    """
    df, top = volcano_frame(table, fdr=fdr, lfc=lfc, max_lfc=max_lfc, n_labels=n_labels)
    df = df.drop(columns="pval_adj")
    scatter = hv.Scatter(df, kdims=[hv.Dimension("logfoldchange", label="log2 fold change")],
                         vdims=[hv.Dimension("neg_log10_padj", label="-log10 adj. p"), "gene", "class",
                                hv.Dimension("lfc_exact", label="log2 fold change (exact)")]).opts(
        color="class", cmap=VOLCANO_COLORS, size=5, alpha=0.8, tools=["hover"], width=width, height=height,
        title=no_tex(title), legend_position="bottom_right", show_legend=True)
    labels = hv.Labels(top.drop(columns="pval_adj"), kdims=["logfoldchange", "neg_log10_padj"], vdims=["gene"]).opts(
        text_font_size="8pt", yoffset=0.0, text_color="#333333", text_baseline="bottom")
    return (scatter * labels).opts(width=width, height=height, shared_axes=False)


def enrichment_bars(table: pd.DataFrame, *, n: int = 15, width: int = 520, height: int = 380,
                    title: str = "Enrichment of top genes"):
    """Horizontal bars of ``-log10(pval_adj)`` for the ``n`` best terms of an enrichment table."""
    if table is None or len(table) == 0:
        return hv.Bars(pd.DataFrame({"term": [], "neg_log10_padj": []}), kdims=["term"], vdims=["neg_log10_padj"]).opts(
            width=width, height=height, title=no_tex(title + " (no terms)"))
    df = table.copy()
    df["neg_log10_padj"] = -np.log10(np.clip(pd.to_numeric(df["pval_adj"], errors="coerce").fillna(1.0), 1e-300, 1.0))
    df = df.sort_values("neg_log10_padj", ascending=False).head(n)
    df["label"] = [_short(f"{t} ({lib})", 60) for t, lib in zip(df["term"], df["library"])]
    df = df.iloc[::-1]
    return hv.Bars(df, kdims=[hv.Dimension("label", label="term")],
                   vdims=[hv.Dimension("neg_log10_padj", label="-log10 adj. p"), "overlap", "library"]).opts(
        invert_axes=True, width=width, height=height, tools=["hover"], color="#4c78a8", title=no_tex(title),
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
        cmap="Blues", colorbar=True, width=width, height=height, tools=["hover"], xrotation=60, title=no_tex(title),
        invert_yaxis=True, clim=(0, 1) if normalize else (None, None), fontsize={"xticks": "7pt", "yticks": "7pt"})

"""Pure plotting functions: arrays and tables in, HoloViews elements or PNG bytes out.

The cell map follows peers.md §6.1: one ``hv.Points`` of float32 x/y plus the colour
value, ``rasterize`` (continuous, client-side colour map and colour bar) or
``datashade`` with ``count_cat`` (categorical, with a legend overlay), ``dynspread``
so that isolated cells stay visible, and ``selector=ds.first(...)`` so that hovering
shows the cell under the pointer. Nothing here reads application state.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal, Sequence

import colorcet as cc
import datashader as ds
import datashader.transfer_functions as tf
import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers the backend so .opts() works without hv.extension
import numpy as np
import pandas as pd
import param
from bokeh.palettes import Viridis256
from holoviews.operation.datashader import datashade, dynspread, rasterize

__all__ = [
    "ColorSpec",
    "CATEGORY_COLORS",
    "DIVERGING_CMAP",
    "SEQUENTIAL_CMAP",
    "category_colors",
    "symmetric_clim",
    "cell_frame",
    "cell_map",
    "cell_map_layers",
    "aggregate",
    "histogram",
    "category_bars",
    "volcano",
    "enrichment_bars",
    "confusion_heatmap",
    "map_png",
    "warm_up",
]

CATEGORY_COLORS: list[str] = list(cc.b_glasbey_category10)
DIVERGING_CMAP: list[str] = list(cc.coolwarm)
SEQUENTIAL_CMAP: list[str] = list(Viridis256)
BACKGROUND_COLOR = "#d4d4d4"
LEGEND_OPTS = {"label_text_font_size": "8pt", "glyph_height": 14, "glyph_width": 14, "spacing": 0,
               "padding": 4, "margin": 4}
MAX_CATEGORIES = 200

Kind = Literal["categorical", "continuous", "diverging", "none"]


@dataclass
class ColorSpec:
    """How to colour the cells.

    Attributes
    ----------
    kind
        ``"categorical"`` (legend), ``"continuous"`` (sequential colour map + colour bar), ``"diverging"``
        (diverging colour map, symmetric ``clim`` around ``center``) or ``"none"`` (cell density).
    values
        ``(n_cells,)``: a ``pandas.Categorical`` for categorical, float32 otherwise (NaN = not coloured, drawn
        grey underneath), None for ``"none"``.
    name
        Label shown in the legend, colour bar and hover.
    clim
        ``(low, high)`` colour limits for continuous and diverging kinds.
    colors
        Category -> hex colour for the categorical kind.
    """

    kind: Kind
    values: object = None
    name: str = ""
    clim: tuple[float, float] | None = None
    center: float = 0.0
    colors: dict = field(default_factory=dict)


class MapStyle(param.Parameterized):
    """Colour options of a continuous map that change without rebuilding the plot."""

    clim = param.NumericTuple(default=(0.0, 1.0), length=2)
    cmap = param.List(default=SEQUENTIAL_CMAP)
    clabel = param.String(default="")

    def set_from(self, spec: ColorSpec) -> None:
        self.param.update(clim=tuple(float(c) for c in (spec.clim or (0.0, 1.0))),
                          cmap=DIVERGING_CMAP if spec.kind == "diverging" else SEQUENTIAL_CMAP, clabel=spec.name)


def category_colors(categories: Sequence) -> dict:
    """Stable colours for categories: Glasbey/category10, in category order."""
    return {str(c): CATEGORY_COLORS[i % len(CATEGORY_COLORS)] for i, c in enumerate(categories)}


def symmetric_clim(values: np.ndarray, *, center: float = 0.0, quantile: float = 0.99) -> tuple[float, float]:
    """Colour limits symmetric around ``center``: ``center ± q``-quantile of ``|values - center|``.

    Parameters
    ----------
    values
        ``(n,)`` float; NaN ignored.
    center
        The value shown in the neutral colour (0 for differences, e.g. the median for raw logits).
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (center - 1.0, center + 1.0)
    m = float(np.quantile(np.abs(v - center), quantile))
    if not np.isfinite(m) or m <= 0:
        m = float(np.abs(v - center).max()) or 1.0
    return (center - m, center + m)


def cell_frame(coords: np.ndarray, spec: ColorSpec, *, cell_ids: Sequence[str] | None = None,
               extra: dict | None = None) -> pd.DataFrame:
    """The table behind the map: ``x``, ``y`` (float32), ``color`` (the colour value), ``cell`` and extras.

    Parameters
    ----------
    coords
        ``(n_cells, 2)`` layout coordinates.
    spec
        The colouring; its ``values`` become the ``color`` column.
    cell_ids
        Cell names for the hover (``obs_names``).
    extra
        More hover columns, name -> ``(n_cells,)`` values.
    """
    coords = np.asarray(coords)
    df = pd.DataFrame({"x": coords[:, 0].astype(np.float32, copy=False), "y": coords[:, 1].astype(np.float32, copy=False)})
    if spec.kind == "categorical":
        vals = pd.Categorical(spec.values)
        df["color"] = vals.rename_categories([str(c) for c in vals.categories])
    elif spec.kind != "none":
        df["color"] = np.asarray(spec.values, dtype=np.float32)
    if cell_ids is not None:
        df["cell"] = np.asarray(cell_ids, dtype=object)
    for k, v in (extra or {}).items():
        df[k] = v
    df["index"] = np.arange(len(df), dtype=np.int64)
    return df


def _hover_dims(df: pd.DataFrame, spec: ColorSpec) -> list:
    dims = []
    if "cell" in df:
        dims.append(hv.Dimension("cell", label="cell"))
    if "color" in df:
        dims.append(hv.Dimension("color", label=spec.name or "value"))
    dims += [hv.Dimension(c) for c in df.columns if c not in ("x", "y", "cell", "color", "index")]
    dims.append(hv.Dimension("index"))
    return dims


def cell_map(df: pd.DataFrame, spec: ColorSpec, **kw):
    """Datashaded map of cells coloured by ``spec`` (see :func:`cell_map_layers`, which also returns the layer
    that selection streams attach to)."""
    return cell_map_layers(df, spec, **kw)[0]


def cell_map_layers(
    df: pd.DataFrame,
    spec: ColorSpec,
    *,
    width: int = 640,
    height: int = 560,
    title: str = "",
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    dynamic: bool = True,
    hover: bool = True,
    spread: str = "auto",
    max_px: int = 2,
    threshold: float = 0.5,
    pipe: "hv.streams.Pipe | None" = None,
    style: "param.Parameterized | None" = None,
):
    """Datashaded map of cells coloured by ``spec``.

    Parameters
    ----------
    df
        From :func:`cell_frame`.
    spec
        Colouring.
    dynamic
        Re-aggregate on zoom (server-side); False returns a static element (tests, export).
    hover
        Use ``selector=ds.first('index')`` so the hover shows one cell's row.
    spread
        How isolated cells stay visible: ``"dynspread"`` (datashader's density-dependent spreading),
        ``"pixels"`` (aggregate at a coarser resolution, so each cell covers 2-3 screen pixels; no extra
        numba kernels to compile, which keeps the first paint fast), ``"none"``, or ``"auto"``: pixels up to
        50,000 cells, dynspread above.
    pipe, style
        For in-place updates of continuous colourings: the points come from ``pipe`` (send a new frame to
        recolour without rebuilding the plot), and ``clim``/``cmap``/``clabel`` follow the parameters of
        ``style`` (:class:`MapStyle`).

    Returns
    -------
    (overlay, main)
        ``overlay``: grey density of all cells (when some values are NaN or the kind is ``"none"``), the
        coloured layer, and a legend for categorical colourings. ``main``: the datashaded layer that holds
        the plot's tools; attach ``BoundsXY``/``Lasso``/``RangeXY`` streams to it (streams on the overlay
        itself are not connected by HoloViews).
    """
    vdims = _hover_dims(df, spec)
    if pipe is not None:
        points = hv.DynamicMap(lambda data: hv.Points(data, kdims=["x", "y"], vdims=vdims), streams=[pipe])
    else:
        points = hv.Points(df, kdims=["x", "y"], vdims=vdims)
    selector = ds.first("index") if hover else None
    n = len(df)
    if spread == "auto":
        spread = "pixels" if n <= 50_000 else "dynspread"
    pixel_ratio = (1 / 3 if n <= 5_000 else 1 / 2) if spread == "pixels" else 1.0
    common = dict(dynamic=dynamic, width=width, height=height, pixel_ratio=pixel_ratio)

    def spread_op(el):
        return dynspread(el, threshold=threshold, max_px=max_px) if spread == "dynspread" else el

    plot_opts = dict(
        width=width, height=height, tools=["box_select", "lasso_select"] + (["hover"] if hover else []),
        xaxis=None, yaxis=None, title=title, default_tools=["pan", "wheel_zoom", "reset", "save"],
        active_tools=["pan", "wheel_zoom"], padding=0.04,
    )
    if xlim is not None:
        plot_opts["xlim"] = xlim
    if ylim is not None:
        plot_opts["ylim"] = ylim
    layers = []
    needs_background = spec.kind == "none" or (
        spec.kind != "categorical" and not np.isfinite(np.asarray(df["color"], dtype=np.float64)).all()
    )
    if needs_background:
        bg = rasterize(points, aggregator=ds.count(), selector=None if spec.kind != "none" else selector, **common)
        bg = spread_op(bg).opts(
            cmap=[BACKGROUND_COLOR, BACKGROUND_COLOR] if spec.kind != "none" else list(cc.kbc)[::-1][40:],
            cnorm="eq_hist", colorbar=spec.kind == "none", **plot_opts,
        )
        layers.append(bg)
    main = layers[0] if layers else None
    if spec.kind == "categorical":
        cats = list(df["color"].cat.categories)
        colors = {c: spec.colors.get(c, CATEGORY_COLORS[i % len(CATEGORY_COLORS)]) for i, c in enumerate(cats)}
        shaded = datashade(points, aggregator=ds.count_cat("color"), color_key=colors, selector=selector,
                           min_alpha=180, **common)
        shaded = spread_op(shaded).opts(show_legend=False, **plot_opts)
        present = [c for c in cats if c in set(df["color"].dropna().unique())][:40]
        legend = hv.Overlay([hv.Points([(np.nan, np.nan)], label=_short(str(c), 30)).opts(
            color=colors[c], size=8, show_legend=True) for c in present])
        layers += [shaded, legend]
        main = shaded
        overlay = _combine(layers).opts(legend_position="right", show_legend=True, legend_opts=LEGEND_OPTS)
    elif spec.kind in ("continuous", "diverging"):
        cmap = DIVERGING_CMAP if spec.kind == "diverging" else SEQUENTIAL_CMAP
        img = rasterize(points, aggregator=ds.mean("color"), selector=selector, **common)
        opts = dict(cmap=cmap, colorbar=True, clabel=spec.name, **plot_opts)
        if spec.clim is not None:
            opts["clim"] = tuple(float(c) for c in spec.clim)
        img = spread_op(img).opts(**opts)
        if style is not None:
            img = img.apply.opts(clim=style.param.clim, cmap=style.param.cmap, clabel=style.param.clabel)
        layers.append(img)
        main = img
        overlay = _combine(layers)
    else:
        overlay = _combine(layers)
    return overlay.opts(width=width, height=height, title=title, toolbar="above"), main


def _combine(layers):
    """Overlay layers with ``*`` (keeps DynamicMaps dynamic; few layers keep the callback chain shallow)."""
    out = layers[0]
    for layer in layers[1:]:
        out = out * layer
    return out


def aggregate(df: pd.DataFrame, spec: ColorSpec, *, width: int = 640, height: int = 560,
              x_range=None, y_range=None):
    """The raw datashader aggregate of the map (benchmarks, tests, PNG export).

    Returns
    -------
    xarray.DataArray
        ``(height, width)`` mean of the colour value (continuous kinds), ``(height, width, n_categories)``
        counts (categorical) or ``(height, width)`` counts (``"none"``).
    """
    x_range = x_range or _padded_range(df["x"])
    y_range = y_range or _padded_range(df["y"])
    cvs = ds.Canvas(plot_width=width, plot_height=height, x_range=x_range, y_range=y_range)
    if spec.kind == "categorical":
        return cvs.points(df, "x", "y", agg=ds.count_cat("color"))
    if spec.kind == "none":
        return cvs.points(df, "x", "y", agg=ds.count())
    return cvs.points(df, "x", "y", agg=ds.mean("color"))


def _padded_range(v) -> tuple[float, float]:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    pad = (hi - lo) * 0.03 or 1.0
    return (lo - pad, hi + pad)


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
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    edges = np.histogram_bin_edges(v[finite], bins=bins) if finite.any() else np.linspace(0, 1, bins + 1)
    counts, _ = np.histogram(v[finite], bins=edges)
    sel = np.zeros_like(finite) if selected is None else (np.asarray(selected, dtype=bool) & finite)
    c2, _ = np.histogram(v[sel], bins=edges)
    center = diverging_center if diverging_center is not None else (float(np.median(v[finite])) if finite.any() else 0.0)
    dim = hv.Dimension("value", label=name)
    opts = dict(width=width, height=height, tools=["hover"], line_color=None, xlabel=name, ylabel="cells",
                toolbar=None, framewise=True)
    return (hv.Histogram((edges, counts), kdims=[dim], vdims=["cells"], label="all cells").opts(color="#9aa4b1", **opts)
            * hv.Histogram((edges, c2), kdims=[dim], vdims=["cells"], label="selected").opts(
                color="#f28e2b", alpha=0.85, **opts)
            * hv.VLine(center).opts(color="black", line_dash="dashed", line_width=1)).opts(
        title=title, legend_position="top_right", show_legend=bool(sel.any()), framewise=True)


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


def _short(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


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


def warm_up() -> None:
    """Compile datashader's aggregation kernels (numba) for the map's column types, so the first map is fast."""
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(64, 2)).astype(np.float32)
    cont = ColorSpec("continuous", rng.normal(size=64).astype(np.float32), name="v", clim=(-1.0, 1.0))
    cat = ColorSpec("categorical", pd.Categorical(rng.choice(["a", "b"], 64)), name="c")
    for spec in (cat, cont, ColorSpec("none")):  # the first paint is usually categorical
        df = cell_frame(xy, spec, cell_ids=[str(i) for i in range(64)])
        el = cell_map(df, spec, width=64, height=64, dynamic=False)
        hv.render(el, backend="bokeh")


def map_png(df: pd.DataFrame, spec: ColorSpec, *, width: int = 900, height: int = 800, title: str = "",
            spread_px: int = 1) -> bytes:
    """Render the current colouring of the map to PNG bytes with datashader and PIL (no browser needed).

    A title is drawn above and a legend (categories) or colour-scale bar (continuous) beside the image.
    """
    from PIL import Image, ImageDraw

    agg = aggregate(df, spec, width=width, height=height)
    if spec.kind == "categorical":
        cats = [str(c) for c in df["color"].cat.categories]
        colors = {c: spec.colors.get(c, CATEGORY_COLORS[i % len(CATEGORY_COLORS)]) for i, c in enumerate(cats)}
        img = tf.shade(agg, color_key=colors, min_alpha=200)
    elif spec.kind == "none":
        img = tf.shade(agg, cmap=list(cc.kbc)[::-1][40:], how="eq_hist")
    else:
        cmap = DIVERGING_CMAP if spec.kind == "diverging" else SEQUENTIAL_CMAP
        span = spec.clim if spec.clim is not None else None
        img = tf.shade(agg, cmap=cmap, how="linear", span=span)
        if not np.isfinite(np.asarray(df["color"], dtype=np.float64)).all():
            bg = tf.shade(aggregate(df, ColorSpec("none"), width=width, height=height), cmap=[BACKGROUND_COLOR, BACKGROUND_COLOR])
            img = tf.stack(bg, img)
    img = tf.spread(img, px=spread_px)
    pil = tf.set_background(img, "white").to_pil().convert("RGB")
    side = 260
    canvas = Image.new("RGB", (width + side, height + 40), "white")
    canvas.paste(pil, (0, 40))
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 12), title or spec.name, fill="black")
    x0, y = width + 10, 50
    if spec.kind == "categorical":
        draw.text((x0, y), spec.name, fill="black")
        y += 18
        for c, col in list(colors.items())[:40]:
            draw.rectangle([x0, y + 2, x0 + 10, y + 12], fill=col)
            draw.text((x0 + 16, y), _short(c, 36), fill="black")
            y += 16
    elif spec.kind in ("continuous", "diverging") and spec.clim is not None:
        cmap = DIVERGING_CMAP if spec.kind == "diverging" else SEQUENTIAL_CMAP
        draw.text((x0, y), _short(spec.name, 36), fill="black")
        top, bar_h = y + 20, 200
        for i in range(bar_h):
            col = cmap[int((bar_h - 1 - i) / (bar_h - 1) * (len(cmap) - 1))]
            draw.line([x0, top + i, x0 + 16, top + i], fill=col)
        draw.text((x0 + 22, top - 4), f"{spec.clim[1]:.3g}", fill="black")
        draw.text((x0 + 22, top + bar_h - 8), f"{spec.clim[0]:.3g}", fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()

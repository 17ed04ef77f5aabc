"""The datashaded cell map (peers.md §6.1): the table behind it, the HoloViews layers and raw aggregates."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import colorcet as cc
import datashader as ds
import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers the backend so .opts() works without hv.extension
import numpy as np
import pandas as pd
import param
from holoviews.operation.datashader import dynspread

from .colours import (BACKGROUND_COLOR, DIVERGING_CMAP, LEGEND_OPTS, SEQUENTIAL_CMAP, ColorSpec,
                      _short, category_key)
from .shared import (UNUSED_COLOUR, SharedDatashade, SharedRasterize, coded_categories,  # noqa: F401 (re-export)
                     padded_categories)
from .text import no_tex

__all__ = ["MapPipe", "cell_frame", "cell_map", "cell_map_layers", "aggregate", "legend_html", "present_categories",
           "recolour_rendered", "spread_mode", "warm_up"]


class MapPipe(hv.streams.Pipe):
    """The data stream of a map that is recoloured in place: :meth:`store` keeps a new table without drawing.

    HoloViews memoizes a pipe's points on a counter that only a trigger advances, so a table stored with
    ``Pipe.update`` alone would be ignored by the next redraw (a zoom would show the previous table's colours);
    :meth:`store` advances it.
    """

    def store(self, data) -> None:
        """Keep ``data`` without redrawing; the next redraw of any plot of this pipe (a zoom, a new page) uses it."""
        self.update(data=data)
        self._memoize_counter += 1  # what Pipe's own trigger does (holoviews.streams.Pipe._on_trigger)


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


#: Options of the map's figure. A canvas, not HoloViews' default WebGL: the map is an image, which Bokeh draws
#: with the 2-D canvas either way, and a WebGL figure copies its whole canvas on every repaint (in a browser
#: without a GPU, 29 ms of the page's main thread per query in a JavaScript profile;
#: ``docs/serving-performance.md``).
FIGURE_OPTS = {"backend_opts": {"plot.output_backend": "canvas"}}


def spread_mode(n_cells: int) -> str:
    """How :func:`cell_map_layers` keeps isolated cells visible by default: ``"pixels"`` up to 50,000 cells,
    ``"dynspread"`` above."""
    return "pixels" if n_cells <= 50_000 else "dynspread"


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
    legend: bool = True,
    shaded: bool = False,
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
    legend
        Categorical colourings: draw the legend inside the figure (one HoloViews layer per category). The
        served map passes False and shows :func:`legend_html` beside the figure instead: every legend layer is
        a subplot that HoloViews updates on each recolouring (half of its cost), and a figure legend outside
        the frame is moved out and back on every update (a page-wide relayout in the browser).
    shaded
        With ``style``: draw categorical, continuous and diverging colourings (without NaN values) as one
        image shaded on the server, whose aggregation and shading follow ``style`` (:meth:`MapStyle.set_shaded`,
        set here from ``spec``): a map of categories can then be recoloured by a query's scores and back in
        place (:func:`recolour_rendered`), and a zoom re-aggregates whichever colouring is stored. Its colour
        bar is HTML beside the figure (:func:`~app.plots.colours.colourbar_html`), as the legend of categories.
    pipe, style
        For in-place updates: the points come from ``pipe`` (send a new frame to recolour without rebuilding
        the plot); ``clim``/``cmap``/``clabel`` of a continuous colouring and the colour key of a categorical
        one (set here from ``spec``) follow the parameters of ``style`` (:class:`MapStyle`). Change the style
        silently (``param.parameterized.discard_events``) and then trigger ``pipe``: a style change alone
        re-renders with the points the pipe last computed.

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
        spread = spread_mode(n)
    pixel_ratio = (1 / 3 if n <= 5_000 else 1 / 2) if spread == "pixels" else 1.0
    # the image is computed for ``width`` x ``height`` and re-computed when the view zooms or pans (RangeXY);
    # HoloViews' default also listens to the plot's size in the browser (PlotSize), which sent one more event
    # after every new figure and ran the aggregation a third time for it
    common = dict(dynamic=dynamic, width=width, height=height, pixel_ratio=pixel_ratio)
    if dynamic:
        common["streams"] = [hv.streams.RangeXY]

    def spread_op(el):
        return dynspread(el, threshold=threshold, max_px=max_px) if spread == "dynspread" else el

    plot_opts = dict(
        width=width, height=height, tools=["box_select", "lasso_select"] + (["hover"] if hover else []),
        xaxis=None, yaxis=None, title=no_tex(title), default_tools=["pan", "wheel_zoom", "reset", "save"],
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
        bg = SharedRasterize(points, aggregator=ds.count(), selector=None if spec.kind != "none" else selector, **common)
        bg = spread_op(bg).opts(
            cmap=[BACKGROUND_COLOR, BACKGROUND_COLOR] if spec.kind != "none" else list(cc.kbc)[::-1][40:],
            cnorm="eq_hist", colorbar=spec.kind == "none", **plot_opts,
        )
        layers.append(bg)
    main = layers[0] if layers else None
    if shaded and style is not None and not needs_background and spec.kind != "none":
        key = category_key(list(df["color"].cat.categories), spec.colors) if spec.kind == "categorical" else None
        style.set_shaded(spec, key)
        main = SharedDatashade(points, aggregator=style.param.aggregator, color_key=style.param.color_key,
                               cmap=style.param.cmap, cnorm=style.param.cnorm, clims=style.param.clims,
                               min_alpha=style.param.min_alpha, selector=selector, **common)
        main = spread_op(main).opts(show_legend=False, **plot_opts)
        overlay = main
    elif spec.kind == "categorical":
        colors = category_key(list(df["color"].cat.categories), spec.colors)
        key = colors
        if style is not None:  # the key follows style.color_key: new categories re-shade the same plot
            style.color_key = colors
            key = style.param.color_key
        shaded = SharedDatashade(points, aggregator=ds.count_cat("color"), color_key=key, selector=selector,
                           min_alpha=180, **common)
        shaded = spread_op(shaded).opts(show_legend=False, **plot_opts)
        main = shaded
        if legend:
            entries = hv.Overlay([hv.Points([(np.nan, np.nan)], label=_short(str(c), 30)).opts(
                color=colors[c], size=8, show_legend=True) for c in present_categories(df["color"])[:40]])
            overlay = _combine(layers + [shaded, entries]).opts(legend_position="right", show_legend=True,
                                                               legend_opts=LEGEND_OPTS)
        else:
            overlay = _combine(layers + [shaded])
    elif spec.kind in ("continuous", "diverging"):
        cmap = DIVERGING_CMAP if spec.kind == "diverging" else SEQUENTIAL_CMAP
        img = SharedRasterize(points, aggregator=ds.mean("color"), selector=selector, **common)
        opts = dict(cmap=cmap, colorbar=True, clabel=no_tex(spec.name), **plot_opts)
        if spec.clim is not None:
            opts["clim"] = tuple(float(c) for c in spec.clim)
        if style is not None:
            opts["hooks"] = [partial(_colorbar_title, style)]
        img = spread_op(img).opts(**opts)
        if style is not None:
            img = img.apply.opts(clim=style.param.clim, cmap=style.param.cmap, clabel=style.param.clabel)
        layers.append(img)
        main = img
        overlay = _combine(layers)
    else:
        overlay = _combine(layers)
    return overlay.opts(width=width, height=height, title=no_tex(title), toolbar="above", **FIGURE_OPTS), main


def _colorbar_title(style, plot, element) -> None:
    """HoloViews hook: the colour bar's title follows ``style.clabel`` (HoloViews sets it only when the bar is
    first drawn, so a map recoloured in place kept the first query's name)."""
    bar = plot.handles.get("colorbar")
    if bar is not None and bar.title != style.clabel:
        bar.title = style.clabel


def present_categories(values) -> list[str]:
    """The categories of ``values`` (a categorical Series or ``pandas.Categorical``) that at least one cell
    has, in category order, as strings."""
    cat = pd.Categorical(values)
    counts = np.bincount(cat.codes[cat.codes >= 0], minlength=len(cat.categories))
    return [str(c) for c, n in zip(cat.categories, counts) if n > 0]


def legend_html(spec: ColorSpec, *, height: int = 560, max_entries: int = 200) -> str:
    """The legend of a categorical colouring as HTML: a colour swatch and the name of each category present.

    Every name is escaped (obs values and labels are user text); long names are shortened on screen and
    shown in full on hover (``title``). More entries than fit in ``height`` pixels scroll.

    Parameters
    ----------
    spec
        A categorical :class:`ColorSpec` (its ``values`` and ``colors``); other kinds give ``""``.
    height
        Pixels before the list scrolls.
    max_entries
        At most this many categories are listed (the rest are counted in a last line).

    Returns
    -------
    str
        ``<div class="map-legend">`` with one ``<div class="map-legend-entry">`` per category.
    """
    if spec.kind != "categorical":
        return ""
    import html

    present = present_categories(spec.values)
    key = category_key([str(c) for c in pd.Categorical(spec.values).categories], spec.colors)  # as the map's
    rows = []
    for c in present[:max_entries]:
        colour = key[c]
        name = html.escape(c)
        rows.append(f'<div class="map-legend-entry" title="{name}" style="display:flex;align-items:center;'
                    f'gap:5px;white-space:nowrap"><span style="flex:none;width:11px;height:11px;border-radius:2px;'
                    f'background:{html.escape(colour)}"></span><span style="overflow:hidden;'
                    f'text-overflow:ellipsis">{name}</span></div>')
    if len(present) > max_entries:
        rows.append(f'<div class="map-legend-more">… and {len(present) - max_entries} more</div>')
    title = html.escape(spec.name or "category")
    return (f'<div class="map-legend" style="font-size:11px;line-height:15px;max-height:{int(height)}px;'
            f'overflow-y:auto"><div class="map-legend-title" style="font-weight:600;margin-bottom:3px;'
            f'overflow:hidden;text-overflow:ellipsis;white-space:nowrap" title="{title}">{title}</div>'
            + "".join(rows) + "</div>")


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
        if spec.kind == "continuous":  # and the kernels of an in-place recolouring (recolour_rendered)
            _recoloured(df, spec, None, (64, 64, -3.0, 3.0, -3.0, 3.0))
    # one kernel per padded number of categories (coded_frame): 8, 16 and 32 cover most label sets and obs columns
    for n in (2, 9, 17):
        names = [f"c{i}" for i in range(n)]
        spec = ColorSpec("categorical", pd.Categorical(rng.choice(names, 64), categories=names), name="c")
        df = cell_frame(xy, spec)
        _recoloured(df, spec, category_key(names), (64, 64, -3.0, 3.0, -3.0, 3.0))


def _raster_subplot(plot):
    """The coloured layer's plot in a rendered map (the last raster layer; a grey density layer comes first)."""
    subplots = [sp for sp in getattr(plot, "subplots", {}).values() if hasattr(sp, "_hover_data")]
    return subplots[-1] if subplots else None


def _recolour_plan(plot):
    """What :func:`recolour_rendered` needs from one rendered map, or None when it cannot recolour it."""
    sp = _raster_subplot(plot)
    if sp is None or sp.current_frame is None:
        return None
    hover = getattr(sp, "_hover_data", None)
    source = sp.handles.get("source")
    if hover is None or source is None or "__index__" not in getattr(hover, "data_vars", ()):
        return None
    index = hover["__index__"]
    if index.dims != ("y", "x") or "image" not in source.data:
        return None
    return sp, hover, source


def recolour_rendered(plots, df: pd.DataFrame, spec: ColorSpec, *, color_key: dict | None = None,
                      spread: str = "pixels") -> bool:
    """Recolour maps already drawn in pages, without going through HoloViews' operations.

    A query or new labels change the cells' colour values only: the positions, the view and so the pixel of
    every cell are those of the image shown. This aggregates the new values with datashader on the canvas of
    the image shown (its bounds and size), then replaces the Bokeh image, the colour mapper, the colour bar's
    title and the data the hover reads (the cell under the cursor is the same; its values are the new ones).
    The result is the image HoloViews would draw (``tests/test_app_state.py`` compares both); on the demo a
    query with its redraw took 46 ms in-process instead of 128 ms (``bench/bench_recolour.py``) and 105 ms of a
    served session's CPU instead of 154 ms (``bench/bench_page_cost.py``), 2026-12-03.

    Parameters
    ----------
    plots
        The rendered HoloViews plots of one map (one per page showing it): the figures of
        :func:`cell_map_layers` with ``hover=True``.
    df
        The new table (:func:`cell_frame`): same cells, positions and columns as the one drawn.
    spec
        The new colouring: continuous/diverging (``clim``, colour map) or categorical.
    color_key
        Categorical colourings: category -> colour (:func:`~app.plots.colours.category_key`).
    spread
        The map's spreading; ``"dynspread"`` is not handled here (returns False).

    Returns
    -------
    bool
        False when a plot is not one this can recolour (the caller then redraws through HoloViews); nothing
        was changed then. True when every plot was recoloured (or no plot is drawn yet).
    """
    if spread == "dynspread" or spec.kind not in ("continuous", "diverging", "categorical"):
        return False
    plans = [_recolour_plan(p) for p in plots]
    if any(p is None for p in plans):
        return False
    done = {}
    for plot, (sp, hover, source) in zip(plots, plans):
        l, b, r, t = sp.current_frame.bounds.lbrt()
        h, w = hover["__index__"].shape
        geometry = (w, h, float(l), float(r), float(b), float(t))
        rgba = np.asarray(source.data["image"][0]).dtype == np.uint32  # a map shaded on the server
        if (geometry, rgba) not in done:
            done[geometry, rgba] = _recoloured(df, spec, color_key, geometry, rgba=rgba)
        image, channels = done[geometry, rgba]
        index = hover["__index__"].values
        new_hover = hover.copy(deep=False)
        for var, values in channels.items():
            if var in new_hover.data_vars:
                new_hover[var] = (("y", "x"), values)
        missing = index < 0
        for var in hover.attrs.get("selector_columns", ()):
            if var == "__index__" or var not in df.columns or var not in new_hover.data_vars:
                continue
            new_hover[var] = (("y", "x"), _hover_values(df[var], hover[var].dtype, index, missing))
        if spec.kind != "categorical" and not rgba:
            aggregated = [v for v in hover.data_vars if v not in hover.attrs.get("selector_columns", ())]
            for var in aggregated[:1]:
                new_hover[var] = (("y", "x"), channels["value"])
        sp._hover_data = new_hover
        source.data.update(image=[image])
        if spec.kind != "categorical" and not rgba:
            mapper = sp.handles.get("color_mapper")
            cmap = DIVERGING_CMAP if spec.kind == "diverging" else SEQUENTIAL_CMAP
            lo, hi = (float(c) for c in (spec.clim or (np.nanmin(image), np.nanmax(image))))
            if mapper is not None:
                # only what changed: Bokeh validates all 256 colours of a palette on every assignment
                changes = {k: v for k, v in (("low", lo), ("high", hi)) if getattr(mapper, k) != v}
                if list(mapper.palette) != cmap:
                    changes["palette"] = cmap
                if changes:
                    mapper.update(**changes)
            bar = sp.handles.get("colorbar")
            title = no_tex(spec.name)
            if bar is not None and bar.title != title:
                bar.title = title
        if getattr(plot, "comm", None) is not None:  # Jupyter: send the changes through the plot's comm
            plot.push()
    return True


def _hover_values(col: pd.Series, shown_dtype, index: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """The hover's values of one table column per pixel (the cell ``index`` each pixel shows), as HoloViews
    makes them: names ("-" where no cell is) for categories and text, floats (NaN where no cell is) otherwise.
    A column keeps the type it was drawn with (``shown_dtype``) unless its kind changed (a map of categories
    recoloured by scores, or back)."""
    textual = isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object
    if textual:
        vals = np.asarray(col.astype(str) if isinstance(col.dtype, pd.CategoricalDtype) else col, dtype=object)
        fill = "-"
    else:
        vals = np.asarray(col, dtype=shown_dtype if np.dtype(shown_dtype).kind == "f" else np.float64)
        fill = np.nan
    picked = vals[np.where(missing, 0, index)]
    picked[missing] = fill
    return picked


def coded_frame(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The map table reduced to what datashader aggregates, in a form whose type never changes with the data.

    The ``color`` column of categories is coded by :func:`~app.plots.shared.coded_categories` (a new set of
    names would otherwise compile a new datashader kernel); counts per category, and so the shaded image, are
    unchanged.

    Parameters
    ----------
    df
        From :func:`cell_frame`: ``x``, ``y`` (float32) and ``color`` (categorical or float32).

    Returns
    -------
    (frame, names)
        ``frame``: ``x``, ``y`` and ``color`` only (categorical colourings: ``color`` coded as above).
        ``names``: the category names in code order (``[]`` for a non-categorical ``color``).
    """
    out = pd.DataFrame({"x": df["x"], "y": df["y"]})
    col = df["color"]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        out["color"] = col
        return out, []
    out["color"] = coded_categories(col)
    return out, [str(c) for c in col.cat.categories]


def _recoloured(df: pd.DataFrame, spec: ColorSpec, color_key, geometry, *, rgba: bool = False):
    """The image (as Bokeh takes it) and the hover's per-pixel values of ``spec`` on one canvas: colours
    (RGBA, shaded here) for categories and for a map shaded on the server (``rgba``), else the values, which the
    page maps through its colour mapper."""
    import datashader.transfer_functions as tf

    w, h, x0, x1, y0, y1 = geometry
    cvs = ds.Canvas(plot_width=w, plot_height=h, x_range=(x0, x1), y_range=(y0, y1))
    coded, names = coded_frame(df)
    if spec.kind == "categorical":
        agg = cvs.points(coded, "x", "y", agg=ds.count_cat("color"))
        key = {str(i): color_key[name] for i, name in enumerate(names)}
        key.update({str(i): UNUSED_COLOUR for i in range(len(names), agg.shape[-1])})  # no cell has these
        return _rgba(tf.shade(agg, color_key=key, how="eq_hist", min_alpha=180, alpha=255,
                              rescale_discrete_levels=True))
    agg = cvs.points(coded, "x", "y", agg=ds.mean("color"))
    if rgba:  # as HoloViews' shade operation does with MapStyle.set_shaded's options
        return _rgba(tf.shade(agg, cmap=spec.cmap, how="linear", span=spec.limits(), min_alpha=180, alpha=255,
                              rescale_discrete_levels=True))
    values = agg.values.astype(np.float64, copy=False)
    # the page gets float32 (half the bytes of HoloViews' float64; colour values are float32 to begin with)
    return values.astype(np.float32), {"value": values}


def _rgba(shaded):
    """A shaded image as Bokeh's ``image_rgba`` takes it (uint32), and its R, G, B, A channels for the hover."""
    rgba = shaded.values.copy()
    rgba[(rgba >> 24) == 0] = 0  # transparent pixels as HoloViews sends them (no colour under alpha 0)
    return rgba, dict(zip("RGBA", np.moveaxis(rgba.view(np.uint8).reshape(*rgba.shape, 4), -1, 0)))

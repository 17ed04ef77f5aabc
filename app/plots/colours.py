"""Colours of the map: the colour specification, palettes, stable category colours and symmetric limits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import colorcet as cc
import numpy as np
import param
from bokeh.palettes import Viridis256

from .text import no_tex

__all__ = ["ColorSpec", "MapStyle", "category_key", "CATEGORY_COLORS", "DIVERGING_CMAP", "SEQUENTIAL_CMAP", "BACKGROUND_COLOR",
           "LEGEND_OPTS", "MAX_CATEGORIES", "category_colors", "colourbar_html", "symmetric_clim"]

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

    @property
    def cmap(self) -> list[str]:
        """The colour map of a continuous (:data:`SEQUENTIAL_CMAP`) or diverging (:data:`DIVERGING_CMAP`) kind."""
        return DIVERGING_CMAP if self.kind == "diverging" else SEQUENTIAL_CMAP

    def limits(self) -> tuple[float, float]:
        """``clim`` as floats, else the range of the finite ``values`` (``(0, 1)`` without any)."""
        return tuple(float(c) for c in (self.clim or _finite_range(self.values)))


class MapStyle(param.Parameterized):
    """Colour options of a map that change without rebuilding the plot: ``clim``/``cmap``/``clabel`` of a
    continuous map, ``color_key`` (category -> hex colour) of a categorical one, and for a map shaded on the
    server (:meth:`set_shaded`) the aggregation and shading of either kind."""

    clim = param.NumericTuple(default=(0.0, 1.0), length=2)
    cmap = param.List(default=SEQUENTIAL_CMAP)
    clabel = param.String(default="")
    color_key = param.Dict(default={})
    # the shaded map (cell_map_layers(shaded=True)): datashader's reduction and HoloViews' shade options
    aggregator = param.Parameter(default=None)
    cnorm = param.String(default="eq_hist")
    clims = param.NumericTuple(default=None, length=2, allow_None=True)
    min_alpha = param.Number(default=180)

    def set_from(self, spec: ColorSpec) -> None:
        self.param.update(clim=tuple(float(c) for c in (spec.clim or (0.0, 1.0))),
                          cmap=spec.cmap, clabel=no_tex(spec.name))  # a colour-bar title: shown as typed, never as TeX

    def set_shaded(self, spec: ColorSpec, color_key: dict | None = None) -> None:
        """Aggregate and shade as a map of ``spec`` (categorical, continuous or diverging) shaded on the server:
        categories as counts per category blended by ``color_key`` (histogram-equalised alpha), values as the
        mean per pixel through the colour map, linear between ``spec.clim``."""
        import datashader as ds

        if spec.kind == "categorical":
            self.param.update(aggregator=ds.count_cat("color"), cnorm="eq_hist", clims=None, min_alpha=180,
                              color_key=dict(color_key or {}), clabel=no_tex(spec.name))
            return
        clim = spec.limits()
        self.param.update(aggregator=ds.mean("color"), cnorm="linear", clims=clim, clim=clim, min_alpha=180,
                          cmap=spec.cmap, clabel=no_tex(spec.name))


def _finite_range(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    return (lo, hi if hi > lo else lo + 1.0)


def colourbar_html(spec: ColorSpec, *, height: int = 300, stops: int = 16) -> str:
    """The colour bar of a continuous or diverging colouring as HTML, drawn beside a map shaded on the server.

    Parameters
    ----------
    spec
        A continuous or diverging :class:`ColorSpec` (its ``name``, ``clim`` and ``center``); other kinds give
        ``""``.
    height
        Pixels of the bar.
    stops
        Colours of the gradient, sampled evenly from the colour map.

    Returns
    -------
    str
        ``<div class="map-colourbar">``: the escaped name, a vertical CSS gradient and the values at its top,
        middle (the centre of a diverging colouring) and bottom.
    """
    if spec.kind not in ("continuous", "diverging"):
        return ""
    import html

    cmap = spec.cmap
    lo, hi = spec.limits()
    idx = np.linspace(0, len(cmap) - 1, stops).round().astype(int)
    gradient = ", ".join(html.escape(cmap[i]) for i in idx)
    mid = float(spec.center) if spec.kind == "diverging" else (lo + hi) / 2
    labels = [(0, hi), (50, mid), (100, lo)]
    ticks = "".join(f'<div class="map-colourbar-tick" style="position:absolute;top:{top}%;transform:translateY(-50%);'
                    f'white-space:nowrap">{value:.3g}</div>' for top, value in labels)
    title = html.escape(spec.name or "value")
    return (f'<div class="map-colourbar" style="font-size:11px;line-height:15px"><div class="map-legend-title" '
            f'style="font-weight:600;margin-bottom:6px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap" '
            f'title="{title}">{title}</div><div style="display:flex;gap:6px"><div style="flex:none;width:14px;'
            f'height:{int(height)}px;background:linear-gradient(to top, {gradient});border:1px solid #bbb"></div>'
            f'<div style="position:relative;height:{int(height)}px">{ticks}</div></div></div>')


def category_key(categories: Sequence, colors: dict | None = None) -> dict:
    """The colour key of a categorical map: each category (in the order given) -> its colour in ``colors``,
    else its :data:`CATEGORY_COLORS` colour by position."""
    colors = colors or {}
    return {c: colors.get(c) or CATEGORY_COLORS[i % len(CATEGORY_COLORS)] for i, c in enumerate(categories)}


def category_colors(categories: Sequence) -> dict:
    """Stable colours for categories: Glasbey/category10, in category order."""
    return category_key([str(c) for c in categories])


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



def _short(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"

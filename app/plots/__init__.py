"""Pure plotting functions: arrays and tables in, HoloViews elements or PNG bytes out.

The cell map follows peers.md §6.1: one ``hv.Points`` of float32 x/y plus the colour
value, ``datashade`` (categories with ``count_cat``, values with ``mean`` through a colour
map, shaded on the server; the served map's legend or colour bar is HTML beside it) or
``rasterize`` (values with NaN over a grey layer of every cell, client-side colour map and
colour bar), ``dynspread`` so that isolated cells stay visible, and ``selector=ds.first(...)``
so that hovering shows the cell under the pointer. Nothing here reads application state.
"""
from __future__ import annotations

from .cell_map import (MapPipe, aggregate, cell_frame, cell_map, cell_map_layers, recolour_rendered, spread_mode,
                       warm_up)
from .charts import (VOLCANO_COLORS, CategoryBars, ScoreHistogram, Volcano, category_bars, category_counts,
                     confusion_heatmap, enrichment_bars, histogram, histogram_data, volcano, volcano_frame)
from .colours import (BACKGROUND_COLOR, CATEGORY_COLORS, DIVERGING_CMAP, LEGEND_OPTS, MAX_CATEGORIES,
                      SEQUENTIAL_CMAP, ColorSpec, MapStyle, category_colors, category_key, colourbar_html,
                      symmetric_clim)
from .png import map_png
from .text import no_tex

__all__ = [
    "no_tex",
    "ColorSpec",
    "MapStyle",
    "category_key",
    "colourbar_html",
    "BACKGROUND_COLOR",
    "LEGEND_OPTS",
    "MAX_CATEGORIES",
    "CATEGORY_COLORS",
    "DIVERGING_CMAP",
    "SEQUENTIAL_CMAP",
    "category_colors",
    "symmetric_clim",
    "cell_frame",
    "cell_map",
    "cell_map_layers",
    "MapPipe",
    "recolour_rendered",
    "spread_mode",
    "aggregate",
    "histogram",
    "histogram_data",
    "ScoreHistogram",
    "category_bars",
    "category_counts",
    "CategoryBars",
    "volcano",
    "volcano_frame",
    "Volcano",
    "VOLCANO_COLORS",
    "enrichment_bars",
    "confusion_heatmap",
    "map_png",
    "warm_up",
]

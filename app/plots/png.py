"""The map as a PNG image (datashader + PIL; no browser needed)."""
from __future__ import annotations

import io

import colorcet as cc
import datashader.transfer_functions as tf
import numpy as np
import pandas as pd

from .cell_map import aggregate
from .colours import BACKGROUND_COLOR, CATEGORY_COLORS, DIVERGING_CMAP, SEQUENTIAL_CMAP, ColorSpec, _short

__all__ = ["map_png"]


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

"""The datashaded cell map with its colour, layout and gene controls, selection tools and side histogram."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field

import holoviews as hv
import numpy as np
import panel as pn
import param

from .. import plots
from ..plots.cell_map import FIGURE_OPTS, legend_html
from ..state import GENE, AppState
from .common import OFFSTAGE, Job, StateView, batched, on_stage, plain_bokeh, stage
from . import panes

__all__ = ["MapView"]

log = logging.getLogger(__name__)

#: pixels of the HTML legend beside a categorical map (taken from the figure's width)
LEGEND_WIDTH = 180


def _outline(data=None):
    """The selection outline drawn over the map (box or lasso), as a dashed path."""
    if data is None:
        return hv.Path([]).opts(color="black", line_dash="dashed", line_width=1.5, show_legend=False)
    kind, geom = data
    if kind == "box":
        x0, y0, x1, y1 = geom
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    else:
        g = np.asarray(geom)
        pts = [tuple(p) for p in g] + [tuple(g[0])]
    return hv.Path([pts]).opts(color="black", line_dash="dashed", line_width=1.5, show_legend=False)


class MapView(StateView):
    """Cell map (datashaded), hover, box/lasso selection with a visible count, and a histogram beside it."""

    width = param.Integer(default=720)
    height = param.Integer(default=560)

    def __init__(self, state: AppState, **params):
        super().__init__(state, **params)
        st = self.state
        self.job = Job()
        self.layout_select = pn.widgets.Select(label="Layout (obsm)", options=st.layouts(),
                                               value=st.layout_key, sizing_mode="stretch_width")
        self.color_select = pn.widgets.Select(label="Colour by", options=st.color_options(), value=st.color_by,
                                              sizing_mode="stretch_width")
        self.gene_input = pn.widgets.AutocompleteInput(
            label="Gene expression", options=st.gene_names(), case_sensitive=False, search_strategy="includes",
            min_characters=1, restrict=False, placeholder="type a gene, e.g. CD3D", sizing_mode="stretch_width")
        self.category_select = pn.widgets.MultiChoice(label="Select cells of category", options=[],
                                                      sizing_mode="stretch_width", styles=OFFSTAGE)
        self.clear_button = pn.widgets.Button(label="Clear selection", color="default", width=130)
        self.count = panes.HTML(self._count_html(), css_classes=["selection-count"], margin=(8, 5))
        # two map panes. "shaded": categories, query scores, genes and other values without NaN, as one image
        # shaded on the server (plots.cell_map_layers(shaded=True)), recoloured in place from any of these to
        # any other: a session's first query, and every switch between a query and zero-shot labels, recolour
        # the map the page opened with instead of drawing a new figure (until 2026-12-04 scores had a pane of
        # their own; its first drawing cost each session about 0.7 s of server and of browser CPU). "layered":
        # cell density, and values with NaN (a grey layer of every cell beneath), with a colour bar in the
        # figure. Each pane sits in its own Column, shown and hidden with common.stage: the hidden one keeps its
        # drawing and the page is not laid out again (Panel fails to pass ``visible`` through a rendered
        # HoloViews pane to its inner Bokeh pane anyway)
        self._slots = {}
        # the key of the shaded map is HTML beside the figure: the legend of categories (plots.legend_html) or
        # the colour bar of values (plots.colourbar_html). Inside the figure, every legend entry was a HoloViews
        # layer updated on each recolouring, and the legend was moved out of the figure and back on every
        # update (a relayout of the whole page in the browser)
        self.legend = panes.HTML("", width=LEGEND_WIDTH, height=self.height, margin=(45, 0, 0, 5),
                                 css_classes=["map-legend-pane"])
        for kind in ("layered", "shaded"):
            width = self.width if kind == "layered" else self.width - LEGEND_WIDTH
            pane = pn.pane.HoloViews(None, width=width + 10, height=self.height + 40, linked_axes=False)
            box = pn.Column(pane, margin=0, styles=OFFSTAGE) if kind == "layered" else \
                pn.Row(pane, self.legend, margin=0, styles=OFFSTAGE)
            self._slots[kind] = _Slot(pane, box, width)
        self._active = "shaded"
        self.placeholder = panes.Alert("", alert_type="info", visible=False)
        self.bars = plots.CategoryBars(width=310, height=320)  # one Bokeh figure, its data replaced in place
        self.side = pn.pane.Bokeh(self.bars.figure)
        self.side_box = pn.Column(self.side, margin=0, styles=OFFSTAGE)
        self.histogram = plots.ScoreHistogram(width=310, height=300)
        self.hist_pane = pn.Column(pn.pane.Bokeh(self.histogram.figure), margin=0, styles=OFFSTAGE)
        self.side_note = panes.Markdown("", margin=(0, 10), width=300)
        self.colour_note = panes.HTML("", margin=(0, 10), css_classes=["colour-note"])
        self._ranges = None
        self._redraw_pending = False
        self._syncing = False
        self._style = plots.MapStyle()

        self.layout_select.param.watch(self._on_layout_widget, "value")
        self.color_select.param.watch(self._on_color_widget, "value")
        self.gene_input.param.watch(self._on_gene, "value")
        self.category_select.param.watch(self._on_category, "value")
        self.clear_button.on_click(lambda event: self.state.clear_selection())
        st.param.watch(self._on_map_version, "map_version")
        st.param.watch(self._on_layout_state, "layout_key")
        st.param.watch(self._on_selection, "selection")
        st.param.watch(self._refresh_layout_options, "embeds_ready")
        self.redraw()

    # ------------------------------------------------------------------ layout pieces
    def controls(self) -> pn.Column:
        """Widgets for the sidebar."""
        return pn.Column(self.layout_select, self.color_select, self.gene_input, self.category_select,
                         pn.Row(self.clear_button, self.count), self.job, sizing_mode="stretch_width")

    def __panel__(self):
        # a wrapping flex box: in a window too narrow for both (e.g. 1400 px with the sidebar open), the side
        # charts go below the map; in a Row they were drawn over the map's colour bar
        return pn.FlexBox(
            pn.Column(self.placeholder, *(slot.box for slot in self._slots.values()), self.colour_note,
                      width=self.width + 20),
            pn.Column(self.side_box, self.hist_pane, self.side_note, margin=(10, 0), width=320),
            flex_wrap="wrap", align_items="flex-start", sizing_mode="stretch_width")

    @property
    def plot(self) -> pn.pane.HoloViews:
        """The map pane shown now."""
        return self._slots[self._active].pane

    @property
    def _data_pipe(self):
        """The data pipe of the map shown now (its table: what a zoom re-aggregates)."""
        return self._slots[self._active].pipe

    # ------------------------------------------------------------------ reactions
    def _on_layout_widget(self, event):
        if self._syncing:
            return
        if event.new and event.new != self.state.layout_key:
            self.state.layout_key = event.new

    def _on_layout_state(self, event):
        self._ranges = None
        with self._sync():
            self.layout_select.value = event.new
        self.state.clear_selection()
        self.schedule_redraw()

    def _refresh_layout_options(self, *_):
        with self._sync():
            self.layout_select.param.update(options=self.state.layouts(),
                                            value=self.state.layout_key)

    def _on_color_widget(self, event):
        if self._syncing:
            return
        if event.new is not None and event.new != self.state.color_by:
            if event.new == GENE and not self.state.gene:
                return
            self.state.set_color(event.new)

    def _on_gene(self, event):
        if not event.new:
            return
        if self.state.backed:  # the column is streamed from disk (seconds on an atlas): off the event loop
            pn.state.execute(partial(self.load_gene, event.new))
        else:
            self.job.guard(lambda: self.state.set_gene(event.new))

    async def load_gene(self, gene: str) -> bool:
        """Read ``gene``'s values off the event loop, then colour the map by them (backed datasets)."""
        st = self.state
        name = st.resolve_gene(gene)
        return await self.job.run(lambda: st.gene_values(name), lambda _: st.set_gene(name),
                                  label=f"Reading {name}", disable=[self.gene_input])

    def _on_category(self, event):
        if event.new and not self._syncing:
            self.job.guard(lambda: self.state.select_values(event.new))

    def _on_map_version(self, *_):
        opts = self.state.color_options()
        with self._sync():
            if opts != self.color_select.options:
                self.color_select.options = opts
            if self.state.color_by in opts.values() and self.color_select.value != self.state.color_by:
                self.color_select.value = self.state.color_by
        self.schedule_redraw()

    @contextmanager
    def _sync(self):
        """Update widgets from the state without their watchers writing back (no ping-pong)."""
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False

    def schedule_redraw(self) -> None:
        """Redraw on the next tick of the server's event loop (several changes in a row give one redraw)."""
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None:
            self.redraw()
            return
        if self._redraw_pending:
            return
        self._redraw_pending = True

        def _do():
            self._redraw_pending = False
            self.redraw()

        pn.state.execute(_do, schedule=True)

    def _on_selection(self, *_):
        with batched():
            self.count.object = self._count_html()
            slot = self._slots[self._active]
            if slot.outline is not None:
                slot.outline.send(self.state.selection_geometry)
            self._update_side()

    def _count_html(self) -> str:
        n = self.state.n_selected
        total = self.state.n_cells
        if self.state.selection is None:
            return f'<span class="selection-count-text">No selection ({total:,} cells)</span>'
        return f'<span class="selection-count-text"><b>{n:,}</b> of {total:,} cells selected</span>'

    # ------------------------------------------------------------------ drawing
    def _on_bounds(self, bounds=None, **_):
        if bounds is not None and all(np.isfinite(b) for b in bounds):
            self.state.select_box(*bounds)

    def _on_lasso(self, geometry=None, **_):
        if geometry is not None and len(geometry) >= 3:
            self.state.select_lasso(np.asarray(geometry))

    def _zoomed(self, df) -> bool:
        """Whether the user zoomed in (the stored ranges cover less than the cells' extent)."""
        if not self._ranges:
            return False
        (x0, x1), (y0, y1) = self._ranges
        xs, ys = df["x"].to_numpy(), df["y"].to_numpy()
        tx, ty = 0.01 * float(np.ptp(xs) or 1), 0.01 * float(np.ptp(ys) or 1)
        return bool(x0 > xs.min() + tx or x1 < xs.max() - tx or y0 > ys.min() + ty or y1 < ys.max() - ty)

    def _on_range(self, x_range=None, y_range=None, **_):
        if x_range is not None and y_range is not None:
            self._ranges = (tuple(x_range), tuple(y_range))

    def figure(self):
        """The HoloViews object of the map shown now (the coloured cells and selection outline; the legend of a
        categorical colouring is HTML beside it, :attr:`legend`)."""
        return self.plot.object

    def _mode_key(self, df, spec) -> tuple:
        """Plots with the same key can be recoloured in place (same element types, columns and layout). New
        categories (zero-shot labels, another obs column) keep the plot: its datashade operation takes the colour
        key from the slot's :class:`~app.plots.MapStyle`."""
        kind = _slot_kind(spec)
        what = spec.kind if kind == "layered" else "shaded"  # the shaded map takes categories and values alike
        return (kind, what, tuple(df.columns), self.state.layout_key, len(df))

    def _figure(self, frame=None, slot: "_Slot | None" = None):
        frame = frame or self.state.map_frame()
        if frame is None:
            return None
        df, spec = frame
        slot = slot or self._slots[_slot_kind(spec)]
        xlim, ylim = self._ranges if self._zoomed(df) else (None, None)
        title = f"{self.state.dataset_name} ({self.state.layout_key})"
        shaded = _slot_kind(spec) == "shaded"
        slot.pipe = plots.MapPipe(data=df) if spec.kind != "none" else None
        if not shaded and spec.kind != "none":
            self._style.set_from(spec)
        # a fresh style per shaded figure, like the pipe (cell_map_layers sets its aggregation and colours)
        slot.style = plots.MapStyle() if shaded else None
        el, main = plots.cell_map_layers(df, spec, width=slot.width, height=self.height, title=title, xlim=xlim,
                                         ylim=ylim, pipe=slot.pipe, style=slot.style if shaded else self._style,
                                         legend=False, shaded=shaded)
        # a fresh pipe per figure: streams shared between figures keep old plots alive
        slot.outline = hv.streams.Pipe(data=self.state.selection_geometry)
        outline = hv.DynamicMap(_outline, streams=[slot.outline])
        slot.key = self._mode_key(df, spec)
        return (el * outline).opts(toolbar="above", title=title, **FIGURE_OPTS), main

    def redraw(self) -> None:
        """Redraw the map for the current colouring and layout (in place when only the values change)."""
        t0 = time.perf_counter()
        with batched():
            self._redraw()
        log.debug("map redrawn in %.3f s", time.perf_counter() - t0)

    def _show(self, kind: str) -> None:
        """Show the map pane of ``kind`` and hide the other (cheap: no plot is rebuilt, and with
        :func:`~app.views.common.stage` the page is not laid out again either)."""
        if kind != self._active:
            stage(self._slots[kind].box, True)
            stage(self._slots[self._active].box, False)
            self._active = kind
            slot = self._slots[kind]
            # the selection's outline, when it changed while this pane was hidden (a HoloViews redraw otherwise)
            if slot.outline is not None and slot.outline.data is not self.state.selection_geometry:
                slot.outline.send(self.state.selection_geometry)
        else:
            stage(self._slots[kind].box, True)

    def _redraw(self) -> None:
        frame = self.state.map_frame()
        if frame is not None:
            df, spec = frame
            kind = _slot_kind(spec)
            slot = self._slots[kind]
            if slot.pipe is not None and slot.pane.object is not None and self._mode_key(df, spec) == slot.key:
                colour_key = (plots.category_key(list(df["color"].cat.categories), spec.colors)
                              if spec.kind == "categorical" else None)
                if _same_frame(slot.pipe.data, df) and (kind == "layered" or _same_style(slot.style, spec,
                                                                                          colour_key)):
                    pass  # the colouring shown already (e.g. the same labels again): nothing to send
                elif kind == "shaded":
                    # new categories or values keep the figure: the table and how to aggregate and shade it are
                    # stored silently (the next zoom redraws from them), then the shown image is re-shaded.
                    # (Letting the style's change re-render, as before 2026-12-02, drew the *previous* values: a
                    # pipe only recomputes its points when it is triggered, so the map kept the last query's
                    # colours under the new query's colour bar.)
                    slot.pipe.store(df)
                    with param.parameterized.discard_events(slot.style):
                        slot.style.set_shaded(spec, colour_key)
                    self._recolour(slot, df, spec, colour_key)
                elif spec.kind in ("continuous", "diverging"):  # values with NaN: the same, on the layered map
                    slot.pipe.store(df)
                    with param.parameterized.discard_events(self._style):
                        self._style.set_from(spec)
                    self._recolour(slot, df, spec)
                else:
                    slot.pipe.send(df)
                self._show(kind)
                self._set_categories(spec)
                self._after_draw(spec)
                return
        else:
            kind = self._active
            slot = self._slots[kind]
        for s in slot.streams:
            s.clear()
            s.source = None
        fig = self._figure(frame, slot)
        if fig is None:
            self.placeholder.param.update(
                object="This dataset has no 2-D layout yet: it appears when the embeddings and UMAP are ready.",
                visible=True)
            for sl in self._slots.values():
                sl.pane.object = None
                stage(sl.box, False)
                sl.key = sl.pipe = sl.style = None
            self._update_side()
            return
        obj, main = fig
        self.placeholder.visible = False
        bounds = hv.streams.BoundsXY(source=main)
        lasso = hv.streams.Lasso(source=main)
        rng = hv.streams.RangeXY(source=main)
        bounds.add_subscriber(self._on_bounds)
        lasso.add_subscriber(self._on_lasso)
        rng.add_subscriber(self._on_range)
        slot.streams = [bounds, lasso, rng]
        spec = frame[1]
        self._set_categories(spec)
        slot.pane.object = obj
        self._show(kind)  # (the outline's pipe was created with the current selection: nothing to send)
        self._after_draw(spec)

    def _recolour(self, slot: "_Slot", df, spec, colour_key: dict | None = None) -> None:
        """Recolour the slot's map in every page that shows it, after its new table and style were stored.

        :func:`app.plots.recolour_rendered` replaces the shown image directly, without HoloViews' operations
        (a query in 46 ms instead of 128 ms in-process on the demo,
        ``bench/bench_recolour.py``); where it cannot (a map of more than 50,000 cells,
        spread by ``dynspread``), the data stream is triggered and HoloViews redraws.
        """
        rendered = [plot for plot, _ in slot.pane._plots.values()]  # Panel keeps one HoloViews plot per page
        with plain_bokeh():  # image, colour mapper and colour bar in one message to the page
            done = plots.recolour_rendered(rendered, df, spec, color_key=colour_key,
                                           spread=plots.spread_mode(len(df)))
        if not done:
            hv.streams.Stream.trigger([slot.pipe])

    def close(self) -> None:
        """Drop the plots and detach the selection streams (a closed session's view must not stay reachable).

        HoloViews keeps the streams of a rendered plot in its own registries; their subscribers are this view's
        methods, so without this a closed session's view and state would live as long as those registries.
        """
        for slot in self._slots.values():
            for s in slot.streams:
                s.clear()
                s.source = None
            slot.streams = []
            slot.pipe = slot.outline = slot.key = slot.style = None

    def _set_categories(self, spec) -> None:
        """The "select cells of category" menu follows a categorical colouring."""
        cats = [str(c) for c in spec.values.categories] if spec.kind == "categorical" else []
        if cats != list(self.category_select.options) or on_stage(self.category_select) != bool(cats):
            with self._sync():
                self.category_select.param.update(options=cats, value=[])
                stage(self.category_select, bool(cats))

    def _after_draw(self, spec) -> None:
        self.colour_note.object = self._colour_text(spec)
        if _slot_kind(spec) == "shaded":  # its key lives beside the shaded map
            self.legend.object = (legend_html(spec, height=self.height) if spec.kind == "categorical" else
                                  plots.colourbar_html(spec, height=min(300, self.height - 80)))
        self._update_side()

    def _colour_text(self, spec=None) -> str:
        spec = spec or self.state.color_spec()
        what = {"categorical": "categories", "continuous": "continuous", "diverging": "diverging",
                "none": "cell density"}[spec.kind]
        extra = ""
        if spec.kind == "diverging" and spec.clim is not None:
            extra = f"; white = {spec.center:.3g}, colour range {spec.clim[0]:.3g} to {spec.clim[1]:.3g}"
        elif spec.kind == "categorical":
            extra = f"; {len(spec.colors)} categories"
        import html

        return (f'<span class="colour-note-text">Colour: <b>{html.escape(spec.name or "cells")}</b> '
                f"({what}{extra}) on {html.escape(str(self.state.layout_key))}</span>")

    def _update_side(self) -> None:
        t0 = time.perf_counter()
        self._update_side_()
        log.debug("side plot in %.3f s", time.perf_counter() - t0)

    def _update_side_(self) -> None:
        st = self.state
        sel = st.selection_mask()
        hist = None
        if st.scores is not None:
            rec = st.current_record()
            n = len(st.scores)
            hist = dict(values=st.scores, selected=sel, name="query score",
                        diverging_center=rec.center if rec is not None else None, title=f"Scores: {st.query[:40]}")
            note = (f"{n:,} cells scored; median {np.median(st.scores):.2f}, "
                    f"range {np.min(st.scores):.2f} to {np.max(st.scores):.2f}.")
        else:
            note = "Type a query to see the distribution of its scores here."
            spec = st.color_spec()
            if spec.kind in ("continuous", "diverging"):
                hist = dict(values=np.asarray(spec.values), selected=sel, name=spec.name, title=spec.name,
                            diverging_center=spec.center if spec.kind == "diverging" else None)
            elif spec.kind == "categorical":
                with plain_bokeh():
                    self.bars.update(spec.values, selected=sel, name=spec.name, colors=spec.colors)
                stage(self.side_box, True)
                stage(self.hist_pane, False)
            else:
                stage(self.side_box, False)
                stage(self.hist_pane, False)
        if hist is not None:
            with plain_bokeh():
                self.histogram.update(**hist)  # same Bokeh figure, new bins
            stage(self.side_box, False)
            stage(self.hist_pane, True)
        self.side_note.object = note


@dataclass
class _Slot:
    """One map pane and what recolours it in place: its data pipe, colour key of a categorical colouring
    (``style.color_key``), outline pipe, selection streams and key."""

    pane: pn.pane.HoloViews
    box: pn.Column
    width: int = 720
    pipe: object = None
    style: object = None
    outline: object = None
    key: tuple | None = None
    streams: list = field(default_factory=list)


def _same_frame(shown, new) -> bool:
    """Whether the map table ``new`` equals the one shown (same columns, values and categories)."""
    if shown is None or shown is new:
        return shown is new
    try:
        return list(shown.columns) == list(new.columns) and all(
            shown[c].dtype == new[c].dtype and shown[c].equals(new[c]) for c in new.columns)
    except (AttributeError, TypeError, ValueError):
        return False


def _slot_kind(spec) -> str:
    """``"shaded"`` for categories and for values without NaN, ``"layered"`` for cell density and values with
    NaN (drawn over a grey layer of every cell)."""
    if spec.kind == "categorical":
        return "shaded"
    if spec.kind in ("continuous", "diverging") and np.isfinite(np.asarray(spec.values, dtype=np.float64)).all():
        return "shaded"
    return "layered"


def _same_style(style, spec, colour_key) -> bool:
    """Whether a shaded map's ``style`` already shades as ``spec`` would (same aggregation, colours, limits)."""
    if style is None:
        return False
    if spec.kind == "categorical":
        return style.cnorm == "eq_hist" and style.color_key == colour_key
    return style.cnorm == "linear" and style.cmap == spec.cmap and tuple(style.clims or ()) == spec.limits()

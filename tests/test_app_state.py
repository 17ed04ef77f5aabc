"""The dashboard tested without a browser: drive AppState and the views' params, assert on outcomes."""
from __future__ import annotations

import asyncio
from concurrent.futures import Future

import html
import re

import numpy as np
import pandas as pd
import pytest

import engine
from engine.errors import DataError, EmptySelectionError, LexicellError, MissingKeyError, QueryError




@pytest.fixture
def state(demo):
    from app import cache
    from app.state import AppState

    base, model = demo
    return AppState(cache.session_adata(base), model, dataset_name="demo")


# ---------------------------------------------------------------------- sessions and shared data
def test_sessions_share_matrices_but_not_obs(demo):
    from app import cache
    from app.state import AppState

    base, model = demo
    a = AppState(cache.session_adata(base), model)
    b = AppState(cache.session_adata(base), model)
    assert np.shares_memory(a.adata.obsm["transcriptome_embeds"], base.obsm["transcriptome_embeds"])
    assert a.adata.X is base.X or np.shares_memory(a.adata.X, base.X)
    a.run_query("B cells")
    key = a.keep_query("my_score")
    a.run_zero_shot(["B cell", "T cell"])
    a.accept_labels("my_labels")
    assert key in a.adata.obs and "my_labels" in a.adata.obs
    for other in (b.adata, base):
        assert key not in other.obs and "my_labels" not in other.obs
        assert "my_labels_probabilities" not in other.obsm
    assert b.scores is None and b.history == []


def test_embedding_job_is_none_when_embeddings_exist(demo):
    from app import cache

    base, model = demo
    assert cache.has_embeddings(base, model)
    assert cache.embedding_job(base, model) is None
    assert not cache.has_embeddings(base, None)


def test_embedding_job_runs_in_background(demo, tiny_text_dir):
    from app import cache

    base, model = demo
    fresh = cache.session_adata(base)
    del fresh.obsm["transcriptome_embeds"]
    job = cache.embedding_job(fresh, model)
    assert job is not None
    job.future.result(timeout=120)
    assert cache.has_embeddings(fresh, model) and job.stage == "done"
    np.testing.assert_allclose(fresh.obsm["transcriptome_embeds"], base.obsm["transcriptome_embeds"], atol=1e-5)


def test_the_servers_de_warm_up_runs_on_a_copy_and_leaves_the_dataset_as_it_was(demo):
    from app import cache

    base, _ = demo
    obs, uns, x = list(base.obs.columns), set(base.uns.keys()), base.X.copy()
    assert cache.warm_de(base) is True
    assert list(base.obs.columns) == obs and set(base.uns.keys()) == uns  # no de_top_vs_bottom keys
    np.testing.assert_array_equal(base.X, x)
    assert cache.warm_de(base[:5]) is False  # too few cells for 3 top and 3 bottom


# ---------------------------------------------------------------------- colouring and queries
def test_default_colour_is_a_cell_type_column(state):
    assert state.color_by == "bulk_labels"
    spec = state.color_spec()
    assert spec.kind == "categorical" and len(spec.colors) == state.adata.obs["bulk_labels"].nunique()
    assert all(c.startswith("#") for c in spec.colors.values())


def test_query_scores_history_and_colour(state):
    from app.state import QUERY

    rec = state.run_query("B cells")
    assert rec.scores.shape == (700,) and rec.scores.dtype == np.float32
    assert state.color_by == QUERY
    spec = state.color_spec()
    assert spec.kind == "diverging"
    lo, hi = spec.clim
    assert np.isclose(lo + hi, 2 * spec.center)  # symmetric around the centre
    assert np.isclose(spec.center, np.median(rec.scores))
    state.run_query("B cells MINUS T cells")
    assert state.color_spec().center == 0.0
    assert [h.query for h in state.history] == ["B cells", "B cells MINUS T cells"]
    state.show_history("B cells")
    assert state.query == "B cells" and np.array_equal(state.scores, rec.scores)
    np.testing.assert_allclose(state.scores, engine.score_text(state.adata, state.model, "B cells", write=False))


@pytest.mark.parametrize("bad", ["", "   ", "MINUS T cells"])
def test_bad_queries_raise_engine_errors(state, bad):
    with pytest.raises(QueryError):
        state.run_query(bad)


def test_query_before_embeddings_is_a_clear_error(demo):
    from app import cache
    from app.state import AppState

    base, model = demo
    st = AppState(cache.session_adata(base), None)
    with pytest.raises(LexicellError, match="still being embedded"):
        st.run_query("B cells")
    assert st.color_spec().kind == "categorical"  # the map works without the model


def test_a_query_typed_before_the_embeddings_waits_for_them_then_runs(demo):
    """The page is usable while the model loads: a query typed then is kept (the last one typed) and scored once
    the cells are embedded, with the "embeddings ready" notice left in place, instead of an error."""
    import asyncio

    from app import cache
    from app.state import AppState
    from app.views.query import QueryView

    base, model = demo
    st = AppState(cache.session_adata(base), None)
    view = QueryView(st)
    for text in ("T cells", "B cells"):
        view.text.param.update(value=text, value_input=text)
        asyncio.run(view._search())
    assert view.pending == "B cells" and st.scores is None and st.message_kind == "info"
    assert "“B cells” will be scored as soon as the cells are embedded" in st.message
    st.notify("Embeddings ready. Note: 12 repeated gene names were summed.", "warning")  # as the page says
    st.set_model(model)
    st.attach_embeddings(base)
    assert st.query == "B cells" and st.scores is not None and view.pending is None
    assert list(view.history.options) == ["B cells"]
    assert st.message.startswith("Embeddings ready. Note:")  # the waiting query leaves the page's notice


def test_gene_colouring(state):
    state.set_gene("cd3d")  # case-insensitive
    spec = state.color_spec()
    assert state.gene == "CD3D" and spec.kind == "continuous"
    np.testing.assert_allclose(spec.values, state.adata.raw[:, "CD3D"].X.toarray().ravel())
    with pytest.raises(MissingKeyError, match="not in this dataset"):
        state.set_gene("NOTAGENE1")


# ---------------------------------------------------------------------- selection
def test_box_lasso_and_category_selection(state):
    xy = state.coords()
    n = state.select_box(0, 0, 10, 10)
    expected = int(((xy[:, 0] >= 0) & (xy[:, 0] <= 10) & (xy[:, 1] >= 0) & (xy[:, 1] <= 10)).sum())
    assert n == expected == state.n_selected
    assert state.selection_geometry[0] == "box"
    square = [(0, 0), (10, 0), (10, 10), (0, 10)]
    assert state.select_lasso(square) == expected
    m = state.select_values(["CD19+ B"])  # the default colouring is bulk_labels
    assert m == int((state.adata.obs["bulk_labels"] == "CD19+ B").sum())
    state.clear_selection()
    assert state.selection is None and state.selection_mask() is None


def test_map_view_shows_count_and_redraws(state):
    import holoviews as hv

    from app.views.common import on_stage
    from app.views.map import MapView

    view = MapView(state)
    assert "No selection (700 cells)" in view.count.object
    state.select_box(-100, -100, 100, 100)
    assert "<b>700</b> of 700 cells selected" in view.count.object
    state.run_query("T cells")
    assert "score: T cells" in view.colour_note.object
    # parts a query shows and hides are staged through CSS styles (common.stage), not ``visible``
    assert view.plot.object is not None and on_stage(view.hist_pane) and not on_stage(view.side_box)
    assert on_stage(view._slots["shaded"].box) and not on_stage(view._slots["layered"].box)
    assert not on_stage(view.category_select)
    assert 'class="map-colourbar"' in view.legend.object and "score: T cells" in view.legend.object
    assert int(np.sum(view.histogram.source.data["top"])) == 700  # the side histogram: every cell once
    from bokeh.models import HoverTool

    fig = hv.render(view.plot.object)
    assert any(isinstance(t, HoverTool) for t in fig.tools)  # server-side hover of one cell (selector)
    pipe = view._data_pipe
    state.run_query("B cells")  # same kind of colouring: recoloured in place, same plot
    assert view._data_pipe is pipe and np.array_equal(pipe.data["color"], state.scores)
    shaded, obj = view.plot, view.plot.object
    state.set_color("bulk_labels")  # categories: the same map, recoloured in place
    assert view.plot is shaded and view.plot.object is obj and view._data_pipe is pipe
    # (the side chart stays the query's score histogram while a query is active)
    assert on_stage(view._slots["shaded"].box) and on_stage(view.hist_pane) and not on_stage(view.side_box)
    assert on_stage(view.category_select) and "CD14+ Monocyte" in view.category_select.options
    cat_pipe, cat_obj = view._slots["shaded"].pipe, view.plot.object
    # the legend is HTML beside the figure, one entry per category present, not layers of the plot
    present = sorted(set(map(str, state.adata.obs["bulk_labels"])))
    assert view.legend.object.count('class="map-legend-entry"') == len(present)
    assert all(html.escape(c) in view.legend.object for c in present)
    assert not any(isinstance(el, hv.Points) and el.label for el in view.plot.object.traverse(full_breadth=False))
    key = dict(view._slots["shaded"].style.color_key)
    state.set_color("louvain")  # other categories: the same plot, its data and colour key replaced in place
    assert view.plot.object is cat_obj and view._slots["shaded"].pipe is cat_pipe
    louvain = sorted(map(str, state.adata.obs["louvain"].cat.categories))
    assert sorted(view._slots["shaded"].style.color_key) == louvain and view._slots["shaded"].style.color_key != key
    assert view.legend.object.count('class="map-legend-entry"') == len(set(map(str, state.adata.obs["louvain"])))
    shown = view._slots["shaded"].pipe.data
    state.set_color("louvain")  # the same colouring again: the same plot, nothing sent (the shown table kept)
    assert view.plot.object is cat_obj and view._slots["shaded"].pipe.data is shown
    state.run_query("NK cells")  # back to a query: the same plot, recoloured in place
    assert view.plot is shaded and view.plot.object is obj and view._data_pipe is pipe
    assert not on_stage(view._slots["layered"].box) and not on_stage(view.category_select)
    assert np.array_equal(pipe.data["color"], state.scores) and view._slots["layered"].pane.object is None
    assert "score: NK cells" in view.legend.object and "map-legend-entry" not in view.legend.object


def test_map_recoloured_in_place_shows_the_new_query_not_the_last_one(demo):
    """A query recolours the shown map in place; the image sent to the page must be the new query's, the same
    as a freshly built map of it. (Until 2026-12-02 the new colour range re-rendered the map with the previous
    query's values: the data pipe recomputes its points only when it is triggered.)"""
    from bokeh.document import Document
    from bokeh.models import GlyphRenderer

    from app import cache
    from app.state import AppState
    from app.views.map import MapView

    base, model = demo

    def image(root):  # (the shaded map's colours, as uint32 RGBA)
        imgs = [r.data_source.data["image"][0] for r in root.select({"type": GlyphRenderer})
                if type(r.glyph).__name__ in ("Image", "ImageRGBA")]
        assert len(imgs) == 1
        return np.array(imgs[0], dtype=np.float64)

    a = AppState(cache.session_adata(base), model)
    view = MapView(a)
    a.run_query("T cells")
    root = view.plot.get_root(Document())  # rendered, as in a page: later queries update these Bokeh models
    first, pipe = image(root), view._data_pipe
    for text in ("B cells", "NK cells"):
        a.run_query(text)
        assert view._data_pipe is pipe  # in place
        b = AppState(cache.session_adata(base), model)
        fresh = MapView(b)
        b.run_query(text)
        shown = image(root)
        assert not np.allclose(shown, first, equal_nan=True)
        np.testing.assert_allclose(shown, image(fresh.plot.get_root(Document())), rtol=1e-6, equal_nan=True)


def test_map_new_categories_reshade_the_shown_plot_as_a_new_plot_would(demo):
    """Zero-shot labels or another obs column recolour the categorical map in place (no new figure), and the
    image sent to the page is the one a freshly built map of that colouring shows."""
    from bokeh.document import Document
    from bokeh.models import GlyphRenderer, ImageRGBA

    from app import cache
    from app.state import AppState
    from app.views.map import MapView

    base, model = demo

    def rgba(root):
        imgs = [r.data_source.data["image"][0] for r in root.select({"type": GlyphRenderer})
                if isinstance(r.glyph, ImageRGBA)]
        assert len(imgs) == 1
        return np.array(imgs[0])

    def fresh(column):
        b = AppState(cache.session_adata(base), model)
        v = MapView(b)
        b.set_color(column)
        return rgba(v.plot.get_root(Document()))

    a = AppState(cache.session_adata(base), model)
    view = MapView(a)
    a.set_color("bulk_labels")
    obj = view.plot.object
    root = view.plot.get_root(Document())
    before = rgba(root)
    for column in ("louvain", "bulk_labels"):
        a.set_color(column)
        assert view.plot.object is obj  # in place
        np.testing.assert_array_equal(rgba(root), fresh(column))
    a.set_color("louvain")
    assert not np.array_equal(rgba(root), before)


def test_map_aggregations_are_shared_between_identical_maps_only(demo):
    """``app.plots.shared``: a second page opening on the same map takes its aggregations from the first (the
    same image), and a map differing in its colouring or in one cell's value is aggregated anew."""
    from bokeh.document import Document
    from bokeh.models import GlyphRenderer, Image, ImageRGBA

    from app import cache
    from app.plots import shared
    from app.state import AppState
    from app.views.map import MapView

    base, model = demo

    def page(column, edit=None):
        s = AppState(cache.session_adata(base), model)
        if edit is not None:
            edit(s.adata)
        view = MapView(s)
        s.set_color(column)
        root = view.plot.get_root(Document())
        return [np.array(r.data_source.data["image"][0]) for r in root.select({"type": GlyphRenderer})
                if isinstance(r.glyph, (Image, ImageRGBA))]

    shared.clear()
    try:
        first = page("louvain")
        computed = shared.stats()
        assert computed["hits"] == 0 and computed["misses"] >= 1
        second = page("louvain")
        assert shared.stats()["hits"] >= computed["misses"] and shared.stats()["misses"] == computed["misses"]
        assert len(first) == len(second) == 1
        np.testing.assert_array_equal(first[0], second[0])
        other = page("bulk_labels")
        assert shared.stats()["misses"] > computed["misses"] and not np.array_equal(other[0], first[0])
        n = shared.stats()["misses"]

        def one_cell(adata):
            col = adata.obs["louvain"]
            cats = list(col.cat.categories)
            adata.obs["louvain"] = col.cat.set_categories(cats)
            adata.obs.iloc[0, adata.obs.columns.get_loc("louvain")] = next(c for c in cats if c != col.iloc[0])

        page("louvain", one_cell)
        assert shared.stats()["misses"] > n
    finally:
        shared.clear()


def _shown_layer(view, root_index=-1):
    """The coloured layer's HoloViews plot in one page showing ``view``'s active map."""
    from app.plots.cell_map import _raster_subplot

    return _raster_subplot(list(view.plot._plots.values())[root_index][0])


def _hover_equal(a, b) -> None:
    assert set(a.data_vars) == set(b.data_vars)
    for var in b.data_vars:
        x, y = a[var].values, b[var].values
        assert x.dtype == y.dtype, var
        if x.dtype == object:
            assert (x == y).all(), var
        else:
            np.testing.assert_allclose(x, y, rtol=1e-6, equal_nan=True, err_msg=var)


@pytest.mark.parametrize("kind", ["query", "categories"])
def test_map_recoloured_in_place_hovers_zooms_and_opens_as_a_fresh_map(demo, kind):
    """A map recoloured in place (app.plots.recolour_rendered, no HoloViews operation) must behave as a freshly
    drawn map of the new colouring: the same hover values under the cursor, the same image after a zoom (the
    zoom redraws through HoloViews from the stored table) and in a page opened afterwards."""
    from bokeh.document import Document

    from app import cache
    from app.state import AppState
    from app.views.map import MapView

    base, model = demo
    first, second = (("T cells", "B cells") if kind == "query" else ("bulk_labels", "louvain"))

    def colour(s, what):
        s.run_query(what) if kind == "query" else s.set_color(what)

    a = AppState(cache.session_adata(base), model)
    view = MapView(a)
    colour(a, first)
    view.plot.get_root(Document())
    obj = view.plot.object
    colour(a, second)
    assert view.plot.object is obj  # in place
    b = AppState(cache.session_adata(base), model)
    fresh = MapView(b)
    colour(b, second)
    fresh.plot.get_root(Document())
    shown, new = _shown_layer(view), _shown_layer(fresh)
    _hover_equal(shown._hover_data, new._hover_data)
    assert view.plot.get_root(Document()) is not None  # a page opened now draws the new colouring
    np.testing.assert_allclose(np.asarray(_shown_layer(view).handles["source"].data["image"][0], dtype=float),
                               np.asarray(new.handles["source"].data["image"][0], dtype=float), rtol=1e-6,
                               equal_nan=True)
    # zoom both: the ranges a wheel zoom in the page sends to the map's RangeXY streams
    import holoviews as hv

    x0 = float(np.asarray(a.map_frame()[0]["x"]).min())
    for v in (view, fresh):
        ranges = {s for p, _ in v.plot._plots.values() for s in p.streams if isinstance(s, hv.streams.RangeXY)}
        for s in ranges:
            s.update(x_range=(x0, 0.0), y_range=(-2.0, 3.0))
        hv.streams.Stream.trigger(list(ranges))
    for i in (0, 1):  # both pages of the recoloured view
        zoomed, expected = _shown_layer(view, i), _shown_layer(fresh, 0)
        assert zoomed.current_frame.bounds.lbrt() == expected.current_frame.bounds.lbrt()
        assert zoomed.current_frame.bounds.lbrt()[2] <= 0.0 + 1e-6  # really zoomed
        np.testing.assert_allclose(np.asarray(zoomed.handles["source"].data["image"][0], dtype=float),
                                   np.asarray(expected.handles["source"].data["image"][0], dtype=float),
                                   rtol=1e-6, equal_nan=True)
        _hover_equal(zoomed._hover_data, expected._hover_data)


def test_a_first_query_labels_query_cycle_recolours_the_maps_it_has_drawn(demo):
    """A session's first zero-shot run after a query and its first query after that recolour the maps already
    drawn (their hover rows, fixed when drawn, always hold the zero-shot label and the query score), and the
    hover then shows the new labels and scores."""
    from bokeh.document import Document

    from app import cache
    from app.state import AppState
    from app.views.map import MapView

    base, model = demo
    a = AppState(cache.session_adata(base), model)
    view = MapView(a)
    view.plot.get_root(Document())
    opening = view._slots["shaded"].pane.object
    assert set(_shown_layer(view)._hover_data["label"].values.ravel()) <= {"–", "-"}  # none predicted yet
    xy = a.coords()
    a.select_box(float(xy[:, 0].min()), float(xy[:, 1].min()), float(np.median(xy[:, 0])), float(xy[:, 1].max()))
    a.run_query("B cells")
    view.plot.get_root(Document())
    assert view._slots["shaded"].pane.object is opening  # the first query recolours the map the page opened on
    # the map shows the selection's outline
    fig = list(view.plot._plots.values())[-1][0].state
    lines = [r for r in fig.renderers if type(r.glyph).__name__ == "MultiLine"]
    assert lines and len(lines[0].data_source.data["xs"][0]) == 5  # the box's corners, closed
    a.run_zero_shot(["B cell", "T cell", "monocyte"])
    assert view._active == "shaded" and view._slots["shaded"].pane.object is opening  # recoloured, not redrawn
    shown = set(_shown_layer(view)._hover_data["label"].values.ravel()) - {"-"}
    assert shown and shown <= {"B cell", "T cell", "monocyte"}
    score = _shown_layer(view)._hover_data["score"].values
    assert np.isfinite(score[score == score]).all() and np.isfinite(score).any()  # the query's scores
    a.run_query("T cells")
    assert view._active == "shaded" and view._slots["shaded"].pane.object is opening
    assert view._slots["layered"].pane.object is None  # no second figure was ever drawn
    shown = set(_shown_layer(view)._hover_data["label"].values.ravel()) - {"-"}
    assert shown and shown <= {"B cell", "T cell", "monocyte"}


def test_first_zero_shot_and_de_runs_send_rows_into_tables_that_show_their_columns(state):
    """The zero-shot summary and the DE table show their result's columns before the first run; the first run
    then fills the same table (the browser keeps it) rather than bringing a table of new columns."""
    from app.views.analysis import DEView
    from app.views.zero_shot import ZeroShotView

    zs, de = ZeroShotView(state), DEView(state)
    summary, de_table = zs.summary, de.de_table
    summary_columns, de_columns = list(summary.value.columns), list(de_table.value.columns)
    assert summary_columns == ["label", "cells", "mean_confidence"] and len(summary.value) == 0
    assert de_columns[:5] == ["gene", "logfoldchange", "score", "pval", "pval_adj"] and len(de_table.value) == 0
    state.run_query("B cells")
    asyncio.run(zs._run())
    asyncio.run(de._run_de())
    assert zs.summary is summary and list(summary.value.columns) == summary_columns and len(summary.value) > 0
    assert de.de_table is de_table and list(de_table.value.columns) == de_columns and len(de_table.value) > 0
    assert de_table.value["gene"].iloc[0] == state.de_table["gene"].iloc[0]


def test_map_recolour_falls_back_to_holoviews_where_it_cannot_recolour(state):
    """``recolour_rendered`` leaves maps spread with dynspread (above 50,000 cells) and density maps to
    HoloViews: it returns False and changes nothing."""
    from bokeh.document import Document

    from app import plots
    from app.views.map import MapView

    view = MapView(state)
    state.run_query("T cells")
    view.plot.get_root(Document())
    layer = _shown_layer(view)
    image, hover = layer.handles["source"].data["image"][0], layer._hover_data
    df, spec = state.map_frame()
    rendered = [p for p, _ in view.plot._plots.values()]
    df2 = df.assign(color=df["color"][::-1].to_numpy())
    assert not plots.recolour_rendered(rendered, df2, spec, spread="dynspread")
    assert not plots.recolour_rendered(rendered, df2, plots.ColorSpec("none"))
    assert layer.handles["source"].data["image"][0] is image and layer._hover_data is hover
    assert plots.recolour_rendered([], df2, spec)  # nothing drawn yet: nothing to do
    assert plots.spread_mode(50_000) == "pixels" and plots.spread_mode(50_001) == "dynspread"


def test_map_figures_draw_on_a_canvas_not_webgl(state):
    """The map is an image: a WebGL figure only adds a copy of its canvas on every repaint (HoloViews' default
    is WebGL)."""
    from bokeh.document import Document
    from bokeh.models import Plot

    from app.views.map import MapView

    view = MapView(state)
    for colour in ("query", "louvain"):
        state.run_query("T cells") if colour == "query" else state.set_color(colour)
        figs = view.plot.get_root(Document()).select({"type": Plot})
        assert figs and {f.output_backend for f in figs} == {"canvas"}


def test_map_colour_bar_title_follows_an_in_place_recolouring(state):
    """Values with NaN are drawn over a grey layer of every cell with a colour bar in the figure (the layered
    map), whose title follows each in-place recolouring; the shaded map's colour bar is HTML beside it."""
    from bokeh.document import Document
    from bokeh.models import ColorBar

    from app import plots
    from app.views.map import MapView

    rng = np.random.default_rng(0)
    for name in ("first $$x$$ values", "second values"):
        v = rng.normal(size=state.n_cells)
        v[::7] = np.nan
        state.adata.obs[name] = v
    view = MapView(state)
    state.set_color("first $$x$$ values")
    assert view._active == "layered"
    root = view.plot.get_root(Document())  # rendered, as in a page: later colourings update these Bokeh models
    obj = view.plot.object

    def titles():
        return [m.title for m in root.select({"type": ColorBar})]

    assert titles() == [plots.no_tex("first $$x$$ values")], titles()
    state.set_color("second values")  # recoloured in place (same plot)
    assert view.plot.object is obj and titles() == ["second values"], titles()
    state.run_query("NK cells")  # no NaN: the shaded map, its colour bar beside it
    assert view._active == "shaded" and "score: NK cells" in view.legend.object


def test_new_category_names_recolour_with_the_kernels_already_compiled(monkeypatch):
    """Each new set of labels recoloured the map with a freshly compiled datashader kernel (a categorical
    column's names are part of the table's type): 0.6-2 s of CPU on the server's event loop per label set, for
    every session. Coded categories (app.plots.cell_map.coded_frame) keep one kernel per padded size, and the
    image is the one the named categories give."""
    import datashader as ds
    import datashader.transfer_functions as tf
    import pandas as pd
    import datashader.data_libraries.pandas as ds_pandas

    from app.plots import ColorSpec, category_key
    from app.plots.cell_map import _recoloured, cell_frame, coded_frame, padded_categories

    assert [padded_categories(n) for n in (0, 1, 8, 9, 200, 257, 600)] == [8, 8, 8, 16, 256, 512, 768]
    rng = np.random.default_rng(3)
    xy = rng.normal(size=(300, 2)).astype(np.float32)
    geometry = (90, 70, -3.0, 3.0, -2.5, 2.5)

    def recolour(names):
        spec = ColorSpec("categorical", pd.Categorical(rng.choice(names, 300), categories=names), name="label")
        df = cell_frame(xy, spec, cell_ids=[f"c{i}" for i in range(300)],
                        extra={"label": np.full(300, "–", dtype=object)})
        return df, _recoloured(df, spec, category_key(names), geometry)[0]

    # datashader compiles (and memoizes) one kernel per aggregation and table type: record the types it sees
    seen = []
    compile_components = ds_pandas.compile_components

    def recording(summary, schema, *args, **kw):
        if recording.on:
            seen.append((repr(summary), str(schema)))
        return compile_components(summary, schema, *args, **kw)

    monkeypatch.setattr(ds_pandas, "compile_components", recording)
    for names in (["B cell", "T cell", "NK cell"], ["monocyte", "<b>x</b>", "platelet", "🧫", "B cell"],
                  ["T cell", "B cell"], list("abcdefg")):
        recording.on = True
        df, image = recolour(names)
        recording.on = False
        assert len(set(seen)) == 1, seen  # one kernel for every set of up to 8 names
        cvs = ds.Canvas(plot_width=90, plot_height=70, x_range=(-3.0, 3.0), y_range=(-2.5, 2.5))
        named = tf.shade(cvs.points(df, "x", "y", agg=ds.count_cat("color")), color_key=category_key(names),
                         how="eq_hist", min_alpha=180, alpha=255, rescale_discrete_levels=True).values.copy()
        named[(named >> 24) == 0] = 0
        np.testing.assert_array_equal(image, named)
    # a new map or a zoom (HoloViews' datashade operation): the same kernel, the names under the pointer
    import holoviews as hv

    from app.plots.cell_map import _raster_subplot, cell_map

    seen.clear()
    for names in (["B cell", "T cell", "NK cell"], ["x", "<i>y</i>"]):
        spec = ColorSpec("categorical", pd.Categorical(rng.choice(names, 300), categories=names), name="label")
        frame = cell_frame(xy, spec, cell_ids=[f"c{i}" for i in range(300)],
                           extra={"label": np.full(300, "–", dtype=object)})
        recording.on = True
        plot = hv.renderer("bokeh").get_plot(cell_map(frame, spec, width=90, height=70, dynamic=False,
                                                      legend=False))
        recording.on = False
        layer = plot if hasattr(plot, "_hover_data") else _raster_subplot(plot)
        under = set(layer._hover_data["color"].values.ravel()) - {"-"}
        assert under and under <= set(names), under
    assert len(set(seen)) == 1, seen
    coded, names = coded_frame(df)
    assert names == list("abcdefg") and list(coded.columns) == ["x", "y", "color"]
    assert list(coded["color"].cat.categories) == [str(i) for i in range(8)]
    np.testing.assert_array_equal(coded["color"].cat.codes.to_numpy(), df["color"].cat.codes.to_numpy())


def test_map_same_frame_compares_values_and_categories():
    import pandas as pd

    from app.views.map import _same_frame

    a = pd.DataFrame({"x": np.arange(3, dtype=np.float32), "color": pd.Categorical(["a", "b", "a"])})
    assert _same_frame(a, a.copy()) and not _same_frame(None, a)
    b = a.copy()
    b["color"] = pd.Categorical(["a", "b", "b"])
    assert not _same_frame(a, b)  # one cell relabelled
    c = a.copy()
    c["color"] = pd.Categorical(["a", "b", "a"], categories=["a", "b", "c"])
    assert not _same_frame(a, c)  # same labels, other categories (another legend)
    assert not _same_frame(a, a.assign(x=a["x"] + 1)) and not _same_frame(a, a.assign(extra=1))
    nan = pd.DataFrame({"color": np.array([np.nan, 1.0], dtype=np.float32)})
    assert _same_frame(nan, nan.copy())  # NaN (uncoloured cells) in the same places count as equal


def test_map_legend_html_escapes_names_and_lists_present_categories():
    import pandas as pd

    from app import plots
    from app.plots.cell_map import legend_html, present_categories

    values = pd.Categorical(["<script>alert(1)</script>", "B & T", "B & T"], categories=["<script>alert(1)</script>",
                                                                                      "B & T", "absent"])
    spec = plots.ColorSpec("categorical", values, name="<b>labels</b>", colors=plots.category_colors(values.categories))
    out = legend_html(spec)
    assert present_categories(values) == ["<script>alert(1)</script>", "B & T"]
    assert "<script>" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out and "B &amp; T" in out
    assert "<b>labels</b>" not in out and "&lt;b&gt;labels&lt;/b&gt;" in out
    assert out.count('class="map-legend-entry"') == 2 and "absent" not in out  # only categories with cells
    assert legend_html(plots.ColorSpec("continuous", np.zeros(3, dtype=np.float32))) == ""
    many = pd.Categorical([f"type {i}" for i in range(30)])
    out = legend_html(plots.ColorSpec("categorical", many, name="t"), max_entries=10)
    assert out.count('class="map-legend-entry"') == 10 and "and 20 more" in out


# ---------------------------------------------------------------------- zero-shot, describe
def test_zero_shot_accept_and_evaluate(state):
    from app.label_sets import LABEL_SETS, label_names
    from app.state import ZERO_SHOT

    labels = label_names("Immune (coarse)")
    probs = state.run_zero_shot(labels, LABEL_SETS["Immune (coarse)"]["template"])
    assert probs.shape == (700, len(labels))
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert state.color_by == ZERO_SHOT and state.color_spec().kind == "categorical"
    key = state.accept_labels("coarse")
    assert list(state.adata.obs[key].cat.categories) == labels
    res = state.run_evaluate("bulk_labels")
    assert {"per_cell", "per_class", "confusion"} <= set(res)
    assert len(res["confusion"]["labels"]) == 10


def test_label_sets_are_valid():
    from app.label_sets import LABEL_SETS
    from engine.io.ontology import cell_ontology_table

    table = cell_ontology_table()
    for name, info in LABEL_SETS.items():
        labels = [lab for lab, _ in info["labels"]]
        assert len(labels) == len(set(labels)) >= 2, name
        assert info["template"] in engine.TEMPLATES or "{label}" in info["template"]
        for lab, cl in info["labels"]:
            if cl is not None:
                assert table.loc[cl, "label"] == lab, (name, lab, cl)


def test_describe_needs_a_selection(state):
    with pytest.raises(EmptySelectionError):
        state.run_describe()
    state.select_values(["CD19+ B"], column="bulk_labels")
    table = state.run_describe(libraries=["MSigDB_Hallmark_v7.5.1"], top_n=3)
    assert list(table.columns[:4]) == ["library", "term", "zscore", "logit"] and 0 < len(table) <= 3


# ---------------------------------------------------------------------- DE, enrichment, perturbation
def test_de_and_enrichment(state):
    with pytest.raises(QueryError):
        state.run_de(n=20)  # no query yet
    state.run_query("monocytes")
    table = state.run_de(n=30)
    assert {"gene", "logfoldchange", "pval_adj", "direction"} <= set(table.columns)
    assert table.attrs["n_used"] == 30
    state.select_box(-100, -100, 100, 100)
    table = state.run_de(fraction=0.1, within_selection=True)
    assert table.attrs["n_used"] == 70
    enr = state.run_enrich(n_genes=50)
    assert {"term", "library", "pval_adj", "genes"} <= set(enr.columns)
    assert enr.attrs["messages"]


def test_too_few_cells_for_de_is_a_message(state):
    state.run_query("monocytes")
    xy = state.coords()
    state.select_box(xy[0, 0], xy[0, 1], xy[0, 0], xy[0, 1])
    with pytest.raises(EmptySelectionError):
        state.run_de(n=3, within_selection=True)


def test_perturbation_and_scan(state):
    from app.state import PERTURB

    state.run_query("B cells")
    state.select_values(["CD19+ B"], column="bulk_labels")
    table = state.run_perturb(["CD74"], mode="delete", goal_label="B cell")
    n_sel = state.n_selected
    assert len(table) == n_sel
    assert {"cos_original_perturbed", "delta_logit", "goal_shift"} <= set(table.columns)
    assert state.color_by == PERTURB
    vals = state.perturb_values
    assert np.isfinite(vals).sum() == n_sel and np.isnan(vals[~state.selection_mask()]).all()
    scan = state.run_scan(max_cells=20, max_genes=5)
    assert len(scan) <= 5 and "mean_delta_logit" in scan.columns
    with pytest.raises(QueryError):
        state.run_perturb([])


# ---------------------------------------------------------------------- export, about
def test_save_h5ad_never_overwrites(state, tmp_path):
    import anndata as ad

    src = tmp_path / "input.h5ad"
    src.write_bytes(b"x")
    state.input_path = str(src)
    with pytest.raises(DataError, match="overwrite the input"):
        state.save_h5ad(src)
    state.run_query("B cells")
    state.keep_query("b_score")
    state.run_de(n=20)  # uns holds a DataFrame and None values
    out = state.save_h5ad(tmp_path / "annotated")
    assert out.name == "annotated.h5ad"
    back = ad.read_h5ad(out)
    assert "b_score" in back.obs and "transcriptome_embeds" in back.obsm
    with pytest.raises(DataError, match="already exists"):
        state.save_h5ad(out)
    assert state.h5ad_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


def test_map_png_and_model_info(state):
    png = state.map_png(width=300, height=200)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    state.run_query("T cells")
    assert state.map_png(width=300, height=200) != png
    info = state.model_info()
    assert info["name"] == "tiny" and info["projection_dim"] == 8
    assert info["transcriptome_tower"]["type"] and info["text_tower"]["type"] == "hf"


# ---------------------------------------------------------------------- plots
def test_plot_functions_are_pure_and_correct():
    import holoviews as hv

    from app import plots

    rng = np.random.default_rng(0)
    xy = rng.normal(size=(500, 2)).astype(np.float32)
    v = rng.normal(size=500).astype(np.float32)
    spec = plots.ColorSpec("diverging", v, name="s", clim=plots.symmetric_clim(v))
    df = plots.cell_frame(xy, spec, cell_ids=[f"c{i}" for i in range(500)])
    agg = plots.aggregate(df, spec, width=40, height=30)
    assert agg.shape == (30, 40)
    # reference: the mean of the values falling in the top-right pixel block equals datashader's
    cnt = plots.aggregate(df, plots.ColorSpec("none"), width=40, height=30)
    assert int(np.nansum(cnt.values)) == 500
    lo, hi = plots.symmetric_clim(np.array([-1.0, 0.0, 3.0]), center=1.0, quantile=1.0)
    assert (lo, hi) == (-1.0, 3.0)
    el = plots.cell_map(df, spec, dynamic=False, spread="none")
    assert isinstance(el, hv.Image) and el.data["color"].shape == (560, 640)
    coarse = plots.cell_map(df, spec, dynamic=False)  # few cells: aggregated at 1/3 resolution
    assert coarse.data["color"].shape == (186, 213)
    # datashader's per-pixel means, weighted by per-pixel counts, give back the mean of all values
    mean = plots.aggregate(df, spec, width=40, height=30).values
    np.testing.assert_allclose(np.nansum(mean * cnt.values) / cnt.values.sum(), v.mean(), rtol=1e-4)
    cat = plots.ColorSpec("categorical", pd.Categorical(rng.choice(["a", "b"], 500)), name="c")
    el = plots.cell_map(plots.cell_frame(xy, cat), cat, dynamic=False)
    assert isinstance(el, hv.Overlay)
    for obj in (el, plots.histogram(v, selected=v > 0), plots.category_bars(cat.values),
                plots.confusion_heatmap(["a", "b"], [[3, 1], [0, 4]])):
        hv.render(obj)
    png = plots.map_png(plots.cell_frame(xy, cat), cat, width=100, height=80)
    assert png[:4] == b"\x89PNG"


def test_typed_tex_reaches_bokeh_titles_as_plain_text(state):
    """A query, an obs column or a label holding TeX delimiters is shown as typed in the figures' titles and
    labels (BokehJS would typeset ``$$...$$``, ``\\(...\\)``, ``\\[...\\]`` there), and text panes never typeset
    math (their Bokeh models' ``disable_math``)."""
    import re

    import holoviews as hv
    from bokeh.models import ColorBar, Title

    from app import plots
    from app.views import panes
    from app.views.map import MapView

    tex = re.compile(r"\$\$|\\[()\[\]]")
    assert plots.no_tex("B cells (naive)") == "B cells (naive)"  # ordinary text unchanged
    shown = plots.no_tex("$$x^2$$ \\(y\\) \\[z\\]")
    assert not tex.search(shown) and shown.replace(plots.text.ZERO_WIDTH_SPACE, "") == "$$x^2$$ \\(y\\) \\[z\\]"

    view = MapView(state)
    state.run_query("$$x^2$$ \\(y\\)")
    hist = view.histogram.figure
    assert "x^2" in hist.title.text and not tex.search(hist.title.text), hist.title.text
    assert not tex.search(hist.xaxis.axis_label or "")
    fig = hv.render(view.plot.object)
    bars = [m for m in fig.references() if isinstance(m, ColorBar)]
    titles = [m.text for m in fig.references() if isinstance(m, Title)] + [b.title for b in bars]
    assert all(not tex.search(t or "") for t in titles), titles
    # a query's colour bar is HTML beside the map (the shaded map), in a text pane that never typesets math
    assert not bars and "score: $$x^2$$" in view.legend.object and view.legend.get_root().disable_math is True
    for pane in (panes.Markdown("$$x^2$$"), panes.Alert("\\(y\\)"), panes.HTML("$$z$$")):
        assert pane.get_root().disable_math is True
    v = np.random.default_rng(0).normal(size=50)
    for el in (plots.histogram(v, name="$$a$$", title="$$b$$"), plots.category_bars(pd.Categorical(["p", "q"]),
               name="\\(c\\)"), plots.confusion_heatmap(["a"], [[1]], title="$$d$$")):
        rendered = hv.render(el)
        labels = [m.text for m in rendered.references() if isinstance(m, Title)]
        labels += [a.axis_label for a in rendered.xaxis + rendered.yaxis]
        assert not any(tex.search(t or "") for t in labels), labels


# ---------------------------------------------------------------------- views: errors appear in the page
def test_job_shows_engine_errors_not_tracebacks(state):
    from app.views.query import QueryView

    view = QueryView(state)
    view.text.value_input = "   "
    asyncio.run(view._search())
    assert view.job.alert.visible and "The query is empty" in view.job.alert.object
    assert "Traceback" not in view.job.alert.object
    view.text.value_input = "natural killer cells"
    asyncio.run(view._search())
    assert not view.job.alert.visible and state.query == "natural killer cells"
    assert "Scored 700 cells" in view.timing.object


def test_error_inside_a_batched_update_leaves_the_page_live(state):
    """An engine error shown by Job.guard (an unknown gene) must not freeze the page's model registry: models
    added afterwards (a tab opened later, its buttons) are still known to the server, so their clicks arrive."""
    from bokeh.document import Document
    from bokeh.models import Button, Div
    from panel.io.state import set_curdoc

    from app.views.map import MapView

    doc = Document()
    doc.add_root(Div())
    with set_curdoc(doc):
        view = MapView(state)
        view.gene_input.value = "NOTAGENE1"
        assert view.job.alert.visible and "NOTAGENE1" in view.job.alert.object
        later = Button(label="Label cells")
        doc.add_root(later)
        assert doc.get_model_by_id(later.id) is later


def test_explorer_builds_and_waits_for_a_loading_model(demo):
    from app.layout import Explorer

    base, model = demo
    fut: Future = Future()
    ex = Explorer(base, fut, name="demo")  # model still loading: map only
    assert ex.state.model is None and len(ex.tabs) == 0 and ex.map.plot.object is not None
    fut.set_result(model)  # the done-callback attaches the model and builds the tools
    assert ex.state.model is model and ex.state.embeds_ready and len(ex.tabs) == 7
    ex.template()
    ex2 = Explorer(base, model, name="demo")
    assert len(ex2.tabs) == 7 and ex2.adata is not ex.adata


def test_a_served_page_is_built_with_one_model_recount_and_validates(demo):
    """``app.pages.one_recount``: the page's roots are added inside one freeze of the document's model
    registry, so Bokeh walks the model graph once (ten times before, 2026-12-03) and the registry holds the
    same models as a fresh walk. Served pages skip Bokeh's validation (``app.pages.no_document_validation``);
    here it runs: no errors, and no warnings but the empty holders of the tabs not opened yet."""
    from bokeh.core.validation import check_integrity
    from bokeh.document import Document

    from app.layout import Explorer

    base, model = demo
    ex = Explorer(base, model, name="demo")
    doc = Document()
    walks = []
    recompute = doc.models.recompute
    doc.models.recompute = lambda: (walks.append(1), recompute())[1]
    ex.template().server_doc(doc)
    assert len(walks) == 1
    ids = {m.id for m in doc.models}
    recompute()
    assert ids == {m.id for m in doc.models} and len(ids) > 100
    issues = check_integrity(list(doc.models))
    assert issues.error == []
    assert {w.name for w in issues.warning} <= {"EMPTY_LAYOUT"}
    assert len(issues.warning) == len(ex.tabs) - 1  # every tab but the open one: an empty holder


# ---------------------------------------------------------------------- command line
def test_cli_options_reach_pn_serve():
    import run_app

    args = run_app.parse_args(["--data", "x.h5ad", "--host", "0.0.0.0", "--port", "7000", "--no-show",
                               "--basic-auth", "secret", "--allow-websocket-origin", "lab.org:7000"])
    kw = run_app.serve_kwargs(args)
    assert kw["address"] == "0.0.0.0" and kw["port"] == 7000 and kw["show"] is False
    assert kw["websocket_origin"] == ["lab.org:7000"] and kw["cookie_secret"]
    assert kw["auth_provider"].credentials == "secret" and "basic_auth" not in kw  # app.auth's provider
    assert "user" in kw["exclude_cookies"] and "Cookie" in kw["exclude_headers"]
    args = run_app.parse_args(["--oauth-provider", "github", "--oauth-key", "k", "--oauth-secret", "s",
                               "--cookie-secret", "c", "--oauth-extra-params", '{"scope": "user"}'])
    kw = run_app.serve_kwargs(args)
    assert (kw["oauth_provider"], kw["oauth_key"], kw["oauth_secret"], kw["cookie_secret"]) == ("github", "k", "s", "c")
    assert kw["oauth_extra_params"] == {"scope": "user"} and "basic_auth" not in kw and "auth_provider" not in kw
    assert run_app.serve_kwargs(run_app.parse_args([]))["address"] == "localhost"


def test_long_work_can_be_cancelled(state):
    from app.views.common import plain
    from app.views.perturb import PerturbView
    from engine.errors import CancelledError

    with pytest.raises(CancelledError):
        state.compute_scan(max_cells=20, max_genes=5, cancel=lambda: True)
    view = PerturbView(state)
    view.scan_job._cancel.set()
    view.scan_job.cancel_requested = lambda: True  # as if the Cancel button had been pressed
    asyncio.run(view._scan())
    assert view.scan_job.alert.visible and view.scan_job.alert.object == plain("Cancelled.")
    assert state.scan_table is None


def test_build_app_serves_shared_data_to_each_session(demo):
    import panel as pn

    from app import cache
    from app.layout import build_app

    base, model = demo
    cache.put_dataset("shared-demo", base)
    cache.put_model("shared-tiny", model)
    try:
        page = build_app("shared-demo", "shared-tiny", name="demo")
        assert isinstance(page, pn.template.VanillaTemplate)
        assert cache.get_dataset("shared-demo") is base and cache.get_model("shared-tiny") is model
    finally:
        cache.clear()


def test_zero_shot_smoothing_is_shared_and_optional(demo):
    """Smoothed embeddings are computed once on the shared dataset; each session chooses smoothed or not."""
    from app import cache
    from app.state import AppState

    base, model = demo
    a = AppState(cache.session_adata(base), model)
    a.attach_embeddings(base)
    assert a.zs_smooth is True
    smooth = a.run_zero_shot(["B cell", "T cell", "monocyte"])
    assert cache.SMOOTH_KEY in base.obsm and np.shares_memory(a.adata.obsm[cache.SMOOTH_KEY], base.obsm[cache.SMOOTH_KEY])
    b = AppState(cache.session_adata(base), model)
    b.attach_embeddings(base)
    plain = b.run_zero_shot(["B cell", "T cell", "monocyte"], smooth=False)
    assert b.zs_smooth is False and not np.allclose(plain.to_numpy(), smooth.to_numpy())
    direct = engine.zero_shot(base.copy(), model, ["B cell", "T cell", "monocyte"], write=False)
    np.testing.assert_allclose(plain.to_numpy(), direct.to_numpy(), rtol=1e-5)  # unsmoothed = the seed's protocol
    key = a.accept_labels("smoothed_labels")
    assert a.adata.uns[key]["obsm_key"] == cache.SMOOTH_KEY
    res = a.run_evaluate("bulk_labels")
    assert res["refined"]["smooth"] is True and res["per_cell"] == b.run_evaluate("bulk_labels", smooth=False)["per_cell"]


def test_building_the_page_emits_no_deprecation_warnings(demo, tmp_path):
    """Building and rendering a session's page (every tab) warns about nothing deprecated in Panel, Bokeh,
    HoloViews or param: a user starting the app sees no such warning (e.g. ``button_type``, ``Widget.name``)."""
    import warnings
    from pathlib import Path

    import panel as pn
    from bokeh.document import Document

    import app
    from app.layout import Explorer

    base, model = demo
    app_dir = str(Path(app.__file__).parent)
    libs = ("panel", "bokeh", "holoviews", "param", "datashader")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = Explorer(base, model, name="demo", save_dir=str(tmp_path))
        ex.template()
        for view in (ex.query, ex.zero_shot, ex.describe, ex.de, ex.perturb, ex.export, ex.about):
            pn.panel(view).get_root(Document())
        pn.panel(ex).get_root(Document())
    bad = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
           if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
           and (w.filename.startswith(app_dir) or any(f"/{lib}/" in w.filename for lib in libs)
                or any(lib in str(w.message).lower() for lib in libs))]
    assert bad == [], "\n".join(bad)


# ---------------------------------------------------------------------- serving a backed atlas (run_app.py --backed)
@pytest.fixture
def backed_atlas(tmp_path, tiny_model):
    """A 2,000-cell .h5ad on disk, its embeddings precomputed into a store (as python -m engine.embed does)."""
    import anndata as ad
    from conftest import GENES, make_counts

    n = 2000
    obs = pd.DataFrame({"group": pd.Categorical(["B"] * (n // 2) + ["T"] * (n // 2))},
                       index=[f"cell{i}" for i in range(n)])
    mem = ad.AnnData(X=make_counts(n), obs=obs, var=pd.DataFrame(index=GENES))
    path, store = tmp_path / "atlas.h5ad", tmp_path / "atlas.embeds.zarr"
    mem.write_h5ad(path)
    engine.embed_cells(engine.read(path, backed=True), tiny_model, store=str(store), progress=False)
    return path, store, mem


def test_backed_atlas_is_served_without_loading_x(backed_atlas, tiny_model, tmp_path, monkeypatch):
    """run_app.py --backed: one shared backed dataset with precomputed embeddings; a query, zero-shot, gene
    colouring (equal to the in-memory values), DE on a selection, kept columns per session; saving refused;
    the matrix is never read whole."""
    from anndata._core.sparse_dataset import BaseCompressedSparseDataset

    from app import cache
    from app.layout import Explorer
    from app.state import GENE, QUERY
    from app.views.map import MapView

    path, store, mem = backed_atlas

    def whole(self, *a, **k):
        raise AssertionError("the backed matrix was read whole")

    monkeypatch.setattr(BaseCompressedSparseDataset, "to_memory", whole)
    cache.put_model("tiny-backed-model", tiny_model)
    base = cache.dataset_future(str(path), backed=True, embeddings=str(store), model="tiny-backed-model").result()
    assert base.isbacked and "X_umap" in base.obsm and cache.has_embeddings(base, tiny_model)
    ex = Explorer(base, tiny_model, name="atlas", save_dir=str(tmp_path / "exports"))
    st = ex.state
    assert st.backed and st.embeds_ready and engine.is_backed(st.adata)  # the session shares the on-disk matrix
    st.run_query("B cells")
    assert st.color_by == QUERY and st.map_frame()[0]["color"].notna().all()
    probs = st.run_zero_shot(["B cell", "T cell"])
    assert probs.shape == (2000, 2)
    asyncio.run(MapView(st).load_gene("cd3d"))  # the gene box of a backed page reads off the event loop
    assert st.gene == "CD3D" and st.color_by == GENE
    np.testing.assert_array_equal(st.color_spec().values, mem.X[:, mem.var_names.get_loc("CD3D")].toarray().ravel())
    st.param.update(selection=np.arange(0, 2000, 3))
    de = st.run_de(n=50, within_selection=True)
    mask = st.selection_mask()
    expected = engine.de_top_vs_bottom(mem, np.asarray(st.scores, dtype=np.float64), within=mask, n=50)
    assert list(de["gene"][:10]) == list(expected["gene"][:10])
    key = st.keep_query("kept_b")
    st.accept_labels("labels_b")
    assert key in st.adata.obs and key not in base.obs and "labels_b" not in base.obs
    with pytest.raises(DataError, match="backed"):
        st.save_h5ad("atlas_out")
    assert not list((tmp_path / "exports").glob("*.h5ad"))
    assert base.isbacked and engine.is_backed(st.adata)


def test_backed_atlas_without_embeddings_says_what_to_run(backed_atlas, tiny_model):
    import run_app
    from app import cache

    path, _, _ = backed_atlas
    cache.put_model("tiny-backed-model", tiny_model)
    with pytest.raises(LexicellError, match="python -m engine.embed"):
        cache.open_backed(str(path), None, "tiny-backed-model")
    args = run_app.parse_args([str(path), "--backed"])
    assert args.data == str(path) and "python -m engine.embed" in run_app.check_backed(args)
    with pytest.raises(SystemExit):
        run_app.parse_args([str(path), "--embeddings", "x.zarr"])  # --embeddings needs --backed


def test_lazy_recount_registers_every_new_model_and_skips_idle_walks():
    """A served page's model registry (app.views.docmodels.lazy_recount) must know every model Bokeh would
    know, while skipping the walk over all models after blocks that changed nothing in the model graph."""
    from bokeh.document import Document
    from bokeh.models import Button, Column, Div

    from app.views.docmodels import lazy_recount

    doc = Document()
    col = Column(children=[Div(text="a")])
    doc.add_root(col)
    assert lazy_recount(doc) and not lazy_recount(doc)  # once per document
    walks = []
    original = type(doc.models).recompute
    doc.models.recompute = lambda: (walks.append(1), original(doc.models))
    with doc.models.freeze():  # text only: nothing to recount
        col.children[0].text = "b"
    assert walks == []
    with doc.models.freeze():  # a new child, nested freezes inside: one walk, and the model is known
        with doc.models.freeze():
            new = Button(label="Run DE")
            col.children = [*col.children, new]
    assert len(walks) == 1 and doc.get_model_by_id(new.id) is new
    with doc.models.freeze():  # a new root is registered too
        root = Div(text="root")
        doc.add_root(root)
    assert doc.get_model_by_id(root.id) is root
    gone = col.children[0]
    col.children = [new]  # outside any block: walked at once, as Bokeh does
    assert doc.get_model_by_id(gone.id) is None and doc.get_model_by_id(new.id) is new

    def session(event):  # Bokeh's server session listens to its document like this
        pass

    doc.on_change(session)
    with doc.models.freeze():  # a session that ended mid-update: its destroyed document is not recounted
        doc.destroy(session)


def test_tool_views_are_built_when_their_tab_first_opens(demo):
    """A served page that only queries never builds the zero-shot, DE, perturbation and export views."""
    from app.layout import TOOL_TABS, Explorer

    base, model = demo
    ex = Explorer(base, model, name="demo")
    assert ex._views == {} and [t for t, _ in TOOL_TABS] == ex.tabs._names[1:]
    assert all(callable(c) for c in ex.tabs.contents[1:]) and ex.tabs[1].objects == []
    ex.tabs.active = 3  # DE + enrichment
    shown = ex.tabs[3].objects
    assert list(ex._views) == ["de"] and len(shown) == 1 and ex.tabs.contents[3] is ex.de
    ex.tabs.active = 0
    ex.tabs.active = 3  # opened again: the same view, not rebuilt
    assert ex.tabs[3].objects[0] is shown[0] and list(ex._views) == ["de"]
    assert ex.zero_shot is ex.zero_shot and set(ex._views) == {"de", "zero_shot"}  # attribute access builds too
    assert ex.tabs[1].objects == []  # but renders nothing until opened
    assert {j for j in ex.jobs()} >= {ex.de.job, ex.zero_shot.job}


def test_release_memory_within_its_interval_is_done_once_the_interval_ends():
    """Sessions closing together: the first closes releases at once, the later ones get one release when the
    interval ends (none is dropped), and never more than one is pending."""
    import time

    from app import layout

    pending = layout._release_timer[0]
    if pending is not None:  # one left by an earlier test's closed sessions
        pending.join(10)
    layout._last_release[0] = first = time.monotonic()  # as if a session had just been released
    layout.release_memory(min_interval=1.0)  # within the interval: scheduled, not dropped
    timer = layout._release_timer[0]
    assert timer is not None and layout._last_release[0] == first
    layout.release_memory(min_interval=1.0)
    assert layout._release_timer[0] is timer  # one pending release, not two
    timer.join(10)
    assert layout._release_timer[0] is None and layout._last_release[0] >= first + 1.0


def test_job_of_a_closed_session_changes_nothing(demo):
    """A computation that ends after its session closed is dropped: no apply, no page update."""
    import asyncio
    import time as _time

    from app.views.common import Job

    job = Job()
    applied = []

    async def main():
        task = asyncio.ensure_future(job.run(lambda: _time.sleep(0.8) or 42, applied.append, label="Slow"))
        await asyncio.sleep(0.5)  # the progress bar is showing
        assert job.showing
        job.close()
        return await task

    assert asyncio.run(main()) is False
    assert applied == [] and job._cancel.is_set() and not job.running


def test_text_panes_keep_their_style_sheets_on_update():
    """app.views.panes: a text update sends the text, not new style-sheet models (which cost a page-wide walk)."""
    import panel as pn
    from bokeh.document import Document

    from app.views import panes

    for cls in (panes.HTML, panes.Markdown, panes.Alert):
        pane = cls("first")
        model = pane.get_root(Document())
        sheets = list(model.stylesheets)
        pane.object = "<b>second</b>" if cls is panes.HTML else "second"
        assert "second" in model.text and list(model.stylesheets) == sheets
        assert type(pn.panel("plain text")) is pn.pane.Markdown  # never chosen by pn.panel


def test_job_disables_widgets_and_shows_progress_only_for_slow_work():
    import time

    import panel as pn

    from app.views.common import Job

    job = Job(quick=True)
    button = pn.widgets.Button(label="Run")
    seen = []

    def watch(event):
        seen.append(event.new)

    button.param.watch(watch, "disabled")
    # quick work (under Job.SHOW_AFTER): nothing on the page changes but the result
    assert asyncio.run(job.run(lambda: 1, lambda r: None, disable=[button]))
    assert seen == [] and not job.showing and not button.disabled
    # slow work: the button is disabled and the bar shown while it runs, both undone afterwards

    def slow():
        time.sleep(Job.SHOW_AFTER + 0.3)
        return 2

    def apply(result):
        assert button.disabled and job.showing  # still running when the result is applied
        # the bar stands still (an animated one costs a browser without a GPU ~13 % of a core per page);
        # the label's elapsed seconds show the work goes on
        assert not job.progress.active and re.search(r"… \d+ s$", job.label.object)
        seen.append(("applied", result))

    assert asyncio.run(job.run(slow, apply, disable=[button]))
    assert seen == [True, ("applied", 2), False] and not job.showing and not button.disabled
    # a failing slow job re-enables the button too and shows the error
    seen.clear()

    def fail():
        time.sleep(Job.SHOW_AFTER + 0.3)
        raise ValueError("boom")

    assert not asyncio.run(job.run(fail, lambda r: None, disable=[button]))
    assert seen == [True, False] and not button.disabled and "boom" in job.alert.object


def test_category_bars_update_in_place():
    import pandas as pd

    from app import plots

    bars = plots.CategoryBars(max_bars=3)
    fig, source = bars.figure, bars.source
    long = "a very long category name that is shortened on the axis"
    values = pd.Categorical(["T"] * 5 + ["B"] * 3 + [long + " 1"] * 2 + [long + " 2"] * 2 + ["NK"],
                            categories=["T", "B", long + " 1", long + " 2", "NK", "absent"])
    colours = plots.category_colors(values.categories)
    bars.update(values, name="cell type", colors=colours)
    # largest on top (Bokeh draws factors bottom-up), at most max_bars, unique labels for equal short names
    assert source.data["category"][-1] == "T" and len(source.data["category"]) == 3
    assert list(fig.y_range.factors) == source.data["label"] and len(set(source.data["label"])) == 3
    assert source.data["colour"][-1] == colours["T"] and not bars._selected.visible
    assert fig.title.text == "cell type"
    counts = plots.category_counts(values, max_bars=10)
    assert counts["label"].is_unique and "absent" not in set(counts["category"])
    assert counts.loc[counts["category"] == long + " 2", "label"].iloc[0].endswith("(2)")
    # a selection: the same figure and renderers, selected counts drawn in orange over grey
    sel = np.zeros(len(values), dtype=bool)
    sel[:2] = True
    bars.update(values, selected=sel, name="cell type", colors=colours)
    assert bars.figure is fig and bars.source is source and bars._selected.visible
    assert source.data["selected"][-1] == 2 and set(source.data["colour"]) == {"#d9dde3"}
    assert fig.title.text == "cell type: selected"
    bars.update(pd.Categorical([]), name="empty")  # nothing to count: an empty chart, no error
    assert len(source.data["label"]) == 0 and list(fig.y_range.factors) == []


def test_tables_get_fixed_column_widths_and_widen_for_longer_text():
    """Read-only tables are sized from their text (Tabulator would measure every cell after each update);
    new rows keep the widths unless a text is longer; fit_columns tables share the table's width."""
    import panel as pn

    from app.views.common import column_widths, display_table, set_table, show_table, table_widget

    table = pd.DataFrame({"gene": ["CD79A", "MS4A1"], "logfoldchange": [10.67, -5.603], "cells": [197, 34],
                          "pval": [3.3e-38, 0.2]})
    shown_widths = column_widths(table)
    assert set(shown_widths) == {"gene", "logfoldchange", "cells", "pval"}
    assert all(40 <= w <= 600 for w in shown_widths.values())
    assert shown_widths["logfoldchange"] >= 8 * len("logfoldchange")  # the header fits
    assert column_widths(pd.DataFrame({"term": ["x" * 500]}))["term"] == 600  # capped; the tooltip shows it all
    assert column_widths(pd.DataFrame()) == {}

    holder = pn.Column()
    widget = show_table(holder, table, height=400, page_size=12)
    assert widget.widths == column_widths(*display_table(table))
    assert widget._configuration["renderVertical"] == "basic"  # (Panel keeps the constructor's configuration there)
    before = dict(widget.widths)
    set_table(widget, table.assign(gene=["A", "B"]))  # shorter text: the widths stay
    assert widget.widths == before and list(widget.value["gene"]) == ["A", "B"]
    set_table(widget, table.assign(gene=["A-VERY-LONG-GENE-NAME", "B"]))
    assert widget.widths["gene"] > before["gene"]
    assert {c: w for c, w in widget.widths.items() if c != "gene"} == {c: w for c, w in before.items() if c != "gene"}

    shared = table_widget(layout="fit_columns")
    set_table(shared, table)
    assert not shared.widths and len(shared.value) == 2

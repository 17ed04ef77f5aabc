"""Assemble the dashboard: :class:`Explorer` (one per session or notebook cell) and :func:`build_app`."""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref
from concurrent.futures import Future

import holoviews as hv
import panel as pn
import param

from engine.errors import CancelledError, LexicellError

from . import cache, files
from .messages import combine_patch_messages
from .browser_fixes import tabulator_stylesheet_fix
from .pages import mathjax_only_for_math, no_document_validation, one_recount
from .state import AppState
from .views.analysis import DEView, DescribeView
from .views.common import batched, plain
from .views import panes
from .views.docmodels import lazy_recount
from .views.export import AboutView, ExportView
from .views.map import MapView
from .views.perturb import PerturbView
from .views.query import QueryView
from .views.tabs import LazyTabs
from .views.zero_shot import ZeroShotView

__all__ = ["Explorer", "build_app", "ensure_extensions", "SESSIONS", "release_memory"]

log = logging.getLogger(__name__)

TITLE = "Lexicell"
ACCENT = "#2f5d9b"
CSS = """
.selection-count-text { font-size: 14px; }
.job-label p { margin: 0; font-size: 13px; color: #555; }
"""


def ensure_extensions() -> None:
    """Load Panel's Tabulator and HoloViews' Bokeh extensions (per session, or per notebook cell).

    In a served session HoloViews' extension is loaded once per process: its backend is process-wide, and
    loading it again for every page cost each page load 17 ms or more (it resets the log level of every logger).
    A notebook loads it every time (its output carries the JavaScript the notebook needs). Pages get Bokeh's
    MathJax bundle only when a pane may typeset math (:func:`app.pages.mathjax_only_for_math`); served pages get one
    websocket message per server callback (:func:`app.messages.combine_patch_messages`), and Bokeh does not
    validate each new page (:func:`app.pages.no_document_validation`).
    """
    mathjax_only_for_math()
    pn.extension("tabulator", raw_css=[CSS], notifications=False)
    doc = pn.state.curdoc
    served = doc is not None and getattr(doc, "session_context", None) is not None
    if served:
        combine_patch_messages()
        no_document_validation()
    if served and hv.Store.current_backend == "bokeh" and "bokeh" in hv.Store.renderers:
        return
    hv.extension("bokeh", logo=False)


class EmbeddingStatus(pn.viewable.Viewer):
    """Top-of-page progress of loading the model and embedding the cells (shared by all sessions).

    The map shows the dataset's existing layout meanwhile; queries and labels become available when done.
    """

    def __init__(self, explorer: "Explorer"):
        super().__init__()
        self.explorer = explorer
        self.job: cache.EmbeddingJob | None = None
        self.alert = panes.Alert("", alert_type="info", visible=False, margin=(0, 5), sizing_mode="stretch_width")
        self.progress = pn.indicators.Progress(value=-1, max=100, visible=False, width=300, bar_color="info",
                                               margin=(0, 10))
        self.cancel = pn.widgets.Button(label="Cancel embedding", color="warning", visible=False, width=150)
        self.retry = pn.widgets.Button(label="Compute embeddings", color="primary", visible=False, width=170)
        self.cancel.on_click(lambda event: self.job and self.job.cancel())
        self.retry.on_click(lambda event: self.start())
        self._layout = pn.Column(self.alert, pn.Row(self.progress, self.cancel, self.retry), margin=0,
                                 sizing_mode="stretch_width")

    def __panel__(self):
        return self._layout

    def start(self) -> None:
        """Wait for the model (if loading), then for the embeddings, without blocking the event loop."""
        ex = self.explorer
        if ex.state.model is not None:
            try:
                self.job = cache.embedding_job(ex.base, ex.state.model)
            except LexicellError as err:  # e.g. a backed atlas without precomputed embeddings
                self.job = None
                self._fail(err, "The embeddings are missing.")
                return
            if self.job is None:
                ex.state.attach_embeddings(ex.base)
                ex.state.notify_data_warnings()
                return
        self.retry.visible = False
        self.progress.param.update(visible=True, value=-1, active=True)
        self._say()
        if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
            pn.state.onload(self.wait)
            return
        try:  # notebook: schedule on the kernel's running loop
            asyncio.get_running_loop().create_task(self.wait())
        except RuntimeError:  # plain Python (scripts, tests): no event loop to wait on
            if ex.state.model is None:
                ex.model_future.add_done_callback(lambda fut: fut.exception() is None and self._model_loaded())
                return
            if self.job is not None:
                self.job.future.exception()  # wait
            self._finish()

    def _model_loaded(self) -> None:
        ex = self.explorer
        ex.set_model(ex.model_future.result())
        self.job = cache.embedding_job(ex.base, ex.state.model)
        if self.job is not None:
            self.job.future.exception()
        self._finish()

    def _say(self) -> None:
        st = self.explorer.state
        if st.model is None:
            text = ("Loading the model… The map shows the dataset's own layout meanwhile; a query typed now is "
                    "scored once the cells are embedded.")
        else:
            job = self.job
            detail = f": {job.stage} ({job.batches_done}/{job.n_batches} batches)" if job is not None else ""
            text = (f"Embedding {st.n_cells:,} cells with model **{plain(st.model.name)}**{plain(detail)}. The map shows the "
                    "existing layout meanwhile; a query typed now is scored when this is done.")
        self.alert.param.update(object=text, alert_type="info", visible=True)

    async def wait(self) -> None:
        ex = self.explorer
        if ex.state.model is None:
            try:
                model = await asyncio.wrap_future(ex.model_future)
            except Exception as err:  # noqa: BLE001
                self._fail(err, "Loading the model failed.")
                return
            try:
                ex.set_model(model)
                self.job = cache.embedding_job(ex.base, model)
            except Exception as err:  # noqa: BLE001
                self._fail(err, "Starting the analysis failed.")
                return
        if self.job is not None:
            self.cancel.visible = True
            self._say()
            while not self.job.future.done():
                await asyncio.sleep(0.4)
                self.progress.param.update(value=int(100 * self.job.fraction))
                self._say()
        self._finish()

    def _fail(self, err: BaseException, what: str) -> None:
        self.progress.visible = False
        self.cancel.visible = False
        if isinstance(err, CancelledError):
            self.alert.param.update(object="Embedding was cancelled; queries need embeddings.", alert_type="warning",
                                    visible=True)
            self.retry.visible = self.explorer.state.model is not None and not self.explorer.state.backed
            return
        msg = str(err) if isinstance(err, LexicellError) else f"Unexpected error ({type(err).__name__}): {err}"
        if not isinstance(err, LexicellError):
            log.error("%s", what, exc_info=err)
        self.alert.param.update(object=f"{plain(what)} {plain(msg)}", alert_type="danger", visible=True)
        self.retry.visible = self.explorer.state.model is not None and not self.explorer.state.backed

    def _finish(self) -> None:
        st = self.explorer.state
        err = self.job.future.exception() if self.job is not None else None
        if err is not None:
            self._fail(err, "Embedding failed.")
            return
        self.progress.visible = False
        self.cancel.visible = False
        # typed meanwhile: scored on the next tick (QueryView); the page escapes every message (Explorer._on_message)
        pending = self.explorer.query.pending
        st.attach_embeddings(self.explorer.base)
        log.debug("state %x embeddings attached: ready=%s, model=%s, obsm=%s, base obsm=%s", id(st), st.embeds_ready,
                  st.model is not None, list(st.adata.obsm.keys()), list(self.explorer.base.obsm.keys()))
        self.alert.param.update(object="", visible=False)
        notes = st.data_warnings()
        if notes:  # e.g. mouse genes read through human orthologs, repeated gene names summed
            st.notify(f"Embeddings ready for {st.n_cells:,} cells. Note: " + " ".join(notes), "warning")
        else:
            st.notify(f"Model loaded and embeddings ready for {st.n_cells:,} cells: "
                      + (f"scoring “{pending.strip()[:80]}”." if pending else "type a query."), "success")


class Explorer(pn.viewable.Viewer):
    """The Lexicell dashboard for one dataset and model.

    In Jupyter, ``Explorer(adata, model)`` displays the dashboard in the cell; results of the session (kept
    scores, accepted labels) are in ``explorer.adata``. Served, one Explorer is built per browser session
    (:func:`build_app`), sharing the dataset's matrices and embeddings but not its ``obs``.

    Parameters
    ----------
    adata
        The dataset (treated as read-only; embeddings are added to it if missing).
    model
        A transcriptome-text model (:func:`engine.load_model`), or a ``concurrent.futures.Future`` of one (the
        map is shown while it loads).
    name
        Dataset name shown in the page.
    input_path
        File the dataset came from; the export refuses to overwrite it.
    save_dir
        Served mode: the only folder the page writes to; the browser chooses file names only
        (:mod:`app.files`). None (Jupyter): Save writes where the path typed says.
    max_download_mb
        Largest .h5ad sent to the browser through the page; larger files stay in ``save_dir``.
    """

    def __init__(self, adata, model, *, name: str | None = None, input_path: str | None = None,
                 save_dir: str | None = None, max_download_mb: float = 200, **params):
        super().__init__(**params)
        ensure_extensions()
        self.base = adata
        if isinstance(model, Future):
            self.model_future = model
            model = model.result() if model.done() and model.exception() is None else None
        else:
            self.model_future = None
        self.state = AppState(cache.session_adata(adata), model, dataset_name=name or "dataset",
                              input_path=input_path, save_dir=None if save_dir is None else str(save_dir),
                              max_download_bytes=int(max_download_mb * 2**20))
        self.map = MapView(self.state)
        self.query = QueryView(self.state)
        self.message = panes.Alert("", visible=False, margin=(0, 5), sizing_mode="stretch_width")
        self.state.param.watch(self._on_message, ["message", "message_kind"])
        self.info = panes.Markdown("", margin=(0, 10))
        self.tabs = LazyTabs(sizing_mode="stretch_width")  # a tab is rendered when first opened, then kept
        self.status = EmbeddingStatus(self)
        self.tools_placeholder = panes.Markdown("*The analysis tools appear when the model is loaded.*")
        self._tools_built = False
        self._views: dict = {}  # tool views built so far (see _view)
        self._closed = False
        #: the served page's Bokeh document (a weak reference, call it; None in Jupyter and plain Python)
        self.document = lambda: None
        if model is not None:
            self.set_model(model)
        if not self.state.embeds_ready or not cache.layout_keys(self.base):
            self.status.start()
        else:
            self.state.notify_data_warnings()

    @property
    def adata(self):
        """This session's annotated dataset."""
        return self.state.adata

    def set_model(self, model) -> None:
        """Attach the (loaded) model and build the analysis tabs."""
        st = self.state
        st.set_model(model)
        self._update_info()
        if self._tools_built:
            return
        self._tools_built = True
        # each tool's view is built when its tab is first opened (or its attribute first read): a served page
        # that only queries never builds the zero-shot, DE, perturbation and export views (about a quarter
        # of the server's time for a page load)
        self.tabs.set_items([("Query", self.query)] + [
            (title, (lambda name=name: self._view(name))) for title, name in TOOL_TABS])
        self.tools_placeholder.visible = False

    def _view(self, name: str):
        """The tool view ``name`` (a key of :data:`TOOL_VIEWS`), built on first use."""
        view = self._views.get(name)
        if view is None:
            if not self._tools_built:
                raise AttributeError(f"{name}: the analysis tools appear when the model is loaded")
            view = self._views[name] = TOOL_VIEWS[name](self.state)
        return view

    zero_shot = property(lambda self: self._view("zero_shot"), doc="The zero-shot labels tab.")
    describe = property(lambda self: self._view("describe"), doc="The describe-selection tab.")
    de = property(lambda self: self._view("de"), doc="The DE + enrichment tab.")
    perturb = property(lambda self: self._view("perturb"), doc="The perturbation tab.")
    export = property(lambda self: self._view("export"), doc="The save / export tab.")
    about = property(lambda self: self._view("about"), doc="The about tab.")

    def jobs(self) -> list:
        """Every :class:`~app.views.common.Job` of this page's views."""
        from .views.common import Job

        views = [self.map, self.query, *self._views.values()]  # tool views not built yet have no jobs
        return [j for v in views if v is not None for j in vars(v).values() if isinstance(j, Job)]

    def close(self) -> None:
        """Free what this session holds once its browser tab is gone (served: called when the session ends).

        Running jobs are asked to stop, the download folder (Jupyter) is removed, and the session's results
        (history, scores, tables, its ``obs``/``obsm`` copy) are dropped without triggering the views, so
        their memory is released at once instead of whenever Python's cycle collector next runs.
        """
        if self._closed:
            return
        self._closed = True
        for job in self.jobs():
            job.close()
        st = self.state
        st.close()
        with param.parameterized.discard_events(st):
            st.param.update(history=[], scores=None, selection=None, selection_geometry=None, zs_probs=None,
                            evaluation=None, description=None, de_table=None, enrich_table=None,
                            perturb_table=None, perturb_values=None, scan_table=None, adata=None)
        self.map.close()
        self.base = None
        self.model_future = None

    def _update_info(self) -> None:
        st = self.state
        model = (f"model **{plain(st.model.name)}** ({st.model.projection_dim}-d)" if st.model is not None
                 else "model loading…")
        self.info.object = f"**{plain(st.dataset_name)}**: {st.n_cells:,} cells × {st.adata.n_vars:,} genes  \n{model}"

    def _on_message(self, *_):
        st = self.state
        with batched():
            self.message.param.update(object=plain(st.message), alert_type=st.message_kind, visible=bool(st.message))

    def sidebar(self) -> list:
        self._update_info()
        return [
            self.info,
            self.map.controls(),
            panes.Markdown(
                "**Map tools**: pan, wheel zoom, *box select* and *lasso select* in the toolbar above the map; hover "
                "shows the cell under the pointer. The selection feeds Describe, DE and Perturbation.",
                styles={"font-size": "12px"}),
        ]

    def main(self) -> list:
        return [pn.Column(self.status, self.message, self.query.bar(), self.map, tabulator_stylesheet_fix(),
                          sizing_mode="stretch_width"),
                pn.Column(self.tools_placeholder, self.tabs, sizing_mode="stretch_width")]

    def __panel__(self):
        side = pn.Column(*self.sidebar(), width=300, margin=(0, 10))
        return pn.Column(
            panes.HTML(f'<h2 style="margin:4px 0;color:{ACCENT}">{TITLE}: explore cells in plain language</h2>'),
            pn.Row(side, pn.Column(*self.main(), sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            sizing_mode="stretch_width")

    def template(self) -> pn.template.VanillaTemplate:
        """The full-page app (for serving)."""
        return _template(self.sidebar(), self.main())


def _template(sidebar: list, main: list) -> pn.template.VanillaTemplate:
    return one_recount(_page_template(sidebar, main))


def _page_template(sidebar: list, main: list) -> pn.template.VanillaTemplate:
    """The served page: Panel's plain-HTML template. Panel's ``FastListTemplate`` (used until 2026-12-03) loads
    FAST web components (an 888-KB bundle) and their design tokens into every page; without them a page load
    costs the browser about 0.1 s and each query cycle about 15 % less main-thread time
    (``docs/serving-performance.md``)."""
    page = pn.template.VanillaTemplate(
        title=f"{TITLE}: explore cells in plain language", sidebar=sidebar, main=main, header_background=ACCENT,
        sidebar_width=320,
        # no page-wide busy spinner: it toggled with every server callback, and each toggle re-laid out the whole
        # page in the browser; each job shows its own progress bar instead (app.views.common.Job)
        busy_indicator=None)
    page.config.raw_css.append(PAGE_FONT_CSS)
    # Panel's template links Google's Lato stylesheet into every page. Lexicell pages load nothing from outside
    # the server: a lab's browsers do not tell Google who opens the app, and a network that drops outside
    # traffic does not hold the page's first paint until that request times out. (An instance attribute: the
    # class, which names the template's bundled files, stays Panel's.)
    page._resources = {rt: {k: v for k, v in res.items() if "//" not in str(v)} if isinstance(res, dict) else res
                       for rt, res in type(page)._resources.items()}
    return page


#: System fonts: the app loads nothing from outside the server (no web fonts). Set on ``body``, which wins
#: over the template's own ``:root`` value; shadow roots (Bokeh's views) inherit it.
PAGE_FONT_CSS = "body { --bokeh-base-font: -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif; }"


#: The analysis tabs after "Query": (title, view name); :data:`TOOL_VIEWS` builds each view from the state.
TOOL_TABS = [("Zero-shot labels", "zero_shot"), ("Describe selection", "describe"), ("DE + enrichment", "de"),
             ("Perturbation", "perturb"), ("Save / export", "export"), ("About", "about")]
TOOL_VIEWS = {"zero_shot": ZeroShotView, "describe": DescribeView, "de": DEView, "perturb": PerturbView,
              "export": ExportView, "about": AboutView}


#: Live served sessions: Bokeh session id -> Explorer. An entry is removed (and the Explorer closed) when the
#: session ends (:func:`_register_session`); nothing else keeps a session's objects.
SESSIONS: dict[str, Explorer] = {}
_last_release = [0.0]
_release_timer: list = [None]  # the pending release (release_memory)
_release_lock = threading.Lock()


def _register_session(explorer: Explorer) -> None:
    """Track a served session's Explorer and close it when Bokeh destroys the session."""
    doc = pn.state.curdoc
    ctx = getattr(doc, "session_context", None) if doc is not None else None
    if ctx is None:  # notebook or plain Python: the caller owns the Explorer
        return
    sid = ctx.id
    SESSIONS[sid] = explorer
    explorer.document = weakref.ref(doc)  # for code outside the server's loop: doc.add_next_tick_callback

    def destroyed(session_context) -> None:
        ex = SESSIONS.pop(sid, None)
        if ex is not None:
            ex.close()
        release_memory()

    doc.on_session_destroyed(destroyed)


def release_memory(min_interval: float = 5.0) -> None:
    """Collect reference cycles and hand freed heap back to the OS (glibc ``malloc_trim``), at most every
    ``min_interval`` seconds: closed sessions' plots and tables otherwise linger until a full collection.

    A call within ``min_interval`` of the last release schedules one more release for when the interval ends
    (a timer thread; at most one pending), so when many sessions close together the memory freed by the last
    of them is returned too (before, calls within the interval were dropped).
    """
    with _release_lock:
        now = time.monotonic()
        wait = _last_release[0] + min_interval - now
        if wait > 0:
            if _release_timer[0] is None:
                timer = threading.Timer(wait, _release_later)
                timer.daemon = True
                _release_timer[0] = timer
                timer.start()
            return
        _last_release[0] = now
    _release()


def _release_later() -> None:
    """The release scheduled by :func:`release_memory` (its interval has ended)."""
    with _release_lock:
        _release_timer[0] = None
        _last_release[0] = time.monotonic()
    _release()


def _release() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _chain(source: Future, target: Future) -> None:
    """Resolve ``target`` with the outcome of ``source``."""

    def _copy(fut: Future) -> None:
        if target.done():
            return
        err = fut.exception()
        if err is not None:
            target.set_exception(err)
        else:
            target.set_result(fut.result())

    source.add_done_callback(_copy)


def build_app(data: str | None = None, model: str | None = None, *, name: str | None = None,
              save_dir: str | None = None, max_download_mb: float = 200, backed: bool = False,
              embeddings: str | None = None):
    """Build one session's page for the shared dataset at ``data`` (None: demo) and model at ``model``.

    ``save_dir`` is the only folder the page writes to (default: ``lexicell-exports/`` beside the data, see
    :func:`app.files.default_save_dir`); the browser chooses file names only.

    ``backed`` (``run_app.py --backed``): the file is opened once per process with ``X`` on disk and
    precomputed embeddings (``embeddings``: a store of ``python -m engine.embed``, else the file's own
    ``obsm['transcriptome_embeds']``), see :func:`app.cache.open_backed`. Every session shares that one
    read-only dataset; a session's results (query scores, labels, kept columns) live in its own state and
    ``obs`` copy.

    The page is returned at once; the dataset is awaited without blocking the server (other sessions stay
    responsive while a large dataset loads), the map is drawn from its own layout, and only then is the
    model loaded (if no other session has started it), so the first paint does not wait for torch.

    Returns
    -------
    panel.template.VanillaTemplate
    """
    ensure_extensions()
    doc = pn.state.curdoc
    if doc is not None and doc.session_context is not None:
        lazy_recount(doc)  # a served page: Bokeh's model registry recounted only when it changed
    data_future = cache.dataset_future(data, backed=backed, embeddings=embeddings, model=model)
    if name is None:
        name = "pbmc68k_reduced (demo)" if data is None else str(data).rstrip("/").rsplit("/", 1)[-1]
    input_path = None if data is None else str(data)
    if save_dir is None:
        save_dir = str(files.default_save_dir(data))
    opts = dict(name=name, input_path=input_path, save_dir=str(save_dir), max_download_mb=max_download_mb)

    if data_future.done() and data_future.exception() is None:
        explorer = Explorer(data_future.result(), cache.model_future(model), **opts)
        _register_session(explorer)
        return explorer.template()

    sidebar = pn.Column(panes.Markdown(f"**{plain(name)}**  \nloading…"), sizing_mode="stretch_width")
    main = pn.Column(panes.Alert(f"Loading **{plain(name)}**…", alert_type="info"),
                     pn.indicators.LoadingSpinner(value=True, size=50), sizing_mode="stretch_width")
    extra = pn.Column(sizing_mode="stretch_width")

    async def load():
        try:
            adata = await asyncio.wrap_future(data_future)
        except Exception as err:  # noqa: BLE001 - shown in the page
            msg = str(err) if isinstance(err, LexicellError) else f"{type(err).__name__}: {err}"
            main[:] = [panes.Alert(f"**Lexicell could not load the dataset.** {plain(msg)}", alert_type="danger")]
            return
        t0 = time.perf_counter()
        model_ready: Future = Future()
        explorer = Explorer(adata, model_ready, **opts)
        _register_session(explorer)
        sidebar[:] = explorer.sidebar()
        first, second = explorer.main()
        main[:] = [first]
        extra[:] = [second]
        log.info("session page built in %.1f s", time.perf_counter() - t0)
        _chain(cache.model_future(model), model_ready)  # start (or join) loading the model now

    pn.state.onload(load)
    return _template([sidebar], [main, extra])

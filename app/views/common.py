"""Shared view helpers: running long work off the event loop with progress, cancel and error display."""
from __future__ import annotations

import asyncio
import html
import io
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import panel as pn
import param
from panel.io.state import set_curdoc

from engine.errors import CancelledError, LexicellError

from ..state import AppState
from . import panes

__all__ = ["Job", "StateView", "batched", "column_widths", "csv_download", "display_table", "on_stage", "plain",
           "set_table", "show_table", "stage", "table_widget", "EXECUTOR", "QUICK_EXECUTOR", "OFFSTAGE"]

log = logging.getLogger(__name__)

#: Worker threads for long work of all sessions (DE, zero-shot, perturbation, describe, file writes); embedding
#: has its own pool in app.cache.
EXECUTOR = ThreadPoolExecutor(max_workers=3, thread_name_prefix="lexicell-job")
#: Worker threads for quick work (queries: tens of milliseconds), so that they never wait behind another
#: session's perturbation scan or DE.
QUICK_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lexicell-quick")

_MARKDOWN_ACTIVE = re.compile(r"([\\`*_{}\[\]()#+\-.!|~:=$^])")


def plain(text) -> str:
    """``text`` made safe to show literally in a Markdown or Alert pane.

    Every user or dataset string (queries, labels, obs values, gene and file names, error messages quoting
    them) goes through this before it reaches a pane that renders Markdown: ``<``, ``>`` and ``&`` become
    HTML entities (no tag, script or image reaches the page) and Markdown-active characters are
    backslash-escaped (no bold, links or headings), so the page shows exactly what was typed.
    """
    return _MARKDOWN_ACTIVE.sub(r"\\\1", html.escape(str(text), quote=False))


@contextmanager
def batched():
    """Group the page updates made inside into one recount of the page's Bokeh models.

    Bokeh walks every model of a page after each change of a property that refers to models, about 50 ms
    for this dashboard. Inside this block the walk happens at most once, at the end, and on a served page
    only when something inside changed which models the page holds (:func:`app.views.docmodels.lazy_recount`).
    Outside a served page (notebooks, tests) it does nothing.

    The walk also happens when the block raises. Bokeh's own ``models.freeze()`` unfreezes only on a normal
    exit: an error inside it (an unknown gene typed into the gene box, shown by :meth:`Job.guard`) left the
    page's model registry frozen for good, so models added later (a tab opened afterwards, its buttons) were
    never registered and their clicks were dropped by the server ("can't resolve reference").
    """
    doc = pn.state.curdoc
    models = getattr(doc, "models", None) if doc is not None else None
    if models is None or not hasattr(models, "freeze"):
        yield
        return
    frozen = models.freeze()
    frozen.__enter__()
    try:
        yield
    finally:
        frozen.__exit__(None, None, None)  # resume the generator normally: it unfreezes (and recounts) now


def plain_bokeh():
    """Context for changing plain Bokeh models (figures the app updates in place, e.g.
    :class:`app.plots.ScoreHistogram`) from any callback of a served page.

    Panel's panes and widgets take the document lock themselves; plain Bokeh models do not, and a change from
    a callback that does not hold it (a HoloViews selection stream, an ``async`` button handler) raised
    Bokeh's "_pending_writes should be non-None" error and was lost. This is ``pn.io.document.unlocked()``:
    the changes are collected and sent to the page when the block ends. Outside a served page it does nothing.
    """
    return pn.io.document.unlocked()


#: The ``styles`` of a part of the page that is hidden by :func:`stage`: it keeps its size and drawing but takes no
#: room, cannot be seen and takes no clicks (``opacity`` too: Panel's HTML and Markdown panes set their own
#: ``visibility: visible``).
OFFSTAGE = {"visibility": "hidden", "opacity": "0", "position": "absolute", "pointer-events": "none"}


def stage(layout: pn.viewable.Viewable, shown: bool) -> None:
    """Show or hide ``layout`` (a Panel layout, pane or widget) through its CSS ``styles``, not ``visible``.

    Bokeh answers a change of ``visible`` (or ``css_classes``) by laying out the whole page again, and a figure
    shown again after ``display: none`` is drawn anew. The parts that switching between a query and zero-shot
    labels shows and hides (the two map panes, the side charts, the category menu) are therefore hidden with
    :data:`OFFSTAGE` instead: the browser takes them out of the flow, and Bokeh, which does not lay out again
    for ``styles``, keeps their drawing. Shown again, the same properties are set to None (Bokeh applies
    ``styles`` inline and removes a property only when its value is None). Measured with
    ``bench/bench_page_cost.py --action cycle`` (2026-12-03, two runs of each code, one machine): the
    zero-shot run and the query after it cost a page 805 and 703 ms of Chromium CPU with ``visible``, 488 and
    458 ms with this. Only a layout made with ``styles=OFFSTAGE`` (or no ``styles``) may be staged: its
    other styles are replaced.

    Parameters
    ----------
    layout
        Any Panel object with ``styles``.
    shown
        Whether it is shown.
    """
    if on_stage(layout) != shown:
        layout.styles = dict.fromkeys(OFFSTAGE) if shown else dict(OFFSTAGE)


def on_stage(layout: pn.viewable.Viewable) -> bool:
    """Whether ``layout``, shown and hidden with :func:`stage`, is shown (its ``visible`` is not looked at)."""
    return layout.styles.get("visibility") != "hidden"


class StateView(pn.viewable.Viewer):
    """Base class of the dashboard's views: holds the session's :class:`~app.state.AppState`."""

    state = param.ClassSelector(class_=AppState)

    def __init__(self, state: AppState, **params):
        super().__init__(state=state, **params)


class Job(pn.viewable.Viewer):
    """Runs ``compute`` in a worker thread and ``apply`` on the event loop, with a progress bar and messages.

    Engine errors appear as an alert in the page (``str(err)`` is written for users); unexpected errors are
    logged with their traceback and shown as one line. ``cancel_requested`` is the ``cancel=`` callable for
    engine functions that loop; each poll counts as one batch of progress. ``quick`` jobs (queries) run on
    their own worker threads (:data:`QUICK_EXECUTOR`), so one user's long analysis never delays another's query.
    """

    running = param.Boolean(default=False)

    #: seconds of work before the progress bar appears
    SHOW_AFTER = 0.4

    def __init__(self, *, cancellable: bool = False, quick: bool = False, **params):
        super().__init__(**params)
        self.executor = QUICK_EXECUTOR if quick else EXECUTOR
        self._cancel = threading.Event()
        self._closed = False
        self.polls = 0
        # a still striped bar (``active=False``): the label's seconds, updated every second, show that the work
        # goes on. Panel's animated stripes cost a browser without a GPU about 13 % of a core per page for as
        # long as they show (Chromium 156, software rendering, 2026-12-03); ten busy pages on one machine slowed
        # every page's work, which kept the bars showing longer (docs/serving-performance.md).
        self.progress = pn.indicators.Progress(value=-1, active=False, width=160, height=16,
                                               margin=(12, 5), bar_color="primary")
        self.label = panes.Markdown("", margin=(4, 5), css_classes=["job-label"])
        self.cancel_button = pn.widgets.Button(label="Cancel", color="warning", visible=cancellable, width=80,
                                               margin=(4, 5))
        self.cancel_button.on_click(lambda event: self._cancel.set())
        self.cancellable = cancellable
        #: progress bar, label and Cancel button: shown while slow work runs
        self.busy_row = pn.Row(self.progress, self.label, self.cancel_button, margin=0, visible=False)
        self.alert = panes.Alert("", alert_type="danger", visible=False, margin=(5, 5), sizing_mode="stretch_width")
        self._layout = pn.Column(self.busy_row, self.alert, margin=0, sizing_mode="stretch_width")

    def __panel__(self):
        return self._layout

    @property
    def showing(self) -> bool:
        """Whether the progress row (bar, label, Cancel) is shown now."""
        return self.busy_row.visible

    def cancel_requested(self) -> bool:
        self.polls += 1
        return self._cancel.is_set()

    def close(self) -> None:
        """The page is gone (its session ended): ask a running computation to stop, and when it returns, change
        nothing on the page (a destroyed Bokeh document cannot take updates)."""
        self._closed = True
        self._cancel.set()

    def show(self, text: str, kind: str = "danger") -> None:
        """Show ``text`` as plain text (escaped, see :func:`plain`) in the job's alert."""
        self.alert.param.update(object=plain(text), alert_type=kind, visible=bool(text))

    def clear(self) -> None:
        self.alert.param.update(object="", visible=False)

    async def run(self, compute: Callable[[], object], apply: Callable[[object], None], *,
                  label: str = "Working", disable: Sequence = ()) -> bool:
        """Run ``compute()`` off the loop, then ``apply(result)``; returns True on success.

        The progress bar and label appear, and the ``disable`` widgets are disabled, only when the work is
        still running after :attr:`SHOW_AFTER` seconds: a query answered in 50 ms changes nothing but the
        results on the page (showing and hiding the bar, or disabling and enabling a button, each made the
        browser lay out the whole page). A second run while one is running is refused either way
        (:attr:`running`).
        """
        if self.running:
            return False
        self.running = True
        self._cancel.clear()
        self.polls = 0
        if self.alert.visible:
            with batched():
                self.clear()
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, compute)
        ok = shown = False
        try:
            done, _ = await asyncio.wait({fut}, timeout=self.SHOW_AFTER)
            while not done and not self._closed:
                extra = f", {self.polls} batches" if self.polls else ""
                with batched():
                    self.label.object = f"{plain(label)}… {time.perf_counter() - t0:.0f} s{extra}"
                    if not shown:
                        shown = True
                        self.cancel_button.visible = self.cancellable
                        self.busy_row.visible = True
                        for w in disable:
                            w.disabled = True
                done, _ = await asyncio.wait({fut}, timeout=0.3)
            if self._closed:  # the session ended meanwhile: its page is gone
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieve, so nothing is logged
                return False
            result = fut.result()
            t1 = time.perf_counter()
            if not await self._on_session(apply, result):
                return False
            ok = True
            log.debug("%s: compute %.3f s, apply %.3f s", label, t1 - t0, time.perf_counter() - t1)
        except CancelledError:
            self.show("Cancelled.", "warning")
        except LexicellError as err:
            self.show(str(err), "danger")
        except Exception as err:  # noqa: BLE001 - the page must never show a traceback
            log.exception("%s failed", label)
            self.show(f"Unexpected error ({type(err).__name__}): {err}", "danger")
        finally:
            if not self._closed:  # a closed page (its session ended) takes no updates
                with batched():
                    if shown:
                        for w in disable:
                            w.disabled = False
                        self.busy_row.visible = False
            self.running = False
        return ok

    async def _on_session(self, fn: Callable, *args) -> bool:
        """Run ``fn(*args)`` as a callback of the page's session (under its document lock) and wait for it.

        A served page then gets the callback's changes as one websocket message
        (:func:`app.messages.combine_patch_messages`); run here, in the job's own task outside the lock, Panel
        sent one message per pane or widget changed (a query's results five, a DE run's three), and the
        browser laid out and painted the page after each. Outside a served page ``fn`` runs at once. Errors of
        ``fn`` are raised here. Returns False when the page closed before ``fn`` ran (it never runs then).
        """
        doc = pn.state.curdoc
        if doc is None or getattr(doc, "session_context", None) is None:
            with batched():
                fn(*args)
            return True
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def callback():
            if done.done():  # the page closed meanwhile
                return
            try:
                with set_curdoc(doc), batched():
                    fn(*args)
            except BaseException as err:  # noqa: BLE001 - raised again in run(), which shows it
                done.set_exception(err)
            else:
                done.set_result(True)

        doc.add_next_tick_callback(callback)
        while not done.done():
            await asyncio.wait({done}, timeout=1.0)
            if self._closed and not done.done():  # a destroyed session runs no more callbacks
                done.cancel()
                return False
        return done.result()

    def guard(self, fn: Callable[[], object]) -> bool:
        """Run a quick synchronous action, showing engine errors in the page."""
        self.clear()
        try:
            with batched():
                fn()
        except LexicellError as err:
            self.show(str(err), "danger")
            return False
        except Exception as err:  # noqa: BLE001
            log.exception("action failed")
            self.show(f"Unexpected error ({type(err).__name__}): {err}", "danger")
            return False
        return True


def table_widget(**kw) -> pn.widgets.Tabulator:
    """A read-only, sortable, paginated table.

    Unless ``widths`` is given (or the layout is ``fit_columns``), its columns get fixed widths from their text
    (:func:`column_widths`), and a page's rows are drawn at once (Tabulator's ``renderVertical: "basic"``):
    with widths left to it, Tabulator re-measured every cell of every column after each new ``value``, and its
    virtual renderer each row as it drew it, most of the zero-shot and DE runs' JavaScript in the browser
    (86 and 98 ms per run; ``docs/serving-performance.md``, 2026-12-03 evening). Use :func:`set_table` to
    change the rows later.
    """
    opts = dict(value=pd.DataFrame(), pagination="local", page_size=12, disabled=True, show_index=False,
                sizing_mode="stretch_width", height=360, layout="fit_data_table",
                # a cut text shows whole on hover; a page's rows drawn at once, not one by one with a layout each
                configuration={"columnDefaults": {"tooltip": True}, "renderVertical": "basic"})
    opts.update(kw)
    if "widths" not in kw and opts["layout"].startswith("fit_data"):
        opts["widths"] = column_widths(opts["value"], opts.get("formatters"))
    return pn.widgets.Tabulator(**opts)


#: Column widths in pixels for the Tabulator theme's 14-px font, measured in Chromium: about 8 px per digit or
#: bold header letter, 6.5 per letter of text on average (7 taken, for wider words); the cell's padding; the
#: header's padding and sort arrow; the widest column.
DIGIT_PX, LETTER_PX, CELL_PAD_PX, HEADER_PAD_PX, MAX_COLUMN_PX = 8, 7, 18, 30, 600


def column_widths(table: pd.DataFrame, formatters: dict | None = None) -> dict[str, int]:
    """Pixel widths for the columns of ``table`` in a Tabulator: the longer of the header and the longest cell
    text (as the browser shows it: numbers rounded by :func:`display_table`, p-values in scientific notation),
    at most :data:`MAX_COLUMN_PX` (a longer text is cut; its tooltip shows it whole).

    Parameters
    ----------
    table
        The table shown (any columns; an empty table gives ``{}``).
    formatters
        Tabulator formatters by column; a column with a ``ScientificFormatter`` is sized for ``1.23e-10``.

    Returns
    -------
    dict of str to int
        Column name -> width in pixels (``Tabulator.widths``).
    """
    formatters = formatters or {}
    out = {}
    for c in table.columns:
        s = table[c]
        if c in formatters:
            px = DIGIT_PX * 9 + CELL_PAD_PX
        elif len(s) == 0:
            px = 0
        elif s.dtype.kind in "fiu":
            # numpy writes each number as short as its dtype allows (float32 0.773 as 0.773), as the page does;
            # one more character where JavaScript writes an exponent out (1e-05 as 0.00001)
            px = DIGIT_PX * (int(s.astype(str).str.len().max()) + (s.dtype.kind == "f")) + CELL_PAD_PX
        else:
            px = LETTER_PX * int(s.astype(str).str.len().max()) + CELL_PAD_PX
        px = max(DIGIT_PX * len(str(c)) + HEADER_PAD_PX, px)
        out[str(c)] = int(min(px, MAX_COLUMN_PX))
    return out


def set_table(widget: pn.widgets.Tabulator, shown: pd.DataFrame, **extra) -> None:
    """Show the rows of ``shown`` in ``widget``, widening a column whose new text is longer than its fixed
    width (:func:`column_widths`; tables laid out with ``fit_columns`` share the table's width instead);
    ``extra`` are more Tabulator parameters to set with them.
    Only what changed is sent to the page, in one update."""
    widths = dict(widget.widths) if isinstance(widget.widths, dict) else {}
    new = column_widths(shown, widget.formatters) if widget.layout.startswith("fit_data") else {}
    if any(new[c] > widths.get(c, 0) for c in new):
        extra["widths"] = {c: max(new[c], widths.get(c, 0)) for c in new}
    if extra:
        widget.param.update(value=shown, **extra)
    else:
        widget.value = shown


def show_table(holder: pn.Column, table: pd.DataFrame, **kw) -> pn.widgets.Tabulator:
    """Show ``table`` (rounded by :func:`display_table`) in ``holder``, the Column that holds one Tabulator.

    When the Tabulator in ``holder`` already shows the same columns (names, order, dtypes) with the same
    formatters, only its ``value`` is replaced (the new rows and cell styles are sent; the browser keeps the
    table and redraws its rows) and it goes back to page 1; a sort the user chose in the browser stays.
    Otherwise a new read-only Tabulator made by :func:`table_widget` with ``kw`` replaces it: changing the columns and formatters of a table already on the page could leave its
    rows blank or its header shifted in the browser (Panel 1.9), and a new widget renders reliably.

    Parameters
    ----------
    holder
        A ``pn.Column`` whose only object is the table shown.
    table
        The table, any columns; an empty ``pd.DataFrame()`` shows an empty table.
    **kw
        Options of :func:`table_widget` for a new widget (the same on every call for one holder).

    Returns
    -------
    pn.widgets.Tabulator
        The widget now shown (the old one, updated, or a new one).
    """
    shown, fmt = display_table(table) if len(table.columns) else (table, {})
    old = holder.objects[0] if len(holder.objects) == 1 else None
    if isinstance(old, pn.widgets.Tabulator) and _same_layout(old, shown, fmt):
        set_table(old, shown, **({"page": 1} if old.page != 1 else {}))
        return old
    widget = table_widget(value=shown, formatters=fmt, **kw)
    holder.objects = [widget]
    return widget


def _same_layout(widget: pn.widgets.Tabulator, shown: pd.DataFrame, formatters: dict) -> bool:
    """Whether ``widget`` shows the columns of ``shown`` (names, order, dtypes) with the same ``formatters``."""
    old = widget.value
    if old is None or not len(shown.columns) or list(old.columns) != list(shown.columns):
        return False
    if list(old.dtypes) != list(shown.dtypes) or set(widget.formatters) != set(formatters):
        return False
    return all(type(f) is type(widget.formatters[c])
               and f.properties_with_values(include_defaults=False)
               == widget.formatters[c].properties_with_values(include_defaults=False)
               for c, f in formatters.items())


P_COLUMNS = ("pval", "pval_adj")


def display_table(table: pd.DataFrame, *, digits: int = 4) -> tuple[pd.DataFrame, dict]:
    """A copy of ``table`` for a Tabulator: floats rounded to ``digits`` significant digits, p-values kept
    exact and shown in scientific notation; returns ``(frame, formatters)``."""
    from bokeh.models.widgets.tables import ScientificFormatter

    shown = table.copy()
    shown.attrs = {}
    formatters = {}
    for c in shown.columns:
        if c in P_COLUMNS:
            formatters[c] = ScientificFormatter(precision=2, power_limit_low=-3)
        elif shown[c].dtype.kind == "f":
            shown[c] = shown[c].map(lambda v: float(f"{v:.{digits}g}") if np.isfinite(v) else v)
    return shown, formatters


def csv_download(get_table: Callable[[], pd.DataFrame | None], filename: str, label: str = "Download CSV"):
    """A FileDownload button writing the table returned by ``get_table`` as CSV."""

    def _cb():
        df = get_table()
        buf = io.StringIO()
        (df if df is not None else pd.DataFrame()).to_csv(buf, index=df is not None and not isinstance(df.index, pd.RangeIndex))
        buf.seek(0)
        return buf

    return pn.widgets.FileDownload(callback=_cb, filename=filename, label=label, color="light", width=180,
                                   margin=(5, 5))

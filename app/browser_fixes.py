"""Fixes for the browser side of Panel, shipped to each page as a small script.

:class:`TabulatorStylesheetFix` mends how Panel 1.9.4's Tabulator waits for its stylesheets. Each
Tabulator (``DataTabulatorView``) lists the ``<link>`` stylesheets of its shadow root as "not loaded" and marks
each one loaded when its ``load`` event fires; its resize redraw (``_flush_resize_when_root_ready``) waits until
all are, polling again at once (Bokeh's ``defer``, a message to the page itself) for as long as one is not. When
a link has already loaded by the time the table starts listening (a stylesheet the page has in its cache) or is
replaced without a new listener (Bokeh re-creates a view's stylesheet elements when it re-renders them), the event
never comes: the table waits for ever, and its page keeps a core busy with that polling. In the load benchmark
(ten pages, with the server and the browser confined to one busy core) this held every Tabulator of every page
(``docs/serving-performance.md``, 2026-12-05); Panel's own Markdown and HTML panes already count a stylesheet
whose ``sheet`` exists as loaded, and watch again when their stylesheet elements change. The script gives the
Tabulator view the same rules: a link that has its ``sheet`` counts as loaded, an ``error`` settles it too, the
watch is renewed whenever the view's stylesheet elements are, and the tables already on the page are watched
again. It is installed when the component's module loads, before the document's views render.

Remove it once Panel's ``HTMLBoxView.watch_stylesheets`` does the same
(``tests/test_ui.py::test_tabulator_tables_settle_their_stylesheets`` says when Panel's own method does).
"""
from __future__ import annotations

from panel.custom import JSComponent

__all__ = ["TabulatorStylesheetFix", "tabulator_stylesheet_fix", "TABULATOR_MODEL"]

#: Bokeh's name of Panel's Tabulator model.
TABULATOR_MODEL = "panel.models.tabulator.DataTabulator"

_ESM = """
const FIXED = Symbol.for("lexicell.tabulatorStylesheets")

function watchStylesheets() {
  // the links of this view's shadow root: loaded (a sheet), failed or still loading
  this._lexicellSheetWatch?.abort()
  const {signal} = this._lexicellSheetWatch = new AbortController()
  const settled = this._initialized_stylesheets = new Map()
  const settle = (href) => {
    settled.set(href, true)
    if ([...settled.values()].every(Boolean)) {
      requestAnimationFrame(() => this.style_redraw())
    }
  }
  for (const stylesheet of this._applied_stylesheets) {
    const el = stylesheet.el
    if (el instanceof HTMLLinkElement) {
      settled.set(el.href, el.sheet != null)
      el.addEventListener("load", () => settle(el.href), {signal})
      el.addEventListener("error", () => settle(el.href), {signal})
    }
  }
  requestAnimationFrame(() => this.style_redraw())  // as Panel's: a redraw that does not wait for the sheets
}

export function install() {
  const model = window.Bokeh?.Models?._known_models?.get("%(model)s")
  if (model == null) {
    return false
  }
  const View = model.prototype.default_view
  const proto = View.prototype
  if (!proto[FIXED]) {
    proto[FIXED] = true
    proto.watch_stylesheets = watchStylesheets
    const update = proto._update_stylesheets
    proto._update_stylesheets = function () {
      update.call(this)
      if (this._lexicellSheetWatch != null) {
        this.watch_stylesheets()  // new elements: watch them instead
      }
    }
  }
  for (const view of window.Bokeh.index.query((v) => v instanceof View)) {
    if ([...(view._initialized_stylesheets ?? new Map()).values()].some((ok) => !ok)) {
      view.watch_stylesheets()
    }
  }
  return true
}

install()

export function render({el}) {
  el.style.display = "none"
  install()  // (a no-op where the module already did it; Panel's Tabulator code may load after this module)
}
""" % {"model": TABULATOR_MODEL}


class TabulatorStylesheetFix(JSComponent):
    """An invisible component whose script mends Panel 1.9.4's Tabulator stylesheet wait (module docstring).
    One per page is enough; more are harmless (the script installs itself once per page)."""

    _esm = _ESM


def tabulator_stylesheet_fix() -> TabulatorStylesheetFix:
    """A new :class:`TabulatorStylesheetFix` for one page (a Panel object belongs to one layout)."""
    return TabulatorStylesheetFix(width=0, height=0, margin=0, sizing_mode="fixed")

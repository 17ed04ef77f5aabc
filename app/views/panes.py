"""Text panes whose updates send only what changed.

Panel 1.9's HTML, Markdown and Alert panes send every property again when their text changes, style sheets
included, as new ``ImportedStyleSheet`` models. New models make Bokeh walk every model of the page
(:mod:`app.views.docmodels`) and send those style sheets to the browser, which re-applies them: for a
status line that changes with every query, most of the cost of the update. These subclasses leave the style
sheets as they are when only the text (or another plain property) changes; a changed ``stylesheets``
parameter still reaches the browser through Panel's normal path.

They also show no math: Panel's Markdown pane leaves its Bokeh model's ``disable_math`` at False, so the
browser typeset any ``$$...$$``, ``\\(...\\)`` or ``\\[...\\]`` in the rendered text with MathJax, typed text
included (a custom zero-shot template ``$$x^2$$ {label}`` showed as a formula in its "Label text" line, seen in
Chromium on 2026-12-03). Here the model's ``disable_math`` is always True: the page shows such text as typed,
and it needs no MathJax (:func:`app.layout.ensure_extensions` then leaves Bokeh's MathJax bundle, 1.8 MB, out
of the page). Titles inside figures are made plain by :func:`app.plots.no_tex`.

They behave exactly like Panel's panes otherwise and are never chosen by ``pn.panel`` (priority 0).
"""
from __future__ import annotations

import panel as pn

__all__ = ["HTML", "Markdown", "Alert"]


class _TextUpdates:
    """Mixin for Panel's HTML-based panes: an update of ``object`` does not re-send the style sheets, and the
    browser never typesets math in the text."""

    priority = 0  # never picked by pn.panel() for a plain string

    def _get_properties(self, doc) -> dict:
        props = super()._get_properties(doc)
        props["disable_math"] = True  # text is text: no MathJax on $$...$$ or \\(...\\) in what users type
        return props

    def _update(self, ref, model) -> None:
        if getattr(self, "enable_streaming", False):  # Panel's own path for streamed text
            super()._update(ref, model)
            return
        props = self._get_properties(model.document)
        props.pop("stylesheets", None)  # unchanged; re-sending them as new models costs a page-wide walk
        model.update(**props)


class HTML(_TextUpdates, pn.pane.HTML):
    """:class:`panel.pane.HTML` whose text updates leave its style sheets alone."""


class Markdown(_TextUpdates, pn.pane.Markdown):
    """:class:`panel.pane.Markdown` whose text updates leave its style sheets alone."""


class Alert(_TextUpdates, pn.pane.Alert):
    """:class:`panel.pane.Alert` whose text updates leave its style sheets alone."""

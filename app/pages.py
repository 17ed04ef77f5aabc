"""Served pages made cheaper to build and load: one model recount per page build, no validation, no MathJax.

Installed by :func:`app.layout.ensure_extensions` (MathJax for every page, validation for served ones) and
:func:`app.layout._template` (the recount); the figures behind each are in ``docs/serving-performance.md``
(2026-12-03).
"""
from __future__ import annotations

import panel as pn

__all__ = ["mathjax_only_for_math", "no_document_validation", "one_recount"]


def mathjax_only_for_math() -> None:
    """Have Panel add Bokeh's MathJax bundle to a served page only when a text pane there may show math.

    Panel 1.9 adds it (1.8 MB of JavaScript; about 100 ms of a page load's main thread and 50 ms of parsing in
    Chromium, measured 2026-12-03) to every page whose roots hold an HTML model, whether or not that model
    typesets math (``disable_math``). Lexicell's text panes never do (:mod:`app.views.panes`), so its pages
    load without it; a page holding a pane that typesets math still gets it. Installed once per process; a
    Panel without the hook (``panel.io.resources._panel_use_mathjax``) is left as it is.
    """
    from panel.io import resources
    from panel.models.markup import HTML

    current = getattr(resources, "_panel_use_mathjax", None)
    if current is None or getattr(current, "_lexicell", False):
        return

    def use_mathjax(roots) -> bool:
        return any(isinstance(obj, HTML) and not obj.disable_math for obj in roots)

    use_mathjax._lexicell = True
    resources._panel_use_mathjax = use_mathjax


def no_document_validation() -> None:
    """Skip Bokeh's validation of each new served page, unless ``BOKEH_VALIDATE_DOC`` asks for it.

    Bokeh checks every model of a new session's document for layout and glyph mistakes, which it can only log
    as warnings nobody on a lab server reads; that was about a tenth of the server's time for a page (cProfile
    of a page build, 2026-12-03). The tests build the pages with validation on (``tests/test_app_state.py``).
    """
    import os

    from bokeh.settings import settings

    if "BOKEH_VALIDATE_DOC" not in os.environ:
        settings.perform_document_validation.set_value(False)



def one_recount(template: pn.template.BaseTemplate) -> pn.template.BaseTemplate:
    """Have ``template`` build a served page with one walk of its Bokeh model graph instead of one per root.

    Bokeh recounts a document's models (a walk of every property of every model) at the end of each
    ``models.freeze()`` block that changed the graph; building this page added its roots one by one and walked
    the growing graph ten times, about a tenth of the server's time for a page (cProfile of a page build,
    2026-12-03). Inside one outer freeze the walks happen once, when the page is complete; nothing reads the
    registry meanwhile (Panel's own ``hold(freeze=True)`` relies on the same). The wrapper is set on this one
    instance; its class (and so the template's bundled files, found by class name) stays Panel's.
    """
    server_doc = template.server_doc

    def frozen_server_doc(doc=None, title=None, location=True):
        target = doc if doc is not None else pn.state.curdoc
        models = getattr(target, "models", None)
        if models is None or not hasattr(models, "freeze"):
            return server_doc(doc, title, location)
        with models.freeze():
            return server_doc(target, title, location)

    template.server_doc = frozen_server_doc
    return template

"""Tabs that render a tab's content the first time it is opened and keep it afterwards."""
from __future__ import annotations

import panel as pn

__all__ = ["LazyTabs"]


class LazyTabs(pn.Tabs):
    """Tabs whose content is built in the browser the first time a tab is opened, then kept.

    Panel's ``Tabs(dynamic=True)`` drops a tab's models when another tab opens and sends them all again when it
    comes back (every switch rebuilds the tab's tables and plots in the browser); ``dynamic=False`` renders every
    tab at page load. Here each tab is an empty holder until first opened; from then on a switch only changes
    which tab is shown.

    A content may also be a function of no arguments returning it: it is called the first time its tab opens,
    so a tab nobody opens costs neither its Bokeh models nor the Python objects behind them (a served page
    builds faster).

    Parameters
    ----------
    items
        ``(title, content)`` pairs, as for ``pn.Tabs``; ``content`` is a Panel object or a function returning one.
    **params
        Passed to ``pn.Tabs`` (``dynamic`` is always False).

    Attributes
    ----------
    contents : list
        The tabs' contents, in order: a Panel object, or the function that will build it (not opened yet).
    """

    def __init__(self, *items, **params):
        params["dynamic"] = False
        super().__init__(**params)
        self.contents: list = []
        self.param.watch(self._fill, "active")
        if items:
            self.set_items(list(items))

    def set_items(self, items: list) -> None:
        """Replace every tab with ``items`` (``(title, content)`` pairs); the active one is rendered."""
        self.contents = [content for _, content in items]
        holders = [(title, pn.Column(sizing_mode="stretch_width", margin=0)) for title, _ in items]
        self[:] = holders
        self._fill()

    def content(self, i: int):
        """Tab ``i``'s content, built now if it was given as a function and not built yet."""
        c = self.contents[i]
        if callable(c) and not isinstance(c, pn.viewable.Viewable) and not hasattr(c, "__panel__"):
            c = self.contents[i] = c()
        return c

    def _fill(self, *_):
        i = self.active
        if 0 <= i < len(self.contents) and not self[i].objects:
            self[i].objects = [self.content(i)]

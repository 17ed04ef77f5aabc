"""Free-text query: type a description, cells are coloured by how well they match (CellWhisperer's search)."""
from __future__ import annotations

from functools import partial

import panel as pn

from ..state import AppState
from .common import Job, StateView
from . import panes

__all__ = ["QueryView"]

EXAMPLES = ["B cells", "natural killer cells", "CD14 monocytes", "T cells MINUS regulatory T cells",
            "dendritic cells", "proliferating cells"]


class QueryView(StateView):
    """Query box with Search button, examples, a history to go back to and a "keep as obs column" action."""

    def __init__(self, state: AppState, **params):
        super().__init__(state, **params)
        self.job = Job(quick=True)
        self.text = pn.widgets.TextInput(
            label="Describe the cells you are looking for",
            placeholder='e.g. "B cells", "T cells MINUS regulatory T cells"', sizing_mode="stretch_width")
        self.search = pn.widgets.Button(label="Search cells", color="primary", width=130, margin=(23, 5, 5, 5))
        self.examples = pn.widgets.Select(label="Examples", options=[""] + EXAMPLES, width=230)
        self.history = pn.widgets.Select(label="History (click to go back)", options=[], sizing_mode="stretch_width")
        self.keep_name = pn.widgets.TextInput(label="Column name (optional)", placeholder="score_<query>", width=200)
        self.keep = pn.widgets.Button(label="Keep as obs column", color="default", width=160, margin=(23, 5, 5, 5))
        self.timing = panes.Markdown("", margin=(0, 5))
        self._syncing = False
        #: a query typed before the cells were embedded, run once they are (the latest one typed)
        self.pending: str | None = None

        self.search.on_click(self._search)
        self.text.param.watch(self._search, "enter_pressed")
        self.examples.param.watch(self._example, "value")
        self.history.param.watch(self._history, "value")
        self.keep.on_click(lambda event: self.job.guard(lambda: self.state.keep_query(self.keep_name.value or None)))
        self.state.param.watch(self._on_history, "history")
        self.state.param.watch(self._on_query, "query")
        self.state.param.watch(self._on_embeds_ready, "embeds_ready")

    def bar(self) -> pn.Column:
        """The query bar shown above the map."""
        return pn.Column(pn.Row(self.text, self.search, sizing_mode="stretch_width"), self.job,
                         sizing_mode="stretch_width", margin=0)

    def __panel__(self):
        return pn.Column(
            panes.Markdown(
                "Cells are scored by the model's similarity between their transcriptome and your text "
                "(logit = cosine × exp(logit_scale)); `A MINUS B` scores A minus B. Red = better match than "
                "the median cell (or than B), blue = worse."),
            pn.Row(self.examples, self.history, sizing_mode="stretch_width"),
            pn.Row(self.keep_name, self.keep),
            self.timing,
            sizing_mode="stretch_width",
        )

    async def _search(self, event=None, *, text: str | None = None, clear_notice: bool = True):
        if text is None:
            text = self.text.value_input if self.text.value_input is not None else self.text.value
        st = self.state
        if not st.embeds_ready and text and text.strip():
            # the page is usable while the model loads and the cells are embedded: the query waits for them
            # (the last one typed), instead of failing with "still being embedded"
            self.pending = text
            st.notify(f"“{text.strip()[:80]}” will be scored as soon as the cells are embedded (progress above).",
                      "info")
            return
        if clear_notice:
            st.notify("")  # a new query replaces older notices

        def apply(rec):
            st.apply_query(rec)
            self.timing.object = f"Scored {st.n_cells:,} cells in {rec.seconds * 1000:.0f} ms."

        await self.job.run(lambda: st.compute_query(text), apply, label="Scoring cells", disable=[self.search])

    def _on_embeds_ready(self, event) -> None:
        """Run the query typed while the cells were being embedded, on a later tick (after the page has taken
        over the embeddings and shown that they are ready; that notice is kept)."""
        if not event.new or self.pending is None:
            return
        text, self.pending = self.pending, None
        pn.state.execute(partial(self._search, text=text, clear_notice=False))

    async def _example(self, event):
        if event.new:
            self.text.param.update(value=event.new, value_input=event.new)
            await self._search()

    def _history(self, event):
        if self._syncing or not event.new or event.new == self.state.query:
            return
        self.job.guard(lambda: self.state.show_history(event.new))

    def _sync_history(self) -> None:
        """Mirror the state's history and current query in the Select without re-triggering it."""
        self._syncing = True
        try:
            opts = [h.query for h in reversed(self.state.history)]
            value = self.state.query if self.state.query in opts else None
            if opts != self.history.options or value != self.history.value:
                self.history.param.update(options=opts, value=value)
        finally:
            self._syncing = False

    def _on_history(self, *_):
        self._sync_history()

    def _on_query(self, event):
        self._sync_history()

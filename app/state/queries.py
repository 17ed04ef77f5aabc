"""Free-text queries (scores, history, keep as a column) and the cell selection (box, lasso, categories)."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd

import engine
from engine.errors import EmptySelectionError, QueryError
from engine.tools.score import split_contrast

from .common import MAX_HISTORY, QUERY, QueryRecord, _column_name

__all__ = ["QueryMixin"]


class QueryMixin:
    """Queries and selection of an :class:`~app.state.AppState`."""

    def compute_query(self, text: str) -> QueryRecord:
        """Score every cell against ``text`` (``"A MINUS B"`` allowed); nothing is written."""
        self._require_embeddings()
        text = " ".join(str(text or "").split())
        t0 = time.perf_counter()
        scores = engine.score_text(self.adata, self.model, text, write=False)
        contrast = split_contrast(text)[1] is not None
        center = 0.0 if contrast else float(np.median(scores))
        return QueryRecord(text, np.asarray(scores, dtype=np.float32), center, contrast, time.perf_counter() - t0)

    def apply_query(self, rec: QueryRecord) -> None:
        """Make ``rec`` the current query, add it to the history and colour the map by it."""
        hist = [h for h in self.history if h.query != rec.query] + [rec]
        self.param.update(query=rec.query, scores=rec.scores, history=hist[-MAX_HISTORY:], color_by=QUERY)
        self.map_version += 1

    def run_query(self, text: str) -> QueryRecord:
        rec = self.compute_query(text)
        self.apply_query(rec)
        return rec

    def current_record(self) -> QueryRecord | None:
        for h in reversed(self.history):
            if h.query == self.query:
                return h
        return None

    def show_history(self, query: str) -> None:
        """Go back to an earlier query of the history."""
        for h in self.history:
            if h.query == query:
                self.param.update(query=h.query, scores=h.scores, color_by=QUERY)
                self.map_version += 1
                return
        raise QueryError("This query is not in the history", found=repr(query), expected="one of the listed queries")

    def keep_query(self, name: str | None = None) -> str:
        """Write the current query's scores as an obs column (engine.score_text naming), return its name."""
        if self.scores is None:
            raise QueryError("No query to keep", found="no current query", expected="run a query first")
        key = _column_name(name) if name else _column_name("score_" + self.query.lower())[:60]
        engine.score_text(self.adata, self.model, self.query, key_added=key, write=True)
        self.notify(f"Kept the scores of '{self.query}' as obs column '{key}'.", "success")
        self.param.trigger("map_version")
        return key

    # ------------------------------------------------------------------ selection
    def selection_mask(self) -> np.ndarray | None:
        """Boolean ``(n_cells,)`` mask of the selection, None when nothing is selected."""
        if self.selection is None:
            return None
        mask = np.zeros(self.n_cells, dtype=bool)
        mask[self.selection] = True
        return mask

    @property
    def n_selected(self) -> int:
        return 0 if self.selection is None else int(len(self.selection))

    def select_box(self, x0: float, y0: float, x1: float, y1: float) -> int:
        """Select the cells inside a rectangle of the current layout; returns the count."""
        xy = self.coords()
        if xy is None:
            return 0
        x0, x1 = sorted((float(x0), float(x1)))
        y0, y1 = sorted((float(y0), float(y1)))
        inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
        self.param.update(selection=np.flatnonzero(inside), selection_geometry=("box", (x0, y0, x1, y1)))
        return int(inside.sum())

    def select_lasso(self, polygon) -> int:
        """Select the cells inside a lasso polygon (``(n, 2)`` vertices); returns the count."""
        from matplotlib.path import Path as MplPath

        xy = self.coords()
        poly = np.asarray(polygon, dtype=np.float64)
        if xy is None or poly.ndim != 2 or len(poly) < 3:
            self.clear_selection()
            return 0
        inside = MplPath(poly).contains_points(xy)
        self.param.update(selection=np.flatnonzero(inside), selection_geometry=("lasso", poly))
        return int(inside.sum())

    def select_values(self, values: Sequence[str], column: str | None = None) -> int:
        """Select the cells whose category is one of ``values``: in obs ``column``, or in the current colouring."""
        if column is not None:
            spec = self._obs_spec(column)
        else:
            spec = self.color_spec()
        if spec.kind != "categorical":
            raise EmptySelectionError("Selecting by category needs a categorical colouring",
                                      found=f"the map is coloured by {spec.name or 'density'}",
                                      expected="a label or obs category colouring")
        cat = np.asarray(pd.Categorical(spec.values).astype(object), dtype=object)
        inside = np.isin(cat.astype(str), [str(v) for v in values])
        self.param.update(selection=np.flatnonzero(inside), selection_geometry=None)
        return int(inside.sum())

    def clear_selection(self) -> None:
        self.param.update(selection=None, selection_geometry=None)

    def _selected_or_raise(self, what: str) -> np.ndarray:
        mask = self.selection_mask()
        if mask is None or not mask.any():
            raise EmptySelectionError(f"No cells are selected for {what}", found="an empty selection",
                                      expected="at least one cell", fix="draw a box or lasso on the map first")
        return mask

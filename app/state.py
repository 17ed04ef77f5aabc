"""Per-session application state: the dataset, the model, the current colouring, query, selection and results.

:class:`AppState` holds data and calls the engine; it has no layout and imports no
panel. Every long operation comes in two halves so that views can run the first off
the event loop: ``compute_<op>(...)`` does the work and returns a result without
touching parameters, ``apply_<op>(result)`` stores it (on the event loop). ``run_<op>``
does both, for notebooks and tests. Engine errors (``engine.errors.LexicellError``)
propagate; the views show ``str(err)`` in the page.
"""
from __future__ import annotations

import importlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import param

import engine
from engine.errors import (AnalysisError, DataError, EmptySelectionError, LexicellError, MissingEmbeddingError,
                           MissingKeyError, QueryError)
from engine.tools.score import split_contrast

from . import cache, files
from .plots import MAX_CATEGORIES, ColorSpec, category_colors, cell_frame, map_png, symmetric_clim

__all__ = ["AppState", "QueryRecord", "QUERY", "GENE", "ZERO_SHOT", "ZERO_SHOT_CONF", "PERTURB", "DENSITY"]

log = logging.getLogger(__name__)

# special colourings (obs columns are used by name)
DENSITY = "__density__"
QUERY = "__query__"
GENE = "__gene__"
ZERO_SHOT = "__zero_shot__"
ZERO_SHOT_CONF = "__zero_shot_confidence__"
PERTURB = "__perturb__"
MAX_HISTORY = 30


@dataclass
class QueryRecord:
    """One query of the history: its text, per-cell scores and the colour centre."""

    query: str
    scores: np.ndarray
    center: float
    contrast: bool
    seconds: float = 0.0


class AppState(param.Parameterized):
    """State of one dashboard session.

    Parameters
    ----------
    adata
        This session's AnnData (see :func:`app.cache.session_adata`): ``obs`` is private, matrices shared.
    model
        The transcriptome-text model (shared, read-only).
    """

    adata = param.ClassSelector(class_=ad.AnnData, doc="This session's dataset (obs private, matrices shared).")
    model = param.Parameter(doc="engine.TranscriptomeTextModel, shared read-only.")
    dataset_name = param.String(default="dataset")
    input_path = param.String(default=None, allow_None=True, doc="File the dataset was read from (never overwritten).")
    save_dir = param.String(default=None, allow_None=True,
                            doc="Served mode: the only folder this session writes to (names only); None: Jupyter.")
    max_download_bytes = param.Integer(default=200 * 2**20, bounds=(0, None),
                                       doc="Largest .h5ad sent through the page; larger ones are kept on the server.")

    embeds_ready = param.Boolean(default=False, doc="obsm['transcriptome_embeds'] of this model is present.")
    layout_key = param.Selector(default=None, objects=[], allow_None=True, doc="obsm key of the 2-D layout.")
    color_by = param.String(default=DENSITY, doc="obs column, or one of the special colourings.")
    gene = param.String(default="")

    query = param.String(default="", doc="Text of the current query.")
    scores = param.Array(default=None, allow_None=True, doc="(n_cells,) float32 logits of the current query.")
    history = param.List(default=[], item_type=QueryRecord)

    selection = param.Array(default=None, allow_None=True, doc="Integer positions of selected cells; None = none.")
    selection_geometry = param.Parameter(default=None, doc="('box', (x0, y0, x1, y1)) or ('lasso', (n, 2) array).")

    zs_probs = param.DataFrame(default=None, allow_None=True, doc="(n_cells, n_labels) zero-shot probabilities.")
    zs_template = param.String(default="cellwhisperer")
    zs_smooth = param.Boolean(default=True, doc="Zero-shot on neighbour-smoothed embeddings (engine.smooth_embeds).")
    evaluation = param.Dict(default=None, allow_None=True, doc="engine.training.evaluate.evaluate result.")

    description = param.DataFrame(default=None, allow_None=True)
    de_table = param.DataFrame(default=None, allow_None=True)
    enrich_table = param.DataFrame(default=None, allow_None=True)
    perturb_table = param.DataFrame(default=None, allow_None=True)
    perturb_values = param.Array(default=None, allow_None=True, doc="(n_cells,) per-cell perturbation effect, NaN elsewhere.")
    perturb_metric = param.String(default="")
    scan_table = param.DataFrame(default=None, allow_None=True)

    message = param.String(default="")
    message_kind = param.Selector(default="info", objects=["info", "success", "warning", "danger"])
    map_version = param.Integer(default=0, doc="Bumped whenever the map must be redrawn.")

    def __init__(self, adata: ad.AnnData, model=None, **params):
        super().__init__(adata=adata, model=model, **params)
        self._base: ad.AnnData | None = None  # the shared dataset, once attach_embeddings has seen it
        self._download_dir = None  # Jupyter downloads: a temporary folder of this session
        self._refresh_layouts()
        self.color_by = self.default_color()
        self.embeds_ready = cache.has_embeddings(adata, model)

    def set_model(self, model) -> None:
        """Attach the model once it is loaded (the map works without it)."""
        self.model = model
        self.embeds_ready = cache.has_embeddings(self.adata, model)

    def default_color(self) -> str:
        """A metadata column to colour by at first: a cell-type-like categorical column, else density."""
        preferred = ("cell_type", "celltype", "cell_ontology_class", "bulk_labels", "leiden", "louvain", "cluster")
        cols = list(self.adata.obs.columns)
        for p in preferred:
            for c in cols:
                if c.lower() == p and 2 <= self.adata.obs[c].nunique() <= 60:
                    return c
        for c in cols:
            s = self.adata.obs[c]
            if isinstance(s.dtype, pd.CategoricalDtype) and 2 <= s.nunique() <= 60:
                return c
        return DENSITY

    # ------------------------------------------------------------------ dataset, layouts
    def layouts(self) -> list[str]:
        """obsm keys of the available 2-D layouts."""
        return [k for k in self.param.layout_key.objects if k]

    def _refresh_layouts(self) -> None:
        keys = cache.layout_keys(self.adata)
        self.param.layout_key.objects = keys
        if self.layout_key not in keys:
            self.layout_key = keys[0] if keys else None

    def attach_embeddings(self, base: ad.AnnData | None = None) -> None:
        """Take over embeddings (and new layouts) computed on the shared ``base`` dataset."""
        if base is not None and base is not self.adata:
            self._base = base
            cache.sync_from_base(self.adata, base)
        self._refresh_layouts()
        self.embeds_ready = cache.has_embeddings(self.adata, self.model)
        self.map_version += 1

    def coords(self) -> np.ndarray | None:
        """``(n_cells, 2)`` float32 coordinates of the current layout, or None without any layout."""
        if self.layout_key is None:
            return None
        return np.asarray(self.adata.obsm[self.layout_key])[:, :2].astype(np.float32, copy=False)

    @property
    def n_cells(self) -> int:
        return int(self.adata.n_obs)

    def notify(self, text: str, kind: str = "info") -> None:
        """Show a message in the page (views watch ``message``)."""
        self.param.update(message=text, message_kind=kind)

    def _require_embeddings(self) -> None:
        if not self.embeds_ready:
            log.debug("no embeddings: state %x model %s obsm %s", id(self), self.model is not None,
                      list(self.adata.obsm.keys()))
            raise MissingEmbeddingError(
                "The cells are still being embedded", found="no transcriptome embeddings yet",
                expected="obsm['transcriptome_embeds']", fix="wait until the progress bar at the top has finished")

    # ------------------------------------------------------------------ colouring
    def obs_color_columns(self) -> list[str]:
        """obs columns that can colour the map (numeric, or categorical with at most 200 values)."""
        out = []
        for c in self.adata.obs.columns:
            s = self.adata.obs[c]
            if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
                out.append(c)
            elif s.nunique(dropna=True) <= MAX_CATEGORIES:
                out.append(c)
        return out

    def color_options(self) -> dict[str, str]:
        """Display name -> ``color_by`` value, for the colour menu."""
        opts = {"Cell density": DENSITY}
        if self.scores is not None:
            opts["Query score"] = QUERY
        if self.gene:
            opts[f"Gene: {self.gene}"] = GENE
        if self.zs_probs is not None:
            opts["Zero-shot label"] = ZERO_SHOT
            opts["Zero-shot confidence"] = ZERO_SHOT_CONF
        if self.perturb_values is not None:
            opts["Perturbation effect"] = PERTURB
        for c in self.obs_color_columns():
            opts[f"obs: {c}"] = c
        return opts

    def zs_labels(self) -> pd.Categorical | None:
        """Predicted zero-shot label per cell (argmax of the probabilities)."""
        if self.zs_probs is None:
            return None
        probs = self.zs_probs.to_numpy()
        labels = list(self.zs_probs.columns)
        return pd.Categorical(np.asarray(labels, dtype=object)[probs.argmax(axis=1)], categories=labels)

    def color_spec(self) -> ColorSpec:
        """The colouring of the map for the current ``color_by``."""
        key = self.color_by
        if key == QUERY and self.scores is not None:
            rec = self.current_record()
            center = rec.center if rec is not None else float(np.nanmedian(self.scores))
            return ColorSpec("diverging", self.scores, name=f"score: {_short(self.query, 40)}",
                             clim=symmetric_clim(self.scores, center=center), center=center)
        if key == GENE and self.gene:
            v = self.gene_values(self.gene)
            hi = float(np.nanquantile(v, 0.995)) if np.isfinite(v).any() else 1.0
            return ColorSpec("continuous", v, name=self.gene, clim=(float(np.nanmin(v)), hi if hi > np.nanmin(v) else hi + 1))
        if key == ZERO_SHOT and self.zs_probs is not None:
            labels = self.zs_labels()
            return ColorSpec("categorical", labels, name="zero-shot label", colors=category_colors(labels.categories))
        if key == ZERO_SHOT_CONF and self.zs_probs is not None:
            conf = self.zs_probs.to_numpy().max(axis=1).astype(np.float32)
            return ColorSpec("continuous", conf, name="zero-shot confidence", clim=(float(1 / self.zs_probs.shape[1]), 1.0))
        if key == PERTURB and self.perturb_values is not None:
            return ColorSpec("diverging", self.perturb_values, name=self.perturb_metric or "perturbation effect",
                             clim=symmetric_clim(self.perturb_values, center=0.0), center=0.0)
        if key in self.adata.obs.columns:
            return self._obs_spec(key)
        return ColorSpec("none", name="cells")

    def _obs_spec(self, col: str) -> ColorSpec:
        s = self.adata.obs[col]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            v = s.to_numpy(dtype=np.float32, na_value=np.nan)
            queries = self.adata.uns.get("lexicell_queries", {})
            if col in (queries if isinstance(queries, dict) else {}) or col.startswith("perturb_delta") or col.endswith("goal_shift"):
                center = 0.0 if ("MINUS" in str(queries.get(col, {}).get("query", "")) or col.startswith("perturb")) else float(np.nanmedian(v))
                return ColorSpec("diverging", v, name=col, clim=symmetric_clim(v, center=center), center=center)
            finite = v[np.isfinite(v)]
            lo, hi = (float(np.quantile(finite, 0.005)), float(np.quantile(finite, 0.995))) if finite.size else (0.0, 1.0)
            return ColorSpec("continuous", v, name=col, clim=(lo, hi if hi > lo else lo + 1))
        cat = pd.Categorical(s.astype(object).where(s.notna(), None)) if not isinstance(s.dtype, pd.CategoricalDtype) else s.cat.remove_unused_categories().array
        cats = [str(c) for c in cat.categories]
        colors = category_colors(cats)
        stored = self.adata.uns.get(f"{col}_colors")
        if stored is not None and len(stored) == len(s.cat.categories if isinstance(s.dtype, pd.CategoricalDtype) else cats):
            all_cats = [str(c) for c in (s.cat.categories if isinstance(s.dtype, pd.CategoricalDtype) else cats)]
            lookup = dict(zip(all_cats, [_hex(c) for c in stored]))
            colors = {c: lookup.get(c) or colors[c] for c in cats}
        return ColorSpec("categorical", cat, name=col, colors=colors)

    def hover_extra(self) -> dict:
        """Extra hover columns: the zero-shot label and the query score when present."""
        extra = {}
        if self.zs_probs is not None and self.color_by != ZERO_SHOT:
            extra["label"] = np.asarray(self.zs_labels(), dtype=object)
        if self.scores is not None and self.color_by != QUERY:
            extra["score"] = np.asarray(self.scores, dtype=np.float32)
        return extra

    def map_frame(self) -> tuple[pd.DataFrame, ColorSpec] | None:
        """The map's table (:func:`app.plots.cell_frame`) and colouring; None without a layout."""
        xy = self.coords()
        if xy is None:
            return None
        spec = self.color_spec()
        return cell_frame(xy, spec, cell_ids=self.adata.obs_names, extra=self.hover_extra()), spec

    def set_color(self, key: str) -> None:
        """Colour the map by an obs column or a special colouring."""
        self.color_by = key
        self.map_version += 1

    # ------------------------------------------------------------------ genes
    def gene_names(self) -> list[str]:
        """Genes that can colour the map (``raw.var_names`` when ``raw`` exists, else ``var_names``)."""
        names = list(self.adata.raw.var_names) if self.adata.raw is not None else list(self.adata.var_names)
        return sorted(dict.fromkeys(map(str, names)))

    def gene_values(self, gene: str) -> np.ndarray:
        """``(n_cells,)`` float32 expression of one gene (``raw`` when present, else ``X``).

        Raises
        ------
        MissingKeyError
            When the gene is unknown (close matches are suggested).
        """
        for source in ((self.adata.raw,) if self.adata.raw is not None else ()) + (self.adata,):
            names = source.var_names
            if gene in names:
                j = int(names.get_loc(gene))
                col = source.X[:, j]
                col = col.toarray() if hasattr(col, "toarray") else np.asarray(col)
                return np.asarray(col, dtype=np.float32).ravel()
        import difflib

        close = difflib.get_close_matches(gene.upper(), [g.upper() for g in self.gene_names()], n=5)
        raise MissingKeyError(f"Gene {gene!r} is not in this dataset", found=f"{len(self.gene_names())} genes",
                              expected=f"a measured gene{' such as ' + ', '.join(close) if close else ''}",
                              fix="pick a gene from the suggestions of the gene box")

    def set_gene(self, gene: str) -> None:
        """Colour the map by a gene's expression."""
        gene = (gene or "").strip()
        if not gene:
            raise QueryError("No gene given", found="an empty gene box", expected="a gene symbol such as CD3D")
        if gene not in self.gene_names():
            matches = [g for g in self.gene_names() if g.upper() == gene.upper()]
            gene = matches[0] if matches else gene
        self.gene_values(gene)  # raises for unknown genes
        self.gene = gene
        self.set_color(GENE)

    # ------------------------------------------------------------------ free-text query
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

    # ------------------------------------------------------------------ zero-shot labels
    def _zs_obsm_key(self, smooth: bool) -> str:
        if not smooth:
            return cache.EMBED_KEY
        return cache.smoothed_key(self.adata, self._base, self.model)

    def compute_zero_shot(self, labels: Sequence[str], template: str = "cellwhisperer", smooth: bool | None = None) -> pd.DataFrame:
        """Zero-shot probabilities ``(n_cells, n_labels)`` for ``labels``; nothing is written.

        ``smooth`` (default :attr:`zs_smooth`) scores the neighbour-smoothed embeddings.
        """
        self._require_embeddings()
        labels = [" ".join(str(lab).split()) for lab in labels if str(lab).strip()]
        key = self._zs_obsm_key(self.zs_smooth if smooth is None else smooth)
        return engine.zero_shot(self.adata, self.model, labels, template=template, obsm_key=key, write=False)

    def apply_zero_shot(self, probs: pd.DataFrame, template: str = "cellwhisperer", smooth: bool | None = None) -> None:
        self.param.update(zs_probs=probs, zs_template=template, color_by=ZERO_SHOT,
                          zs_smooth=self.zs_smooth if smooth is None else smooth)
        self.map_version += 1

    def run_zero_shot(self, labels: Sequence[str], template: str = "cellwhisperer", smooth: bool | None = None) -> pd.DataFrame:
        probs = self.compute_zero_shot(labels, template, smooth)
        self.apply_zero_shot(probs, template, smooth)
        return probs

    def accept_labels(self, name: str = "zero_shot") -> str:
        """Write the zero-shot result as obs columns ``name`` (label) and ``name + '_probability'``."""
        if self.zs_probs is None:
            raise QueryError("No zero-shot labels to accept", found="no zero-shot run", expected="run zero-shot labelling first")
        key = _column_name(name or "zero_shot")
        engine.zero_shot(self.adata, self.model, list(self.zs_probs.columns), template=self.zs_template, key_added=key,
                         obsm_key=self._zs_obsm_key(self.zs_smooth), write=True)
        self.notify(f"Wrote labels to obs['{key}'] and confidences to obs['{key}_probability'].", "success")
        self.param.trigger("map_version")
        return key

    def truth_columns(self) -> list[str]:
        """obs columns usable as ground truth (categorical or text with 2..200 values)."""
        out = []
        for c in self.adata.obs.columns:
            s = self.adata.obs[c]
            if (isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object) and 2 <= s.nunique() <= MAX_CATEGORIES:
                out.append(c)
        return out

    def compute_evaluate(self, label_key: str, template: str = "cellwhisperer", smooth: bool | None = None) -> dict:
        """engine.training.evaluate.evaluate of zero-shot labelling against ``obs[label_key]``.

        The seed's protocol always; with ``smooth`` (default :attr:`zs_smooth`) also the per-cell metrics on
        neighbour-smoothed embeddings (``result['refined']``).
        """
        self._require_embeddings()
        evaluate = importlib.import_module("engine.training.evaluate").evaluate
        return evaluate(self.adata, self.model, label_key, template=template,
                        smooth=self.zs_smooth if smooth is None else smooth)

    def apply_evaluate(self, result: dict) -> None:
        self.evaluation = result

    def run_evaluate(self, label_key: str, template: str = "cellwhisperer", smooth: bool | None = None) -> dict:
        res = self.compute_evaluate(label_key, template, smooth)
        self.apply_evaluate(res)
        return res

    # ------------------------------------------------------------------ describe
    def compute_describe(self, *, libraries: Sequence[str] | None = None, top_n: int = 5) -> pd.DataFrame:
        """Keywords describing the selected cells (engine.describe); ``libraries`` None = all."""
        self._require_embeddings()
        mask = self._selected_or_raise("a description")
        return engine.describe(self.adata, self.model, mask, libraries=libraries, top_n=top_n)

    def apply_describe(self, table: pd.DataFrame) -> None:
        self.description = table

    def run_describe(self, **kw) -> pd.DataFrame:
        t = self.compute_describe(**kw)
        self.apply_describe(t)
        return t

    # ------------------------------------------------------------------ DE + enrichment
    def ranking_scores(self, source: str = QUERY) -> tuple[np.ndarray, str]:
        """Scores to rank cells by: the current query (``QUERY``) or a numeric obs column."""
        if source == QUERY:
            if self.scores is None:
                raise QueryError("No current score to rank cells by", found="no query yet",
                                 expected="a query score", fix="type a query first")
            return self.scores, f"score: {self.query}"
        if source in self.adata.obs.columns:
            return self.adata.obs[source].to_numpy(dtype=np.float64, na_value=np.nan), source
        raise MissingKeyError(f"Unknown score {source!r}", found=list(self.adata.obs.columns)[:10], expected="an obs column")

    def compute_de(self, *, n: int | None = 100, fraction: float | None = None, within_selection: bool = False,
                   source: str = QUERY) -> pd.DataFrame:
        """Top-vs-bottom DE by the current score (engine.de_top_vs_bottom)."""
        scores, _ = self.ranking_scores(source)
        within = self._selected_or_raise("DE inside the selection") if within_selection else None
        kw = {"fraction": fraction} if fraction else {"n": int(n or 100)}
        return engine.de_top_vs_bottom(self.adata, np.asarray(scores, dtype=np.float64), within=within, **kw)

    def apply_de(self, table: pd.DataFrame) -> None:
        self.param.update(de_table=table, enrich_table=None)
        msgs = table.attrs.get("messages") or []
        if msgs:
            self.notify(" ".join(msgs), "warning")

    def run_de(self, **kw) -> pd.DataFrame:
        t = self.compute_de(**kw)
        self.apply_de(t)
        return t

    def up_genes(self, n_genes: int = 50, fdr: float = 0.05) -> tuple[list[str], str]:
        """Up-regulated genes of the DE table for enrichment, and a note on how they were chosen."""
        if self.de_table is None:
            raise AnalysisError("No DE result to enrich", found="no DE run", expected="a top-vs-bottom table",
                                fix="run the DE first")
        t = self.de_table
        up = t[t["direction"] == "up"] if "direction" in t else t[t["logfoldchange"] > 0]
        sig = up[up["pval_adj"] < fdr]
        if len(sig):
            return sig.sort_values("score", ascending=False)["gene"].astype(str).head(n_genes).tolist(), \
                f"{min(len(sig), n_genes)} up-regulated genes with FDR < {fdr}"
        if len(up) == 0:
            raise AnalysisError("No up-regulated genes", found="no gene is higher in the top cells",
                                expected="at least one", fix="use another query or more cells")
        genes = up.sort_values("score", ascending=False)["gene"].astype(str).head(n_genes).tolist()
        return genes, f"no gene passes FDR < {fdr}; using the {len(genes)} best-scoring up-regulated genes"

    def compute_enrich(self, *, n_genes: int = 50, online: bool = False) -> pd.DataFrame:
        """Enrichment of the DE table's up-regulated genes (engine.enrich, offline unless ``online``)."""
        genes, note = self.up_genes(n_genes)
        res = engine.enrich(genes, online=online, background=list(self.gene_names()))
        res.attrs["messages"] = [note, *(res.attrs.get("messages") or [])]
        return res

    def apply_enrich(self, table: pd.DataFrame) -> None:
        self.enrich_table = table

    def run_enrich(self, **kw) -> pd.DataFrame:
        t = self.compute_enrich(**kw)
        self.apply_enrich(t)
        return t

    # ------------------------------------------------------------------ perturbation
    def model_genes(self) -> list[str]:
        """Genes of the dataset the model knows (symbols), for the perturbation gene chooser."""
        tok = self.model.tokenizer
        symbols = getattr(tok, "symbols", None)
        known = {str(s).upper() for s in (symbols if symbols is not None else [])}
        names = self.gene_names()
        if not known:
            return names
        return [g for g in names if g.upper() in known]

    def goal_text(self, goal_label: str | None) -> str | None:
        if not goal_label:
            return None
        return engine.label_texts([goal_label], self.zs_template or "cellwhisperer")[0]

    def compute_perturb(self, genes: Sequence[str], *, mode: str = "delete", goal_label: str | None = None,
                        max_cells: int = 2000, cancel: Callable[[], bool] | None = None) -> pd.DataFrame:
        """In-silico perturbation of the selected cells (all cells when none are selected)."""
        self._require_embeddings()
        genes = [g for g in genes if str(g).strip()]
        if not genes:
            raise QueryError("No gene to perturb", found="an empty gene list", expected="one or more genes")
        mask = self.selection_mask()
        if mask is not None and not mask.any():
            raise EmptySelectionError("The selection is empty", found="0 cells", expected="at least one cell",
                                      fix="clear the selection or select cells")
        return engine.perturb(self.adata, self.model, list(genes), mode=mode, cells=mask,
                              query=self.query or None, goal=self.goal_text(goal_label), max_cells=max_cells,
                              progress=False, cancel=cancel)

    def apply_perturb(self, table: pd.DataFrame) -> None:
        metric = next((c for c in ("delta_logit", "goal_shift", "cos_original_perturbed") if c in table.columns))
        values = np.full(self.n_cells, np.nan, dtype=np.float32)
        pos = self.adata.obs_names.get_indexer(table.index)
        vals = table[metric].to_numpy(dtype=np.float32)
        if metric == "cos_original_perturbed":
            vals, metric = vals - 1.0, "cos_original_perturbed - 1"
        values[pos[pos >= 0]] = vals[pos >= 0]
        label = {"delta_logit": f"Δ score ({self.query})", "goal_shift": "goal shift"}.get(metric, metric)
        self.param.update(perturb_table=table, perturb_values=values, perturb_metric=label, color_by=PERTURB)
        self.map_version += 1

    def run_perturb(self, genes, **kw) -> pd.DataFrame:
        t = self.compute_perturb(genes, **kw)
        self.apply_perturb(t)
        return t

    def compute_scan(self, *, mode: str = "delete", goal_label: str | None = None, max_cells: int = 200,
                     max_genes: int = 50, genes: Sequence[str] | None = None,
                     cancel: Callable[[], bool] | None = None) -> pd.DataFrame:
        """Rank genes by the effect of perturbing each alone (engine.perturb_scan)."""
        self._require_embeddings()
        mask = self.selection_mask()
        return engine.perturb_scan(self.adata, self.model, genes=list(genes) if genes else None, mode=mode,
                                   cells=mask, query=self.query or None, goal=self.goal_text(goal_label),
                                   max_cells=max_cells, max_genes=max_genes, progress=False, cancel=cancel)

    def apply_scan(self, table: pd.DataFrame) -> None:
        self.scan_table = table

    def run_scan(self, **kw) -> pd.DataFrame:
        t = self.compute_scan(**kw)
        self.apply_scan(t)
        return t

    # ------------------------------------------------------------------ export
    def export_adata(self) -> ad.AnnData:
        """A writeable shallow copy of the session's dataset (uns cleaned of values h5ad cannot store)."""
        out = cache.session_adata(self.adata)
        out.uns = _h5ad_safe(dict(self.adata.uns))
        return out

    def save_h5ad(self, path: str | Path) -> Path:
        """Write the annotated dataset to a new .h5ad file; nothing is ever overwritten.

        Served (``save_dir`` set, see ``run_app.py --save-dir``): ``path`` is only a *name*. It is cleaned by
        :func:`app.files.safe_name` (no folders, no ``..``, not hidden, at most 120 characters) and the file is
        written inside ``save_dir``; if the name exists the next free ``name-1.h5ad``, ``name-2.h5ad``, ... is used.
        Jupyter (``save_dir`` None): ``path`` is where the caller says, and an existing file is an error.

        Either way the file is written under a temporary name in the same folder, flushed to disk and then
        linked to its name (:func:`app.files.write_atomic`), so a crash leaves no partial file of that name and
        two saves of one name at the same time never overwrite each other.

        Returns
        -------
        pathlib.Path
            The file written.

        Raises
        ------
        DataError
            When no usable name is given; when ``path`` is the input file or already exists (Jupyter); when the
            folder is missing or writing fails (disk full, unwritable folder).
        """
        if not str(path).strip():
            raise DataError("No file name given", found="an empty path", expected="a new .h5ad file name")
        if self.save_dir:
            folder = files.ensure_dir(self.save_dir)
            files.clean_stale_partials(folder)
            name = files.safe_name(str(path))
            return files.write_atomic(folder, name, self._write_h5ad, numbered=True)
        p = Path(str(path)).expanduser()
        if p.suffix != ".h5ad":
            p = p.with_suffix(p.suffix + ".h5ad") if p.suffix else p.with_suffix(".h5ad")
        if self.input_path and p.resolve() == Path(self.input_path).expanduser().resolve():
            raise DataError("Refusing to overwrite the input dataset", found=str(p),
                            expected="a new file name", fix="choose another file name, e.g. add '_annotated'")
        if p.exists():
            raise DataError("The file already exists", found=str(p), expected="a new file name",
                            fix="choose a new file name (files are never overwritten)")
        if not p.parent.is_dir():
            raise DataError("The folder does not exist", found=str(p.parent), expected="an existing folder")
        return files.write_atomic(p.parent, p.name, self._write_h5ad, numbered=False)

    def _write_h5ad(self, path: Path) -> None:
        self.export_adata().write_h5ad(path)

    def save_name(self, text: str) -> str:
        """The file name a served save of ``text`` would use (before numbering); Jupyter: ``text`` unchanged."""
        return files.safe_name(text) if self.save_dir else str(text)

    def data_warnings(self) -> list[str]:
        """Warnings about how the data was read: mouse genes through human orthologs, genes summed, ...

        From ``uns['transcriptome_embeds']['params']['warnings']`` (:func:`engine.embed_cells`) and
        ``uns['lexicell']['validation']['warnings']`` (:func:`engine.validate`), without repeats.
        """
        out: list[str] = []
        emb = self.adata.uns.get(cache.EMBED_KEY)
        params = emb.get("params", {}) if isinstance(emb, dict) else {}
        val = self.adata.uns.get("lexicell")
        val = val.get("validation", {}) if isinstance(val, dict) else {}
        for src in (params.get("warnings"), val.get("warnings") if isinstance(val, dict) else None):
            if src is None or isinstance(src, str):
                src = [src] if src else []
            out += [str(w) for w in src if str(w) and str(w) not in out]
        return out

    def notify_data_warnings(self) -> None:
        """Show :meth:`data_warnings` in the page (once the embeddings are there)."""
        notes = self.data_warnings()
        if notes and self.embeds_ready:
            self.notify("Note: " + " ".join(notes), "warning")

    def h5ad_bytes(self) -> bytes:
        """The annotated dataset as .h5ad bytes (notebooks; the page downloads through :meth:`download_file`)."""
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "export.h5ad"
            self.export_adata().write_h5ad(f)
            return f.read_bytes()

    def download_file(self, name: str | None = None) -> Path:
        """Write the annotated dataset to a file for a browser download; returns its path.

        Served (``save_dir`` set): a new file in the export folder, exactly as :meth:`save_h5ad` would write it
        (it stays there, also when it is too large to send through the page). Jupyter: a temporary folder of
        this session, replacing the previous download. Run it off the event loop (the write takes seconds on
        large data); nothing is held in memory beyond the written file.

        Raises
        ------
        DataError
            When writing fails (see :meth:`save_h5ad`).
        """
        name = name or f"{_file_stem(self)}_lexicell.h5ad"
        if self.save_dir:
            return self.save_h5ad(name)
        import tempfile

        if self._download_dir is None:
            self._download_dir = tempfile.TemporaryDirectory(prefix="lexicell-download-")
        folder = Path(self._download_dir.name)
        for old in folder.iterdir():
            old.unlink(missing_ok=True)
        return files.write_atomic(folder, files.safe_name(name), self._write_h5ad, numbered=True)

    def download_too_large(self, path: Path) -> str | None:
        """None when ``path`` may be sent through the page, else the message shown instead."""
        size = Path(path).stat().st_size
        if size <= self.max_download_bytes:
            return None
        mb, limit = size / 2**20, self.max_download_bytes / 2**20
        if self.save_dir:
            return (f"The file is {mb:,.0f} MB, above the {limit:,.0f} MB limit for downloads through the page. "
                    f"It was saved on the server instead, as {path.name} in the export folder ({path.parent}).")
        Path(path).unlink(missing_ok=True)
        return (f"The file is {mb:,.0f} MB, above the {limit:,.0f} MB limit for downloads through the page. "
                "Use Save .h5ad to write it to a file instead.")

    def close(self) -> None:
        """Free what this session holds outside its own objects (a download's temporary folder)."""
        if self._download_dir is not None:
            self._download_dir.cleanup()
            self._download_dir = None

    def map_png(self, width: int = 900, height: int = 800) -> bytes:
        """PNG of the current map colouring (datashader + PIL; no browser needed)."""
        frame = self.map_frame()
        if frame is None:
            raise DataError("There is no layout to draw", found="no obsm['X_*'] layout", expected="a UMAP or PCA layout")
        df, spec = frame
        title = f"{self.dataset_name}: {spec.name or 'cells'} ({self.layout_key})"
        return map_png(df, spec, width=width, height=height, title=title)

    # ------------------------------------------------------------------ model
    def model_info(self) -> dict:
        """What the About pane shows about the loaded model."""
        m = self.model
        cfg = m.config_dict()
        return {
            "name": m.name,
            "projection_dim": int(m.projection_dim),
            "logit_scale": float(m.logit_scale.detach().exp().cpu()),
            "fingerprint": m.fingerprint(),
            "source": getattr(m, "_source", None),
            "transcriptome_tower": cfg.get("transcriptome_tower"),
            "text_tower": cfg.get("text_tower"),
            "heads": {"transcriptome": cfg.get("transcriptome_projection"), "text": cfg.get("text_projection")},
            "metadata": dict(getattr(m, "metadata", {}) or {}),
            "config": cfg,
        }


# ---------------------------------------------------------------------- helpers
def _file_stem(state: AppState) -> str:
    """A file-name-safe stem for exports, from the input file or the dataset name."""
    name = Path(state.input_path).stem if state.input_path else state.dataset_name
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_.") or "dataset"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _hex(color) -> str | None:
    """A colour as '#rrggbb' (scanpy stores hex strings, older files RGB float triples), None if unreadable."""
    from matplotlib.colors import to_hex

    try:
        return to_hex(color)
    except (ValueError, TypeError):
        try:
            return to_hex([float(x) for x in str(color).strip("[]() ").replace(",", " ").split()])
        except (ValueError, TypeError):
            return None


def _column_name(name: str) -> str:
    name = re.sub(r"[^0-9A-Za-z_.-]+", "_", str(name).strip()).strip("_")
    if not name:
        raise QueryError("The column name is empty", found=repr(name), expected="a name such as 'my_labels'")
    return name


def _h5ad_safe(obj):
    """Recursively drop None values and turn unsupported scalars into strings so anndata can write ``uns``."""
    if isinstance(obj, dict):
        return {str(k): _h5ad_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        items = [x for x in obj if x is not None]
        if items and all(isinstance(x, (str, int, float, bool, np.number, np.bool_)) for x in items):
            if all(isinstance(x, str) for x in items) or all(not isinstance(x, str) for x in items):
                return np.asarray(items)
            return np.asarray([str(x) for x in items])
        if not items:
            return np.asarray([], dtype=str)
        return {str(i): _h5ad_safe(x) for i, x in enumerate(items)}
    if isinstance(obj, pd.DataFrame):
        df = obj.copy()
        df.attrs = {}
        for c in df.columns:
            if df[c].dtype == object:
                df[c] = df[c].astype(str)
        return df
    if isinstance(obj, (str, int, float, bool, np.ndarray, np.number, np.bool_)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    try:
        import scipy.sparse as sp

        if sp.issparse(obj):
            return obj
    except ImportError:  # pragma: no cover
        pass
    return str(obj)

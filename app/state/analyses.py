"""Zero-shot labels and their evaluation, descriptions, top-vs-bottom DE, enrichment and perturbation.

Each operation comes as ``compute_<op>`` (off the event loop, writes nothing), ``apply_<op>`` (stores the
result) and ``run_<op>`` (both; notebooks and tests).
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

import numpy as np
import pandas as pd

import engine
from engine.errors import AnalysisError, EmptySelectionError, MissingKeyError, QueryError

from .. import cache
from ..plots import MAX_CATEGORIES
from .common import PERTURB, QUERY, ZERO_SHOT, _column_name

__all__ = ["AnalysisMixin"]


class AnalysisMixin:
    """The analyses of an :class:`~app.state.AppState`."""

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
        scores = np.asarray(scores, dtype=np.float64)
        within = self._selected_or_raise("DE inside the selection") if within_selection else None
        kw = {"fraction": fraction} if fraction else {"n": int(n or 100)}
        if within is not None and self.backed:
            # only the selected cells' rows are read from disk (engine.selection_adata), then DE in memory
            return engine.de_top_vs_bottom(engine.selection_adata(self.adata, within), scores[within], **kw)
        return engine.de_top_vs_bottom(self.adata, scores, within=within, **kw)

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

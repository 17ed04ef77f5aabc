"""How the map is coloured: obs columns, genes, the query, zero-shot labels and perturbation effects."""
from __future__ import annotations

import numpy as np
import pandas as pd

import engine
from engine.errors import DataError, MissingKeyError, QueryError

from ..plots import MAX_CATEGORIES, ColorSpec, category_colors, cell_frame, map_png, symmetric_clim
from .common import DENSITY, GENE, PERTURB, QUERY, ZERO_SHOT, ZERO_SHOT_CONF, _hex, _short

__all__ = ["ColouringMixin"]


class ColouringMixin:
    """Colour menu, colour specification, hover columns and gene expression of an :class:`~app.state.AppState`."""

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
        """Extra hover columns, always both: ``label``, the zero-shot label per cell (object, ``"–"`` before
        labels were predicted), and ``score``, the current query's score (float32, NaN before a query).

        A drawn map's hover rows are fixed when it is drawn; with columns that came and went with the session's
        results (until 2026-12-03), the first zero-shot run after a query and the first query after it each
        drew a new map instead of recolouring the shown one (about 0.5 s of server and 0.9 s of browser time).
        """
        n = self.n_cells
        labels = self.zs_labels()
        label = np.asarray(labels, dtype=object) if labels is not None else np.full(n, "–", dtype=object)
        score = (np.asarray(self.scores, dtype=np.float32) if self.scores is not None
                 else np.full(n, np.nan, dtype=np.float32))
        return {"label": label, "score": score}

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
        """``(n_cells,)`` float32 expression of one gene (``raw`` when present, else ``X``; :func:`engine.gene_values`).

        A backed matrix is read in row chunks, never whole; the last gene's values are kept for redraws.

        Raises
        ------
        MissingKeyError
            When the gene is unknown (close matches are suggested).
        """
        cached = self._gene_cache
        if cached is not None and cached[0] == gene:
            return cached[1]
        known = self.adata.var_names if self.adata.raw is None else self.adata.raw.var_names.union(self.adata.var_names)
        if gene in known:
            values = engine.gene_values(self.adata, gene)  # raw first; streamed in row chunks when backed
            self._gene_cache = (gene, values)
            return values
        import difflib

        close = difflib.get_close_matches(gene.upper(), [g.upper() for g in self.gene_names()], n=5)
        raise MissingKeyError(f"Gene {gene!r} is not in this dataset", found=f"{len(self.gene_names())} genes",
                              expected=f"a measured gene{' such as ' + ', '.join(close) if close else ''}",
                              fix="pick a gene from the suggestions of the gene box")

    def set_gene(self, gene: str) -> None:
        """Colour the map by a gene's expression."""
        gene = self.resolve_gene(gene)
        if not gene:
            raise QueryError("No gene given", found="an empty gene box", expected="a gene symbol such as CD3D")
        self.gene_values(gene)  # raises for unknown genes (kept for the redraw)
        self.gene = gene
        self.set_color(GENE)

    def resolve_gene(self, gene: str) -> str:
        """The dataset's spelling of ``gene`` (case-insensitive match), stripped; ``gene`` itself when unknown."""
        gene = (gene or "").strip()
        if gene and gene not in self.gene_names():
            matches = [g for g in self.gene_names() if g.upper() == gene.upper()]
            gene = matches[0] if matches else gene
        return gene


    def map_png(self, width: int = 900, height: int = 800) -> bytes:
        """PNG of the current map colouring (datashader + PIL; no browser needed)."""
        frame = self.map_frame()
        if frame is None:
            raise DataError("There is no layout to draw", found="no obsm['X_*'] layout", expected="a UMAP or PCA layout")
        df, spec = frame
        title = f"{self.dataset_name}: {spec.name or 'cells'} ({self.layout_key})"
        return map_png(df, spec, width=width, height=height, title=title)

"""AnnData -> :class:`~engine.training.pairs.PairedData`: one cell (or bulk sample) = one pair.

Texts come from an ``obs`` column of ready-made descriptions, from a template over ``obs`` columns
(CellWhisperer's appendix E), or from metadata fields templated the LangCell way with Cell Ontology
definitions (seed 001). Expression is read through :func:`engine.io.data.expression_matrix` (counts or
normalised values, log1p undone); the gene table keeps Ensembl IDs and symbols where the AnnData has them.
This is the ``{"type": "anndata"}`` data source of a training config (:func:`engine.training.sources.load_source`).
"""
from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, DataError, MissingKeyError
from .pairs import PairedData, clean_text

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["from_anndata"]

log = logging.getLogger(__name__)

_ENSEMBL_COLS = ("ensembl_id", "gene_ids", "gene_id", "feature_id", "ensembl_gene")
_SYMBOL_COLS = ("gene_symbol", "gene_symbols", "gene_name", "feature_name", "symbol")

_FIELD_NAMES = {
    "cell_type": "cell type",
    "celltype": "cell type",
    "cell_ontology_class": "cell type",
    "free_annotation": "cell type",
    "organ_tissue": "tissue",
    "tissue_general": "tissue",
    "development_stage": "development stage",
    "self_reported_ethnicity": "ethnicity",
}
_DEFAULT_FIELDS = ("cell_type", "cell_ontology_class", "celltype", "tissue", "organ_tissue", "disease")


def _is_cell_type_field(name: str) -> bool:
    n = name.lower()
    return ("cell" in n and "type" in n) or n in ("cell_ontology_class", "free_annotation", "celltype")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() in ("", "nan", "NaN", "None")


def _expression(adata: "AnnData") -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Non-negative expression and gene table of an AnnData (engine.io.data when available)."""
    try:
        from ..io.data import expression_matrix
    except ImportError:  # engine.io.data not available: simple fallback
        expression_matrix = None
    if expression_matrix is not None:
        X, var = expression_matrix(adata, kind="normalized")
        X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)
        return X, var
    if "counts" in adata.layers:
        X, var_src = adata.layers["counts"], adata.var
    elif adata.raw is not None:
        X, var_src = adata.raw.X, adata.raw.var
    else:
        X, var_src = adata.X, adata.var
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr().astype(np.float32)
    if X.nnz and X.data.min() < 0:
        raise DataError(
            "The expression matrix holds negative values",
            found=f"min {float(X.data.min()):.3g}",
            expected="counts or log-normalised values",
            fix="pass raw counts in layers['counts'] or adata.raw",
        )
    if X.nnz and X.data.max() < 30 and not np.allclose(X.data, np.round(X.data)):
        X = X.copy()
        X.data = np.expm1(X.data)  # log1p-normalised: undo the log, ranks then match counts
    var = pd.DataFrame(index=pd.Index(var_src.index.astype(str)))
    for cols, out in ((_ENSEMBL_COLS, "ensembl_id"), (_SYMBOL_COLS, "gene_symbol")):
        for c in cols:
            if c in var_src.columns:
                var[out] = var_src[c].astype(str).to_numpy()
                break
    return X, var



# --------------------------------------------------------------------------- AnnData
def from_anndata(
    adata: "AnnData | str | os.PathLike",
    *,
    text_key: str | None = None,
    fields: Sequence[str] | None = None,
    template: str | None = None,
    ontology_definitions: bool | Sequence[str] = True,
    group_key: str | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> PairedData:
    """Pairs from an AnnData: one cell (or bulk sample) = one pair.

    Texts come from, in order of precedence:

    - ``text_key``: an ``obs`` column of ready-made descriptions;
    - ``template``: a format string over ``obs`` columns, e.g. ``"{cell_type} in the {tissue}"``
      (CellWhisperer's appendix E: ``"{free_annotation} in the {compartment} compartment of the {organ_tissue}"``);
    - ``fields`` (default: those of ``cell_type``, ``cell_ontology_class``, ``celltype``, ``tissue``,
      ``organ_tissue``, ``disease`` present), templated the LangCell way: ``"<field name>: <value>."``
      followed, for cell-type fields, by the Cell Ontology definition (seed 001), e.g.
      ``"cell type: B cell. A lymphocyte of B lineage that is capable of B cell mediated immunity. tissue: blood."``

    Parameters
    ----------
    adata
        An AnnData or a path to an ``.h5ad``. Expression comes from :func:`engine.io.data.expression_matrix`
        (counts or normalised values); nothing in ``adata`` is modified.
    ontology_definitions
        True: append definitions to cell-type fields; False: never; a list: to these fields.
    group_key
        Optional ``obs`` column whose categories become ``groups``.
    max_pairs
        Keep a random subset of this many cells (``seed``).

    Returns
    -------
    PairedData
        Cells with an empty text are dropped; ``meta['obs_name']`` keeps their names.

    Raises
    ------
    MissingKeyError
        A named column is absent, or no default field exists.
    """
    if isinstance(adata, (str, os.PathLike)):
        adata = _read_h5ad(adata)
    obs = adata.obs
    if text_key is not None:
        _require(obs, [text_key])
        texts = [clean_text(v) if not _missing(v) else "" for v in obs[text_key].astype(object)]
    elif template is not None:
        parts = _parse_obs_template(template)
        cols = list(dict.fromkeys(f for _, f in parts if f))
        _require(obs, cols)
        texts = []
        for row in obs[cols].astype(object).itertuples(index=False):
            d = dict(zip(cols, row))
            texts.append("" if any(_missing(v) for v in d.values())
                         else clean_text("".join(lit + (str(d[f]) if f else "") for lit, f in parts)))
    else:
        if fields is None:
            fields = [f for f in _DEFAULT_FIELDS if f in obs.columns]
            if not fields:
                raise MissingKeyError(
                    "No text for the cells: no text column, template or known metadata field",
                    found=f"obs columns {list(obs.columns)[:20]}",
                    expected=f"text_key=..., template=..., or fields among {list(_DEFAULT_FIELDS)}",
                    fix="pass text_key='<column with descriptions>' or fields=['<column>', ...]",
                )
        fields = list(fields)
        _require(obs, fields)
        if ontology_definitions is True:
            def_fields = {f for f in fields if _is_cell_type_field(f)}
        elif ontology_definitions:
            def_fields = set(ontology_definitions)
        else:
            def_fields = set()
        texts = _templated_texts(obs, fields, def_fields)
    keep = np.array([bool(t) for t in texts])
    if max_pairs is not None and keep.sum() > max_pairs:
        pos = np.flatnonzero(keep)
        pos = np.sort(np.random.default_rng(seed).choice(pos, size=int(max_pairs), replace=False))
        keep = np.zeros_like(keep)
        keep[pos] = True
    if not keep.any():
        raise DataError("No cell has a text", found="all texts empty", expected="at least one described cell")
    X, var = _expression(adata)
    idx = np.flatnonzero(keep)
    groups = None
    if group_key is not None:
        _require(obs, [group_key])
        groups = pd.factorize(obs[group_key].astype(str))[0][idx]
    return PairedData(
        X=X[idx],
        var=var,
        texts=[texts[i] for i in idx],
        groups=groups,
        name=name or "anndata",
        meta=pd.DataFrame({"obs_name": np.asarray(adata.obs_names)[idx].astype(str)}),
    )


def _parse_obs_template(template: str) -> list[tuple[str, str | None]]:
    """Split a text template into (literal, obs column) pieces; format specs and conversions are refused
    (``str.format`` with a width such as ``{label:>3000000000}`` would allocate gigabytes)."""
    import string

    if not isinstance(template, str) or len(template) > 2000:
        raise ConfigError("A text template must be a string of at most 2,000 characters",
                          found=f"{type(template).__name__} of length {len(template) if isinstance(template, str) else '?'}",
                          expected="e.g. 'A sample of {cell_type} from {tissue}'")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError("The text template is not valid", found=f"{template!r}: {e}", expected="fields like {cell_type}") from None
    out = []
    for lit, field, spec, conv in parsed:
        if field is not None and (spec or conv or not field or not re.fullmatch(r"[\w .-]+", field)):
            raise ConfigError("Text template fields take no format spec, conversion, index or attribute",
                              found=repr("{" + (field or "") + (("!" + conv) if conv else "") + ((":" + spec) if spec else "") + "}"),
                              expected="plain obs column names such as {cell_type}")
        out.append((lit, field))
    return out


def _require(obs: pd.DataFrame, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in obs.columns]
    if missing:
        raise MissingKeyError(
            f"Column {missing[0]!r} is not in obs",
            found=f"obs columns {list(obs.columns)[:30]}",
            expected=f"columns {list(cols)}",
            fix="pick one of the listed columns",
        )


def _templated_texts(obs: pd.DataFrame, fields: list[str], def_fields: set[str]) -> list[str]:
    defs: dict[str, str] = {}

    def definition_of(v: str) -> str:
        if v not in defs:
            from ..io.ontology import definition

            try:
                d = definition(v)
            except Exception as err:  # noqa: BLE001 - ontology package problems must not stop training
                log.warning("no ontology definition for %r: %s", v, err)
                d = ""
            d = " ".join(str(d).split())
            defs[v] = d if not d or d.endswith(".") else d + "."
        return defs[v]

    values = obs[fields].astype(object).to_numpy()
    codes, uniq = pd.factorize(pd.Series(["\x1f".join(map(str, r)) for r in values]))
    texts_u = []
    for key in uniq:
        parts = []
        for f, v in zip(fields, key.split("\x1f")):
            if _missing(v):
                continue
            v = clean_text(v)
            label = _FIELD_NAMES.get(f, f.replace("_", " "))
            part = f"{label}: {v}."
            if f in def_fields:
                d = definition_of(v)
                if d:
                    part += f" {d}"
            parts.append(part)
        texts_u.append(" ".join(parts))
    return [texts_u[c] for c in codes]


def _read_h5ad(path) -> "AnnData":
    try:
        from ..io.data import read
    except ImportError:
        import anndata as ad

        return ad.read_h5ad(path)
    return read(path)

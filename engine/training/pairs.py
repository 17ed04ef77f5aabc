"""Paired transcriptome-text data for training and retrieval evaluation.

Every source (an AnnData with a text column or templated metadata, an ARCHS4 HDF5
file, knowledge-derived pseudo-cells from :mod:`engine.training.knowledge`) becomes one
:class:`PairedData`: a sparse expression matrix, its genes, one text per row and
optional group ids. CellWhisperer pairs each GEO sample's counts (ARCHS4, Lachmann
et al. 2018) with a natural-language description of its metadata (seed 000 §3.1,
appendix A); LangCell templates cell metadata with Cell Ontology definitions
(seed 001). Readers are small functions behind this one interface.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, DataError, MissingKeyError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = [
    "PairedData",
    "from_anndata",
    "from_archs4",
    "write_tiny_archs4",
    "load_source",
    "clean_text",
]

log = logging.getLogger(__name__)

_ENSEMBL_COLS = ("ensembl_id", "gene_ids", "gene_id", "feature_id", "ensembl_gene")
_SYMBOL_COLS = ("gene_symbol", "gene_symbols", "gene_name", "feature_name", "symbol")


# --------------------------------------------------------------------------- container
@dataclass
class PairedData:
    """Transcriptome-text pairs.

    Attributes
    ----------
    X
        ``(n_pairs, n_genes)`` :class:`scipy.sparse.csr_matrix`, non-negative expression (counts or
        normalised; the rank encoding is invariant to a per-row scale).
    var
        ``(n_genes, ...)`` gene table; index = gene identifiers (Ensembl IDs or symbols); optional columns
        ``ensembl_id`` and ``gene_symbol`` help :meth:`engine.models.tokenizer.RankTokenizer.match_genes`.
    texts
        ``n_pairs`` descriptions, one per row.
    groups
        Optional ``(n_pairs,)`` int64 group ids: pairs of one group share a meaning (one cell type, one gene
        set). Used for soft targets in the loss and for the grouped train/validation split.
    name
        Name of the source (logged in the training metadata).
    meta
        Optional ``(n_pairs, ...)`` per-pair metadata (e.g. ``geo_accession``, ``series_id``).
    """

    X: sp.csr_matrix
    var: pd.DataFrame
    texts: list
    groups: np.ndarray | None = None
    name: str = "paired"
    meta: pd.DataFrame | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        X = self.X
        X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        self.X = X
        if not isinstance(self.var, pd.DataFrame):
            self.var = pd.DataFrame(index=pd.Index([str(g) for g in self.var]))
        self.texts = [str(t) for t in self.texts]
        n = X.shape[0]
        if len(self.texts) != n:
            raise DataError("Paired data needs one text per row", found=f"{len(self.texts)} texts for {n} rows", expected=f"{n} texts")
        if self.var.shape[0] != X.shape[1]:
            raise DataError("Paired data needs one gene per column", found=f"{self.var.shape[0]} genes for {X.shape[1]} columns", expected=f"{X.shape[1]} genes")
        if X.nnz and (X.data.min() < 0 or not np.isfinite(X.data).all()):
            raise DataError("Paired expression must be non-negative and finite", found=f"min {float(np.nanmin(X.data)):.3g}", expected="counts or normalised expression")
        if self.groups is not None:
            g = np.asarray(self.groups).reshape(-1)
            if g.shape[0] != n:
                raise DataError("Paired data needs one group id per row", found=f"{g.shape[0]} ids for {n} rows", expected=f"{n} ids")
            self.groups = g.astype(np.int64)
        if self.meta is not None and len(self.meta) != n:
            raise DataError("Per-pair metadata has the wrong length", found=len(self.meta), expected=n)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def __repr__(self) -> str:
        return (
            f"PairedData(name={self.name!r}, n_pairs={len(self)}, n_genes={self.X.shape[1]}, "
            f"n_texts={len(set(self.texts))}, groups={'none' if self.groups is None else len(np.unique(self.groups))})"
        )

    @property
    def n_genes(self) -> int:
        """Number of gene columns."""
        return int(self.X.shape[1])

    def unique_texts(self) -> tuple[list[str], np.ndarray]:
        """Unique texts (first-seen order) and the ``(n_pairs,)`` int64 index of each pair's text."""
        from .metrics import unique_index

        return unique_index(self.texts)

    def split_keys(self) -> np.ndarray:
        """``(n_pairs,)`` ids that define "the same meaning": ``groups`` if set, else the unique-text index."""
        return self.groups if self.groups is not None else self.unique_texts()[1]

    def subset(self, idx) -> "PairedData":
        """Rows ``idx`` (int positions, bool mask or slice) as a new :class:`PairedData`."""
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        return PairedData(
            X=self.X[idx],
            var=self.var.copy(),
            texts=[self.texts[i] for i in idx],
            groups=None if self.groups is None else self.groups[idx],
            name=self.name,
            meta=None if self.meta is None else self.meta.iloc[idx].reset_index(drop=True),
        )

    @staticmethod
    def concat(parts: Sequence["PairedData"], *, name: str | None = None) -> "PairedData":
        """Stack paired data sets over the union of their genes.

        Genes are matched by the ``var`` index (duplicate identifiers within one part are summed); missing
        genes are zero. Group ids are offset per part so groups of different parts never merge; parts
        without groups get one group per unique text when another part has groups.

        Raises
        ------
        DataError
            If ``parts`` is empty.
        """
        parts = [p for p in parts if p is not None]
        if not parts:
            raise DataError("Nothing to concatenate", found="no paired data", expected="at least one PairedData")
        if len(parts) == 1:
            return parts[0] if name is None else PairedData(parts[0].X, parts[0].var, parts[0].texts, parts[0].groups, name, parts[0].meta)
        deduped = [_collapse_duplicate_genes(p.X, p.var) for p in parts]
        genes = pd.Index([])
        for _, var in deduped:
            genes = genes.append(var.index[~var.index.isin(genes)])
        union = pd.DataFrame(index=genes.astype(str))
        for col in ("ensembl_id", "gene_symbol"):
            vals = pd.Series(np.nan, index=union.index, dtype=object)
            for _, var in deduped:
                if col in var.columns:
                    vals = vals.combine_first(var[col].astype(object))
            if vals.notna().any():
                union[col] = vals.reindex(union.index)
        blocks = []
        for X, var in deduped:
            coo = X.tocoo()
            cols = union.index.get_indexer(var.index)[coo.col]
            blocks.append(sp.csr_matrix((coo.data, (coo.row, cols)), shape=(X.shape[0], len(union))))
        any_groups = any(p.groups is not None for p in parts)
        groups = None
        if any_groups:
            gl, offset = [], 0
            for p in parts:
                g = p.groups if p.groups is not None else p.unique_texts()[1]
                _, g = np.unique(g, return_inverse=True)
                gl.append(g + offset)
                offset += int(g.max(initial=-1)) + 1
            groups = np.concatenate(gl)
        meta = None
        if any(p.meta is not None for p in parts):
            meta = pd.concat(
                [(p.meta if p.meta is not None else pd.DataFrame(index=range(len(p)))).assign(source=p.name) for p in parts],
                ignore_index=True,
            )
        return PairedData(
            X=sp.vstack(blocks).tocsr(),
            var=union,
            texts=[t for p in parts for t in p.texts],
            groups=groups,
            name=name or "+".join(p.name for p in parts),
            meta=meta,
        )

    def split(self, val_fraction: float = 0.05, seed: int = 0, by_group: bool = True) -> tuple["PairedData", "PairedData"]:
        """Split into training and validation pairs.

        Parameters
        ----------
        val_fraction
            Target fraction of pairs in validation (0 gives an empty validation set).
        seed
            Seed of the shuffle.
        by_group
            Keep every group (``groups``, or identical texts when ``groups`` is None) on one side, so
            validation measures generalisation to unseen meanings. With a single group the split falls back
            to single pairs.

        Returns
        -------
        (PairedData, PairedData)
            ``(train, validation)``.
        """
        n = len(self)
        if not 0 <= val_fraction < 1:
            raise ConfigError("val_fraction must lie in [0, 1)", found=val_fraction, expected="e.g. 0.05")
        rng = np.random.default_rng(seed)
        n_val = int(round(val_fraction * n))
        if n_val == 0:
            return self, self.subset(np.array([], dtype=np.int64))
        keys = self.split_keys() if by_group else np.arange(n)
        uniq, inv = np.unique(keys, return_inverse=True)
        if len(uniq) < 2:
            log.warning("only one group in %s: splitting single pairs instead", self.name)
            uniq, inv = np.arange(n), np.arange(n)
        order = rng.permutation(len(uniq))
        sizes = np.bincount(inv, minlength=len(uniq))
        chosen, total = [], 0
        for g in order:
            if total >= n_val:
                break
            if len(chosen) == len(uniq) - 1:
                break  # always leave one group for training
            chosen.append(g)
            total += sizes[g]
        is_val = np.isin(inv, np.asarray(chosen, dtype=np.int64))
        return self.subset(~is_val), self.subset(is_val)


def _collapse_duplicate_genes(X: sp.csr_matrix, var: pd.DataFrame) -> tuple[sp.csr_matrix, pd.DataFrame]:
    idx = var.index.astype(str)
    if idx.is_unique:
        return X, var.set_axis(idx)
    codes, uniq = pd.factorize(idx)
    M = sp.csr_matrix((np.ones(len(codes), dtype=np.float32), (np.arange(len(codes)), codes)), shape=(len(codes), len(uniq)))
    first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
    new_var = var.iloc[first].set_axis(pd.Index(uniq, dtype=str))
    return (X @ M).tocsr(), new_var


# --------------------------------------------------------------------------- text helpers
def clean_text(text: object) -> str:
    """ASCII, single-spaced text without control characters (``''`` for missing values)."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = re.sub(r",(?=\S)", ", ", text)  # ARCHS4 joins characteristics with bare commas
    return " ".join(text.split()).strip(" ;,")


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


# --------------------------------------------------------------------------- ARCHS4
def _decode(arr) -> np.ndarray:
    return np.array([clean_text(x) for x in np.asarray(arr).reshape(-1)], dtype=object)


def from_archs4(
    h5_path: str | os.PathLike,
    *,
    samples: Sequence[str] | Sequence[int] | np.ndarray | None = None,
    text_fields: Sequence[str] = ("title", "characteristics_ch1", "source_name_ch1"),
    max_samples: int | None = None,
    seed: int = 0,
    chunk_size: int = 2000,
    max_genes_per_sample: int | None = None,
    progress: bool = False,
    name: str | None = None,
) -> PairedData:
    """Pairs from an ARCHS4 HDF5 file (Lachmann et al. 2018), CellWhisperer's training source (seed 000 §3.1).

    Layout read: ``data/expression`` (genes x samples, integer counts), ``meta/genes/symbol`` (also
    ``gene_symbol`` or ``genes``), ``meta/genes/ensembl_gene`` if present, and
    ``meta/samples/{geo_accession, series_id, <text_fields>}``. Expression is read in chunks of samples.

    Parameters
    ----------
    samples
        GSM accessions, integer sample positions or a boolean mask; default all samples.
    text_fields
        ``meta/samples`` fields joined (cleaned, de-duplicated, ``". "``-separated) into the text. CellWhisperer
        rewrote such metadata with an LLM; here it is used as is.
    max_samples
        Keep a random subset of this many samples (``seed``).
    chunk_size
        Samples read per HDF5 access.
    max_genes_per_sample
        Keep only each sample's this many highest counts (bounds memory for large selections; choose it well
        above the tokenizer's ``max_length``, since ranks are taken after division by gene medians).

    Returns
    -------
    PairedData
        Samples with an empty text are dropped; ``meta`` has ``geo_accession`` and ``series_id``.

    Raises
    ------
    DataError
        Missing file, missing datasets, or unknown accessions.
    """
    import h5py
    from tqdm.auto import tqdm

    path = Path(h5_path).expanduser()
    if not path.is_file():
        raise DataError("The ARCHS4 file does not exist", found=str(path), expected="an ARCHS4 .h5 file")
    with h5py.File(path, "r") as f:
        for key in ("data/expression", "meta/samples/geo_accession"):
            if key not in f:
                raise DataError("The file is not in the ARCHS4 layout", found=f"no {key!r} in {path.name}", expected="data/expression and meta/samples/*")
        ds = f["data/expression"]
        n_genes, n_samples = ds.shape
        gmeta = f["meta/genes"]
        sym_key = next((k for k in ("symbol", "gene_symbol", "genes") if k in gmeta), None)
        symbols = _decode(gmeta[sym_key][()]) if sym_key else None
        ensembl = _decode(gmeta["ensembl_gene"][()]) if "ensembl_gene" in gmeta else None
        if symbols is None and ensembl is None:
            raise DataError("The ARCHS4 file has no gene identifiers", found=list(gmeta.keys()), expected="meta/genes/symbol or meta/genes/ensembl_gene")
        smeta = f["meta/samples"]
        gsm = _decode(smeta["geo_accession"][()])
        if samples is None:
            sel = np.arange(n_samples)
        else:
            arr = np.asarray(samples)
            if arr.dtype == bool:
                sel = np.flatnonzero(arr)
            elif np.issubdtype(arr.dtype, np.integer):
                sel = arr.astype(np.int64)
            else:
                pos = pd.Index(gsm).get_indexer(arr.astype(str))
                if (pos < 0).any():
                    raise DataError("Some samples are not in the ARCHS4 file", found=list(arr[pos < 0][:5]), expected="GSM accessions of the file")
                sel = pos
        sel = np.unique(sel)
        texts_all = {}
        for fld in text_fields:
            if fld not in smeta:
                raise DataError("A text field is not in the ARCHS4 file", found=f"meta/samples has {sorted(smeta.keys())[:20]}", expected=f"field {fld!r}")
            texts_all[fld] = _decode(smeta[fld][()])
        series = _decode(smeta["series_id"][()]) if "series_id" in smeta else np.array([""] * n_samples, dtype=object)
        texts = []
        for i in sel:
            seen, parts = set(), []
            for fld in text_fields:
                v = texts_all[fld][i]
                if v and v.lower() not in seen:
                    seen.add(v.lower())
                    parts.append(v.rstrip("."))
            texts.append(". ".join(parts))
        keep = np.array([bool(t) for t in texts])
        sel, texts = sel[keep], [t for t, k in zip(texts, keep) if k]
        if max_samples is not None and sel.size > max_samples:
            pick = np.sort(np.random.default_rng(seed).choice(sel.size, size=int(max_samples), replace=False))
            sel, texts = sel[pick], [texts[i] for i in pick]
        if sel.size == 0:
            raise DataError("No ARCHS4 sample has a text", found=f"{n_samples} samples", expected="samples with metadata")
        blocks = []
        for start in tqdm(range(0, sel.size, chunk_size), desc="Reading ARCHS4", disable=not progress, unit="chunk"):
            cols = sel[start : start + chunk_size]
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            if hi - lo <= 4 * cols.size:  # read the bounding block, then pick columns
                block = ds[:, lo:hi][:, cols - lo]
            else:
                block = ds[:, cols.tolist()]
            block = np.asarray(block, dtype=np.float32).T  # samples x genes
            if max_genes_per_sample is not None and block.shape[1] > max_genes_per_sample:
                cut = np.partition(block, -int(max_genes_per_sample), axis=1)[:, -int(max_genes_per_sample)][:, None]
                block = np.where(block >= cut, block, 0.0)  # ties at the cut may keep a few more
            blocks.append(sp.csr_matrix(block))
    X = sp.vstack(blocks).tocsr()
    if ensembl is not None:
        ens = np.array([e.split(".")[0] for e in ensembl], dtype=object)
        var = pd.DataFrame({"ensembl_id": ens}, index=pd.Index(ens.astype(str)))
        if symbols is not None:
            var["gene_symbol"] = symbols
    else:
        var = pd.DataFrame({"gene_symbol": symbols}, index=pd.Index(symbols.astype(str)))
    meta = pd.DataFrame({"geo_accession": gsm[sel].astype(str), "series_id": series[sel].astype(str)})
    return PairedData(X=X, var=var, texts=texts, groups=None, name=name or f"archs4:{path.name}", meta=meta)


def write_tiny_archs4(
    path: str | os.PathLike,
    *,
    genes: Sequence[str] | None = None,
    ensembl: Sequence[str] | None = None,
    n_samples: int = 60,
    seed: int = 0,
) -> Path:
    """Write a tiny file in the ARCHS4 HDF5 layout (for tests and examples).

    Samples come in three kinds (B cells, T cells, monocytes) whose marker genes are over-expressed.

    Parameters
    ----------
    genes
        Gene symbols (default: 30 immune genes).
    ensembl
        Ensembl IDs written to ``meta/genes/ensembl_gene`` (``None``: made-up ``ENSG9…`` IDs with versions).

    Returns
    -------
    pathlib.Path
        The file written: ``data/expression`` (uint32, genes x samples), ``meta/genes/{symbol,ensembl_gene}``,
        ``meta/samples/{geo_accession,title,characteristics_ch1,source_name_ch1,series_id}``.
    """
    import h5py

    genes = list(genes) if genes is not None else [
        "CD3D", "CD3E", "CD2", "IL7R", "CCR7", "MS4A1", "CD79A", "CD79B", "CD19", "CD74",
        "LYZ", "CD14", "S100A8", "S100A9", "CST3", "ACTB", "GAPDH", "B2M", "MALAT1", "PTPRC",
        "NKG7", "GNLY", "HBB", "PPBP", "MKI67", "TOP2A", "FCGR3A", "SELL", "LEF1", "TCF7",
    ]
    if ensembl is None:
        ensembl = [f"ENSG9{i:010d}.1" for i in range(len(genes))]
    rng = np.random.default_rng(seed)
    kinds = {
        "B cell": ["MS4A1", "CD79A", "CD79B", "CD19"],
        "T cell": ["CD3D", "CD3E", "CD2", "IL7R"],
        "monocyte": ["LYZ", "CD14", "S100A8", "S100A9"],
    }
    names = list(kinds)
    base = rng.gamma(1.0, 20.0, size=len(genes))
    expr = np.zeros((len(genes), n_samples), dtype=np.uint32)
    title, chars, source, gsm, series = [], [], [], [], []
    for j in range(n_samples):
        k = names[j % 3]
        mu = base.copy()
        mu[np.isin(genes, kinds[k])] *= 30
        expr[:, j] = rng.poisson(mu)
        gsm.append(f"GSM{1000000 + j}")
        series.append(f"GSE{100 + j // 10}")
        title.append(f"{k} donor {j // 3} rep{j % 2 + 1}")
        chars.append(f"cell type: {k},tissue: peripheral blood,donor: D{j // 3}")
        source.append("peripheral blood" if j % 2 else f"{k}s")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sdt = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.create_dataset("data/expression", data=expr, chunks=(len(genes), min(n_samples, 16)), compression="gzip")
        f.create_dataset("meta/genes/symbol", data=np.array(genes, dtype=object), dtype=sdt)
        f.create_dataset("meta/genes/ensembl_gene", data=np.array(list(ensembl), dtype=object), dtype=sdt)
        for key, vals in (("geo_accession", gsm), ("title", title), ("characteristics_ch1", chars), ("source_name_ch1", source), ("series_id", series)):
            f.create_dataset(f"meta/samples/{key}", data=np.array(vals, dtype=object), dtype=sdt)
    return path


# --------------------------------------------------------------------------- config sources
def _resolve(path: str, base_dir: Path | None) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        return str(base_dir / p)
    return str(p)


#: Module paths used by configs written before the engine was split into layers (lexicell 0.1.0 up to
#: 2026-12-02): ``"engine.knowledge:build_pairs"`` in an old ``config.json`` still resolves.
MOVED_MODULES = {
    "engine.knowledge": "engine.training.knowledge",
    "engine.corpus": "engine.training.corpus",
    "engine.pairs": "engine.training.pairs",
    "engine.train": "engine.training.train",
}


def import_callable(spec: str):
    """Import ``"package.module:function"`` and return the function.

    Module paths from before the layered engine (:data:`MOVED_MODULES`) are mapped to their new home.

    Raises
    ------
    ConfigError
        If the module or attribute cannot be imported.
    """
    if ":" not in spec:
        raise ConfigError("A callable must be written 'module:function'", found=repr(spec), expected="e.g. 'engine.training.knowledge:build_pairs'")
    mod, attr = spec.split(":", 1)
    mod = MOVED_MODULES.get(mod, mod)
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError("Cannot import the callable", found=f"{spec}: {err}", expected="an importable 'module:function'") from err
    if not callable(obj):
        raise ConfigError("The named object is not callable", found=spec, expected="a function")
    return obj


def load_source(spec: dict, *, base_dir: str | os.PathLike | None = None) -> PairedData:
    """Read one data source of a training config.

    Parameters
    ----------
    spec
        ``{"type": "anndata", "path": ..., <from_anndata kwargs>}``, ``{"type": "archs4", "path": ...,
        <from_archs4 kwargs>}`` or ``{"type": "python", "callable": "module:function", "kwargs": {...}}``
        (the function returns a :class:`PairedData` or a list of them). Optional ``name``.
    base_dir
        Folder against which relative paths are tried first (the config file's folder).

    Raises
    ------
    ConfigError
        Unknown type, missing path or callable, or a callable that returns something else.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError("A data source needs a 'type'", found=repr(spec)[:200], expected="{'type': 'anndata'|'archs4'|'python', ...}")
    spec = dict(spec)
    kind = str(spec.pop("type")).lower()
    base = Path(base_dir) if base_dir is not None else None
    if kind in ("anndata", "h5ad"):
        if "path" not in spec:
            raise ConfigError("An anndata source needs a 'path'", found=sorted(spec), expected="'path'")
        path = _resolve(spec.pop("path"), base)
        return from_anndata(path, **spec)
    if kind == "archs4":
        if "path" not in spec:
            raise ConfigError("An archs4 source needs a 'path'", found=sorted(spec), expected="'path'")
        path = _resolve(spec.pop("path"), base)
        return from_archs4(path, **spec)
    if kind == "python":
        if "callable" not in spec:
            raise ConfigError("A python source needs a 'callable'", found=sorted(spec), expected="'callable': 'module:function'")
        fn = import_callable(spec["callable"])
        out = fn(**dict(spec.get("kwargs") or {}))
        if isinstance(out, (list, tuple)):
            out = PairedData.concat(list(out))
        if not isinstance(out, PairedData):
            raise ConfigError("A python data source must return PairedData", found=type(out).__name__, expected="engine.training.pairs.PairedData")
        if spec.get("name"):
            out.name = str(spec["name"])
        return out
    raise ConfigError("Unknown data source type", found=repr(kind), expected="'anndata', 'archs4' or 'python'")

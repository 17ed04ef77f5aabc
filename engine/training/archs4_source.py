"""ARCHS4 HDF5 -> :class:`~engine.training.pairs.PairedData` (Lachmann et al. 2018), CellWhisperer's training source.

GEO samples' counts (``data/expression``, genes x samples) read in chunks of samples, paired with their
metadata fields joined into one text (seed 000 §3.1; CellWhisperer rewrote that metadata with an LLM, here
it is used as is). Also writes a tiny file in the same layout for tests and examples. This is the
``{"type": "archs4"}`` data source of a training config (:func:`engine.training.sources.load_source`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import DataError
from .pairs import PairedData, clean_text

__all__ = ["from_archs4", "write_tiny_archs4"]


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

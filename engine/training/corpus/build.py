"""Turn the fetched corpus files into one AnnData of labelled expression profiles.

Every data set of the manifest is read with its reader spec, put on a linear scale, mapped to human Ensembl
genes (mouse through one-to-one orthologs, :mod:`engine.io.orthologs`), normalised to 10,000 per profile and
labelled with Cell Ontology terms. The result has the obs columns of CELLxGENE's schema that a
LangCell-style text needs (seed 001): ``cell_type_ontology_term_id``, ``cell_type``, ``tissue``,
``species``, ``assay``, ``dataset``, ``description``; :mod:`engine.training.corpus.texts` phrases them.

Reader spec (``reader`` of a manifest data set)::

    {"file": "ref.rda",            # a file of the data set ("name" in "files")
     "object": "ref_hema",          # object name inside an .rda (default: the only/first one)
     "orientation": "genes_x_profiles" | "profiles_x_genes",
     "values": "log2" | "log2p1" | "log2_offset" | "log1p" | "linear",
     "offset": 0.1,                 # for log2_offset: linear = 2**v - offset
     "background": "none" | "median",   # microarray: subtract each profile's median linear value
     "meta_file": "meta.rda", "meta_object": null, "cell_column": "rn", "label_column": "cell_type1",
     "label_object": "obj/cellType",  # or: a label vector aligned with the profiles, in "file" (or "label_file")
     "max_per_label": 200}          # single cells with a metadata table: up to N cells per label
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import ConfigError, DataError
from .manifest import ChecksumError, load_manifest, sha256_of

__all__ = ["read_object", "read_dataset", "build_corpus", "TARGET_SUM", "OBS_COLUMNS"]

log = logging.getLogger(__name__)

TARGET_SUM = 1e4
OBS_COLUMNS = ("cell_type_ontology_term_id", "cell_type", "source_label", "tissue", "species", "assay",
               "dataset", "profile_kind", "description", "n_cells")


def read_object(path: str | os.PathLike, obj: str | None = None) -> pd.DataFrame:
    """Read a table from an ``.rda``/``.rds`` (pure-Python ``rdata``), ``.csv``/``.tsv`` (optionally gzipped) or ``.h5ad``.

    Returns
    -------
    pandas.DataFrame
        As stored (rows and columns as in the file; an R matrix keeps its dimnames).

    Raises
    ------
    DataError
        Unknown format, an object not in the file, or a file the reader cannot parse.
    """
    p = Path(path)
    name = p.name.lower()
    try:
        if name.endswith(".zip"):  # one text table inside a zip archive
            import zipfile

            with zipfile.ZipFile(p) as z:
                member = obj or next(n for n in z.namelist() if not n.endswith("/") and "__MACOSX" not in n)
                sep = "," if member.lower().endswith(".csv") else "\t"
                with z.open(member) as fh:
                    return pd.read_csv(fh, sep=sep, index_col=0)
        if name.endswith((".rda", ".rdata", ".rds")):
            data = _read_r(p)
            if isinstance(data, dict) and obj is None:
                data = data[next(iter(data))]
            elif obj is not None:
                data = _get_path(data, obj, p)
            return _to_frame(data, p)
        if name.endswith(".h5ad"):
            import anndata as ad

            a = ad.read_h5ad(p)
            X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
            return pd.DataFrame(X, index=a.obs_names, columns=a.var_names)
        if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
            sep = "," if ".csv" in name else "\t"
            return pd.read_csv(p, sep=sep, index_col=0)
    except DataError:
        raise
    except Exception as e:  # parsers raise many kinds
        raise DataError("Could not read a corpus file", found=f"{p.name}: {type(e).__name__}: {e}",
                        expected="a readable .rda/.rds/.csv/.tsv/.h5ad file", fix="fetch it again (checksums are verified).") from None
    raise DataError("Unknown corpus file format", found=p.name, expected=".rda, .rds, .csv(.gz), .tsv(.gz), .txt(.gz), .h5ad")


def _read_r(p: Path):
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if p.name.lower().endswith(".rds"):
            return rdata.read_rds(p, default_encoding="utf8")
        return rdata.read_rda(p, default_encoding="utf8")


def _get_path(data: Any, path: str, p: Path) -> Any:
    """Follow ``a/b/c`` through R lists (dicts) and S4 slots (attributes)."""
    for part in path.split("/"):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif hasattr(data, part):
            data = getattr(data, part)
        else:
            avail = ", ".join(map(str, data.keys())) if isinstance(data, dict) else type(data).__name__
            raise DataError("Object not found in the R data file", found=f"{p.name}: {avail}", expected=path)
    return data


def _to_frame(data: Any, p: Path) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if hasattr(data, "to_pandas") and getattr(data, "ndim", 0) == 1:
        return data.to_pandas().to_frame()
    if all(hasattr(data, a) for a in ("x", "i", "p", "Dim", "Dimnames")):  # Matrix::dgCMatrix
        X = sp.csc_matrix((np.asarray(data.x), np.asarray(data.i), np.asarray(data.p)), shape=tuple(int(d) for d in data.Dim))
        rows, cols = data.Dimnames
        return pd.DataFrame(X.toarray(), index=[str(r) for r in rows], columns=[str(c) for c in cols])
    if hasattr(data, "dims") and hasattr(data, "coords"):  # xarray.DataArray from an R matrix
        d0, d1 = data.dims
        rows = data.coords[d0].values if d0 in data.coords else np.arange(data.shape[0])
        cols = data.coords[d1].values if d1 in data.coords else np.arange(data.shape[1])
        return pd.DataFrame(np.asarray(data.values), index=[str(r) for r in rows], columns=[str(c) for c in cols])
    if sp.issparse(data):
        raise DataError("A sparse R matrix needs its dimnames", found=p.name, expected="a dense matrix or data frame")
    raise DataError("Unsupported object in an R data file", found=f"{p.name}: {type(data).__name__}", expected="a matrix or data.frame")


def _linear(values: np.ndarray, spec: dict) -> np.ndarray:
    kind = spec.get("values", "linear")
    v = np.asarray(values, dtype=np.float64)
    if kind == "log2":
        lin = np.exp2(v)
    elif kind == "log2p1":
        lin = np.exp2(v) - 1.0
    elif kind == "log2_offset":
        lin = np.exp2(v) - float(spec.get("offset", 1.0))
    elif kind == "log1p":
        lin = np.expm1(v)
    elif kind == "linear":
        lin = v
    else:
        raise ConfigError("Unknown value kind in a reader spec", found=repr(kind), expected="log2 | log2p1 | log2_offset | log1p | linear")
    lin = np.where(np.isfinite(lin), lin, 0.0)
    if spec.get("background", "none") == "median":  # microarray: intensities above each profile's median
        lin = lin - np.median(lin, axis=1, keepdims=True)
    return np.clip(lin, 0.0, None)


def _gene_ids(genes: pd.Index, species: str) -> tuple[np.ndarray, np.ndarray]:
    """Human Ensembl ID and symbol per input gene ('' where unmapped)."""
    from ..knowledge import to_ensembl

    g = np.asarray([str(x).split(".")[0] if str(x).upper().startswith("ENS") else str(x) for x in genes], dtype=object)
    if species == "mouse":
        from ...io.orthologs import mouse_to_human_symbols

        g = mouse_to_human_symbols(g)
    if len(g) and all(str(x).upper().startswith("ENSG") for x in g[:50]):
        from ..knowledge import gene_table

        gt = gene_table().drop_duplicates("ensembl_id").set_index("ensembl_id")["symbol"]
        sym = gt.reindex(g).fillna("").to_numpy(dtype=object)
        ens = np.where(sym != "", g, "")
        return ens, sym
    return to_ensembl(g)


def read_dataset(ds: dict, folder: str | os.PathLike, *, verify: bool = True) -> tuple[sp.csr_matrix, pd.DataFrame, pd.DataFrame]:
    """Read one manifest data set from ``folder/<id>/`` into profiles on human genes.

    Returns
    -------
    (scipy.sparse.csr_matrix, pandas.DataFrame, pandas.DataFrame)
        ``(n_profiles, n_genes)`` float32 expression normalised to :data:`TARGET_SUM` per profile, ``obs``
        (:data:`OBS_COLUMNS`) and ``var`` (index human Ensembl ID, column ``gene_symbol``). Profiles whose
        label maps to ``null`` in the label table are dropped.

    Raises
    ------
    ChecksumError
        A file differs from the manifest's sha256 (``verify``).
    DataError
        A missing file, a label absent from the label table, or no profile left.
    """
    base = Path(folder) / ds["id"]
    files = {f["name"]: f for f in ds["files"]}
    for f in ds["files"]:
        p = base / f["name"]
        if not p.exists():
            raise DataError(f"Corpus file missing for {ds['id']}", found=str(p), expected="the fetched file",
                            fix=f"run `python -m engine.corpus fetch --to {folder}` first.")
        if verify and sha256_of(p) != f["sha256"]:
            raise ChecksumError(f"Checksum mismatch for {ds['id']}/{f['name']}", found=sha256_of(p), expected=f["sha256"],
                                fix="fetch the file again.")
    spec = ds["reader"]
    if spec["file"] not in files:
        raise ConfigError("A reader spec names a file the data set does not list", found=spec["file"], expected=", ".join(files))
    mat = read_object(base / spec["file"], spec.get("object"))
    if spec.get("orientation", "genes_x_profiles") == "genes_x_profiles":
        mat = mat.T
    mat = mat.apply(pd.to_numeric, errors="coerce").fillna(0.0)
    if spec.get("label_object"):  # a label vector aligned with the profiles, e.g. "obj/cellType"
        vec = _get_path(_read_r(base / spec.get("label_file", spec["file"])), spec["label_object"], base)
        vec = np.asarray(vec.to_numpy() if hasattr(vec, "to_numpy") else vec, dtype=object).ravel()
        if vec.size != mat.shape[0]:
            raise DataError(f"Label vector of {ds['id']} does not match its profiles", found=f"{vec.size} labels, {mat.shape[0]} profiles",
                            expected="one label per profile")
        source_labels = np.asarray([str(v) for v in vec], dtype=object)
    elif spec.get("meta_file"):
        meta = read_object(base / spec["meta_file"], spec.get("meta_object"))
        cells = meta[spec["cell_column"]].astype(str) if spec.get("cell_column") else meta.index.astype(str)
        lab = pd.Series(meta[spec["label_column"]].astype(str).to_numpy(), index=cells.to_numpy())
        lab = lab[~lab.index.duplicated()]
        common = mat.index.astype(str).intersection(lab.index)
        mat = mat.loc[common]
        source_labels = lab.reindex(common).to_numpy()
    else:
        source_labels = np.asarray([str(c).strip() for c in mat.index], dtype=object)
    labels = {str(k).strip(): v for k, v in ds["labels"].items()}
    unknown = sorted({s for s in source_labels if s.strip() not in labels})
    if unknown:
        raise DataError(f"Labels of {ds['id']} missing from its label table", found=", ".join(unknown[:10]),
                        expected="every source label in the manifest (null to drop it)")
    keep = np.asarray([labels[s.strip()] is not None for s in source_labels])
    cap = spec.get("max_per_label")
    if cap:
        rng = np.random.default_rng(0)
        idx = []
        for s in pd.unique(source_labels[keep]):
            hits = np.flatnonzero(keep & (source_labels == s))
            idx.extend(sorted(rng.choice(hits, size=min(cap, hits.size), replace=False)))
        sel = np.asarray(sorted(idx), dtype=int)
    else:
        sel = np.flatnonzero(keep)
    if sel.size == 0:
        raise DataError(f"No labelled profile left in {ds['id']}", found=f"{len(source_labels)} profiles", expected="at least one kept label")
    lin = _linear(mat.to_numpy()[sel], spec)
    ens, sym = _gene_ids(mat.columns, ds["species"])
    ok = ens != ""
    uniq, inv = np.unique(ens[ok].astype(str), return_inverse=True)
    M = sp.csr_matrix((np.ones(inv.size), (np.arange(inv.size), inv)), shape=(inv.size, uniq.size))
    X = sp.csr_matrix(lin[:, ok]) @ M
    totals = np.asarray(X.sum(axis=1)).ravel()
    if (totals <= 0).any():
        raise DataError(f"Empty profiles in {ds['id']}", found=f"{int((totals <= 0).sum())} profiles with no mapped expression",
                        expected="every profile to express mapped genes")
    X = (sp.diags(TARGET_SUM / totals) @ X).tocsr().astype(np.float32)
    X.eliminate_zeros()
    first_sym = pd.Series(sym[ok]).groupby(inv).first().to_numpy()
    var = pd.DataFrame({"gene_symbol": first_sym}, index=pd.Index(uniq, name="ensembl_id"))
    rows = []
    for s in source_labels[sel]:
        e = labels[s.strip()]
        rows.append({
            "cell_type_ontology_term_id": e["cell_type_ontology_term_id"],
            "source_label": s.strip(),
            "tissue": e.get("tissue", ds["tissue"]),
            "species": ds["species"],
            "assay": ds["assay"],
            "dataset": ds["id"],
            "profile_kind": ds["profile_kind"],
            "description": e.get("description", ""),
            "n_cells": 1 if ds["profile_kind"] == "single cells" else 0,
        })
    obs = pd.DataFrame(rows, index=[f"{ds['id']}:{i}" for i in range(len(rows))])
    log.info("%s: %d profiles, %d labels, %d genes mapped of %d", ds["id"], X.shape[0], obs["source_label"].nunique(), uniq.size, len(ens))
    return X, obs, var


def build_corpus(folder: str | os.PathLike, *, manifest: dict | str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 datasets=None, verify: bool = True, progress: bool = True):
    """Build the corpus AnnData from fetched files.

    Parameters
    ----------
    folder
        The folder :func:`engine.training.corpus.fetch` wrote (``folder/<dataset id>/<file>``).
    manifest
        A loaded manifest, a path, or ``None`` for the bundled one.
    out
        Write the result here (``.h5ad``, gzip-compressed). An existing file is replaced atomically.
    datasets
        Only these data set ids.

    Returns
    -------
    anndata.AnnData
        ``(n_profiles, n_genes)``: ``X`` float32 CSR, normalised to 10,000 per profile (linear scale);
        ``var`` index human Ensembl IDs with ``gene_symbol``; ``obs`` :data:`OBS_COLUMNS` plus ``cell_type``
        (the CL label); ``uns["corpus"]``: ``version`` and ``datasets_json`` (the manifest entries: origin,
        sha256, licence, as a JSON string).

    Raises
    ------
    ChecksumError, DataError, ConfigError, ReservedDataError
        From :func:`read_dataset` and :func:`engine.training.corpus.load_manifest`.
    """
    import anndata as ad
    from tqdm.auto import tqdm

    from ...io.ontology import cell_ontology_table

    man = manifest if isinstance(manifest, dict) else load_manifest(manifest)
    chosen = [ds for ds in man["datasets"] if not datasets or ds["id"] in set(datasets)]
    parts = [read_dataset(ds, folder, verify=verify) for ds in tqdm(chosen, desc="build corpus", unit="data set", disable=not progress)]
    genes = sorted(set().union(*[set(v.index) for _, _, v in parts]))
    gpos = pd.Series(np.arange(len(genes)), index=genes)
    mats, obs_list, sym = [], [], {}
    for X, obs, var in parts:
        cols = gpos.reindex(var.index).to_numpy()
        C = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (np.arange(len(cols)), cols)), shape=(len(cols), len(genes)))
        mats.append((X @ C).tocsr())
        obs_list.append(obs)
        sym.update(var["gene_symbol"].to_dict())
    X = sp.vstack(mats).tocsr().astype(np.float32)
    obs = pd.concat(obs_list)
    cl = cell_ontology_table()
    bad = sorted(set(obs["cell_type_ontology_term_id"]) - set(cl.index))
    if bad:
        raise DataError("Label table names Cell Ontology ids that CL does not have (or deprecated ones)", found=", ".join(bad[:10]),
                        expected="current CL ids (cellxgene-ontology-guide's CL)")
    obs.insert(1, "cell_type", cl.loc[obs["cell_type_ontology_term_id"], "label"].to_numpy())
    for c in ("cell_type_ontology_term_id", "cell_type", "source_label", "tissue", "species", "assay", "dataset", "profile_kind"):
        obs[c] = obs[c].astype("category")
    var = pd.DataFrame({"gene_symbol": [sym[g] for g in genes]}, index=pd.Index(genes, name="ensembl_id"))
    import json

    summary = [{k: ds[k] for k in ("id", "citation", "accession", "species", "tissue", "assay", "profile_kind", "licence") if k in ds}
               | {"files": [{k: f[k] for k in ("name", "url", "sha256") if k in f} for f in ds["files"]]} for ds in chosen]
    uns = {"corpus": {"version": str(man.get("version", "")), "datasets_json": json.dumps(summary, ensure_ascii=False, default=str)}}
    adata = ad.AnnData(X=X, obs=obs, var=var, uns=uns)
    if out is not None:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.partial")
        try:
            adata.write_h5ad(tmp, compression="gzip")
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
    return adata

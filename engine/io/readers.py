"""Reading datasets: ``.h5ad`` (optionally backed), ``.zarr`` (optionally lazy), 10x ``.h5`` and ``.mtx``, tables;
and the bundled demo dataset."""
from __future__ import annotations

import csv
import gzip
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, DataError, LexicellError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

log = logging.getLogger(__name__)


#: File formats :func:`read` understands (shown in error messages).
SUPPORTED_FORMATS = (
    ".h5ad (AnnData)",
    ".zarr (AnnData zarr store, a folder)",
    ".h5 (10x Cell Ranger HDF5)",
    "a 10x folder with matrix.mtx(.gz), features.tsv(.gz) or genes.tsv(.gz), barcodes.tsv(.gz)",
    ".csv/.tsv (optionally .gz; cells x genes table, first column = cell names)",
)


# --------------------------------------------------------------------------- read
def read(path: str | os.PathLike, *, backed: bool | Literal["r"] = False, transpose: bool = False) -> AnnData:
    """Read a single-cell dataset from disk.

    Parameters
    ----------
    path
        One of:

        - ``*.h5ad``: AnnData (``backed`` supported);
        - ``*.h5``: 10x Cell Ranger HDF5 (v2 or v3, via :func:`scanpy.read_10x_h5`;
          an AnnData file with an ``.h5`` suffix is recognised too);
        - a folder (or its ``matrix.mtx(.gz)``) with ``matrix.mtx(.gz)``,
          ``features.tsv(.gz)`` or ``genes.tsv(.gz)`` and ``barcodes.tsv(.gz)``
          (via :func:`scanpy.read_10x_mtx` when the layout is Cell Ranger's own,
          otherwise read with the same result layout);
        - ``*.csv``/``*.tsv`` (optionally ``.gz``): a cells x genes table, first
          row = gene names, first column = cell names.
    backed
        ``True`` or ``"r"`` keeps the expression on disk: an ``.h5ad`` file is
        opened read-only in anndata's backed mode; a ``.zarr`` store gets ``X``
        (and ``layers``, ``raw.X``) as anndata's on-disk sparse datasets (dense
        arrays as dask arrays) while ``obs``, ``var``, ``obsm`` and ``uns`` are
        read into memory. Engine functions read such data in row chunks
        (:func:`engine.io.expression.iter_expression`), so memory is bounded by
        the chunk size, not the number of cells. Writes (``obs``, ``obsm``,
        ``uns``) stay in memory; the file is never changed. Other formats are
        always read into memory (a warning says so).
    transpose
        For tables only: the file is genes x cells.

    Returns
    -------
    anndata.AnnData
        ``(n_cells, n_genes)``. 10x inputs: ``var_names`` are gene symbols (made
        unique), ``var["gene_ids"]`` Ensembl IDs, ``var["feature_types"]``;
        ``X`` float32 CSR counts. Tables: ``X`` float32 CSR.

    Raises
    ------
    DataError
        The path does not exist, has an unsupported format (the message lists
        :data:`SUPPORTED_FORMATS`), or the file is corrupt (the message carries
        the underlying error).
    ConfigError
        ``backed`` is not ``False``, ``True`` or ``"r"``.
    """
    p = Path(path).expanduser()
    if backed not in (False, True, "r", None):
        raise ConfigError(
            "Unsupported value for backed",
            found=repr(backed),
            expected="False, True or 'r' (read-only backed mode)",
            fix="pass backed='r' to keep X on disk, or backed=False to load it into memory.",
        )
    if not p.exists():
        raise DataError(
            "The dataset file or folder does not exist",
            found=str(p),
            expected="an existing " + " or ".join(s.split(" (")[0] for s in SUPPORTED_FORMATS[:2]) + " file, "
            "a 10x mtx folder or a .csv/.tsv table",
            fix="check the path (relative paths start from the current directory: " + os.getcwd() + ").",
        )
    fmt = _detect_format(p)
    if fmt not in ("h5ad", "zarr") and backed:
        warnings.warn(f"backed mode applies to .h5ad and .zarr files only; {p.name} is read into memory", stacklevel=2)
    try:
        if fmt == "h5ad":
            import anndata as ad

            return ad.read_h5ad(p, backed="r" if backed else None)
        if fmt == "zarr":
            return _read_zarr(p, backed=bool(backed))
        if fmt == "h5":
            return _read_h5(p, backed=backed)
        if fmt == "mtx":
            return _read_mtx_folder(p if p.is_dir() else p.parent)
        if fmt in ("csv", "tsv"):
            return _read_table(p, sep="," if fmt == "csv" else "\t", transpose=transpose)
    except LexicellError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure means an unreadable file
        raise DataError(
            f"Could not read {p.name} as {fmt}",
            found=f"{type(err).__name__}: {err}",
            expected=f"a valid {fmt} file",
            fix="check that the file is complete (not truncated by a download) and in the format its suffix says.",
        ) from err
    raise AssertionError(fmt)  # pragma: no cover


def _detect_format(p: Path) -> str:
    name = p.name.lower()
    if p.is_dir():
        if name.endswith(".zarr") or (p / "zarr.json").is_file() or (p / ".zgroup").is_file():
            return "zarr"
        if _find_mtx_files(p) is not None:
            return "mtx"
        raise DataError(
            "The folder is not a 10x matrix folder",
            found=f"{p} with {sorted(x.name for x in p.iterdir())[:10]}",
            expected="matrix.mtx(.gz), features.tsv(.gz) (or genes.tsv(.gz)) and barcodes.tsv(.gz) in the folder",
            fix="point to the folder that holds the three files (e.g. filtered_feature_bc_matrix/).",
        )
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith((".h5", ".hdf5")):
        return "h5"
    if name.endswith((".mtx", ".mtx.gz")):
        return "mtx"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".tsv", ".tsv.gz", ".tab", ".tab.gz")):
        return "tsv"
    raise DataError(
        "Unsupported file format",
        found=f"{p.name!r} (suffix {''.join(p.suffixes) or 'none'!r})",
        expected="one of: " + "; ".join(SUPPORTED_FORMATS),
        fix="convert the data to .h5ad (e.g. with scanpy or anndata) or pass one of the supported formats.",
    )


def _read_zarr(p: Path, *, backed: bool) -> AnnData:
    """An AnnData zarr store: in memory, or with on-disk matrices (anndata's ``sparse_dataset`` over zarr)."""
    import anndata as ad

    if not backed:
        return ad.read_zarr(p)
    import zarr
    from anndata.io import read_elem, sparse_dataset

    g = zarr.open_group(str(p), mode="r")

    def lazy(elem):
        if isinstance(elem, zarr.Group):  # sparse (csr/csc) matrix
            return sparse_dataset(elem)
        import dask.array as da

        return da.from_zarr(elem)

    keys = {k for k in g.keys() if dict(g[k].attrs).get("encoding-type") != "null"}  # anndata writes None as null
    adata = ad.AnnData(
        X=lazy(g["X"]) if "X" in keys else None,
        obs=read_elem(g["obs"]),
        var=read_elem(g["var"]),
        uns=read_elem(g["uns"]) if "uns" in keys else None,
        obsm=read_elem(g["obsm"]) if "obsm" in keys else None,
        varm=read_elem(g["varm"]) if "varm" in keys else None,
        obsp=read_elem(g["obsp"]) if "obsp" in keys else None,
        layers={k: lazy(g["layers"][k]) for k in g["layers"].keys()} if "layers" in keys else None,
    )
    if "raw" in keys:
        raw = g["raw"]
        adata.raw = ad.AnnData(X=lazy(raw["X"]), var=read_elem(raw["var"]), obs=adata.obs[[]])
    return adata


def _read_h5(p: Path, *, backed) -> AnnData:
    import h5py

    with h5py.File(p, "r") as f:
        keys = set(f.keys())
    if {"X", "obs", "var"} <= keys:  # an AnnData file with a .h5 suffix
        import anndata as ad

        return ad.read_h5ad(p, backed="r" if backed else None)
    import scanpy as sc

    adata = sc.read_10x_h5(p)
    adata.var_names_make_unique()
    if adata.X is not None and adata.X.dtype != np.float32:
        adata.X = adata.X.astype(np.float32)
    return adata


def _find_mtx_files(folder: Path):
    """(matrix, features, barcodes, legacy) paths of a 10x folder, or None."""

    def first(*names):
        for n in names:
            if (folder / n).is_file():
                return folder / n
        return None

    mtx = first("matrix.mtx.gz", "matrix.mtx")
    feats = first("features.tsv.gz", "features.tsv", "genes.tsv", "genes.tsv.gz")
    bcs = first("barcodes.tsv.gz", "barcodes.tsv")
    if mtx is None or feats is None or bcs is None:
        return None
    return mtx, feats, bcs


def _read_mtx_folder(folder: Path) -> AnnData:
    found = _find_mtx_files(folder)
    if found is None:
        raise DataError(
            "The 10x matrix folder is incomplete",
            found=f"{folder} with {sorted(x.name for x in folder.iterdir())[:10]}",
            expected="matrix.mtx(.gz), features.tsv(.gz) (or genes.tsv(.gz)) and barcodes.tsv(.gz)",
            fix="copy all three Cell Ranger output files into the folder.",
        )
    mtx, feats, bcs = found
    names = {mtx.name, feats.name, bcs.name}
    if names in ({"matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz"}, {"matrix.mtx", "genes.tsv", "barcodes.tsv"}):
        import scanpy as sc

        adata = sc.read_10x_mtx(folder, var_names="gene_symbols", make_unique=True, gex_only=True)
    else:  # a mixed layout (e.g. uncompressed v3 files): same result as scanpy's reader
        import anndata as ad
        import scipy.io

        with _open_text(mtx, binary=True) as fh:
            X = sp.csr_matrix(scipy.io.mmread(fh).T, dtype=np.float32)
        genes = pd.read_csv(feats, sep="\t", header=None, dtype=str)
        barcodes = pd.read_csv(bcs, sep="\t", header=None, dtype=str)
        var = pd.DataFrame({"gene_ids": genes[0].to_numpy()})
        var.index = pd.Index((genes[1] if genes.shape[1] > 1 else genes[0]).astype(str).to_numpy(), name=None)
        if genes.shape[1] > 2:
            var["feature_types"] = genes[2].to_numpy()
        adata = ad.AnnData(X=X, obs=pd.DataFrame(index=barcodes[0].astype(str).to_numpy()), var=var)
        adata.var_names_make_unique()
        if "feature_types" in adata.var:
            adata = adata[:, (adata.var["feature_types"] == "Gene Expression").to_numpy()].copy()
    if adata.X.dtype != np.float32:
        adata.X = adata.X.astype(np.float32)
    if not sp.isspmatrix_csr(adata.X):
        adata.X = sp.csr_matrix(adata.X)
    return adata


def _open_text(path: Path, *, binary: bool = False):
    gz = path.name.lower().endswith(".gz")
    if binary:
        return gzip.open(path, "rb") if gz else open(path, "rb")
    return gzip.open(path, "rt", newline="") if gz else open(path, newline="")


def _split(line: str, sep: str) -> list[str]:
    line = line.rstrip("\r\n")
    if '"' in line or "'" in line:
        return next(csv.reader([line], delimiter=sep))
    return line.split(sep)


def _read_table(p: Path, *, sep: str, transpose: bool, block_rows: int = 512) -> AnnData:
    """Cells x genes text table -> AnnData with a float32 CSR X, read in row blocks."""
    import anndata as ad

    blocks: list[sp.csr_matrix] = []
    buf: list[np.ndarray] = []
    cells: list[str] = []
    with _open_text(p) as fh:
        header_line = fh.readline()
        if not header_line.strip():
            raise DataError("The table is empty", found=str(p), expected="a header row of gene names")
        header = _split(header_line, sep)
        n_fields = None
        for lineno, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            parts = _split(line, sep)
            if n_fields is None:
                n_fields = len(parts)
            if len(parts) != n_fields:
                raise DataError(
                    f"Row {lineno} of {p.name} has a different number of fields",
                    found=f"{len(parts)} fields (the first data row has {n_fields})",
                    expected="a rectangular table",
                )
            try:
                buf.append(np.asarray(parts[1:], dtype=np.float32))
            except ValueError as err:
                raise DataError(
                    f"Row {lineno} of {p.name} holds a non-numeric value",
                    found=str(err),
                    expected="numbers in every column except the first (cell names)",
                    fix="check the separator (.csv = comma, .tsv = tab) and that the first column holds cell names.",
                ) from err
            cells.append(parts[0].strip())
            if len(buf) >= block_rows:
                blocks.append(sp.csr_matrix(np.vstack(buf)))
                buf = []
    if buf:
        blocks.append(sp.csr_matrix(np.vstack(buf)))
    if not blocks:
        raise DataError("The table has no data rows", found=str(p), expected="one row per cell after the header")
    n_values = n_fields - 1
    if len(header) == n_values + 1:
        genes = header[1:]
    elif len(header) == n_values:  # R write.table style: no name for the index column
        genes = header
    else:
        raise DataError(
            f"The header of {p.name} does not match the data rows",
            found=f"{len(header)} header fields for {n_values} values per row",
            expected="one gene name per value column (optionally preceded by an index name)",
        )
    X = sp.vstack(blocks, format="csr").astype(np.float32)
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=pd.Index(cells, dtype=str)),
        var=pd.DataFrame(index=pd.Index([g.strip() for g in genes], dtype=str)),
    )
    if transpose:
        adata = ad.AnnData(X=sp.csr_matrix(X.T), obs=adata.var.copy(), var=adata.obs.copy())
    adata.var_names_make_unique()
    adata.obs_names_make_unique()
    return adata


def demo_dataset() -> AnnData:
    """scanpy's bundled ``pbmc68k_reduced`` (offline, 700 cells x 765 genes).

    Returns
    -------
    anndata.AnnData
        As shipped: ``X`` scaled (z-scores, float32 dense), ``raw`` log-normalised,
        HGNC symbols, ``obs["bulk_labels"]`` (10 cell types), ``obs["louvain"]``,
        ``obsm["X_pca"]``, ``obsm["X_umap"]``. Zheng et al. 2017.
    """
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()

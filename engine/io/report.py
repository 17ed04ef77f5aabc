"""The validation report (:class:`DataReport`), :class:`DataWarning` and the names of expression sources.

Shared by :mod:`.validate`, :mod:`.expression` and :mod:`.matrix`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


#: Library size of :func:`engine.io.expression.expression_matrix` ``kind="normalized"`` (as ``sc.pp.normalize_total``).
TARGET_SUM = 1e4

SOURCE_X = "X"
SOURCE_COUNTS = "layers['counts']"
SOURCE_RAW = "raw"
_KINDS = ("counts", "normalized", "log")


class DataWarning(UserWarning):
    """The dataset can be used, but a result may differ from what the user expects (genes summed, orthologs)."""

#: var columns searched for Ensembl gene IDs (``ensembl_id`` itself is trusted when present).


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

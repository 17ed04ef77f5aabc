"""The real-data corpus: public labelled expression profiles paired with Cell Ontology texts.

CellWhisperer (seed 000) and LangCell (seed 001) learn from real expression profiles paired with real
descriptions. This package turns public labelled data sets (sorted-population bulk, pseudo-bulk of labelled
clusters, single cells; human, and mouse through one-to-one orthologs) into one AnnData of profiles with
CELLxGENE-style metadata, and into training pairs for :mod:`engine.training.train`.

Two commands, for a user with internet::

    python -m engine.corpus fetch --to corpus_raw              # download + verify (sha256) every file
    python -m engine.corpus build --from corpus_raw --out assets/corpus/corpus.h5ad

In Python::

    from engine.training import corpus
    man = corpus.load_manifest()                 # assets/corpus/manifest.json (+ labels/*.tsv)
    corpus.fetch("corpus_raw")
    adata = corpus.build_corpus("corpus_raw", out="corpus.h5ad")
    pairs = corpus.build_pairs(path="corpus.h5ad", holdout_datasets=["novershtern2011_hema"])
    cells = corpus.heldout_cells("novershtern2011_hema", path="corpus.h5ad")   # zero-shot evaluation cells
"""
from __future__ import annotations

from .build import OBS_COLUMNS, build_corpus, read_dataset, read_object
from .manifest import (
    MANIFEST_PATH,
    RESERVED_ACCESSIONS,
    ChecksumError,
    ReservedDataError,
    check_manifest,
    fetch,
    load_manifest,
    read_label_table,
    sha256_of,
)
from .pairs import CORPUS_PATH, build_pairs, heldout_cells, load_corpus, simulate_cells
from .texts import describe_profile, profile_texts

__all__ = [
    "MANIFEST_PATH",
    "CORPUS_PATH",
    "RESERVED_ACCESSIONS",
    "OBS_COLUMNS",
    "ChecksumError",
    "ReservedDataError",
    "load_manifest",
    "check_manifest",
    "read_label_table",
    "sha256_of",
    "fetch",
    "read_object",
    "read_dataset",
    "build_corpus",
    "load_corpus",
    "build_pairs",
    "simulate_cells",
    "heldout_cells",
    "profile_texts",
    "describe_profile",
]

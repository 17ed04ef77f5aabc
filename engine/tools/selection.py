"""Cell selections as integer positions (a mask, positions, obs names or None for all cells)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import EmptySelectionError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["_cell_positions"]


def _cell_positions(adata: "AnnData", cells) -> np.ndarray:
    """Integer positions from a mask, positions, obs names or None (all cells)."""
    n = adata.n_obs
    if cells is None:
        return np.arange(n)
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise EmptySelectionError("The selection mask has the wrong length", found=arr.shape, expected=f"({n},)")
        return np.flatnonzero(arr)
    if arr.size == 0:
        return np.array([], dtype=int)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() >= n:
            raise EmptySelectionError("Cell positions are out of range", found=f"{arr.min()}..{arr.max()}", expected=f"0..{n - 1}")
        return arr.astype(int)
    pos = adata.obs_names.get_indexer(arr.astype(str))
    if (pos < 0).any():
        raise EmptySelectionError("Some selected cells are not in the dataset", found=list(arr[pos < 0][:5]), expected="obs names of this dataset")
    return pos

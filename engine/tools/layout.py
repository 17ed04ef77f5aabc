"""Layouts and the kNN graph of the cells' embeddings: UMAP (sampled fit + transform above 200,000 cells) and
neighbour smoothing.

Small data: scanpy ``neighbors`` + ``umap`` on ``obsm["transcriptome_embeds"]`` (McInnes et al. 2018). Above
:data:`LARGE_LAYOUT_FROM` cells, :func:`umap` fits umap-learn on a seeded sample of cells and places the others
with ``UMAP.transform`` in chunks (the approach of parametric/out-of-sample UMAP embedding; McInnes et al. 2018,
§4), or keeps an existing layout; what was done is recorded in ``uns["lexicell_layout"]``.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np

from .embed import EMBED_KEY, NEIGHBORS_KEY, SMOOTH_KEY, get_embeds

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["umap", "smooth_embeds", "smoothed", "LARGE_LAYOUT_FROM", "LAYOUT_KEY"]

log = logging.getLogger(__name__)

#: From this many cells on, :func:`umap` fits on a sample and transforms the rest.
LARGE_LAYOUT_FROM = 200_000
#: Cells the sampled fit uses by default.
FIT_CELLS = 50_000
#: ``uns`` key recording each layout's method and parameters.
LAYOUT_KEY = "lexicell_layout"


def umap(
    adata: "AnnData",
    *,
    use_rep: str = EMBED_KEY,
    key_added: str = "X_umap",
    keep_existing: bool = False,
    n_neighbors: int = 15,
    random_state: int = 0,
    large_from: int = LARGE_LAYOUT_FROM,
    fit_cells: int = FIT_CELLS,
    chunk_size: int = 100_000,
    progress: bool = True,
) -> np.ndarray:
    """Compute a UMAP layout of the cells from their embeddings (scanpy + umap-learn).

    Parameters
    ----------
    adata
        Cells with ``obsm[use_rep]``.
    use_rep
        Representation to build the neighbour graph on.
    key_added
        ``obsm`` key of the layout.
    keep_existing
        If True and ``obsm[key_added]`` exists, keep it and return it unchanged. If False an existing layout
        is preserved under ``obsm[key_added + '_original']`` before being replaced.
    n_neighbors, random_state
        UMAP's neighbourhood size and seed.
    large_from
        From this many cells on (default 200,000), fit umap-learn on ``fit_cells`` cells drawn with
        ``random_state`` and place every other cell with ``UMAP.transform`` in chunks of ``chunk_size``
        (no cell x cell graph of all cells is built). Below it: scanpy ``neighbors`` + ``umap``, as before.
    progress
        tqdm progress bar over the transform chunks.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, 2)`` float32 coordinates. Sets ``obsm[key_added]`` and ``uns['lexicell_layout'][key_added]``
        (``method``: ``"scanpy.tl.umap"``, ``"umap fit on a sample + transform"`` or ``"existing"``; ``n_cells``,
        ``n_fit``, ``n_neighbors``, ``random_state``, ``use_rep``, ``seconds``). Small data also get the neighbour
        graph under ``uns['lexicell_neighbors']`` / ``obsp['lexicell_neighbors_{connectivities,distances}']``
        (the user's own ``neighbors`` are untouched).

    Raises
    ------
    MissingEmbeddingError
        Without ``obsm[use_rep]``.
    """
    import scanpy as sc

    t0 = time.perf_counter()
    if keep_existing and key_added in adata.obsm:
        _record(adata, key_added, {"method": "existing", "n_cells": int(adata.n_obs)})
        return np.asarray(adata.obsm[key_added])
    emb = get_embeds(adata, key=use_rep) if adata.n_obs >= large_from else None
    if emb is None:
        get_embeds(adata, key=use_rep)
    if key_added in adata.obsm and f"{key_added}_original" not in adata.obsm:
        adata.obsm[f"{key_added}_original"] = adata.obsm[key_added]
    if emb is not None:
        coords, n_fit = _sampled_umap(emb, n_neighbors=n_neighbors, random_state=random_state, fit_cells=fit_cells,
                                      chunk_size=chunk_size, progress=progress)
        adata.obsm[key_added] = coords
        _record(adata, key_added, {"method": "umap fit on a sample + transform", "n_cells": int(adata.n_obs),
                                   "n_fit": int(n_fit), "n_neighbors": int(n_neighbors),
                                   "random_state": int(random_state), "use_rep": use_rep,
                                   "seconds": round(time.perf_counter() - t0, 2)})
        return coords
    _neighbor_graph(adata, use_rep, n_neighbors, random_state)
    saved = adata.obsm.get("X_umap")
    sc.tl.umap(adata, neighbors_key=NEIGHBORS_KEY, random_state=random_state)
    coords = np.asarray(adata.obsm["X_umap"], dtype=np.float32)
    if key_added != "X_umap":
        if saved is not None:
            adata.obsm["X_umap"] = saved
        else:
            del adata.obsm["X_umap"]
    adata.obsm[key_added] = coords
    _record(adata, key_added, {"method": "scanpy.tl.umap", "n_cells": int(adata.n_obs), "n_fit": int(adata.n_obs),
                               "n_neighbors": int(n_neighbors), "random_state": int(random_state), "use_rep": use_rep,
                               "seconds": round(time.perf_counter() - t0, 2)})
    return coords


def _record(adata, key_added: str, entry: dict) -> None:
    rec = dict(adata.uns.get(LAYOUT_KEY, {})) if isinstance(adata.uns.get(LAYOUT_KEY), dict) else {}
    rec[key_added] = entry
    adata.uns[LAYOUT_KEY] = rec


def _sampled_umap(emb: np.ndarray, *, n_neighbors: int, random_state: int, fit_cells: int, chunk_size: int,
                  progress: bool) -> tuple[np.ndarray, int]:
    """Fit umap-learn on a seeded sample, transform the rest in chunks: ``((n, 2) float32, n_fit)``."""
    from tqdm.auto import tqdm
    from umap import UMAP

    n = emb.shape[0]
    rng = np.random.default_rng(random_state)
    n_fit = min(n, max(int(fit_cells), n_neighbors + 2))
    fit_idx = np.sort(rng.choice(n, size=n_fit, replace=False))
    model = UMAP(n_neighbors=n_neighbors, random_state=random_state, min_dist=0.5, verbose=False)
    out = np.empty((n, 2), dtype=np.float32)
    log.info("umap: fitting on %d of %d cells", n_fit, n)
    with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": seeded layouts are wanted
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        out[fit_idx] = model.fit_transform(np.asarray(emb[fit_idx], dtype=np.float32))
    rest = np.setdiff1d(np.arange(n), fit_idx, assume_unique=True)
    for start in tqdm(range(0, rest.size, chunk_size), desc="Placing cells on the layout", unit="chunk",
                      disable=not progress):
        idx = rest[start : start + chunk_size]
        out[idx] = model.transform(np.asarray(emb[idx], dtype=np.float32))
    return out, n_fit


def _neighbor_graph(adata: "AnnData", use_rep: str, n_neighbors: int, random_state: int = 0, *, reuse: bool = False):
    """The kNN graph of :func:`umap` (scanpy ``neighbors`` on ``obsm[use_rep]``, ``key_added='lexicell_neighbors'``).

    With ``reuse``, an existing graph is returned instead of being rebuilt when it was built on the same
    representation of the same model (the ``model_fingerprint`` in ``uns[use_rep]['params']``; never for
    representations without one) with the same ``n_neighbors``. Returns the ``(n_cells, n_cells)`` CSR
    connectivities.
    """
    import scanpy as sc

    n_neighbors = max(2, min(n_neighbors, adata.n_obs - 1))
    conn_key = f"{NEIGHBORS_KEY}_connectivities"
    src = adata.uns.get(use_rep, {}).get("params", {}) if isinstance(adata.uns.get(use_rep), dict) else {}
    source = src.get("model_fingerprint")
    params = adata.uns.get(NEIGHBORS_KEY, {}).get("params", {}) if isinstance(adata.uns.get(NEIGHBORS_KEY), dict) else {}
    if not (reuse and source and conn_key in adata.obsp and params.get("use_rep") == use_rep
            and params.get("source_fingerprint") == source and int(params.get("n_neighbors", -1)) == n_neighbors):
        sc.pp.neighbors(adata, use_rep=use_rep, n_neighbors=n_neighbors, key_added=NEIGHBORS_KEY, random_state=random_state,
                        transformer=_approximate_knn(adata.n_obs, n_neighbors, random_state))
        adata.uns[NEIGHBORS_KEY]["params"]["source_fingerprint"] = source or ""
    return adata.obsp[conn_key]


#: From this many cells on scanpy switches from exact (brute-force) to approximate neighbours (pynndescent).
APPROXIMATE_KNN_FROM = 8192


def _approximate_knn(n_obs: int, n_neighbors: int, random_state: int):
    """scanpy's own choice of kNN search, except that pynndescent's graph comes back as a ``csr_matrix``.

    scanpy 1.11 reads the approximate graph with ``getnnz``, which scipy >= 1.17 no longer offers on the
    ``csr_array`` that pynndescent 0.7 returns, so ``sc.pp.neighbors`` failed on every dataset of 8,192 cells or
    more. Below that size scanpy's exact search is used unchanged (None). Same parameters as scanpy's default.
    """
    if n_obs < APPROXIMATE_KNN_FROM:
        return None
    import scanpy as sc
    import scipy.sparse as sp
    from pynndescent import PyNNDescentTransformer

    class _CsrMatrixNNDescent(PyNNDescentTransformer):
        def fit_transform(self, X, y=None, **kwargs):
            return sp.csr_matrix(super().fit_transform(X, y, **kwargs))

        def transform(self, X, y=None):
            return sp.csr_matrix(super().transform(X, y))

    return _CsrMatrixNNDescent(
        n_neighbors=n_neighbors, metric="euclidean", random_state=random_state, n_jobs=sc.settings.n_jobs,
        n_trees=min(64, 5 + round(n_obs ** 0.5 / 20.0)), n_iters=max(5, round(np.log2(n_obs))),
    )


def smoothed(embeds: np.ndarray, connectivities, self_weight: float = 0.5) -> np.ndarray:
    """Neighbour-smoothed, re-normalised embeddings (the array form of :func:`smooth_embeds`).

    Parameters
    ----------
    embeds
        ``(n_cells, d)`` float embeddings.
    connectivities
        ``(n_cells, n_cells)`` non-negative sparse or dense weights (e.g. scanpy's kNN connectivities); each
        row is normalised to sum 1. Cells without neighbours keep their own embedding.
    self_weight
        Weight of the cell itself, in [0, 1]; the neighbours share ``1 - self_weight``.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, d)`` float32, L2-normalised: ``normalise(w e_i + (1 - w) sum_j a_ij e_j / sum_j a_ij)``.

    Raises
    ------
    engine.errors.AnalysisError
        ``self_weight`` outside [0, 1] or a graph whose shape does not match the embeddings.
    """
    import scipy.sparse as sp

    from ..errors import AnalysisError

    if not 0.0 <= float(self_weight) <= 1.0:
        raise AnalysisError("The self weight of neighbour smoothing must lie in [0, 1]", found=self_weight,
                            expected="a number such as 0.5")
    emb = np.asarray(embeds, dtype=np.float64)
    A = sp.csr_matrix(connectivities, dtype=np.float64)
    if A.shape != (emb.shape[0], emb.shape[0]):
        raise AnalysisError("The neighbour graph does not match the cells", found=f"graph {A.shape}, {emb.shape[0]} cells",
                            expected="an (n_cells, n_cells) graph", fix="rebuild it with engine.smooth_embeds(adata)")
    deg = np.asarray(A.sum(1)).ravel()
    has = deg > 0
    inv = np.zeros_like(deg)
    inv[has] = 1.0 / deg[has]
    mean_nb = sp.diags(inv) @ A @ emb
    w = np.where(has, float(self_weight), 1.0)[:, None]
    out = w * emb + (1.0 - w) * mean_nb
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def smooth_embeds(
    adata: "AnnData",
    *,
    use_rep: str = EMBED_KEY,
    key_added: str = SMOOTH_KEY,
    n_neighbors: int = 15,
    self_weight: float = 0.5,
    random_state: int = 0,
) -> np.ndarray:
    """Smooth each cell's embedding over its neighbours in the dataset (kNN smoothing of the embeddings).

    Single-cell profiles are sparse, so one cell's embedding is noisy; averaging it with its nearest
    neighbours (in the embedding space, the same graph :func:`umap` draws) denoises per-cell scores and
    zero-shot labels without any labels. It is the continuous form of CellTypist's majority voting
    (Domínguez Conde et al. 2022) and of kNN smoothing (Wagner et al. 2017); selected for the default model
    by the smoothing rule of 2026-12-01 (``docs/model-development.md``; the model card has the measured effect). Populations
    smaller than the neighbourhood can be pulled towards their neighbours (on the demo the 19 CD4+ memory T
    cells lost, the 13 CD34+ and 8 naive CD4+ cells did not): compare with the unsmoothed embeddings for them.

    Parameters
    ----------
    adata
        Cells with ``obsm[use_rep]`` from :func:`embed_cells`. ``X`` and ``obsm[use_rep]`` are not modified.
    use_rep
        Embeddings to smooth.
    key_added
        ``obsm`` key of the smoothed embeddings.
    n_neighbors
        Neighbours per cell (scanpy ``neighbors``; capped at ``n_cells - 1``).
    self_weight
        Weight of the cell itself; its neighbours share the rest (weighted by connectivity).

    Returns
    -------
    numpy.ndarray
        ``(n_cells, d)`` float32, L2-normalised. Sets ``obsm[key_added]``, ``uns[key_added]['params']`` (the
        source's model fingerprint plus the smoothing parameters, so :func:`get_embeds` checks the model), and
        the graph of :func:`umap` (``uns['lexicell_neighbors']``, ``obsp['lexicell_neighbors_*']``), reused
        when it was already built on ``use_rep`` of the same model with ``n_neighbors``.

    Raises
    ------
    MissingEmbeddingError
        Without ``obsm[use_rep]``.
    engine.errors.AnalysisError
        For a ``self_weight`` outside [0, 1].
    """
    import scipy.sparse as sp

    emb = get_embeds(adata, key=use_rep)
    if adata.n_obs < 3:  # no neighbourhood to speak of: every cell keeps its own embedding
        conn = sp.csr_matrix((adata.n_obs, adata.n_obs))
    else:
        conn = _neighbor_graph(adata, use_rep, n_neighbors, random_state, reuse=True)
    out = smoothed(emb, conn, self_weight)
    src = adata.uns.get(use_rep, {}).get("params", {}) if isinstance(adata.uns.get(use_rep), dict) else {}
    adata.obsm[key_added] = out
    adata.uns[key_added] = {"params": {**src, "smoothed_from": use_rep, "n_neighbors": int(n_neighbors),
                                       "self_weight": float(self_weight)}}
    return out

"""Cell embeddings (``transcriptome_embeds``) with a content-addressed disk cache, and UMAP layouts.

CellWhisperer precomputes every cell's embedding once and scores queries against
the stored matrix (seed 000, appendix F); Lexicell does the same, keyed by content
hashes of the expression data and the model so a stale cache is never reused.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import MissingEmbeddingError, ModelMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..models.model import TranscriptomeTextModel

__all__ = ["embed_cells", "umap", "smooth_embeds", "smoothed", "cache_dir", "data_fingerprint", "get_embeds"]

log = logging.getLogger(__name__)
EMBED_KEY = "transcriptome_embeds"
SMOOTH_KEY = "transcriptome_embeds_smoothed"
NEIGHBORS_KEY = "lexicell_neighbors"


def cache_dir() -> Path:
    """Embedding cache folder: ``$LEXICELL_CACHE`` or ``~/.cache/lexicell``."""
    return Path(os.environ.get("LEXICELL_CACHE", Path.home() / ".cache" / "lexicell")).expanduser()


def data_fingerprint(X, var_ids, obs_names) -> str:
    """Content hash of a CSR matrix, its gene identifiers and cell names (hex blake2b, 32 chars)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{X.shape}".encode())
    for arr in (X.indptr, X.indices, X.data):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\x1f".join(map(str, var_ids)).encode())
    h.update("\x1f".join(map(str, obs_names)).encode())
    return h.hexdigest()


def embed_cells(
    adata: "AnnData",
    model: "TranscriptomeTextModel",
    *,
    batch_size: int = 2048,
    key_added: str = EMBED_KEY,
    use_cache: bool = True,
    cache_path: str | os.PathLike | None = None,
    progress: bool = True,
    cancel: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Embed every cell with the model's transcriptome tower.

    Expression is taken from the source :func:`engine.validate` chose (counts, ``layers['counts']`` or
    ``.raw``), rank-encoded with the model's tokenizer (Geneformer-style), embedded in batches on the model's
    device and L2-normalised.

    Parameters
    ----------
    adata
        Cells x genes. ``X`` is never modified.
    model
        A :class:`~engine.models.model.TranscriptomeTextModel`.
    batch_size
        Cells per forward pass.
    key_added
        ``obsm`` key to write.
    use_cache
        Read/write the disk cache (``cache_path`` or :func:`cache_dir`), keyed by a content hash of the
        expression, genes, cell names and the model fingerprint.
    progress
        Show a tqdm progress bar.
    cancel
        Callable polled between batches; returning True raises :class:`~engine.errors.CancelledError`.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, projection_dim)`` float32, L2-normalised. Also sets:

        - ``adata.obsm[key_added]``: the same array;
        - ``adata.uns[key_added]['params']``: model name and fingerprint, genes matched, cache key,
          ``orthologs`` (non-empty when mouse genes were read through human orthologs, see below) and
          ``warnings`` (list of str: orthologs used, several columns summed into one gene, e.g. a repeated
          gene name; each is also logged and issued as an :class:`engine.io.data.DataWarning`).

    Mouse data and a human model (the bundled one, CellWhisperer): when the genes are mouse (``ENSMUSG`` IDs
    from :func:`engine.validate`, or MGI-cased symbols) and the model's vocabulary is human (``ENSG``), each
    mouse gene is read as its human ortholog (:func:`engine.io.orthologs.human_var`) and a warning is logged.

    Raises
    ------
    engine.errors.DataError, engine.errors.MatrixKindError, engine.errors.GeneIdentifierError
        From validation and encoding (scaled data without counts, unmappable genes, NaN).
    engine.errors.CancelledError
        When cancelled.

    References
    ----------
    Schaefer et al., CellWhisperer (seed 000), §3.2 and appendix F.
    """
    from ..io.data import DataWarning, expression_matrix
    from ..io.orthologs import human_var, is_mouse_var

    t0 = time.perf_counter()
    kind = "counts" if getattr(model.transcriptome_tower, "requires_counts", False) else "normalized"
    X, var = expression_matrix(adata, kind=kind)
    orthologs = False
    notes: list[str] = []
    if _human_vocabulary(model) and is_mouse_var(var):
        var = human_var(var)
        orthologs = True
        notes.append(f"mouse genes detected: the human model reads them through their human orthologs "
                     f"(engine.io.orthologs, Ensembl 105); {int((var['ensembl_id'] != '').sum())} of {var.shape[0]} "
                     "genes have one, the others are ignored")
    tokens = model.tokenizer.match_genes(var)
    n_matched = int((tokens >= 0).sum())
    notes += _summed_genes(tokens, var)
    for note in notes:
        log.warning("%s", note)
        warnings.warn(note, DataWarning, stacklevel=2)
    gene_ids = var["ensembl_id"].astype(str).tolist() if "ensembl_id" in var.columns else list(var.index)
    key = None
    cache_file = None
    if use_cache:
        key = hashlib.blake2b(
            (data_fingerprint(X, gene_ids, adata.obs_names) + model.fingerprint() + kind).encode(), digest_size=16
        ).hexdigest()
        cache_file = Path(cache_path or cache_dir()) / "embeddings" / f"{key}.npz"
    embeds = None
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                if list(z["orig_ids"]) == list(map(str, adata.obs_names)):
                    embeds = z[EMBED_KEY].astype(np.float32)
        except (OSError, ValueError, KeyError) as err:  # corrupt cache: recompute
            log.warning("ignoring unreadable embedding cache %s: %s", cache_file, err)
    from_cache = embeds is not None
    if embeds is None:
        encoding = model.tokenizer.encode_matrix(X, var)
        embeds = model.embed_encoding(encoding, batch_size=batch_size, progress=progress, cancel=cancel)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npz")
            np.savez(tmp, transcriptome_embeds=embeds, orig_ids=np.asarray(adata.obs_names, dtype=str))
            os.replace(tmp, cache_file)
    adata.obsm[key_added] = embeds
    adata.uns[key_added] = {
        "params": {
            "model_name": model.name,
            "model_fingerprint": model.fingerprint(),
            "expression": kind,
            "n_genes_matched": n_matched,
            "n_genes": int(X.shape[1]),
            "cache_key": key or "",
            "from_cache": bool(from_cache),
            "orthologs": "mouse->human (Ensembl 105)" if orthologs else "",
            "warnings": list(notes),
        }
    }
    log.info("embedded %d cells in %.2f s (cache %s)", adata.n_obs, time.perf_counter() - t0, "hit" if from_cache else "miss")
    return embeds


def _summed_genes(tokens: np.ndarray, var) -> list[str]:
    """A warning when several columns map to one vocabulary gene (rank encoding sums them), else nothing."""
    from ..io.data import duplicate_summary

    ok = tokens >= 0
    if np.unique(tokens[ok]).size == int(ok.sum()):
        return []
    names = np.asarray(var.index.astype(str))[ok]
    tok = tokens[ok]
    _, inv, counts = np.unique(tok, return_inverse=True, return_counts=True)
    multi = counts[inv] > 1
    n_same, _, ex_same = duplicate_summary(names[multi])
    n_genes = int((counts > 1).sum())
    text = (f"{int(multi.sum())} columns map to {n_genes} gene(s) of the model's vocabulary more than once and are "
            f"summed into one gene each")
    if n_same:
        text += f" (repeated gene names: {ex_same})"
    else:
        first = [" + ".join(names[inv == k][:3]) for k in np.flatnonzero(counts > 1)[:3]]
        text += f" (e.g. {', '.join(first)})"
    return [text]


def _human_vocabulary(model) -> bool:
    ids = getattr(model.tokenizer, "gene_ids", None)
    if ids is None or len(ids) == 0:
        return False
    sample = [str(g) for g in ids[: min(len(ids), 200)]]
    human = sum(g.startswith("ENSG") or (not g.startswith("ENS") and g == g.upper() and any(c.isalpha() for c in g)) for g in sample)
    return human > len(sample) / 2


def get_embeds(adata: "AnnData", model: "TranscriptomeTextModel | None" = None, *, key: str = EMBED_KEY) -> np.ndarray:
    """Return ``adata.obsm[key]`` as float32, checking that it exists and was made by ``model``.

    Raises
    ------
    MissingEmbeddingError
        If the embeddings are absent.
    ModelMismatchError
        If they were computed by another model (fingerprint or width differs).
    """
    if key not in adata.obsm:
        raise MissingEmbeddingError(
            "The cells have no transcriptome embeddings",
            found=f"obsm keys {list(adata.obsm.keys())}",
            expected=f"obsm[{key!r}]",
            fix="run engine.embed_cells(adata, model) first",
        )
    emb = np.asarray(adata.obsm[key], dtype=np.float32)
    if model is not None:
        if emb.shape[1] != model.projection_dim:
            raise ModelMismatchError(
                "The embeddings do not belong to this model",
                found=f"width {emb.shape[1]}",
                expected=f"width {model.projection_dim} ({model.name})",
                fix="re-run engine.embed_cells(adata, model)",
            )
        params = adata.uns.get(key, {}).get("params", {}) if isinstance(adata.uns.get(key), dict) else {}
        fp = params.get("model_fingerprint")
        if fp and fp != model.fingerprint():
            raise ModelMismatchError(
                "The embeddings were computed by another model",
                found=f"model {params.get('model_name')!r} ({fp})",
                expected=f"{model.name!r} ({model.fingerprint()})",
                fix="re-run engine.embed_cells(adata, model)",
            )
    return emb


def umap(
    adata: "AnnData",
    *,
    use_rep: str = EMBED_KEY,
    key_added: str = "X_umap",
    keep_existing: bool = False,
    n_neighbors: int = 15,
    random_state: int = 0,
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

    Returns
    -------
    numpy.ndarray
        ``(n_cells, 2)`` float32 coordinates. Sets ``obsm[key_added]`` and the neighbour graph under
        ``uns['lexicell_neighbors']`` / ``obsp['lexicell_neighbors_{connectivities,distances}']`` (the
        user's own ``neighbors`` are untouched).

    Raises
    ------
    MissingEmbeddingError
        Without ``obsm[use_rep]``.
    """
    import scanpy as sc

    if keep_existing and key_added in adata.obsm:
        return np.asarray(adata.obsm[key_added])
    get_embeds(adata, key=use_rep)
    if key_added in adata.obsm and f"{key_added}_original" not in adata.obsm:
        adata.obsm[f"{key_added}_original"] = adata.obsm[key_added]
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
    return coords


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
    by the session-6 rule in ``DEVELOPERS.md`` (see the model card for the measured effect). Populations
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

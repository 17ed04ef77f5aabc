"""Cell embeddings (``transcriptome_embeds``) with a content-addressed disk cache.

CellWhisperer precomputes every cell's embedding once and scores queries against
the stored matrix (seed 000, appendix F); Lexicell does the same, keyed by content
hashes of the expression data and the model so a stale cache is never reused.
Large or backed data are embedded in row chunks, in process or on a Dask cluster, into a
resumable zarr store (:mod:`engine.tools.chunked`). Layouts, the kNN graph and neighbour
smoothing live in :mod:`engine.tools.layout` (re-exported here).
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

__all__ = ["embed_cells", "umap", "smooth_embeds", "smoothed", "cache_dir", "data_fingerprint", "get_embeds", "read_embeddings"]

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
    scheduler=None,
    store: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    n_workers: int = 2,
    overwrite: bool = False,
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
    scheduler
        None: in this process. ``"local"``: a ``dask.distributed`` LocalCluster of ``n_workers`` single-threaded
        processes; a scheduler address (``"tcp://host:8786"``) or a ``distributed.Client``: that cluster. The
        model goes to each worker once; each task embeds one row chunk and writes it to the zarr store
        (:mod:`engine.tools.chunked`). Same embeddings as in process (up to float rounding).
    store
        A zarr store (``"embeds.zarr"``) to write chunk by chunk and read back; a rerun with the same data and
        model skips the finished chunks (resumable). Default: a store in the cache folder when the chunked
        path is taken and ``use_cache`` is True.
    chunk_size
        Cells per chunk (default 10,000). Backed data (``engine.read(path, backed=True)``), a ``scheduler``, a
        ``store`` or a ``chunk_size`` select the chunked path, whose memory is bounded by the chunk size; small
        in-memory data without them is embedded in one piece, as before.
    overwrite
        Replace a ``store`` that holds other data or another model (else :class:`~engine.errors.ConfigError`).

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
        When cancelled (a chunked run keeps its finished chunks in the store).
    engine.errors.ConfigError
        A ``store`` of other data or another model without ``overwrite``; an unknown ``scheduler``.

    References
    ----------
    Schaefer et al., CellWhisperer (seed 000), §3.2 and appendix F.
    """
    from ..io.expression import expression_matrix, expression_var
    from ..io.matrix import is_backed
    from ..io.validation import _analyse

    t0 = time.perf_counter()
    kind = "counts" if getattr(model.transcriptome_tower, "requires_counts", False) else "normalized"
    if scheduler is not None or store is not None or chunk_size is not None or is_backed(adata):
        from .chunked import embed_chunked

        report = _analyse(adata, species=None, min_frac_mapped=None, full_scan=False)
        var, n_matched, orthologs, notes = _model_genes(model, expression_var(adata, report=report))
        embeds, info = embed_chunked(adata, model, kind=kind, report=report, var=var, store=store,
                                     use_cache=use_cache, cache_path=cache_path or cache_dir(),
                                     chunk_size=chunk_size,
                                     batch_size=batch_size, scheduler=scheduler, n_workers=n_workers,
                                     overwrite=overwrite, progress=progress, cancel=cancel)
        _set_embeds(adata, model, embeds, key_added, kind=kind, n_matched=n_matched, n_genes=var.shape[0],
                    key=info["cache_key"], from_cache=info["chunks_computed"] == 0, orthologs=orthologs, notes=notes,
                    extra={k: info[k] for k in ("store", "chunk_size", "n_chunks", "chunks_computed",
                                                "chunks_skipped", "scheduler", "seconds", "chunk_seconds_mean")})
        return embeds
    X, var = expression_matrix(adata, kind=kind)
    var, n_matched, orthologs, notes = _model_genes(model, var)
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
    _set_embeds(adata, model, embeds, key_added, kind=kind, n_matched=n_matched, n_genes=int(X.shape[1]), key=key,
                from_cache=from_cache, orthologs=orthologs, notes=notes)
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

    Returns
    -------
    numpy.ndarray
        ``(n_cells, projection_dim)`` float32 (no copy when it already is one; a dask array is computed).

    Raises
    ------
    MissingEmbeddingError
        If the embeddings are absent.
    ModelMismatchError
        If they were computed by another model (fingerprint or width differs).
    """
    emb = embeds_source(adata, model, key=key)  # checks presence, model and width
    if hasattr(emb, "compute"):
        emb = emb.compute()
    return np.asarray(emb, dtype=np.float32)


def embeds_source(adata: "AnnData", model: "TranscriptomeTextModel | None" = None, *, key: str = EMBED_KEY):
    """``adata.obsm[key]`` as stored (an ndarray, a memory map, a zarr or dask array), after the checks of
    :func:`get_embeds`; chunked scoring reads it in row blocks.

    Raises
    ------
    MissingEmbeddingError, ModelMismatchError
        As :func:`get_embeds`.
    """
    if key not in adata.obsm:
        raise MissingEmbeddingError(
            "The cells have no transcriptome embeddings",
            found=f"obsm keys {list(adata.obsm.keys())}",
            expected=f"obsm[{key!r}]",
            fix="run engine.embed_cells(adata, model) first",
        )
    emb = adata.obsm[key]
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


def _model_genes(model, var):
    """``(var, n_matched, orthologs, notes)``: mouse genes read through human orthologs for a human model, the
    genes the model's vocabulary matches, and the warnings (logged and issued as DataWarnings)."""
    from ..io.orthologs import human_var, is_mouse_var
    from ..io.report import DataWarning

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
        warnings.warn(note, DataWarning, stacklevel=3)
    return var, n_matched, orthologs, notes


def _set_embeds(adata, model, embeds, key_added, *, kind, n_matched, n_genes, key, from_cache, orthologs, notes,
                extra=None) -> None:
    adata.obsm[key_added] = embeds
    adata.uns[key_added] = {
        "params": {
            "model_name": model.name,
            "model_fingerprint": model.fingerprint(),
            "expression": kind,
            "n_genes_matched": n_matched,
            "n_genes": int(n_genes),
            "cache_key": key or "",
            "from_cache": bool(from_cache),
            "orthologs": "mouse->human (Ensembl 105)" if orthologs else "",
            "warnings": list(notes),
            **(extra or {}),
        }
    }


#: Names that moved to :mod:`engine.tools.layout` / :mod:`engine.tools.chunked` and stay importable from here.
_MOVED = {
    "umap": "layout", "smooth_embeds": "layout", "smoothed": "layout", "APPROXIMATE_KNN_FROM": "layout",
    "LARGE_LAYOUT_FROM": "layout", "_neighbor_graph": "layout", "_approximate_knn": "layout",
    "read_embeddings": "chunked",
}


def __getattr__(name: str):
    mod = _MOVED.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{mod}", __package__), name)

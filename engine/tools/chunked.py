"""Embedding large datasets in row chunks, in process or on a Dask cluster, into a resumable zarr store.

An atlas of millions of cells does not fit in memory as one expression matrix, nor as one rank encoding.
:func:`embed_chunked` maps the transcriptome tower over row chunks of an in-memory or backed AnnData
(``engine.read(path, backed=True)``), so memory is bounded by the chunk size, not the number of cells:

* in process (``scheduler=None``), chunk after chunk;
* on a ``dask.distributed`` cluster (``scheduler="local"`` starts a :class:`~distributed.LocalCluster`, or any
  scheduler address such as ``"tcp://10.0.0.5:8786"``, or a :class:`~distributed.Client`). The model is
  broadcast to every worker once (``Client.scatter(..., broadcast=True)``); each task reads its rows from the
  file itself (a backed ``.h5ad`` or ``.zarr``; in-memory data is broadcast too) and writes its embeddings
  straight into the zarr store, so nothing large travels back to the client.

The store (``embeds.zarr``) holds ``transcriptome_embeds`` ``(n_cells, projection_dim)`` float32, chunked by
rows, and ``done`` (one flag per chunk). A rerun with the same data, model and store skips the finished chunks
(resumable after an interruption); :func:`read_embeddings` reads a finished store back into
``obsm["transcriptome_embeds"]``. Precomputing embeddings this way (``python -m engine.embed``) is how a server
serves a big dataset: it then only reads the store.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from ..errors import CancelledError, ConfigError, MissingEmbeddingError, ModelMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ..io.report import DataReport
    from ..models.model import TranscriptomeTextModel

__all__ = ["embed_chunked", "read_embeddings", "DEFAULT_CHUNK_SIZE", "STORE_FORMAT"]

log = logging.getLogger(__name__)

#: Cells per chunk (one task; one rank encoding of ``chunk x max_length`` int64 in memory at a time).
DEFAULT_CHUNK_SIZE = 10_000
#: ``attrs["lexicell_embeds"]["format"]`` of a store.
STORE_FORMAT = "lexicell-embeds-zarr-1"
EMBED_KEY = "transcriptome_embeds"


@dataclass
class EmbedPlan:
    """What each chunk task needs besides the model and the data (sent to every worker once)."""

    kind: str
    report: "DataReport"
    var: pd.DataFrame
    n_obs: int
    chunk_size: int
    batch_size: int
    store: str | None
    client_pid: int = 0


# --------------------------------------------------------------------------- data identity and store
def data_source_path(adata: "AnnData") -> str | None:
    """Path of the file a backed AnnData reads from (``.h5ad`` or ``.zarr``), or None for in-memory data."""
    if getattr(adata, "is_view", False):
        return None
    if getattr(adata, "isbacked", False) and adata.filename is not None:
        return str(Path(adata.filename).resolve())
    group = getattr(adata.X, "group", None)  # anndata's sparse dataset over a zarr group
    store = getattr(group, "store", None)
    root = getattr(store, "root", None)
    if root is not None and str(getattr(group, "path", "")).strip("/") == "X":
        return str(Path(str(root)).resolve())
    return None


def store_key(adata: "AnnData", model: "TranscriptomeTextModel", plan: EmbedPlan) -> str:
    """Identity of (data, genes, model, expression kind): hex blake2b of the cell names, the genes, the model
    fingerprint and the values of 1,000 rows sampled over the file (cheap for any size; a file copied or moved
    keeps its key)."""
    from ..io.matrix import _get_matrix, _sample_index, _take_rows

    import scipy.sparse as sp

    h = hashlib.blake2b(digest_size=16)
    h.update(f"{adata.n_obs}\x1f{plan.kind}\x1f{plan.report.source}\x1f{model.fingerprint()}".encode())
    h.update("\x1f".join(map(str, adata.obs_names)).encode())
    ids = plan.var["ensembl_id"].astype(str) if "ensembl_id" in plan.var.columns else plan.var.index.astype(str)
    h.update("\x1f".join(ids).encode())
    block = _take_rows(_get_matrix(adata, plan.report.source), _sample_index(adata.n_obs))
    block = sp.csr_matrix(block, dtype=np.float32)
    for arr in (block.indptr, block.indices, block.data):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _open_store(path: str, *, key: str, n_obs: int, dim: int, chunk_size: int, model, kind: str, overwrite: bool):
    """Open (resume) or create the zarr store; returns ``(group, chunk_size)``."""
    import zarr

    p = Path(path)
    if p.exists():
        try:
            g = zarr.open_group(str(p), mode="r+")
            meta = dict(g.attrs.get("lexicell_embeds", {}))
        except Exception as err:  # noqa: BLE001 - not a zarr store
            raise ConfigError("The embedding store exists and is not a Lexicell zarr store", found=f"{p}: {err}",
                              expected="a store written by engine.embed_cells / python -m engine.embed",
                              fix="choose another --out, or delete it") from err
        if meta.get("format") == STORE_FORMAT and meta.get("key") == key:
            return g, int(meta["chunk_size"])
        if not overwrite:
            raise ConfigError(
                "The embedding store holds embeddings of other data or another model",
                found=f"{p}: {meta.get('model_name')!r}, {meta.get('n_obs')} cells, key {meta.get('key')}",
                expected=f"a store of these {n_obs:,} cells and model {model.name!r} (key {key}), or a new path",
                fix="choose another store path, or pass overwrite=True (--overwrite) to replace it",
            )
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    g = zarr.open_group(str(p), mode="w")
    # uncompressed: L2-normalised float32 barely compresses, and writing/reading it is then only I/O
    g.create_array(EMBED_KEY, shape=(n_obs, dim), chunks=(chunk_size, dim), dtype="float32", fill_value=np.nan,
                   compressors=None)
    g.create_array("done", shape=(max(1, -(-n_obs // chunk_size)),), chunks=(1,), dtype="uint8", fill_value=0)
    g.attrs["lexicell_embeds"] = {
        "format": STORE_FORMAT, "key": key, "n_obs": int(n_obs), "dim": int(dim), "chunk_size": int(chunk_size),
        "model_name": model.name, "model_fingerprint": model.fingerprint(), "expression": kind,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return g, chunk_size


# --------------------------------------------------------------------------- one chunk (runs on workers)
_OPENED: dict[str, "AnnData"] = {}


def _worker_adata(source) -> "AnnData":
    """The data of a task: a path (opened backed once per process) or an AnnData."""
    if isinstance(source, str):
        if source not in _OPENED:
            from ..io.readers import read

            _OPENED[source] = read(source, backed=True)
        return _OPENED[source]
    return source


def _pin_threads(n: int) -> None:
    """Use ``n`` torch threads in this process (a Dask worker runs one task per thread). Numba's OpenMP start-up
    raises the process-wide thread count once, so this is called before each forward pass; it only acts
    when the count differs."""
    import torch

    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def embed_chunk(model, plan: EmbedPlan, source, k: int, threads: int | None = None) -> tuple[int, np.ndarray | None, float]:
    """Embed chunk ``k`` (rows ``k * chunk_size`` ...); write it to ``plan.store`` when set.

    ``threads`` pins torch/numba threads first (Dask workers: their thread count, so workers do not
    oversubscribe the cores). Returns ``(k, embeds or None when written to the store, seconds)``.
    """
    from ..io.expression import iter_expression

    t0 = time.perf_counter()
    if threads and os.getpid() != plan.client_pid:  # a worker process of its own (never the caller's process)
        _pin_threads(threads)
    adata = _worker_adata(source)
    start = k * plan.chunk_size
    stop = min(start + plan.chunk_size, plan.n_obs)
    _, block = next(iter_expression(adata, kind=plan.kind, report=plan.report, chunk_size=stop - start,
                                    start=start, stop=stop))
    encoding = model.tokenizer.encode_matrix(block, plan.var)
    if threads and os.getpid() != plan.client_pid:
        _pin_threads(threads)  # again: numba's OpenMP start-up can raise the process-wide thread count
    emb = model.embed_encoding(encoding, batch_size=plan.batch_size)
    if plan.store is None:
        return k, emb, time.perf_counter() - t0
    import zarr

    g = zarr.open_group(plan.store, mode="r+")
    g[EMBED_KEY][start:stop] = emb
    g["done"][k] = 1  # after the embeddings: a flagged chunk is always complete
    return k, None, time.perf_counter() - t0


# --------------------------------------------------------------------------- runners
def _client(scheduler, n_workers: int, threads_per_worker: int, processes: bool):
    """``(client, owned)``: a Client for ``scheduler`` (``"local"``, an address or a Client)."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, False
    if scheduler in ("local", True):
        cluster = LocalCluster(n_workers=int(n_workers), threads_per_worker=int(threads_per_worker),
                               processes=bool(processes), dashboard_address=None)
        return Client(cluster), True
    if isinstance(scheduler, str) and ":" in scheduler:
        return Client(scheduler), True
    raise ConfigError("Unknown scheduler", found=repr(scheduler),
                      expected="None (in process), 'local' (a LocalCluster), a scheduler address such as "
                      "'tcp://host:8786', or a distributed.Client",
                      fix="pass scheduler='local' or the address the dask scheduler prints")


def _run_dask(todo, model, plan, source, *, client, progress, cancel, out):
    from distributed import as_completed
    from tqdm.auto import tqdm

    model_f = client.scatter(model, broadcast=True, hash=False)
    plan_f = client.scatter(plan, broadcast=True, hash=False)
    src_f = source if isinstance(source, str) else client.scatter(source, broadcast=True, hash=False)
    nthreads = client.nthreads()
    threads = max(1, min(nthreads.values())) if nthreads else 1
    futures = [client.submit(embed_chunk, model_f, plan_f, src_f, int(k), threads, pure=False,
                             key=f"lexicell-embed-{k}-{time.time_ns()}") for k in todo]
    task_s = []
    try:
        for fut in tqdm(as_completed(futures), total=len(futures), desc="Embedding chunks (dask)", unit="chunk",
                        disable=not progress):
            k, emb, sec = fut.result()
            task_s.append(sec)
            if emb is not None:
                _write(out, plan, k, emb)
            fut.release()
            if cancel is not None and cancel():
                raise CancelledError("Embedding was cancelled", found="cancelled between chunks",
                                     fix="run it again with the same store: finished chunks are kept")
    finally:
        client.cancel([f for f in futures if not f.done()])
    return task_s


def _run_local(todo, model, plan, source, *, progress, cancel, out):
    from tqdm.auto import tqdm

    task_s = []
    for k in tqdm(todo, desc="Embedding chunks", unit="chunk", disable=not progress):
        if cancel is not None and cancel():
            raise CancelledError("Embedding was cancelled", found=f"chunk {k} of {len(todo)} to do",
                                 fix="run it again with the same store: finished chunks are kept")
        _, emb, sec = embed_chunk(model, plan, source, int(k))
        task_s.append(sec)
        if emb is not None:
            _write(out, plan, k, emb)
    return task_s


def _write(out: np.ndarray, plan: EmbedPlan, k: int, emb: np.ndarray) -> None:
    start = k * plan.chunk_size
    out[start : start + emb.shape[0]] = emb


# --------------------------------------------------------------------------- public
def embed_chunked(
    adata: "AnnData",
    model: "TranscriptomeTextModel",
    *,
    kind: str,
    report: "DataReport",
    var: pd.DataFrame,
    store: str | os.PathLike | None = None,
    use_cache: bool = True,
    cache_path: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    batch_size: int = 2048,
    scheduler=None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    processes: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, dict]:
    """Embed ``adata`` chunk by chunk (the engine of :func:`engine.embed_cells` for large or backed data).

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)`` AnnData, in memory or backed. Never modified here.
    model
        The transcriptome-text model (broadcast to Dask workers once).
    kind, report, var
        Expression kind, validation report and the (ortholog-mapped) var table from :func:`engine.embed_cells`.
    store
        zarr store to write (created, or resumed when it holds the same data and model). None: with
        ``use_cache``, a store in ``cache_path/embeddings/`` named by the data/model key; else (in process) no
        store.
    chunk_size
        Cells per chunk (default :data:`DEFAULT_CHUNK_SIZE`; a resumed store keeps its own).
    scheduler
        None (in process), ``"local"`` (a LocalCluster of ``n_workers`` x ``threads_per_worker``,
        ``processes``), a scheduler address (``"tcp://host:8786"``) or a ``distributed.Client``.
    overwrite
        Replace a store that belongs to other data or another model (else :class:`ConfigError`).

    Returns
    -------
    (numpy.ndarray, dict)
        ``(n_cells, projection_dim)`` float32 L2-normalised embeddings (read back from the store) and run
        information: ``store``, ``chunk_size``, ``n_chunks``, ``chunks_computed``, ``chunks_skipped``,
        ``scheduler``, ``cache_key``, ``seconds``, ``chunk_seconds_mean`` (mean time of one chunk task).

    Raises
    ------
    ConfigError
        A store of other data/model without ``overwrite``; an unknown scheduler.
    engine.errors.CancelledError
        When ``cancel()`` returns True between chunks (finished chunks stay in the store).
    engine.errors.DataError
        NaN/inf or negative values in a chunk.
    """
    t0 = time.perf_counter()
    n = int(adata.n_obs)
    plan = EmbedPlan(kind=kind, report=report, var=var, n_obs=n, chunk_size=int(chunk_size or DEFAULT_CHUNK_SIZE),
                     batch_size=int(batch_size), store=None, client_pid=os.getpid())
    key = store_key(adata, model, plan)
    tmp_dir = None
    if store is None and (use_cache or scheduler is not None):
        if use_cache:
            if cache_path is None:
                raise ConfigError("No cache folder given for the embedding store", found="cache_path=None",
                                  expected="engine.tools.embed.cache_dir() (embed_cells passes it)")
            store = Path(cache_path) / "embeddings" / f"{key}.zarr"
            Path(store).parent.mkdir(parents=True, exist_ok=True)
        else:  # workers need somewhere to write
            tmp_dir = tempfile.mkdtemp(prefix="lexicell-embeds-")
            store = Path(tmp_dir) / "embeds.zarr"
    g = None
    if store is not None:
        g, plan.chunk_size = _open_store(str(store), key=key, n_obs=n, dim=model.projection_dim,
                                         chunk_size=plan.chunk_size, model=model, kind=kind, overwrite=overwrite)
        plan.store = str(store)
    n_chunks = max(1, -(-n // plan.chunk_size))
    done = np.asarray(g["done"][:], dtype=bool) if g is not None else np.zeros(n_chunks, dtype=bool)
    todo = np.flatnonzero(~done).tolist()
    out = np.empty((n, model.projection_dim), dtype=np.float32) if g is None else None
    source = data_source_path(adata) or adata
    label = "in process"
    task_s: list[float] = []
    try:
        if todo and scheduler is not None:
            client, owned = _client(scheduler, n_workers, threads_per_worker, processes)
            label = f"dask {client.scheduler.address if hasattr(client, 'scheduler') and client.scheduler else scheduler}"
            try:
                task_s = _run_dask(todo, model, plan, source, client=client, progress=progress, cancel=cancel, out=out)
            finally:
                if owned:
                    cluster = getattr(client, "cluster", None)
                    client.close()
                    if cluster is not None:
                        cluster.close()
        elif todo:
            task_s = _run_local(todo, model, plan, source, progress=progress, cancel=cancel, out=out)
        if g is not None:
            embeds = np.asarray(g[EMBED_KEY][:], dtype=np.float32)
        else:
            embeds = out
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    info = {"store": "" if tmp_dir is not None or store is None else str(store), "chunk_size": plan.chunk_size,
            "n_chunks": n_chunks, "chunks_computed": len(todo), "chunks_skipped": n_chunks - len(todo),
            "scheduler": label, "cache_key": key, "seconds": round(time.perf_counter() - t0, 3),
            "chunk_seconds_mean": round(float(np.mean(task_s)), 3) if task_s else 0.0}
    log.info("embedded %d cells in %d chunks (%d skipped) %s in %.1f s", n, n_chunks, n_chunks - len(todo), label,
             info["seconds"])
    return embeds, info


def read_embeddings(
    adata: "AnnData",
    store: str | os.PathLike,
    *,
    model: "TranscriptomeTextModel | None" = None,
    key_added: str = EMBED_KEY,
) -> np.ndarray:
    """Read embeddings precomputed by ``python -m engine.embed`` (or ``embed_cells(store=...)``) into ``obsm``.

    Parameters
    ----------
    adata
        The dataset the store was computed for (same cells, same order), in memory or backed.
    store
        The zarr store.
    model
        If given, the store must have been written by this model (fingerprint).
    key_added
        ``obsm`` key to write.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, projection_dim)`` float32. Sets ``obsm[key_added]`` and ``uns[key_added]['params']`` (model
        name and fingerprint, so :func:`engine.tools.embed.get_embeds` checks the model later; ``store``).

    Raises
    ------
    MissingEmbeddingError
        No such store, or chunks not finished (rerun the command: it resumes).
    ModelMismatchError
        Another number of cells, or another model than ``model``.
    """
    import zarr

    p = Path(store)
    try:
        g = zarr.open_group(str(p), mode="r")
        meta = dict(g.attrs.get("lexicell_embeds", {}))
    except Exception as err:  # noqa: BLE001
        raise MissingEmbeddingError("No embedding store at this path", found=f"{p}: {type(err).__name__}",
                                    expected="a zarr store written by python -m engine.embed",
                                    fix="run python -m engine.embed DATA --out STORE first") from err
    if meta.get("format") != STORE_FORMAT:
        raise MissingEmbeddingError("Not a Lexicell embedding store", found=str(p), expected=STORE_FORMAT)
    if int(meta["n_obs"]) != adata.n_obs:
        raise ModelMismatchError("The embedding store belongs to another dataset",
                                 found=f"{meta['n_obs']:,} cells in {p.name}", expected=f"{adata.n_obs:,} cells",
                                 fix="point to the store computed for this file")
    if model is not None and meta.get("model_fingerprint") != model.fingerprint():
        raise ModelMismatchError("The embedding store was computed by another model",
                                 found=f"{meta.get('model_name')!r} ({meta.get('model_fingerprint')})",
                                 expected=f"{model.name!r} ({model.fingerprint()})",
                                 fix="recompute it: python -m engine.embed DATA --model DIR --out NEW_STORE")
    done = np.asarray(g["done"][:], dtype=bool)
    if not done.all():
        raise MissingEmbeddingError("The embedding store is unfinished",
                                    found=f"{int(done.sum())} of {done.size} chunks done",
                                    expected="every chunk done", fix="run the same embed command again: it resumes")
    emb = np.asarray(g[EMBED_KEY][:], dtype=np.float32)
    adata.obsm[key_added] = emb
    adata.uns[key_added] = {"params": {"model_name": meta.get("model_name", ""),
                                       "model_fingerprint": meta.get("model_fingerprint", ""),
                                       "expression": meta.get("expression", ""), "store": str(p),
                                       "cache_key": meta.get("key", ""), "from_cache": True}}
    return emb

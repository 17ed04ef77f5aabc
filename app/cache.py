"""Process-wide resources shared read-only by all browser sessions.

One model and one copy of each dataset (with its embeddings and layouts) live per
process, keyed by path; every session gets a :func:`session_adata` view whose
``obs``/``uns``/``obsm`` containers are its own while the matrices are shared, so
one user's query columns or labels never appear in another user's session.
Embedding runs once per (dataset, model) in a background thread
(:class:`EmbeddingJob`); sessions wait on it without blocking the event loop.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from functools import partial
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import anndata as ad

import engine
from engine.tools.embed import EMBED_KEY, SMOOTH_KEY
from engine.errors import CancelledError, LexicellError, MissingEmbeddingError

__all__ = [
    "EMBED_KEY",
    "EmbeddingJob",
    "get_model",
    "get_dataset",
    "model_future",
    "dataset_future",
    "open_backed",
    "embedding_job",
    "session_adata",
    "layout_keys",
    "has_embeddings",
    "smoothed_key",
    "warm_de",
    "clear",
]

log = logging.getLogger(__name__)

DEMO = "demo"

_lock = threading.RLock()
#: Smoothing takes seconds (numba compiles the neighbour graph's kernels on first use): its own lock, so that
#: new sessions (which take ``_lock`` on the event loop) never wait for it.
_smooth_lock = threading.Lock()
_models: dict[str, Future] = {}
_datasets: dict[str, Future] = {}
_jobs: dict[tuple, "EmbeddingJob"] = {}
_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lexicell-load")


def _key(path, none_key: str) -> str:
    if path is None or str(path) in ("", none_key):
        return none_key
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def _timed(what: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    log.info("%s in %.1f s", what, time.perf_counter() - t0)
    return out


def _retry_failed(store: dict, key: str) -> None:
    fut = store.get(key)
    if fut is not None and fut.done() and fut.exception() is not None:
        del store[key]  # a failed load is retried by the next session


def model_future(path=None) -> Future:
    """Future of the model at ``path`` (None: the bundled default), loaded once per process in a thread."""
    key = _key(path, "default")
    with _lock:
        _retry_failed(_models, key)
        if key not in _models:
            _models[key] = _executor.submit(_timed, f"loaded model {key}", engine.load_model,
                                            None if key == "default" else key)
        return _models[key]


def dataset_future(path=None, *, backed: bool = False, embeddings=None, model=None) -> Future:
    """Future of the dataset at ``path`` (None: the demo, scanpy's pbmc68k_reduced), read once per process.

    ``backed``: open the file backed (``X`` stays on disk, see :func:`open_backed`) with the embeddings of
    ``embeddings`` (a store of ``python -m engine.embed``) or of its own ``obsm``, checked against the model at
    ``model`` (a path; None: the default model).
    """
    key = _key(path, DEMO)
    if backed and key != DEMO:
        store = None if embeddings is None else _key(embeddings, "")
        fut_key = f"{key}#backed#{store or ''}#{_key(model, 'default')}"
        reader = partial(open_backed, key, store, model)
    else:
        fut_key = key
        reader = engine.demo_dataset if key == DEMO else partial(engine.read, key)
    with _lock:
        _retry_failed(_datasets, fut_key)
        if fut_key not in _datasets:
            _datasets[fut_key] = _executor.submit(_timed, f"read dataset {fut_key}", reader)
        return _datasets[fut_key]


def open_backed(path, store=None, model=None) -> ad.AnnData:
    """Open a large dataset for serving: ``X`` stays on disk, embeddings and layout come precomputed.

    The file is opened read-only and backed (:func:`engine.read`); the embeddings are read from ``store``
    (:func:`engine.read_embeddings`, checked against the model) or taken from the file's own
    ``obsm['transcriptome_embeds']``; they are never computed here (embedding an atlas takes hours at page
    load; ``python -m engine.embed`` does it once, resumably). Without ``obsm['X_umap']`` a UMAP is computed once
    (:func:`engine.umap`: above 200,000 cells fitted on a sample). The result is shared read-only by every
    session (:func:`session_adata`).

    Raises
    ------
    MissingEmbeddingError
        No store given and no embeddings in the file (the message says which command computes them).
    engine.errors.ModelMismatchError
        The embeddings belong to another dataset or model.
    """
    adata = engine.read(path, backed=True)
    model_obj = model_future(model).result()
    if store is not None:
        engine.read_embeddings(adata, store, model=model_obj)
    elif EMBED_KEY in adata.obsm:
        engine.get_embeds(adata, model_obj)  # raises when they belong to another model
    else:
        raise missing_embeddings_error(path)
    if "X_umap" not in adata.obsm:
        engine.umap(adata, keep_existing=True, progress=False)
    return adata


def missing_embeddings_error(path) -> MissingEmbeddingError:
    """The error shown when a backed dataset is served without precomputed embeddings."""
    name = Path(str(path)).name
    return MissingEmbeddingError(
        "This large dataset is served backed and has no precomputed embeddings", found=f"no obsm['{EMBED_KEY}'] in "
        f"{name} and no --embeddings store", expected="embeddings computed once, before serving",
        fix=f"run  python -m engine.embed {path} --out {name}.embeds.zarr  first, then  python run_app.py {path} "
            f"--backed --embeddings {name}.embeds.zarr")


def get_model(path=None):
    """The model at ``path`` (None: the bundled default), loaded once per process.

    Raises
    ------
    engine.errors.CheckpointError
        When it cannot be loaded.
    """
    return model_future(path).result()


def get_dataset(path=None) -> ad.AnnData:
    """The dataset at ``path`` (None: the demo), read once per process.

    The returned object is shared: treat it as read-only and give sessions :func:`session_adata`.
    """
    return dataset_future(path).result()


def put_dataset(key: str, adata: ad.AnnData) -> None:
    """Register an in-memory dataset under ``key`` (benchmarks and tests)."""
    fut: Future = Future()
    fut.set_result(adata)
    with _lock:
        _datasets[_key(key, DEMO)] = fut


def put_model(key: str, model) -> None:
    """Register a loaded model under ``key`` (tests)."""
    fut: Future = Future()
    fut.set_result(model)
    with _lock:
        _models[_key(key, "default")] = fut


def clear() -> None:
    """Forget every cached model, dataset and job (tests)."""
    with _lock:
        _models.clear()
        _datasets.clear()
        _jobs.clear()


def has_embeddings(adata: ad.AnnData, model) -> bool:
    """True when ``obsm['transcriptome_embeds']`` exists and belongs to ``model``."""
    if model is None or EMBED_KEY not in adata.obsm:
        return False
    try:
        engine.get_embeds(adata, model)
    except LexicellError:
        return False
    return True


def layout_keys(adata: ad.AnnData) -> list[str]:
    """2-D layouts in ``obsm``: keys starting with ``X_`` with at least two columns, UMAP first."""
    keys = [k for k in adata.obsm.keys() if k.startswith("X_") and getattr(adata.obsm[k], "ndim", 0) == 2
            and adata.obsm[k].shape[1] >= 2]
    order = {"X_umap": 0, "X_tsne": 1, "X_draw_graph_fa": 2, "X_pca": 9}
    return sorted(keys, key=lambda k: (order.get(k, 5), k))


class EmbeddingJob:
    """Embedding (and, without any layout, UMAP) of one shared dataset in a background thread.

    Attributes
    ----------
    future
        Resolves to None when ``obsm['transcriptome_embeds']`` (and a layout) are in the shared dataset;
        raises the engine error otherwise (e.g. :class:`~engine.errors.CancelledError`).
    batches_done, n_batches
        Progress, counted from the engine's between-batch ``cancel`` polls.
    """

    def __init__(self, adata: ad.AnnData, model, *, batch_size: int = 1024):
        self.adata = adata
        self.model = model
        self.batch_size = batch_size
        self.n_batches = max(1, math.ceil(adata.n_obs / batch_size))
        self.batches_done = 0
        self.stage = "waiting"
        self.started = time.perf_counter()
        self._cancel = threading.Event()
        self.future: Future = _executor.submit(self._run)

    def _poll(self) -> bool:
        self.batches_done += 1
        return self._cancel.is_set()

    def _run(self) -> None:
        self.stage = "embedding cells"
        engine.embed_cells(self.adata, self.model, batch_size=self.batch_size, progress=False, cancel=self._poll)
        if not layout_keys(self.adata):
            self.stage = "computing UMAP"
            engine.umap(self.adata, keep_existing=True)
        self.stage = "done"

    @property
    def fraction(self) -> float:
        """Share of batches done (0..1)."""
        return min(1.0, max(0, self.batches_done - 1) / self.n_batches)

    def cancel(self) -> None:
        """Ask the job to stop after the current batch."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self.future.done() and isinstance(self.future.exception(), CancelledError)


def embedding_job(adata: ad.AnnData, model) -> EmbeddingJob | None:
    """The running (or finished) embedding job of ``adata`` with ``model``; None when nothing is to be done.

    A failed or cancelled job is replaced by a new one on the next call.
    """
    if has_embeddings(adata, model) and layout_keys(adata):
        return None
    if engine.is_backed(adata) and not has_embeddings(adata, model):
        # never embed a backed atlas at page load (hours): it is done once by python -m engine.embed
        raise missing_embeddings_error(adata.filename or "DATA")
    key = (id(adata), model.fingerprint())
    with _lock:
        job = _jobs.get(key)
        if job is None or (job.future.done() and job.future.exception() is not None):
            job = EmbeddingJob(adata, model)
            _jobs[key] = job
        return job


def session_adata(base: ad.AnnData) -> ad.AnnData:
    """A per-session AnnData sharing ``X``, ``raw``, ``var``, layers and arrays with ``base``.

    ``obs`` is a copy and ``uns``/``obsm``/``obsp`` are new containers, so columns and keys a session adds
    (query scores, labels, DE groups) stay in that session. A backed ``base`` stays backed: the session's ``X`` is
    the same on-disk matrix (``engine.is_backed`` is True for it), never read into memory here.
    """
    return ad.AnnData(
        X=base.X,
        obs=base.obs.copy(),
        var=base.var,
        uns=dict(base.uns),
        obsm=dict(base.obsm),
        varm=dict(base.varm),
        obsp=dict(base.obsp),
        layers=dict(base.layers),
        raw=base.raw,
    )


def sync_from_base(session: ad.AnnData, base: ad.AnnData) -> None:
    """Copy shared results (embeddings, their params, new layouts) from ``base`` into a session's containers."""
    for k in base.obsm.keys():
        if k in (EMBED_KEY, SMOOTH_KEY) or (k.startswith("X_") and k not in session.obsm):
            session.obsm[k] = base.obsm[k]
    for k in (EMBED_KEY, SMOOTH_KEY, "lexicell_neighbors", "lexicell"):
        if k in base.uns:
            session.uns[k] = base.uns[k]
    for k in base.obsp.keys():
        if k.startswith("lexicell_neighbors"):
            session.obsp[k] = base.obsp[k]


def smoothed_key(session: ad.AnnData, base: ad.AnnData | None, model) -> str:
    """Make sure ``session`` has neighbour-smoothed embeddings of ``model``; returns their ``obsm`` key.

    They are computed once per process on the shared ``base`` (:func:`engine.smooth_embeds`, reusing the
    UMAP's neighbour graph when there is one) and then shared with every session like the embeddings.
    """
    base = session if base is None else base
    with _smooth_lock:
        params = base.uns.get(SMOOTH_KEY, {}).get("params", {}) if isinstance(base.uns.get(SMOOTH_KEY), dict) else {}
        if SMOOTH_KEY not in base.obsm or params.get("model_fingerprint") != model.fingerprint():
            engine.smooth_embeds(base)
    if base is not session:
        sync_from_base(session, base)
    return SMOOTH_KEY


def warm_de(adata: ad.AnnData, n_cells: int = 60) -> bool:
    """Run a top-vs-bottom DE on a copy of the first ``n_cells`` cells of ``adata``, to load the test's numba
    kernels before a user's first DE.

    scanpy's Wilcoxon test ranks and tie-corrects with numba functions. On a new installation their first call
    compiles them (about 35 s of CPU on the 2-core reference machine, 2026-12-04; then cached in the package's
    ``__pycache__``), and every later process still loads them on first use (about 0.6 s). A server's first
    DE paid either while every page shared the interpreter with it; the server's warm-up thread pays it
    before users arrive. The copy is of the dataset's own matrix, so the kernels are those of its dtype.

    Parameters
    ----------
    adata
        The served dataset, in memory or backed; not modified (only a copy of ``n_cells`` rows is read).
    n_cells
        Rows to copy (at least 6 are needed: 3 top and 3 bottom cells).

    Returns
    -------
    bool
        True when the DE ran; False when the dataset has fewer than 6 cells or the test failed (logged: the
        user's own DE reports any real problem).
    """
    n = min(int(n_cells), adata.n_obs)
    if n < 6:
        return False
    import numpy as np

    try:
        sub = engine.selection_adata(adata, np.arange(n))
        engine.de_top_vs_bottom(sub, np.arange(n, dtype=np.float64), n=n // 2)
    except Exception as err:  # noqa: BLE001 - a warm-up only; the user's own DE reports errors
        log.info("DE warm-up skipped: %s", err)
        return False
    return True


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")

"""Distillation inputs and the teacher's embeddings, cached on disk in chunks.

The teacher (a native model folder, e.g. a converted CellWhisperer checkpoint) embeds every cell of the
``--data`` files once with its transcriptome tower and head: projected, L2-normalised
``transcriptome_embeds``, cached as ``<cache>/<data-name>-<key>/chunk_00000.npy`` ... (the key hashes the
data, the teacher, the chunk size and the precision), so an interrupted run resumes where it stopped and a
rerun skips the teacher. Also here: reading and checking the inputs, and refusing an ``--out`` that would
write over them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..errors import CancelledError, CheckpointError, ConfigError, EmptySelectionError, GeneIdentifierError

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse as sp

    from ..models.model import TranscriptomeTextModel

__all__ = ["CACHE_DIR", "REPORT_FILE", "CARD_FILE"]

log = logging.getLogger(__name__)

CACHE_DIR = "teacher_embeds"
REPORT_FILE = "distill_report.json"
CARD_FILE = "MODEL_CARD.md"
_OWN_FILES = {CACHE_DIR, REPORT_FILE, CARD_FILE, "config.json", "model.safetensors", "genes.tsv", "text_model"}


# --------------------------------------------------------------------------- inputs
@dataclass
class _Dataset:
    """One ``--data`` file: expression for rank encoding, its genes and cell names."""

    path: Path
    name: str
    X: "sp.csr_matrix"  # (n_cells, n_genes) float32, counts (or normalised values for a teacher without counts)
    var: object  # pandas.DataFrame with ensembl_id / gene_symbol
    obs_names: list
    kind: str


def _check_not_input(out: Path, cache: Path, inputs=()) -> None:
    """Refuse ``out`` when it is an input folder (the teacher) or would replace an input file, whatever
    ``--overwrite`` says."""
    target = out.expanduser().resolve()
    for inp in inputs:
        src = Path(inp).expanduser().resolve()
        if src == target or (src.parent == target and src.name in _OWN_FILES) or (cache.resolve() in src.parents):
            raise ConfigError(
                "--out would write over an input", found=f"{out} (input {inp})",
                expected="a new folder apart from the teacher model and the data files",
                fix="choose another --out; inputs are never overwritten, not even with --overwrite",
            )


def _check_out(out: Path, overwrite: bool, cache: Path, inputs=()) -> None:
    """Refuse to write into a file, over a model, or into a folder with foreign files, unless ``overwrite``;
    refuse always when ``out`` is an input (:func:`_check_not_input`)."""
    _check_not_input(out, cache, inputs)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out is a file", found=str(out), expected="a folder (created if missing)")
    if not out.is_dir() or overwrite:
        return
    if (out / "config.json").exists():
        raise ConfigError(
            "The output folder already holds a model",
            found=str(out),
            expected="a new folder, or the folder of an interrupted distillation (it resumes)",
            fix="pass --overwrite to replace the model (the cached teacher embeddings are reused), or choose another --out",
        )
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_FILES and p != cache)
    if foreign:
        raise ConfigError(
            "The output folder is not empty",
            found=f"{out} holding {foreign[:5]}",
            expected="a new or empty folder, or the folder of an interrupted distillation",
            fix="pass --overwrite to write there anyway, or choose another --out",
        )


def _load_teacher(teacher, device) -> "TranscriptomeTextModel":
    from ..models.checkpoint import load_model

    path = Path(teacher).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            "The teacher is not a model folder",
            found=str(path) + (" (a file)" if path.is_file() else " (missing)"),
            expected="a native model folder (config.json, model.safetensors, genes.tsv)",
            fix="convert the checkpoint first: python -m engine.convert cellwhisperer CKPT --geneformer DIR --text-model DIR --out DIR",
        )
    return load_model(path, device=device)


def _read_data(paths: Sequence, teacher: "TranscriptomeTextModel") -> list[_Dataset]:
    """Read every data file and check that the teacher can embed it (counts, shared genes)."""
    from ..io.data import expression_matrix, read

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ConfigError("No data to distil on", found="no --data", expected="one or more .h5ad files (or other engine.read formats)")
    kind = "counts" if getattr(teacher.transcriptome_tower, "requires_counts", False) else "normalized"
    out, seen = [], set()
    for p in paths:
        adata = p if not isinstance(p, (str, os.PathLike)) else read(p)
        path = Path(p) if isinstance(p, (str, os.PathLike)) else Path(f"adata{len(out)}")
        X, var = expression_matrix(adata, kind=kind)  # MatrixKindError when the teacher needs counts and there are none
        if X.shape[0] == 0:
            raise EmptySelectionError("A data file has no cells", found=str(path), expected="at least one cell")
        matched = int((teacher.tokenizer.match_genes(var) >= 0).sum())
        if matched == 0:
            raise GeneIdentifierError(
                "None of the data's genes is in the teacher's vocabulary",
                found=f"{path}: {X.shape[1]} genes such as {list(var.index[:4])}",
                expected=f"Ensembl IDs or symbols such as {list(teacher.tokenizer.gene_ids[:3])}",
                fix="check the species and the gene identifiers: engine.validate(adata) maps symbols to Ensembl IDs",
            )
        name = path.stem.replace(" ", "_") or "data"
        while name in seen:
            name += "_"
        seen.add(name)
        log.info("%s: %d cells, %d of %d genes in the teacher's vocabulary", path, X.shape[0], matched, X.shape[1])
        out.append(_Dataset(path, name, X.tocsr(), var, [str(o) for o in adata.obs_names], kind))
    return out


# --------------------------------------------------------------------------- teacher embeddings (cached)
def _autocast(device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; a no-op context on CPU (CPU results stay bit-identical)."""
    import torch

    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _teacher_key(ds: _Dataset, teacher_fp: str, chunk_size: int, amp: bool) -> str:
    from ..tools.embed import data_fingerprint

    ids = ds.var["ensembl_id"].astype(str).tolist() if "ensembl_id" in ds.var.columns else list(map(str, ds.var.index))
    h = hashlib.blake2b(digest_size=8)
    for part in (data_fingerprint(ds.X, ids, ds.obs_names), teacher_fp, ds.kind, str(chunk_size), "bf16" if amp else "fp32"):
        h.update(part.encode())
    return h.hexdigest()


def _read_chunk(file: Path, rows: int, dim: int) -> np.ndarray | None:
    try:
        arr = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        log.warning("recomputing unreadable teacher chunk %s: %s", file, err)
        return None
    if arr.shape != (rows, dim) or not np.isfinite(arr).all():
        log.warning("recomputing teacher chunk %s: shape %s, expected %s", file, arr.shape, (rows, dim))
        return None
    return arr.astype(np.float32, copy=False)


def _teacher_embeds(
    teacher, datasets: list[_Dataset], cache: Path, *, chunk_size: int, amp: bool, batch_size: int,
    progress: bool, cancel: Callable[[], bool] | None,
) -> tuple[list[np.ndarray], dict]:
    """Teacher ``transcriptome_embeds`` of every cell, chunk by chunk, reusing finished chunks on disk."""
    from tqdm.auto import tqdm

    fp = teacher.fingerprint()
    dim = teacher.projection_dim
    plan = []
    for ds in datasets:
        folder = cache / f"{ds.name}-{_teacher_key(ds, fp, chunk_size, amp and teacher.device.type == 'cuda')}"
        n = ds.X.shape[0]
        for c, start in enumerate(range(0, n, chunk_size)):
            plan.append((ds, folder, c, start, min(start + chunk_size, n)))
    out: dict[str, list] = {ds.name: [] for ds in datasets}
    computed = reused = 0
    bar = tqdm(plan, desc="Teacher embeddings (chunks)", unit="chunk", disable=not progress)
    for ds, folder, c, start, stop in bar:
        file = folder / f"chunk_{c:05d}.npy"
        arr = _read_chunk(file, stop - start, dim) if file.is_file() else None
        if arr is None:
            if cancel is not None and cancel():
                raise CancelledError(
                    "Teacher embedding was cancelled",
                    found=f"{computed + reused} of {len(plan)} chunks done (kept in {cache})",
                    fix="run the same command again: finished chunks are reused",
                )
            folder.mkdir(parents=True, exist_ok=True)
            meta = folder / "meta.json"
            if not meta.is_file():
                meta.write_text(json.dumps({"data": str(ds.path), "n_cells": ds.X.shape[0], "chunk_size": chunk_size,
                                            "teacher": teacher.name, "teacher_fingerprint": fp, "dim": dim}, indent=2))
            enc = teacher.tokenizer.encode_matrix(ds.X[start:stop], ds.var)
            with _autocast(teacher.device, amp):
                arr = teacher.embed_encoding(enc, batch_size=batch_size)
            tmp = file.with_name(file.stem + ".tmp.npy")
            np.save(tmp, arr.astype(np.float32))
            os.replace(tmp, file)
            computed += 1
        else:
            reused += 1
        out[ds.name].append(arr)
    stats = {"chunks": len(plan), "computed": computed, "reused": reused, "chunk_size": chunk_size, "cache": str(cache)}
    return [np.concatenate(out[ds.name]) if out[ds.name] else np.zeros((0, dim), np.float32) for ds in datasets], stats

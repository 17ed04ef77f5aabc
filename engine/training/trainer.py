"""The CLIP training loop of the two-tower transcriptome-text model (CellWhisperer, seed 000 §3.3).

:class:`_Trainer` reads the data, builds the model (and runs the config's ``init`` hook), splits training and
validation pairs, rank-encodes them once, and trains with ``clip_weight x CLIP + jsd_weight x JSD``
(:mod:`engine.training.losses`), soft targets for pairs that share a text or a group, AdamW with linear
warm-up and cosine decay, gradient clipping and a clamped ``logit_scale``. It validates after every epoch
(retrieval recall over unique texts, appendix B) and keeps the best epoch. The optional ``text_finetune``
phase unlocks the text tower's top blocks. Feature caches are in :mod:`.text_cache`, persistence and resume
in :mod:`.state`; the entry points are in :mod:`engine.training.train`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import ConfigError, DataError
from .losses import combined_loss, positive_mask
from .metrics import retrieval_metrics
from .model_builder import build_model_from_config
from .sources import import_callable, load_data
from .schedule import _batches, _Encoded, _lr_lambda, _seed_everything, _warmup_steps
from .state import _TrainState
from .text_cache import _TextFeatures

__all__ = ["_Trainer"]

log = logging.getLogger(__name__)


def _is_better(value: float, loss: float, best_value: float | None, best_loss: float | None, minimize: bool) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return best_value is None
    if best_value is None:
        return True
    if (value < best_value) if minimize else (value > best_value):
        return True
    return value == best_value and best_loss is not None and loss is not None and loss < best_loss


def _n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _Trainer(_TextFeatures, _TrainState):
    """One training run: ``setup()`` (data, model, split, encodings, optimizer; resume) then ``run()``."""

    def __init__(self, cfg: dict, *, device, out: Path, resume: bool, max_steps: int | None, progress: bool | None) -> None:
        self.cfg = cfg
        self.t = cfg["train"]
        self.out = out
        self.resume = resume
        self.max_steps = max_steps if max_steps is not None else self.t.get("max_steps")
        self.progress = bool(self.t.get("progress", True)) if progress is None else bool(progress)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("CUDA was requested but is not available", found=str(device), expected="'cpu' on this machine")

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        t_setup = time.perf_counter()
        t, cfg = self.t, self.cfg
        if t.get("num_threads"):
            torch.set_num_threads(int(t["num_threads"]))
        self.seed = int(t["seed"])
        _seed_everything(self.seed)
        base = cfg.get("_base_dir")
        t0 = time.perf_counter()
        data, self.sources = load_data(cfg["data"], base_dir=base)
        log.info("data: %d pairs, %d unique texts in %.1f s", len(data), len(set(data.texts)), time.perf_counter() - t0)
        if cfg.get("val_data"):
            val, vsum = load_data(cfg["val_data"] if isinstance(cfg["val_data"], list) else [cfg["val_data"]], base_dir=base)
            self.sources += [{**s, "role": "validation"} for s in vsum]
            train = data
        else:
            train, val = data.split(float(t["val_fraction"]), seed=self.seed, by_group=bool(t["split_by_group"]))
        if len(train) < 2:
            raise DataError("Too few training pairs", found=f"{len(train)} pairs", expected="at least 2")
        self.train_data, self.val_data = train, val
        # the random part of the initial weights; a separate init_seed lets runs share their start (model soups)
        _seed_everything(self.seed if t.get("init_seed") is None else int(t["init_seed"]))
        self.model = build_model_from_config(cfg["model"], data=data, base_dir=base)
        if cfg.get("init") and not self.resume and not cfg["model"].get("init_from"):  # a loaded start keeps its weights
            hook = cfg["init"]
            if isinstance(hook, str):
                hook = {"callable": hook}
            fn = import_callable(hook["callable"])
            fn(self.model, data, **dict(hook.get("kwargs") or {}))
            self.model.invalidate_caches()
        self.model.to(self.device)
        self._configure_locking()
        # texts: one table over train + validation
        self.texts: list[str] = []
        tindex: dict[str, int] = {}
        self.train_text = np.array([tindex.setdefault(x, len(tindex)) for x in train.texts], dtype=np.int64)
        self.val_text = np.array([tindex.setdefault(x, len(tindex)) for x in val.texts], dtype=np.int64)
        self.texts = list(tindex)
        self.train_groups = train.groups
        log.info("encoding %d training and %d validation pairs", len(train), len(val))
        t0 = time.perf_counter()
        self.train_enc = _Encoded(self.model, train)
        self.val_enc = _Encoded(self.model, val) if len(val) else None
        log.info("rank encoding in %.1f s (width %d)", time.perf_counter() - t0, self.train_enc.ids.shape[1])
        # optimisation
        self.batch_size = int(t["batch_size"])
        self.steps_per_epoch = len(_batches(len(train), self.batch_size, self.seed, 0))
        self.total_steps = max(1, self.steps_per_epoch * int(t["epochs"]))
        self.ft = t.get("text_finetune")
        self.total_epochs = int(t["epochs"]) + (int(self.ft["epochs"]) if self.ft else 0)
        self.phase = "main"
        self.text_partial = False
        warm = _warmup_steps(t["warmup_steps"], self.total_steps)
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(warm, self.total_steps, float(t["min_lr_ratio"])))
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_value = self.best_loss = None
        self.best_epoch = None
        self.history: list[dict] = []
        self.elapsed = 0.0
        if self.resume:
            self._load_last()
        self._cache_locked_features()
        self.setup_s = time.perf_counter() - t_setup

    def _configure_locking(self) -> None:
        t, m = self.t, self.model
        self.lock_text = bool(t["lock_text"])
        self.lock_tx = bool(t["lock_transcriptome"])
        for p in m.text_tower.parameters():
            p.requires_grad_(not self.lock_text)
        for p in m.transcriptome_tower.parameters():
            p.requires_grad_(not self.lock_tx)
        if not self.lock_text:
            prefixes = t.get("text_trainable")
            if prefixes:
                prefixes = [str(p) for p in prefixes]
                for name, p in m.text_tower.model.named_parameters():
                    p.requires_grad_(any(name.startswith(px) for px in prefixes))
                m.text_finetuned = prefixes
                m.text_weights = "source"
            else:
                m.text_weights = "checkpoint"
        n_train = _n_trainable(m)
        log.info("trainable parameters: %d (lock_text=%s, lock_transcriptome=%s)", n_train, self.lock_text, self.lock_tx)

    def _enter_text_phase(self) -> None:
        """Second phase: unlock the text tower's top ``layers`` blocks (0: stay locked), new optimizer and schedule.

        The blocks below stay locked; their output token states are computed once per text
        (:meth:`_cache_text_hidden`), so a step costs the trainable blocks only.
        """
        ft, m = self.ft, self.model
        n_layers = int(ft["layers"])
        if n_layers > 0:
            blocks = m.text_tower.encoder_layers()
            if n_layers > len(blocks):
                raise ConfigError("train.text_finetune.layers exceeds the text model's depth",
                                  found=n_layers, expected=f"1..{len(blocks)}")
            self.text_start = len(blocks) - n_layers
            prefixes = [f"encoder.layer.{i}." for i in range(self.text_start, len(blocks))]
            if m.text_tower.pooling == "pooler" and getattr(m.text_tower.model, "pooler", None) is not None:
                prefixes.append("pooler.")
            for name, p in m.text_tower.model.named_parameters():
                p.requires_grad_(name.startswith(tuple(prefixes)))
            m.text_finetuned = sorted(set(m.text_finetuned) | set(prefixes))
            m.text_weights = "source"
            self._cache_text_hidden()
            self.text_partial = True
        self.phase = "text"
        steps = max(1, self.steps_per_epoch * int(ft["epochs"]))
        warm = _warmup_steps(ft["warmup_steps"], steps)
        self.optimizer = self._optimizer(lr=float(ft["lr"]), text_lr=float(ft["text_lr"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(warm, steps, float(self.t["min_lr_ratio"])))
        n_train = _n_trainable(m)
        log.info("text phase: %d trainable parameters (text blocks from %s)", n_train,
                 getattr(self, "text_start", None) if n_layers else "none, locked")

    def _optimizer(self, lr: float | None = None, text_lr: float | None = None) -> torch.optim.Optimizer:
        t = self.t
        lr = float(t["lr"]) if lr is None else float(lr)
        if text_lr is None:
            text_lr = float(t["text_lr"]) if t.get("text_lr") else lr
        groups: dict[tuple, list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            decay = p.ndim >= 2 and "embeddings" not in name
            plr = text_lr if name.startswith("text_tower.") else lr
            groups.setdefault((decay, plr), []).append(p)
        params = [
            {"params": ps, "weight_decay": float(t["weight_decay"]) if decay else 0.0, "lr": plr}
            for (decay, plr), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
        ]
        return torch.optim.AdamW(params, lr=lr, betas=tuple(float(b) for b in t["betas"]))

    # ------------------------------------------------------------------ forward pieces
    def _tx_embeds(self, idx: np.ndarray, *, val: bool = False) -> torch.Tensor:
        m = self.model
        if self.lock_tx:
            feats = (self.val_tx_feats if val else self.train_tx_feats)[torch.from_numpy(idx).to(self.device)]
        else:
            feats = m.transcriptome_tower(*(self.val_enc if val else self.train_enc).batch(idx, self.device))
        return F.normalize(m.transcriptome_projection(feats), dim=-1)

    def _text_embeds(self, text_ids: np.ndarray) -> torch.Tensor:
        """Embeds of texts ``text_ids`` (indices into ``self.texts``); each unique text is encoded once."""
        m = self.model
        uniq, inv = np.unique(text_ids, return_inverse=True)
        if self.text_partial:
            feats = self._partial_text_features(uniq)
        elif self.lock_text:
            feats = self.text_feats[torch.from_numpy(uniq).to(self.device)]
        else:
            enc = m.text_tower.tokenize([self.texts[i] for i in uniq], device=self.device)
            feats = m.text_tower(**enc)
        emb = F.normalize(m.text_projection(feats), dim=-1)
        return emb[torch.from_numpy(inv).to(self.device)]

    def _positives(self, text_ids: np.ndarray, groups: np.ndarray | None) -> torch.Tensor | None:
        mode = self.t["soft_targets"]
        if not mode:
            return None
        ids = []
        if mode in (True, "text", "both"):
            ids.append(torch.from_numpy(text_ids))
        if mode in (True, "group", "both") and groups is not None:
            ids.append(torch.from_numpy(groups))
        return positive_mask(*ids, n=len(text_ids)).to(self.device) if ids else None

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.lock_text:
            self.model.text_tower.eval()
            if self.text_partial:
                for block in self.model.text_tower.encoder_layers()[self.text_start:]:
                    block.train()
        if self.lock_tx:
            self.model.transcriptome_tower.eval()

    # ------------------------------------------------------------------ loop
    def run(self) -> Path:
        from tqdm.auto import tqdm

        t = self.t
        epochs = self.total_epochs
        max_logit = math.log(float(t["max_logit_scale"]))
        amp = bool(t.get("amp")) and self.device.type == "cuda"
        stop = False
        if not self.history:  # baseline before any step (logged as epoch 0, never selected)
            t0 = time.perf_counter()
            val = self.validate()
            rec0 = {"epoch": 0, "partial": False, "steps": 0, "global_step": 0, "val": val, "seconds": round(time.perf_counter() - t0, 3),
                    "logit_scale": float(self.model.logit_scale.detach().exp())}
            self.history.append(rec0)
            if self.cfg["model"].get("init_from") and t.get("select_start", True):  # a trained start competes
                self._select(rec0)
        while self.epoch < epochs and not stop:
            e = self.epoch
            if self.ft and e >= int(t["epochs"]) and self.phase != "text":
                self._enter_text_phase()
            t0 = time.perf_counter()
            self._set_train_mode()
            batches = _batches(len(self.train_data), self.batch_size, self.seed, e)
            losses, parts_sum = [], {}
            bar = tqdm(
                total=len(batches), initial=self.step_in_epoch, disable=not self.progress, unit="batch",
                desc=f"Epoch {e + 1}/{epochs}" + (" (text tower top layers)" if self.text_partial else ""),
            )
            for b in range(self.step_in_epoch, len(batches)):
                if self.max_steps is not None and self.global_step >= int(self.max_steps):
                    stop = True
                    break
                idx = batches[b]
                tids = self.train_text[idx]
                groups = self.train_groups[idx] if self.train_groups is not None else None
                with (torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()):
                    tx = self._tx_embeds(idx)
                    xt = self._text_embeds(tids)
                    logits = (tx.float() @ xt.float().T) * self.model.logit_scale.exp()
                loss, parts = combined_loss(
                    {"logits_per_transcriptome": logits},
                    clip_weight=float(t["clip_weight"]),
                    jsd_weight=float(t["jsd_weight"]),
                    positives=self._positives(tids, groups),
                    return_parts=True,
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if t.get("grad_clip"):
                    torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], float(t["grad_clip"]))
                self.optimizer.step()
                self.scheduler.step()
                with torch.no_grad():
                    self.model.logit_scale.clamp_(max=max_logit)
                losses.append(float(loss.detach()))
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
                self.global_step += 1
                self.step_in_epoch = b + 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.close()
            finished = self.step_in_epoch >= len(batches)
            if not losses and not finished:
                break  # max_steps reached before any step of this epoch
            val = self.validate()
            dt = time.perf_counter() - t0
            self.elapsed += dt
            rec = {
                "epoch": e + 1,
                "phase": self.phase,
                "partial": not finished,
                "steps": len(losses),
                "global_step": self.global_step,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                **{f"train_{k}": v / max(1, len(losses)) for k, v in parts_sum.items()},
                "lr": float(self.scheduler.get_last_lr()[0]),
                "logit_scale": float(self.model.logit_scale.detach().exp()),
                "val": val,
                "seconds": round(dt, 3),
            }
            self.history.append(rec)
            self._select(rec)
            if finished:
                self.epoch += 1
                self.step_in_epoch = 0
            self._save_last()
            self._write_log(status="running")
            log.info("epoch %d: train loss %.4f, val %s", e + 1, rec["train_loss"], {k: round(v, 4) for k, v in val.items() if isinstance(v, float)})
        if self.best_epoch is None:  # nothing selected (no validation metric): keep the last state
            self.best_epoch = self.history[-1]["epoch"]
            self._save_best(self.history[-1])
        self._finalise()
        return self.out

    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_enc is None or len(self.val_data) < 2:
            return {}
        m = self.model
        m.eval()
        bs = int(self.t["eval_batch_size"])
        n = len(self.val_data)
        tx = torch.cat([self._tx_embeds(np.arange(i, min(i + bs, n)), val=True) for i in range(0, n, bs)])
        uniq = np.unique(self.val_text)
        xt = torch.cat([self._text_embeds(uniq[i : i + bs]) for i in range(0, len(uniq), bs)])
        local = np.searchsorted(uniq, self.val_text)
        scale = m.logit_scale.exp()
        sim = (tx @ xt.T).float().cpu().numpy()
        out = retrieval_metrics(sim, local)
        # validation loss on shuffled batches of the training batch size (fixed order)
        losses = []
        t = self.t
        for idx in _batches(n, self.batch_size, self.seed, 10_000):
            if len(idx) < 2:
                continue
            logits = tx[idx] @ xt[local[idx]].T * scale
            g = self.val_data.groups[idx] if self.val_data.groups is not None else None
            losses.append(
                float(
                    combined_loss(
                        {"logits_per_transcriptome": logits},
                        clip_weight=float(t["clip_weight"]),
                        jsd_weight=float(t["jsd_weight"]),
                        positives=self._positives(self.val_text[idx], g),
                    )
                )
            )
        out["loss"] = float(np.mean(losses)) if losses else float("nan")
        self._set_train_mode()
        return out

    def _select(self, rec: dict) -> None:
        val = rec["val"]
        if not val:
            return
        name = str(self.t["select_metric"])
        key = name[4:] if name.startswith("val_") else name
        if key not in val:
            raise ConfigError("Unknown select_metric", found=repr(name), expected=f"one of {sorted(k for k in val if k not in ('n_pairs', 'n_texts'))}")
        value = float(val[key])
        minimize = "loss" in key
        if _is_better(value, val.get("loss"), self.best_value, self.best_loss, minimize):
            self.best_value, self.best_loss, self.best_epoch = value, val.get("loss"), rec["epoch"]
            self._save_best(rec)

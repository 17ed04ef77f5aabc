"""What a training run writes: the best model, ``train_log.json`` and the resumable ``last/`` state.

The best epoch is saved in the native format (:func:`engine.models.checkpoint.save_model`) with the
training metadata; ``out/last/`` holds the weights (safetensors), optimizer, scheduler, RNG state and
counters (``torch.save`` of plain tensors and dicts, read back with ``weights_only=True``), so ``--resume``
continues a run exactly. The :class:`_TrainState` mixin holds these methods of
:class:`engine.training.trainer._Trainer`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .config import public_config

__all__ = ["_TrainState", "_json_default", "_write_json"]

log = logging.getLogger(__name__)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


class _TrainState:
    """Persistence of :class:`~engine.training.trainer._Trainer`: best model, log, ``last/`` save and resume."""

    def _metadata(self, rec: dict | None = None, *, final: bool = False) -> dict:
        t = self.t
        meta = {
            "training": {
                "data_sources": self.sources,
                "n_pairs_train": len(self.train_data),
                "n_pairs_val": len(self.val_data),
                "n_texts": len(self.texts),
                "epochs": self.total_epochs,
                "epochs_run": len([h for h in self.history if not h["partial"] and h["epoch"] > 0]),
                "global_step": self.global_step,
                "best_epoch": self.best_epoch,
                "select_metric": t["select_metric"],
                "best_value": self.best_value,
                "val_metrics": (rec or {}).get("val", {}),
                "time_s": round(self.elapsed, 2),
                "setup_s": round(getattr(self, "setup_s", 0.0), 2),
                "seed": self.seed,
                "lock_text": self.lock_text,
                "text_finetuned": list(self.model.text_finetuned),
                "text_finetune": self.ft,
                "init_from": self.cfg["model"].get("init_from"),
                "lock_transcriptome": self.lock_tx,
                "loss": {"clip_weight": t["clip_weight"], "jsd_weight": t["jsd_weight"], "soft_targets": t["soft_targets"]},
                "finished": final,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "paper": "CellWhisperer (Schaefer et al.), seed 000 §3.3 and appendix B",
            },
            "train_config": public_config(self.cfg),
        }
        return json.loads(json.dumps(meta, default=_json_default))

    def _save_best(self, rec: dict) -> None:
        from ..models.checkpoint import save_model

        save_model(self.model, self.out, metadata=self._metadata(rec))
        self._best_rec = rec

    def _write_log(self, status: str) -> None:
        _write_json(
            self.out / "train_log.json",
            {
                "status": status,
                "best_epoch": self.best_epoch,
                "select_metric": self.t["select_metric"],
                "best_value": self.best_value,
                "epochs": self.history,
                "time_s": round(self.elapsed, 2),
                "config": public_config(self.cfg),
                "data_sources": self.sources,
            },
        )

    def _finalise(self) -> None:
        cfg_file = self.out / "config.json"
        if cfg_file.is_file():
            config = json.loads(cfg_file.read_text())
            rec = getattr(self, "_best_rec", None)
            config.setdefault("metadata", {}).update(self._metadata(rec, final=self.epoch >= self.total_epochs))
            _write_json(cfg_file, config)
        finished = self.epoch >= self.total_epochs
        self._write_log(status="finished" if finished else "stopped")
        if finished and not self.t.get("keep_last", True):
            import shutil

            shutil.rmtree(self.out / "last", ignore_errors=True)
        self.model.eval()
        self.model.invalidate_caches()

    def _state_keys(self) -> list[str]:
        from ..models.checkpoint import _text_state_keys

        sd = self.model.state_dict()
        by_reference = set(_text_state_keys(self.model, sd)) if self.model.text_weights == "source" else set()
        return [k for k in sd if k not in by_reference]

    def _save_last(self) -> None:
        from ..models.checkpoint import save_weights

        last = self.out / "last"
        last.mkdir(parents=True, exist_ok=True)
        sd = self.model.state_dict()
        save_weights({k: sd[k].detach().cpu().contiguous() for k in self._state_keys()}, last / "model.safetensors")
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_value": self.best_value,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "elapsed": self.elapsed,
            "phase": self.phase,
            "torch_rng": torch.get_rng_state(),
            "history_json": json.dumps(self.history, default=_json_default),
            "best_rec_json": json.dumps(getattr(self, "_best_rec", None), default=_json_default),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        tmp = last / "state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, last / "state.pt")
        (last / "train_config.json").write_text(json.dumps(public_config(self.cfg), indent=2, default=_json_default))

    def _load_last(self) -> None:
        from safetensors.torch import load_file

        last = self.out / "last"
        if not (last / "state.pt").is_file() or not (last / "model.safetensors").is_file():
            raise CheckpointError(
                "Nothing to resume from",
                found=f"no {last / 'state.pt'}",
                expected="out/last/ written by an earlier run with the same --out",
                fix="run without --resume to start a new training",
            )
        prev = json.loads((last / "train_config.json").read_text()) if (last / "train_config.json").is_file() else None
        if prev is not None and (prev.get("model") != self.cfg.get("model") or prev.get("data") != self.cfg.get("data")):
            log.warning("resuming with a model or data config that differs from the saved run")
        state_w = load_file(str(last / "model.safetensors"))
        own = self.model.state_dict()
        missing = [k for k in self._state_keys() if k not in state_w]
        bad = [k for k in state_w if k not in own or own[k].shape != state_w[k].shape]
        if missing or bad:
            raise CheckpointError(
                "The saved training state does not fit this model",
                found=f"{len(missing)} missing, {len(bad)} unexpected or misshaped tensors (e.g. {(missing + bad)[:3]})",
                expected="the model of the saved run",
                fix="resume with the same config, or start a new run",
            )
        self.model.load_state_dict(state_w, strict=False)
        self.model.to(self.device)
        st = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
        if st.get("phase") == "text":  # the optimizer state below belongs to the text phase
            self._enter_text_phase()
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = int(st["epoch"]), int(st["step_in_epoch"]), int(st["global_step"])
        self.best_value, self.best_loss, self.best_epoch = st["best_value"], st["best_loss"], st["best_epoch"]
        self.elapsed = float(st.get("elapsed", 0.0))
        self.history = json.loads(st["history_json"])
        best_rec = json.loads(st.get("best_rec_json", "null"))
        if best_rec is not None:
            self._best_rec = best_rec
        torch.set_rng_state(st["torch_rng"])
        if "cuda_rng" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        log.info("resumed at epoch %d, step %d", self.epoch + 1, self.step_in_epoch)

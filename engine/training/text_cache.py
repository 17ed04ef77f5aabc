"""Locked-tower features for the trainer, computed once and kept in memory and on disk.

LiT-style locking (Zhai et al. 2022): a locked tower's features are computed once per text (or per pair
for a locked transcriptome tower) instead of every step. Text features are also stored on disk under
:func:`engine.tools.embed.cache_dir`, one store per text tower (config and weights hashed), so that runs
sharing a text tower share its features. For the ``text_finetune`` phase, the token states entering the
first trainable block are cached the same way, so a step runs only the trainable top blocks. The
:class:`_TextFeatures` mixin holds these methods of :class:`engine.training.trainer._Trainer`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from .schedule import _Encoded

__all__ = ["_TextFeatures"]

log = logging.getLogger(__name__)


def _save_store(store: Path, texts: list[str], **arrays: np.ndarray) -> None:
    """Write a feature store atomically: ``<name>.npy`` per array, then ``texts.json`` (the row names)."""
    store.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        np.save(store / f"{name}.tmp.npy", arr)
    (store / "texts.tmp.json").write_text(json.dumps(texts), encoding="utf-8")
    for name in arrays:
        os.replace(store / f"{name}.tmp.npy", store / f"{name}.npy")
    os.replace(store / "texts.tmp.json", store / "texts.json")


class _TextFeatures:
    """Feature caches of :class:`~engine.training.trainer._Trainer` (needs ``model``, ``device``, ``t``, ``texts``,
    ``progress``, ``lock_text``, ``lock_tx``, ``train_enc``, ``val_enc`` and, for the text phase, ``text_start``)."""

    @torch.no_grad()
    def _cache_text_hidden(self) -> None:
        """Token states entering block ``text_start`` for every text, flat ``(tokens, hidden)`` + offsets.

        Kept on disk beside the locked-feature store, keyed by the locked blocks' weights and the split.
        """
        from tqdm.auto import tqdm

        from ..tools.embed import cache_dir

        m, dev, k = self.model, self.device, self.text_start
        top = tuple(f"model.encoder.layer.{i}." for i in range(k, len(m.text_tower.encoder_layers()))) + ("model.pooler.",)
        store = Path(cache_dir()) / "text_hidden" / self._text_tower_digest({"split": k}, skip=top)
        known: dict[str, int] = {}
        flat = offs = None
        if self.t.get("cache_text_features", True):
            try:
                names = json.loads((store / "texts.json").read_text(encoding="utf-8"))
                flat = np.load(store / "hidden.npy", mmap_mode="r", allow_pickle=False)
                offs = np.load(store / "offsets.npy", allow_pickle=False)
                if len(offs) != len(names) + 1 or int(offs[-1]) != flat.shape[0]:
                    raise ValueError("inconsistent store")
                known = {str(x): i for i, x in enumerate(names)}
            except FileNotFoundError:
                flat = offs = None
            except (OSError, ValueError, TypeError) as err:
                log.warning("ignoring unreadable text-state cache %s: %s", store, err)
                known, flat, offs = {}, None, None
        missing = [x for x in dict.fromkeys(self.texts) if x not in known]
        new_states: list[np.ndarray] = []
        if missing:
            m.text_tower.eval()
            bs = int(self.t["text_batch_size"])
            order = np.argsort([len(x) for x in missing], kind="stable")
            got: dict[int, np.ndarray] = {}
            for i in tqdm(range(0, len(order), bs), desc="Text states (locked blocks)", disable=not self.progress, unit="batch"):
                idx = order[i : i + bs]
                enc = m.text_tower.tokenize([missing[j] for j in idx], device=dev)
                hs = m.text_tower.hidden_states_at(enc["input_ids"], enc["attention_mask"], k).float().cpu().numpy()
                lens = enc["attention_mask"].sum(1).cpu().numpy()
                for r, j in enumerate(idx):
                    got[int(j)] = hs[r, : int(lens[r])]
            new_states = [got[j] for j in range(len(missing))]
        # assemble the in-memory table in self.texts order
        rows, lengths = [], []
        miss_pos = {x: i for i, x in enumerate(missing)}
        for x in self.texts:
            if x in known:
                a = np.asarray(flat[offs[known[x]] : offs[known[x] + 1]])
            else:
                a = new_states[miss_pos[x]]
            rows.append(a)
            lengths.append(a.shape[0])
        self.text_hidden = torch.from_numpy(np.concatenate(rows).astype(np.float32)).to(dev)
        self.text_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if missing and self.t.get("cache_text_features", True):
            all_names = list(known) + missing
            parts = ([np.asarray(flat)] if flat is not None else []) + new_states
            all_lens = (np.diff(offs).tolist() if offs is not None else []) + [a.shape[0] for a in new_states]
            _save_store(store, all_names, hidden=np.concatenate(parts).astype(np.float32),
                        offsets=np.concatenate([[0], np.cumsum(all_lens)]).astype(np.int64))
        log.info("text states at block %d: %d texts (%d computed), %d tokens", k, len(self.texts), len(missing), int(self.text_offsets[-1]))

    def _partial_text_features(self, uniq: np.ndarray, chunk: int = 64) -> torch.Tensor:
        """Features of texts ``uniq`` through the trainable top blocks, from the cached token states."""
        m, dev = self.model, self.device
        lens = self.text_offsets[uniq + 1] - self.text_offsets[uniq]
        order = np.argsort(lens, kind="stable")  # similar lengths per chunk: little padding
        out = [None] * len(uniq)
        for i in range(0, len(order), chunk):
            idx = order[i : i + chunk]
            width = int(lens[idx].max())
            hid = self.text_hidden.new_zeros((len(idx), width, self.text_hidden.shape[1]))
            mask = torch.zeros((len(idx), width), dtype=torch.long, device=dev)
            for r, j in enumerate(idx):
                a, b = self.text_offsets[uniq[j]], self.text_offsets[uniq[j] + 1]
                hid[r, : b - a] = self.text_hidden[a:b]
                mask[r, : b - a] = 1
            feats = m.text_tower.forward_from(hid, mask, self.text_start)
            for r, j in enumerate(idx):
                out[j] = feats[r]
        return torch.stack(out)

    @torch.no_grad()
    def _cache_locked_features(self) -> None:
        m, dev = self.model, self.device
        self.text_feats = None
        self.train_tx_feats = self.val_tx_feats = None
        if self.lock_text:
            m.text_tower.eval()
            use_cache = bool(self.t.get("cache_text_features", True))
            store_dir = self._text_cache_dir() if use_cache else None
            known, arr = self._load_text_store(store_dir) if store_dir is not None else ({}, None)
            missing = [x for x in dict.fromkeys(self.texts) if x not in known]
            new = self._compute_text_features(missing) if missing else None
            if arr is None and new is None:
                return
            width = (arr if arr is not None else new).shape[1]
            feats = np.empty((len(self.texts), width), dtype=np.float32)
            miss_pos = {x: i for i, x in enumerate(missing)}
            for i, x in enumerate(self.texts):
                feats[i] = arr[known[x]] if x in known else new[miss_pos[x]]
            self.text_feats = torch.from_numpy(feats).to(dev)
            log.info("text features: %d unique texts, %d from cache, %d computed", len(self.texts),
                     len(self.texts) - len(missing), len(missing))
            if store_dir is not None and missing:
                all_texts = list(known) + missing
                all_arr = np.concatenate([a for a in (arr, new) if a is not None])
                _save_store(store_dir, all_texts, features=all_arr)
        if self.lock_tx:
            m.transcriptome_tower.eval()
            self.train_tx_feats = self._tx_features(self.train_enc)
            self.val_tx_feats = self._tx_features(self.val_enc) if self.val_enc is not None else None

    def _text_cache_dir(self) -> Path:
        """Disk cache of locked text features (one store per text tower: config and weights), keyed per text."""
        from ..tools.embed import cache_dir

        return Path(cache_dir()) / "text_features" / self._text_tower_digest()

    def _text_tower_digest(self, extra: dict | None = None, skip: tuple[str, ...] = ()) -> str:
        """Hash of the text tower's config (plus ``extra``) and its weights, except those starting with ``skip``."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps({**self.model.text_tower.config(), **(extra or {})}, sort_keys=True).encode())
        for k, v in sorted(self.model.text_tower.state_dict().items()):
            if skip and k.startswith(skip):
                continue
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @staticmethod
    def _load_text_store(store_dir: Path) -> tuple[dict, np.ndarray | None]:
        """``({text: row}, features)`` of a text-feature store; empty when absent or unreadable."""
        try:
            texts = json.loads((store_dir / "texts.json").read_text(encoding="utf-8"))
            arr = np.load(store_dir / "features.npy", allow_pickle=False)
            if not isinstance(texts, list) or arr.ndim != 2 or arr.shape[0] != len(texts):
                raise ValueError(f"{len(texts)} texts for features of shape {arr.shape}")
            return {str(x): i for i, x in enumerate(texts)}, arr.astype(np.float32, copy=False)
        except FileNotFoundError:
            return {}, None
        except (OSError, ValueError, TypeError) as err:
            log.warning("ignoring unreadable text-feature cache %s: %s", store_dir, err)
            return {}, None

    @torch.no_grad()
    def _compute_text_features(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), text_hidden)`` float32 features of the (locked) text tower."""
        m, dev = self.model, self.device
        bs = int(self.t["text_batch_size"])
        feats = []
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        order = np.argsort([len(x) for x in texts], kind="stable")  # similar lengths per batch: less padding
        for i in tqdm(range(0, len(order), bs), desc="Text features (locked tower)", disable=not self.progress, unit="batch"):
            enc = m.text_tower.tokenize([texts[j] for j in order[i : i + bs]], device=dev)
            feats.append(m.text_tower(**enc).float().cpu().numpy())
        out = np.empty((len(order), feats[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(feats)
        log.info("text features of %d texts in %.1f s", len(texts), time.perf_counter() - t0)
        return out

    @torch.no_grad()
    def _tx_features(self, enc: _Encoded) -> torch.Tensor:
        bs = int(self.t["eval_batch_size"])
        out = []
        for i in range(0, len(enc.lengths), bs):
            idx = np.arange(i, min(i + bs, len(enc.lengths)))
            out.append(self.model.transcriptome_tower(*enc.batch(idx, self.device)).float())
        return torch.cat(out)

"""A CellWhisperer checkpoint written the way Lightning 2.1.4 writes it, and a tiny converted CellWhisperer model.

Shared by ``test_cellwhisperer_golden.py`` (conversion fidelity) and ``test_distill.py`` (a tiny teacher in the
real formats). See the golden test's docstring for what the checkpoint holds and why.
"""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

PROJ = 24
N_STEPS = 2
GF_VOCAB = 9800  # so that the tiny Geneformer has an embedding row for 9743, as gf-12L-30M (25,426 tokens) does

# The throwaway package: classes at CellWhisperer's module paths (written for this test from the published
# field names; none of CellWhisperer's code).
PACKAGE = {
    "cellwhisperer/__init__.py": "",
    "cellwhisperer/jointemb/__init__.py": "",
    "cellwhisperer/jointemb/geneformer_model.py": '''
from transformers import PretrainedConfig


class GeneformerConfig(PretrainedConfig):
    model_type = "geneformer"

    def __init__(self, emb_mode="cell", hidden_size=512, emb_layer=-1, forward_batch_size=-1, nproc=4,
                 summary_stat=None, **kwargs):
        super().__init__(**kwargs)
        self.emb_mode = emb_mode
        self.hidden_size = hidden_size
        self.emb_layer = emb_layer
        self.forward_batch_size = forward_batch_size
        self.nproc = nproc
        self.summary_stat = summary_stat
''',
    "cellwhisperer/jointemb/config.py": '''
from transformers import BertConfig, PretrainedConfig

from .geneformer_model import GeneformerConfig


class TranscriptomeTextDualEncoderConfig(PretrainedConfig):
    model_type = "transcriptome-text-dual-encoder"

    def __init__(self, projection_dim=1024, transcriptome_config=None, text_config=None, locking_mode="LU",
                 unlocked_fp16=False, **kwargs):
        super().__init__(**kwargs)
        self.transcriptome_config = GeneformerConfig(**(transcriptome_config or {}))
        self.text_config = BertConfig(**(text_config or {}))
        self.locking_mode = locking_mode
        self.unlocked_fp16 = unlocked_fp16
        self.projection_dim = int(projection_dim)
''',
    "cellwhisperer/jointemb/loss/__init__.py": "",
    "cellwhisperer/jointemb/loss/config.py": '''
from dataclasses import dataclass


@dataclass
class LossConfig:
    clip_lambda: float = 1.0
    clip_lite_lambda: float = 0.0
    clip_lite_type: str = "dot"
    clip_lite_prior_weight: float = 0.1
    clip_lite_transcriptome_prior: bool = False
    clip_lite_text_prior: bool = False
    sample_weighting: bool = True
''',
}


# --------------------------------------------------------------------------- the module tree
class MILinearBlock(torch.nn.Module):
    """CLIP-Lite's projection block as published: Linear(no bias) -> BatchNorm -> ReLU -> Linear, plus a linear
    shortcut, then LayerNorm; the embedding is its L2-normalised output."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.feature_nonlinear = torch.nn.Sequential(
            torch.nn.Linear(d_in, d_out, bias=False), torch.nn.BatchNorm1d(d_out), torch.nn.ReLU(), torch.nn.Linear(d_out, d_out)
        )
        self.feature_shortcut = torch.nn.Linear(d_in, d_out)
        self.feature_block_ln = torch.nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.feature_block_ln(self.feature_nonlinear(x) + self.feature_shortcut(x)), dim=-1)


class Discriminator(torch.nn.Module):
    def __init__(self, t_in: int, x_in: int, proj: int) -> None:
        super().__init__()
        self.img_block = MILinearBlock(t_in, proj)
        self.text_block = MILinearBlock(x_in, proj)
        self.temperature = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class DualEncoder(torch.nn.Module):
    def __init__(self, text_model, t_in: int, proj: int) -> None:
        super().__init__()
        self.text_model = text_model
        self.discriminator = Discriminator(t_in, int(text_model.config.hidden_size), proj)


class LightningLike(torch.nn.Module):
    """Stands for the LightningModule: its only child is ``model``, so keys start with ``model.``."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model


def _train(lit: LightningLike, tokenizer, gen: torch.Generator):
    """Two AdamW steps of a CLIP loss on random transcriptome features (the Geneformer tower is frozen and not
    part of the module, as in the released file), with a warm-up + cosine schedule."""
    from transformers import get_cosine_schedule_with_warmup

    disc = lit.model.discriminator
    with torch.no_grad():  # a spread of weights and running statistics that makes cells and texts differ
        for block, scale in ((disc.img_block, 0.3), (disc.text_block, 3.0)):  # the tiny BERT's pooler outputs are close
            for name, t in block.named_parameters():
                t.copy_(torch.randn(t.shape, generator=gen) * scale)
            bn = block.feature_nonlinear[1]
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.3)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
        disc.temperature.fill_(math.log(20.0))
    params = [p for p in lit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=20)
    lit.train()
    batch = ["T cells", "B cells", "monocytes", "NK cells", "platelets", "erythrocytes"]
    enc = tokenizer(batch, padding=True, return_tensors="pt")
    labels = torch.arange(len(batch))
    for _ in range(N_STEPS):  # the warm-up's first step has learning rate 0
        cells = torch.randn(len(batch), disc.img_block.feature_shortcut.in_features, generator=gen)
        t = disc.img_block(cells)
        x = disc.text_block(lit.model.text_model(**enc).pooler_output)
        logits = t @ x.T * disc.temperature.exp()
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    lit.eval()
    return opt, sched


def _write_package(root: Path) -> Path:
    for rel, text in PACKAGE.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


def _forget_package(root: Path) -> None:
    while str(root) in sys.path:
        sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == "cellwhisperer" or m.startswith("cellwhisperer.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def write_lightning_checkpoint(path: Path, text_dir: Path, pkg_root: Path, *, gf_hidden: int = 16,
                               extra: dict | None = None) -> LightningLike:
    """Train the module tree two steps and save a Lightning 2.1.4-layout checkpoint; return the module (eval)."""
    from transformers import AutoTokenizer, BertModel

    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    lit = LightningLike(DualEncoder(BertModel.from_pretrained(text_dir), gf_hidden, PROJ))
    opt, sched = _train(lit, AutoTokenizer.from_pretrained(text_dir), gen)
    monitor = "valfn_zshot_TabSap_cell_lvl/f1_macro"
    best = "/runs/jointemb/t9kkor63/checkpoints/epoch=3-step=1234.ckpt"
    ckpt = {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "2.1.4",
        "state_dict": lit.state_dict(),
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": 1234},
                "epoch_loop.batch_progress": {"total": {"ready": 1234, "completed": 1234, "started": 1234, "processed": 1234},
                                              "current": {"ready": 300, "completed": 300, "started": 300, "processed": 300},
                                              "is_last_batch": True},
                "epoch_loop.scheduler_progress": {"total": {"ready": 1234, "completed": 1234}, "current": {"ready": 300, "completed": 300}},
                "epoch_loop.automatic_optimization.optim_progress": {
                    "optimizer": {"step": {"total": {"ready": 1234, "completed": 1234}, "current": {"ready": 300, "completed": 300}},
                                  "zero_grad": {"total": {"ready": 1234, "completed": 1234, "started": 1234},
                                                "current": {"ready": 300, "completed": 300, "started": 300}}}},
                "epoch_loop.val_loop.state_dict": {},
                "epoch_progress": {"total": {"ready": 4, "completed": 3, "started": 4, "processed": 4},
                                   "current": {"ready": 4, "completed": 3, "started": 4, "processed": 4}},
            },
            "validate_loop": {"state_dict": {}, "batch_progress": {"total": {"ready": 0, "completed": 0}, "is_last_batch": False}},
            "test_loop": {"state_dict": {}},
            "predict_loop": {"state_dict": {}},
        },
        "callbacks": {
            f"ModelCheckpoint{{'monitor': '{monitor}', 'mode': 'max', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
            f"'train_time_interval': None}}": {
                "monitor": monitor, "best_model_score": torch.tensor(0.4375), "best_model_path": best,
                "current_score": torch.tensor(0.4375), "dirpath": Path("/runs/jointemb/t9kkor63/checkpoints"),
                "best_k_models": {best: torch.tensor(0.4375)}, "kth_best_model_path": best,
                "kth_value": torch.tensor(0.4375), "last_model_path": "",
            },
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 0, "stopped_epoch": 0, "best_score": torch.tensor(1.25), "patience": 5,
            },
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "MixedPrecision": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 17},
        "hparams_name": "kwargs",
        **(extra or {}),
    }
    sys.path.insert(0, str(pkg_root))
    try:
        dual = importlib.import_module("cellwhisperer.jointemb.config")
        loss = importlib.import_module("cellwhisperer.jointemb.loss.config")
        text_cfg = lit.model.text_model.config.to_dict()
        ckpt["hyper_parameters"] = {
            "model_config": dual.TranscriptomeTextDualEncoderConfig(
                projection_dim=PROJ, transcriptome_config={"hidden_size": gf_hidden, "emb_mode": "cell", "emb_layer": -1},
                text_config={k: v for k, v in text_cfg.items() if k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                        "num_attention_heads", "intermediate_size",
                                                                        "max_position_embeddings")},
                locking_mode="LU", unlocked_fp16=False, logit_scale_init_value=2.6592,
            ),
            "loss_config": loss.LossConfig(),
            "val_batch_size": 32, "gauss_noise_std": 0.0, "max_epochs": 16, "learning_rate": 1e-5,
            "lr_warmup": 0.03, "frozen_warmup": 0.03,
        }
        torch.save(ckpt, path)
    finally:
        _forget_package(pkg_root)
    return lit


def golden_files(root: Path, *, genes: list[tuple[str, str, float]] | None = None) -> dict:
    """The golden test's files under ``root``: a BioBERT-like text folder, a tiny Geneformer V1 folder (hidden 16,
    vocabulary 9,800 so that the placeholder 9743 has a row; ``genes`` extends its six-gene dictionary), and the
    Lightning-format checkpoint. Returns ``{"root", "text", "gf", "ckpt", "lit"}``."""
    from test_cellwhisperer import make_text_dir
    from test_geneformer import make_geneformer_dir

    root = Path(root)
    text = make_text_dir(root / "biobert-v1.1")
    gf = make_geneformer_dir(root / "gf-12L-30M", "V1", vocab_size=GF_VOCAB, seed=5, genes=genes)
    pkg = _write_package(root / "pkg")
    ckpt = root / "cellwhisperer_clip_v1.ckpt"
    lit = write_lightning_checkpoint(ckpt, text, pkg)
    return {"root": root, "text": text, "gf": gf, "ckpt": ckpt, "lit": lit}


def tiny_cellwhisperer(root: Path, *, genes: list[tuple[str, str, float]] | None = None) -> Path:
    """:func:`golden_files` converted with ``python -m engine.convert cellwhisperer``: a native model folder
    (``root/cellwhisperer``) in exactly the layout a real CellWhisperer conversion has."""
    from engine.models.convert import main

    files = golden_files(root, genes=genes)
    out = Path(root) / "cellwhisperer"
    rc = main(["cellwhisperer", str(files["ckpt"]), "--geneformer", str(files["gf"]), "--text-model", str(files["text"]),
               "--out", str(out), "--no-check"])
    assert rc == 0
    return out

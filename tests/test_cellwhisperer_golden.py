"""Golden test: a CellWhisperer checkpoint written the way Lightning writes it, converted, compared with a reference.

Nothing here is built by hand in the checkpoint's final layout. A real ``nn.Module`` tree with CellWhisperer's
attribute names (``model.text_model`` = a tiny random BERT, ``model.discriminator.{img_block,text_block}`` =
the published MILinearBlock, ``model.discriminator.temperature``) is trained for two steps with AdamW and a
warm-up/cosine schedule; its ``state_dict()`` (an ``OrderedDict`` with ``_metadata``), the optimizer and
scheduler states, ModelCheckpoint-like callback state and loop states go into a dict with Lightning 2.1.4's
top-level keys, and ``hyper_parameters`` hold instances of classes defined at CellWhisperer's module paths
(``cellwhisperer.jointemb.config.TranscriptomeTextDualEncoderConfig``, a ``PretrainedConfig`` holding a
``cellwhisperer.jointemb.geneformer_model.GeneformerConfig`` and a ``BertConfig``;
``cellwhisperer.jointemb.loss.config.LossConfig``, a dataclass). That throwaway package is written into the
test's folder and is importable only while ``torch.save`` runs. Lightning itself is not needed: its checkpoint
is this dict saved with ``torch.save``.

The reference logits are computed from the saved modules themselves (BERT pooler output, the blocks' forward
in eval mode, ``exp(temperature)``) and from an independent Geneformer forward over hand-derived token lists,
never through engine code. The cells include a gene measured in two columns and two cells without any
dictionary gene, which CellWhisperer's processor encodes as separate tokens and as the placeholder 9743.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import pickle
import pickletools
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_cellwhisperer import make_text_dir
from test_geneformer import GF_GENES, V1_TOKENS, make_geneformer_dir, reference_bert, reference_features

PROJ = 24
N_STEPS = 2
TEXTS = ["CD4 T cells", "a sample of B cells from a healthy donor", "monocyte", "cells without any expression"]
PLACEHOLDER = 9743  # CellWhisperer's token for a cell without any expressed dictionary gene
GF_VOCAB = 9800  # so that the tiny Geneformer has an embedding row for 9743, as gf-12L-30M (25,426 tokens) does

# Columns: the six dictionary genes, GAPDH's ID a second time, and a gene with no median (never tokenized).
VAR = [e for e, _, _ in GF_GENES] + ["ENSG00000111640", "ENSG00000000003"]
X = np.array(
    [
        [3, 1, 0, 3, 8, 1, 6, 0],
        [0, 4, 6, 0, 2, 0, 0, 0],
        [10, 0, 1, 1, 0, 0, 2, 0],
        [0, 0, 0, 0, 0, 0, 0, 5],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ],
    dtype=np.float32,
)
_t = V1_TOKENS
# counts / median, each column on its own, highest first (medians: CD3D 2, MS4A1 0.5, LYZ 4, GAPDH 1, ACTB 8,
# MALAT1 0.25):
#   cell 0: GAPDH 6, MALAT1 4, GAPDH 3, MS4A1 2, CD3D 1.5, ACTB 1;   cell 1: MS4A1 8, LYZ 1.5, ACTB 0.25
#   cell 2: CD3D 5, GAPDH 2, GAPDH 1, LYZ 0.25;                      cells 3, 4: no dictionary gene -> 9743
EXPECTED_TOKENS = [
    [_t["GAPDH"], _t["MALAT1"], _t["GAPDH"], _t["MS4A1"], _t["CD3D"], _t["ACTB"]],
    [_t["MS4A1"], _t["LYZ"], _t["ACTB"]],
    [_t["CD3D"], _t["GAPDH"], _t["GAPDH"], _t["LYZ"]],
    [PLACEHOLDER],
    [PLACEHOLDER],
]

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


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    text = make_text_dir(root / "biobert-v1.1")
    gf = make_geneformer_dir(root / "gf-12L-30M", "V1", vocab_size=GF_VOCAB, seed=5)
    pkg = _write_package(root / "pkg")
    ckpt = root / "cellwhisperer_clip_v1.ckpt"
    lit = write_lightning_checkpoint(ckpt, text, pkg)
    return {"root": root, "text": text, "gf": gf, "ckpt": ckpt, "lit": lit}


def reference_logits(lit: LightningLike, text_dir: Path, gf_dir: Path) -> torch.Tensor:
    """(n_cells, n_texts) logits from the saved modules and an independent Geneformer forward."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_dir)
    disc = lit.model.discriminator
    with torch.no_grad():
        text_features = lit.model.text_model(**tok(TEXTS, padding=True, return_tensors="pt")).pooler_output
        cell_features = reference_features(reference_bert(gf_dir), EXPECTED_TOKENS, specials=False)
        return disc.img_block(cell_features) @ disc.text_block(text_features).T * disc.temperature.exp()


# --------------------------------------------------------------------------- tests
def test_the_file_is_a_real_lightning_checkpoint(golden):
    """What the file holds: a BUILD of ``_metadata`` on an OrderedDict, classes at CellWhisperer's paths that
    ``weights_only`` refuses, and no importable ``cellwhisperer`` left behind."""
    assert importlib.util.find_spec("cellwhisperer") is None and "cellwhisperer" not in sys.modules
    zf = zipfile.ZipFile(golden["ckpt"])
    data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    names = {arg for name, arg in ops if name == "GLOBAL"}
    assert "collections OrderedDict" in names and any(name == "BUILD" for name, _ in ops)
    assert {"cellwhisperer.jointemb.config TranscriptomeTextDualEncoderConfig",
            "cellwhisperer.jointemb.geneformer_model GeneformerConfig",
            "cellwhisperer.jointemb.loss.config LossConfig",
            "transformers.models.bert.configuration_bert BertConfig"} <= names
    with pytest.raises(pickle.UnpicklingError):
        torch.load(golden["ckpt"], weights_only=True)
    sd = golden["lit"].state_dict()
    assert sd._metadata["model.discriminator.img_block.feature_nonlinear.1"] == {"version": 2}
    keys = set(sd)
    for block in ("img_block", "text_block"):
        p = f"model.discriminator.{block}."
        assert {p + k for k in ("feature_nonlinear.0.weight", "feature_nonlinear.1.weight", "feature_nonlinear.1.bias",
                                "feature_nonlinear.1.running_mean", "feature_nonlinear.1.running_var",
                                "feature_nonlinear.1.num_batches_tracked", "feature_nonlinear.3.weight",
                                "feature_nonlinear.3.bias", "feature_shortcut.weight", "feature_shortcut.bias",
                                "feature_block_ln.weight", "feature_block_ln.bias")} <= keys
        assert p + "feature_nonlinear.0.bias" not in keys
    assert "model.discriminator.temperature" in keys and sd["model.discriminator.temperature"].dim() == 0
    assert all(k.startswith(("model.text_model.", "model.discriminator.")) for k in keys)
    assert int(sd["model.discriminator.img_block.feature_nonlinear.1.num_batches_tracked"]) == N_STEPS


def test_restricted_load_matches_the_module(golden):
    from engine.safe_pickle import PickledObjectStub, load_checkpoint

    obj, method = load_checkpoint(golden["ckpt"])
    assert method == "restricted"
    ref = golden["lit"].state_dict()
    sd = obj["state_dict"]
    assert list(sd) == list(ref) and sd._metadata == ref._metadata
    assert all(torch.equal(sd[k], v) for k, v in ref.items())
    mc = obj["hyper_parameters"]["model_config"]
    assert isinstance(mc, PickledObjectStub) and mc.projection_dim == PROJ and mc.locking_mode == "LU"
    assert mc.transcriptome_config.emb_layer == -1 and mc.text_config.hidden_size == 32
    assert obj["hyper_parameters"]["loss_config"].clip_lambda == 1.0
    assert obj["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert obj["lr_schedulers"][0]["last_epoch"] == N_STEPS and obj["pytorch-lightning_version"] == "2.1.4"


def test_converted_logits_match_the_independent_reference(golden, tmp_path, capsys):
    import engine
    from engine.convert import main

    out = tmp_path / "cellwhisperer"
    rc = main(["cellwhisperer", str(golden["ckpt"]), "--geneformer", str(golden["gf"]), "--text-model", str(golden["text"]),
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "verified" in capsys.readouterr().out
    model = engine.load_model(out, device="cpu")
    assert model.tokenizer.tokenization_config() == {"duplicates": "separate", "empty_cell_token_id": PLACEHOLDER}
    enc = model.tokenizer.encode_matrix(X, VAR)
    assert [enc.tokens(i).tolist() for i in range(len(X))] == EXPECTED_TOKENS
    got = model.embed_encoding(enc) @ model.embed_texts(TEXTS, cache=False).T * float(model.logit_scale.detach().exp())
    ref = reference_logits(golden["lit"], golden["text"], golden["gf"]).numpy()
    assert np.ptp(ref, axis=1).min() > 1e-2 and np.ptp(ref, axis=0).min() > 1e-2  # cells and texts are told apart
    diff = float(np.abs(got - ref).max())
    print(f"golden CellWhisperer checkpoint: max |logit difference| vs the independent reference = {diff:.2e}")
    assert diff <= 1e-4
    src = model.metadata["source"]
    assert src["checkpoint"]["read_with"] == "restricted" and src["checkpoint"]["pytorch-lightning_version"] == "2.1.4"
    assert src["hyper_parameters"]["model_config"]["__class__"] == "cellwhisperer.jointemb.config.TranscriptomeTextDualEncoderConfig"
    assert src["hyper_parameters"]["model_config"]["projection_dim"] == PROJ


def test_text_weights_come_from_the_checkpoint(golden):
    """The training steps moved the text tower away from the folder's weights; the converted model uses the
    checkpoint's (a model with the folder's weights would not reproduce the reference)."""
    from transformers import AutoTokenizer, BertModel

    lit = golden["lit"]
    folder = BertModel.from_pretrained(golden["text"]).eval()
    enc = AutoTokenizer.from_pretrained(golden["text"])(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        trained = lit.model.discriminator.text_block(lit.model.text_model(**enc).pooler_output)
        untrained = lit.model.discriminator.text_block(folder(**enc).pooler_output)
    assert float((trained - untrained).abs().max() * lit.model.discriminator.temperature.detach().exp()) > 1e-2


def test_hostile_object_in_callback_state_is_refused(golden, tmp_path):
    import os

    from engine.cellwhisperer import load_cellwhisperer
    from engine.errors import UnsafeCheckpointError

    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    ckpt = tmp_path / "evil.ckpt"
    write_lightning_checkpoint(ckpt, golden["text"], golden["root"] / "pkg", extra={"callbacks": {"Evil": {"state": Evil()}}})
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|nt\.system"):
        load_cellwhisperer(ckpt, geneformer_dir=golden["gf"], text_model_dir=golden["text"], device="cpu")
    assert not target.exists()

"""CellWhisperer loader and conversion: a tiny Lightning-style checkpoint in the published layout.

The checkpoint is written by the test with ``torch.save``: real key names (``model.discriminator.*``,
``model.text_model.*``), and ``hyper_parameters`` holding instances of stand-in classes registered as
``cellwhisperer.jointemb.config.TranscriptomeTextDualEncoderConfig`` / ``cellwhisperer.jointemb.loss.LossConfig``
(plus a real ``transformers`` ``BertConfig`` inside). The fake modules are removed from ``sys.modules``
before loading, as users do not have ``cellwhisperer`` installed. The expected logits are computed
independently from the published architecture with ``torch.nn.functional``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.errors import CheckpointError, UnsafeCheckpointError
from test_geneformer import COUNTS, GF_GENES, V1_EXPECTED, make_geneformer_dir, reference_bert, reference_features

PROJ = 24
TEMPERATURE = math.log(20.0)
TEXTS = ["CD4 T cells", "a sample of B cells from a healthy donor", "monocyte"]
FAKE_MODULES = ["cellwhisperer", "cellwhisperer.jointemb", "cellwhisperer.jointemb.config", "cellwhisperer.jointemb.loss"]


class _Evil:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _fake_cellwhisperer_classes():
    """Stand-ins for CellWhisperer's config classes, registered under the published module paths."""
    mods = {name: types.ModuleType(name) for name in FAKE_MODULES}

    class TranscriptomeTextDualEncoderConfig:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class GeneformerConfig:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    @dataclasses.dataclass
    class LossConfig:
        clip_loss_weight: float = 1.0
        jsd_loss_weight: float = 0.0
        sample_weighting: bool = False

    for cls, mod in ((TranscriptomeTextDualEncoderConfig, "cellwhisperer.jointemb.config"),
                     (GeneformerConfig, "cellwhisperer.jointemb.config"), (LossConfig, "cellwhisperer.jointemb.loss")):
        cls.__module__ = mod
        cls.__qualname__ = cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    return mods, TranscriptomeTextDualEncoderConfig, GeneformerConfig, LossConfig


def _randomise_mi_block(block: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in block.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(123)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)


def make_cellwhisperer_ckpt(path: Path, text_dir: Path, *, hparams: str = "objects", extra_hparams: dict | None = None,
                            state_edit=None) -> dict:
    """Write a Lightning-style checkpoint; return the state dict (published key names)."""
    from transformers import BertConfig, BertModel

    from engine.models.heads import MILinearBlock

    gen = torch.Generator().manual_seed(7)
    img, txt = MILinearBlock(16, PROJ), MILinearBlock(32, PROJ)
    _randomise_mi_block(img, gen)
    _randomise_mi_block(txt, gen)
    bert = BertModel.from_pretrained(text_dir)
    state = OrderedDict()
    for k, v in img.state_dict().items():
        state[f"model.discriminator.img_block.{k}"] = v.clone()
    for k, v in txt.state_dict().items():
        state[f"model.discriminator.text_block.{k}"] = v.clone()
    state["model.discriminator.temperature"] = torch.tensor(TEMPERATURE)
    for k, v in bert.state_dict().items():  # "fine-tuned": differs from the folder's weights
        state[f"model.text_model.{k}"] = v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
    state["model.text_model.embeddings.position_ids"] = torch.arange(128)[None]  # stored by older transformers
    if state_edit is not None:
        state_edit(state)
    ckpt = {
        "epoch": 5,
        "global_step": 1234,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 5}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.25), "dirpath": "/x"}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                              "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.98), "weight_decay": 0.0, "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [1e-5], "last_epoch": 3}],
        "hparams_name": "kwargs",
    }
    mods, DualCfg, GfCfg, LossConfig = _fake_cellwhisperer_classes()
    sys.modules.update(mods)
    try:
        if hparams == "objects":
            text_cfg = BertConfig.from_pretrained(text_dir)
            ckpt["hyper_parameters"] = {
                "model_config": DualCfg(
                    projection_dim=PROJ, locking_mode="LU", unlocked_fp16=False, logit_scale_init_value=2.6592,
                    transcriptome_config=GfCfg(hidden_size=16, emb_mode="cell", emb_layer=-1), text_config=text_cfg,
                    torch_dtype=torch.bfloat16,
                ),
                "loss_config": LossConfig(),
                "val_batch_size": 64, "gauss_noise_std": 0.0, "max_epochs": 16, "learning_rate": 1e-5,
                "lr_warmup": 0.03, "frozen_warmup": 0.03, **(extra_hparams or {}),
            }
        else:
            ckpt["hyper_parameters"] = {"learning_rate": 1e-5, **(extra_hparams or {})}
        torch.save(ckpt, path)
    finally:
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)
    assert "cellwhisperer" not in sys.modules
    return state


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin overhead (and contention on shared CI machines)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- independent reference
def ref_mi_linear(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    """MILinearBlock written out: Linear(no bias) -> BatchNorm (running stats) -> ReLU -> Linear, + linear
    shortcut, LayerNorm, then L2 normalisation."""
    h = F.linear(x, sd[p + "feature_nonlinear.0.weight"])
    h = F.batch_norm(h, sd[p + "feature_nonlinear.1.running_mean"], sd[p + "feature_nonlinear.1.running_var"],
                     sd[p + "feature_nonlinear.1.weight"], sd[p + "feature_nonlinear.1.bias"], training=False, eps=1e-5)
    h = F.linear(F.relu(h), sd[p + "feature_nonlinear.3.weight"], sd[p + "feature_nonlinear.3.bias"])
    s = F.linear(x, sd[p + "feature_shortcut.weight"], sd[p + "feature_shortcut.bias"])
    y = F.layer_norm(h + s, (h.shape[-1],), sd[p + "feature_block_ln.weight"], sd[p + "feature_block_ln.bias"], eps=1e-5)
    return F.normalize(y, dim=-1)


def reference_logits(state: dict, gf_dir: Path, text_dir: Path) -> torch.Tensor:
    """(n_cells, n_texts) logits from the published architecture."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    bert = BertModel(BertConfig.from_pretrained(text_dir))
    bert.load_state_dict({k[len("model.text_model."):]: v for k, v in state.items() if k.startswith("model.text_model.")}, strict=False)
    bert.eval()
    tok = AutoTokenizer.from_pretrained(text_dir)
    with torch.no_grad():
        enc = tok(TEXTS, padding=True, return_tensors="pt")
        text_features = bert(**enc).pooler_output
        cell_features = reference_features(reference_bert(gf_dir), V1_EXPECTED, specials=False)
        t = ref_mi_linear(cell_features, state, "model.discriminator.img_block.")
        x = ref_mi_linear(text_features, state, "model.discriminator.text_block.")
        return t @ x.T * state["model.discriminator.temperature"].exp()


def model_logits(model) -> np.ndarray:
    enc = model.tokenizer.encode_matrix(COUNTS, [e for e, _, _ in GF_GENES])
    assert [enc.tokens(i).tolist() for i in range(3)] == V1_EXPECTED
    return model.embed_encoding(enc) @ model.embed_texts(TEXTS, cache=False).T * float(model.logit_scale.detach().exp())


def make_text_dir(path: Path) -> Path:
    """A tiny random BERT (with pooler) + a real uncased WordPiece tokenizer, as a BioBERT-like HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from engine.models.towers import default_text_model_path

    tok = AutoTokenizer.from_pretrained(default_text_model_path(), local_files_only=True)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(3)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cw_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cw")
    text = make_text_dir(root / "biobert-v1.1")
    gf = make_geneformer_dir(root / "gf-12L-30M-i2048", "V1")
    ckpt = root / "cellwhisperer_clip_v1.ckpt"
    state = make_cellwhisperer_ckpt(ckpt, text)
    return {"root": root, "gf": gf, "ckpt": ckpt, "state": state, "text": text}


@pytest.fixture(scope="module")
def cw_model(cw_files):
    from engine.models.cellwhisperer import load_cellwhisperer

    return load_cellwhisperer(cw_files["ckpt"], geneformer_dir=cw_files["gf"], text_model_dir=cw_files["text"], device="cpu")


# --------------------------------------------------------------------------- tests
def test_logits_match_published_architecture(cw_files, cw_model):
    model = cw_model
    assert not model.training and not model.transcriptome_projection.training  # BatchNorm running stats
    assert model.projection_dim == PROJ and model.text_tower.pooling == "pooler"
    assert model.transcriptome_head_config == {"type": "mi_linear"} and model.text_weights == "checkpoint"
    assert float(model.logit_scale.detach()) == pytest.approx(TEMPERATURE)
    ids = model.text_tower.tokenize(TEXTS)["input_ids"]
    assert len({tuple(r.tolist()) for r in ids}) == 3 and (ids == model.text_tower.tokenizer.unk_token_id).sum() == 0
    ref = reference_logits(cw_files["state"], cw_files["gf"], cw_files["text"]).numpy()
    assert np.ptp(ref, axis=1).min() > 1e-3  # texts and cells are told apart
    np.testing.assert_allclose(model_logits(model), ref, atol=1e-5, rtol=1e-5)
    src = model.metadata["source"]
    assert src["kind"] == "cellwhisperer" and src["checkpoint"]["read_with"] == "restricted"
    assert src["checkpoint"]["epoch"] == 5 and src["projection"]["dim"] == PROJ
    hp = src["hyper_parameters"]
    assert hp["model_config"]["__class__"] == "cellwhisperer.jointemb.config.TranscriptomeTextDualEncoderConfig"
    assert hp["model_config"]["locking_mode"] == "LU" and hp["loss_config"]["clip_loss_weight"] == 1.0
    json.dumps(model.metadata)  # JSON-serialisable for config.json
    assert "cellwhisperer" not in sys.modules


def test_convert_then_load_model_gives_identical_logits(cw_files, cw_model, tmp_path, monkeypatch, capsys):
    import pickle

    import engine
    from engine.models.convert import main
    from engine.models.geneformer import GeneformerTower

    out = tmp_path / "native"
    rc = main(["cellwhisperer", str(cw_files["ckpt"]), "--geneformer", str(cw_files["gf"]),
               "--text-model", str(cw_files["text"]), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "verified" in printed
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "genes.tsv", "text_model/config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pkl", ".ckpt", ".pt", ".pth"))]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["transcriptome_tower"]["type"] == "geneformer" and cfg["metadata"]["source"]["kind"] == "cellwhisperer"

    def no_unpickling(*a, **k):
        raise AssertionError("the native format must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    back = engine.load_model(out, device="cpu")
    monkeypatch.undo()
    assert isinstance(back.transcriptome_tower, GeneformerTower) and back.text_weights == "checkpoint"
    np.testing.assert_allclose(model_logits(back), model_logits(cw_model), atol=1e-6, rtol=0)
    # existing output is protected
    assert main(["cellwhisperer", str(cw_files["ckpt"]), "--geneformer", str(cw_files["gf"]),
                 "--text-model", str(cw_files["text"]), "--out", str(out), "--no-check"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_cli_usage_errors(tmp_path, capsys):
    from engine.models.convert import main

    with pytest.raises(SystemExit) as exc:
        main(["cellwhisperer", str(tmp_path / "missing.ckpt"), "--geneformer", str(tmp_path),
              "--text-model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["cellwhisperer", str(tmp_path / "x.ckpt")])  # --geneformer etc. missing
    assert exc.value.code == 2 and "required" in capsys.readouterr().err


def test_convert_geneformer_nice_to_have(cw_files, tmp_path, capsys):
    import engine
    from engine.models.convert import main

    out = tmp_path / "gf_native"
    assert main(["geneformer", str(cw_files["gf"]), "--text-model", str(cw_files["text"]), "--out", str(out),
                 "--projection-dim", "8", "--head", "linear"]) == 0
    assert "untrained" in capsys.readouterr().out
    back = engine.load_model(out, device="cpu")
    assert back.projection_dim == 8 and back.transcriptome_tower.tower_type == "geneformer"


def test_plain_hyper_parameters_load_with_weights_only(cw_files, tmp_path):
    from engine.models.cellwhisperer import load_cellwhisperer

    ckpt = tmp_path / "plain.ckpt"
    make_cellwhisperer_ckpt(ckpt, cw_files["text"], hparams="plain")
    model = load_cellwhisperer(ckpt, geneformer_dir=cw_files["gf"], text_model_dir=cw_files["text"], device="cpu")
    assert model.metadata["source"]["checkpoint"]["read_with"] == "weights_only"


def test_missing_and_unexpected_keys_are_listed(cw_files, tmp_path):
    from engine.models.cellwhisperer import load_cellwhisperer

    kw = dict(geneformer_dir=cw_files["gf"], text_model_dir=cw_files["text"], device="cpu")
    miss = tmp_path / "missing.ckpt"
    make_cellwhisperer_ckpt(miss, cw_files["text"], state_edit=lambda s: s.pop("model.discriminator.text_block.feature_nonlinear.1.running_var"))
    with pytest.raises(CheckpointError, match=r"model\.discriminator\.text_block\.feature_nonlinear\.1\.running_var"):
        load_cellwhisperer(miss, **kw)
    extra = tmp_path / "extra.ckpt"
    make_cellwhisperer_ckpt(extra, cw_files["text"], state_edit=lambda s: s.__setitem__("model.discriminator.text_block.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model\.discriminator\.text_block\.extra\.weight"):
        load_cellwhisperer(extra, **kw)
    foreign = tmp_path / "foreign.ckpt"
    make_cellwhisperer_ckpt(foreign, cw_files["text"], state_edit=lambda s: s.__setitem__("model.some_other_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model\.some_other_head\.weight"):
        load_cellwhisperer(foreign, **kw)


@pytest.mark.parametrize("where", ["hyper_parameters", "inside_config_object"])
def test_malicious_checkpoint_is_refused_and_nothing_runs(cw_files, tmp_path, where):
    from engine.models.cellwhisperer import load_cellwhisperer

    target = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    if where == "hyper_parameters":
        make_cellwhisperer_ckpt(ckpt, cw_files["text"], extra_hparams={"evil": _Evil(target)})
    else:
        mods, DualCfg, _, _ = _fake_cellwhisperer_classes()
        sys.modules.update(mods)
        try:
            obj = {"state_dict": {"model.discriminator.temperature": torch.tensor(1.0)},
                   "hyper_parameters": {"model_config": DualCfg(projection_dim=PROJ, payload=[1, {"x": _Evil(target)}])}}
            torch.save(obj, ckpt)
        finally:
            for name in FAKE_MODULES:
                sys.modules.pop(name, None)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|nt\.system"):
        load_cellwhisperer(ckpt, geneformer_dir=cw_files["gf"], text_model_dir=cw_files["text"], device="cpu")
    assert not target.exists()

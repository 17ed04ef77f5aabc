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
import pickle
import pickletools
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cw_lightning import N_STEPS, PROJ, LightningLike, golden_files, write_lightning_checkpoint
from test_geneformer import GF_GENES, V1_TOKENS, reference_bert, reference_features

TEXTS = ["CD4 T cells", "a sample of B cells from a healthy donor", "monocyte", "cells without any expression"]
PLACEHOLDER = 9743  # CellWhisperer's token for a cell without any expressed dictionary gene

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



@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return golden_files(tmp_path_factory.mktemp("golden"))


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
    from engine.models.safe_pickle import PickledObjectStub, load_checkpoint

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
    from engine.models.convert import main

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

    from engine.models.cellwhisperer import load_cellwhisperer
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

"""CLIP training on a tiny synthetic paired set (engine.training.train)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.errors import CheckpointError, ConfigError
from engine.training.pairs import PairedData, write_tiny_archs4

from conftest import GENES

MARKERS = {
    0: ["MS4A1", "CD79A", "CD79B", "CD19"],
    1: ["CD3D", "CD3E", "CD2", "IL7R"],
    2: ["LYZ", "CD14", "S100A8", "S100A9"],
}
NAMES = {0: ["B cell", "B lymphocyte"], 1: ["T cell", "T lymphocyte"], 2: ["monocyte", "classical monocyte"]}
CONTEXTS = ["from blood", "from a healthy donor", "in the spleen", "from peripheral blood", "sample", "in lymph node"]


def synthetic_pairs(n: int = 300, seed: int = 0) -> PairedData:
    """3 "cell types" with distinct marker genes; texts = cell type phrase + context (24 unique texts)."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.0, 2.0, size=len(GENES))
    kinds = np.arange(n) % 3
    X = np.empty((n, len(GENES)), dtype=np.float32)
    texts = []
    for i, k in enumerate(kinds):
        mu = base.copy()
        mu[np.isin(GENES, MARKERS[k])] *= 20
        X[i] = rng.poisson(mu)
        texts.append(f"{NAMES[k][rng.integers(2)]} {CONTEXTS[rng.integers(len(CONTEXTS))]}")
    return PairedData(X=sp.csr_matrix(X), var=pd.DataFrame(index=GENES), texts=texts, name="synthetic")


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    from engine.models.tokenizer import RankTokenizer

    path = tmp_path_factory.mktemp("vocab") / "genes.tsv"
    RankTokenizer(GENES, gene_medians=np.linspace(0.5, 3.0, len(GENES)), symbols=GENES).save(path)
    return path


@pytest.fixture(scope="module")
def text_dir(tiny_text_dir, tmp_path_factory):
    """conftest's tiny BERT, with a working WordPiece tokenizer.

    With transformers 5, ``BertTokenizerFast(vocab_file=...)`` in conftest builds a 5-token vocabulary that maps
    every word to [UNK], so all texts of one length look identical; in that case the same tiny BERT is
    rebuilt with all-MiniLM-L6-v2's tokenizer and a matching 30,522-row embedding.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertModel

    from engine.models.towers import default_text_model_path

    if AutoTokenizer.from_pretrained(str(tiny_text_dir)).vocab_size > 1000:
        return tiny_text_dir
    path = tmp_path_factory.mktemp("tiny_bert_fixed")
    tok = AutoTokenizer.from_pretrained(str(default_text_model_path()))
    cfg = AutoConfig.from_pretrained(str(tiny_text_dir))
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_config(vocab_file, text_dir, out, **train):
    t = {
        "epochs": 4, "batch_size": 32, "lr": 5e-3, "weight_decay": 0.0, "warmup_steps": 2, "val_fraction": 0.25,
        "seed": 0, "select_metric": "mean_R@1", "lock_text": True, "progress": False, "num_threads": 1,
    }
    t.update(train)
    return {
        "model": {
            "name": "tiny-trained",
            "vocabulary": str(vocab_file),
            "tower": {"type": "sparse_rank", "hidden_size": 16, "n_layers": 1, "dropout": 0.1, "token_dropout": 0.1, "max_length": 32},
            "text_model": str(text_dir),
            "text_pooling": "mean",
            "text_max_length": 32,
            "projection_dim": 8,
            "heads": {"transcriptome": {"type": "mlp"}, "text": {"type": "linear"}},
        },
        "data": [{"type": "python", "callable": "tests.test_train:synthetic_pairs", "kwargs": {"n": 300}}],
        "train": t,
        "out": str(out),
    }


@pytest.mark.parametrize("lock_text", [True, False])
def test_training_learns_and_writes_checkpoint(tmp_path, vocab_file, text_dir, lock_text):
    from engine.models.checkpoint import load_model
    from engine.training.train import train

    cfg = make_config(vocab_file, text_dir, tmp_path / "run", lock_text=lock_text, epochs=5, lr=1e-2 if lock_text else 3e-3)
    out = train(cfg, device="cpu")
    assert out == tmp_path / "run"
    log = json.loads((out / "train_log.json").read_text())
    assert log["status"] == "finished"
    ep = log["epochs"]
    assert [e["epoch"] for e in ep] == [0, 1, 2, 3, 4, 5]
    assert ep[-1]["train_loss"] < ep[1]["train_loss"]
    assert ep[-1]["val"]["loss"] < ep[0]["val"]["loss"]
    best = max(e["val"]["mean_R@1"] for e in ep[1:])
    assert best > ep[0]["val"]["mean_R@1"]
    assert ep[-1]["val"]["R@5"] >= ep[0]["val"]["R@5"]
    assert log["best_epoch"] in range(1, 6)
    assert log["best_value"] == pytest.approx(best)
    # native checkpoint with training metadata, loadable
    model = load_model(out, device="cpu")
    meta = model.metadata["training"]
    assert meta["best_epoch"] == log["best_epoch"] and meta["finished"] is True
    assert meta["n_pairs_train"] + meta["n_pairs_val"] == 300
    assert meta["data_sources"][0]["name"] == "synthetic"
    assert model.metadata["train_config"]["train"]["lock_text"] is lock_text
    assert (out / "text_model").is_dir() != lock_text  # a fine-tuned text tower is stored in full
    # the saved model separates the three kinds of cells in the shared space
    data = synthetic_pairs(60, seed=5)
    emb = model.embed_encoding(model.tokenizer.encode_matrix(data.X, data.var))
    texts = model.embed_texts(["B cell from blood", "T cell from blood", "monocyte from blood"])
    acc = ((emb @ texts.T).argmax(1) == np.arange(60) % 3).mean()
    assert acc > 0.6


def test_resume_reproduces_uninterrupted_run(tmp_path, vocab_file, text_dir):
    from safetensors.torch import load_file

    from engine.training.train import train

    full = train(make_config(vocab_file, text_dir, tmp_path / "full", epochs=2), device="cpu")
    cfg = make_config(vocab_file, text_dir, tmp_path / "parts", epochs=2)
    part = train(cfg, device="cpu", max_steps=9)  # stops in the middle of epoch 2 (7 steps per epoch)
    log = json.loads((part / "train_log.json").read_text())
    assert log["status"] == "stopped" and log["epochs"][-1]["partial"] is True
    cached = list((tmp_path / "cache" / "text_features").glob("*/features.npy"))  # locked text features cached on disk
    assert len(cached) == 1
    resumed = train(cfg, device="cpu", resume=True)
    a = load_file(str(full / "last" / "model.safetensors"))
    b = load_file(str(resumed / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert not any(k.startswith("text_tower.") for k in a)  # locked text tower is not copied
    for k in a:
        assert np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6), k
    la = json.loads((full / "train_log.json").read_text())["epochs"]
    lb = json.loads((resumed / "train_log.json").read_text())["epochs"]
    assert lb[-1]["epoch"] == 2 and not lb[-1]["partial"]
    assert lb[-1]["val"]["R@1"] == pytest.approx(la[-1]["val"]["R@1"])


def test_cli_locked_transcriptome_jsd_archs4_and_vocab_from_data(tmp_path, text_dir):
    from engine.models.checkpoint import load_model
    from engine.training.train import main

    write_tiny_archs4(tmp_path / "tiny_archs4.h5", n_samples=60)
    cfg = {
        "model": {
            "vocabulary": "data",
            "tower": {"type": "sparse_rank", "hidden_size": 16, "n_layers": 1, "max_length": 16},
            "text_model": str(text_dir),
            "projection_dim": 8,
            "heads": {"type": "mi_linear"},
        },
        "data": [{"type": "archs4", "path": "tiny_archs4.h5"}],  # relative to the config's folder
        "init": {"callable": "tests.test_train:_init_hook", "kwargs": {"value": 2.0}},
        "train": {
            "epochs": 2, "batch_size": 16, "lock_transcriptome": True, "lock_text": True, "clip_weight": 1.0,
            "jsd_weight": 0.5, "soft_targets": "text", "val_fraction": 0.2, "select_metric": "val_loss", "progress": False,
            "keep_last": False,
        },
    }
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    rc = main(["--config", str(cfg_file), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert rc == 0
    model = load_model(tmp_path / "out", device="cpu")
    assert model.tokenizer.gene_ids[0] == "ENSG90000000000"
    assert float(model.logit_scale.detach().exp()) == pytest.approx(math.exp(2.0), rel=0.2)  # init hook ran
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    assert "train_jsd" in log["epochs"][1] and log["select_metric"] == "val_loss"
    assert log["data_sources"][0]["type"] == "archs4"
    assert not (tmp_path / "out" / "last").exists()  # keep_last: false


def _init_hook(model, data, value: float = 1.0):
    import torch

    assert isinstance(data, PairedData)
    with torch.no_grad():
        model.logit_scale.fill_(value)


def test_config_errors(tmp_path, vocab_file, text_dir):
    from engine.training.train import load_config, train

    base = make_config(vocab_file, text_dir, tmp_path / "x")
    with pytest.raises(ConfigError, match="Unknown keys"):
        load_config({**base, "train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="no training data"):
        load_config({**base, "data": []})
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError):
        load_config({**base, "train": {"clip_weight": 0, "jsd_weight": 0}})
    with pytest.raises(CheckpointError, match="Nothing to resume"):
        train(make_config(vocab_file, text_dir, tmp_path / "new", epochs=1), device="cpu", resume=True)
    bad = make_config(vocab_file, text_dir, tmp_path / "bad", epochs=1, select_metric="R@99")
    with pytest.raises(ConfigError, match="select_metric"):
        train(bad, device="cpu")


def test_yaml_config(tmp_path, vocab_file, text_dir):
    yaml = pytest.importorskip("yaml")
    from engine.training.train import load_config

    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(make_config(vocab_file, text_dir, tmp_path / "y")))
    cfg = load_config(f)
    assert cfg["train"]["batch_size"] == 32 and cfg["train"]["clip_weight"] == 1.0
    assert cfg["_base_dir"] == str(tmp_path.resolve())


def test_init_seed_shares_the_start_and_soup_averages_weights(tmp_path, vocab_file, text_dir):
    """Runs with one init_seed start from the same weights; soup() writes their weight mean (model soups)."""
    from safetensors.torch import load_file

    from engine.models.checkpoint import load_model
    import torch

    from engine.training.train import _Trainer, load_config, main, soup, train

    a = train(make_config(vocab_file, text_dir, tmp_path / "a", epochs=1, seed=0, init_seed=7), device="cpu")
    b = train(make_config(vocab_file, text_dir, tmp_path / "b", epochs=1, seed=1, init_seed=7), device="cpu")
    def start(seed, init_seed):
        cfg = load_config(make_config(vocab_file, text_dir, tmp_path / f"start{seed}", seed=seed, init_seed=init_seed))
        tr = _Trainer(cfg, device="cpu", out=tmp_path / f"start{seed}", resume=False, max_steps=None, progress=False)
        tr.setup()
        return {k: v.clone() for k, v in tr.model.state_dict().items()}

    w0, w1, w2 = start(0, 7), start(3, 7), start(3, None)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # same start, other data seed
    assert not all(torch.equal(w0[k], w2[k]) for k in w0)  # init_seed None: the start follows seed
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert any(not np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)  # different runs
    out = soup([a, b], tmp_path / "soup")
    ws = load_file(str(out / "model.safetensors"))
    assert set(ws) == set(wa)
    for k in wa:
        if wa[k].is_floating_point():
            np.testing.assert_allclose(ws[k].numpy(), (wa[k].double().numpy() + wb[k].double().numpy()) / 2, rtol=1e-5, atol=1e-6)
    model = load_model(out, device="cpu")
    assert model.metadata["soup"]["weights"] == [0.5, 0.5]
    # weighted soup through the CLI; wrong inputs are typed errors
    assert main(["--soup", str(a), str(b), "--out", str(tmp_path / "cli")]) == 0
    with pytest.raises(ConfigError, match="at least two"):
        soup([a], tmp_path / "x")
    with pytest.raises(ConfigError, match="weights"):
        soup([a, b], tmp_path / "x", weights=[1.0])
    cfg = make_config(vocab_file, text_dir, tmp_path / "other", epochs=1)
    cfg["model"]["tower"]["hidden_size"] = 8
    other = train(cfg, device="cpu")
    with pytest.raises(ConfigError, match="architecture"):
        soup([a, other], tmp_path / "x")


def test_soup_config_trains_members_from_one_start_and_averages(tmp_path, vocab_file, text_dir):
    from engine.models.checkpoint import load_model
    from engine.training.train import load_config, train

    cfg = make_config(vocab_file, text_dir, tmp_path / "souped", epochs=1)
    cfg["soup"] = {"seeds": [0, 1], "members": str(tmp_path / "members")}
    out = train(cfg, device="cpu")
    log = json.loads((out / "train_log.json").read_text())
    assert log["soup"]["seeds"] == [0, 1] and len(log["members"]) == 2
    m0 = load_model(tmp_path / "members" / "seed0", device="cpu")
    m1 = load_model(tmp_path / "members" / "seed1", device="cpu")
    assert m1.metadata["train_config"]["train"]["init_seed"] == 0 and m1.metadata["train_config"]["train"]["seed"] == 1
    soup_model = load_model(out, device="cpu")
    k = next(k for k, v in soup_model.state_dict().items() if v.is_floating_point() and "text" not in k)
    expect = (m0.state_dict()[k].double() + m1.state_dict()[k].double()) / 2
    assert np.allclose(soup_model.state_dict()[k].double().numpy(), expect.numpy(), atol=1e-6)
    with pytest.raises(ConfigError, match="soup"):
        load_config({**cfg, "soup": {"seeds": [0]}})


def test_text_tower_split_forward_equals_full_forward(text_dir):
    """Cached lower blocks + trainable top blocks compute exactly the tower's features."""
    import torch

    from engine.models.towers import TextTower

    tower = TextTower(text_dir, pooling="mean", max_length=32).eval()
    enc = tower.tokenize(["B cell from blood", "a much longer text about classical monocytes in the spleen", "T"])
    with torch.no_grad():
        full = tower(**enc)
        for k in range(len(tower.encoder_layers()) + 1):
            part = tower.forward_from(tower.hidden_states_at(enc["input_ids"], enc["attention_mask"], k), enc["attention_mask"], k)
            assert torch.allclose(part, full, atol=1e-5), k


def test_text_finetune_phase_trains_top_block_stores_it_and_resumes(tmp_path, vocab_file, text_dir, monkeypatch):
    from safetensors.torch import load_file

    from engine.models.checkpoint import load_model
    from engine.models.towers import TextTower
    from engine.training.train import train

    ft = {"epochs": 2, "layers": 1, "lr": 5e-3, "text_lr": 5e-3, "warmup_steps": 1}
    cfg = make_config(vocab_file, text_dir, tmp_path / "full", epochs=2, text_finetune=ft, select_metric="R@5")
    out = train(cfg, device="cpu")
    log = json.loads((out / "train_log.json").read_text())
    assert log["status"] == "finished"
    assert [e.get("phase") for e in log["epochs"][1:]] == ["main", "main", "text", "text"]
    model = load_model(out, device="cpu")
    n_blocks = len(model.text_tower.encoder_layers())
    top = f"encoder.layer.{n_blocks - 1}."
    assert model.text_finetuned == [top]
    stored = load_file(str(out / "model.safetensors"))
    text_keys = [k for k in stored if k.startswith("text_tower.")]
    assert text_keys and all(k.startswith(f"text_tower.model.{top}") for k in text_keys)  # only the tuned block
    # the tuned block moved away from the package weights, the locked ones did not
    source = TextTower(text_dir, pooling="mean", max_length=32).state_dict()
    tuned = model.text_tower.state_dict()
    moved = [k for k in tuned if not torch_equal(tuned[k], source[k])]
    assert moved and all(k.startswith(f"model.{top}") for k in moved)
    assert model.metadata["training"]["text_finetuned"] == [top]
    assert (tmp_path / "cache" / "text_hidden").is_dir()  # lower-block token states cached on disk
    # stop in the middle of the text phase, then resume: same weights as the uninterrupted run
    cfg2 = make_config(vocab_file, text_dir, tmp_path / "parts", epochs=2, text_finetune=ft, select_metric="R@5")
    part = train(cfg2, device="cpu", max_steps=18)  # 7 steps per epoch: stops inside epoch 3 (the text phase)
    assert json.loads((part / "train_log.json").read_text())["status"] == "stopped"
    resumed = train(cfg2, device="cpu", resume=True)
    a = load_file(str(out / "last" / "model.safetensors"))
    b = load_file(str(resumed / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("text_tower.") for k in a)
    for k in a:
        # attention key biases get no true gradient (softmax ignores a shift), only float noise that Adam
        # normalises into small steps; they differ in noise, everything else matches
        tol = 1e-4 if k.endswith("attention.self.key.bias") else 1e-5
        assert np.allclose(a[k].numpy(), b[k].numpy(), atol=tol), k


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_init_from_continues_a_trained_model_and_locked_control(tmp_path, vocab_file, text_dir):
    from safetensors.torch import load_file

    from engine.models.checkpoint import load_model
    from engine.training.train import train

    base = train(make_config(vocab_file, text_dir, tmp_path / "base", epochs=2, select_metric="R@5"), device="cpu")
    base_model = load_model(base, device="cpu")
    ctrl = {"epochs": 1, "layers": 0, "lr": 1e-3, "warmup_steps": 1}

    def cont(name, **train_kw):
        cfg = make_config(vocab_file, text_dir, tmp_path / name, epochs=0, text_finetune=ctrl, select_metric="R@5", **train_kw)
        cfg["model"]["init_from"] = str(base)
        cfg["init"] = {"callable": "tests.test_train:_spoil_init"}  # must be skipped: the start keeps its weights
        return train(cfg, device="cpu")

    out = cont("ctrl", select_start=False)
    log = json.loads((out / "train_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [0, 1] and log["best_epoch"] == 1
    assert not any(k.startswith("text_tower.") for k in load_file(str(out / "model.safetensors")))  # control: locked
    model = load_model(out, device="cpu")
    assert model.metadata["training"]["init_from"] == str(base)
    # epoch 0 is the trained start itself (not the spoiling init hook): its validation figures are good
    assert log["epochs"][0]["val"]["R@5"] > 0.5
    moved = [k for k, v in model.state_dict().items() if not torch_equal(v, base_model.state_dict()[k])]
    assert moved and not any(k.startswith("text_tower.") for k in moved)
    # with select_start (the default) the start competes in checkpoint selection
    log2 = json.loads((cont("ctrl2") / "train_log.json").read_text())
    assert log2["best_epoch"] in (0, 1) and log2["best_value"] == max(e["val"]["R@5"] for e in log2["epochs"])


def _spoil_init(model, data=None):
    import torch

    with torch.no_grad():
        for p in model.transcriptome_tower.parameters():
            p.zero_()


def test_text_finetune_config_errors(tmp_path, vocab_file, text_dir):
    from engine.training.train import load_config

    with pytest.raises(ConfigError, match="second phase"):
        load_config(make_config(vocab_file, text_dir, tmp_path, lock_text=False, text_finetune={"epochs": 1}))
    with pytest.raises(ConfigError, match="Bad train.text_finetune"):
        load_config(make_config(vocab_file, text_dir, tmp_path, text_finetune={"epoch": 1}))
    with pytest.raises(ConfigError, match="epochs >= 1"):
        load_config(make_config(vocab_file, text_dir, tmp_path, text_finetune={"epochs": 0}))
    with pytest.raises(ConfigError, match="positive integer"):
        load_config(make_config(vocab_file, text_dir, tmp_path, epochs=0))
    cfg = load_config(make_config(vocab_file, text_dir, tmp_path, epochs=0, text_finetune={"layers": 2}))
    assert cfg["train"]["text_finetune"] == {"epochs": 1, "layers": 2, "lr": 1e-4, "text_lr": 2e-5, "warmup_steps": 0.1}


def test_training_on_the_corpus_source(tmp_path, text_dir):
    """The real-data corpus is a python data source of engine.training.train (tiny corpus, tiny model)."""
    import sys

    from engine.models.checkpoint import load_model
    from engine.training.corpus import build_corpus, fetch
    from engine.models.tokenizer import RankTokenizer
    from engine.training.train import train

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_corpus import make_tiny_corpus_files

    man = make_tiny_corpus_files(tmp_path)
    fetch(tmp_path / "f", manifest=man, progress=False)
    corpus = build_corpus(tmp_path / "f", manifest=man, out=tmp_path / "corpus.h5ad", progress=False)
    vocab = tmp_path / "genes.tsv"
    RankTokenizer(list(corpus.var_names), gene_medians=np.ones(corpus.n_vars), symbols=list(corpus.var["gene_symbol"])).save(vocab)
    cfg = make_config(vocab, text_dir, tmp_path / "run", epochs=2, lr=1e-2)
    cfg["data"] = [{"type": "python", "callable": "engine.training.corpus:build_pairs",
                    "kwargs": {"path": str(tmp_path / "corpus.h5ad"), "vocabulary": str(vocab), "n_per_label": 30,
                               "panel_fraction": 0.0, "seed": 0}}]
    out = train(cfg, device="cpu")
    log = json.loads((out / "train_log.json").read_text())
    assert log["status"] == "finished"
    model = load_model(out, device="cpu")
    assert model.metadata["training"]["data_sources"][0]["name"] == "corpus"
    assert model.metadata["training"]["n_pairs_train"] + model.metadata["training"]["n_pairs_val"] == 150

"""Geneformer tower: tiny random models in the real folder formats, written by the tests themselves.

The reference computations below are written independently of ``engine.models.geneformer`` from the published
behaviour (Geneformer ``TranscriptomeTokenizer`` / ``EmbExtractor``; CellWhisperer seed 000 §3.2).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from engine.errors import CheckpointError, ConfigError, UnsafeCheckpointError

# (Ensembl ID, symbol, median) of the tiny vocabulary, in token order
GF_GENES = [
    ("ENSG00000167286", "CD3D", 2.0),
    ("ENSG00000156738", "MS4A1", 0.5),
    ("ENSG00000090382", "LYZ", 4.0),
    ("ENSG00000111640", "GAPDH", 1.0),
    ("ENSG00000075624", "ACTB", 8.0),
    ("ENSG00000251562", "MALAT1", 0.25),
]
EXTRA_GENE = "ENSG00000000003"  # in the token dictionary but without a median: never tokenized

# 3 cells x 6 genes of raw counts, columns in GF_GENES order
COUNTS = np.array(
    [
        [3, 1, 0, 5, 8, 1],
        [0, 4, 6, 0, 2, 0],
        [10, 0, 1, 3, 0, 0],
    ],
    dtype=np.float32,
)
# counts / total x 1e4 / median, ranked (the 1e4/total factor is common to a cell's genes):
#   cell 0: CD3D 3/2=1.5, MS4A1 1/0.5=2, GAPDH 5/1=5, ACTB 8/8=1, MALAT1 1/0.25=4 -> GAPDH MALAT1 MS4A1 CD3D ACTB
#   cell 1: MS4A1 4/0.5=8, LYZ 6/4=1.5, ACTB 2/8=0.25                              -> MS4A1 LYZ ACTB
#   cell 2: CD3D 10/2=5, LYZ 1/4=0.25, GAPDH 3/1=3                                 -> CD3D GAPDH LYZ
RANKED = [["GAPDH", "MALAT1", "MS4A1", "CD3D", "ACTB"], ["MS4A1", "LYZ", "ACTB"], ["CD3D", "GAPDH", "LYZ"]]
V1_TOKENS = {"CD3D": 2, "MS4A1": 3, "LYZ": 4, "GAPDH": 5, "ACTB": 6, "MALAT1": 7}
V2_TOKENS = {k: v + 2 for k, v in V1_TOKENS.items()}  # <pad>=0 <mask>=1 <cls>=2 <eos>=3
V1_EXPECTED = [[5, 7, 3, 2, 6], [3, 4, 6], [2, 5, 4]]
V2_EXPECTED = [[2, 7, 9, 5, 4, 8, 3], [2, 5, 6, 8, 3], [2, 4, 7, 6, 3]]


def gf_dictionaries(version: str, genes: list[tuple[str, str, float]] | None = None) -> dict:
    """The four Geneformer dictionaries (plain dicts, as Geneformer pickles them).

    ``genes``: (Ensembl ID, symbol, median) of a larger vocabulary appended after :data:`GF_GENES` (token ids
    follow on; :data:`EXTRA_GENE` comes last); default none.
    """
    extra = [g for g in (genes or []) if g[0] not in {e for e, _, _ in GF_GENES}]
    first = 2 if version == "V1" else 4
    tokens = V1_TOKENS if version == "V1" else V2_TOKENS
    token = {"<pad>": 0, "<mask>": 1} if version == "V1" else {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    token.update({e: tokens[s] for e, s, _ in GF_GENES})
    token.update({e: first + len(GF_GENES) + i for i, (e, _, _) in enumerate(extra)})
    token[EXTRA_GENE] = first + len(GF_GENES) + len(extra)
    all_genes = GF_GENES + extra
    # numpy scalars, as Geneformer's median dictionaries hold
    median = {e: (np.float64(m) if i % 2 else float(m)) for i, (e, _, m) in enumerate(all_genes)}
    names = {s: e for e, s, _ in all_genes}
    names["CD20"] = "ENSG00000156738"  # a second symbol of MS4A1
    mapping = {e: e for e, _, _ in all_genes}
    mapping["ENSG00000999999"] = "ENSG00000111640"  # a retired ID collapsed onto GAPDH
    return {"token": token, "median": median, "gene_name": names, "ensembl_mapping": mapping}


def make_geneformer_dir(path: Path, version: str = "V1", fmt: str = "bin", *, max_position: int = 64, seed: int = 0,
                        dict_dir: Path | None = None, vocab_size: int | None = None,
                        genes: list[tuple[str, str, float]] | None = None) -> Path:
    """Write a tiny random Geneformer folder: config.json + pytorch_model.bin (torch.save(state_dict)) or
    model.safetensors (save_pretrained), and the pickled dictionaries (stdlib pickle). ``vocab_size`` larger
    than the dictionary gives the model embedding rows no gene uses (e.g. CellWhisperer's placeholder 9743);
    ``genes`` extends the vocabulary (see :func:`gf_dictionaries`)."""
    from transformers import BertConfig, BertForMaskedLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    d = gf_dictionaries(version, genes)
    cfg = BertConfig(
        vocab_size=vocab_size or len(d["token"]), hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=max_position, hidden_act="relu" if version == "V1" else "gelu",
        hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(cfg)
    if fmt == "bin":
        cfg.architectures = ["BertForMaskedLM"]
        cfg.to_json_file(str(path / "config.json"))
        state = model.state_dict()
        state["bert.embeddings.position_ids"] = torch.arange(max_position)[None]  # stored by transformers 4.6 (V1 files)
        torch.save(state, path / "pytorch_model.bin")
    else:
        model.save_pretrained(path)
    dd = Path(dict_dir) if dict_dir is not None else path
    dd.mkdir(parents=True, exist_ok=True)
    suffix = "_gc30M" if version == "V1" else "_gc104M"
    files = {"token": "token_dictionary", "median": "gene_median_dictionary", "gene_name": "gene_name_id_dict",
             "ensembl_mapping": "ensembl_mapping_dict"}
    for key, stem in files.items():
        if version == "V1" and key == "ensembl_mapping":
            continue
        with open(dd / f"{stem}{suffix}.pkl", "wb") as fh:
            pickle.dump(d[key], fh)
    return path


def reference_bert(folder: Path):
    """Independent: HF BertForMaskedLM from the folder, weights loaded by the test itself."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig.from_json_file(str(folder / "config.json"))
    model = BertForMaskedLM(cfg)
    if (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    else:
        state = load_file(str(folder / "model.safetensors"))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def reference_features(model, token_lists, *, specials: bool) -> torch.Tensor:
    """EmbExtractor's cell embedding: hidden_states[-2], mean over the non-padding gene tokens
    (V2: positions of <cls> and <eos> excluded)."""
    out = []
    with torch.no_grad():
        for toks in token_lists:  # one cell at a time: no padding at all
            ids = torch.tensor([toks])
            hs = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
            h = hs[-2][0]
            if specials:
                h = h[1:-1]
            out.append(h.mean(0))
    return torch.stack(out)


@pytest.fixture(scope="module")
def gf_v1(tmp_path_factory):
    return make_geneformer_dir(tmp_path_factory.mktemp("gf_v1"), "V1", "bin")


@pytest.fixture(scope="module")
def gf_v2(tmp_path_factory):
    return make_geneformer_dir(tmp_path_factory.mktemp("gf_v2"), "V2", "safetensors", seed=1)


def _tokens(enc):
    return [enc.tokens(i).tolist() for i in range(len(enc))]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin overhead (and contention on shared CI machines)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- tokenization
def test_v1_tokens_match_hand_computed(gf_v1):
    from engine.models.geneformer import load_geneformer

    tower = load_geneformer(gf_v1)
    tok = tower.tokenizer
    assert tower.version == "V1" and tok.cls_token_id is None and tok.eos_token_id is None
    assert tok.max_length == 64  # min(2048, max_position_embeddings)
    assert EXTRA_GENE not in set(tok.gene_ids)  # no median: not in the tokenized vocabulary
    enc = tok.encode_matrix(COUNTS, [e for e, _, _ in GF_GENES])
    assert _tokens(enc) == V1_EXPECTED
    assert [[V1_TOKENS[g] for g in cell] for cell in RANKED] == V1_EXPECTED
    # normalised counts give the same encoding (rank invariance to the per-cell factor 1e4 / total)
    norm = COUNTS / COUNTS.sum(1, keepdims=True) * 1e4
    assert _tokens(tok.encode_matrix(norm, [e for e, _, _ in GF_GENES])) == V1_EXPECTED


def test_v2_tokens_match_hand_computed(gf_v2):
    from engine.models.geneformer import load_geneformer

    tower = load_geneformer(gf_v2)
    tok = tower.tokenizer
    assert tower.version == "V2" and tok.cls_token_id == 2 and tok.eos_token_id == 3
    enc = tok.encode_matrix(sp.csr_matrix(COUNTS), [e for e, _, _ in GF_GENES])
    assert _tokens(enc) == V2_EXPECTED
    assert [[2] + [V2_TOKENS[g] for g in cell] + [3] for cell in RANKED] == V2_EXPECTED


def test_symbols_aliases_versions_and_duplicates(gf_v2):
    from engine.models.geneformer import load_geneformer

    tok = load_geneformer(gf_v2).tokenizer
    symbols = [s for _, s, _ in GF_GENES]
    assert _tokens(tok.encode_matrix(COUNTS, symbols)) == V2_EXPECTED
    # second symbol (gene_name_id_dict), versioned / lower-case IDs, retired ID (ensembl_mapping_dict)
    var = ["CD3D", "CD20", "ensg00000090382.7", "ENSG00000999999", "ENSG00000075624.3", "MALAT1"]
    assert _tokens(tok.encode_matrix(COUNTS, var)) == V2_EXPECTED
    # duplicate IDs are summed, as Geneformer's collapse_gene_ids: GAPDH split over two columns
    X = np.hstack([COUNTS, np.zeros((3, 1), np.float32)])
    X[:, 3], X[:, 6] = [2, 0, 1], [3, 0, 2]
    ids = [e for e, _, _ in GF_GENES] + ["ENSG00000999999"]
    assert _tokens(tok.encode_matrix(X, ids)) == V2_EXPECTED


def reference_tokens(X, var_ids, version: str, *, duplicates: str, placeholder: int | None = None) -> list[list[int]]:
    """Independent rank value encoding from the test's own dictionaries: each column (or, with ``"sum"``, each
    gene after summing its columns) scaled by its median, non-zero values ranked highest first (ties: column
    order); an empty cell gets ``[placeholder]`` when one is given."""
    d = gf_dictionaries(version)
    med = {e: float(m) for e, m in d["median"].items()}
    cols = [(j, g) for j, g in enumerate(var_ids) if g in med]
    out = []
    for row in np.asarray(X, dtype=np.float64):
        if duplicates == "sum":
            total: dict = {}
            for j, g in cols:
                total[g] = total.get(g, 0.0) + row[j]
            items = [(g, v / med[g]) for g, v in total.items() if v > 0]
        else:
            items = [(g, row[j] / med[g]) for j, g in cols if row[j] > 0]
        genes = [g for g, _ in sorted(items, key=lambda t: -t[1])]
        toks = [d["token"][g] for g in genes] or ([placeholder] if placeholder is not None else [])
        out.append(toks if version == "V1" else [d["token"]["<cls>"], *toks, d["token"]["<eos>"]])
    return out


# GAPDH measured in two columns (the second one a repeat of its ID), plus a cell with nothing in the vocabulary
DUP_IDS = [e for e, _, _ in GF_GENES] + ["ENSG00000111640", EXTRA_GENE]
DUP_X = np.array(
    [
        [3, 1, 0, 3, 8, 1, 6, 0],  # GAPDH 3 + 6: separate 6/1, 3/1; summed 9/1
        [0, 4, 6, 0, 2, 0, 0, 0],
        [10, 0, 1, 1, 0, 0, 2, 0],  # GAPDH 1 + 2
        [0, 0, 0, 0, 0, 0, 0, 5],  # only EXTRA_GENE (no median: not tokenized) -> empty
        [0, 0, 0, 0, 0, 0, 0, 0],  # no counts at all -> empty
    ],
    dtype=np.float32,
)


def test_duplicate_columns_sum_or_stay_separate(gf_v1, gf_v2):
    from engine.models.geneformer import load_geneformer

    t = V1_TOKENS
    sep = load_geneformer(gf_v1, duplicates="separate").tokenizer
    # cell 0: GAPDH 6, MALAT1 4, GAPDH 3, MS4A1 2, CD3D 1.5, ACTB 1; cell 2: CD3D 5, GAPDH 2, GAPDH 1, LYZ 0.25
    expected_sep = [[t["GAPDH"], t["MALAT1"], t["GAPDH"], t["MS4A1"], t["CD3D"], t["ACTB"]],
                    [t["MS4A1"], t["LYZ"], t["ACTB"]], [t["CD3D"], t["GAPDH"], t["GAPDH"], t["LYZ"]], [], []]
    assert _tokens(sep.encode_matrix(DUP_X, DUP_IDS)) == expected_sep
    assert expected_sep == reference_tokens(DUP_X, DUP_IDS, "V1", duplicates="separate")
    summed = load_geneformer(gf_v1).tokenizer  # default: Geneformer's collapse_gene_ids
    assert summed.duplicates == "sum"
    expected_sum = [[t["GAPDH"], t["MALAT1"], t["MS4A1"], t["CD3D"], t["ACTB"]], [t["MS4A1"], t["LYZ"], t["ACTB"]],
                    [t["CD3D"], t["GAPDH"], t["LYZ"]], [], []]
    assert _tokens(summed.encode_matrix(DUP_X, DUP_IDS)) == expected_sum
    assert expected_sum == reference_tokens(DUP_X, DUP_IDS, "V1", duplicates="sum")
    v2 = load_geneformer(gf_v2, duplicates="separate").tokenizer
    assert _tokens(v2.encode_matrix(sp.csr_matrix(DUP_X), DUP_IDS))[:3] == reference_tokens(DUP_X, DUP_IDS, "V2", duplicates="separate")[:3]


def test_empty_cells_get_the_placeholder_token(gf_v1, gf_v2):
    from engine.models.geneformer import load_geneformer

    tower = load_geneformer(gf_v1, duplicates="separate", empty_cell_token_id=4)
    enc = tower.tokenizer.encode_matrix(DUP_X, DUP_IDS)
    ref = reference_tokens(DUP_X, DUP_IDS, "V1", duplicates="separate", placeholder=4)
    assert _tokens(enc) == ref and ref[3:] == [[4], [4]] and enc.lengths[3:].tolist() == [1, 1]
    with torch.no_grad():
        got = tower(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
    torch.testing.assert_close(got, reference_features(reference_bert(gf_v1), ref, specials=False), atol=1e-5, rtol=1e-5)
    v2 = load_geneformer(gf_v2, empty_cell_token_id=5).tokenizer
    assert _tokens(v2.encode_matrix(DUP_X, DUP_IDS))[3:] == [[2, 5, 3], [2, 5, 3]]  # <cls> placeholder <eos>
    for bad in (0, 2, -1, 1.5, True):  # <pad>, <cls> (V2), negative, not an int
        with pytest.raises(ConfigError):
            load_geneformer(gf_v2, empty_cell_token_id=bad)
    with pytest.raises(ConfigError, match="outside"):
        load_geneformer(gf_v1, empty_cell_token_id=9743)  # the tiny model has 9 tokens
    with pytest.raises(ConfigError, match="duplicate"):
        load_geneformer(gf_v1, duplicates="mean")


def test_tokenization_settings_survive_the_native_format(tmp_path, gf_v1, tiny_text_dir):
    from engine.models.checkpoint import load_model, save_model
    from engine.models.geneformer import load_geneformer
    from engine.models.model import TranscriptomeTextModel
    from engine.models.towers import TextTower

    tower = load_geneformer(gf_v1, duplicates="separate", empty_cell_token_id=4)
    model = TranscriptomeTextModel(tower, TextTower(tiny_text_dir, pooling="mean"), projection_dim=8).eval()
    back = load_model(save_model(model, tmp_path / "native"), device="cpu")
    assert back.tokenizer.tokenization_config() == {"duplicates": "separate", "empty_cell_token_id": 4}
    assert _tokens(back.tokenizer.encode_matrix(DUP_X, DUP_IDS)) == reference_tokens(DUP_X, DUP_IDS, "V1", duplicates="separate", placeholder=4)
    plain = TranscriptomeTextModel(load_geneformer(gf_v1), TextTower(tiny_text_dir, pooling="mean"), projection_dim=8)
    assert plain.config_dict()["transcriptome_tower"]["tokenization"] == {"duplicates": "sum", "empty_cell_token_id": None}


def test_truncation_v1_and_v2(tmp_path):
    from engine.models.geneformer import load_geneformer

    v1 = load_geneformer(make_geneformer_dir(tmp_path / "v1", "V1", max_position=4)).tokenizer
    v2 = load_geneformer(make_geneformer_dir(tmp_path / "v2", "V2", max_position=4)).tokenizer
    ids = [e for e, _, _ in GF_GENES]
    assert _tokens(v1.encode_matrix(COUNTS, ids)) == [c[:4] for c in V1_EXPECTED]
    assert _tokens(v2.encode_matrix(COUNTS, ids)) == [[2, *c[1:-1][:2], 3] for c in V2_EXPECTED]


# --------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("which", ["v1", "v2"])
def test_features_equal_independent_bert(which, gf_v1, gf_v2):
    from engine.models.geneformer import load_geneformer

    folder, expected, specials = (gf_v1, V1_EXPECTED, False) if which == "v1" else (gf_v2, V2_EXPECTED, True)
    tower = load_geneformer(folder)
    enc = tower.tokenizer.encode_matrix(COUNTS, [e for e, _, _ in GF_GENES])
    with torch.no_grad():
        got = tower(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
    ref = reference_features(reference_bert(folder), expected, specials=specials)
    assert got.shape == (3, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # micro-batching (a token budget of one cell) and padding do not change anything
    tower.max_tokens_per_batch = 1
    with torch.no_grad():
        again = tower(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)


def test_cls_mode_and_last_layer(gf_v1, gf_v2):
    from engine.models.geneformer import load_geneformer

    tower = load_geneformer(gf_v2, emb_mode="cls", emb_layer=0)
    enc = tower.tokenizer.encode_matrix(COUNTS, [e for e, _, _ in GF_GENES])
    ref_model = reference_bert(gf_v2)
    with torch.no_grad():
        got = tower(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
        ref = torch.stack([
            ref_model(input_ids=torch.tensor([t]), output_hidden_states=True).hidden_states[-1][0, 0] for t in V2_EXPECTED
        ])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        load_geneformer(gf_v1, emb_mode="cls")


def test_empty_cells_get_zero_features(gf_v1):
    from engine.models.geneformer import load_geneformer

    tower = load_geneformer(gf_v1)
    X = np.vstack([COUNTS[:1], np.zeros((1, 6), np.float32)])
    enc = tower.tokenizer.encode_matrix(X, [e for e, _, _ in GF_GENES])
    with torch.no_grad():
        f = tower(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
    assert torch.isfinite(f).all() and torch.all(f[1] == 0) and f[0].abs().sum() > 0


# --------------------------------------------------------------------------- loading rules
def test_dictionaries_found_in_repository_layout(tmp_path):
    """Geneformer repository layout: model folders beside geneformer/ (V2 dicts) and gene_dictionaries_30m/ (V1)."""
    from engine.models.geneformer import find_dictionaries, load_geneformer

    root = tmp_path / "Geneformer"
    make_geneformer_dir(root / "gf-12L-30M-i2048", "V1", dict_dir=root / "geneformer" / "gene_dictionaries_30m")
    make_geneformer_dir(root / "Geneformer-V2-104M", "V2", "safetensors", dict_dir=root / "geneformer")
    p1 = find_dictionaries(root / "gf-12L-30M-i2048", vocab_size=9)
    assert p1["token"].name == "token_dictionary_gc30M.pkl" and p1["median"].name == "gene_median_dictionary_gc30M.pkl"
    assert load_geneformer(root / "gf-12L-30M-i2048").version == "V1"
    assert load_geneformer(root / "Geneformer-V2-104M").version == "V2"
    assert load_geneformer(root / "gf-12L-30M-i2048", version="V1").version == "V1"
    with pytest.raises(CheckpointError, match="does not fit"):  # the V2 dictionary has more tokens than the V1 model
        load_geneformer(root / "gf-12L-30M-i2048", version="V2")


def test_missing_files_and_mismatched_weights(tmp_path, gf_v1):
    from engine.models.geneformer import load_geneformer

    with pytest.raises(CheckpointError, match="config.json"):
        load_geneformer(tmp_path)
    bad = make_geneformer_dir(tmp_path / "bad", "V1")
    state = torch.load(bad / "pytorch_model.bin", weights_only=True)
    state.pop("bert.encoder.layer.1.output.dense.weight")
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="encoder.layer.1.output.dense.weight"):
        load_geneformer(bad)
    nodict = tmp_path / "nodict"
    nodict.mkdir()
    for f in ("config.json", "pytorch_model.bin"):
        (nodict / f).write_bytes((gf_v1 / f).read_bytes())
    with pytest.raises(CheckpointError, match="token dictionary"):
        load_geneformer(nodict)


def test_malicious_weights_and_dictionaries_are_refused(tmp_path):
    import os

    from engine.models.geneformer import load_geneformer

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = make_geneformer_dir(tmp_path / "gf", "V1")
    good_bin = (folder / "pytorch_model.bin").read_bytes()
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["evil"] = Evil()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        load_geneformer(folder)
    (folder / "pytorch_model.bin").write_bytes(good_bin)
    with open(folder / "gene_median_dictionary_gc30M.pkl", "wb") as fh:
        pickle.dump({"ENSG00000167286": Evil()}, fh)
    with pytest.raises(UnsafeCheckpointError, match="posix.system|nt.system"):
        load_geneformer(folder)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- native format round trip
def test_native_round_trip(tmp_path, gf_v2, tiny_text_dir):
    from engine.models.checkpoint import load_model, save_model
    from engine.models.geneformer import GeneformerTower, load_geneformer
    from engine.models.model import TranscriptomeTextModel
    from engine.models.towers import TextTower

    tower = load_geneformer(gf_v2)
    torch.manual_seed(0)
    model = TranscriptomeTextModel(tower, TextTower(tiny_text_dir, pooling="mean"), projection_dim=8,
                                   transcriptome_head={"type": "mi_linear"}, text_head={"type": "linear"}).eval()
    out = save_model(model, tmp_path / "native")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["transcriptome_tower"]["type"] == "geneformer" and cfg["transcriptome_tower"]["version"] == "V2"
    assert (out / "genes.aliases.tsv").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert any(k.startswith("transcriptome_tower.bert.encoder.layer.2.") for k in f.keys())
    back = load_model(out, device="cpu")
    assert isinstance(back.transcriptome_tower, GeneformerTower) and back.transcriptome_tower.requires_counts
    var = ["CD3D", "CD20", "ENSG00000090382", "ENSG00000999999", "ACTB", "MALAT1"]  # aliases survive
    enc = back.tokenizer.encode_matrix(COUNTS, var)
    assert _tokens(enc) == V2_EXPECTED
    np.testing.assert_allclose(back.embed_encoding(enc), model.embed_encoding(enc), atol=1e-6)


def test_embed_cells_requires_counts(tiny_text_dir, gf_v1):
    pytest.importorskip("engine.io.data")
    import anndata as ad

    from engine.tools.embed import embed_cells
    from engine.errors import DataError
    from engine.models.geneformer import load_geneformer
    from engine.models.model import TranscriptomeTextModel
    from engine.models.towers import TextTower

    model = TranscriptomeTextModel(load_geneformer(gf_v1), TextTower(tiny_text_dir, pooling="mean"), projection_dim=8).eval()
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(40, 6)).astype(np.float32)
    var = pd.DataFrame(index=[e for e, _, _ in GF_GENES])
    a = ad.AnnData(X=sp.csr_matrix(X), var=var)
    emb = embed_cells(a, model, use_cache=False, progress=False)
    assert emb.shape == (40, 8) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert a.uns["transcriptome_embeds"]["params"]["expression"] == "counts"
    scaled = ad.AnnData(X=(X - X.mean(0)) / (X.std(0) + 1), var=var)
    with pytest.raises(DataError):  # MatrixKindError: scaled data cannot be ranked
        embed_cells(scaled, model, use_cache=False, progress=False)

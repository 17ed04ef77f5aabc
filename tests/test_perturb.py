"""In-silico perturbation: token edits, readouts, obs/uns keys, scans, cancellation, errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import engine
from engine import perturb, perturb_scan  # the functions
from engine.errors import AnalysisError, CancelledError, EmptySelectionError, GeneIdentifierError, QueryError
from engine.tools._perturb_common import _compact, _overexpress_rows, delete_tokens, overexpress_tokens
from engine.models.tokenizer import RankEncoding, RankTokenizer
from engine.models.towers import TranscriptomeTower

from conftest import GENES, build_tiny_model

CLS, EOS, PAD = 1, 2, 0


def enc_of(lists, width=None, pad=PAD):
    width = width or max(len(x) for x in lists)
    ids = np.full((len(lists), width), pad, dtype=np.int64)
    for i, x in enumerate(lists):
        ids[i, : len(x)] = x
    return RankEncoding(ids, np.array([len(x) for x in lists], dtype=np.int64), pad)


def as_lists(enc):
    return [enc.tokens(i).tolist() for i in range(len(enc))]


def test_engine_perturb_is_the_function():
    # The functions live in engine.tools.perturbation, so importing it never shadows engine.perturb.
    import engine.tools.perturbation  # noqa: F401

    assert callable(engine.perturb) and engine.perturb is perturb and callable(engine.perturb_scan)


# ---------------------------------------------------------------------------------------------- token edits
def test_delete_tokens_exact():
    enc = enc_of([[10, 11, 12, 13], [12, 14], [15], []], width=5)
    before = enc.input_ids.copy()
    out = delete_tokens(enc, [12])
    assert as_lists(out) == [[10, 11, 13], [14], [15], []]
    assert out.input_ids.shape == (4, 5)
    assert (out.input_ids[out.attention_mask == 0] == PAD).all()
    np.testing.assert_array_equal(enc.input_ids, before)  # input untouched
    assert as_lists(delete_tokens(enc, [12, 10, 15])) == [[11, 13], [14], [], []]
    assert as_lists(delete_tokens(enc, [99])) == as_lists(enc)


def test_delete_tokens_keeps_cls_eos():
    enc = enc_of([[CLS, 10, 11, 12, EOS], [CLS, 11, EOS], [CLS, EOS]])
    out = delete_tokens(enc, [11])
    assert as_lists(out) == [[CLS, 10, 12, EOS], [CLS, EOS], [CLS, EOS]]
    np.testing.assert_array_equal(out.lengths, [4, 2, 2])


def test_overexpress_present_and_absent_no_specials():
    enc = enc_of([[10, 11, 12, 13], [10, 11], []])
    out = overexpress_tokens(enc, [12], max_length=4)
    # present: moved to the front; absent: inserted, the lowest-ranked gene cut at max_length
    assert as_lists(out) == [[12, 10, 11, 13], [12, 10, 11], [12]]
    out = overexpress_tokens(enc, [13], max_length=4)
    assert as_lists(out) == [[13, 10, 11, 12], [13, 10, 11], [13]]
    # absent gene in a full cell: the last gene is dropped
    out = overexpress_tokens(enc, [20], max_length=4)
    assert as_lists(out) == [[20, 10, 11, 12], [20, 10, 11], [20]]
    assert out.input_ids.shape[1] == 4


def test_overexpress_several_in_given_order_and_truncation():
    enc = enc_of([[10, 11, 12, 13, 14]])
    out = overexpress_tokens(enc, [13, 20, 13], max_length=5)
    assert as_lists(out) == [[13, 20, 10, 11, 12]]
    out = overexpress_tokens(enc, [14, 10], max_length=6)
    assert as_lists(out) == [[14, 10, 11, 12, 13]]


def test_overexpress_with_cls_eos():
    enc = enc_of([[CLS, 10, 11, 12, EOS], [CLS, 11, EOS], [CLS, EOS]])
    kw = dict(cls_token_id=CLS, eos_token_id=EOS)
    # present gene moves right after <cls>
    assert as_lists(overexpress_tokens(enc, [12], max_length=5, **kw)) == [
        [CLS, 12, 10, 11, EOS], [CLS, 12, 11, EOS], [CLS, 12, EOS]]
    # absent gene at max_length: inserted after <cls>, last gene dropped, <eos> kept
    assert as_lists(overexpress_tokens(enc, [20], max_length=5, **kw)) == [
        [CLS, 20, 10, 11, EOS], [CLS, 20, 11, EOS], [CLS, 20, EOS]]
    # room to grow: nothing dropped
    assert as_lists(overexpress_tokens(enc, [20], max_length=8, **kw)) == [
        [CLS, 20, 10, 11, 12, EOS], [CLS, 20, 11, EOS], [CLS, 20, EOS]]
    # <cls> only (no <eos> in the tokenizer)
    enc2 = enc_of([[CLS, 10, 11, 12]])
    assert as_lists(overexpress_tokens(enc2, [20], max_length=4, cls_token_id=CLS)) == [[CLS, 20, 10, 11]]
    # <eos> only
    enc3 = enc_of([[10, 11, 12, EOS]])
    assert as_lists(overexpress_tokens(enc3, [20], max_length=4, eos_token_id=EOS)) == [[20, 10, 11, EOS]]
    with pytest.raises(AnalysisError):
        overexpress_tokens(enc, [20, 21], max_length=3, **kw)


def _ref_overexpress(tokens, genes, cls, eos, max_length):
    """Plain-list reference of Geneformer's overexpress (move/insert at front, re-truncate keeping <eos>)."""
    t = list(tokens)
    head = [t.pop(0)] if cls is not None and t and t[0] == cls else []
    tail = [t.pop()] if eos is not None and t and t[-1] == eos else []
    body = [g for g in t if g not in genes]
    body = body[: max_length - len(head) - len(genes) - len(tail)]
    return head + list(genes) + body + tail


@pytest.mark.parametrize("specials", [False, True])
def test_token_edits_match_list_reference(specials):
    rng = np.random.default_rng(3)
    cls, eos = (CLS, EOS) if specials else (None, None)
    max_length = 12
    lists = []
    for _ in range(200):
        n = rng.integers(0, max_length - (2 if specials else 0) + 1)
        body = list(rng.choice(np.arange(10, 30), size=n, replace=False))
        lists.append(([CLS] if specials else []) + body + ([EOS] if specials else []))
    enc = enc_of(lists, width=max_length)
    for genes in ([11], [12, 25], [29, 10, 17]):
        got = as_lists(delete_tokens(enc, genes))
        assert got == [[t for t in x if t not in genes] for x in lists]
        got = as_lists(overexpress_tokens(enc, genes, cls_token_id=cls, eos_token_id=eos, max_length=max_length))
        assert got == [_ref_overexpress(x, genes, cls, eos, max_length) for x in lists]
    # row-wise kernels used by the scan: a different gene per row
    row_genes = rng.integers(10, 30, size=len(lists))
    ids1, len1 = _compact(enc.input_ids, enc.lengths, (enc.input_ids == row_genes[:, None]) & enc.attention_mask, PAD)
    assert as_lists(RankEncoding(ids1, len1)) == [[t for t in x if t != g] for x, g in zip(lists, row_genes)]
    ids2, len2 = _overexpress_rows(enc.input_ids, enc.lengths, row_genes[:, None], pad=PAD, cls_token_id=cls,
                                   eos_token_id=eos, max_length=max_length)
    assert as_lists(RankEncoding(ids2, len2)) == [_ref_overexpress(x, [g], cls, eos, max_length) for x, g in zip(lists, row_genes)]


# ---------------------------------------------------------------------------------------------- a toy model
class BagTower(TranscriptomeTower):
    """Toy tower: features = indicator of the gene tokens a cell holds (rank ignored; specials zeroed)."""

    tower_type = "toy_bag"

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.hidden_size = tokenizer.vocab_size
        self.register_buffer("gene_col", torch.zeros(tokenizer.vocab_size))
        self.gene_col[torch.as_tensor(tokenizer.token_ids)] = 1.0

    def config(self):
        return {"type": self.tower_type}

    def forward(self, input_ids, attention_mask):
        onehot = torch.nn.functional.one_hot(input_ids, self.hidden_size).float()
        return (onehot * attention_mask[..., None].float()).sum(1) * self.gene_col


def bag_model(text_dir, n_genes=40, max_length=64):
    from engine.models.model import TranscriptomeTextModel
    from engine.models.towers import TextTower

    ens = [f"ENSG{i:011d}" for i in range(n_genes)]
    sym = [f"GENE{i}" for i in range(n_genes)]
    tok = RankTokenizer(ens, symbols=sym, max_length=max_length, cls_token_id=2, eos_token_id=3, first_gene_token=4)
    tower = BagTower(tok)
    model = TranscriptomeTextModel(tower, TextTower(text_dir, pooling="mean", max_length=32),
                                   projection_dim=tower.hidden_size, name="bag")
    with torch.no_grad():
        model.transcriptome_projection.weight.copy_(torch.eye(tower.hidden_size))
    return model.eval(), ens, sym


def bag_adata(ens, n=40, seed=0):
    """Cells 0..n/2-1 ("start") express genes 1..20; cells n/2.. ("goal") the same plus gene 0."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    X = np.zeros((n, len(ens)), dtype=np.float32)
    X[:, 1:21] = rng.integers(1, 50, size=(n, 20))
    X[n // 2 :, 0] = rng.integers(1, 50, size=n - n // 2)
    obs = pd.DataFrame({"state": ["start"] * (n // 2) + ["goal"] * (n - n // 2)}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=ens))


@pytest.fixture(scope="module")
def bag(tiny_text_dir):
    return bag_model(tiny_text_dir)


def test_goal_shift_sign_on_constructed_case(bag):
    model, ens, sym = bag
    adata = bag_adata(ens)
    start, goal = (adata.obs["state"] == "start").to_numpy(), (adata.obs["state"] == "goal").to_numpy()
    # overexpressing GENE0 in start cells makes them exactly goal-like (cos 1 to the goal mean)
    df = perturb(adata, model, "GENE0", mode="overexpress", cells=start, goal=goal, progress=False)
    assert (df["goal_shift"] > 0.01).all()
    assert not df["gene_present"].any()
    # deleting GENE0 in goal cells moves them toward the start state and away from the goal state
    df = perturb(adata, model, ens[0], mode="delete", cells=goal, goal=start, progress=False)
    assert (df["goal_shift"] > 0.01).all() and df["gene_present"].all()
    df = perturb(adata, model, ens[0], mode="delete", cells=goal, goal=goal, progress=False)
    assert (df["goal_shift"] < -0.01).all()
    # exact values: orig = 1_S/sqrt(21), perturbed = 1_{S-G}/sqrt(20), goal(start) = 1_{S-G}/sqrt(20)
    df = perturb(adata, model, "gene0", cells=goal, goal=start, progress=False)
    np.testing.assert_allclose(df["goal_shift"], 1 - np.sqrt(20 / 21), atol=1e-5)
    np.testing.assert_allclose(df["cos_original_perturbed"], np.sqrt(20 / 21), atol=1e-5)
    assert df.attrs["genes"] == [ens[0]] and df.attrs["symbols"] == ["GENE0"]


def test_scan_ranks_on_constructed_case(bag):
    model, ens, sym = bag
    adata = bag_adata(ens)
    goal = (adata.obs["state"] == "start").to_numpy()
    df = perturb_scan(adata, model, goal=goal, cells=~goal, progress=False, chunk_size=7)
    # deleting GENE0 (the only gene that tells goal from start) is the single move toward the start state
    assert df.iloc[0]["symbol"] == "GENE0" and df.iloc[0]["mean_goal_shift"] > 0
    assert (df["mean_goal_shift"].iloc[1:] < 0).all()
    assert df.attrs["sort_by"] == "mean_goal_shift" and not df.attrs["ascending"]
    assert set(df["symbol"]) == {f"GENE{i}" for i in range(21)}
    assert (df["n_cells_expressing"] == 20).all()


# ---------------------------------------------------------------------------------------------- tiny model
def test_perturb_writes_obs_and_uns(tiny_model, tiny_adata):
    cells = np.zeros(tiny_adata.n_obs, dtype=bool)
    cells[:30] = True
    cells[150:170] = True
    df = perturb(tiny_adata, tiny_model, ["CD19", "MS4A1"], cells=cells, query="B cells MINUS T cells",
                 goal=(tiny_adata.obs["group"] == "T").to_numpy(), progress=False, key_added="ko")
    assert list(df.index) == list(tiny_adata.obs_names[cells])
    for c in ("cos_original_perturbed", "delta_logit", "goal_shift", "gene_present"):
        col = tiny_adata.obs[f"ko_{c}"]
        assert col[~cells].isna().all() and col[cells].notna().all()
    assert str(tiny_adata.obs["ko_gene_present"].dtype) == "boolean"
    np.testing.assert_allclose(tiny_adata.obs["ko_delta_logit"][cells], df["delta_logit"], rtol=1e-6)
    np.testing.assert_allclose(df["delta_logit"], df["logit_perturbed"] - df["logit_original"], atol=1e-5)
    assert (df["cos_original_perturbed"] <= 1 + 1e-6).all()
    # cells that do not hold the genes are unchanged
    absent = ~df["gene_present"]
    assert (df.loc[absent, "cos_original_perturbed"] == 1).all() and (df.loc[absent, "delta_logit"] == 0).all()
    assert (df.loc[~absent, "cos_original_perturbed"] < 1).all()
    p = tiny_adata.uns["ko"]
    assert p["genes"] == ["CD19", "MS4A1"] and p["mode"] == "delete" and p["n_cells"] == 50
    assert p["query"] == "B cells MINUS T cells" and p["model_fingerprint"] == tiny_model.fingerprint()
    # a second run without query/goal drops the stale columns
    perturb(tiny_adata, tiny_model, "CD19", cells=cells, progress=False, key_added="ko")
    assert "ko_delta_logit" not in tiny_adata.obs and "ko_goal_shift" not in tiny_adata.obs
    assert tiny_adata.X.nnz > 0  # data untouched


def test_baseline_matches_embed_cells_and_score_text(tiny_model, tiny_adata):
    from engine.tools.embed import embed_cells
    from engine.tools.score import score_text

    goal = (tiny_adata.obs["group"] == "B").to_numpy()
    # goal cells without obsm: re-embedded from the same expression
    re = perturb(tiny_adata, tiny_model, "CD79A", cells=np.arange(90, 130), goal=goal, progress=False)
    assert "re-embedded" in re.attrs["goal"]
    embed_cells(tiny_adata, tiny_model, progress=False)
    s = score_text(tiny_adata, tiny_model, "B cells", write=False)
    df = perturb(tiny_adata, tiny_model, "CD79A", query="B cells", progress=False)
    np.testing.assert_allclose(df["logit_original"], s, atol=1e-4)
    # a subset is encoded as in the full dataset
    sub = perturb(tiny_adata, tiny_model, "CD79A", cells=np.arange(90, 130), query="B cells", goal=goal, progress=False)
    np.testing.assert_allclose(sub["logit_original"], s[90:130], atol=1e-4)
    assert "obsm" in sub.attrs["goal"]
    np.testing.assert_allclose(sub["goal_shift"], re["goal_shift"], atol=1e-5)


@pytest.mark.parametrize("mode", ["delete", "overexpress"])
def test_edit_equals_editing_the_data(tiny_text_dir, tiny_adata, mode):
    """Without truncation, deleting a gene = zeroing it; overexpressing = making it the top-ranked gene."""
    from engine.tools.embed import embed_cells

    model = build_tiny_model(tiny_text_dir, max_length=64)
    # irregular medians: no exact rank ties that per-cell renormalisation could break differently
    model.tokenizer.gene_medians = np.random.default_rng(1).uniform(0.5, 3.0, len(GENES))
    df = perturb(tiny_adata, model, "CD74", mode=mode, progress=False)
    edited = tiny_adata.copy()
    X = edited.X.toarray()
    X[:, GENES.index("CD74")] = 0 if mode == "delete" else 1e7
    edited.X = sp.csr_matrix(X)
    e0 = embed_cells(tiny_adata, model, progress=False, use_cache=False)
    e1 = embed_cells(edited, model, progress=False, use_cache=False)
    np.testing.assert_allclose(df["cos_original_perturbed"], (e0 * e1).sum(1), atol=1e-5)


def test_subsampling_is_seeded(tiny_model, tiny_adata):
    df1 = perturb(tiny_adata, tiny_model, "CD3D", max_cells=30, progress=False)
    df2 = perturb(tiny_adata, tiny_model, "CD3D", max_cells=30, progress=False)
    assert len(df1) == 30 and df1.attrs["n_subsampled_from"] == 200
    assert list(df1.index) == list(df2.index)
    assert tiny_adata.obs["perturb_cos_original_perturbed"].notna().sum() == 30
    assert tiny_adata.uns["perturb"]["n_subsampled_from"] == 200
    assert perturb(tiny_adata, tiny_model, "CD3D", progress=False).attrs["n_subsampled_from"] is None


def test_scan_ranks_and_matches_perturb(tiny_model, tiny_adata):
    q = "B cells MINUS T cells"
    df = perturb_scan(tiny_adata, tiny_model, query=q, max_genes=12, progress=False, chunk_size=300)
    assert list(df.columns) == ["gene", "symbol", "n_cells_expressing", "n_cells_perturbed", "mean_delta_logit",
                                "mean_cos_original_perturbed", "mean_goal_shift"]
    assert len(df) == 12 and df["mean_goal_shift"].isna().all()
    assert df["mean_delta_logit"].is_monotonic_increasing
    assert df.attrs["sort_by"] == "mean_delta_logit" and df.attrs["ascending"]
    assert (df["n_cells_perturbed"] == df["n_cells_expressing"]).all()
    # the default genes are the most frequently present ones
    enc = tiny_model.tokenizer.encode_matrix(tiny_adata.X, tiny_adata.var)
    counts = pd.Series(np.bincount(enc.input_ids[enc.attention_mask], minlength=tiny_model.tokenizer.vocab_size))
    top = counts.sort_values(ascending=False, kind="stable")
    assert df["n_cells_expressing"].min() >= top.iloc[11]
    # one gene of the scan agrees with perturb() averaged over the cells holding it
    row = df.iloc[0]
    one = perturb(tiny_adata, tiny_model, row["gene"], query=q, progress=False)
    held = one[one["gene_present"]]
    assert len(held) == row["n_cells_expressing"]
    assert row["mean_delta_logit"] == pytest.approx(held["delta_logit"].mean(), abs=1e-4)
    assert row["mean_cos_original_perturbed"] == pytest.approx(held["cos_original_perturbed"].mean(), abs=1e-5)


def test_scan_overexpress_given_genes(tiny_model, tiny_adata):
    df = perturb_scan(tiny_adata, tiny_model, genes=["CD19", "HBB", "LYZ"], mode="overexpress", query="B cells",
                      cells=np.arange(40), progress=False)
    assert set(df["symbol"]) == {"CD19", "HBB", "LYZ"}
    assert (df["n_cells_perturbed"] == 40).all()
    assert df["mean_delta_logit"].is_monotonic_decreasing
    assert not df.attrs["ascending"]


def test_scan_cancel(tiny_model, tiny_adata):
    with pytest.raises(CancelledError):
        perturb_scan(tiny_adata, tiny_model, query="B cells", cancel=lambda: True, progress=False)
    calls = {"n": 0}

    def cancel_later():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(CancelledError):
        perturb_scan(tiny_adata, tiny_model, query="B cells", cancel=cancel_later, progress=False, chunk_size=50,
                     batch_size=25)
    assert calls["n"] == 4
    with pytest.raises(CancelledError):
        perturb(tiny_adata, tiny_model, "CD19", cancel=lambda: True, progress=False)


def test_errors(tiny_model, tiny_adata):
    with pytest.raises(GeneIdentifierError, match="MS4A1"):
        perturb(tiny_adata, tiny_model, "MS4A", progress=False)
    with pytest.raises(GeneIdentifierError, match="CD3E"):
        perturb_scan(tiny_adata, tiny_model, genes=["CD19", "CD3EE"], progress=False)
    with pytest.raises(EmptySelectionError):
        perturb(tiny_adata, tiny_model, "CD19", cells=np.zeros(tiny_adata.n_obs, dtype=bool), progress=False)
    with pytest.raises(EmptySelectionError):
        perturb_scan(tiny_adata, tiny_model, cells=[], progress=False)
    with pytest.raises(EmptySelectionError):
        perturb(tiny_adata, tiny_model, "CD19", goal=np.zeros(tiny_adata.n_obs, dtype=bool), progress=False)
    with pytest.raises(AnalysisError):
        perturb(tiny_adata, tiny_model, "CD19", mode="knockout", progress=False)
    with pytest.raises(AnalysisError):
        perturb(tiny_adata, tiny_model, [], progress=False)
    with pytest.raises(QueryError):
        perturb(tiny_adata, tiny_model, "CD19", query="  ", progress=False)
    with pytest.raises(QueryError):
        perturb(tiny_adata, tiny_model, "CD19", goal="B cells MINUS T cells", progress=False)
    assert not any(c.startswith("perturb_") for c in tiny_adata.obs.columns)  # nothing written on failure


def test_goal_text_and_obs_names(tiny_model, tiny_adata):
    df = perturb(tiny_adata, tiny_model, "CD3E", cells=list(tiny_adata.obs_names[150:160]),
                 goal="A sample of B cells from a healthy individual", progress=False)
    assert len(df) == 10 and df["goal_shift"].notna().all()
    assert df.attrs["goal"].startswith("text:")


@pytest.mark.parametrize("mode,max_position", [("delete", 64), ("overexpress", 6)])
def test_geneformer_v2_tower_edit_equals_editing_counts(tmp_path, tiny_text_dir, mode, max_position):
    """Any rank-encoding tower works: a tiny Geneformer V2 (<cls>/<eos>, raw counts). Deleting a gene equals
    zeroing its counts (no truncation); overexpressing equals making it the top gene, also when the cell is cut
    at max_length (6 tokens: <cls> + 4 genes + <eos>)."""
    pytest.importorskip("engine.models.geneformer")
    import anndata as ad
    from test_geneformer import GF_GENES, make_geneformer_dir

    from engine.tools.embed import embed_cells
    from engine.models.geneformer import load_geneformer
    from engine.models.model import TranscriptomeTextModel
    from engine.models.towers import TextTower

    folder = make_geneformer_dir(tmp_path / "gf", "V2", "safetensors", max_position=max_position, seed=1)
    torch.manual_seed(0)
    model = TranscriptomeTextModel(load_geneformer(folder), TextTower(tiny_text_dir, pooling="mean"),
                                   projection_dim=8).eval()
    tok = model.tokenizer
    assert tok.cls_token_id is not None and tok.eos_token_id is not None and tok.max_length == min(max_position, 4096)
    rng = np.random.default_rng(0)
    X = rng.poisson(3.0, size=(30, 6)).astype(np.float32)
    X[::3, 1] = 0  # some cells lack MS4A1
    var = pd.DataFrame(index=[e for e, _, _ in GF_GENES])
    a = ad.AnnData(X=sp.csr_matrix(X), var=var, obs=pd.DataFrame(index=[f"c{i}" for i in range(30)]))
    df = perturb(a, model, "MS4A1", mode=mode, query="B cells", progress=False)
    edited = X.copy()
    edited[:, 1] = 0 if mode == "delete" else 1e6
    e0 = embed_cells(a, model, use_cache=False, progress=False)
    e1 = embed_cells(ad.AnnData(X=sp.csr_matrix(edited), var=var), model, use_cache=False, progress=False)
    np.testing.assert_allclose(df["cos_original_perturbed"], (e0 * e1).sum(1), atol=1e-5)
    if mode == "delete":
        np.testing.assert_array_equal(df["gene_present"], X[:, 1] > 0)
    scan = perturb_scan(a, model, genes=["MS4A1", "CD3D"], mode=mode, query="B cells", progress=False)
    row = scan.set_index("symbol").loc["MS4A1"]
    held = df[df["gene_present"]] if mode == "delete" else df
    assert row["mean_delta_logit"] == pytest.approx(held["delta_logit"].mean(), abs=1e-4)

"""Tests of engine.tools.enrichment (offline/online over-representation) and engine.io.genesets (shipped libraries)."""
from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest
from scipy.stats import hypergeom

import engine.tools.enrichment as enrich_mod
from engine.tools.enrichment import COLUMNS, enrich
from engine.errors import DataError, EmptySelectionError, MissingKeyError
from engine.io.genesets import DEFAULT_LIBRARIES, GENESETS_DIR, list_libraries, load_library

BACKGROUND = [f"G{i}" for i in range(1, 101)]  # 100 genes
SETS = {
    "SET_A": [f"G{i}" for i in range(1, 6)],    # 5 genes
    "SET_B": [f"G{i}" for i in range(6, 16)],   # 10 genes
    "SET_C": [f"G{i}" for i in range(16, 41)],  # 25 genes
}
QUERY = ["G1", "G2", "G3", "G6", "G16"]


@pytest.fixture
def tiny_gmt(tmp_path):
    p = tmp_path / "tiny.gmt"
    p.write_text("".join(f"{k}\tdescription of {k}\t" + "\t".join(v) + "\n" for k, v in SETS.items()))
    return p


def _bh(p):
    p = np.asarray(p, dtype=float)
    n = len(p)
    order = np.argsort(p)
    adj = np.empty(n)
    prev = 1.0
    for rank in range(n, 0, -1):  # step-up by hand
        i = order[rank - 1]
        prev = min(prev, p[i] * n / rank)
        adj[i] = prev
    return adj


@pytest.mark.parametrize("background", ["list", "int"])
def test_pvalues_match_hypergeometric_by_hand(tiny_gmt, background):
    bg = BACKGROUND if background == "list" else 100
    res = enrich(QUERY, libraries=[str(tiny_gmt)], background=bg)
    assert list(res.columns) == COLUMNS
    assert set(res["term"]) == {"SET_A", "SET_B", "SET_C"}
    assert (res["library"] == "tiny").all() and (res["source"] == "offline").all()
    N, n = 100, len(QUERY)
    expected = {}
    for term, genes in SETS.items():
        K = len(genes)
        k = len(set(QUERY) & set(genes))
        expected[term] = (k, K, hypergeom.sf(k - 1, N, K, n))
    for _, row in res.iterrows():
        k, K, p = expected[row["term"]]
        assert row["n_overlap"] == k and row["set_size"] == K and row["overlap"] == f"{k}/{K}"
        assert row["pval"] == pytest.approx(p, rel=1e-9)
    adj = dict(zip(res["term"], _bh(res["pval"].to_numpy())))
    for _, row in res.iterrows():
        assert row["pval_adj"] == pytest.approx(adj[row["term"]], rel=1e-9)
    assert res["pval"].is_monotonic_increasing
    assert res.loc[0, "term"] == "SET_A" and sorted(res.loc[0, "genes"].split(";")) == ["G1", "G2", "G3"]


def test_case_insensitive_and_user_spelling(tiny_gmt):
    res = enrich(["g1", "g2", "G3"], libraries=str(tiny_gmt), background=BACKGROUND)
    row = res[res["term"] == "SET_A"].iloc[0]
    assert row["n_overlap"] == 3
    assert set(row["genes"].split(";")) == {"g1", "g2", "G3"}


def test_dict_library_cutoff_and_background_message():
    res = enrich(QUERY + ["NOT_MEASURED"], libraries=SETS, background=BACKGROUND, cutoff=0.05)
    assert (res["pval_adj"] <= 0.05).all()
    assert set(res["library"]) <= {"custom"}
    assert any("not in the background" in m for m in res.attrs["messages"])


def test_empty_gene_list_raises():
    with pytest.raises(EmptySelectionError):
        enrich([], libraries=SETS)
    with pytest.raises(EmptySelectionError):
        enrich(["", "  "], libraries=SETS)


def test_no_gene_in_any_library_returns_empty_frame(tiny_gmt):
    res = enrich(["ENSG00000105369", "ENSG00000007312"], libraries=[str(tiny_gmt)])
    assert len(res) == 0 and list(res.columns) == COLUMNS
    assert any("None of the genes" in m for m in res.attrs["messages"])


def test_enrichr_unreachable_falls_back_fast(tiny_gmt, monkeypatch, caplog):
    def refuse(host, timeout):
        raise OSError("network is unreachable")

    called = []
    monkeypatch.setattr(enrich_mod, "_probe", refuse)
    monkeypatch.setattr(enrich_mod, "_call_enrichr", lambda *a, **k: called.append(1))
    t0 = time.perf_counter()
    res = enrich(QUERY, libraries=[str(tiny_gmt)], background=BACKGROUND, online=True, timeout=5)
    assert time.perf_counter() - t0 < 3
    assert not called
    assert (res["source"] == "offline").all() and len(res) == 3
    assert any("unreachable" in m for m in res.attrs["messages"])
    assert any("Enrichr" in r.getMessage() for r in caplog.records)


def test_enrichr_timeout_never_hangs(tiny_gmt, monkeypatch):
    monkeypatch.setattr(enrich_mod, "_probe", lambda host, timeout: None)
    monkeypatch.setattr(enrich_mod, "_call_enrichr", lambda *a, **k: time.sleep(30))
    t0 = time.perf_counter()
    res = enrich(QUERY, libraries=[str(tiny_gmt)], background=BACKGROUND, online=True, timeout=0.3)
    assert time.perf_counter() - t0 < 3
    assert (res["source"] == "offline").all()
    assert any("did not answer within" in m for m in res.attrs["messages"])


def test_enrichr_success_is_merged(tiny_gmt, monkeypatch):
    fake = pd.DataFrame({
        "Gene_set": ["KEGG_2021_Human", "KEGG_2021_Human"],
        "Term": ["B cell receptor signaling pathway", "Other"],
        "Overlap": ["2/80", "1/200"],
        "P-value": [1e-4, 0.5],
        "Adjusted P-value": [2e-4, 0.5],
        "Odds Ratio": [30.0, 1.0],
        "Combined Score": [276.0, 0.7],
        "Genes": ["G1;G2", "G3"],
    })
    monkeypatch.setattr(enrich_mod, "_probe", lambda host, timeout: None)
    monkeypatch.setattr(enrich_mod, "_call_enrichr", lambda genes, libs: fake)
    res = enrich(QUERY, libraries=[str(tiny_gmt)], background=BACKGROUND, online=True,
                 enrichr_libraries=["KEGG_2021_Human"])
    on = res[res["source"] == "enrichr"]
    assert len(on) == 2 and set(on["library"]) == {"KEGG_2021_Human"}
    assert on["pval_adj"].tolist() == pytest.approx([2e-4, 0.5])
    assert res.attrs["messages"] == []


def test_every_shipped_library_loads():
    names = list_libraries()
    assert set(DEFAULT_LIBRARIES) <= set(names)
    licences = (GENESETS_DIR / "LICENSES.md").read_text()
    total = 0
    symbol = re.compile(r"^[A-Z0-9][A-Z0-9.\-_@/]*$")
    for name in names:
        sets = load_library(name)
        assert sets, name
        assert f"`{name}.gmt`" in licences, f"{name} is not documented in LICENSES.md"
        for term, genes in sets.items():
            assert term.strip() and genes, (name, term)
            bad = [g for g in genes if g != g.upper() or not symbol.match(g)]
            assert not bad, (name, term, bad[:5])
        total += (GENESETS_DIR / f"{name}.gmt").stat().st_size
    assert total < 15e6
    # KEGG / BioCarta are not redistributed (licence), see LICENSES.md
    c2 = [t for n in names if n.startswith("MSigDB_C2") for t in load_library(n)]
    assert c2 and not any(t.startswith(("KEGG_", "BIOCARTA_", "ST_")) for t in c2)


def test_load_library_errors(tmp_path):
    with pytest.raises(MissingKeyError):
        load_library("No_Such_Library_2099")
    bad = tmp_path / "bad.gmt"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    with pytest.raises(DataError):
        load_library(bad)
    spaces = tmp_path / "spaces.gmt"
    spaces.write_text("SET_A desc G1 G2 G3\n")
    with pytest.raises(DataError, match="no gene set"):
        load_library(spaces)


def test_pbmc_b_cell_enrichment():
    """Biology smoke test: top 50 up genes of MS4A1+CD79A-high vs -low cells enrich B-cell terms offline."""
    import scanpy as sc

    from engine.tools.de import de_top_vs_bottom

    a = sc.datasets.pbmc68k_reduced()
    score = np.asarray(a.raw[:, ["MS4A1", "CD79A"]].X.sum(axis=1)).ravel()
    de = de_top_vs_bottom(a, score, n=100)
    up = de[de["direction"] == "up"]["gene"].head(50)
    res = enrich(up, background=a.raw.var_names)
    top10 = " | ".join(res["term"].head(10)).lower()
    assert re.search(r"b cell|b_cell|antigen receptor|bcr|mhc class ii|antigen processing", top10), top10

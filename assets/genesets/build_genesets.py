"""Rebuild the gene-set libraries shipped in ``assets/genesets/``.

This script is run by a maintainer, never at run time. It needs two inputs that
were fetched once through ordinary package clients:

* the pegasuspy 1.10.2 wheel, unpacked (``pip download --no-deps pegasuspy`` then
  ``python -m zipfile -e pegasuspy-*.whl DIR``), giving ``DIR/pegasus/data_files``
  and ``DIR/pegasus/annotate_cluster``;
* the Debian bookworm packages ``r-bioc-org.hs.eg.db`` 3.16.0 and ``r-bioc-go.db``
  3.16.0 (``apt-get download ...`` then ``dpkg -x DEB DIR``), giving the two SQLite
  files ``org.Hs.eg.sqlite`` and ``GO.sqlite``;
* optionally the panhumanpy 1.0.0 wheel, unpacked (``--panhumanpy DIR/panhumanpy``), for
  ``panhuman_cell_names.tsv`` (Azimuth pan-human names with exact Cell Ontology matches).

Usage::

    python assets/genesets/build_genesets.py --pegasus DIR/pegasus --debian DIR

The licence decisions (which MSigDB sub-collections are left out and why) are
recorded in ``LICENSES.md`` next to this script.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import unicodedata
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
MSIGDB_VERSION = "v7.5.1"

# C2:CP sub-collections by name prefix. KEGG_, BIOCARTA_ and ST_ (AAAS/STKE) sets
# carry their sources' restrictions and are NOT redistributed (see LICENSES.md).
C2_SPLIT = {
    "REACTOME_": "MSigDB_C2_CP_Reactome",
    "WP_": "MSigDB_C2_CP_WikiPathways",
    "PID_": "MSigDB_C2_CP_PID",
    "NABA_": "MSigDB_C2_CP_Other",
    "SA_": "MSigDB_C2_CP_Other",
    "SIG_": "MSigDB_C2_CP_Other",
    "WNT_": "MSigDB_C2_CP_Other",
}
C2_EXCLUDED = ("KEGG_", "BIOCARTA_", "ST_")

# GO BP: propagated annotations (go_bp_all), all evidence codes but ND, sets of 5..500 genes.
GO_MIN, GO_MAX = 5, 500


def _ascii(text: str) -> str:
    """ASCII transliteration (e.g. 'Naïve' -> 'Naive') so that any locale can read the files."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _write_gmt(path: Path, rows: list[tuple[str, str, list[str]]]) -> None:
    with path.open("w", encoding="ascii", newline="\n") as fh:
        for name, desc, genes in rows:
            name = _ascii(name.replace("\t", " ").strip())
            desc = _ascii((desc or "").replace("\t", " ").replace("\n", " ").strip()) or "NA"
            uniq = list(dict.fromkeys(_ascii(g.strip().upper()) for g in genes if g.strip()))
            if uniq:
                fh.write("\t".join([name, desc, *uniq]) + "\n")
    print(f"wrote {path.name}: {len(rows)} sets, {path.stat().st_size / 1e6:.2f} MB")


def _read_gmt_rows(path: Path) -> list[tuple[str, str, list[str]]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = [p for p in line.rstrip("\n").split("\t")]
        if len(parts) >= 3:
            rows.append((parts[0].strip(), parts[1].strip(), [g for g in parts[2:] if g.strip()]))
    return rows


def build_msigdb(pegasus: Path) -> None:
    data = pegasus / "data_files"
    hall = _read_gmt_rows(data / f"h.all.{MSIGDB_VERSION}.symbols.gmt")
    _write_gmt(HERE / f"MSigDB_Hallmark_{MSIGDB_VERSION}.gmt", hall)
    groups: dict[str, list] = defaultdict(list)
    dropped = defaultdict(int)
    for row in _read_gmt_rows(data / f"c2.cp.{MSIGDB_VERSION}.symbols.gmt"):
        if row[0].startswith(C2_EXCLUDED):
            dropped[row[0].split("_")[0]] += 1
            continue
        for prefix, lib in C2_SPLIT.items():
            if row[0].startswith(prefix):
                groups[lib].append(row)
                break
        else:
            raise SystemExit(f"unclassified C2:CP set {row[0]}; update C2_SPLIT")
    for lib, rows in groups.items():
        _write_gmt(HERE / f"{lib}_{MSIGDB_VERSION}.gmt", rows)
    print("left out (licence):", dict(dropped))


def build_signatures(pegasus: Path) -> None:
    data = pegasus / "data_files"
    rows = []
    for fname, prefix in [
        ("cell_cycle_human.gmt", "Cell cycle "),
        ("emt_human.gmt", "EMT "),
        ("gender_human.gmt", "Sex "),
        ("mitochondrial_genes_human.gmt", ""),
        ("ribosomal_genes_human.gmt", ""),
    ]:
        for name, desc, genes in _read_gmt_rows(data / fname):
            rows.append((prefix + name, desc, genes))
    _write_gmt(HERE / "Pegasus_Signatures_Human.gmt", rows)


def _markers_from_json(path: Path, tissue: str) -> list[tuple[str, str, list[str]]]:
    spec = json.loads(path.read_text(encoding="utf-8"))
    rows = []

    def walk(cell_types, parent):
        for ct in cell_types:
            genes = [g[:-1] for m in ct["markers"] for g in m["genes"] if g.endswith("+")]
            notes = [m.get("comment") or m.get("comments") or "" for m in ct["markers"]]
            notes = "; ".join(dict.fromkeys(n for n in notes if n))
            desc = f"{tissue} marker genes (positive) for {ct['name']}"
            if parent:
                desc += f", a subtype of {parent}"
            if notes:
                desc += f". {notes}"
            rows.append((f"{ct['name']} ({tissue})", desc, genes))
            if "subtypes" in ct:
                walk(ct["subtypes"]["cell_types"], ct["name"])

    walk(spec["cell_types"], None)
    return rows


def build_markers(pegasus: Path) -> None:
    ac = pegasus / "annotate_cluster"
    human = []
    for stem, tissue in [("human_immune", "human immune"), ("human_lung", "human lung"),
                         ("human_brain", "human brain")]:
        human += _markers_from_json(ac / f"{stem}_cell_markers.json", tissue)
    for name, desc, genes in _read_gmt_rows(pegasus / "data_files" / "tonsil_markers.gmt"):
        human.append((f"{name} (human tonsil)", desc, genes))
    _write_gmt(HERE / "CellType_Markers_Human_pegasus.gmt", human)
    mouse = []
    for stem, tissue in [("mouse_immune", "mouse immune"), ("mouse_brain", "mouse brain"),
                         ("mouse_liver", "mouse liver"), ("mouse_lung", "mouse lung")]:
        mouse += _markers_from_json(ac / f"{stem}_cell_markers.json", tissue)
    _write_gmt(HERE / "CellType_Markers_Mouse_pegasus.gmt", mouse)


def build_go_bp(debian: Path) -> None:
    site = debian / "usr/lib/R/site-library"
    org = sqlite3.connect(site / "org.Hs.eg.db/extdata/org.Hs.eg.sqlite")
    go = sqlite3.connect(site / "GO.db/extdata/GO.sqlite")
    terms = {gid: (term, (defn or "")) for gid, term, defn in go.execute(
        "select go_id, term, definition from go_term where ontology = 'BP'")}
    sets: dict[str, set[str]] = defaultdict(set)
    q = ("select a.go_id, i.symbol from go_bp_all a join gene_info i on a._id = i._id "
         "where a.evidence != 'ND'")
    for gid, sym in org.execute(q):
        sets[gid].add(sym)
    rows = []
    for gid, genes in sorted(sets.items()):
        if gid not in terms or not (GO_MIN <= len(genes) <= GO_MAX):
            continue
        term, defn = terms[gid]
        rows.append((f"{term} ({gid})", defn, sorted(genes)))
    _write_gmt(HERE / "GO_Biological_Process_2022.gmt", rows)


def build_panhuman_names(panhumanpy: Path) -> None:
    """Azimuth pan-human cell names with an exact Cell Ontology match (proxy-benchmark label texts only)."""
    import pandas as pd

    d = pd.read_csv(panhumanpy / "_tools" / "v1" / "cell_ontology_map" / "cell_ontology_map.csv")
    e = d[d["CL_Match"] == "skos:exactMatch"][["Annotation_Label", "CL_ID", "CL_Label"]]
    e.columns = ["name", "cl_id", "cl_label"]
    e.to_csv(HERE / "panhuman_cell_names.tsv", sep="\t", index=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pegasus", type=Path, required=True, help="unpacked wheel's pegasus/ folder")
    ap.add_argument("--debian", type=Path, help="folder the two .deb files were extracted into")
    ap.add_argument("--panhumanpy", type=Path, help="unpacked panhumanpy 1.0.0 wheel's panhumanpy/ folder")
    args = ap.parse_args()
    if args.panhumanpy:
        build_panhuman_names(args.panhumanpy)
    build_msigdb(args.pegasus)
    build_signatures(args.pegasus)
    build_markers(args.pegasus)
    if args.debian:
        build_go_bp(args.debian)


if __name__ == "__main__":
    main()

"""Registry of the gene-set libraries that ship with Lexicell (offline enrichment).

Libraries are GMT files (``name <tab> description <tab> gene ...``, HGNC symbols in
upper case) in ``assets/genesets/``; their sources, versions and licences are in
``assets/genesets/LICENSES.md``. A library is addressed by its file stem, e.g.
``"MSigDB_Hallmark_v7.5.1"``, or by the path of any GMT file (your own, or an MSigDB
download with KEGG/BioCarta sets that Lexicell may not redistribute).

Extra folders of GMT files can be registered with the environment variable
``LEXICELL_GENESETS`` (folders separated by ``os.pathsep``); their files are listed
after the shipped ones and shadow nothing.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from ..paths import ASSETS_DIR
from ..errors import DataError, MissingKeyError

__all__ = [
    "ASSETS_DIR",
    "GENESETS_DIR",
    "DEFAULT_LIBRARIES",
    "list_libraries",
    "library_path",
    "load_library",
    "library_descriptions",
]

GENESETS_DIR = ASSETS_DIR / "genesets"
ENV_VAR = "LEXICELL_GENESETS"

#: Libraries used by :func:`engine.tools.enrichment.enrich` when ``libraries=None``.
DEFAULT_LIBRARIES: tuple[str, ...] = (
    "MSigDB_Hallmark_v7.5.1",
    "MSigDB_C2_CP_Reactome_v7.5.1",
    "MSigDB_C2_CP_WikiPathways_v7.5.1",
    "MSigDB_C2_CP_PID_v7.5.1",
    "GO_Biological_Process_2022",
    "CellType_Markers_Human_pegasus",
)


def _search_dirs() -> list[Path]:
    dirs = [GENESETS_DIR]
    for part in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if part.strip():
            dirs.append(Path(part.strip()).expanduser())
    return dirs


def _registry() -> dict[str, Path]:
    reg: dict[str, Path] = {}
    for d in _search_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.gmt")):
            reg.setdefault(p.stem, p)  # shipped files first; extra folders never shadow them
    return reg


def list_libraries() -> list[str]:
    """Names of the available offline gene-set libraries.

    Returns
    -------
    list of str
        File stems of the shipped GMT files (sorted), followed by those found in the
        folders of ``$LEXICELL_GENESETS``.
    """
    return list(_registry())


def library_path(name_or_path: str | os.PathLike) -> Path:
    """Path of a library given its registry name or a GMT path.

    Raises
    ------
    MissingKeyError
        Neither a known library name nor an existing file.
    """
    p = Path(name_or_path).expanduser()
    reg = _registry()
    if str(name_or_path) in reg:
        return reg[str(name_or_path)]
    if p.is_file():
        return p
    raise MissingKeyError(
        f"Gene-set library {str(name_or_path)!r} is not available offline",
        found=f"{len(reg)} libraries: " + ", ".join(list(reg)[:12]) + (" ..." if len(reg) > 12 else ""),
        expected="a name from engine.io.genesets.list_libraries() or the path of a .gmt file",
        fix="check the name, pass a GMT file path, or add a folder of GMT files to $LEXICELL_GENESETS.",
    )


@lru_cache(maxsize=32)
def _load_cached(path: str, mtime: float) -> tuple[tuple[str, tuple[str, ...]], ...]:
    import gseapy

    try:
        try:
            raw = gseapy.read_gmt(path) if path.lower().endswith("gmt") else _read_gmt_any(path)
        except UnicodeDecodeError:  # gseapy opens with the locale's encoding; GMT files are UTF-8 or ASCII
            raw = _read_gmt_any(path)
    except (UnicodeDecodeError, OSError, ValueError) as exc:
        raise DataError(
            "The gene-set file could not be read",
            found=f"{path}: {type(exc).__name__}: {exc}",
            expected="a text GMT file: name <tab> description <tab> gene1 <tab> gene2 ...",
            fix="check the file; GMT files from MSigDB or Enrichr work as they are.",
        ) from exc
    out = []
    for name, genes in raw.items():
        clean = tuple(dict.fromkeys(g.strip().upper() for g in genes if g and g.strip()))
        if name.strip() and clean:
            out.append((name.strip(), clean))
    if not out:
        raise DataError(
            "The gene-set file holds no gene set",
            found=f"{path}: no line with a name, a description and at least one gene",
            expected="tab-separated lines: name <tab> description <tab> gene1 <tab> gene2 ...",
            fix="check that the file is tab-separated (not spaces or commas).",
        )
    return tuple(out)


def _read_gmt_any(path: str) -> dict[str, list[str]]:
    """Read a GMT-formatted file whatever its extension (gseapy insists on '.gmt')."""
    sets: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) >= 3:
                sets[parts[0]] = parts[2:]
    return sets


def load_library(name_or_path: str | os.PathLike) -> dict[str, list[str]]:
    """Load a gene-set library as ``{term: [GENE, ...]}``.

    Uses :func:`gseapy.read_gmt`. Gene symbols are stripped, upper-cased (mouse
    symbols such as ``Cd79a`` thus match their human orthologue's symbol ``CD79A``
    where the two agree, which holds for most one-to-one orthologues) and
    de-duplicated; empty sets are dropped. Results are cached per file and
    modification time.

    Parameters
    ----------
    name_or_path
        A name from :func:`list_libraries` or the path of a GMT file.

    Returns
    -------
    dict of str -> list of str
        Term name -> upper-case gene symbols, in file order.

    Raises
    ------
    MissingKeyError
        Unknown library name and no such file.
    DataError
        The file cannot be read or contains no gene set.
    """
    path = library_path(name_or_path)
    sets = _load_cached(str(path), path.stat().st_mtime)
    return {k: list(v) for k, v in sets}


def library_descriptions(name_or_path: str | os.PathLike) -> dict[str, str]:
    """Second GMT column (description or URL) per term of a library.

    Returns
    -------
    dict of str -> str
        Term name -> description (``""`` where the file has ``NA`` or nothing).
    """
    path = library_path(name_or_path)
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) >= 3 and parts[0].strip():
                desc = parts[1].strip()
                out[parts[0].strip()] = "" if desc in ("", "NA") else desc
    return out

"""The corpus manifest: every public data set the default model learns from, and how to fetch it.

``assets/corpus/manifest.json`` lists data sets. Each has its origin (repository, commit, path and the
public URL of every file, with sha256 and size), accession, citation, species, tissue, assay, profile kind,
licence, a reader spec and a label table that maps every source label to a Cell Ontology term.
:func:`fetch` downloads and verifies the files for a user with internet (any ``urllib`` URL, so tests use
``file://`` copies); nothing in Lexicell downloads at run time otherwise.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from ...paths import ASSETS_DIR
from ...errors import ConfigError, DataError, NetworkUnavailableError

__all__ = [
    "MANIFEST_PATH",
    "RESERVED_ACCESSIONS",
    "load_manifest",
    "read_label_table",
    "check_manifest",
    "sha256_of",
    "fetch",
    "ChecksumError",
    "ReservedDataError",
]

log = logging.getLogger(__name__)

MANIFEST_PATH = ASSETS_DIR / "corpus" / "manifest.json"

#: Data sets kept for independent evaluation: never downloaded, trained on, tuned on or evaluated with.
#: Keys are accessions; values say what they are. Names in ``RESERVED_NAMES`` catch copies without accessions.
RESERVED_ACCESSIONS: dict[str, str] = {
    "GSE96583": "Kang et al. 2018, interferon-beta stimulated PBMCs",
    "GSE84133": "Baron et al. 2016, pancreas (inDrop)",
    "GSE81608": "Xin et al. 2016, islets",
    "GSE103322": "Puram et al. 2017, head and neck cancer",
    "GSE64655": "Hoek et al. 2015, sorted blood cells",
    "SRP073767": "Zheng et al. 2017, 10x PBMC 68k",
    "PBMC3K": "10x Genomics PBMC 3k",
    "PBMC68K": "10x Genomics PBMC 68k (Zheng et al. 2017)",
}
RESERVED_NAMES = ("pbmc3k", "pbmc_small", "pbmc68k", "pan_indrop", "ifnb", "kang", "chetah")

_REQUIRED = ("id", "citation", "species", "tissue", "assay", "profile_kind", "licence", "files", "reader", "labels")
_PROFILE_KINDS = ("sorted bulk", "pseudo-bulk of labelled clusters", "single cells", "bulk tissue")


class ChecksumError(DataError):
    """A downloaded or local corpus file does not have the sha256 its manifest records."""


class ReservedDataError(ConfigError):
    """A manifest names a data set reserved for independent evaluation."""


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(path: str | os.PathLike | None = None) -> dict:
    """Read and check a corpus manifest.

    Parameters
    ----------
    path
        JSON file (default :data:`MANIFEST_PATH`, the bundled manifest).

    Returns
    -------
    dict
        ``{"version", "description", "datasets": [...]}``.

    Raises
    ------
    ConfigError
        Unreadable JSON or a data set missing a required field.
    ReservedDataError
        A data set is reserved for independent evaluation (:data:`RESERVED_ACCESSIONS`).
    """
    p = Path(path) if path is not None else MANIFEST_PATH
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("Corpus manifest not found", found=str(p), expected="a manifest.json",
                          fix="pass --manifest PATH or use the bundled assets/corpus/manifest.json.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("Corpus manifest is not valid JSON", found=f"{p}: {e}", expected="a JSON object with 'datasets'",
                          fix="repair the file or restore it from git.") from None
    if isinstance(manifest, dict):
        for ds in manifest.get("datasets") or []:
            if isinstance(ds, dict) and isinstance(ds.get("labels"), str):
                ds["labels_file"] = ds["labels"]
                ds["labels"] = read_label_table(p.parent / ds["labels"])
    check_manifest(manifest)
    return manifest


def read_label_table(path: str | os.PathLike) -> dict:
    """Read a curated label table (TSV: ``source_label``, ``cell_type_ontology_term_id``, ``tissue``, ``description``).

    Returns
    -------
    dict
        ``source label -> {"cell_type_ontology_term_id", "tissue", "description"}``, or ``None`` for a label
        with an empty CL id (dropped from the corpus).

    Raises
    ------
    ConfigError
        A missing file or column, or a duplicated source label.
    """
    import pandas as pd

    p = Path(path)
    try:
        t = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False, quoting=3, encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("Label table not found", found=str(p), expected="a TSV next to the manifest") from None
    need = {"source_label", "cell_type_ontology_term_id"}
    if not need <= set(t.columns):
        raise ConfigError("Label table misses columns", found=f"{p.name}: {list(t.columns)}", expected=sorted(need | {"tissue", "description"}))
    t["source_label"] = t["source_label"].str.strip()
    dup = t["source_label"][t["source_label"].duplicated()].tolist()
    if dup:
        raise ConfigError("Duplicated source labels in a label table", found=f"{p.name}: {dup[:5]}", expected="one row per label")
    out: dict = {}
    for _, r in t.iterrows():
        tid = r["cell_type_ontology_term_id"].strip()
        if not tid:
            out[r["source_label"]] = None
            continue
        e = {"cell_type_ontology_term_id": tid}
        for k in ("tissue", "description"):
            if k in t.columns and r[k].strip():
                e[k] = r[k].strip()
        out[r["source_label"]] = e
    return out


def _reserved_hits(ds: dict) -> list[str]:
    hits = []
    accs = ds.get("accession") or []
    accs = [accs] if isinstance(accs, str) else list(accs)
    for a in accs:
        if str(a).strip().upper() in RESERVED_ACCESSIONS:
            hits.append(f"{a} ({RESERVED_ACCESSIONS[str(a).strip().upper()]})")
    names = [str(ds.get("id", ""))] + [str(f.get("path", "")) for f in ds.get("files", [])]
    for n in names:
        low = n.lower()
        for r in RESERVED_NAMES:
            if r in Path(low).name or low == r:
                hits.append(f"{n!r} looks like reserved data ({r})")
    return hits


def check_manifest(manifest: Any) -> None:
    """Check a manifest's structure and refuse reserved data sets.

    Raises
    ------
    ConfigError
        Missing fields, duplicate ids, unknown profile kinds, files without sha256, labels without a CL id.
    ReservedDataError
        A data set whose accession or name is reserved for independent evaluation.
    """
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise ConfigError("A corpus manifest is a JSON object with a 'datasets' list", found=type(manifest).__name__,
                          expected='{"datasets": [...]}')
    seen = set()
    for i, ds in enumerate(manifest["datasets"]):
        where = f"datasets[{i}] ({ds.get('id', '?') if isinstance(ds, dict) else '?'})"
        if not isinstance(ds, dict):
            raise ConfigError("A manifest data set must be an object", found=where, expected="a JSON object")
        missing = [k for k in _REQUIRED if k not in ds]
        if missing:
            raise ConfigError("A manifest data set misses required fields", found=f"{where}: no {', '.join(missing)}",
                              expected=", ".join(_REQUIRED))
        hits = _reserved_hits(ds)
        if hits:
            raise ReservedDataError(
                "The manifest names a data set reserved for independent evaluation",
                found=f"{where}: {'; '.join(hits)}",
                expected="no reserved accession or copy (see engine.training.corpus.RESERVED_ACCESSIONS)",
                fix="remove the data set from the manifest; reserved data may never be trained on.",
            )
        if ds["id"] in seen:
            raise ConfigError("Duplicate data set id in the manifest", found=ds["id"], expected="unique ids")
        seen.add(ds["id"])
        if ds["profile_kind"] not in _PROFILE_KINDS:
            raise ConfigError("Unknown profile kind", found=f"{where}: {ds['profile_kind']!r}", expected=" | ".join(_PROFILE_KINDS))
        for f in ds["files"]:
            for k in ("name", "url", "sha256"):
                if not f.get(k):
                    raise ConfigError("A manifest file entry misses a field", found=f"{where}: {f}", expected="name, url, sha256")
        if not isinstance(ds["labels"], dict) or not ds["labels"]:
            raise ConfigError("A data set needs a label table", found=where, expected='{"source label": {"cell_type_ontology_term_id": "CL:..."}}')
        for lab, entry in ds["labels"].items():
            if entry is None:
                continue  # an explicitly dropped label
            tid = entry.get("cell_type_ontology_term_id") if isinstance(entry, dict) else None
            if not (isinstance(tid, str) and (tid.startswith("CL:") or tid.startswith("UBERON:"))):
                raise ConfigError("Every kept label needs a Cell Ontology id", found=f"{where}: {lab!r} -> {entry!r}",
                                  expected='{"cell_type_ontology_term_id": "CL:0000236"} (or null to drop the label)')


def _download(url: str, dest: Path, timeout: float) -> None:
    tmp = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial", delete=False)
    try:
        with tmp, urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (URL from the manifest)
            shutil.copyfileobj(r, tmp)
        os.replace(tmp.name, dest)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise


def fetch(to: str | os.PathLike, *, manifest: dict | str | os.PathLike | None = None, datasets: Iterable[str] | None = None,
          timeout: float = 120.0, progress: bool = True) -> list[Path]:
    """Download and verify the corpus files (for a user with internet; ``file://`` URLs work offline).

    Files go to ``to/<dataset id>/<file name>``. A file already there with the right sha256 is kept; a
    download is written to a temporary name and renamed only when complete, then checked.

    Parameters
    ----------
    to
        Target folder (created).
    manifest
        A loaded manifest, a path, or ``None`` for the bundled one.
    datasets
        Only these data set ids (default: all).
    timeout
        Seconds per connection.

    Returns
    -------
    list of pathlib.Path
        The verified files.

    Raises
    ------
    ChecksumError
        A file's sha256 differs from the manifest (the bad file is renamed ``*.bad`` and kept for inspection).
    NetworkUnavailableError
        A URL could not be reached.
    ReservedDataError
        The manifest names reserved data.
    """
    from tqdm.auto import tqdm

    man = manifest if isinstance(manifest, dict) else load_manifest(manifest)
    check_manifest(man)
    wanted = set(datasets) if datasets else None
    root = Path(to)
    out: list[Path] = []
    jobs = [(ds, f) for ds in man["datasets"] if wanted is None or ds["id"] in wanted for f in ds["files"]]
    if wanted:
        unknown = wanted - {ds["id"] for ds in man["datasets"]}
        if unknown:
            raise ConfigError("Unknown data set ids", found=", ".join(sorted(unknown)),
                              expected=", ".join(ds["id"] for ds in man["datasets"]))
    for ds, f in tqdm(jobs, desc="fetch corpus", unit="file", disable=not progress):
        dest = root / ds["id"] / f["name"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and sha256_of(dest) == f["sha256"]:
            out.append(dest)
            continue
        try:
            _download(f["url"], dest, timeout)
        except (OSError, ValueError) as e:
            raise NetworkUnavailableError(
                f"Could not download a corpus file of {ds['id']}", found=f"{f['url']}: {e}",
                expected="a reachable URL", fix="check the internet connection, or copy the file there by hand.",
            ) from None
        got = sha256_of(dest)
        if got != f["sha256"]:
            bad = dest.with_name(dest.name + ".bad")
            os.replace(dest, bad)
            raise ChecksumError(
                f"Checksum mismatch for {ds['id']}/{f['name']}", found=f"sha256 {got} (kept as {bad})",
                expected=f"sha256 {f['sha256']}",
                fix="the source changed or the download was corrupted; fetch again, or check the manifest's commit.",
            )
        out.append(dest)
    return out

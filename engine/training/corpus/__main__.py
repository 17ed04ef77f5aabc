"""``python -m engine.corpus {fetch,build,summary}``: download, verify and build the real-data corpus."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from ...errors import LexicellError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.corpus", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and verify the manifest's files (needs internet, or file:// URLs)")
    f.add_argument("--to", required=True, help="target folder (files go to TO/<dataset id>/)")
    f.add_argument("--manifest", default=None, help="manifest JSON (default: assets/corpus/manifest.json)")
    f.add_argument("--dataset", action="append", default=None, help="only this data set id (repeatable)")
    b = sub.add_parser("build", help="build one AnnData of labelled profiles from fetched files")
    b.add_argument("--from", dest="src", required=True, help="the folder `fetch` wrote")
    b.add_argument("--out", required=True, help="output .h5ad")
    b.add_argument("--manifest", default=None)
    b.add_argument("--dataset", action="append", default=None)
    b.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s = sub.add_parser("summary", help="print what a manifest or a built corpus holds")
    s.add_argument("path", nargs="?", default=None, help="a built corpus .h5ad (default: the manifest)")
    s.add_argument("--manifest", default=None)
    s.add_argument("--markdown", action="store_true", help="the manifest's data sets as a Markdown table (model card)")
    for q in (f, b, s):
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.add_argument("--quiet", action="store_true")
    return p


def _summary_of(adata) -> dict:
    obs = adata.obs
    return {
        "n_profiles": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_datasets": int(obs["dataset"].nunique()),
        "n_cell_types": int(obs["cell_type_ontology_term_id"].nunique()),
        "n_tissues": int(obs["tissue"].nunique()),
        "species": {str(k): int(v) for k, v in obs["species"].value_counts().items()},
        "profile_kind": {str(k): int(v) for k, v in obs["profile_kind"].value_counts().items()},
        "datasets": {str(k): int(v) for k, v in obs["dataset"].value_counts().sort_index().items()},
    }


def _markdown(man: dict) -> str:
    rows = ["| data set | source (repository) | accession | species | tissue | kind | labels kept | licence |",
            "|---|---|---|---|---|---|---|---|"]
    for ds in man["datasets"]:
        kept = sum(v is not None for v in ds["labels"].values())
        repo = ds["files"][0].get("repository", "")
        acc = ds.get("accession") or "n/a"
        rows.append(f"| `{ds['id']}` | {ds['citation']} ({repo}) | {acc} | {ds['species']} | {ds['tissue']} | "
                    f"{ds['profile_kind']} | {kept} | {str(ds['licence']).replace('|', '/')} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from . import build_corpus, fetch, load_corpus, load_manifest

    try:
        if args.cmd == "fetch":
            files = fetch(args.to, manifest=args.manifest, datasets=args.dataset, progress=not args.quiet)
            out = {"files": len(files), "to": str(Path(args.to).resolve())}
        elif args.cmd == "build":
            from ...io.data import check_output_path

            dest = check_output_path(args.out, inputs=[args.src, args.manifest], overwrite=args.overwrite, flag="--out")
            adata = build_corpus(args.src, manifest=args.manifest, out=dest, datasets=args.dataset, progress=not args.quiet)
            out = {"out": str(dest), **_summary_of(adata)}
        else:
            if args.markdown:
                print(_markdown(load_manifest(args.manifest)))
                return 0
            if args.path:
                out = _summary_of(load_corpus(args.path))
            else:
                man = load_manifest(args.manifest)
                out = {"n_datasets": len(man["datasets"]),
                       "datasets": {ds["id"]: {"species": ds["species"], "profile_kind": ds["profile_kind"],
                                               "labels_kept": sum(v is not None for v in ds["labels"].values())} for ds in man["datasets"]}}
    except LexicellError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

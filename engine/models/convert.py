"""Convert real checkpoints into Lexicell's native format (``config.json`` + ``model.safetensors`` + ``genes.tsv``).

Usage::

    python -m engine.convert cellwhisperer cellwhisperer_clip_v1.ckpt \\
        --geneformer Geneformer/gf-12L-30M-i2048 --text-model biobert-v1.1 --out models/cellwhisperer_clip_v1

    python -m engine.convert geneformer Geneformer/gf-12L-30M-i2048 --out models/geneformer-untrained \\
        [--text-model DIR] [--projection-dim 256] [--head mi_linear]

The first converts CellWhisperer's Lightning checkpoint (read without running any pickled code, see
:mod:`engine.models.safe_pickle`); the second wraps a Geneformer model with a text tower and *untrained* projection
heads, a starting point for ``engine.training.train``. Afterwards ``engine.load_model(OUT)`` needs no unpickling.
By default the written folder is loaded back and its logits compared with the converted model's.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["convert_cellwhisperer", "convert_geneformer", "main"]

log = logging.getLogger(__name__)


def _check_not_input(out: Path, inputs=()) -> None:
    """Refuse ``--out`` when it is an input folder or holds an input file (``--overwrite`` never replaces one)."""
    from ..errors import ConfigError

    target = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).expanduser().resolve()
        if src == target or src.parent == target or target in src.parents:
            raise ConfigError(
                "--out would write over an input", found=f"{out} (input {inp})",
                expected="a new folder apart from the checkpoint, Geneformer and text model folders",
                fix="choose another --out; inputs are never overwritten, not even with --overwrite",
            )


def _check_out(out: Path, overwrite: bool, inputs=()) -> None:
    """Refuse ``--out`` when it is an input (always), a file, or holds a model (unless ``overwrite``)."""
    from ..errors import ConfigError

    _check_not_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out is a file", found=str(out), expected="a folder (created if missing)")
    if out.is_dir() and (out / "config.json").exists() and not overwrite:
        raise ConfigError(
            "The output folder already holds a model", found=str(out), expected="a new or empty folder", fix="pass --overwrite to replace it"
        )


def _verify(model, out: Path, *, n_cells: int = 4) -> float:
    """Reload ``out`` and return the largest absolute logit difference on random cells and fixed texts."""
    import numpy as np
    import torch

    from .checkpoint import load_model
    from .tokenizer import RankEncoding

    back = load_model(out, device=model.device)
    tok = model.tokenizer
    rng = np.random.default_rng(0)
    width = min(64, tok.max_length)
    n_genes = width - tok.n_special
    ids = np.full((n_cells, width), tok.pad_token_id, dtype=np.int64)
    lengths = np.zeros(n_cells, dtype=np.int64)
    for i in range(n_cells):
        k = int(rng.integers(1, n_genes + 1)) if n_genes > 0 else 0
        genes = rng.choice(tok.token_ids, size=min(k, len(tok.token_ids)), replace=False)
        row = ([tok.cls_token_id] if tok.cls_token_id is not None else []) + genes.tolist()
        row += [tok.eos_token_id] if tok.eos_token_id is not None else []
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    enc = RankEncoding(ids, lengths, tok.pad_token_id)
    texts = ["T cell", "B cells from a healthy donor", "a sample of monocytes"]
    with torch.no_grad():
        a = model.embed_encoding(enc) @ model.embed_texts(texts, cache=False).T * float(model.logit_scale.exp())
        b = back.embed_encoding(enc) @ back.embed_texts(texts, cache=False).T * float(back.logit_scale.exp())
    return float(np.abs(a - b).max())


def _report(out: Path, model, diff: float | None) -> None:
    print(f"wrote {out}/")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(out)}  ({p.stat().st_size / 1e6:.2f} MB)")
    src = model.metadata.get("source", {})
    if src.get("summary"):
        print(src["summary"])
    if diff is not None:
        print(f"verified: engine.load_model({str(out)!r}) reproduces the logits (max |difference| {diff:.2e})")
    print(f"load it with: engine.load_model({str(out)!r})")


def _save_verified(model, out: Path, verify: bool, note: str | None = None) -> Path:
    """Save ``model`` in ``out``, reload it and compare logits (``verify``), print the report; return ``out``."""
    from .checkpoint import save_model

    save_model(model, out)
    diff = _verify(model, out) if verify else None
    if note:
        print(f"note: {note}")
    _report(out, model, diff)
    return out


def convert_cellwhisperer(
    ckpt, *, geneformer_dir, text_model_dir, out, dictionaries=None, name=None, overwrite=False, verify=True
) -> Path:
    """Convert CellWhisperer's ``.ckpt`` (see :func:`engine.models.cellwhisperer.load_cellwhisperer`) and save it in ``out``.

    Returns
    -------
    pathlib.Path
        The written folder.
    """
    from .cellwhisperer import load_cellwhisperer

    out = Path(out)
    _check_out(out, overwrite, (ckpt, geneformer_dir, text_model_dir, dictionaries))
    model = load_cellwhisperer(
        ckpt, geneformer_dir=geneformer_dir, text_model_dir=text_model_dir, device="cpu",
        geneformer_dictionaries=dictionaries, name=name,
    )
    return _save_verified(model, out, verify)


def convert_geneformer(
    folder, *, out, text_model_dir=None, dictionaries=None, version=None, projection_dim=256, head="mi_linear",
    emb_mode="cell", seed=0, name=None, overwrite=False, verify=True
) -> Path:
    """Wrap a Geneformer folder with a text tower and untrained heads and save it in ``out``.

    Returns
    -------
    pathlib.Path
        The written folder.
    """
    import torch

    from .geneformer import load_geneformer
    from .model import TranscriptomeTextModel
    from .towers import PACKAGE_SOURCE, TextTower, default_text_model_path

    out = Path(out)
    _check_out(out, overwrite, (folder, text_model_dir, dictionaries))
    tower = load_geneformer(folder, version=version, dictionaries=dictionaries, emb_mode=emb_mode)
    if text_model_dir is None:
        text = TextTower(default_text_model_path(), source=PACKAGE_SOURCE)
    else:
        text = TextTower(Path(text_model_dir).expanduser().resolve())
    torch.manual_seed(int(seed))
    model = TranscriptomeTextModel(
        tower, text, projection_dim=int(projection_dim), transcriptome_head={"type": head}, text_head={"type": head},
        name=name or f"geneformer-{tower.version.lower()}-untrained",
    ).eval()
    model.metadata["source"] = {
        "kind": "geneformer",
        "summary": f"{tower.describe()} + text tower {text.source} ({text.pooling}) -> untrained {head} heads -> {projection_dim}-d",
        "transcriptome_tower": {"type": "geneformer", "description": tower.describe(), "hidden_size": tower.hidden_size,
                                **(tower.source if isinstance(tower.source, dict) else {})},
        "text_tower": {"source": text.source, "hidden_size": text.hidden_size, "pooling": text.pooling},
        "projection": {"type": head, "dim": int(projection_dim), "trained": False},
    }
    return _save_verified(model, out, verify, note="the projection heads are untrained (random); train them before scoring text")


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(
        prog="python -m engine.convert",
        description="Convert CellWhisperer / Geneformer checkpoints into Lexicell's native model folder.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{cellwhisperer,geneformer}")
    c = sub.add_parser("cellwhisperer", help="CellWhisperer's Lightning .ckpt (e.g. cellwhisperer_clip_v1.ckpt)")
    c.add_argument("ckpt", type=Path, help="the .ckpt file")
    c.add_argument("--geneformer", type=Path, required=True, help="local Geneformer 12L-30M folder (config.json + weights)")
    c.add_argument("--text-model", type=Path, required=True, help="local BioBERT v1.1 folder (config.json + tokenizer)")
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--dictionaries", type=Path, help="folder of Geneformer's gene dictionaries, if not found automatically")
    c.add_argument("--name", help="model name (default: the checkpoint's file name)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    c.add_argument("--no-check", action="store_true", help="skip reloading the output to compare logits")
    g = sub.add_parser("geneformer", help="a Geneformer folder + a text model, with untrained heads")
    g.add_argument("folder", type=Path, help="local Geneformer model folder (config.json + weights)")
    g.add_argument("--text-model", type=Path, help="local Hugging Face text model (default: bundled all-MiniLM-L6-v2)")
    g.add_argument("--out", type=Path, required=True, help="output folder")
    g.add_argument("--dictionaries", type=Path, help="folder of Geneformer's gene dictionaries, if not found automatically")
    g.add_argument("--version", choices=["V1", "V2"], help="Geneformer version (default: detected)")
    g.add_argument("--projection-dim", type=int, default=256, help="width of the shared space (default 256)")
    g.add_argument("--head", choices=["linear", "mlp", "mi_linear"], default="mi_linear", help="projection head type")
    g.add_argument("--emb-mode", choices=["cell", "cls"], default="cell", help="cell embedding: mean (cell) or <cls> (V2)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random head weights")
    g.add_argument("--name", help="model name")
    g.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    g.add_argument("--no-check", action="store_true", help="skip reloading the output to compare logits")
    return p, {"cellwhisperer": c, "geneformer": g}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
    from ..errors import LexicellError

    parser, subs = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sub = subs[args.command]  # usage errors are reported by the sub-command's parser (exit status 2)
    if args.command == "cellwhisperer":
        if not args.ckpt.is_file():
            sub.error(f"checkpoint not found: {args.ckpt}")
        for flag, d in (("--geneformer", args.geneformer), ("--text-model", args.text_model)):
            if not d.is_dir():
                sub.error(f"{flag} folder not found: {d}")
    else:
        if not args.folder.is_dir():
            sub.error(f"Geneformer folder not found: {args.folder}")
        if args.text_model is not None and not args.text_model.is_dir():
            sub.error(f"--text-model folder not found: {args.text_model}")
        if args.projection_dim < 1:
            sub.error("--projection-dim must be positive")
    inputs = ((args.ckpt, args.geneformer, args.text_model, args.dictionaries) if args.command == "cellwhisperer"
              else (args.folder, args.text_model, args.dictionaries))
    try:
        _check_not_input(args.out, inputs)
    except LexicellError as err:  # --out over an input is a usage error: nothing was read or written
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "cellwhisperer":
            convert_cellwhisperer(
                args.ckpt, geneformer_dir=args.geneformer, text_model_dir=args.text_model, out=args.out,
                dictionaries=args.dictionaries, name=args.name, overwrite=args.overwrite, verify=not args.no_check,
            )
        else:
            convert_geneformer(
                args.folder, out=args.out, text_model_dir=args.text_model, dictionaries=args.dictionaries,
                version=args.version, projection_dim=args.projection_dim, head=args.head, emb_mode=args.emb_mode,
                seed=args.seed, name=args.name, overwrite=args.overwrite, verify=not args.no_check,
            )
    except LexicellError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Where Lexicell's bundled files live: ``assets/`` beside the ``engine`` package."""
from __future__ import annotations

from pathlib import Path

#: The repository's ``assets/`` folder (bundled model, gene sets, corpus manifest, label tables).
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

__all__ = ["ASSETS_DIR"]

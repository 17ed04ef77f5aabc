"""``python -m engine.convert``: Convert a CellWhisperer or Geneformer checkpoint into the native format.

A thin command-line entry point; the code lives in :mod:`engine.models.convert`.
"""
from __future__ import annotations

import sys

from .models.convert import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``python -m engine.embed``: Embed a large dataset in row chunks (in process or on Dask) into a zarr store.

A thin command-line entry point; the code lives in :mod:`engine.tools.embed_cli` and :mod:`engine.tools.chunked`.
"""
from __future__ import annotations

import sys

from .tools.embed_cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

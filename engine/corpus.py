"""``python -m engine.corpus fetch|build|summary``: the public labelled corpus behind the default model.

A thin command-line entry point; the code lives in :mod:`engine.training.corpus`.
"""
from __future__ import annotations

import sys

from .training.corpus.__main__ import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

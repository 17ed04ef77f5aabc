"""``python -m engine.distill``: Distil a slow teacher model into a fast sparse rank tower.

A thin command-line entry point; the code lives in :mod:`engine.training.distill`.
"""
from __future__ import annotations

import sys

from .training.distill import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

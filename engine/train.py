"""``python -m engine.train``: Train a transcriptome-text model from a JSON config.

A thin command-line entry point; the code lives in :mod:`engine.training.train`.
"""
from __future__ import annotations

import sys

from .training.train import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``python -m engine.evaluate``: Zero-shot evaluation on the demo or on your own labelled data.

A thin command-line entry point; the code lives in :mod:`engine.training.evaluate`.
"""
from __future__ import annotations

import sys

from .training.evaluate import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


class _CallableModule(type(sys)):
    """``engine.evaluate`` is both this entry point and (through ``engine.__init__``) the function
    :func:`engine.training.evaluate.evaluate`.

    Once ``engine.evaluate`` has been imported as a module (``python -m engine.evaluate``, ``import
    engine.evaluate``), the package attribute ``engine.evaluate`` is this module; making it callable keeps
    ``engine.evaluate(adata, model, label_key)`` working whatever the import order.
    """

    def __call__(self, *args, **kwargs):
        from .training.evaluate import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

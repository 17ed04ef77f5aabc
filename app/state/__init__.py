"""Per-session application state: the dataset, the model, the current colouring, query, selection and results.

:class:`AppState` holds data and calls the engine; it has no layout and imports no
panel. Every long operation comes in two halves so that views can run the first off
the event loop: ``compute_<op>(...)`` does the work and returns a result without
touching parameters, ``apply_<op>(result)`` stores it (on the event loop). ``run_<op>``
does both, for notebooks and tests. Engine errors (``engine.errors.LexicellError``)
propagate; the views show ``str(err)`` in the page.
"""
from __future__ import annotations

from .common import DENSITY, GENE, PERTURB, QUERY, ZERO_SHOT, ZERO_SHOT_CONF, QueryRecord
from .core import AppState

__all__ = ["AppState", "QueryRecord", "QUERY", "GENE", "ZERO_SHOT", "ZERO_SHOT_CONF", "PERTURB", "DENSITY"]

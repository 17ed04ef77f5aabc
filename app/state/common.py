"""Names shared by the state modules: the special colourings, one query's record, small text helpers."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from engine.errors import QueryError

__all__ = ["QueryRecord", "QUERY", "GENE", "ZERO_SHOT", "ZERO_SHOT_CONF", "PERTURB", "DENSITY", "MAX_HISTORY"]

# special colourings (obs columns are used by name)
DENSITY = "__density__"
QUERY = "__query__"
GENE = "__gene__"
ZERO_SHOT = "__zero_shot__"
ZERO_SHOT_CONF = "__zero_shot_confidence__"
PERTURB = "__perturb__"
MAX_HISTORY = 30


@dataclass
class QueryRecord:
    """One query of the history: its text, per-cell scores and the colour centre."""

    query: str
    scores: np.ndarray
    center: float
    contrast: bool
    seconds: float = 0.0


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _hex(color) -> str | None:
    """A colour as '#rrggbb' (scanpy stores hex strings, older files RGB float triples), None if unreadable."""
    from matplotlib.colors import to_hex

    try:
        return to_hex(color)
    except (ValueError, TypeError):
        try:
            return to_hex([float(x) for x in str(color).strip("[]() ").replace(",", " ").split()])
        except (ValueError, TypeError):
            return None


def _column_name(name: str) -> str:
    name = re.sub(r"[^0-9A-Za-z_.-]+", "_", str(name).strip()).strip("_")
    if not name:
        raise QueryError("The column name is empty", found=repr(name), expected="a name such as 'my_labels'")
    return name


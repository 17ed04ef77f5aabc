"""Text shown inside Bokeh figures (titles, axis labels, colour-bar titles) exactly as typed.

BokehJS typesets a title or label that holds ``$$...$$``, ``\\(...\\)`` or ``\\[...\\]`` as TeX with MathJax: a
query, an obs column or a label name such as ``$$x^2$$`` became a formula in the colour bar's title and the
score histogram's title (seen in Chromium, 2026-12-03), and a page without Bokeh's MathJax bundle shows
``\\text{...`` instead. :func:`no_tex` breaks those delimiters with a zero-width space, so Bokeh finds no TeX
and the reader sees the same characters.
"""
from __future__ import annotations

import re

__all__ = ["no_tex", "ZERO_WIDTH_SPACE"]

ZERO_WIDTH_SPACE = "\u200b"
_DELIMITERS = re.compile(r"\$\$|\\[()\[\]]")


def no_tex(text) -> str:
    """``text`` as a string that BokehJS shows literally, never as TeX.

    Parameters
    ----------
    text : object
        A title or label (``str()`` is taken; None gives ``""``).

    Returns
    -------
    str
        The same characters, with a zero-width space (U+200B) inside each ``$$``, ``\\(``, ``\\)``, ``\\[`` and
        ``\\]``; text without them is returned unchanged.

    Examples
    --------
    >>> no_tex("score: $$x^2$$") == "score: $\\u200b$x^2$\\u200b$"
    True
    """
    if text is None:
        return ""
    return _DELIMITERS.sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], str(text))

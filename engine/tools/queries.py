"""Checking the text that enters scoring: free-text queries (``"A MINUS B"``), label names and label templates.

Hostile input is refused where it enters (``CONTRIBUTING.md``): no NUL, control characters or lone surrogates,
labels need a letter or digit, templates hold only ``{label}`` / ``{definition}`` with no format spec.
"""
from __future__ import annotations

import re
import string
import unicodedata
from typing import Sequence

from ..errors import QueryError

__all__ = ["TEMPLATES", "clean_labels", "check_template", "split_contrast", "label_texts"]

#: Label templates. ``{label}`` is the label, ``{definition}`` its Cell Ontology definition.
TEMPLATES: dict[str, str] = {
    "cellwhisperer": "A sample of {label} from a healthy individual",
    "langcell": "cell type: {label}. {definition}",
    "plain": "{label}",
}
MAX_QUERY_CHARS = 2000
#: Longest custom template accepted by :func:`label_texts` (characters).
MAX_TEMPLATE_CHARS = 500
#: Longest label accepted by :func:`zero_shot` (characters).
MAX_LABEL_CHARS = 500
#: Longest label text a template may produce (characters; a Cell Ontology definition is at most ~1,000).
MAX_LABEL_TEXT_CHARS = 4000
#: The only template fields: the label and its Cell Ontology definition.
TEMPLATE_FIELDS = ("label", "definition")


def _refuse_unstorable(text: str, what: str) -> None:
    """Raise QueryError for NUL, other control characters (except whitespace) and lone surrogates.

    Such characters cannot be written to an .h5ad file (h5py refuses lone surrogates and truncates at NUL),
    so they are refused where the text enters rather than when the results are saved.
    """
    for i, ch in enumerate(text):
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            raise QueryError(f"The {what} holds a lone surrogate character", found=f"U+{code:04X} at position {i}",
                             expected="text of valid Unicode characters", fix="retype the text without it")
        if unicodedata.category(ch) == "Cc" and not ch.isspace():
            raise QueryError(f"The {what} holds a control character", found=f"U+{code:04X} at position {i}",
                             expected="printable text (tabs and line breaks count as spaces)",
                             fix="retype the text without it")


def _clean_query(text: str) -> str:
    if not isinstance(text, str):
        raise QueryError("A query must be text", found=type(text).__name__, expected="a string such as 'B cells'")
    _refuse_unstorable(text, "query")
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = " ".join(text.split())
    if not text:
        raise QueryError("The query is empty", found="an empty or whitespace-only text", expected="a description such as 'B cells'")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError("The query is too long", found=f"{len(text)} characters", expected=f"at most {MAX_QUERY_CHARS}")
    return text


def clean_labels(labels: Sequence[str], what: str = "label") -> list[str]:
    """Check and normalise label names for zero-shot labelling (whitespace collapsed).

    Parameters
    ----------
    labels
        Label names.
    what
        Word used in error messages (``"label"``, ``"candidate label"``).

    Returns
    -------
    list of str
        The labels with runs of whitespace collapsed to one space.

    Raises
    ------
    QueryError
        A label is not text, is empty, longer than :data:`MAX_LABEL_CHARS`, holds a control character or a lone
        surrogate, or has no letter or digit (an emoji- or punctuation-only label would be scored like any
        other text and can win the softmax for many cells).
    """
    if isinstance(labels, str):
        raise QueryError(f"The {what}s must be a list of names", found=repr(labels[:80]),
                         expected="a list such as ['B cell', 'T cell']")
    out = []
    for lab in labels:
        if not isinstance(lab, str):
            lab = str(lab)
        _refuse_unstorable(lab, what)
        lab = " ".join(lab.split())
        if not lab:
            raise QueryError(f"A {what} is empty", found=repr(lab), expected="non-empty label names")
        if len(lab) > MAX_LABEL_CHARS:
            raise QueryError(f"A {what} is too long", found=f"{len(lab)} characters ({lab[:40]!r}...)",
                             expected=f"at most {MAX_LABEL_CHARS} characters")
        if not any(ch.isalnum() for ch in lab):
            raise QueryError(f"A {what} has no letters or digits", found=repr(lab),
                             expected="a name such as 'B cell' (emoji or punctuation alone carry no meaning for the model)",
                             fix="remove that label or spell it out")
        out.append(lab)
    return out


def check_template(template: str) -> str:
    """Resolve and check a label template; return the format string.

    Parameters
    ----------
    template
        A key of :data:`TEMPLATES` or a custom template holding the fields ``{label}`` (``{}`` means
        ``{label}``) and optionally ``{definition}``. Fields take no format spec (``{label:>30}``), conversion
        (``{label!r}``), attribute or index; ``{{`` and ``}}`` are literal braces.

    Returns
    -------
    str
        The format string (``{}`` replaced by ``{label}``).

    Raises
    ------
    QueryError
        Not text, longer than :data:`MAX_TEMPLATE_CHARS`, unbalanced braces, no field, or a field other than
        ``{label}`` / ``{definition}`` (the message names what was found and what is allowed).
    """
    if not isinstance(template, str):
        raise QueryError("A template must be text", found=type(template).__name__, expected="e.g. 'A sample of {label}'")
    fmt = TEMPLATES.get(template, template)
    if len(fmt) > MAX_TEMPLATE_CHARS:
        raise QueryError("The template is too long", found=f"{len(fmt)} characters",
                         expected=f"at most {MAX_TEMPLATE_CHARS} characters with {{label}}")
    _refuse_unstorable(fmt, "template")
    allowed = "the fields {label} and {definition} only, with no format spec, conversion or attribute"
    try:
        parts = list(string.Formatter().parse(fmt))
    except ValueError as err:
        raise QueryError("The template cannot be read", found=f"{fmt!r}: {err}", expected=allowed,
                         fix="write literal braces as {{ and }}") from err
    n_fields = 0
    for _, field, spec, conv in parts:
        if field is None:
            continue
        n_fields += 1
        shown = "{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if field not in ("",) + TEMPLATE_FIELDS or spec or conv:
            raise QueryError("The template holds a field that is not allowed", found=shown, expected=allowed)
    if n_fields == 0:
        raise QueryError("The template has no placeholder", found=repr(fmt), expected="a text with {label}, e.g. 'A sample of {label}'")
    pieces = []
    for lit, field, _, _ in parts:
        pieces.append(lit.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            pieces.append("{" + (field or "label") + "}")
    return "".join(pieces)


def _fill(fmt: str, values: dict[str, str]) -> str:
    """Fill a template checked by :func:`check_template` without ``str.format`` (no widths, no attributes)."""
    return "".join(lit + ("" if field is None else values[field or "label"])
                   for lit, field, _, _ in string.Formatter().parse(fmt))


def split_contrast(query: str) -> tuple[str, str | None]:
    """Split CellWhisperer's ``"A MINUS B"`` form into ``(A, B)``; ``B`` is None for a plain query.

    Raises
    ------
    QueryError
        If a side is empty or ``MINUS`` appears more than once.
    """
    query = _clean_query(query)
    parts = re.split(r"\s+MINUS\s+|^MINUS\s+|\s+MINUS$", query)
    if len(parts) == 1:
        return parts[0], None
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise QueryError(
            "A contrast query needs text on both sides of one MINUS",
            found=repr(query),
            expected="'A MINUS B', e.g. 'T cells MINUS regulatory T cells'",
        )
    return parts[0].strip(), parts[1].strip()


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower()
    return s[:n] or "query"


def label_texts(labels: Sequence[str], template: str = "cellwhisperer", *, definitions: dict | None = None) -> list[str]:
    """Turn labels into texts through a template.

    Parameters
    ----------
    labels
        Label names (e.g. cell types).
    template
        A key of :data:`TEMPLATES` or a format string with ``{label}`` (or ``{}``) and optionally
        ``{definition}``.
    definitions
        Label -> definition; missing ones come from the Cell Ontology (empty when not found; the text then
        ends after the label).

    Returns
    -------
    list of str
        One text per label, whitespace collapsed, without a trailing full stop.

    Raises
    ------
    QueryError
        A bad template (see :func:`check_template`) or a produced text longer than
        :data:`MAX_LABEL_TEXT_CHARS`.
    """
    fmt = check_template(template)
    fields = {f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None}
    out = []
    for lab in labels:
        d = ""
        if "definition" in fields:
            d = (definitions or {}).get(lab)
            if d is None:
                from ..io.ontology import definition

                d = definition(lab)
        text = _fill(fmt, {"label": str(lab), "definition": str(d or "")})
        if len(text) > MAX_LABEL_TEXT_CHARS:
            raise QueryError("A label text is too long", found=f"{len(text)} characters for label {str(lab)[:40]!r}",
                             expected=f"at most {MAX_LABEL_TEXT_CHARS} characters", fix="use a shorter template or label")
        out.append(" ".join(text.split()).rstrip(" ."))
    return out

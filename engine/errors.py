"""Typed errors of the Lexicell engine.

Every error says what was found, what was expected and what to do next, so
that a notebook user and the dashboard (which shows ``str(err)`` in the page)
get the same actionable message.
"""
from __future__ import annotations

__all__ = [
    "LexicellError",
    "DataError",
    "MatrixKindError",
    "GeneIdentifierError",
    "MissingKeyError",
    "EmptySelectionError",
    "MissingEmbeddingError",
    "QueryError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "ModelMismatchError",
    "ConfigError",
    "AnalysisError",
    "NetworkUnavailableError",
    "CancelledError",
]


class LexicellError(Exception):
    """Base class of every error the engine raises on purpose.

    Parameters
    ----------
    problem
        One sentence naming the problem.
    found
        What the engine found (a value, a shape, a file).
    expected
        What it expected instead.
    fix
        What the user can do next.
    """

    def __init__(
        self,
        problem: str,
        *,
        found: object | None = None,
        expected: object | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.found = found
        self.expected = expected
        self.fix = fix
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [self.problem.rstrip(".") + "."]
        if self.found is not None:
            parts.append(f"Found: {self.found}.")
        if self.expected is not None:
            parts.append(f"Expected: {self.expected}.")
        if self.fix is not None:
            parts.append(f"What to do: {self.fix}")
        return " ".join(parts)

    def __reduce__(self):  # keep errors picklable across processes
        return (_rebuild, (type(self), self.problem, self.found, self.expected, self.fix))


def _rebuild(cls, problem, found, expected, fix):
    return cls(problem, found=found, expected=expected, fix=fix)


class DataError(LexicellError, ValueError):
    """The dataset cannot be used as given (format, values, shape)."""


class MatrixKindError(DataError):
    """The expression matrix holds the wrong kind of values (e.g. scaled instead of counts)."""


class GeneIdentifierError(DataError):
    """Gene identifiers could not be recognised or mapped to the model's gene universe."""


class MissingKeyError(LexicellError, KeyError):
    """A column or key (``obs``, ``obsm``, ``uns``, ``var``) is absent."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0] if self.args else ""


class EmptySelectionError(DataError):
    """A selection, group or subset of cells has no (or too few) members."""


class MissingEmbeddingError(MissingKeyError):
    """``obsm['transcriptome_embeds']`` is absent or was made by another model."""


class QueryError(LexicellError, ValueError):
    """A text query or label list is empty or malformed."""


class CheckpointError(LexicellError, ValueError):
    """A checkpoint folder or file is missing, corrupt or of an unknown format."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint tried to unpickle something outside the allow-list; nothing was executed."""


class ModelMismatchError(LexicellError, ValueError):
    """Two objects that must belong together (model, embeddings, vocabulary) do not."""


class ConfigError(LexicellError, ValueError):
    """A configuration file or argument is invalid."""


class AnalysisError(LexicellError, ValueError):
    """A DE, enrichment or perturbation request cannot be carried out as asked."""


class NetworkUnavailableError(LexicellError, ConnectionError):
    """An online service (e.g. Enrichr) did not answer."""


class CancelledError(LexicellError):
    """Long work was cancelled by the user."""

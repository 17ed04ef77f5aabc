"""Map aggregations shared between sessions: the same cells drawn the same way are aggregated once per process.

Every served page opens on the same map (the dataset's default colouring, the same layout, size and view), and
HoloViews aggregates each new map pane twice, once over the cells' range and once more over the padded range it
then sets on the plot (``docs/serving-performance.md``, 2026-12-03). With ten people opening the page, that
was twenty aggregations of one picture, each paying HoloViews' operation machinery (xarray and element
building: half of drawing a map pane, cProfile of a page build, 2026-12-03).

:class:`SharedRasterize` and :class:`SharedDatashade` are HoloViews' ``rasterize`` and ``datashade`` with a
small process-wide cache in front of their work: the key is the operation, every parameter that shapes its
result (aggregator, colour key, selector, canvas size and ranges, ...) and a hash of the cells' table
(``pandas.util.hash_pandas_object``: positions, values and hover columns, row order included), so only an
identical request is answered from it, with the element the first one computed. Tables above
:data:`MAX_ROWS` cells are not cached (hashing them costs about as much as aggregating), nor results above
:data:`MAX_BYTES` in all (least recently used dropped first).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import datashader as ds
import numpy as np
import pandas as pd
import param
from holoviews.operation.datashader import datashade, rasterize

__all__ = ["SharedDatashade", "SharedRasterize", "clear", "coded_categories", "padded_categories", "stats", "MAX_BYTES",
           "MAX_ROWS"]

#: the most cells a cached aggregation's table may hold
MAX_ROWS = 200_000
#: the most bytes of cached results (images and hover data) kept in all
MAX_BYTES = 32 * 2**20

_lock = threading.Lock()
_results: OrderedDict = OrderedDict()  # key -> (element, nbytes)
_counts = {"hits": 0, "misses": 0, "bytes": 0}

# parameters that decide how or when an operation runs, not what it returns
_NOT_THE_RESULT = {"streams", "dynamic", "link_inputs", "input_ranges", "name"}


def _table_hash(data) -> str | None:
    if not isinstance(data, pd.DataFrame) or len(data) > MAX_ROWS:
        return None
    try:
        rows = pd.util.hash_pandas_object(data, index=True).to_numpy()
    except TypeError:  # a column pandas cannot hash (lists, dicts): not cached
        return None
    digest = hashlib.blake2b(rows.tobytes(), digest_size=16)
    digest.update(repr([(str(c), str(t)) for c, t in data.dtypes.items()]).encode())
    return digest.hexdigest()


def _value(v):
    if isinstance(v, dict):
        return tuple(sorted((str(k), _value(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_value(x) for x in v)
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if callable(v) and not hasattr(v, "column"):  # a colour map function, a hook: identity (never equal by repr)
        return ("id", id(v))
    return repr(v)


def _key(op, element) -> tuple | None:
    table = _table_hash(element.data)
    if table is None:
        return None
    params = tuple(sorted((k, _value(v)) for k, v in op.p.items() if k not in _NOT_THE_RESULT))
    dims = (type(element).__name__, tuple(map(str, element.kdims)), tuple(map(str, element.vdims)))
    return type(op).__name__, dims, params, table


def _nbytes(element) -> int:
    data = element.data
    n = getattr(data, "nbytes", None)
    return int(n) if n is not None else 0


class _Shared:
    def _compute(self, element, key):
        return super()._process(element, key)

    def _process(self, element, key=None):
        k = _key(self, element)
        if k is None:
            return self._compute(element, key)
        with _lock:
            hit = _results.get(k)
            if hit is not None:
                _results.move_to_end(k)
                _counts["hits"] += 1
        if hit is not None:
            # a clone per plot (same arrays): options HoloViews sets on an element it draws stay with that plot
            return hit[0].clone()
        result = self._compute(element, key)
        size = _nbytes(result)
        with _lock:
            _counts["misses"] += 1
            if size <= MAX_BYTES and k not in _results:
                _results[k] = (result.clone(), size)
                _counts["bytes"] += size
                while _counts["bytes"] > MAX_BYTES:
                    _, (_, dropped) = _results.popitem(last=False)
                    _counts["bytes"] -= dropped
        return result


class SharedRasterize(_Shared, rasterize):
    """HoloViews' ``rasterize``, its results shared between identical requests (see the module's text)."""


class SharedDatashade(_Shared, datashade):
    """HoloViews' ``datashade``, its results shared between identical requests (see the module's text).

    Categories are aggregated by position (:func:`coded_categories`), so that a new set of names does not
    compile a new datashader kernel; the colours and the names the hover shows are those of the names.
    """

    def _compute(self, element, key):
        agg, data, color_key = self.p.aggregator, element.data, self.p.color_key
        column = getattr(agg, "column", None)
        if not (isinstance(agg, ds.count_cat) and isinstance(data, pd.DataFrame) and column in data
                and isinstance(data[column].dtype, pd.CategoricalDtype) and isinstance(color_key, dict)):
            return super()._compute(element, key)
        names = [str(c) for c in data[column].cat.categories]
        coded = data.copy(deep=False)
        coded[column] = coded_categories(data[column])
        codes = list(coded[column].cat.categories)
        key_by_code = {code: color_key.get(name, UNUSED_COLOUR) for code, name in zip(codes, names)}
        key_by_code.update({code: UNUSED_COLOUR for code in codes[len(names):]})  # no cell has these
        overrides = self.p
        self.p = param.ParamOverrides(self, {**dict(overrides), "color_key": key_by_code},
                                      allow_extra_keywords=getattr(self, "_allow_extra_keywords", False))
        try:
            result = super()._compute(element.clone(data=coded), key)
        finally:
            self.p = overrides
        hover = getattr(result, "data", None)
        if hover is not None and column in getattr(hover, "data_vars", ()):  # the names under the pointer
            shown = hover[column]
            lookup = dict(zip(codes, names))
            names_shown = pd.Series(shown.values.ravel()).map(lambda v: lookup.get(v, v)).to_numpy(dtype=object)
            hover[column] = (shown.dims, names_shown.reshape(shown.shape))
        return result


#: the colour of padding categories, which no cell has
UNUSED_COLOUR = "#000000"


def padded_categories(n: int) -> int:
    """How many categories :func:`coded_categories` gives a column of ``n``: the next power of two from 8 up
    to 256, then the next multiple of 256 (so that a process compiles datashader's kernels for a few sizes)."""
    if n <= 256:
        return max(8, 1 << max(0, n - 1).bit_length())
    return -(-n // 256) * 256


def coded_categories(values) -> pd.Categorical:
    """``values`` (categorical) with its categories replaced by their positions, ``"0"``, ``"1"``, ...,
    padded with unused ones to :func:`padded_categories`: the same cells in the same categories, under names
    that do not change with the data.

    datashader compiles (numba) an aggregation kernel for every new *schema* of a table, and a categorical
    column's schema holds its category names: each new set of zero-shot labels or obs column cost a compile of
    0.6-2 s of CPU on the server's event loop, stalling every session, and kept the compiled code for the life
    of the process (the served demo, 2026-12-04: 9 of 90 s of server CPU in a 10-session minute).
    """
    cat = pd.Categorical(values)
    return pd.Categorical.from_codes(cat.codes, categories=[str(i) for i in range(padded_categories(len(cat.categories)))])


def stats() -> dict:
    """``{"hits", "misses", "bytes", "entries"}`` of the shared aggregations since the process started (or
    :func:`clear`)."""
    with _lock:
        return dict(_counts, entries=len(_results))


def clear() -> None:
    """Forget every shared aggregation (tests; a process never needs it)."""
    with _lock:
        _results.clear()
        _counts.update(hits=0, misses=0, bytes=0)

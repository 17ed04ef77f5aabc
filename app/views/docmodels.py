"""Keeping a served page cheap to update: Bokeh's model registry recounted only when the model graph changed.

Bokeh keeps, per document, the set of every model reachable from the page's roots. It rebuilds that set by
walking every property of every model (``DocumentModelManager.recompute``): about 40-60 ms for this
dashboard on one core. Bokeh 3.9 does that walk at the end of *every* ``models.freeze()`` block, whether or
not anything inside changed which models are reachable; HoloViews wraps each plot update in such a block and
Panel each update of a property that holds models. On a lab server with ten sessions on two cores those
walks were most of a query's server time (measured with ``bench/bench_load.py`` and py-spy, 2026-12-02).

:func:`lazy_recount` makes one document skip the walk when nothing inside the block could have changed the
graph. Bokeh reports every such change through ``models.invalidate()`` (called whenever a property whose old
or new value refers to models is set) and adds or removes roots only inside a freeze; a block that saw
neither leaves the set as it was, so skipping its walk gives the same registry. Outside any freeze,
``invalidate`` still walks at once, as Bokeh does.
"""
from __future__ import annotations

import weakref

__all__ = ["lazy_recount"]

_MARK = "_lexicell_lazy_recount"


def lazy_recount(doc) -> bool:
    """Make ``doc``'s model registry recount only after blocks that changed the model graph.

    Parameters
    ----------
    doc : bokeh.document.Document
        A served session's document (notebooks and plain Python need nothing).

    Returns
    -------
    bool
        True when installed now, False when ``doc`` already had it or is not a Bokeh document.
    """
    models = getattr(doc, "models", None)
    if models is None or not hasattr(models, "_push_freeze") or getattr(models, _MARK, False):
        return False
    ref = weakref.ref(doc)
    dirty = [False]
    roots_at_freeze: list = [()]

    def invalidate() -> None:
        if models._freeze_count == 0:
            models.recompute()
        else:
            dirty[0] = True

    def root_ids():
        d = ref()
        try:
            return tuple(map(id, d.roots)) if d is not None else None
        except AttributeError:  # a destroyed document (its session ended) has no roots left
            return None

    def push_freeze() -> None:
        if models._freeze_count == 0:
            dirty[0] = False
            roots_at_freeze[0] = root_ids()
        models._freeze_count += 1

    def pop_freeze() -> None:
        models._freeze_count -= 1
        if models._freeze_count == 0:
            roots = root_ids()
            if roots is None:  # nothing to recount on a destroyed document
                dirty[0] = False
                return
            if dirty[0] or roots != roots_at_freeze[0]:
                dirty[0] = False
                models.recompute()

    # instance attributes shadow the class's methods for this one document only
    models.invalidate, models._push_freeze, models._pop_freeze = invalidate, push_freeze, pop_freeze
    setattr(models, _MARK, True)
    return True


"""One websocket message per server callback: the document changes a callback makes, sent to a page together.

Bokeh's server sends one ``PATCH-DOC`` message for every property a callback changes. A page applies each
message in a JavaScript task of its own and lays out and paints the page after most of them: a query in the
served app sent its page eight messages (history menu, timing line, image with colour bar, colour note, side
histogram, its note, ...) and the page drew nine frames for it (Chrome trace, 2026-12-03).

:func:`combine_patch_messages` changes that inside Bokeh's own write path: while a session holds its document
lock (every browser message and every scheduled callback runs under it), the document holds its changes
(Panel, which otherwise writes each widget's or pane's updates to the socket itself, then leaves them with the
hold); when the callback ends they are dispatched, and one ``PATCH-DOC`` per page holding all of them, in the
order they were made, is written where Bokeh writes its messages anyway (after the callback; Bokeh writes
nothing before it ends either). Bokeh's protocol allows several events per ``PATCH-DOC``; BokehJS applies them
in one task.

Panel's ``unlocked()``, which also sends many changes as one message, writes to the socket itself, beside
Bokeh's writes; tried for the same purpose on 2026-12-03, it lost a page's first query updates under load.
This path takes no socket or lock of its own.
"""
from __future__ import annotations

import inspect
import logging

__all__ = ["combine_patch_messages"]

log = logging.getLogger(__name__)


class _PatchBatch:
    """The changes for one connection made under one hold of a session's document lock.

    Awaited (by Bokeh, after the callback, with its other pending writes) it sends them as one ``PATCH-DOC``.
    Bokeh made each change's message when the change was made; this one is made when the callback ends, so a
    property set twice is encoded with its last value both times (the page ends in the same state).
    """

    __slots__ = ("connection", "events")

    def __init__(self, connection, event) -> None:
        self.connection = connection
        self.events = [event]

    def __await__(self):
        return self._send().__await__()

    async def _send(self) -> None:
        msg = self.connection.protocol.create("PATCH-DOC", self.events)
        await self.connection._socket.send_message(msg)


def _document_patched(self, event) -> None:
    """``ServerSession._document_patched`` that adds each change to the connection's batch of this lock hold.

    Bokeh 3.9's own sends one message per change (``connection.send_patch_document(event)``); the check and
    the skipping of the page a change came from are Bokeh's.
    """
    may_suppress = event.setter is self
    pending = self._pending_writes
    if pending is None:
        raise RuntimeError("_pending_writes should be non-None when we have a document lock, and we should "
                           "have the lock when the document changes")
    for connection in self._subscribed_connections:
        if may_suppress and connection is self._current_patch_connection:
            continue
        # one batch per connection and lock hold (Bokeh 3.9 queues nothing else there; the order between
        # connections never mattered, each page reads its own socket)
        batch = next((p for p in pending if isinstance(p, _PatchBatch) and p.connection is connection), None)
        if batch is None:
            pending.append(_PatchBatch(connection, event))
        else:
            batch.events.append(event)


async def _held(self, func, *args, **kwargs):
    """The body of ``ServerSession.with_document_locked`` (run under the document lock, as Bokeh's is): the
    callback runs with the document's changes held, and they are let go together at its end.

    Panel sends the changes of each pane or widget it updates from a callback as a message of its own, unless
    the document holds its changes; then Panel leaves them with the hold, and Bokeh dispatches them when the
    hold ends, to :func:`_document_patched`. Nested holds (Panel's ``hold()``) keep the outer one.
    """
    doc = self.document
    ours = doc.callbacks.hold_value is None
    if ours:
        doc.hold("combine")
    try:
        result = func(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result
    finally:
        if ours:
            doc.unhold()


def _handle_patch(self, message, connection):
    """``ServerSession._handle_patch`` (a page's changes and events, under the document lock) with the changes
    that the page's message sets off held, as :func:`_held` does for callbacks.

    Panel runs a page event's callbacks (a button click, Enter in a text box) right here, while Bokeh applies
    the page's message. The hold ends before the page's connection is forgotten, so that the page's own
    changes are still not echoed back to it (Bokeh 3.9's body, otherwise).
    """
    self._current_patch_connection = connection
    doc = self.document
    ours = doc.callbacks.hold_value is None
    if ours:
        doc.hold("combine")
    try:
        message.apply_to_document(doc, self)
    finally:
        try:
            if ours:
                doc.unhold()
        finally:
            self._current_patch_connection = None
    return connection.ok(message)


def combine_patch_messages() -> bool:
    """Have the Bokeh server send a page one ``PATCH-DOC`` per callback instead of one per change.

    Callbacks scheduled on a session (``pn.state.execute``, periodic callbacks, a ``Job``'s result) and the
    messages a page sends (Panel runs a widget's callbacks while Bokeh applies them) run with the document's
    changes held (``Document.hold("combine")``: a property set twice is sent once, with
    its last value); at the callback's end they go, in order, into one message per page, written where and when
    Bokeh writes its own. Callbacks that run without the lock (``nolock``, Panel's async callbacks) and Panel's
    updates from other threads keep their own path. Installed once per process (served mode); a Bokeh whose
    server session lacks what this relies on is left as it is.

    Returns
    -------
    bool
        True when installed now or before, False when this Bokeh's server is not one this knows.

    Notes
    -----
    Measured on the demo with a served page (2026-12-03): see ``docs/serving-performance.md``.
    """
    from bokeh.server import session as bk_session

    cls = bk_session.ServerSession
    current = getattr(cls, "_document_patched", None)
    if current is not None and getattr(current, "_lexicell", False):
        return True
    wrap = getattr(bk_session, "_needs_document_lock", None)
    locked = getattr(cls, "with_document_locked", None)
    patch = getattr(cls, "_handle_patch", None)
    if current is None or wrap is None or locked is None or patch is None \
            or "_pending_writes" not in getattr(cls, "__annotations__", {}):
        log.info("Bokeh's server session is not the one Lexicell knows; one message per change is kept")
        return False
    with_document_locked = wrap(_held)
    with_document_locked.__doc__ = locked.__doc__
    cls.with_document_locked = with_document_locked
    handle_patch = wrap(_handle_patch)
    handle_patch.__doc__ = patch.__doc__
    cls._handle_patch = handle_patch
    _document_patched._lexicell = True
    cls._document_patched = _document_patched
    return True

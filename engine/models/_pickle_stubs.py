"""Inert stand-ins for the classes a pickle names but Lexicell must not import (see :mod:`engine.models.safe_pickle`)."""
from __future__ import annotations

import re
from typing import Any

import numpy as np


__all__ = ["PickledObjectStub", "PickledDictStub", "default_stub_policy", "to_plain"]


# --------------------------------------------------------------------------- stubs
class PickledObjectStub:
    """Inert stand-in for an object of a class that is not (and need not be) importable.

    The unpickler creates one subclass per pickled class name (``__module__``/``__qualname__`` copied from the
    pickle). Instances only keep what the pickle gives them: constructor arguments in ``_stub_args``, the
    state in ``__dict__`` (or ``_stub_state`` when it is not a dict), and items/appends in ``_stub_items`` /
    ``_stub_list``. They have no other behaviour.
    """

    _stub_path = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        if args or kwargs:
            obj.__dict__["_stub_args"] = args
            if kwargs:
                obj.__dict__["_stub_kwargs"] = kwargs
        return obj

    def __init__(self, *args, **kwargs) -> None:  # called by REDUCE; arguments already kept by __new__
        pass

    def __setstate__(self, state) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
        if isinstance(state, dict):
            for k, v in state.items():
                self.__dict__[str(k)] = v
        elif state is not None:
            self.__dict__["_stub_state"] = state
        if isinstance(slots, dict):
            for k, v in slots.items():
                self.__dict__[str(k)] = v

    def __setitem__(self, key, value) -> None:
        self.__dict__.setdefault("_stub_items", {})[key] = value

    def append(self, value) -> None:
        self.__dict__.setdefault("_stub_list", []).append(value)

    def extend(self, values) -> None:
        for v in values:
            self.append(v)

    def __repr__(self) -> str:
        keys = [k for k in self.__dict__ if not k.startswith("_stub")]
        return f"<stub of {self._stub_path} with {len(keys)} attributes>"


class PickledDictStub(dict, PickledObjectStub):
    """Stub for dict subclasses (Lightning's ``AttributeDict``): behaves as a plain dict."""

    def __new__(cls, *args, **kwargs):
        return dict.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        dict.__init__(self, *args, **kwargs)

    __setitem__ = dict.__setitem__

    def __repr__(self) -> str:
        return f"<stub of {self._stub_path} {dict.__repr__(self)}>"


_DICT_STUBS = {
    ("pytorch_lightning.utilities.parsing", "AttributeDict"),
    ("lightning.pytorch.utilities.parsing", "AttributeDict"),
    ("lightning_fabric.utilities.data", "AttributeDict"),
    ("lightning.fabric.utilities.data", "AttributeDict"),
}
_OTHER_STUBS = {
    ("argparse", "Namespace"),
    ("jsonargparse", "Namespace"),
    ("jsonargparse._namespace", "Namespace"),
    ("jsonargparse.namespace", "Namespace"),
}
_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9_]*(\.[A-Z][A-Za-z0-9_]*)*$")


def default_stub_policy(module: str, name: str) -> bool:
    """True for the pickled classes that become inert stubs.

    Class-like names (``CamelCase``) of ``cellwhisperer.*`` (CellWhisperer's config objects), ``transformers.*``
    names ending in ``Config`` (Hugging Face configs embedded in them) and a few argument containers.
    Functions and lower-case names are never stubbed.
    """
    if (module, name) in _DICT_STUBS or (module, name) in _OTHER_STUBS:
        return True
    if not _CLASS_NAME.match(name):
        return False
    if module == "cellwhisperer" or module.startswith("cellwhisperer."):
        return True
    if module.startswith("transformers.") and name.split(".")[-1].endswith("Config"):
        return True
    return False


def to_plain(obj: Any, *, depth: int = 6, max_items: int = 200) -> Any:
    """JSON-friendly view of unpickled objects (stubs become dicts with ``__class__``; tensors become shapes)."""
    if depth < 0:
        return "..."
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, PickledDictStub):
        return {"__class__": obj._stub_path, **{str(k): to_plain(v, depth=depth - 1) for k, v in list(obj.items())[:max_items]}}
    if isinstance(obj, PickledObjectStub):
        out = {"__class__": obj._stub_path}
        for k, v in list(obj.__dict__.items())[:max_items]:
            out[str(k)] = to_plain(v, depth=depth - 1)
        return out
    if isinstance(obj, dict):
        return {str(k): to_plain(v, depth=depth - 1) for k, v in list(obj.items())[:max_items]}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_plain(v, depth=depth - 1) for v in list(obj)[:max_items]]
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.item() if obj.numel() == 1 else f"tensor{tuple(obj.shape)}"
        if isinstance(obj, (torch.dtype, torch.device)):
            return str(obj)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, np.ndarray):
        return f"array{obj.shape}"
    return repr(obj)[:200]

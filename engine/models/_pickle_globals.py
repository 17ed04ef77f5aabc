"""The allow-list of :mod:`engine.models.safe_pickle`: guarded stand-ins for the callables a pickle may name.

numpy scalar and array reconstruction, ``OrderedDict``, ``copyreg._reconstructor`` of stubs only, and torch's
tensor, parameter and storage rebuild functions, each checking its arguments before anything is built.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import UnsafeCheckpointError
from ._pickle_stubs import PickledObjectStub


_FIX = "only open files from sources you trust; Lexicell never executes code from a checkpoint"


# --------------------------------------------------------------------------- guarded callables
def _refuse(what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        "The pickle tried to use something outside Lexicell's allow-list; nothing was executed",
        found=what,
        expected="plain data, tensors and known configuration objects",
        fix=_FIX,
    )


try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.multiarray import scalar as _np_scalar

_NP_KINDS = set("biufcSUmM")


def _safe_np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise _refuse(f"numpy.dtype({type(spec).__name__})")
    return np.dtype(spec, align=bool(align), copy=bool(copy))


def _safe_np_scalar(dtype, *args):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.kind not in _NP_KINDS:
        raise _refuse(f"numpy scalar of dtype {dtype!r}")
    if args and not isinstance(args[0], (bytes, bytearray)):
        raise _refuse("numpy scalar built from non-bytes data")
    return _np_scalar(dtype, *args)


def _safe_np_reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise _refuse(f"numpy array subtype {subtype!r}")
    return _np_reconstruct(np.ndarray, shape, dtype_code)


def _safe_np_frombuffer(buf, dtype, shape, order="C"):
    """numpy's protocol-5 array reconstruction, for non-object dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise _refuse(f"numpy array from buffer with dtype {dtype!r}")
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(shape), order="F" if order == "F" else "C")


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    if not isinstance(obj, str) or str(encoding).lower().replace("-", "") not in ("latin1", "utf8", "ascii"):
        raise _refuse(f"_codecs.encode with encoding {encoding!r}")
    return obj.encode(encoding, errors)


def _safe_reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocol 0/1 objects): only stubs and plain containers."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObjectStub)):
        raise _refuse(f"copyreg._reconstructor of {cls!r}")
    if base is object:
        return cls.__new__(cls)
    if base in (dict, list):
        obj = cls.__new__(cls)
        if state is not None and isinstance(obj, dict):
            obj.update(state)
        return obj
    raise _refuse(f"copyreg._reconstructor with base {base!r}")


def _ordered_dict(*args):
    return OrderedDict(*args)


_METADATA_SCALARS = (bool, int, float, str, type(None))


def _state_dict_metadata(state) -> OrderedDict:
    """Validate the one ``BUILD`` a ``torch.nn.Module.state_dict()`` needs and return a fresh copy of its metadata.

    ``state_dict()`` returns an ``OrderedDict`` carrying a ``_metadata`` attribute: an ``OrderedDict`` of
    module prefix (``str``) to a small dict such as ``{"version": 2}``. Pickled, that attribute is a ``BUILD`` on
    the ``OrderedDict`` with the state ``{"_metadata": ...}``. Only exactly that is accepted: a dict whose only
    key is ``"_metadata"``, holding a mapping of ``str`` to dicts of ``str`` to plain scalars (``int``, ``float``,
    ``str``, ``bool``, ``None``). The copy is built from new containers, so nothing the pickle can still reach
    through its memo is attached to the loaded object.

    Raises
    ------
    UnsafeCheckpointError
        For any other state (other attribute names such as ``__class__``, a ``(state, slots)`` pair, non-plain
        values); nothing is set.
    """
    what = "setting the state of a collections.OrderedDict object"
    if type(state) is not dict or list(state) != ["_metadata"]:
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise _refuse(f"{what} with {keys!r} (only a state dict's '_metadata' is accepted)")
    meta = state["_metadata"]
    if type(meta) not in (dict, OrderedDict):
        raise _refuse(f"{what}: '_metadata' is a {type(meta).__name__}, not a dict")
    out: OrderedDict = OrderedDict()
    for prefix, local in meta.items():
        if type(prefix) is not str or type(local) is not dict:
            raise _refuse(f"{what}: '_metadata' entry {str(prefix)[:60]!r} is not a dict of a module prefix")
        for k, v in local.items():
            if type(k) is not str or type(v) not in _METADATA_SCALARS:
                raise _refuse(f"{what}: '_metadata'[{prefix[:60]!r}] holds {type(v).__name__} under {str(k)[:40]!r}")
        out[prefix] = dict(local)
    return out


class _StorageType:
    """What a pickled ``torch.FloatStorage`` (etc.) resolves to: just its dtype."""

    def __init__(self, name: str, dtype) -> None:
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


_TORCH_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
_TORCH_DTYPES = [
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "double", "float", "half", "long", "int", "short", "cfloat", "cdouble",
]


def _torch_globals() -> dict:
    import torch
    from torch import _utils as tu

    def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        if not isinstance(storage, torch.storage.TypedStorage):
            raise _refuse(f"tensor rebuilt from {type(storage).__name__}")
        if backward_hooks:
            raise _refuse("tensor with pickled backward hooks")
        if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, bool) for v in metadata.values())):
            raise _refuse("tensor with non-boolean metadata")
        return tu._rebuild_tensor_v2(storage, int(storage_offset), tuple(size), tuple(stride), bool(requires_grad), OrderedDict(), metadata)

    def rebuild_parameter(data, requires_grad, backward_hooks):
        if not isinstance(data, torch.Tensor) or backward_hooks:
            raise _refuse("parameter with hooks or without tensor data")
        return torch.nn.Parameter(data, bool(requires_grad))

    def rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
        if state:
            raise _refuse("parameter with pickled attributes")
        return rebuild_parameter(data, requires_grad, backward_hooks)

    def rebuild_from_type_v2(func, new_type, args, state):
        if func is not rebuild_tensor_v2 or new_type not in (torch.Tensor, torch.nn.Parameter) or state:
            raise _refuse(f"torch._tensor._rebuild_from_type_v2 with {getattr(func, '__name__', func)!r}, {new_type!r}")
        t = func(*args)
        return t if new_type is torch.Tensor else torch.nn.Parameter(t)

    g: dict = {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): rebuild_from_type_v2,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch", "device"): torch.device,
        ("torch", "Size"): torch.Size,
    }
    for name, dt in _TORCH_STORAGES.items():
        g[("torch", name)] = _StorageType(name, getattr(torch, dt))
    for name in _TORCH_DTYPES:
        if isinstance(getattr(torch, name, None), torch.dtype):
            g[("torch", name)] = getattr(torch, name)
    return g


_BASIC_GLOBALS: dict = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "complex"): complex,
    ("builtins", "str"): str,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "bool"): bool,
    ("builtins", "slice"): slice,
    ("builtins", "object"): object,
    ("collections", "OrderedDict"): _ordered_dict,
    ("_codecs", "encode"): _safe_codecs_encode,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("numpy", "dtype"): _safe_np_dtype,
    ("numpy.core.multiarray", "scalar"): _safe_np_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _safe_np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_np_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _safe_np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_np_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("pathlib", "PosixPath"): Path,
    ("pathlib", "WindowsPath"): Path,
    ("pathlib", "Path"): Path,
    ("pathlib._local", "PosixPath"): Path,
    ("pathlib._local", "WindowsPath"): Path,
    ("pathlib._local", "Path"): Path,
}

"""Restricted unpickling: the only way Lexicell reads pickles.

Two kinds of pickled files reach the engine:

* Geneformer's gene dictionaries (``token_dictionary*.pkl``, ``gene_median_dictionary*.pkl``,
  ``gene_name_id_dict*.pkl``, ``ensembl_mapping_dict*.pkl``): plain dicts of ``str`` to ``int``/``float``
  (sometimes numpy scalars). :func:`load_pickle` reads them.
* PyTorch-Lightning checkpoints (CellWhisperer's ``cellwhisperer_clip_v1.ckpt``): a torch zip file whose
  ``data.pkl`` holds tensors *and* pickled hyper-parameter objects (``TranscriptomeTextDualEncoderConfig``,
  ``LossConfig``) of a package the user does not have. :func:`load_checkpoint` first tries
  ``torch.load(weights_only=True)``; when that refuses the hyper-parameter objects it falls back to
  :func:`load_torch_zip`, which rebuilds those objects as inert :class:`PickledObjectStub` instances.

Both run the pure-Python unpickler with

* an **allow-list** of globals (``find_class``): containers and scalars, numpy scalar/array reconstruction,
  torch tensor rebuild functions, storage types and dtypes, guarded where arguments matter;
* **stubs** for class-like names of ``cellwhisperer.*``, ``transformers.*Config`` and a few Lightning /
  argparse containers: they only store the state they are given and have no behaviour;
* a guarded ``BUILD`` opcode that sets state only on stub instances, numpy objects and, for the
  ``_metadata`` attribute of a ``torch.nn.Module.state_dict()``, on ``OrderedDict`` instances (never on
  classes, so a pickle cannot monkeypatch a class), and a ``persistent_load`` that only accepts torch storage
  records.

A Lightning checkpoint needs nothing else: its ``state_dict`` is that ``OrderedDict``; optimizer states
(``torch.optim`` ``state_dict()``), LR scheduler states, callback states (e.g. ``ModelCheckpoint``: strings,
floats, tensors, paths) and loop states are plain dicts, lists, tuples, scalars and tensors.

Anything else raises :class:`~engine.errors.UnsafeCheckpointError` naming the refused global *before* it is
called, so nothing in a crafted file runs.
"""
from __future__ import annotations

import _compat_pickle
import io
import logging
import mmap
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "PickledObjectStub",
    "RestrictedUnpickler",
    "load_pickle",
    "loads_pickle",
    "load_torch_zip",
    "load_checkpoint",
    "to_plain",
]

log = logging.getLogger(__name__)

_FIX = "only open files from sources you trust; Lexicell never executes code from a checkpoint"


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


# --------------------------------------------------------------------------- the unpickler
class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler, so BUILD can be guarded
    """Unpickler that resolves globals only through an allow-list.

    Parameters
    ----------
    file
        Binary file object positioned at the pickle.
    allowed
        Extra ``{(module, name): object}`` entries merged into the basic allow-list.
    stub_policy
        ``(module, name) -> bool``; names it accepts become :class:`PickledObjectStub` subclasses. ``None``
        stubs nothing (plain data files).
    persistent_load
        Callable for persistent ids (torch storages); ``None`` refuses every persistent id.

    Raises
    ------
    UnsafeCheckpointError
        From :meth:`load` when the pickle names a global outside the allow-list, builds state on anything but
        a stub, a numpy object or a state dict's ``OrderedDict`` (``_metadata`` only, see
        :func:`_state_dict_metadata`), or uses an unexpected persistent id.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(
        self,
        file,
        *,
        allowed: Mapping[tuple[str, str], Any] | None = None,
        stub_policy: Callable[[str, str], bool] | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(file, fix_imports=False, encoding="ASCII")
        self._allowed = {**_BASIC_GLOBALS, **(allowed or {})}
        self._stub_policy = stub_policy
        self._stubs: dict[tuple[str, str], type] = {}
        self._persistent = persistent_load

    def find_class(self, module: str, name: str):
        orig = f"{module}.{name}"
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (torch pickles with protocol 2)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        if self._stub_policy is not None and self._stub_policy(module, name):
            if key not in self._stubs:
                base = PickledDictStub if key in _DICT_STUBS else PickledObjectStub
                leaf = name.split(".")[-1]
                self._stubs[key] = type(leaf, (base,), {"__module__": module, "__qualname__": name, "_stub_path": f"{module}.{name}"})
            return self._stubs[key]
        raise _refuse(f"global {orig!r}")

    def persistent_load(self, pid):
        if self._persistent is None:
            raise _refuse(f"persistent id {str(pid)[:80]!r}")
        return self._persistent(pid)

    def load_build(self):
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if isinstance(inst, PickledObjectStub) and not isinstance(inst, type):
            PickledObjectStub.__setstate__(inst, state)
            return
        if isinstance(inst, (np.dtype, np.ndarray)) and not isinstance(inst, type):
            type(inst).__setstate__(inst, state)
            return
        if type(inst) is OrderedDict:
            inst._metadata = _state_dict_metadata(state)
            return
        raise _refuse(f"setting the state of a {type(inst).__module__}.{type(inst).__qualname__} object")

    dispatch[pickle.BUILD[0]] = load_build

    def load(self):
        try:
            return super().load()
        except (UnsafeCheckpointError, CheckpointError):
            raise
        except RecursionError as err:
            raise CheckpointError("The pickle is nested too deeply", found=str(err)) from err
        except Exception as err:  # noqa: BLE001 - anything else is a malformed file
            raise CheckpointError(
                "The pickle is malformed or uses an unsupported construct",
                found=f"{type(err).__name__}: {err}",
                expected="a pickle of plain data, tensors and configuration objects",
            ) from err


def loads_pickle(data: bytes, *, stubs: bool = False) -> Any:
    """Unpickle ``data`` with the allow-list (see :func:`load_pickle`)."""
    up = RestrictedUnpickler(io.BytesIO(data), stub_policy=default_stub_policy if stubs else None)
    return up.load()


def load_pickle(path: str | os.PathLike, *, stubs: bool = False) -> Any:
    """Read a small pickle file (e.g. a Geneformer gene dictionary) through the allow-list.

    Parameters
    ----------
    path
        The ``.pkl`` file.
    stubs
        Also turn known configuration classes into :class:`PickledObjectStub` (off for data files).

    Returns
    -------
    object
        The unpickled object (for Geneformer dictionaries a ``dict`` of ``str`` to ``int``/``float``).

    Raises
    ------
    UnsafeCheckpointError
        If the pickle names anything outside the allow-list (nothing is executed).
    CheckpointError
        If the file is missing or malformed.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError("Cannot read the pickle file", found=f"{path}: {err}", expected="a readable file") from err
    return loads_pickle(data, stubs=stubs)


# --------------------------------------------------------------------------- torch zip checkpoints
class _ZipStorageReader:
    """Zero-copy (memory-mapped, copy-on-write) access to the records of a torch zip checkpoint."""

    def __init__(self, path: Path) -> None:
        import torch

        self._torch = torch
        self.path = path
        self.zf = zipfile.ZipFile(path)
        names = self.zf.namelist()
        pkls = sorted((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), key=lambda n: n.count("/"))
        if not pkls:
            raise CheckpointError(
                "The file is a zip archive but not a PyTorch checkpoint", found=f"{path}: no data.pkl", expected="a torch.save() file"
            )
        self.prefix = pkls[0][: -len("data.pkl")]
        bo = self.prefix + "byteorder"
        if bo in names and self.zf.read(bo).strip() not in (b"little", b""):
            raise CheckpointError("Big-endian checkpoints are not supported", found=str(path), expected="byteorder 'little'")
        self._fh = open(path, "rb")
        try:
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except (ValueError, OSError):  # pragma: no cover - e.g. special files
            self._mm = None
        self._cache: dict[str, Any] = {}

    def data_pkl(self) -> bytes:
        return self.zf.read(self.prefix + "data.pkl")

    def _record(self, key: str):
        torch = self._torch
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError as err:
            raise CheckpointError("The checkpoint lacks a tensor record", found=name, expected="a complete torch.save() file") from err
        if info.file_size == 0:
            return torch.empty(0, dtype=torch.uint8)
        if self._mm is not None and info.compress_type == zipfile.ZIP_STORED:
            self._fh.seek(info.header_offset)
            header = self._fh.read(30)
            if header[:4] == b"PK\x03\x04":
                n, m = struct.unpack("<HH", header[26:30])
                offset = info.header_offset + 30 + n + m
                if offset + info.file_size <= len(self._mm):
                    return torch.frombuffer(self._mm, dtype=torch.uint8, count=info.file_size, offset=offset)
        return torch.frombuffer(bytearray(self.zf.read(name)), dtype=torch.uint8)

    def persistent_load(self, pid):
        torch = self._torch
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise _refuse(f"persistent id {str(pid)[:80]!r}")
        stype, key, numel = pid[1], pid[2], pid[4]  # pid[3] is the saved device: always loaded on the CPU
        if not isinstance(stype, _StorageType):
            raise _refuse(f"storage of type {stype!r}")
        key = str(key)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key) or ".." in key:
            raise _refuse(f"storage record name {key!r}")
        if key not in self._cache:
            raw = self._record(key)
            nbytes = int(numel) * torch.empty((), dtype=stype.dtype).element_size()
            if stype.name != "UntypedStorage" and raw.numel() < nbytes:
                raise CheckpointError("A tensor record is truncated", found=f"{key}: {raw.numel()} bytes", expected=f"{nbytes} bytes")
            self._cache[key] = torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=stype.dtype, _internal=True)
        return self._cache[key]

    def close(self) -> None:
        self.zf.close()
        self._fh.close()  # the mmap stays alive as long as tensors use it


def load_torch_zip(path: str | os.PathLike, *, stub_policy: Callable[[str, str], bool] | None = default_stub_policy) -> Any:
    """Load a torch zip checkpoint (``torch.save`` format) with the restricted unpickler.

    Tensors come back on the CPU, backed by a copy-on-write memory map of the file (records that are never
    touched, e.g. optimizer states, are never read). Classes accepted by ``stub_policy`` (default: CellWhisperer
    and Hugging Face configs, Lightning ``AttributeDict``) become inert :class:`PickledObjectStub` objects.

    Raises
    ------
    UnsafeCheckpointError
        If the pickle names a global outside the allow-list; nothing is executed.
    CheckpointError
        If the file is not a torch zip checkpoint or is corrupt.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            "Only zip-format PyTorch checkpoints can be read with pickled objects",
            found=f"{path} (legacy or unknown format)",
            expected="a checkpoint written by torch >= 1.6 (a zip file)",
            fix="re-save it with torch.save(obj, path) from a trusted environment",
        )
    try:
        reader = _ZipStorageReader(path)
    except zipfile.BadZipFile as err:
        raise CheckpointError("The checkpoint zip is corrupt", found=f"{path}: {err}", expected="a torch.save() file") from err
    try:
        up = RestrictedUnpickler(
            io.BytesIO(reader.data_pkl()), allowed=_torch_globals(), stub_policy=stub_policy, persistent_load=reader.persistent_load
        )
        return up.load()
    finally:
        reader.close()


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, str]:
    """Read a PyTorch / Lightning checkpoint without ever running pickled code.

    First ``torch.load(path, map_location="cpu", weights_only=True)``; if torch refuses a global (pickled
    hyper-parameter objects), :func:`load_torch_zip` with stubs.

    Returns
    -------
    tuple
        ``(object, method)`` where ``method`` is ``"weights_only"`` or ``"restricted"``.

    Raises
    ------
    UnsafeCheckpointError
        If the file needs anything outside both allow-lists.
    CheckpointError
        If the file is missing, corrupt or not a torch checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("The checkpoint file does not exist", found=str(path), expected="a .ckpt / .pt file")
    is_zip = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip), "weights_only"
    except pickle.UnpicklingError as err:
        log.info("torch.load(weights_only=True) refused %s (%s); using the restricted unpickler", path, str(err).splitlines()[0][:200])
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if is_zip:  # mmap or format trouble: try our reader, which reports clearly
            log.info("torch.load failed on %s (%s); using the restricted unpickler", path, err)
        else:
            raise CheckpointError(
                "Cannot read the checkpoint", found=f"{path}: {type(err).__name__}: {err}", expected="a torch.save() file"
            ) from err
    return load_torch_zip(path), "restricted"

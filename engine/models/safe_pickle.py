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
from ._pickle_globals import _BASIC_GLOBALS, _StorageType, _refuse, _state_dict_metadata, _torch_globals
from ._pickle_stubs import _DICT_STUBS, PickledDictStub, PickledObjectStub, default_stub_policy, to_plain

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

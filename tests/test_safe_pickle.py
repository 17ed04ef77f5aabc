"""engine.models.safe_pickle: allow-listed unpickling of dictionaries and torch zip checkpoints; nothing ever runs."""
from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import CheckpointError, UnsafeCheckpointError
from engine.models.safe_pickle import PickledObjectStub, load_checkpoint, load_pickle, load_torch_zip, loads_pickle, to_plain


class Evil:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_dictionaries_load(protocol, tmp_path):
    d = {"ENSG00000167286": np.float64(2.5), "ENSG00000156738": np.float32(0.5), "ENSG00000090382": 3.0,
         "<pad>": 0, "n": np.int64(7), "arr": np.arange(4.0), "s": {1, 2}, "t": (1, "a"), "b": b"xy"}
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(d, protocol=protocol))
    got = load_pickle(path)
    assert got.keys() == d.keys()
    assert got["ENSG00000167286"] == 2.5 and isinstance(got["ENSG00000156738"], np.float32)
    np.testing.assert_array_equal(got["arr"], d["arr"])
    assert got["s"] == {1, 2} and got["t"] == (1, "a") and got["b"] == b"xy"


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_code_execution_is_refused(protocol, tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ENSG1": 1.0, "x": Evil(target)}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|nt\.system") as exc:
        load_pickle(path)
    assert "nothing was executed" in str(exc.value)
    assert not target.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(V__import__('os').system('touch PWNED')\ntR.",  # eval
        b"\x80\x02c__builtin__\ngetattr\n.",  # getattr
        b"\x80\x02csubprocess\nPopen\n.",
        b"\x80\x02cbuiltins\nset.mro\n)R.",  # dotted attribute of an allowed class
        b"\x80\x02c__builtin__\nset\n}X\x03\x00\x00\x00fooK\x01sb.",  # BUILD on a class (monkeypatching)
        b"\x80\x02ccellwhisperer.utils\nrun_shell\n.",  # lower-case (function) name of a stubbed package
    ],
)
def test_crafted_opcodes_are_refused(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        loads_pickle(payload, stubs=True)
    assert not (tmp_path / "PWNED").exists()


def test_persistent_ids_need_a_storage_reader():
    with pytest.raises(UnsafeCheckpointError, match="persistent id"):
        loads_pickle(b"\x80\x02X\x01\x00\x00\x00xQ.")


def test_malformed_pickle_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        loads_pickle(b"\x80\x02}q\x00(X\x01\x00")
    with pytest.raises(CheckpointError, match="Cannot read"):
        load_pickle(tmp_path / "absent.pkl")


def _register_fake(monkeypatch):
    mod = types.ModuleType("cellwhisperer.jointemb.config")

    @dataclasses.dataclass
    class LossConfig:
        weight: float = 1.0

    class TranscriptomeTextDualEncoderConfig:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    for cls in (LossConfig, TranscriptomeTextDualEncoderConfig):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    for name in ("cellwhisperer", "cellwhisperer.jointemb"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return TranscriptomeTextDualEncoderConfig, LossConfig


def _unregister_fake(monkeypatch):
    for name in ("cellwhisperer", "cellwhisperer.jointemb", "cellwhisperer.jointemb.config"):
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_config_objects_become_inert_stubs(protocol, monkeypatch):
    Cfg, Loss = _register_fake(monkeypatch)
    blob = pickle.dumps({"model_config": Cfg(projection_dim=2048, nested=Loss(0.5)), "loss_config": Loss()}, protocol=protocol)
    _unregister_fake(monkeypatch)
    with pytest.raises(UnsafeCheckpointError, match="TranscriptomeTextDualEncoderConfig"):
        loads_pickle(blob)  # data files: no stubs at all
    got = loads_pickle(blob, stubs=True)
    mc = got["model_config"]
    assert isinstance(mc, PickledObjectStub) and type(mc).__module__ == "cellwhisperer.jointemb.config"
    assert mc.projection_dim == 2048 and mc.nested.weight == 0.5
    assert "cellwhisperer.jointemb.config" not in sys.modules  # nothing was imported
    assert to_plain(got)["loss_config"] == {"__class__": "cellwhisperer.jointemb.config.LossConfig", "weight": 1.0}


def test_torch_zip_round_trip_matches_torch_load(tmp_path):
    a = torch.randn(4, 3)
    sd = OrderedDict(a=a, view=a[1:, :2], half=torch.randn(3).half(), bf=torch.randn(2).bfloat16(), i=torch.arange(5),
                     empty=torch.zeros(0), p=torch.nn.Parameter(torch.ones(2)))
    obj = {"state_dict": sd, "dtype": torch.float32, "device": torch.device("cpu"), "lr": 1e-5, "betas": (0.9, 0.98)}
    path = tmp_path / "x.ckpt"
    torch.save(obj, path)
    ref = torch.load(path, weights_only=True)
    got = load_torch_zip(path)
    for k, v in ref["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v) and got["state_dict"][k].dtype == v.dtype
    assert got["state_dict"]["view"].untyped_storage().data_ptr() == got["state_dict"]["a"].untyped_storage().data_ptr()
    assert isinstance(got["state_dict"]["p"], torch.nn.Parameter)
    assert got["dtype"] is torch.float32 and got["device"] == torch.device("cpu") and got["betas"] == (0.9, 0.98)
    got["state_dict"]["a"].add_(1)  # copy-on-write map: writable, the file is untouched
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["a"], a)
    assert load_checkpoint(path)[1] == "weights_only"


def test_torch_zip_with_code_is_refused(tmp_path, monkeypatch):
    Cfg, _ = _register_fake(monkeypatch)
    target = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"model_config": Cfg(x=Evil(target))}}, path)
    _unregister_fake(monkeypatch)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|nt\.system"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        load_torch_zip(path)
    assert not target.exists()


def test_checkpoint_with_stubs_loads_via_fallback(tmp_path, monkeypatch):
    Cfg, _ = _register_fake(monkeypatch)
    path = tmp_path / "cw.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "hyper_parameters": {"model_config": Cfg(projection_dim=8)}}, path)
    _unregister_fake(monkeypatch)
    obj, method = load_checkpoint(path)
    assert method == "restricted" and torch.equal(obj["state_dict"]["w"], torch.arange(3.0))
    assert obj["hyper_parameters"]["model_config"].projection_dim == 8


def _training_checkpoint(tmp_path):
    """A Lightning-style checkpoint written the real way: a module's state_dict() (with ``_metadata``), AdamW and
    LR-scheduler states after one step, ModelCheckpoint-like callback state (with a path) and loop states."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    net(torch.randn(8, 3)).square().mean().backward()
    opt.step()
    sched.step()
    ckpt = {
        "epoch": 1, "global_step": 1, "pytorch-lightning_version": "2.1.4",
        "state_dict": net.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "monitor": "val_loss", "best_model_score": torch.tensor(0.25), "best_model_path": "/runs/epoch=0.ckpt",
            "current_score": torch.tensor(0.25), "dirpath": Path("/runs"), "best_k_models": {"/runs/epoch=0.ckpt": torch.tensor(0.25)},
            "kth_best_model_path": "/runs/epoch=0.ckpt", "kth_value": torch.tensor(0.25), "last_model_path": ""}},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1, "completed": 1}, "current": {"ready": 1, "completed": 1}},
                               "epoch_loop.state_dict": {"_batches_that_stepped": 1}}},
    }
    path = tmp_path / "train.ckpt"
    torch.save(ckpt, path)
    return path


def test_lightning_training_state_loads_like_torch(tmp_path):
    path = _training_checkpoint(tmp_path)
    with torch.serialization.safe_globals([type(Path())]):  # torch's own allow-list lacks paths
        ref = torch.load(path, weights_only=True)
    got = load_torch_zip(path)
    sd = got["state_dict"]
    assert type(sd) is OrderedDict and sd._metadata == ref["state_dict"]._metadata
    assert sd._metadata["1"] == {"version": 2}  # BatchNorm's state-dict version
    assert all(torch.equal(sd[k], v) for k, v in ref["state_dict"].items()) and list(sd) == list(ref["state_dict"])
    o, r = got["optimizer_states"][0], ref["optimizer_states"][0]
    assert o["param_groups"] == r["param_groups"]
    assert all(torch.equal(o["state"][i][k], v) for i, st in r["state"].items() for k, v in st.items())
    assert got["lr_schedulers"] == ref["lr_schedulers"] and got["loops"] == ref["loops"]
    cb = next(iter(got["callbacks"].values()))
    assert cb["dirpath"] == Path("/runs") and float(cb["best_model_score"]) == 0.25
    assert load_checkpoint(path)[1] == "restricted"  # torch.load(weights_only=True) refuses the path


def test_state_dict_metadata_with_config_objects_takes_the_restricted_path(tmp_path, monkeypatch):
    Cfg, _ = _register_fake(monkeypatch)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    path = tmp_path / "cw.ckpt"
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": {"model_config": Cfg(projection_dim=2)}}, path)
    _unregister_fake(monkeypatch)
    obj, method = load_checkpoint(path)
    assert method == "restricted" and obj["state_dict"]._metadata == net.state_dict()._metadata


class _Build:
    """Pickles as ``cls()`` followed by ``BUILD state``: the opcodes a crafted file would use."""

    def __init__(self, cls, state):
        self.cls, self.state = cls, state

    def __reduce__(self):
        return (self.cls, (), self.state)


_META = OrderedDict([("", {"version": 1}), ("0", {"version": 2})])


@pytest.mark.parametrize(
    "state",
    [
        {"_metadata": _META, "extra": 1},  # more than the metadata
        {"weight": 1.0},  # another attribute
        {"__class__": dict},  # class swap
        {"__reduce__": "x"},
        {"__setstate__": "x"},
        {"__dict__": {"_metadata": _META}},
        (None, {"_metadata": _META}),  # (state, slots) form
        ({"_metadata": _META}, None),
        {"_metadata": [("", {"version": 1})]},  # not a mapping
        {"_metadata": {1: {"version": 1}}},  # non-string prefix
        {"_metadata": {"": [1]}},  # local metadata not a dict
        {"_metadata": {"": OrderedDict(version=1)}},  # not a plain dict
        {"_metadata": {"": {"version": set}}},  # a class object
        {"_metadata": {"": {"version": {1, 2}}}},  # a container, not a scalar
        {"_metadata": {"": {"version": b"1"}}},
        {"_metadata": {"": {1: 1}}},  # non-string key
    ],
)
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_hostile_ordered_dict_build_is_refused(state, protocol):
    blob = pickle.dumps({"state_dict": _Build(OrderedDict, state)}, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match="OrderedDict"):
        loads_pickle(blob, stubs=True)


def test_ordered_dict_build_holding_objects_runs_nothing(tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|nt\.system"):
        loads_pickle(pickle.dumps(_Build(OrderedDict, {"_metadata": {"": {"version": Evil(target)}}}), protocol=2), stubs=True)
    assert not target.exists()
    Cfg, _ = _register_fake(monkeypatch)
    blob = pickle.dumps(_Build(OrderedDict, {"_metadata": {"": {"version": Cfg(x=1)}}}), protocol=2)
    _unregister_fake(monkeypatch)
    with pytest.raises(UnsafeCheckpointError, match="holds TranscriptomeTextDualEncoderConfig"):
        loads_pickle(blob, stubs=True)  # an inert stub, but still not plain metadata
    # BUILD on a plain dict or on any other allowed type stays refused
    for cls in (dict, set, list):
        with pytest.raises(UnsafeCheckpointError, match="setting the state"):
            loads_pickle(pickle.dumps(_Build(cls, {"_metadata": _META}), protocol=2))


def test_metadata_is_copied_away_from_the_pickle_memo():
    """A crafted pickle that edits the metadata after BUILD (fetching a dict from the memo) does not reach it."""
    import pickletools

    sd = OrderedDict(w=1.0)
    sd._metadata = OrderedDict([("", {"version": 1})])
    blob = pickle.dumps(sd, protocol=2)
    got = loads_pickle(blob)
    assert got == {"w": 1.0} and got._metadata == {"": {"version": 1}}
    n_memo = sum(op.name in ("BINPUT", "LONG_BINPUT") for op, _, _ in pickletools.genops(blob))
    loaded = 0
    for i in range(n_memo):  # after BUILD: BINGET i; SETITEM "evil" = 7; POP; STOP
        crafted = blob[:-1] + b"h" + bytes([i]) + b"X\x04\x00\x00\x00evilK\x07s0."
        try:
            out = loads_pickle(crafted)
        except CheckpointError:  # memo entry is not a dict
            continue
        loaded += 1
        assert out._metadata == {"": {"version": 1}}
    assert loaded >= 2  # the state dict itself and the inner metadata dicts were reachable


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.ckpt")


def _call_args(text: str, start: int) -> str:
    depth, i = 0, start
    while i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
        i += 1
    return text[start:]


def test_no_unsafe_torch_load_in_engine():
    """No engine module calls torch.load without weights_only=True or unpickles outside engine.models.safe_pickle."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "engine"
    for f in sorted(root.glob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"\btorch\.load\(", text):
            args = _call_args(text, m.end() - 1)
            assert "weights_only=True" in args, f"{f.name}: torch.load{args} without weights_only=True"
        if f.name != "safe_pickle.py":
            assert not re.search(r"\bpickle\.(load|loads|Unpickler)\b", text), f"{f.name} unpickles outside safe_pickle"

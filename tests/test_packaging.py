"""Packaging checks: conda and pip describe the same environment; the engine stays headless."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_TO_PIP = {"pytorch": "torch"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pip_names = {_name(d) for d in deps}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    conda_names = set()
    for item in env:
        if isinstance(item, dict):
            conda_names |= {_name(d) for d in item["pip"]}
        else:
            name = _name(item)
            if name not in {"python", "pip"}:
                conda_names.add(CONDA_TO_PIP.get(name, name))
    assert pip_names == conda_names, (sorted(pip_names - conda_names), sorted(conda_names - pip_names))


def test_engine_import_is_headless():
    code = (
        "import sys, pkgutil, importlib, engine\n"
        "for m in pkgutil.walk_packages(engine.__path__, 'engine.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "bad = [m for m in ('panel', 'holoviews', 'bokeh', 'datashader') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"engine imported UI packages: {out.stdout}"


def test_no_unsafe_loading_in_engine():
    for f in (ROOT / "engine").glob("*.py"):
        text = f.read_text()
        assert "weights_only=False" not in text, f
        assert not re.search(r"\bpickle\.loads?\(", text) or f.name == "safe_pickle.py", f

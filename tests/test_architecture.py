"""The engine's shape: its public API, its command-line entry points, its layers and their imports.

A rename or a move must not silently drop a public name or a documented ``python -m engine.X`` command; layers
import only downwards (io <- models <- tools <- training), nothing imports in a circle, and no module grows
past a size a newcomer can read.
"""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: What ``import engine; engine.<name>`` offers (README, notebooks). Add to it; never drop a name silently.
PUBLIC_API = {
    # data (engine.io)
    "read", "validate", "expression_matrix", "demo_dataset", "DataReport", "to_human",
    "iter_expression", "selection_matrix", "gene_values", "is_backed",
    # models (engine.models)
    "TranscriptomeTextModel", "RankTokenizer", "RankEncoding", "SparseRankTower", "TextTower",
    "load_model", "save_model", "load_cellwhisperer", "load_geneformer",
    # tools (engine.tools)
    "embed_cells", "umap", "smooth_embeds", "get_embeds", "score_text", "zero_shot", "describe", "label_texts",
    "TEMPLATES", "de_top_vs_bottom", "de_groups", "enrich", "list_libraries", "load_library", "perturb",
    "perturb_scan",
    # training and evaluation (engine.training)
    "evaluate",
    # errors (engine.errors)
    "LexicellError", "DataError", "MatrixKindError", "GeneIdentifierError", "MissingKeyError",
    "EmptySelectionError", "CheckpointError", "UnsafeCheckpointError", "ModelMismatchError", "ConfigError",
    "QueryError", "AnalysisError", "MissingEmbeddingError", "CancelledError", "NetworkUnavailableError",
}

#: Documented command lines (README, CONTRIBUTING.md, model card): ``python -m engine.<name> --help``.
CLI_ENTRY_POINTS = ["train", "evaluate", "convert", "distill", "corpus", "embed"]

#: Each layer and the engine layers it may import (``engine.errors``, ``engine.paths``, ``engine._lazy``
#: are open to all).
LAYERS = {
    "io": set(),
    "models": {"io"},
    "tools": {"io", "models"},
    "training": {"io", "models", "tools"},
}
SHARED = {"engine", "engine.errors", "engine.paths", "engine._lazy"}
#: A module longer than this is split (CONTRIBUTING.md: "about 500 lines").
MAX_LINES = 560


def _modules(package: str) -> dict[str, Path]:
    base = ROOT / package
    out = {}
    for p in sorted(base.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Engine modules ``name`` imports anywhere (module level and inside functions), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {t for t in found if t == "engine" or t.startswith("engine.")}


def test_public_api_is_complete_and_resolves():
    import engine

    missing = PUBLIC_API - set(engine.__all__)
    assert not missing, f"public names dropped from engine.__all__: {sorted(missing)}"
    for name in sorted(engine.__all__):
        assert getattr(engine, name) is not None, name
    for layer in LAYERS:
        mod = importlib.import_module(f"engine.{layer}")
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"engine.{layer}.{name}"


@pytest.mark.parametrize("name", CLI_ENTRY_POINTS)
def test_cli_entry_point_runs(name):
    out = subprocess.run([sys.executable, "-m", f"engine.{name}", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"engine.{name}" in out.stdout or "usage" in out.stdout.lower()


def test_layers_import_only_downwards():
    mods = _modules("engine")
    bad = []
    for name, path in mods.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        layer = parts[1]
        for target in _imports(name, path):
            if target in SHARED or target.split(".")[1:2] == [layer]:
                continue
            other = target.split(".")[1]
            if other in LAYERS and other not in LAYERS[layer]:
                bad.append(f"{name} imports {target}")
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = _modules("engine")
    graph = {m: {t for t in _imports(m, p) if t in mods and t != m} for m, p in mods.items()}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    # a package's __init__ re-exporting its own modules is not a cycle worth reporting
    cycles = [c for c in cycles if not all(m.startswith(c[0]) for m in c)]
    assert not cycles, f"import cycles: {cycles}"


def test_app_reaches_the_engine_only_through_public_layers():
    bad = []
    for name, path in {**_modules("app"), "run_app": ROOT / "run_app.py"}.items():
        for target in _imports(name, path):
            parts = target.split(".")
            if len(parts) > 1 and parts[1] not in {*LAYERS, "errors", "paths"} and target not in SHARED:
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_module_is_too_long():
    long = {}
    for package in ("engine", "app"):
        for name, path in _modules(package).items():
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long[name] = n
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"

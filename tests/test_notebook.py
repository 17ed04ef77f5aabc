"""The example notebook runs headless (nbclient, kernel python3) and ends by displaying the dashboard."""
from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "explore_demo.ipynb"
PANEL_MIME = "application/vnd.holoviews_exec.v0+json"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.fixture
def model_env(monkeypatch, tmp_path, tiny_text_dir):
    """Use the bundled default model when it exists, else a tiny one saved to disk (LEXICELL_MODEL)."""
    import engine
    from engine.models.checkpoint import default_model_path

    if not default_model_path().is_dir():
        from conftest import build_tiny_model

        path = tmp_path / "tiny_model"
        engine.save_model(build_tiny_model(tiny_text_dir), path)
        monkeypatch.setenv("LEXICELL_MODEL", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[1]))


def test_example_notebook_runs_and_shows_dashboard(model_env):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOK.parents[1])}})
    client.execute()  # raises CellExecutionError on any error
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
    last = nb.cells[-1]["outputs"]
    assert last, "the last cell displayed nothing"
    data = last[-1].get("data", {})
    assert PANEL_MIME in data and "text/html" in data, sorted(data)

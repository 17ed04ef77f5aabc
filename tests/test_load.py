"""A short load run (issue 18 item 4): three browser sessions at once on a served demo, each querying, labelling
zero-shot and running DE for 40 seconds. The full run (10 sessions, 5 minutes, latency and memory figures) is
``python bench/bench_load.py``; this one checks what must hold at any load: no errors or tracebacks in any
page, no session seeing another's query, every session answered."""
from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("playwright.async_api")

ROOT = Path(__file__).resolve().parents[1]


def _bench_load():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "bench_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_three_sessions_at_once_stay_correct_and_isolated(tmp_path):
    bl = _bench_load()
    if not Path(bl.CHROMIUM).exists():
        pytest.skip(f"no Chromium at {bl.CHROMIUM}")
    args = bl.parse_args(["--contexts", "3", "--minutes", "0.67", "--think", "1", "--settle", "2",
                          "--timeout", "90", "--server-log", str(tmp_path / "server.log")])
    res = asyncio.run(bl.run(args))
    log = (tmp_path / "server.log").read_text()
    assert res["errors"] == [], f"{res['errors']}\nserver log tail:\n{log[-3000:]}"
    assert res["isolation"] == []
    assert len(res["latencies"]) >= 6  # every session answered queries
    assert res["zero_shot"] >= 3 and res["de"] >= 1 and res["selections"] == 3  # each session box-selected
    assert _app_tracebacks(log) == []


def _app_tracebacks(log: str) -> list[str]:
    """Tracebacks in the server log other than Tornado's harmless ones for a browser tab closed mid-send."""
    import re

    blocks = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log)
    return [b[:2000] for b in blocks if "Traceback" in b
            and not ("WebSocketClosedError" in b or "StreamClosedError" in b)]

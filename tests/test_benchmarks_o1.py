"""Smoke test of the benchmark harness's O1 workload (loader overhead, us per sample).

Tiny sizes (the internal ``smoke`` preset). No speed is asserted: the figures and
the PASS/FAIL of the targets are the harness's output, never a test condition.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives at the repository root, not in src/
    sys.path.insert(0, str(ROOT))

from benchmarks.cli import main  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_o1_rows_rounds_and_targets(tmp_path: Path) -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--smoke", "--workloads", "O1", "--rounds", "1", "--out", str(tmp_path),
                   "--no-plot", "--quiet"])
    assert rc == 0
    data = json.loads(next(tmp_path.glob("bench-smoke-*.json")).read_text())
    o1 = data["workloads"]["O1"]
    assert o1["unit"] == "s/sample" and o1["higher_is_better"] is False
    assert o1["display_unit"] == "us/sample"
    rows = {r["name"]: r for r in o1["rows"]}
    for name in ("torch nw=0", "ours inline (nw=0)", "ours threads=2", "bare pool threads=2"):
        assert name in rows, name
        assert rows[name]["status"] == "ok", (name, rows[name]["message"])
        assert len(rows[name]["values"]) >= 3  # at least 3 interleaved rounds, always
        assert rows[name]["median"] > 0
    assert rows["bare pool threads=2"]["family"] == "reference"
    o1_targets = [t for t in data["targets"] if t["id"] == "O1"]
    assert len(o1_targets) == 2
    assert all(t["status"] in ("PASS", "FAIL") for t in o1_targets)
    assert "O1: loader overhead" in buf.getvalue()

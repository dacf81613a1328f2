"""Smoke test of the benchmark harness (``benchmarks/``): it runs, writes JSON, renders tables.

Tiny sizes (the internal ``smoke`` preset), one round, workload W4 only, so it
takes a few seconds. No speed is asserted: speed is the harness's own output,
never a test condition (STYLE.md, rule 13).
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

from benchmarks.cli import main, parse_args  # noqa: E402

pytestmark = pytest.mark.timeout(60)

ROW_KEYS = {"name", "family", "params", "status", "message", "values", "n", "median", "min",
            "max", "q1", "q3", "workers", "limit", "pct_of_limit", "ratios", "note", "extras"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """One in-process run of the command: exit code, printed tables, output directory."""
    out = tmp_path_factory.mktemp("bench-out")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the tables go to stdout (progress lines: --quiet)
        rc = main(["--smoke", "--workloads", "W4", "--rounds", "1", "--out", str(out),
                   "--no-plot", "--quiet"])
    return rc, buf.getvalue(), out


def test_exit_code_zero(smoke_run: tuple[int, str, Path]) -> None:
    """The command exits 0 whatever the targets say (a measurement, not a test)."""
    rc, _, _ = smoke_run
    assert rc == 0


def test_json_structure(smoke_run: tuple[int, str, Path]) -> None:
    _, _, out = smoke_run
    files = list(out.glob("bench-smoke-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["schema"] == 1
    assert data["mode"] == "smoke"
    for key in ("cores_usable", "memory_total_gib", "python", "torch", "lightning", "date"):
        assert key in data["machine"], key
    assert set(data["workloads"]) == {"W4"}
    w4 = data["workloads"]["W4"]
    assert w4["unit"] == "batches/s"
    assert w4["higher_is_better"] is True
    names = [r["name"] for r in w4["rows"]]
    assert "torch nw=0" in names and "torch nw=2" in names
    assert any(n.startswith("ours") for n in names)
    for row in w4["rows"]:
        assert ROW_KEYS <= set(row), set(ROW_KEYS) - set(row)
        assert row["status"] in ("ok", "skipped", "error")
        if row["status"] == "ok":
            assert len(row["values"]) == 1 and row["median"] > 0
    torch0 = next(r for r in w4["rows"] if r["name"] == "torch nw=0")
    assert torch0["status"] == "ok"
    assert w4["limits"]["serial, no loader (1 thread)"] > 0
    # Targets: W4's two, plus the GPU rows (N/A without a device).
    ids = [t["id"] for t in data["targets"]]
    assert ids.count("W4") == 2 and "G1" in ids and "G2" in ids
    for t in data["targets"]:
        assert t["status"] in ("PASS", "FAIL", "N/A")
        assert set(t) == {"id", "target", "measured", "status", "detail"}
    assert data["plot"] is None  # --no-plot


def test_tables_render(smoke_run: tuple[int, str, Path]) -> None:
    _, text, _ = smoke_run
    assert "W4: preallocated small tensor" in text
    assert "torch nw=0" in text
    assert "Targets" in text
    assert "serial, no loader" in text


def test_cli_arguments() -> None:
    args = parse_args(["--quick", "--workloads", "w1,W4", "--rounds", "3", "--out", "x"])
    assert args.quick and args.workloads == ["W1", "W4"] and args.rounds == 3
    assert args.out == Path("x")
    with pytest.raises(SystemExit):
        parse_args(["--workloads", "W9"])
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])

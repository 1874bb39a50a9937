"""bench.py keeps working: --quick at a tiny width produces every table with finite ratios (speed is not tested)."""

import json
import math

import bench


def test_quick_bench_produces_every_table(tmp_path, capsys):
    tables = bench.main(["--quick", "--width", "64", "--heads", "4", "--device", "cpu",
                         "--json", str(tmp_path / "bench.json")])
    assert json.loads((tmp_path / "bench.json").read_text())["attention"] == tables["attention"]
    assert len(tables["attention"]) == 4 and len(tables["block"]) == 4
    for row in tables["attention"]:
        assert math.isfinite(row["ratio"]) and row["eq4"] == row["F"] * row["P"] / (row["F"] + row["P"])
    for row in tables["block"]:
        assert math.isfinite(row["ratio"]) and row["flop_ratio"] > 0
    # the factorized block adds temporal projections, so it saves FLOPs only once F * P is large
    assert max(tables["block"], key=lambda r: r["F"] * r["P"])["flop_ratio"] > 1
    assert tables["throughput"][0]["clips_s"] > 0 and tables["sampling"][0]["seconds_per_video_second"] > 0
    assert [r["model"] for r in tables["sampling"]] == ["T", "shipped"]  # random weights, then the demo checkpoint
    text = capsys.readouterr().out
    for title in ("1a.", "1b.", "2.", "3."):
        assert title in text

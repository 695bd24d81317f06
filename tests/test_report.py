import json

import pytest

from netslim import NetslimError
from netslim.report import bench_report, make_row, pareto_front, write_result


def test_write_result_fills_the_header_and_nulls(tmp_path):
    path = write_result("demo_bench", [dict(model="lenet5", dataset="mnist", method="magnitude", tool="netslim",
                                            setting={"sparsity": 0.9}, top1=0.99, baseline_top1=0.9927,
                                            params=431080, macs=229300, size_bytes=100_000,
                                            latency_ms={1: 0.5}, baseline_latency_ms={1: 0.6})],
                        out_dir=tmp_path, command="python bench/x.py")
    doc = json.loads(path.read_text())
    assert {"benchmark", "date", "command", "machine", "device", "torch", "rows"} <= set(doc)
    assert doc["rows"][0]["notes"] is None and doc["rows"][0]["latency_ms"] == {"1": 0.5}


def test_unknown_row_key_is_refused():
    with pytest.raises(ValueError, match="unknown result row keys"):
        make_row(model="x", accuracy=1)


def test_pareto_front_keeps_only_undominated_points():
    pts = [(10, 0.9), (5, 0.85), (20, 0.88), (5, 0.80), (30, 0.95)]
    assert pareto_front(pts) == [(5, 0.85), (10, 0.9), (30, 0.95)]


def test_bench_report_tables_and_plots(tmp_path):
    rows = [dict(model="resnet56", dataset="cifar10", method=m, tool=t, setting={"macs_x": 2}, top1=a,
                 baseline_top1=0.8957, params=400_000, macs=c, size_bytes=c * 4, latency_ms={"1": 1.0},
                 baseline_latency_ms={"1": 2.0})
            for m, t, a, c in [("l1", "netslim", 0.89, 6e7), ("depgraph", "torch-pruning", 0.888, 6.2e7)]]
    write_result("structured", rows, out_dir=tmp_path)
    md, png = bench_report(tmp_path)
    text = md.read_text()
    assert "torch-pruning" in text and "2.00x (1)" in text and "-0.57" in text
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_malformed_result_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"benchmark": "x", "rows": []}))
    with pytest.raises(NetslimError, match="missing keys"):
        bench_report(tmp_path)

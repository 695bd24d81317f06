"""bench/full_suite.py: the plan (longest-first, dropping by priority, fitting the budget) and a dry run."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("full_suite", ROOT / "bench" / "full_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["full_suite"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_longest_first_fills_the_slot_that_frees_first(suite):
    placed, makespan = suite.lpt({"a": 5, "b": 4, "c": 3, "d": 3, "e": 2}, slots=2)
    assert makespan == 9  # a+d | b+c+e, the longest-first schedule
    assert [r for r, _, _ in placed[0]][0] == "a" and [r for r, _, _ in placed[1]][0] == "b"
    starts = {r: s for slot in placed for r, s, _ in slot}
    assert starts["c"] == 4 and starts["d"] == 5


def test_plan_drops_the_lowest_priority_rows_that_do_not_fit(suite):
    rates = suite.Rates({m: 1e-4 for m in suite.MODELS}, overlap=1.0, source="test")
    rows = [suite.Row("goal", "distillation", [], "resnet20", epochs=10, priority=0),     # 30 + 50 s
            suite.Row("extra", "lowrank", [], "resnet56", epochs=10, priority=2),         # 120 + 50 s
            suite.Row("goal2", "quantization", [], "resnet20", epochs=2, priority=0)]     # 45 + 10 s
    plan = suite.make_plan(rows, rates, slots=1, budget=200)
    assert [d[0] for d in plan.dropped] == ["extra"]
    assert plan.makespan == pytest.approx(135) and plan.makespan <= plan.budget
    text = suite.format_plan(plan, {r.id: r for r in rows})
    assert "dropped: extra" in text and "est" in text


def test_overlap_from_solo_and_shared_timings(suite):
    assert suite.overlap_of(1.0, [1.0] * 8) == 8      # every process as fast as alone
    assert suite.overlap_of(1.0, [8.0] * 8) == 1      # they only took turns
    assert suite.overlap_of(1.0, [2.0] * 8) == 4
    rates = suite.Rates({m: 1e-4 for m in suite.MODELS}, overlap=4.0, source="test")
    row = suite.Row("r", "distillation", [], "resnet20", epochs=1, priority=0)
    assert rates.row_seconds(row, slots=8) == pytest.approx(30 + 50_000 * 1e-4 * 2)  # 8 slots on 4: twice as slow


def test_the_default_plan_for_one_gpu_fits_ten_minutes_with_every_goal_row(suite):
    rates = suite.extrapolated_rates(suite.ASSUMED_TFLOPS, suite.ASSUMED_OVERLAP)
    rows = suite.suite_rows()
    plan = suite.make_plan(rows, rates, slots=8, budget=600)
    kept = {rid for slot in plan.slots for rid, _, _ in slot}
    goals = {r.id for r in rows if r.priority == 0}
    assert plan.makespan <= 600
    assert goals <= kept, f"goal rows dropped: {sorted(goals - kept)}"
    assert {r.id.split(":")[0] for r in rows} == {"structured_pruning", "distillation", "quantization", "lowrank",
                                                   "compact_filters", "auto_compress"}
    assert "extrapolated" in plan.source


def test_dry_run_of_one_row_runs_its_command_and_writes_the_merged_json(tmp_path, shared):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "full_suite.py"), "--dry-run", "--only",
                           "distillation:CE", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "plan:" in proc.stdout and "1 of 1 rows passed" in proc.stdout
    doc = json.loads((out / "distillation.json").read_text())
    assert doc["details"]["form"] == "dry-run"
    methods = {r["method"] for r in doc["rows"]}
    assert "CE" in methods and len([m for m in methods if m == "CE"]) == 1
    summary = json.loads((out / "dry_run.json").read_text())
    assert summary["failed"] == [] and list(summary["rows"]) == ["distillation:CE"]


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, needle in ((["--only", "nothing:*"], "matches no row"), (["--budget", "ten"], "not a duration")):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "full_suite.py"), *args, "--plan", "--out",
                               str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode != 0 and needle in proc.stderr and "Traceback" not in proc.stderr

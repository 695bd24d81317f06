"""The cross-family search: space, candidates through each family's API, the recipe it writes, Optuna
resume after SIGKILL, two workers on one study, the greedy baseline, and clear errors."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import netslim
from netslim.errors import NetslimError
from netslim.search import SearchConfig, auto_compress, build_space, parse_duration, pareto_front
from netslim.search.apply import apply_candidate, plan_of, recalibrate_batchnorm_
from netslim.search.calibration import nonnegative_least_squares

pytestmark = pytest.mark.integration
X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet20(shared):
    return netslim.zoo.get("resnet20", weights=str(shared / "models" / "cifar10_resnet20.pt")).eval()


@pytest.fixture(scope="module")
def train_slice(shared):
    """600 CIFAR-10 *training* images with labels (the search never reads the test set)."""
    train = netslim.data.get("cifar10", "train", root=shared / "data")
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:600].tolist()
    xs, ys = zip(*(train[i] for i in picked))
    return TensorDataset(torch.stack(xs), torch.as_tensor(ys))


def test_space_has_every_family_and_ties_layers(resnet20):
    space = build_space(resnet20, X)
    kinds = {k.kind for k in space.knobs}
    assert kinds == {"keep", "op", "bits"}
    assert len(space) <= 3 * 8 + 3  # tied to at most max_knobs per kind (+ a few)
    names = dict(resnet20.named_modules())
    assert all(layer in names for k in space.knobs for layer in k.layers)
    op = next(k for k in space.knobs if k.kind == "op")
    assert {"keep", "lowrank:0.5", "bsconv:0.34"} <= set(op.choices)
    only_prune = build_space(resnet20, X, ["prune"])
    assert {k.kind for k in only_prune.knobs} == {"keep"}
    with pytest.raises(NetslimError, match="valid families: prune, lowrank, compact, quant"):
        build_space(resnet20, X, ["prun"])


def test_identity_candidate_changes_nothing(resnet20):
    space = build_space(resnet20, X)
    model, stages = apply_candidate(resnet20, X, space, space.identity(), torch.randn(16, 3, 32, 32))
    assert stages == []
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), resnet20(x))


def test_candidate_applies_each_family_and_the_stages_rebuild_it(resnet20, train_slice, tmp_path):
    space = build_space(resnet20, X)
    candidate = {"keep:layer2": 0.5, "op:layer3": "lowrank:0.5", "op:layer1": "bsconv:0.34", "bits:layer2": "8",
                 "bits:layer3": "4"}
    plan = plan_of(space, candidate)
    assert plan["ratios"] and all(v == 0.5 for v in plan["ratios"].values())
    assert all(n.startswith("layer3") for n in plan["lowrank"]) and plan["bits"]["layer3.0.conv1"] == 4
    images = train_slice.tensors[0][:64]
    model, stages = apply_candidate(resnet20, X, space, candidate, images, refit_images=32)
    assert [n for n, _ in stages] == ["prune_channels", "decompose", "replace", "quantize"]
    dense_macs = netslim.profile(resnet20, X, latency=False).macs
    searched = netslim.profile(model, X, latency=False)
    assert searched.macs < dense_macs
    # the stages, run by the ordinary pipeline, rebuild a model of the same shape
    result = netslim.compress(resnet20, [{n: o} for n, o in stages], train_data=train_slice, eval_data=train_slice,
                              calib_data=train_slice, example_input=X, out=tmp_path / "run", progress=False)
    rebuilt = netslim.profile(result.model, X, latency=False)
    assert rebuilt.macs == searched.macs and rebuilt.params == searched.params


def test_recalibrated_batchnorm_takes_the_images_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    images = torch.randn(128, 3, 8, 8) * 3 + 1
    recalibrate_batchnorm_(model, images, batch_size=32)
    with torch.no_grad():
        feats = model[0](images)
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert not model.training


def test_per_layer_prune_ratios(resnet20):
    pruned = netslim.prune.structured(resnet20, X, ratio=0.0, ratios={"layer2.0.conv1": 0.5})
    assert pruned.get_submodule("layer2.0.conv1").out_channels == 16
    assert pruned.get_submodule("layer2.1.conv1").out_channels == 32
    with pytest.raises(NetslimError, match="unknown layer 'layer9'"):
        netslim.prune.structured(resnet20, X, ratio=0.0, ratios={"layer9": 0.5})


def test_pure_helpers():
    assert parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400 and parse_duration(90) == 90
    for bad in ("soon", "-5m", 0):
        with pytest.raises(NetslimError):
            parse_duration(bad)
    rows = [{"top1": 0.9, "latency_ms": 1.0, "size_bytes": 10}, {"top1": 0.8, "latency_ms": 2.0, "size_bytes": 20},
            {"top1": 0.7, "latency_ms": 0.5, "size_bytes": 30}]
    assert pareto_front(rows) == [rows[2], rows[0]]
    import numpy as np
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    coef = nonnegative_least_squares(a, np.array([2.0, -1.0, 1.0]))
    assert (coef >= 0).all() and coef[1] == 0
    for bad in (dict(device="tpu"), dict(target="speed:3"), dict(strategy="random"), dict(trials=0),
                dict(families=["prune", "magic"]), dict(max_drop=-1)):
        with pytest.raises(NetslimError):
            SearchConfig(**bad)


def test_greedy_baseline_meets_a_mac_goal(resnet20, train_slice, tmp_path):
    cfg = SearchConfig(target="macs:2", device="torch-cpu", families=["prune"], strategy="greedy", held_out=100,
                       calib_images=64, latency_table=str(tmp_path / "table.json"))
    result = auto_compress(resnet20, X, train_slice, cfg, out=tmp_path / "greedy", progress=False)
    dense_macs = netslim.profile(resnet20, X, latency=False).macs
    assert result.score.macs <= dense_macs / 2
    assert netslim.profile(result.model, X, latency=False).macs == result.score.macs
    summary = json.loads((tmp_path / "greedy" / "search.json").read_text())
    assert summary["strategy"] == "greedy" and summary["chosen"]["within_max_drop"] in (True, False)
    recipe = (tmp_path / "greedy" / "recipe.yaml").read_text()
    assert "prune_channels" in recipe and "finetune" in recipe and "export" in recipe
    assert (tmp_path / "greedy" / "front.png").stat().st_size > 1000


WORKER = """
import sys, torch
from torch.utils.data import TensorDataset
import netslim
from netslim.search import SearchConfig, auto_compress
torch.set_num_threads(1)
shared, storage, out, trials = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = netslim.zoo.get("resnet20", weights=shared + "/models/cifar10_resnet20.pt").eval()
train = netslim.data.get("cifar10", "train", root=shared + "/data")
xs, ys = zip(*(train[i] for i in range(300)))
data = TensorDataset(torch.stack(xs), torch.as_tensor(ys))
cfg = SearchConfig(target="macs:1.5", device="torch-cpu", families=["prune"], trials=trials, population=4,
                   held_out=100, calib_images=32, storage=storage, latency_table=out + "/table.json", verify=1)
auto_compress(model, torch.randn(1, 3, 32, 32), data, cfg, out=out, progress=False)
"""


def _complete_trials(db: Path) -> list[tuple[int, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("SELECT t.number, a.value_json FROM trials t LEFT JOIN trial_user_attributes a "
                               "ON a.trial_id = t.trial_id AND a.key = 'worker' WHERE t.state = 'COMPLETE'").fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet
        return []


def _worker(tmp_path: Path, shared: Path, db: Path, out: Path, trials: int) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NETSLIM_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, str(script), str(shared), f"sqlite:///{db}", str(out), str(trials)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_search_resumes_its_study(shared, tmp_path):
    db = tmp_path / "study.db"
    proc = _worker(tmp_path, shared, db, tmp_path / "run", 6)
    deadline = time.time() + 240
    while len(_complete_trials(db)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, f"the worker ended before it was killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(_complete_trials(db))
    assert 2 <= before < 6
    again = _worker(tmp_path, shared, db, tmp_path / "run", 6)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    after = _complete_trials(db)
    assert len(after) >= 6  # the study went on to its total
    assert len(after) < before + 6  # the restart ran only what was missing, not a fresh study of 6
    assert json.loads((tmp_path / "run" / "search.json").read_text())["trials"] >= 6


def test_two_workers_share_one_study(shared, tmp_path):
    db = tmp_path / "shared.db"
    _complete_trials(db)
    first = _worker(tmp_path, shared, db, tmp_path / "a", 12)
    second = _worker(tmp_path, shared, db, tmp_path / "b", 12)
    for p in (first, second):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    trials = _complete_trials(db)
    assert 12 <= len(trials) <= 14  # the study's total, not each worker's
    workers = {w for _, w in trials if w}
    assert len(workers) == 2, f"trials by one worker only: {workers}"


def test_cli_errors_are_one_line(shared, tmp_path, capsys):
    from netslim.cli import main

    base = ["search", "--model", "resnet20", "--weights", "shared", "--data", "cifar10", "--out", str(tmp_path / "s")]
    for extra, words in ((["--device", "npu"], "valid devices: ort-cpu, torch-cpu, torch-cuda"),
                         (["--time-budget", "soon"], "not a duration"),
                         (["--target", "speed:2"], "valid search target metrics")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err


def test_impossible_target_is_one_clear_error(resnet20, train_slice, tmp_path):
    cfg = SearchConfig(target="latency:40", device="torch-cpu", families=["prune"], held_out=100, calib_images=32,
                       latency_table=str(tmp_path / "table.json"))
    with pytest.raises(NetslimError, match=r"cannot be reached on torch-cpu: .* only [0-9.]+x faster; ask for at most"):
        auto_compress(resnet20, X, train_slice, cfg, out=tmp_path / "s", progress=False)

"""Running a recipe into a run directory, resumable after a kill.

Layout of a run directory::

    recipe.yaml         the recipe as run
    log.txt             the log of every session on this run
    state.json          finished stages, recipe fingerprint, per-stage artifacts
    stages/NN-name.pt   the model's state_dict after stage NN (plain tensors, no code)
    stages/NN-name/     the stage's own files (training checkpoint, plots, tables)
    metrics.json        the six ratios and raw measures after every stage
    report.md           a table of every stage

A restarted run replays the structure of the finished stages (``restore``), loads the last
finished checkpoint and goes on with the next stage; a stage that was killed half-way
resumes from its own checkpoint when it has one (``finetune`` does, per epoch).
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import data as nsdata
from .. import zoo
from ..errors import NetslimError
from ..io import load_checkpoint, save_json, save_text, save_torch
from ..profile import compare, profile
from ..train import default_device, evaluate, seed_everything
from .databundle import DataBundle
from .recipe import Recipe
from .report import write_report
from .stages import StageContext, get_stage

log = logging.getLogger("netslim.pipeline")


def validate_inputs(recipe: Recipe) -> None:
    """Everything checkable without work: model name, dataset name, weights file."""
    zoo.spec(recipe.model)
    if not nsdata.is_folder_dataset(recipe.data):
        nsdata.canonical_name(recipe.data)
    weights = recipe.resolve_path(recipe.weights)
    if weights not in (None, "shared") and not Path(weights).is_file():
        raise NetslimError(f"weights file not found: {weights}")


def _stage_file(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / "stages" / f"{index:02d}-{name}.pt"


def _attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("netslim")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def _read_state(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    path = run_dir / "state.json"
    if not path.is_file():
        return {"fingerprint": recipe.fingerprint(), "finished": 0, "artifacts": [], "metrics": []}
    state = json.loads(path.read_text())
    if state.get("fingerprint") != recipe.fingerprint():
        raise NetslimError(f"{run_dir} holds a run of a different recipe; choose another --out or pass --restart")
    return state


def _measure(original, model, data: DataBundle, example_input, recipe: Recipe, device, top1_original,
             artifacts: dict[str, Any]) -> dict[str, Any]:
    cmp = compare(original, model, None, example_input=example_input, batch_sizes=tuple(recipe.latency_batch_sizes),
                  compressed_stored_size=artifacts.get("stored_bytes"),
                  compressed_index_size=artifacts.get("index_bytes", 0), device=device)
    top1 = evaluate(model, data.test, device=device)["top1"]
    cmp.top1_original, cmp.top1_compressed = top1_original, top1
    c = cmp.compressed
    return {"top1": top1, "ratios": cmp.ratios, "params": c.params, "nonzero_params": c.nonzero_params,
            "macs": c.macs, "effective_macs": c.effective_macs, "stored_bytes": c.stored_bytes,
            "index_bytes": c.index_bytes, "energy_pj": c.energy.total_pj,
            "latency_ms": {str(k): v for k, v in c.latency_ms.items()},
            "baseline_latency_ms": {str(k): v for k, v in cmp.original.latency_ms.items()}}


def run_recipe(recipe: Recipe, run_dir: str | Path, *, restart: bool = False, progress: bool = True) -> list[dict]:
    """Run every stage of ``recipe`` into ``run_dir``; return the metrics rows (baseline first)."""
    validate_inputs(recipe)
    run_dir = Path(run_dir)
    if restart and run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    handler = _attach_log(run_dir)
    try:
        return _run(recipe, run_dir, progress)
    finally:
        logging.getLogger("netslim").removeHandler(handler)
        handler.close()


def _run(recipe: Recipe, run_dir: Path, progress: bool) -> list[dict]:
    state = _read_state(run_dir, recipe)
    save_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), run_dir / "recipe.yaml")
    device = torch.device(recipe.device) if recipe.device else default_device()
    seed_everything(recipe.seed)
    original = zoo.get(recipe.model, recipe.resolve_path(recipe.weights), recipe.num_classes).to(device).eval()
    bundle = DataBundle(recipe.data, recipe.resolve_path(recipe.data_root), recipe.calib_size, recipe.test_limit)
    example_input = bundle.test[0][0][None].to(device)
    model = copy.deepcopy(original)

    if not state["metrics"]:
        log.info("measuring the baseline %s on %s", recipe.model, recipe.data)
        top1 = evaluate(original, bundle.test, device=device)["top1"]
        row = _measure(original, model, bundle, example_input, recipe, device, top1, {})
        state["metrics"].append({"stage": "baseline", "index": -1, "wall_s": 0.0, **row})
        save_json(state, run_dir / "state.json")
    top1_original = state["metrics"][0]["top1"]

    finished = int(state["finished"])
    if finished:
        log.info("resuming after %d finished stage(s)", finished)
        model = restore_stage_model(model, recipe, run_dir, finished - 1).to(device)

    for index in range(finished, len(recipe.stages)):
        spec = recipe.stages[index]
        sdef = get_stage(spec.name)
        stage_dir = run_dir / "stages" / f"{index:02d}-{spec.name}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        log.info("stage %d/%d: %s %s", index + 1, len(recipe.stages), spec.name, spec.options)
        ctx = StageContext(model, original, bundle, stage_dir, device, example_input, progress,
                           model_name=recipe.model, num_classes=recipe.num_classes)
        t0 = time.perf_counter()
        model = sdef.run(ctx, spec.config).to(device)
        wall = time.perf_counter() - t0
        save_torch(model.state_dict(), _stage_file(run_dir, index, spec.name))
        artifacts = _merge_artifacts(state["artifacts"], ctx.artifacts)
        row = _measure(original, model, bundle, example_input, recipe, device, top1_original, artifacts)
        state["metrics"].append({"stage": spec.name, "index": index, "options": spec.options, "wall_s": wall,
                                 "notes": ctx.artifacts.get("notes"), **row})
        state["artifacts"].append(ctx.artifacts)
        state["finished"] = index + 1
        save_json(state, run_dir / "state.json")
        save_json(state["metrics"], run_dir / "metrics.json")
        write_report(run_dir, recipe, state["metrics"])
        log.info("stage %s done in %.1f s: top-1 %.4f", spec.name, wall, row["top1"])
    save_json(state["metrics"], run_dir / "metrics.json")
    write_report(run_dir, recipe, state["metrics"])
    return state["metrics"]


def restore_stage_model(model: torch.nn.Module, recipe: Recipe, run_dir: str | Path, index: int) -> torch.nn.Module:
    """``model`` (the recipe's base model) as it was after stage ``index`` of a run: the structure
    of stages 0..index replayed, then that stage's checkpoint loaded."""
    state_file = Path(run_dir) / "state.json"
    artifacts = json.loads(state_file.read_text()).get("artifacts", []) if state_file.is_file() else []
    for i, spec in enumerate(recipe.stages[: index + 1]):
        sdef = get_stage(spec.name)
        if sdef.restore is not None:
            model = sdef.restore(model, spec.config, artifacts[i] if i < len(artifacts) else {})
    spec = recipe.stages[index]
    model.load_state_dict(load_checkpoint(_stage_file(Path(run_dir), index, spec.name)))
    return model


def _merge_artifacts(previous: list[dict], current: dict) -> dict:
    """The storage override in force: the latest stage that set one (an encode stage)."""
    merged: dict[str, Any] = {}
    for a in [*previous, current]:
        for key in ("stored_bytes", "index_bytes"):
            if key in a:
                merged[key] = a[key]
    return merged

"""Running a recipe into a run directory, resumable after a kill.

Layout of a run directory::

    recipe.yaml         the recipe as run
    log.txt             the log of every session on this run
    state.json          finished stages, recipe fingerprint, per-stage artifacts
    stages/NN-name.pt   the model's state_dict after stage NN (plain tensors, no code)
    stages/NN-name/     the stage's own files (training checkpoint, plots, tables)
    metrics.json        the six ratios and raw measures after every stage
    report.md           a table of every stage

    .netslim.lock       the run's lock: PID and host of the run holding it (empty when free)

A restarted run replays the structure of the finished stages (``restore``), loads the last
finished checkpoint and goes on with the next stage; a stage that was killed half-way
resumes from its own per-epoch checkpoint in ``stages/NN-name/``: ``finetune``, ``distill``,
``prune`` with ``schedule: agp`` (the schedule's step count is saved with it), ``quantize``
``method: inq`` (one checkpoint per portion), ``prune_channels`` with ``slimming_l1``, ``method:
sfp`` or ``method: iterative`` (one checkpoint per round).

One run at a time: :func:`run_stages` holds an exclusive lock on the run directory (``flock``,
released by the kernel when the process dies, so a lock left by a SIGKILL is simply taken over);
a second run is refused with the holder's PID. Temp files of atomic writes that a kill left
behind (``.NAME.XXXX.tmp``) are removed on start.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import torch
import yaml
from torch import nn

from .. import data as nsdata
from .. import zoo
from ..errors import NetslimError
from ..io import load_checkpoint, save_json, save_text, save_torch
from ..profile import compare, profile
from ..train import check_device, default_device, evaluate, seed_everything
from ..surgery import safe_deepcopy
from ..zoo.references import is_factory_reference
from .databundle import DataBundle, DatasetBundle, bundle_from_reference
from .recipe import Recipe
from .report import write_report
from .stages import StageContext, get_stage

log = logging.getLogger("netslim.pipeline")


@dataclass
class RunInputs:
    """What a run compresses and measures, however it was named: the original model, its data, an example
    input, and the metric (``None``: top-1 accuracy; else ``metric(model, eval_data) -> float``, higher is
    better, called with the model in eval mode on the run's device)."""

    original: nn.Module
    data: DataBundle | DatasetBundle
    example_input: torch.Tensor
    metric: Callable[[nn.Module, Any], float] | None = None
    metric_name: str = "top1"
    model_name: str | None = None
    num_classes: int | None = None


def validate_inputs(recipe: Recipe) -> None:
    """Everything checkable without work: model reference, dataset name or reference, weights file."""
    if recipe.device is not None:
        check_device(recipe.device)
    zoo.spec(recipe.resolve_reference(recipe.model))
    if not (nsdata.is_folder_dataset(recipe.data) or is_factory_reference(recipe.data)):
        nsdata.canonical_name(recipe.data)
    weights = recipe.resolve_path(recipe.weights)
    if weights not in (None, "shared") and not Path(weights).is_file():
        raise NetslimError(f"weights file not found: {weights}")


def inputs_from_recipe(recipe: Recipe, device: torch.device) -> RunInputs:
    """Build the recipe's model (zoo, torchvision, timm or a user's factory) and data (named or a factory)."""
    model_ref = recipe.resolve_reference(recipe.model)
    original = zoo.get(model_ref, recipe.resolve_path(recipe.weights), recipe.num_classes).to(device).eval()
    data_ref = recipe.resolve_reference(recipe.data)
    if is_factory_reference(data_ref):
        bundle = bundle_from_reference(data_ref, recipe.calib_size, recipe.test_limit)
    else:
        bundle = DataBundle(recipe.data, recipe.resolve_path(recipe.data_root), recipe.calib_size, recipe.test_limit,
                            recipe.augment)
    example = first_input(bundle.test).to(device)
    return RunInputs(original, bundle, example, model_name=model_ref, num_classes=recipe.num_classes)


def first_input(dataset) -> torch.Tensor:
    """A batch of one from the first item of ``dataset`` (an ``(input, target)`` pair)."""
    if len(dataset) == 0:
        raise NetslimError("the evaluation data is empty")
    item = dataset[0]
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, torch.Tensor):
        raise NetslimError(f"the evaluation data's items must be (tensor, target) pairs; got {type(x).__name__}")
    return x[None]


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
        raise NetslimError(f"{run_dir} holds a run of a different recipe or model; choose another --out/out= "
                           "or pass --restart/restart=True")
    return state


def score(inputs: RunInputs, model: nn.Module, device: torch.device) -> float:
    """The run's metric of ``model`` on the evaluation data: top-1, or the user's metric."""
    if inputs.metric is None:
        return evaluate(model, inputs.data.test, device=device)["top1"]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            value = inputs.metric(model, inputs.data.test)
    finally:
        model.train(was_training)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise NetslimError(f"metric {inputs.metric_name!r} returned {value!r}, not a number") from None


def _measure(inputs: RunInputs, model, recipe: Recipe, device, score_original, artifacts: dict[str, Any]) -> dict:
    cmp = compare(inputs.original, model, None, example_input=inputs.example_input,
                  batch_sizes=tuple(recipe.latency_batch_sizes), compressed_stored_size=artifacts.get("stored_bytes"),
                  compressed_index_size=artifacts.get("index_bytes", 0), device=device)
    value = score(inputs, model, device)
    cmp.top1_original, cmp.top1_compressed = score_original, value
    c = cmp.compressed
    row = {"metric": inputs.metric_name, "score": value, "ratios": cmp.ratios, "params": c.params,
           "nonzero_params": c.nonzero_params, "macs": c.macs, "effective_macs": c.effective_macs,
           "stored_bytes": c.stored_bytes, "index_bytes": c.index_bytes, "energy_pj": c.energy.total_pj,
           "latency_ms": {str(k): v for k, v in c.latency_ms.items()},
           "baseline_latency_ms": {str(k): v for k, v in cmp.original.latency_ms.items()}}
    if inputs.metric is None:
        row["top1"] = value
    if "ort_latency_ms" in artifacts:  # an export stage timed both models in onnxruntime, side by side
        row.update({k: artifacts[k] for k in ("ort_latency_ms", "baseline_ort_latency_ms", "onnx_bytes",
                                             "onnx_check") if k in artifacts})
        row["ratios"]["r_T_ort"] = ort_speedup(artifacts["baseline_ort_latency_ms"], artifacts["ort_latency_ms"])
    return row


def ort_speedup(baseline: dict[str, float], compressed: dict[str, float]) -> float | None:
    """onnxruntime latency ratio (original / compressed) at the smallest batch size both were timed at."""
    common = sorted(set(baseline) & set(compressed), key=int)
    if not common or not compressed[common[0]]:
        return None
    return baseline[common[0]] / compressed[common[0]]


def run_recipe(recipe: Recipe, run_dir: str | Path, *, restart: bool = False, progress: bool = True) -> list[dict]:
    """Run every stage of ``recipe`` into ``run_dir``; return the metrics rows (baseline first)."""
    validate_inputs(recipe)
    device = check_device(recipe.device) if recipe.device else default_device()
    seed_everything(recipe.seed)
    metrics, _ = run_stages(recipe, lambda: inputs_from_recipe(recipe, device), run_dir, restart=restart,
                            progress=progress)
    return metrics


def run_stages(recipe: Recipe, make_inputs: Callable[[], RunInputs], run_dir: str | Path, *, restart: bool = False,
               progress: bool = True) -> tuple[list[dict], nn.Module]:
    """The corridor shared by recipes and :func:`netslim.compress`: prepare ``run_dir``, build the inputs,
    run the stages not yet finished, measure after each; return the metrics rows and the final model."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NetslimError(f"run directory {run_dir} is a file; choose another --out/out=")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NetslimError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise NetslimError(f"run directory {run_dir} is not writable; choose another --out/out=")
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        if restart:
            _clear_run_dir(run_dir)
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        handler = _attach_log(run_dir)
        try:
            remove_stale_temps(run_dir)
            state = _read_state(run_dir, recipe)
            return _run(recipe, make_inputs(), state, run_dir, progress)
        finally:
            logging.getLogger("netslim").removeHandler(handler)
            handler.close()
    finally:
        lock.release()


LOCK_NAME = ".netslim.lock"


class RunLock:
    """An exclusive lock on a run directory: ``fcntl.flock`` on ``run_dir/.netslim.lock``, which holds the
    holder's PID and host. The kernel drops a flock when its process dies (a SIGKILL included), so a lock
    left behind by a killed run is stale by construction and simply taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): an O_EXCL lock file, stale when its PID is gone
            return self._acquire_exclusive()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise NetslimError(f"cannot lock run directory {self.path.parent}: {exc.strerror or exc}") from None
            holder = self._holder()
            raise NetslimError(f"run directory {self.path.parent} is in use by another netslim run ({holder}); "
                               "wait for it to finish or choose another --out/out=") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd

    def _acquire_exclusive(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = self._holder_pid()
                if pid is not None and pid != os.getpid() and _pid_alive(pid):
                    raise NetslimError(f"run directory {self.path.parent} is in use by another netslim run "
                                       f"({self._holder()}); wait for it to finish or choose another --out/out=") \
                        from None
                if pid == os.getpid():
                    raise NetslimError(f"run directory {self.path.parent} is in use by another netslim run "
                                       f"({self._holder()}); wait for it to finish or choose another --out/out=")
                self.path.unlink(missing_ok=True)  # stale: its holder was killed
                continue
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
            os.close(fd)
            self._exclusive = True
            return
        raise NetslimError(f"cannot lock run directory {self.path.parent}")

    def _holder_pid(self) -> int | None:
        try:
            return int(json.loads(self.path.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"PID {int(info['pid'])} on {info.get('host', '?')}"
        except (OSError, ValueError, KeyError, TypeError):
            return "PID unknown"

    def release(self) -> None:
        if getattr(self, "_exclusive", False):
            self.path.unlink(missing_ok=True)
            self._exclusive = False
            return
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _clear_run_dir(run_dir: Path) -> None:
    """``--restart``: empty the run directory, keeping the lock this run holds."""
    for child in run_dir.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Remove ``.NAME.XXXX.tmp`` files that an atomic write killed half-way left in the run directory and
    its stage folders (called while holding the lock, so no live writer owns them)."""
    removed = []
    for path in run_dir.rglob(".*.tmp"):
        if path.is_file() and path.name.startswith("."):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    if removed:
        log.info("removed %d leftover temp file(s) of an interrupted write", len(removed))
    return removed


def _run(recipe: Recipe, inputs: RunInputs, state: dict, run_dir: Path, progress: bool) -> tuple[list[dict], nn.Module]:
    save_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), run_dir / "recipe.yaml")
    device = check_device(recipe.device) if recipe.device else default_device()
    seed_everything(recipe.seed)
    original = inputs.original.to(device).eval()
    model = safe_deepcopy(original)

    if not state["metrics"]:
        log.info("measuring the baseline %s on %s", recipe.model, recipe.data)
        value = score(inputs, original, device)
        row = _measure(inputs, model, recipe, device, value, {})
        state["metrics"].append({"stage": "baseline", "index": -1, "wall_s": 0.0, **row})
        save_json(state, run_dir / "state.json")
    score_original = state["metrics"][0]["score"]

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
        ctx = StageContext(model, original, inputs.data, stage_dir, device, inputs.example_input, progress,
                           model_name=inputs.model_name, num_classes=inputs.num_classes, run_dir=run_dir,
                           latency_batch_sizes=tuple(recipe.latency_batch_sizes))
        t0 = time.perf_counter()
        model = sdef.run(ctx, spec.config).to(device)
        wall = time.perf_counter() - t0
        save_torch(model.state_dict(), _stage_file(run_dir, index, spec.name))
        artifacts = _merge_artifacts(state["artifacts"], ctx.artifacts)
        row = _measure(inputs, model, recipe, device, score_original, artifacts)
        state["metrics"].append({"stage": spec.name, "index": index, "options": spec.options, "wall_s": wall,
                                 "notes": ctx.artifacts.get("notes"), **row})
        state["artifacts"].append(ctx.artifacts)
        state["finished"] = index + 1
        save_json(state, run_dir / "state.json")
        save_json(state["metrics"], run_dir / "metrics.json")
        write_report(run_dir, recipe, state["metrics"])
        log.info("stage %s done in %.1f s: %s %.4f", spec.name, wall, inputs.metric_name, row["score"])
    save_json(state["metrics"], run_dir / "metrics.json")
    write_report(run_dir, recipe, state["metrics"])
    return state["metrics"], model


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
    """The overrides in force: storage from the latest stage that set it (an encode stage), onnxruntime
    timings from the latest export stage."""
    merged: dict[str, Any] = {}
    for a in [*previous, current]:
        for key in ("stored_bytes", "index_bytes", "ort_latency_ms", "baseline_ort_latency_ms", "onnx_bytes",
                    "onnx_check"):
            if key in a:
                merged[key] = a[key]
    return merged

"""``netslim.auto_compress``: one search across every family for a measured budget on the user's device.

    result = netslim.auto_compress(model, example_input, train_data,
                                   SearchConfig(target="latency:3", device="ort-cpu", max_drop=1.0), out="runs/search")
    result.recipe        # an ordinary recipe: `netslim compress runs/search/recipe.yaml` rebuilds and fine-tunes it

The run directory holds the Optuna study (``study.db``: a killed search resumes), every trial
(``trials.json``), the Pareto front as a table (``front.md``) and a plot (``front.png``), the chosen
configuration as a recipe (``recipe.yaml``) and ``search.json`` (dense and chosen: estimated top-1,
predicted and measured latency, the prediction's error).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Subset

from ..data import image_batch
from ..errors import NetslimError, unknown_choice
from ..io import save_text
from ..targets import Target, parse_target
from .cost import DEVICES, LatencyTable, measure_ms, paired_ms, parse_device
from .engine import Evaluator, Score, greedy_search, reference_source, run_study, smallest_candidates, study_name
from .calibration import FEATURES
from .space import FAMILIES, build_space

STRATEGIES = ("nsga2", "greedy")
METRIC_OF = {"latency": "latency_ms", "size": "size_bytes", "macs": "macs"}
TARGET_METRICS = tuple(METRIC_OF)


def parse_duration(value: str | float | int | None) -> float | None:
    """``"30m"``, ``"2h"``, ``"90s"``, ``"1h30m"`` or seconds -> seconds; ``None`` -> no limit."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*(\d+(\.\d+)?\s*[hms]\s*)+", value):
        units = {"h": 3600, "m": 60, "s": 1}
        seconds = sum(float(n) * units[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)\s*([hms])", value))
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        seconds = float(value)
    else:
        raise NetslimError(f"time budget {value!r} is not a duration; write e.g. 30m, 2h, 1h30m, 90s or seconds")
    if not seconds > 0 or not math.isfinite(seconds):
        raise NetslimError(f"time budget must be > 0, got {value!r}")
    return seconds


@dataclass
class SearchConfig:
    """``target``: ``"latency:3"`` (3x faster than the dense model on ``device``, measured), ``"size:8"``
    (stored bytes) or ``"macs:2"``; ``device``: one of :data:`~netslim.search.cost.DEVICES` at ``threads``
    and ``batch``; ``families``: which families the search may use; ``max_drop``: points of estimated
    top-1 (held-out training slice) the chosen model may lose; ``trials``: candidates the study holds
    when done; ``time_budget``: wall-clock limit of this run (``"30m"``); ``strategy``: ``nsga2`` (Optuna)
    or ``greedy`` (the NetAdapt-style baseline); ``held_out``: training images set aside to estimate
    top-1; ``calib_images``: other training images for refits, BatchNorm statistics and quantization
    ranges; ``verify``: how many of the most accurate candidates predicted near the goal are timed whole
to pick the one that really meets it; ``measure``: time every candidate whole on the device (the
search then optimizes measured latency and records the table's prediction beside it; ``False``: the
calibrated table alone, for devices where a whole-model run per candidate is costly); ``storage``: an Optuna database URL (default SQLite in the run directory); ``finetune``: the
    fine-tune stage the written recipe ends with (KD from the original model by default)."""

    target: str = "latency:3"
    device: str = "ort-cpu"
    threads: int = 1
    batch: int = 1
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    max_drop: float = 1.0
    trials: int = 100
    time_budget: str | float | None = None
    strategy: str = "nsga2"
    held_out: int = 1000
    calib_images: int = 256
    refit_images: int = 128
    max_knobs: int = 8
    exclude: list[str] = field(default_factory=list)
    storage: str | None = None
    population: int = 16
    seed: int = 0
    latency_table: str | None = None
    verify: int = 8
    measure: bool = True
    finetune: dict = field(default_factory=lambda: {"epochs": 1, "lr": 0.005, "distill": {"kd": 0.9}})

    def __post_init__(self) -> None:
        parse_target(self.target, TARGET_METRICS, "search target")
        if self.device not in DEVICES:
            raise unknown_choice("device", self.device, DEVICES)
        if self.strategy not in STRATEGIES:
            raise unknown_choice("search strategy", self.strategy, STRATEGIES)
        for f in self.families:
            if f not in FAMILIES:
                raise NetslimError(f"unknown search family {f!r}; valid families: {', '.join(FAMILIES)}")
        for name in ("trials", "verify", "held_out", "calib_images", "refit_images", "max_knobs", "population", "threads", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NetslimError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) or not 0 <= self.max_drop < 100:
            raise NetslimError(f"max_drop must be points of top-1 in [0, 100), got {self.max_drop!r}")
        self.budget_seconds = parse_duration(self.time_budget)

    @property
    def parsed_target(self) -> Target:
        return parse_target(self.target, TARGET_METRICS, "search target")


@dataclass
class SearchResult:
    """The chosen ``model`` (repaired, not fine-tuned), its ``candidate`` and ``score``, the ``dense`` score,
    the Pareto ``front`` (list of trial rows), the measured latency of the chosen and dense models, the
    written ``recipe`` path, the run directory ``out`` and the ``summary`` written to ``search.json``."""

    model: nn.Module
    candidate: dict
    score: Score
    dense: Score
    front: list[dict]
    recipe: Path
    out: Path
    summary: dict


def split_training_data(train_data, held_out: int, calib: int, seed: int = 0):
    """A held-out labelled slice of the training data (``held_out`` items) and ``calib`` other training
    images: the search never sees the test set."""
    n = len(train_data)
    if n < held_out + 1:
        raise NetslimError(f"the training data has {n} items; the search needs more than held_out={held_out}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = Subset(train_data, order[:held_out])
    rest = Subset(train_data, order[held_out:])
    return held, image_batch(rest, min(calib, len(rest)), seed=seed + 1)


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on top-1 (higher), latency and size (lower) at once, by latency."""
    def dominated(a, b):  # b dominates a
        ge = b["top1"] >= a["top1"] and b["latency_ms"] <= a["latency_ms"] and b["size_bytes"] <= a["size_bytes"]
        gt = b["top1"] > a["top1"] or b["latency_ms"] < a["latency_ms"] or b["size_bytes"] < a["size_bytes"]
        return ge and gt
    front = [a for a in rows if not any(dominated(a, b) for b in rows)]
    return sorted(front, key=lambda r: r["latency_ms"])


def choose(rows: list[dict], metric: str, goal: float, min_top1: float) -> tuple[dict | None, bool]:
    """The most accurate row meeting the goal (``metric`` <= ``goal``); whether it keeps ``min_top1``."""
    feasible = [r for r in rows if r[metric] <= goal]
    if not feasible:
        return None, False
    best = max(feasible, key=lambda r: (r["top1"], -r[metric]))
    return best, best["top1"] >= min_top1


def front_table(front: list[dict], dense: Score, chosen: dict | None) -> str:
    lines = ["| est. top-1 % | drop (pts) | latency ms | table ms | speed-up | size KiB | size ratio | MACs (M) | chosen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in front:
        table_ms = r.get("predicted_ms")
        lines.append(f"| {100 * r['top1']:.2f} | {100 * (dense.top1 - r['top1']):.2f} | {r['latency_ms']:.3f} | "
                     f"{'' if table_ms is None else f'{table_ms:.3f}'} | "
                     f"{dense.latency_ms / r['latency_ms']:.2f}x | {r['size_bytes'] / 1024:.1f} | "
                     f"{dense.size_bytes / r['size_bytes']:.2f}x | {r['macs'] / 1e6:.1f} | "
                     f"{'**yes**' if chosen is not None and r['candidate'] == chosen['candidate'] else ''} |")
    return "\n".join(lines)


def plot_front(rows: list[dict], front: list[dict], dense: Score, goal_ms: float | None, path: Path) -> Path | None:
    """Estimated top-1 against predicted latency: every trial, the front, the dense model and the goal."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sizes = [r["size_bytes"] for r in rows]
    sc = ax.scatter([r["latency_ms"] for r in rows], [100 * r["top1"] for r in rows], c=sizes, cmap="viridis",
                    s=14, alpha=0.7, label="trials")
    fig.colorbar(sc, ax=ax, label="stored bytes")
    ax.plot([r["latency_ms"] for r in front], [100 * r["top1"] for r in front], "r.-", label="Pareto front")
    ax.scatter([dense.latency_ms], [100 * dense.top1], marker="*", s=120, c="k", label="dense")
    if goal_ms is not None:
        ax.axvline(goal_ms, ls="--", c="gray", label="latency goal")
    ax.set_xlabel("latency (ms) on the target")
    ax.set_ylabel("estimated top-1 (%, held-out training slice)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_recipe(path: Path, stages: list[tuple[str, dict]], cfg: SearchConfig, refs: dict[str, Any]) -> Path:
    """The chosen configuration as an ordinary recipe: its stages, the fine-tune (before quantization, so
    the integer model is calibrated on the fine-tuned weights), and an export stage timed on the device."""
    structural = [(n, o) for n, o in stages if n != "quantize"]
    quant = [(n, o) for n, o in stages if n == "quantize"]
    ordered = [*structural, ("finetune", dict(cfg.finetune)), *quant, ("export", {"threads": cfg.threads})]
    doc = {k: v for k, v in refs.items() if v is not None}
    doc.setdefault("model", "python")
    doc.setdefault("data", "python")
    doc["stages"] = [{n: o} for n, o in ordered]
    header = (f"# written by netslim search: target {cfg.target} on {cfg.device} ({cfg.threads} thread(s), batch "
              f"{cfg.batch}); `netslim compress {path.name}` rebuilds, fine-tunes and exports the chosen model\n")
    save_text(header + yaml.safe_dump(doc, sort_keys=False), path)
    return path


def verify_choice(evaluator: Evaluator, rows: list[dict], metric: str, factor: float, dense_value: float,
                  target_device, x, count: int, rounds: int = 3, pairs: int = 150):
    """The most accurate candidate that really meets the target: the ``count`` most accurate rows within 25 %
    of the goal are built and timed whole on the target in turn with the dense model, run by run
    (:func:`~netslim.search.cost.paired_ms`, ``rounds`` rounds of ``pairs`` pairs; the round with the
    median speed-up counts), and the first whose speed-up over the dense model reaches ``factor`` is taken
    (for size and MAC targets the formula is exact and the first feasible row is taken). Returns the row
    (with ``measured_ms`` and ``dense_ms``), its model, its stages, and every verification."""
    goal = dense_value / factor
    slack = 1.25 if metric == "latency_ms" else 1.0
    near = sorted((r for r in rows if r[metric] <= goal * slack), key=lambda r: (-r["top1"], r[metric]))[:count]
    dense = reference_source(target_device, evaluator.model, x) if metric == "latency_ms" else None
    verified = []
    for row in near:
        model, stages = evaluator.build(row["candidate"])
        model = model.cpu().eval()
        if dense is None:
            return {**row, "measured_ms": None, "dense_ms": None}, model, stages, verified
        timed = sorted((paired_ms(target_device, model, dense, x, pairs=pairs) for _ in range(rounds)),
                       key=lambda p: p[1] / p[0])
        ms, dense_ms = timed[len(timed) // 2]
        verified.append({"top1": row["top1"], "latency_ms": row["latency_ms"], "predicted_ms": row.get("predicted_ms"),
                         "measured_ms": ms, "dense_ms": dense_ms, "speedup": dense_ms / ms})
        if dense_ms / ms >= factor:
            return {**row, "measured_ms": ms, "dense_ms": dense_ms}, model, stages, verified
    return None, None, None, verified


def calibration_candidates(space) -> dict[str, dict]:
    """Models spanning the space the latency correction is fit on: dense, uniform channel keeps, each
    factorization, int8, and mixes."""
    kinds = {k.kind for k in space.knobs}
    ops = sorted({c for k in space.knobs if k.kind == "op" for c in k.choices} - {"keep"})
    out = {"dense": space.identity()}
    if "keep" in kinds:
        out.update({"keep 0.5": space.uniform(keep=0.5), "keep 0.25": space.uniform(keep=0.25)})
    for op in ops:
        out[op] = space.uniform(op=op)
    if "bits" in kinds:
        out["int8"] = space.uniform(bits="8")
        if "keep" in kinds:
            out["keep 0.5 + int8"] = space.uniform(keep=0.5, bits="8")
            out["keep 0.25 + int8"] = space.uniform(keep=0.25, bits="8")  # the fast end deep targets reach
    if ops and "keep" in kinds:
        out[f"keep 0.75 + {ops[0]}"] = space.uniform(keep=0.75, op=ops[0])
    return out


def calibrate_predictor(evaluator: Evaluator, space):
    """The lookup table's whole-model correction (:func:`~netslim.search.calibration.fit_latency_model`)
    fit on :func:`calibration_candidates`, built as the search builds them."""
    from .calibration import fit_latency_model

    models = {name: evaluator.build(c)[0].cpu().eval() for name, c in calibration_candidates(space).items()}
    return fit_latency_model(evaluator.table, models, evaluator.x.cpu())


def check_reachable(evaluator: Evaluator, space, target: Target, metric: str, dense_value: float, goal: float,
                    device_name: str) -> None:
    """One clear error when even the smallest models of the space miss the goal."""
    smallest = min((evaluator(c) for c in smallest_candidates(space)), key=lambda s: getattr(s, metric))
    if getattr(smallest, metric) > goal:
        reached = dense_value / getattr(smallest, metric)
        raise NetslimError(f"target {target} cannot be reached on {device_name}: the smallest model of the search space "
                           f"is only {reached:.2f}x {'faster' if metric == 'latency_ms' else 'smaller'}; "
                           f"ask for at most {max(1.0, reached):.2f}x or add families")


def search_rows(cfg: SearchConfig, evaluator: Evaluator, goal: float, metric: str, study: str, out: Path,
                progress: bool) -> tuple[list[dict], dict]:
    """Run the strategy; every scored candidate as a row, and what the run was."""
    if cfg.strategy == "greedy":
        path = greedy_search(evaluator, goal, progress=progress)
        rows = [{"candidate": json.loads(k), **v.to_dict()} for k, v in evaluator.cache.items()]
        return rows, {"strategy": "greedy", "steps": len(path), "evaluated": len(evaluator.cache)}
    storage = cfg.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    done = run_study(evaluator, goal if metric == "latency_ms" else math.inf, storage=storage, name=study,
                     n_trials=cfg.trials, timeout=cfg.budget_seconds, seed=cfg.seed, population=cfg.population,
                     progress=progress)
    rows = [{"candidate": dict(t.params), **{k: t.user_attrs[k] for k in Score.__dataclass_fields__}}
            for t in done.trials if t.state.name == "COMPLETE" and "top1" in t.user_attrs]
    return rows, {"strategy": "nsga2", "storage": storage, "study": study, "trials": len(rows)}


def auto_compress(model: nn.Module, example_input: torch.Tensor, train_data, config: SearchConfig | None = None, *,
                  out: str | Path = "runs/search", refs: dict[str, Any] | None = None, progress: bool = True,
                  device: str | torch.device = "cpu") -> SearchResult:
    """Search every family of ``config.families`` per layer for the most accurate model meeting
    ``config.target`` on ``config.device``, estimating top-1 on a held-out slice of ``train_data``
    (labelled training data; never the test set). ``refs``: ``model``/``weights``/``data`` references the
    written recipe names (the CLI fills them; from Python pass the recipe to :func:`netslim.compress` with
    your model and data). ``device``: where candidates are built and scored (the latency target is
    ``config.device``)."""
    started = time.time()
    cfg = config or SearchConfig()
    target = cfg.parsed_target
    metric = METRIC_OF[target.metric]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target_device = parse_device(cfg.device, cfg.threads, cfg.batch)
    x = example_input[:1].cpu()
    base = model.eval().cpu()
    space = build_space(base, x, cfg.families, exclude=cfg.exclude, max_knobs=cfg.max_knobs)
    held, calib = split_training_data(train_data, cfg.held_out, cfg.calib_images, cfg.seed)
    table = LatencyTable(target_device, cfg.latency_table)
    table.calibrate(base, x)
    dense_measured = measure_ms(target_device, base, x, rounds=5)
    evaluator = Evaluator(base, x, space, held, calib, table, refit_images=cfg.refit_images, device=device,
                          measure=cfg.measure and metric == "latency_ms")
    latency_model = calibrate_predictor(evaluator, space)
    evaluator.predictor = latency_model.predict
    save_text(json.dumps({"coef": latency_model.coef, "fit": latency_model.fit}, indent=1), out / "latency_fit.json")
    if evaluator.measure:
        evaluator.set_reference(dense_measured)
    dense = evaluator(space.identity())
    dense_value = dense_measured if metric == "latency_ms" else getattr(dense, metric)
    goal = target.goal(dense_value)
    check_reachable(evaluator, space, target, metric, dense_value, goal, cfg.device)
    search_started = time.time()
    name = study_name(base, space, target_device.key, goal, cfg.held_out)
    rows, study_info = search_rows(cfg, evaluator, goal, metric, name, out, progress)
    search_seconds = time.time() - search_started
    rows = [r for r in rows if r["candidate"]]
    front = pareto_front(rows)
    chosen, final, stages, verified = verify_choice(evaluator, rows, metric, target.factor, dense_value,
                                                    target_device, x, cfg.verify)
    if chosen is None:
        raise NetslimError(f"no candidate met {target} within the budget ({len(rows)} trials); give more trials or time")
    kept = chosen["top1"] >= dense.top1 - cfg.max_drop / 100
    measured = chosen["measured_ms"] or chosen["latency_ms"]
    dense_now = chosen["dense_ms"] or dense_measured
    recipe = write_recipe(out / "recipe.yaml", stages, cfg, refs or {})
    save_text(front_table(front, dense, chosen) + "\n", out / "front.md")
    plot_front(rows, front, dense, goal if metric == "latency_ms" else None, out / "front.png")
    summary = {
        "target": str(target), "device": asdict(target_device) | {"key": target_device.key}, "goal": goal,
        "dense": dense.to_dict() | {"measured_ms": dense_measured},
        "chosen": {**chosen, "prediction_error": (chosen.get("predicted_ms") or chosen["latency_ms"]) / measured - 1,
                   "speedup_measured": dense_now / measured, "within_max_drop": kept},
        "verified": verified, "space": [asdict(k) for k in space.knobs], "search_seconds": search_seconds,
        "total_seconds": time.time() - started, "max_drop": cfg.max_drop, "held_out": cfg.held_out,
        "table": {"hits": table.hits, "misses": table.misses, "path": str(table.path)},
        "latency_model": {"coef": dict(zip(FEATURES, latency_model.coef)),
                          "fit": latency_model.fit, "max_fit_error": latency_model.max_fit_error},
        **study_info,
    }
    save_text(json.dumps(rows, indent=1, default=str), out / "trials.json")
    save_text(json.dumps(summary, indent=1, default=str), out / "search.json")
    if not kept:
        logging.getLogger("netslim.search").warning(
            "the most accurate candidate meeting %s loses %.2f points (more than max_drop %.2f)", target,
            100 * (dense.top1 - chosen["top1"]), cfg.max_drop)
    score = Score(**{k: chosen[k] for k in Score.__dataclass_fields__})
    return SearchResult(final, chosen["candidate"], score, dense, front, recipe, out, summary)


__all__ = ["SearchConfig", "SearchResult", "auto_compress", "parse_duration", "pareto_front", "STRATEGIES"]

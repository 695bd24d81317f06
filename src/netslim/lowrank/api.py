"""``netslim.lowrank.decompose(model, example_input, DecomposeConfig(...))``: low-rank factorization in one
call, with the same config object the ``decompose`` recipe stage is built from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data import image_batch
from ..errors import NetslimError, unknown_choice
from ..targets import Target, target_or_reduction
from ..train import default_device
from .apply import METHODS, SELECTORS, DecompositionReport, apply_plan_, plan_decomposition
from ..refit import REFIT_MODES, working_copies
from .refit import refit_
from .search import TARGETS, energy_rank_search, greedy_rank_search

CONFIG_SELECTORS = (*SELECTORS, "target", "energy_target")


@dataclass
class DecomposeConfig:
    """``selector``: ``fixed`` (``rank``: an int, or a fraction of full rank), ``energy`` (keep ``energy``
    of the squared singular values), ``vbmf`` (one-shot EVBMF), ``target`` (greedy per-layer search on
    measured sensitivity until the model meets ``target``: ``"macs:2"``, ``"params:3"`` or
    ``"latency:1.5"``, latency measured at batch ``latency_batch``), ``energy_target`` (the largest
    energy, the same for every layer, that meets ``target``: macs or params).
    ``candidates``: rank fractions the greedy search tries; ``sensitivity_samples``: held-out images it
    measures accuracy on. ``layers`` / ``exclude``: which layers (a name covers its submodules);
    ``ranks``: explicit ranks per layer. ``batchnorm``: a BatchNorm between spatial factors.
    ``refit_images`` > 0: refit each decomposed layer's last factor on that many images so it reproduces
    the layer's outputs before decomposition (asymmetric reconstruction, Zhang 2016). ``latency_device``:
    a target of :data:`netslim.search.cost.DEVICES` (``ort-cpu``, ``torch-cpu``, ``torch-cuda``), timed at
    ``latency_batch`` with ``latency_threads``: a layer whose factors are not faster there than the layer is
    left dense and the ranks re-chosen without it (:mod:`.measured`). ``refit_mode``:
    ``sequential`` (layer after layer) or ``one_pass`` (all layers from one forward pass: much faster on
    deep models, what the search uses).
    ``reduction``: deprecated (``target: macs`` + ``reduction: 2`` is ``target: "macs:2"``)."""

    method: str = "auto"
    selector: str = "fixed"
    rank: float | int | None = 0.5
    energy: float = 0.9
    target: str | dict | None = None
    candidates: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.375, 0.5, 0.75])
    sensitivity_samples: int = 1000
    layers: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    ranks: dict[str, int | list[int]] = field(default_factory=dict)
    batchnorm: bool = False
    refit_images: int = 0
    refit_mode: str = "sequential"
    latency_batch: int = 1
    latency_device: str | None = None
    latency_threads: int = 1
    reduction: float | None = field(default=None, metadata={"deprecated": "target"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise unknown_choice("decompose method", self.method, METHODS)
        if self.selector not in CONFIG_SELECTORS:
            raise unknown_choice("rank selector", self.selector, CONFIG_SELECTORS)
        if self.reduction is not None or (isinstance(self.target, str) and ":" not in self.target):
            # deprecated: `target: macs` + `reduction: 2` (a bare metric meant the old default reduction 2)
            reduction = 2.0 if self.reduction is None else self.reduction
            self.target = str(target_or_reduction(self.target, reduction, TARGETS, "decompose target"))
            self.reduction = None
        parsed = self.parsed_target
        if parsed is not None and parsed.metric == "latency" and self.selector != "target":
            raise NetslimError("target 'latency' needs selector 'target' (the greedy search times every candidate)")
        if self.selector in ("target", "energy_target") and parsed is None:
            raise NetslimError(f"selector {self.selector!r} needs target, e.g. target: \"macs:2\"")
        if not 0 < self.energy <= 1:
            raise NetslimError(f"energy must be in (0, 1], got {self.energy}")
        if self.refit_images < 0:
            raise NetslimError(f"refit_images must be >= 0, got {self.refit_images}")
        if self.latency_device is not None:
            from ..search.cost import Device
            Device(self.latency_device, self.latency_threads, self.latency_batch)
        if self.refit_mode not in REFIT_MODES:
            raise unknown_choice("refit_mode", self.refit_mode, REFIT_MODES)
        if self.sensitivity_samples < 1:
            raise NetslimError(f"sensitivity_samples must be >= 1, got {self.sensitivity_samples}")

    @property
    def parsed_target(self) -> Target | None:
        return target_or_reduction(self.target, None, TARGETS, "decompose target")


@dataclass
class DecomposeResult:
    """What :func:`decompose` returns: the decomposed ``model``, the per-layer ``report`` and ``details``
    (``sensitivity`` of the greedy search, ``energy`` of ``energy_target``, ``refit_relative_error``)."""

    model: nn.Module
    report: DecompositionReport
    details: dict[str, Any] = field(default_factory=dict)


def fixed_subset(data: Dataset, count: int, seed: int) -> Dataset:
    """``count`` items of ``data`` drawn with a seeded permutation (all of it when it is smaller)."""
    if len(data) <= count:
        return data
    picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return Subset(data, picked)


def decompose(model: nn.Module, example_input: torch.Tensor, config: DecomposeConfig | None = None, *,
              eval_data: Dataset | None = None, calib_data: Any = None, device: str | torch.device | None = None,
              progress: bool = True, inplace: bool = False) -> DecomposeResult:
    """Low-rank factorization of ``model`` (a copy unless ``inplace``) as ``config`` says.

    ``eval_data``: held-out labelled data the ``target`` selector measures accuracy on
    (``config.sensitivity_samples`` of it); ``calib_data``: images for the refit (``config.refit_images``
    of them; a tensor, a Dataset or a DataLoader). ``device``: where the model and data go (default
    :func:`netslim.train.default_device`)."""
    cfg = config or DecomposeConfig()
    device = torch.device(device) if device is not None else default_device()
    work, reference = working_copies(model, device, inplace=inplace, keep_reference=bool(cfg.refit_images))
    x = example_input.to(device)
    details: dict[str, Any] = {}
    report = _plan(work, x, cfg, tuple(cfg.exclude), eval_data, device, progress, details)
    if cfg.latency_device is not None:
        report = _keep_faster_on_target(work, x, cfg, report, eval_data, device, progress, details)
    apply_plan_(work, report, cfg.batchnorm)
    if cfg.refit_images:
        if calib_data is None:
            raise NetslimError(f"refit_images: {cfg.refit_images} needs calib_data (images to refit on)")
        images = image_batch(calib_data, cfg.refit_images, seed=2).to(device)
        errors = refit_(work, reference.to(device), images,
                        [n for n, p in report.layers.items() if p.skipped is None], progress=progress,
                        sequential=cfg.refit_mode == "sequential")
        details["refit_relative_error"] = {n: {"before": b, "after": a} for n, (b, a) in errors.items()}
    return DecomposeResult(work, report, details)


def _plan(work: nn.Module, x: torch.Tensor, cfg: DecomposeConfig, exclude: tuple[str, ...], eval_data, device,
          progress: bool, details: dict) -> DecompositionReport:
    """The per-layer method and rank ``cfg``'s selector picks, layers in ``exclude`` left out."""
    if cfg.selector == "target":
        if eval_data is None:
            raise NetslimError("selector 'target' needs eval_data: held-out labelled data to measure accuracy on")
        held_out = fixed_subset(eval_data, cfg.sensitivity_samples, seed=0)
        report, details["sensitivity"] = greedy_rank_search(
            work, x, held_out, cfg.parsed_target, cfg.method, tuple(cfg.candidates), tuple(cfg.layers),
            exclude, cfg.batchnorm, device, progress, latency_batch=cfg.latency_batch)
        return report
    if cfg.selector == "energy_target":
        report, details["energy"] = energy_rank_search(work, x, cfg.parsed_target, cfg.method, tuple(cfg.layers),
                                                       exclude)
        return report
    value = cfg.energy if cfg.selector == "energy" else cfg.rank
    return plan_decomposition(work, x, cfg.method, cfg.selector, value, tuple(cfg.layers), exclude, cfg.ranks)


def _keep_faster_on_target(work: nn.Module, x: torch.Tensor, cfg: DecomposeConfig, report: DecompositionReport,
                           eval_data, device, progress: bool, details: dict, rounds: int = 3) -> DecompositionReport:
    """Re-plan without the layers whose factors are not faster on ``cfg.latency_device`` than the layer
    (at most ``rounds`` times); those layers are listed in ``details["slower_on_target"]`` and their times in
    ``details["on_target"]`` (the re-planned report leaves them out, as it does any excluded layer)."""
    from ..search.cost import LatencyTable, parse_device
    from ..surgery import safe_deepcopy
    from .measured import factor_timings

    table = LatencyTable(parse_device(cfg.latency_device, cfg.latency_threads, cfg.latency_batch))
    slow: dict[str, Any] = {}
    for _ in range(rounds):
        trial = apply_plan_(safe_deepcopy(work).cpu(), report, cfg.batchnorm, iters=1)  # values do not change time
        names = [n for n, p in report.layers.items() if p.skipped is None]
        timings = factor_timings(safe_deepcopy(work).cpu(), trial, names, x.cpu(), table)
        details.setdefault("on_target", {}).update(
            {n: {"dense_ms": t.dense_ms, "factored_ms": t.factored_ms} for n, t in timings.items()})
        newly = {n: t for n, t in timings.items() if not t.faster}
        if not newly:
            break
        slow.update(newly)
        report = _plan(work, x, cfg, tuple(cfg.exclude) + tuple(slow), eval_data, device, progress, details)
    details["slower_on_target"] = sorted(slow)
    return report

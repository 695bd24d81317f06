"""The search: Optuna's NSGA-II over the candidates (Deb et al. 2002), and a greedy NetAdapt-style baseline.

Every candidate is built (:func:`netslim.search.apply.apply_candidate`), repaired without training, and
scored by :class:`Evaluator`: top-1 on a held-out slice of the *training* data (the cheap estimate; never
the test set), latency predicted by the per-layer lookup table of the target device, stored bytes and
MACs. The Optuna study lives in a database (SQLite in the run directory by default, so a killed search
resumes where it stopped; any URL Optuna supports, e.g. PostgreSQL, lets several workers share one
study). The greedy baseline (Yang et al. 2018, "NetAdapt") shrinks, one knob at a time, where the least
accuracy is lost per millisecond saved until the latency goal is met, to show what the search earns.
"""
from __future__ import annotations

import hashlib
import os
import socket
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from ..errors import NetslimError
from ..profile import profile
from ..train import evaluate
from .apply import apply_candidate
from .cost import measure_ms, paired_ms
from .space import SearchSpace

log = logging.getLogger("netslim.search")


@dataclass
class Score:
    """What one candidate gives: estimated top-1 (held-out training slice), latency (ms) on the target -
    measured whole when the evaluator measures, else the lookup table's prediction - the prediction
    itself, stored bytes, MACs, and the seconds it took to build and score."""

    top1: float
    latency_ms: float
    size_bytes: int
    macs: int
    seconds: float
    stages: list = field(default_factory=list)
    predicted_ms: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def stored_size(model: nn.Module) -> int:
    """Bytes of the deployed weights: a quantized layer's weight at its bit width (plus a float scale per
    output channel), every other parameter and floating buffer at its own dtype."""
    from ..quant.modules import WeightQuant

    total, counted = 0, set()
    for m in model.modules():
        chain = getattr(getattr(m, "parametrizations", None), "weight", None)
        quant = [q for q in (chain or []) if isinstance(q, WeightQuant)]
        if quant:
            w = chain.original
            total += math.ceil(w.numel() * quant[0].spec.bits / 8) + 4 * w.shape[0]
            counted.update({id(w), *(id(p) for p in quant[0].parameters())})
    total += sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in counted)
    total += sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point() and b.dim() > 0)
    return int(total)


class Evaluator:
    """Scores candidates of ``space`` for ``model``: build, repair, estimate top-1 on ``held_out`` (a
    labelled slice of the training data), time the model whole on ``table``'s device (``measure``) and
    predict its latency with ``table`` (a
    :class:`~netslim.search.cost.LatencyTable`, calibrated on ``model``), or with ``predictor(model, x) -> ms``
    when given (a :class:`~netslim.search.calibration.LatencyModel`'s ``predict``)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, space: SearchSpace, held_out, calib_images,
                 table, *, refit_images: int = 128, device: str | torch.device = "cpu",
                 predictor: Callable[[nn.Module, torch.Tensor], float] | None = None, measure: bool = False,
                 pairs: int = 60) -> None:
        self.model, self.x, self.space = model.eval(), example_input[:1], space
        self.held_out, self.calib_images, self.table = held_out, calib_images, table
        self.predictor, self.measure = predictor, measure
        self.reference: tuple[float, nn.Module | bytes] | None = None
        self.pairs = pairs
        self.refit_images, self.device = refit_images, device
        self.cache: dict[str, Score] = {}

    def measured(self, model: nn.Module) -> float:
        """``model``'s latency on the target: timed whole, run by run in turn with the reference (dense)
        model (:func:`~netslim.search.cost.paired_ms`), and given as the reference's latency at the start
        times the ratio of the two - so that a slower spell of a shared machine does not move candidates
        across the goal."""
        if self.reference is None:
            return measure_ms(self.table.device, model, self.x.cpu(), rounds=3)
        start_ms, source = self.reference
        ms, reference_ms = paired_ms(self.table.device, model, source, self.x.cpu(), pairs=self.pairs)
        return start_ms * ms / reference_ms

    def set_reference(self, start_ms: float) -> None:
        """Time the dense model alongside every candidate from now on (see :meth:`measured`); on
        onnxruntime its graph is exported once."""
        self.reference = (start_ms, reference_source(self.table.device, self.model, self.x.cpu()))

    @staticmethod
    def key(candidate: dict[str, Any]) -> str:
        return json.dumps(candidate, sort_keys=True, default=str)

    def build(self, candidate: dict[str, Any]) -> tuple[nn.Module, list]:
        return apply_candidate(self.model, self.x, self.space, candidate, self.calib_images,
                               refit_images=self.refit_images, device=self.device)

    def __call__(self, candidate: dict[str, Any]) -> Score:
        candidate = self.space.complete(candidate)
        k = self.key(candidate)
        if k in self.cache:
            return self.cache[k]
        t0 = time.perf_counter()
        model, stages = self.build(candidate)
        top1 = evaluate(model, self.held_out, device=self.device)["top1"]
        cpu = model.cpu().eval()
        predicted = (self.predictor(cpu, self.x.cpu()) if self.predictor is not None
                     else self.table.predict(cpu, self.x.cpu()).total_ms)
        latency = self.measured(cpu) if self.measure else predicted
        macs = profile(cpu, self.x.cpu(), latency=False).macs
        score = Score(top1, latency, stored_size(cpu), int(macs), time.perf_counter() - t0, stages, predicted)
        self.cache[k] = score
        return score


def reference_source(device, model: nn.Module, x: torch.Tensor) -> "nn.Module | bytes":
    """What :func:`~netslim.search.cost.paired_ms` times the reference as: its ONNX graph on ``ort-cpu``
    (exported once, not per candidate), else the module."""
    if device.name == "ort-cpu":
        from ..export import onnx_bytes
        return onnx_bytes(model.eval(), x)
    return model


def study_name(model: nn.Module, space: SearchSpace, device_key: str, goal_ms: float, held_out_size: int) -> str:
    """A name for the study that changes whenever the model, space, device or goal does (a resumed search
    only continues the same question)."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes()[:4096])
    digest.update(json.dumps([asdict(k) for k in space.knobs], default=str).encode())
    digest.update(f"{device_key}|{goal_ms:.6g}|{held_out_size}".encode())
    return "netslim-" + digest.hexdigest()[:16]


def _optuna():
    try:
        import optuna
    except ImportError:
        raise NetslimError("the search needs Optuna: pip install optuna (or netslim[search])") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def seeds(space: SearchSpace) -> list[dict[str, Any]]:
    """Starting points enqueued before NSGA-II samples: uniform channel keeps inside blocks (residual
    streams whole, and thinned too), uniform factorizations, 8-bit everywhere, and their mixes (so the
    first generation already holds feasible points)."""
    out = []
    for keep in (1.0, 0.75, 0.5, 0.375, 0.25):
        for bits in ("float", "8"):
            out.append(space.uniform(keep=keep, bits=bits, stream=1.0))
    for bits in ("float", "8"):
        out.append(space.uniform(keep=0.5, bits=bits, stream=0.75))
    for op in ("lowrank:0.5", "lowrank:0.25", "bsconv:0.34"):
        out.append(space.uniform(op=op))
        out.append(space.uniform(keep=0.75, op=op, bits="8", stream=1.0))
    for keep, stream in ((0.5, 0.5), (0.375, 0.5), (0.25, 0.25)):  # the fast end, so deep targets have a start
        for bits in ("float", "8"):
            out.append(space.uniform(keep=keep, bits=bits, stream=stream))
    out += smallest_candidates(space)
    unique = {Evaluator.key(c): c for c in out}
    return list(unique.values())


def open_study(optuna, storage: str, name: str, sampler, attempts: int = 5):
    """Create or load the study; SQLite waits up to a minute for a lock held by another worker, and a race
    between workers creating the same study at once is retried."""
    for attempt in range(attempts):
        try:  # both the schema and the study may be created by two workers at once
            db = (optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 60}})
                  if storage.startswith("sqlite") else storage)
            return optuna.create_study(study_name=name, storage=db, load_if_exists=True, sampler=sampler,
                                       directions=["maximize", "minimize", "minimize"])
        except Exception as exc:  # sqlalchemy's IntegrityError / OperationalError when two workers start together
            if attempt + 1 == attempts or "sqlalchemy" not in type(exc).__module__:
                raise
            time.sleep(0.2 + 0.3 * attempt + (os.getpid() % 7) / 10)


def smallest_candidates(space: SearchSpace) -> list[dict[str, Any]]:
    """The fastest corners of the space: every channel kept at the least, with and without low rank and int8."""
    return [space.uniform(keep=0.25, op=op, bits=bits) for op in ("keep", "lowrank:0.25") for bits in ("float", "8")]


def run_study(evaluator: Evaluator, goal_ms: float, *, storage: str, name: str, n_trials: int,
              timeout: float | None = None, seed: int = 0, population: int = 16, progress: bool = True,
              on_trial: Callable[[Any], None] | None = None):
    """Run (or continue) the NSGA-II study ``name`` in ``storage`` until it holds ``n_trials`` finished
    trials or ``timeout`` seconds pass. Objectives: maximize estimated top-1, minimize predicted latency,
    minimize stored bytes; constraint: predicted latency <= ``goal_ms``."""
    optuna = _optuna()
    space = evaluator.space
    per_trial = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5; older ones take constraints_func
    options = {} if per_trial else {"constraints_func": lambda t: [t.user_attrs["latency_ms"] - goal_ms]}
    sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed, **options)
    study = open_study(optuna, storage, name, sampler)
    states = optuna.trial.TrialState
    if not study.trials:
        for c in seeds(space)[:n_trials]:
            study.enqueue_trial(c, skip_if_exists=True)
    done = len(study.get_trials(deepcopy=False, states=(states.COMPLETE,)))
    bar = tqdm(total=n_trials, initial=min(done, n_trials), desc="search", unit="trial", disable=not progress)

    def objective(trial):
        candidate = {k.name: trial.suggest_categorical(k.name, list(k.choices)) for k in space.knobs}
        score = evaluator(candidate)
        for key, value in score.to_dict().items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if per_trial:
            trial.set_constraint("latency_ms", score.latency_ms - goal_ms)
        return score.top1, score.latency_ms, score.size_bytes

    def report(study, trial):
        bar.update(1)
        feasible = [t for t in study.get_trials(deepcopy=False, states=(states.COMPLETE,))
                    if t.user_attrs.get("latency_ms", math.inf) <= goal_ms]
        if feasible:
            best = max(feasible, key=lambda t: t.values[0])
            bar.set_postfix_str(f"best top-1 {100 * best.values[0]:.2f}% at {best.user_attrs['latency_ms']:.3g} ms "
                                f"(goal {goal_ms:.3g})")
        if on_trial:
            on_trial(trial)

    deadline = None if timeout is None else time.time() + timeout
    before = -1
    while True:
        done = len(study.get_trials(deepcopy=False, states=(states.COMPLETE,)))
        left = None if deadline is None else deadline - time.time()
        if done >= n_trials or (left is not None and left <= 0) or done == before:
            break  # finished, out of time, or a whole round failed (every candidate raised)
        before = done
        try:
            study.optimize(objective, n_trials=n_trials - done, timeout=left, catch=(NetslimError,),
                           callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=(states.COMPLETE,)), report])
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as exc:
            # two workers on SQLite both took the same queued trial and the other one told it first
            if isinstance(exc, ValueError) and "Cannot tell" not in str(exc):
                raise
            log.info("a queued trial was finished by another worker; continuing")
    bar.close()
    return study


@dataclass
class GreedyStep:
    candidate: dict
    top1: float
    latency_ms: float


def greedy_search(evaluator: Evaluator, goal_ms: float, *, max_steps: int = 40, progress: bool = True) -> list[GreedyStep]:
    """NetAdapt-style baseline (Yang et al. 2018): from the unchanged model, at each step try moving every
    knob one choice further along its list, and take the move losing the least estimated top-1 per
    millisecond saved; stop once the predicted latency meets ``goal_ms``. Returns the path taken."""
    space = evaluator.space
    current = space.identity()
    score = evaluator(current)
    path = [GreedyStep(dict(current), score.top1, score.latency_ms)]
    bar = tqdm(total=max_steps, desc="greedy", unit="step", disable=not progress)
    for _ in range(max_steps):
        if score.latency_ms <= goal_ms:
            break
        best, best_rate = None, -math.inf
        for knob in space.knobs:
            at = knob.choices.index(current[knob.name])
            if at + 1 >= len(knob.choices):
                continue
            trial = {**current, knob.name: knob.choices[at + 1]}
            s = evaluator(trial)
            saved = score.latency_ms - s.latency_ms
            if saved <= 0:
                continue
            rate = -(score.top1 - s.top1) / saved  # top-1 lost per ms saved, negated: larger is better
            if rate > best_rate:
                best, best_rate = (trial, s), rate
        bar.update(1)
        if best is None:
            break
        current, score = best
        path.append(GreedyStep(dict(current), score.top1, score.latency_ms))
        bar.set_postfix_str(f"top-1 {100 * score.top1:.2f}% at {score.latency_ms:.3g} ms")
    bar.close()
    return path


__all__ = ["Evaluator", "Score", "run_study", "greedy_search", "seeds", "study_name", "stored_size", "GreedyStep"]

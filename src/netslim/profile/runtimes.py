"""The same model timed in the runtimes it can be deployed with: PyTorch eager, ``torch.compile`` (inductor)
and onnxruntime, each at a fixed batch size and thread count.

Each runtime gets the model in the form that runs fastest there, with the same preparation for every model
so that a compressed model and its dense original are compared on equal terms:

* ``eager``: BatchNorm folded into the conv or linear before it (:func:`netslim.quant.graph.fold_batchnorm`,
  exact in eval mode) and the memory format, contiguous or channels-last, picked by measuring both;
* ``compile``: the folded model through ``torch.compile`` with inductor's ``freezing`` on (weights become
  constants, convolutions are pre-packed for oneDNN), compiled at the thread count it runs with;
* ``ort``: the model exported by :func:`netslim.export.onnx_bytes` in an onnxruntime CPU session with every
  graph optimization on (it folds BatchNorm and fuses activations itself).

:func:`time_runtimes` times several models in turn, round after round, so that drift on a busy machine
hits them all alike, and keeps each model's fastest round.
"""
from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import NetslimError, unknown_choice
from .latency import fixed_threads

RUNTIMES = ("eager", "compile", "ort")


@dataclass(frozen=True)
class Setting:
    """One timing condition: a runtime of :data:`RUNTIMES`, a batch size and an intra-op thread count."""

    runtime: str
    batch: int
    threads: int

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise unknown_choice("runtime", self.runtime, RUNTIMES)
        for what in ("batch", "threads"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NetslimError(f"{what} must be an integer >= 1, got {value!r}")

    @property
    def key(self) -> str:
        """``ort/b64/t1``."""
        return f"{self.runtime}/b{self.batch}/t{self.threads}"


@dataclass
class Timed:
    """The median milliseconds per forward of one model under one :class:`Setting` (the fastest round), and
    how it ran (``layout``: ``contiguous`` or ``channels_last`` in eager)."""

    setting: Setting
    ms: float
    layout: str = "contiguous"
    rounds_ms: list[float] = field(default_factory=list)


def folded(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that directly follows a conv or linear folded into it;
    a model torch.fx cannot trace is returned as an eval-mode copy unchanged."""
    from ..quant.graph import fold_batchnorm
    from ..surgery import safe_deepcopy
    from . import deployable_copy

    plain = deployable_copy(model).eval()
    try:
        return fold_batchnorm(plain)[0].eval()
    except Exception:  # not traceable by fx: time it as it is  # noqa: BLE001
        return safe_deepcopy(plain).eval()


def _batch(example_input: torch.Tensor, batch: int, channels_last: bool = False) -> torch.Tensor:
    x = example_input[:1].expand(batch, *example_input.shape[1:]).contiguous()
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _median_ms(run: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _Runner:
    """A model prepared once for one :class:`Setting`; :meth:`time` runs it ``repeats`` times."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, setting: Setting, warmup: int,
                 repeats: int) -> None:
        self.setting, self.warmup, self.repeats = setting, warmup, repeats
        self.layout = "contiguous"
        if setting.runtime == "ort":
            from ..export import onnx_bytes, ort_session, _feed
            session = ort_session(onnx_bytes(deployable(model), example_input[:1]), threads=setting.threads)
            feed = _feed(session, _batch(example_input, setting.batch))
            self._run = lambda: session.run(None, feed)
            return
        model = folded(model)
        if setting.runtime == "eager":
            self._prepare_eager(model, example_input)
        else:
            self._prepare_compiled(model, example_input)

    def _prepare_eager(self, model: nn.Module, example_input: torch.Tensor) -> None:
        plain, x = model, _batch(example_input, self.setting.batch)
        last = _channels_last_copy(model)
        x_last = _batch(example_input, self.setting.batch, channels_last=True)
        with fixed_threads(self.setting.threads), torch.inference_mode():
            t_plain = _median_ms(lambda: plain(x), self.warmup, self.repeats)
            t_last = _median_ms(lambda: last(x_last), self.warmup, self.repeats) if last is not None else float("inf")
        if t_last < t_plain:
            self.layout, model, x = "channels_last", last, x_last
        self._run = _in_inference(lambda: model(x))

    def _prepare_compiled(self, model: nn.Module, example_input: torch.Tensor) -> None:
        import torch._dynamo as dynamo
        import torch._inductor.config as inductor_config

        dynamo.reset()
        x = _batch(example_input, self.setting.batch)
        with fixed_threads(self.setting.threads), inductor_config.patch(freezing=True), torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch.compile(model, dynamic=False)
            try:
                compiled(x)  # compiles at this batch and thread count
            except Exception as exc:  # noqa: BLE001
                raise NetslimError(f"torch.compile failed on this model: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200]}") from None
        self._run = _in_no_grad(lambda: compiled(x))

    def time(self) -> float:
        with fixed_threads(self.setting.threads):
            return _median_ms(self._run, self.warmup, self.repeats)


def deployable(model: nn.Module) -> nn.Module:
    """The eval-mode copy with parametrizations baked in that onnxruntime is given."""
    from . import deployable_copy
    return deployable_copy(model).eval()


def _channels_last_copy(model: nn.Module) -> nn.Module | None:
    from ..surgery import safe_deepcopy
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return None
    return safe_deepcopy(model).to(memory_format=torch.channels_last)


def _in_inference(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return fn()
    return run


def _in_no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()
    return run


def time_runtimes(models: dict[str, nn.Module], example_input: torch.Tensor, settings: list[Setting], *,
                  rounds: int = 3, warmup: int = 3, repeats: int = 15,
                  progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Timed]]:
    """``{model name: {setting key: Timed}}``: every model timed under every setting.

    For each setting all models are prepared first (exported, folded, compiled), then timed in turn for
    ``rounds`` rounds; a model's figure is its fastest round's median over ``repeats`` runs after ``warmup``.
    ``example_input``: one CPU tensor whose first sample is repeated to each batch size."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise NetslimError("time_runtimes needs one batched input tensor as the example input")
    if rounds < 1 or repeats < 1 or warmup < 0:
        raise NetslimError(f"rounds and repeats must be >= 1 and warmup >= 0, got {rounds}, {repeats}, {warmup}")
    out: dict[str, dict[str, Timed]] = {name: {} for name in models}
    for setting in settings:
        runners = {}
        for name, model in models.items():
            if progress:
                progress(f"{setting.key}: preparing {name}")
            runners[name] = _Runner(model, example_input, setting, warmup, repeats)
        per_round: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, runner in runners.items():
                per_round[name].append(runner.time())
        for name, runner in runners.items():
            out[name][setting.key] = Timed(setting, min(per_round[name]), runner.layout, per_round[name])
        runners.clear()
        with contextlib.suppress(Exception):
            import torch._dynamo as dynamo
            dynamo.reset()
    return out


__all__ = ["RUNTIMES", "Setting", "Timed", "folded", "time_runtimes"]

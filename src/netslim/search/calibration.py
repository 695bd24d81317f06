"""From the lookup table's sum to a whole-model latency: a small linear correction fit on a few models
measured whole on the target.

A layer timed alone carries costs it does not have inside the model (the runtime's call and the copy of
its input and output, the quantize / dequantize pairs that onnxruntime fuses away between int8 layers),
and the model carries costs no layer has (BatchNorm, activations, adds, pooling). So, as latency
predictors built on lookup tables do (e.g. Dudziak et al. 2020, "BRP-NAS"; Cai et al. 2019,
"ProxylessNAS", whose latency model is a sum over layers), netslim fits

    latency = a * sum(float layer times) + b * sum(int8 layer times) + c * (number of layers)
              + d * (residual scaled by activation volume)

with non-negative coefficients (``c`` of either sign: it corrects the per-call overhead the table
subtracted) by least squares on the relative error over a handful of models spanning the search space (the
dense one, uniform channel keeps, factorized, compact and int8 ones), each measured whole, and reports
the error of the fit on every one of them. The coefficients are what is learned; the layer times stay
measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .cost import LatencyTable, measure_ms, paired_ms

FEATURES = ("float_layer_sum", "int8_layer_sum", "layers", "residual")


def features(table: LatencyTable, model: nn.Module, example_input: torch.Tensor) -> list[float]:
    """The table's sums over float and over int8 layers, the number of layers, the scaled residual."""
    p = table.predict(model, example_input)
    int8 = {name for name, _m, _s, q in table.units(model, example_input) if q and table.device.name == "ort-cpu"}
    float_sum = sum(ms for name, ms in p.units_ms.items() if name not in int8)
    int8_sum = sum(ms for name, ms in p.units_ms.items() if name in int8)
    return [float_sum, int8_sum, float(len(p.units_ms)), p.residual_ms]


def nonnegative_least_squares(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 by an active set: drop the most negative column and refit."""
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


@dataclass
class LatencyModel:
    """The calibrated predictor: ``coef`` over :data:`FEATURES` of ``table``'s prediction, and ``fit``:
    per calibration model its measured and predicted ms and the relative error."""

    table: LatencyTable
    coef: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.0, 1.0])
    fit: list[dict] = field(default_factory=list)

    def predict(self, model: nn.Module, example_input: torch.Tensor) -> float:
        return float(np.dot(self.coef, features(self.table, model, example_input)))

    @property
    def max_fit_error(self) -> float:
        return max((abs(r["error"]) for r in self.fit), default=float("nan"))


def measured_whole(table: LatencyTable, models: dict[str, nn.Module], example_input: torch.Tensor,
                   repeats: int = 30, pairs: int = 60) -> list[float]:
    """Each model's whole latency on ``table``'s device: the first model timed alone, every other one timed
    run by run in turn with it (:func:`~netslim.search.cost.paired_ms`) and given as the first's time
    scaled by their ratio, so that drift between measurements does not enter the fit."""
    names = list(models)
    first = measure_ms(table.device, models[names[0]], example_input, repeats=repeats, rounds=3)
    out = [first]
    for n in names[1:]:
        ms, reference_ms = paired_ms(table.device, models[n], models[names[0]], example_input, pairs=pairs)
        out.append(first * ms / reference_ms)
    return out


def fit_latency_model(table: LatencyTable, models: dict[str, nn.Module], example_input: torch.Tensor,
                      repeats: int = 30) -> LatencyModel:
    """Measure each of ``models`` whole on ``table``'s device (:func:`measured_whole`), fit the coefficients
    to the *relative* error (each model's row divided by its time, so the small models a deep target ends
    at weigh as much as the dense one), and record the errors."""
    names = list(models)
    rows = [features(table, models[n], example_input) for n in names]
    measured = measured_whole(table, models, example_input, repeats)
    a, y = np.array(rows), np.array(measured)
    if len(names) >= 2:  # the per-layer term may be either sign (the table's overhead subtraction can miss both ways)
        signed = nonnegative_least_squares(np.concatenate([a, -a[:, 2:3]], axis=1) / y[:, None], np.ones_like(y))
        coef = signed[:4] - np.array([0.0, 0.0, signed[4], 0.0])
    else:
        coef = np.array([1.0, 1.0, 0.0, 1.0])
    fitted = a @ coef
    fit = [{"model": n, "measured_ms": float(m), "predicted_ms": float(p), "error": float(p / m - 1),
            "table_sum_ms": float(r[0] + r[1] + r[3])} for n, m, p, r in zip(names, measured, fitted, rows)]
    return LatencyModel(table, [float(c) for c in coef], fit)


__all__ = ["LatencyModel", "fit_latency_model", "measured_whole", "features", "FEATURES", "nonnegative_least_squares"]

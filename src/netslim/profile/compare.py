"""The six ratios of the model-compression survey, original vs. compressed.

* r_A  accuracy ratio        top-1(compressed) / top-1(original)           (1.0 = no loss)
* r_p  parameter memory      stored bytes(original) / stored bytes(compressed)  (>1 = smaller)
* r_T  latency (speed-up)    latency(original) / latency(compressed), same run, same batch
* r_c  computation           effective MACs(original) / effective MACs(compressed)
* r_E  energy                energy(original) / energy(compressed), 45 nm model of :mod:`.energy`
* r_D  index space           index bytes(compressed) / stored bytes(compressed): the share of the
                             compressed model spent on positions of non-zeros (0 for dense tensors)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import NetslimError
from ..outputs import tree_to

RATIO_NAMES = ("r_A", "r_p", "r_T", "r_c", "r_E", "r_D")


@dataclass
class Comparison:
    original: "Profile"
    compressed: "Profile"
    top1_original: float | None
    top1_compressed: float | None

    @property
    def ratios(self) -> dict[str, float | None]:
        o, c = self.original, self.compressed
        bs = min(set(o.latency_ms) & set(c.latency_ms), default=None)
        return {
            "r_A": _div(self.top1_compressed, self.top1_original),
            "r_p": _div(o.stored_bytes, c.stored_bytes),
            "r_T": _div(o.latency_ms.get(bs), c.latency_ms.get(bs)) if bs is not None else None,
            "r_c": _div(o.effective_macs, c.effective_macs),
            "r_E": _div(o.energy.total_pj, c.energy.total_pj),
            "r_D": _div(c.index_bytes, c.stored_bytes),
        }

    def to_dict(self) -> dict:
        return {
            "ratios": self.ratios,
            "top1_original": self.top1_original, "top1_compressed": self.top1_compressed,
            "original": self.original.to_dict(layers=False), "compressed": self.compressed.to_dict(layers=False),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        o, c = self.original, self.compressed
        bs = min(set(o.latency_ms) & set(c.latency_ms), default=None)
        rows = [
            ("r_A", "top-1 accuracy", _pct(self.top1_original), _pct(self.top1_compressed)),
            ("r_p", "stored bytes", f"{o.stored_bytes:,}", f"{c.stored_bytes:,}"),
            ("r_T", f"latency ms (batch {bs})", _ms(o.latency_ms.get(bs)), _ms(c.latency_ms.get(bs))),
            ("r_c", "effective MACs", f"{o.effective_macs:,}", f"{c.effective_macs:,}"),
            ("r_E", "energy uJ (45 nm)", f"{o.energy.total_pj / 1e6:.3f}", f"{c.energy.total_pj / 1e6:.3f}"),
            ("r_D", "index bytes", f"{o.index_bytes:,}", f"{c.index_bytes:,}"),
        ]
        ratios = self.ratios
        lines = [f"{'ratio':<6}{'measure':<26}{'original':>16}{'compressed':>16}{'ratio':>10}", "-" * 74]
        for key, what, a, b in rows:
            r = ratios[key]
            lines.append(f"{key:<6}{what:<26}{a:>16}{b:>16}{'n/a' if r is None else f'{r:.3f}':>10}")
        return "\n".join(lines)


def _div(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def compare(original: nn.Module, compressed: nn.Module, data: DataLoader | None = None, *,
            example_input: Any = None, batch_sizes: tuple[int, ...] = (1,),
            latency: bool = True, compressed_stored_size: int | None = None, compressed_index_size: int = 0,
            top1_original: float | None = None, device: str | torch.device | None = None,
            repeats: int = 20) -> Comparison:
    """Profile both models on the same input in the same run and evaluate both on ``data``.

    ``example_input`` (a tensor, a tuple of inputs or a list of images, as for :func:`profile`) defaults to
    one sample of ``data``. Latencies of the two models are
    measured back to back in this call with the same settings, so their ratio is fair. ``device`` defaults to
    :func:`netslim.train.default_device`, as everywhere in netslim.
    """
    from . import profile
    from ..train import default_device, evaluate

    device = default_device() if device is None else torch.device(device)
    if example_input is None:
        if data is None:
            raise NetslimError("compare needs example_input or data (a DataLoader of (inputs, targets)); got neither")
        example_input = next(iter(data))[0][:1]
    example_input = tree_to(example_input, device)
    p_orig = profile(original, example_input, latency=latency, batch_sizes=batch_sizes, repeats=repeats)
    p_comp = profile(compressed, example_input, latency=latency, batch_sizes=batch_sizes, repeats=repeats,
                     stored_size=compressed_stored_size, index_size=compressed_index_size)
    top1_c = None
    if data is not None:
        if top1_original is None:
            top1_original = evaluate(original, data, device=device)["top1"]
        top1_c = evaluate(compressed, data, device=device)["top1"]
    return Comparison(p_orig, p_comp, top1_original, top1_c)

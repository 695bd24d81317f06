"""Data-aware correction of decomposed layers: asymmetric reconstruction (Zhang, Zou, He & Sun 2016,
"Accelerating Very Deep Convolutional Networks for Classification and Detection", Sec. 3.3).

A decomposition is the best low-rank fit of a layer's *weights*; what matters is the layer's
*outputs* on real data, and in a deep network each approximated layer also receives the errors of
the ones before it. So, layer by layer in forward order, the last factor of every decomposed layer
(the 1 x k conv of a spatial split, the closing 1x1 of CP / Tucker-2 / SVD) is refit by linear least
squares: its inputs come from the *decomposed* model, its targets are the *original* layer's outputs
on the original model's inputs. Earlier errors are thereby compensated, not accumulated.
The solver is the shared :mod:`netslim.refit` (compact filters use it too).
"""
from __future__ import annotations

import torch
from torch import nn

from ..data import image_batch
from ..deprecation import renamed_argument
from ..errors import NetslimError
from ..refit import least_squares, refit_heads_


def _is_decomposed(module: nn.Module | None) -> bool:
    """A Sequential whose last layer is a dense (ungrouped) conv or a linear layer: what refit can solve."""
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        return False
    last = module[-1]
    return isinstance(last, nn.Linear) or (isinstance(last, nn.Conv2d) and last.groups == 1)


def refit_(model: nn.Module, original: nn.Module, calib_data=None, layers: list[str] | tuple[str, ...] = (),
           positions: int = 16, ridge: float = 1e-4, seed: int = 0, progress: bool = False, *,
           calib_images: int = 256, images: torch.Tensor | None = None,
           sequential: bool = True) -> dict[str, tuple[float, float]]:
    """Refit the last factor of each decomposed layer in ``layers`` (names of ``nn.Sequential`` replacements
    in ``model``, in forward order) to the original layer's outputs on
    ``calib_data`` (a tensor of images, or ``calib_images`` of a Dataset / DataLoader, see
    :func:`netslim.data.image_batch`). ``images=`` is the deprecated name of ``calib_data``.

    ``sequential=False``: all layers from one pass (see :func:`netslim.refit.refit_heads_`).
    Returns ``{layer: (relative output error before, after)}`` measured on the sampled positions.
    """
    calib_data = renamed_argument(calib_data, images, "images", "calib_data", "refit_")
    if calib_data is None:
        raise NetslimError("refit_ needs calib_data: images to refit on")
    images = image_batch(calib_data, calib_images) if not isinstance(calib_data, torch.Tensor) else calib_data
    modules = dict(model.named_modules())
    if not layers:
        raise NetslimError("refit_ needs layers: the names of the decomposed layers to refit")
    for name in layers:
        if not _is_decomposed(modules.get(name)):
            raise NetslimError(f"{name!r} is not a decomposed layer of the model; decomposed: "
                               f"{', '.join(n for n, m in modules.items() if _is_decomposed(m) and n) or 'none'}")
    return refit_heads_(model, original, images, layers, lambda block: [(block[-1], None)], positions, ridge,
                        seed, progress, sequential)


__all__ = ["refit_", "least_squares"]

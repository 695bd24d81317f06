"""Data-aware correction of decomposed layers: asymmetric reconstruction (Zhang, Zou, He & Sun 2016,
"Accelerating Very Deep Convolutional Networks for Classification and Detection", Sec. 3.3).

A decomposition is the best low-rank fit of a layer's *weights*; what matters is the layer's
*outputs* on real data, and in a deep network each approximated layer also receives the errors of
the ones before it. So, layer by layer in forward order, the last factor of every decomposed layer
(the 1 x k conv of a spatial split, the closing 1x1 of CP / Tucker-2 / SVD) is refit by linear least
squares: its inputs come from the *decomposed* model, its targets are the *original* layer's outputs
on the original model's inputs. Earlier errors are thereby compensated, not accumulated.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import image_batch
from ..deprecation import renamed_argument
from ..errors import NetslimError

log = logging.getLogger("netslim.lowrank")


class _Captured(Exception):
    """Raised by a hook to stop the forward pass once the wanted input is captured."""


def _forward_until_captured(model: nn.Module, images: torch.Tensor, handle) -> None:
    """Run ``model`` on ``images`` until the hook behind ``handle`` raises :class:`_Captured`; remove the hook."""
    try:
        with torch.no_grad():
            model.eval()(images)
    except _Captured:
        pass
    finally:
        handle.remove()


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, features, positions): what ``layer`` multiplies by its weight at each output position."""
    if isinstance(layer, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2) if x.dim() > 2 else x[:, :, None]
    return F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)


def _outputs(y: torch.Tensor) -> torch.Tensor:
    """(N, channels, positions) of a layer's output."""
    if y.dim() == 2:
        return y[:, :, None]
    if y.dim() == 4:
        return y.flatten(2)
    return y.reshape(y.shape[0], -1, y.shape[-1]).transpose(1, 2)


def _pick(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows (samples, features) of ``t`` (N, features, positions) at positions ``idx`` (N, P)."""
    return torch.gather(t, 2, idx[:, None, :].expand(-1, t.shape[1], -1)).permute(0, 2, 1).reshape(-1, t.shape[1])


def _original_target(original: nn.Module, name: str, images: torch.Tensor, positions: int,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled output positions (N, P) of the original layer ``name`` and its outputs there, bias removed;
    the forward stops at that layer, so memory holds one layer's targets at a time."""
    got = []

    def fn(module, _inp, out):
        y = _outputs(out.detach())
        if module.bias is not None:
            y = y - module.bias.detach()[None, :, None]
        idx = torch.randint(0, y.shape[2], (y.shape[0], min(positions, y.shape[2])), generator=gen).to(y.device)
        got.append((idx, _pick(y, idx).double()))
        raise _Captured

    _forward_until_captured(original, images, original.get_submodule(name).register_forward_hook(fn))
    return got[0]


def _current_inputs(model: nn.Module, last: nn.Module, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Inputs of ``last`` in ``model`` at the sampled output positions; the forward stops there."""
    got = []

    def fn(module, inp):
        got.append(_pick(_columns(module, inp[0].detach()), idx).double())
        raise _Captured

    _forward_until_captured(model, images, last.register_forward_pre_hook(fn))
    return got[0]


def _is_decomposed(module: nn.Module | None) -> bool:
    """A Sequential whose last layer is a dense (ungrouped) conv or a linear layer: what refit can solve."""
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        return False
    last = module[-1]
    return isinstance(last, nn.Linear) or (isinstance(last, nn.Conv2d) and last.groups == 1)


def least_squares(a: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """W (outputs, features) minimising ``||a W^T - y||^2 + ridge * mean(diag(a^T a)) ||W||^2``."""
    gram = a.T @ a
    gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, a.T @ y).T


def refit_(model: nn.Module, original: nn.Module, calib_data=None, layers: list[str] | tuple[str, ...] = (),
           positions: int = 16, ridge: float = 1e-4, seed: int = 0, progress: bool = False, *,
           calib_images: int = 256, images: torch.Tensor | None = None) -> dict[str, tuple[float, float]]:
    """Refit the last factor of each decomposed layer in ``layers`` (names of ``nn.Sequential`` replacements
    in ``model``, in forward order) to the original layer's outputs on
    ``calib_data`` (a tensor of images, or ``calib_images`` of a Dataset / DataLoader, see
    :func:`netslim.data.image_batch`). ``images=`` is the deprecated name of ``calib_data``.

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
    gen = torch.Generator().manual_seed(seed)
    errors: dict[str, tuple[float, float]] = {}
    for name in tqdm(layers, desc="refit", disable=not progress, leave=False):
        last = modules[name][-1]
        idx, y = _original_target(original, name, images, positions, gen)
        a = _current_inputs(model, last, images, idx)
        w_old = last.weight.detach().reshape(last.weight.shape[0], -1).double()
        w_new = least_squares(a, y, ridge)
        norm = y.norm().clamp_min(1e-12)
        before, after = float((a @ w_old.T - y).norm() / norm), float((a @ w_new.T - y).norm() / norm)
        if after < before:
            with torch.no_grad():
                last.weight.copy_(w_new.reshape(last.weight.shape).to(last.weight.dtype))
        errors[name] = (before, min(before, after))
        log.info("refit %s: relative output error %.4f -> %.4f", name, before, min(before, after))
    return errors

"""Fine-tuning and evaluation: one loop that every technique plugs into through hooks.

* :func:`evaluate` - top-1 / top-5 / loss of a model on a dataset (sharded under DDP).
* :func:`fit` - SGD or Adam with a cosine or constant schedule, progress bar, AMP on CUDA,
  seeds, atomic per-epoch checkpoints that a restarted call resumes from, and
  :class:`TrainHook` points for masks, regularizers, distillation losses and observers.
* Multi-GPU / multi-process: run under ``torchrun``; :func:`init_distributed` sets up the
  process group (NCCL on CUDA, gloo on CPU) and :func:`fit` wraps the model in
  ``DistributedDataParallel`` with a ``DistributedSampler``.
"""
from __future__ import annotations

import logging
import math
import os
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from .errors import NetslimError, unknown_choice
from .data.resident import ResidentImages, resident_images
from .io import save_torch

log = logging.getLogger("netslim.train")

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "step")
AMP_DTYPES = ("bfloat16", "float16")


@dataclass
class TrainConfig:
    """Knobs of :func:`fit`; the ``finetune`` recipe stage takes exactly these fields.

    The speed knobs, each ``None`` by default: on CUDA only, so the CPU loop stays as it was.
    ``resident_data`` keeps an in-memory image dataset (CIFAR, MNIST) on the training device as
    uint8 and augments whole batches there (:mod:`netslim.data.resident`; on the CPU it is 11-19 %
    faster too, ``bench/train_throughput.py``); ``channels_last`` trains in NHWC. ``amp`` on CUDA
    autocasts to ``amp_dtype`` (bfloat16 needs no loss scaling; float16 uses a ``GradScaler``);
    ``compile`` runs the model through ``torch.compile``.
    """

    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: bool = True
    seed: int = 0
    workers: int = 0
    max_steps_per_epoch: int | None = None
    eval_every: int = 0
    resident_data: bool | None = None
    channels_last: bool | None = None
    amp_dtype: str = "bfloat16"
    compile: bool = False

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.optimizer not in OPTIMIZERS:
            raise unknown_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, SCHEDULES)
        if self.amp_dtype not in AMP_DTYPES:
            raise unknown_choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        if self.epochs < 0 or self.batch_size < 1:
            raise NetslimError(f"epochs must be >= 0 and batch_size >= 1, got {self.epochs} and {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NetslimError(f"lr must be a positive number, got {self.lr}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise NetslimError(f"max_steps_per_epoch must be >= 1, got {self.max_steps_per_epoch}")
        if self.workers < 0 or self.eval_every < 0 or self.warmup_epochs < 0:
            raise NetslimError("workers, eval_every and warmup_epochs must be >= 0")


_INT_FIELDS = ("epochs", "batch_size", "seed", "workers", "eval_every")
_FLOAT_FIELDS = ("lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing")
_BOOL_FIELDS = ("nesterov", "amp", "compile")


def _check_field_types(cfg) -> None:
    """Types of the :class:`TrainConfig` fields, checked before any work (``epochs: 1.5`` is refused)."""
    for name in _INT_FIELDS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise NetslimError(f"{name} must be an integer, got {value!r}")
    if cfg.max_steps_per_epoch is not None and (isinstance(cfg.max_steps_per_epoch, bool)
                                                or not isinstance(cfg.max_steps_per_epoch, int)):
        raise NetslimError(f"max_steps_per_epoch must be an integer, got {cfg.max_steps_per_epoch!r}")
    for name in _FLOAT_FIELDS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise NetslimError(f"{name} must be a number, got {value!r}")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(cfg, name), bool):
            raise NetslimError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("resident_data", "channels_last"):
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, bool):
            raise NetslimError(f"{name} must be true, false or null (on CUDA only), got {value!r}")
    for name in ("optimizer", "schedule", "amp_dtype"):
        if not isinstance(getattr(cfg, name), str):
            raise NetslimError(f"{name} must be a string, got {getattr(cfg, name)!r}")


class TrainHook:
    """Extension points of :func:`fit`; override what you need. ``model`` is never the DDP wrapper."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called once, after the optimizer exists (e.g. to add parameters or register observers)."""

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             outputs: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Return the loss to minimise (add regularizers or distillation terms here)."""
        return loss

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimizer step (projections, mask updates)."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called after each epoch, before the checkpoint is written."""

    def state_dict(self) -> dict:
        """What the hook needs to continue after a resume (step counters, schedules); saved in the
        per-epoch checkpoint. Plain tensors, numbers, strings, lists and dicts only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` when :func:`fit` resumes (called after ``on_train_start``)."""


# ------------------------------------------------------------------ distributed helpers
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def init_distributed() -> bool:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "mps")


def check_device(name) -> torch.device:
    """``name`` as a device that exists here, or a :class:`NetslimError` naming it and the choices."""
    if isinstance(name, torch.device):
        device = name
    else:
        if not isinstance(name, str):
            raise NetslimError(f"device must be a string such as 'cpu' or 'cuda', got {name!r}")
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise NetslimError(f"unknown device {name!r}; valid choices: {', '.join(DEVICE_CHOICES)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NetslimError(f"device {name!r} asked for, but no CUDA GPU is available here; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise NetslimError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise NetslimError(f"device {name!r} asked for, but MPS is not available here; use 'cpu'")
    elif device.type != "cpu":
        raise NetslimError(f"unsupported device {name!r}; valid choices: {', '.join(DEVICE_CHOICES)}")
    return device


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ evaluation
def _as_loader(data: DataLoader | Dataset, batch_size: int, sampler=None) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=False, sampler=sampler)


@torch.no_grad()
def evaluate(model: nn.Module, data: DataLoader | Dataset, device: str | torch.device | None = None,
             batch_size: int = 256, progress: bool = False, max_batches: int | None = None) -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy of ``model`` on ``data`` (a Dataset or DataLoader).

    Under DDP each process evaluates a shard of a Dataset and the counts are summed.
    """
    device = torch.device(device) if device is not None else default_device()
    sampler = None
    if is_distributed() and not isinstance(data, DataLoader):
        sampler = DistributedSampler(data, shuffle=False, drop_last=False)
    # the CPU keeps the Dataset path (its float rounding, to the last bit, as it always was)
    resident = (None if sampler is not None or device.type == "cpu"
                else resident_images(data, device, augment=False))
    loader = (resident.batches(batch_size, augment=False) if resident is not None
              else _as_loader(data, batch_size, sampler))
    was_training = model.training
    model.eval().to(device)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, n
    try:
        total = resident.num_batches(batch_size) if resident is not None else None
        batches = tqdm(loader, total=total, desc="evaluate", leave=False, disable=not progress or rank() != 0)
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            if not torch.isfinite(out).all():
                raise NetslimError("the model produced NaN or infinite outputs; check its weights")
            k = min(5, out.shape[1])
            top = out.topk(k, dim=1).indices
            totals[0] += (top[:, 0] == y).sum()
            totals[1] += (top == y[:, None]).any(dim=1).sum()
            totals[2] += nn.functional.cross_entropy(out, y, reduction="sum")
            totals[3] += y.numel()
    finally:
        model.train(was_training)
    if is_distributed() and sampler is not None:
        dist.all_reduce(totals)
    n = max(totals[3].item(), 1.0)
    return {"top1": totals[0].item() / n, "top5": totals[1].item() / n, "loss": totals[2].item() / n,
            "n": int(totals[3].item())}


# ------------------------------------------------------------------ training
def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, over ``model``'s trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """The learning-rate multiplier at optimizer ``step`` of ``total``: warm-up, then ``cfg.schedule``."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":  # /10 at 50 % and 75 % of training
        return 0.1 ** sum(step >= total * f for f in (0.5, 0.75))
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainState:
    epoch: int = 0
    history: list[dict] = field(default_factory=list)


def _save_checkpoint(path: Path, model: nn.Module, optimizer, scaler, state: TrainState, cfg: TrainConfig,
                     hooks=()) -> None:
    save_torch({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": state.epoch, "history": state.history, "config": asdict(cfg),
        "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "hooks": [h.state_dict() if callable(getattr(h, "state_dict", None)) else {} for h in hooks],
    }, path)


def _load_checkpoint(path: Path, model: nn.Module, optimizer, scaler, hooks=()) -> TrainState:
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, a truncated zip, a pickle that is not plain tensors
        import pickle

        first = ("not a file of plain tensors; netslim never unpickles objects or code"
                 if isinstance(exc, pickle.UnpicklingError) else
                 (str(exc).splitlines() or [type(exc).__name__])[0][:200])
        raise NetslimError(f"{path} is not a netslim training checkpoint ({first}); delete it to start over") \
            from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch", "history", "rng"} <= set(ckpt):
        raise NetslimError(f"{path} is not a netslim training checkpoint (missing keys); delete it to start over")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        if torch.cuda.is_available() and ckpt.get("cuda_rng"):
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        hook_states = ckpt.get("hooks") or []
        for h, hs in zip(hooks, hook_states):
            if hs and callable(getattr(h, "load_state_dict", None)):
                h.load_state_dict(hs)
        return TrainState(epoch=int(ckpt["epoch"]), history=list(ckpt["history"]))
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise NetslimError(f"{path} does not fit this model or training ({first}); delete it to start over") \
            from None


def _bf16_ok(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def _epoch_generator(device: torch.device, seed: int, epoch: int) -> torch.Generator:
    """The device-side generator of one epoch's order and crops: a resumed run replays the same epoch."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch + 1_000 * rank())


def fit(model: nn.Module, train_data: Dataset | DataLoader, config: TrainConfig | None = None, *,
        hooks: Sequence[TrainHook] = (), eval_data: Dataset | DataLoader | None = None,
        checkpoint_path: str | Path | None = None, device: str | torch.device | None = None,
        progress: bool = True) -> list[dict]:
    """Train ``model`` in place on ``train_data``; return the per-epoch history.

    When ``checkpoint_path`` is given, a checkpoint is written atomically after every epoch
    and a later call with the same path resumes after the last finished epoch (model,
    optimizer, AMP scaler and RNG state restored).
    """
    cfg = config or TrainConfig()
    device = check_device(device) if device is not None else default_device()
    seed_everything(cfg.seed + rank())
    model.to(device).train()
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    use_resident = cfg.resident_data if cfg.resident_data is not None else device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    sampler = None
    if is_distributed():
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if not isinstance(train_data, DataLoader):
            sampler = DistributedSampler(train_data, shuffle=True, seed=cfg.seed, drop_last=True)
    if cfg.compile:
        net = torch.compile(net)
    resident = (resident_images(train_data, device) if use_resident and sampler is None
                and not isinstance(train_data, DataLoader) else None)
    drop_last = len(train_data) > cfg.batch_size
    loader = None
    if resident is None:
        loader = train_data if isinstance(train_data, DataLoader) else DataLoader(
            train_data, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
            num_workers=cfg.workers, drop_last=drop_last, persistent_workers=cfg.workers > 0)
    batches_per_epoch = len(loader) if loader is not None else resident.num_batches(cfg.batch_size, drop_last)
    steps_per_epoch = batches_per_epoch if cfg.max_steps_per_epoch is None else min(batches_per_epoch,
                                                                                     cfg.max_steps_per_epoch)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    optimizer = make_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" and _bf16_ok(device) else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for h in hooks:
        h.on_train_start(model, optimizer)

    state = TrainState()
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.is_file():
        state = _load_checkpoint(ckpt, model, optimizer, scaler, hooks)
        if rank() == 0:
            log.info("resumed from %s after epoch %d", ckpt, state.epoch)

    for epoch in range(state.epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        seen, correct, loss_sum = 0, 0.0, torch.zeros((), device=device)
        epoch_batches = (loader if resident is None else resident.batches(
            cfg.batch_size, shuffle=True, drop_last=drop_last, channels_last=channels_last,
            generator=_epoch_generator(device, cfg.seed, epoch)))
        bar = tqdm(epoch_batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress or rank() != 0, leave=False, mininterval=1.0)
        for i, (x, y) in enumerate(bar):
            if i >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + i
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * lr_factor(cfg, step, total_steps, steps_per_epoch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                out = net(x)
                loss = criterion(out, y)
                for h in hooks:
                    loss = h.loss(model, x, y, out, loss)
            if (device.type != "cuda" or i % 25 == 0) and not torch.isfinite(loss):  # a GPU checks now and then
                raise NetslimError(f"training diverged: loss is {loss.item()} at epoch {epoch + 1}, step {i}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            for h in hooks:
                h.after_step(model)
            seen += y.numel()
            correct += (out.detach().argmax(1) == y).sum()
            loss_sum += loss.detach() * y.numel()
            if i % 20 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{float(correct) / seen:.4f}")
        loss_sum, correct = loss_sum.item(), float(correct)
        for h in hooks:
            h.on_epoch_end(model, epoch)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1),
                  "lr": optimizer.param_groups[0]["lr"]}
        if eval_data is not None and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
            record.update({f"eval_{k}": v for k, v in evaluate(model, eval_data, device).items() if k != "n"})
        state.history.append(record)
        state.epoch = epoch + 1
        if rank() == 0:
            log.info("epoch %d/%d %s", epoch + 1, cfg.epochs,
                     " ".join(f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float)))
            if ckpt is not None:
                _save_checkpoint(ckpt, model, optimizer, scaler, state, cfg, hooks)
        if is_distributed():
            dist.barrier()
    return state.history


def training_throughput(model: nn.Module, train_data: Dataset, config: TrainConfig | None = None, *,
                        steps: int = 20, warmup: int = 5, device: str | torch.device | None = None) -> float:
    """Training images per second of :func:`fit` with ``config`` on ``device``: ``warmup`` steps
    (allocator, cuDNN autotuning, ``torch.compile``) and then ``steps`` timed steps. Trains ``model``."""
    import time

    cfg = config or TrainConfig()
    device = check_device(device) if device is not None else default_device()

    def run(n: int) -> float:
        c = TrainConfig(**{**asdict(cfg), "epochs": 1, "max_steps_per_epoch": n})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fit(model, train_data, c, device=device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    run(warmup)
    return steps * cfg.batch_size / run(steps)


__all__ = ["TrainConfig", "TrainHook", "fit", "training_throughput", "evaluate", "init_distributed", "seed_everything", "default_device",
           "check_device"]

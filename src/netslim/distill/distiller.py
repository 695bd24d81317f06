"""``distill(student, teacher, data, losses={...})``: distillation as a :class:`~netslim.train.TrainHook` of ``fit``.

The student trains with :func:`netslim.train.fit` (same optimizer, schedule, AMP, DDP, resumable
checkpoints); a :class:`DistillHook` runs the teacher on each batch (eval mode, no gradients),
reads both models' features through forward hooks and adds the weighted distillation terms to
the cross-entropy. Adapters, CRD heads and memories live in a :class:`DistillationLoss` module
whose parameters join the optimizer in ``on_train_start``; its state is saved beside fit's
checkpoint after every epoch, so a resumed run continues with the same adapters.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from ..deprecation import renamed_argument
from ..errors import NetslimError, unknown_choice
from ..io import load_checkpoint, save_torch
from ..train import TrainConfig, TrainHook, default_device, fit, is_distributed, rank, seed_everything
from .features import FeatureTap, as_embedding, is_feature_map, last_linear_name, make_adapter
from .losses import ATLoss, CRDLoss, FitNetLoss, FSPLoss, NSTLoss, PKTLoss, RKDLoss, SPLoss, kd_loss

log = logging.getLogger("netslim.distill")

# what each loss compares: the logits, pairs of (teacher layer, student layer), or the embeddings
LOSSES: dict[str, str] = {
    "kd": "logits",
    "fitnet": "layers", "at": "layers", "fsp": "layers", "sp": "layers", "nst": "layers",
    "rkd": "embedding", "rkd_distance": "embedding", "rkd_angle": "embedding", "pkt": "embedding",
    "crd": "embedding",
}
WEIGHT_KEYS = ("ce", *LOSSES)  # "ce": the weight of the cross-entropy with the labels
LAYER_LOSSES = tuple(n for n, kind in LOSSES.items() if kind == "layers")
EMBEDDING_LOSSES = tuple(n for n, kind in LOSSES.items() if kind == "embedding")

LayerPair = tuple[str, str]  # (teacher layer, student layer)
LayerSpec = Union[Sequence[Union[str, Sequence[str]]], Mapping[str, Sequence[Union[str, Sequence[str]]]], None]


# ------------------------------------------------------------------ validating what the user asked for
def validate_losses(losses: Mapping[str, float] | None) -> dict[str, float]:
    """Check a ``{loss name: weight}`` mapping; unknown names and bad weights are one clear error."""
    if not isinstance(losses, Mapping) or not losses:
        raise NetslimError(f"losses must be a mapping of loss name to weight such as {{'kd': 0.9}}, got {losses!r}; "
                           f"valid loss names: {', '.join(WEIGHT_KEYS)}")
    weights: dict[str, float] = {}
    for name, weight in losses.items():
        if name not in WEIGHT_KEYS:
            raise unknown_choice("loss name", name, WEIGHT_KEYS)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise NetslimError(f"the weight of loss {name!r} must be a finite number >= 0, got {weight!r}")
        weights[name] = float(weight)
    if not any(w > 0 for n, w in weights.items() if n != "ce"):
        raise NetslimError(f"losses {weights} give no distillation loss a positive weight; "
                           f"valid loss names: {', '.join(LOSSES)}")
    return weights


def cross_entropy_weight(weights: Mapping[str, float]) -> float:
    """The weight of the labels' cross-entropy: ``weights["ce"]`` when given; otherwise ``1 - kd`` when the KD
    weight is in (0, 1] (Hinton et al.'s alpha), else 1."""
    if "ce" in weights:
        return weights["ce"]
    kd = weights.get("kd", 0.0)
    return 1.0 - kd if 0 < kd <= 1 else 1.0


def as_layer_pair(item: Any) -> LayerPair:
    """``"name"`` (the same layer in both models) or ``[teacher_layer, student_layer]`` as a pair."""
    if isinstance(item, str):
        return item, item
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(n, str) for n in item):
        return item[0], item[1]
    raise NetslimError(f"a layer pair must be 'name' (the same in both models) or [teacher_layer, student_layer], "
                       f"got {item!r}")


def layer_pairs(weights: Mapping[str, float], layers: LayerSpec, key: str = "layers") -> dict[str, list[LayerPair]]:
    """The (teacher layer, student layer) pairs each layer loss compares; ``layers`` is one list for
    every layer loss, or a mapping ``{loss name: list}`` (``key``: its name in messages)."""
    needed = [n for n in weights if LOSSES.get(n) == "layers" and weights[n] > 0]
    if isinstance(layers, Mapping):
        for name in layers:
            if name not in LAYER_LOSSES:
                raise unknown_choice("layer-loss name", name, LAYER_LOSSES)
        pairs = {n: [as_layer_pair(i) for i in (layers.get(n) or [])] for n in needed}
    else:
        if layers is not None and (isinstance(layers, str) or not isinstance(layers, Sequence)):
            raise NetslimError(f"{key} must be a list of layer pairs or a mapping loss -> list, got {layers!r}")
        shared = [as_layer_pair(i) for i in (layers or [])]
        pairs = {n: shared for n in needed}
    for name in needed:
        if not pairs[name]:
            raise NetslimError(f"loss {name!r} compares intermediate features: give {key}=[[teacher_layer, "
                               "student_layer], ...] (or names present in both models)")
        if name == "fsp" and len(pairs[name]) < 2:
            raise NetslimError("loss 'fsp' compares consecutive layers: give at least two layer pairs")
    return pairs


# ------------------------------------------------------------------ features of one model
@dataclass
class Features:
    """What one forward pass of a model gave: logits, the named layers' outputs and the embedding."""

    logits: torch.Tensor
    layers: dict[str, torch.Tensor]
    embedding: torch.Tensor | None = None


class FeatureSource:
    """The forward hooks on one model and how to read :class:`Features` after its forward pass.

    ``embedding`` is a layer whose output is the embedding, or ``None`` for the input of the
    model's last ``nn.Linear`` (the penultimate features); feature maps are globally pooled.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], embedding: str | None, wants_embedding: bool,
                 role: str) -> None:
        self.layers = list(dict.fromkeys(layers))
        self.embedding_input = wants_embedding and embedding is None
        self.embedding = (last_linear_name(model, role) if self.embedding_input else embedding) if wants_embedding else None
        outputs = self.layers + ([self.embedding] if self.embedding and not self.embedding_input else [])
        inputs = [self.embedding] if self.embedding_input else []
        self.tap = FeatureTap(model, outputs, inputs, role=role)

    def read(self, logits: torch.Tensor) -> Features:
        embedding = None
        if self.embedding is not None:
            store = self.tap.inputs if self.embedding_input else self.tap.features
            embedding = as_embedding(store[self.embedding])
        return Features(logits, {n: self.tap.features[n] for n in self.layers}, embedding)

    def remove(self) -> None:
        self.tap.remove()


@torch.no_grad()
def probe(model: nn.Module, source: FeatureSource, example: torch.Tensor) -> Features:
    """Features of ``model`` on ``example`` in eval mode (to learn shapes; no statistics are updated)."""
    was_training = model.training
    model.eval()
    try:
        features = source.read(model(example))
        return Features(features.logits.detach(), {k: v.detach() for k, v in features.layers.items()},
                        None if features.embedding is None else features.embedding.detach())
    finally:
        model.train(was_training)
        source.tap.clear()


# ------------------------------------------------------------------ terms: one module per loss name
class LogitTerm(nn.Module):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student: Features, teacher: Features, index: torch.Tensor | None) -> torch.Tensor:
        return kd_loss(student.logits, teacher.logits, self.temperature)


class PairTerm(nn.Module):
    """One loss module per (teacher layer, student layer) pair; the terms are summed."""

    def __init__(self, pairs: Sequence[LayerPair], losses: Sequence[nn.Module]) -> None:
        super().__init__()
        self.pairs = list(pairs)
        self.losses = nn.ModuleList(losses)

    def forward(self, student: Features, teacher: Features, index: torch.Tensor | None) -> torch.Tensor:
        return sum(loss(student.layers[s], teacher.layers[t]) for (t, s), loss in zip(self.pairs, self.losses))


class FSPTerm(nn.Module):
    """FSP between consecutive layer pairs; student maps whose widths differ from the teacher's go through adapters."""

    def __init__(self, pairs: Sequence[LayerPair], adapters: Sequence[nn.Module]) -> None:
        super().__init__()
        self.pairs = list(pairs)
        self.adapters = nn.ModuleList(adapters)
        self.fsp = FSPLoss()

    def forward(self, student: Features, teacher: Features, index: torch.Tensor | None) -> torch.Tensor:
        s = [a(student.layers[name]) for (_, name), a in zip(self.pairs, self.adapters)]
        t = [teacher.layers[name] for name, _ in self.pairs]
        return sum(self.fsp(s[i], s[i + 1], t[i], t[i + 1]) for i in range(len(self.pairs) - 1))


class EmbeddingTerm(nn.Module):
    def __init__(self, loss: nn.Module, takes_index: bool = False) -> None:
        super().__init__()
        self.loss, self.takes_index = loss, takes_index

    def forward(self, student: Features, teacher: Features, index: torch.Tensor | None) -> torch.Tensor:
        if self.takes_index:
            return self.loss(student.embedding, teacher.embedding, index)
        return self.loss(student.embedding, teacher.embedding)


@dataclass
class TermOptions:
    """Hyper-parameters of the terms: KD temperature, CRD head width, negatives and memory-bank size."""

    temperature: float = 4.0
    crd_dim: int = 128
    crd_negatives: int = 16384
    num_samples: int | None = None  # the dataset's size when sample indices are available (CRD memory bank)


def _require_maps(name: str, pairs: Sequence[LayerPair], s: Features, t: Features) -> None:
    for tl, sl in pairs:
        for role, layer, x in (("teacher", tl, t.layers[tl]), ("student", sl, s.layers[sl])):
            if not is_feature_map(x):
                raise NetslimError(f"loss {name!r} needs feature maps (N, C, H, W), but layer {layer!r} of the "
                                   f"{role} gives shape {tuple(x.shape)}; choose a convolutional layer")


def _fitnet(pairs, s, t, o):
    losses = []
    for tl, sl in pairs:
        xs, xt = s.layers[sl], t.layers[tl]
        if xs.dim() != xt.dim():
            raise NetslimError(f"fitnet cannot map student layer {sl!r} {tuple(xs.shape)} to teacher layer {tl!r} "
                               f"{tuple(xt.shape)}: both must be feature maps or both vectors")
        losses.append(FitNetLoss(xs.shape[1], xt.shape[1], spatial=is_feature_map(xs)))
    return PairTerm(pairs, losses)


def _per_pair(loss_cls):
    def build(pairs, s, t, o):
        return PairTerm(pairs, [loss_cls() for _ in pairs])
    return build


def _fsp(pairs, s, t, o):
    _require_maps("fsp", pairs, s, t)
    adapters = [make_adapter(s.layers[sl].shape[1], t.layers[tl].shape[1], spatial=True) for tl, sl in pairs]
    return FSPTerm(pairs, adapters)


def _crd(pairs, s, t, o):
    loss = CRDLoss(s.embedding.shape[1], t.embedding.shape[1], feat_dim=o.crd_dim, num_negatives=o.crd_negatives,
                   num_samples=o.num_samples)
    return EmbeddingTerm(loss, takes_index=True)


TERM_BUILDERS: dict[str, Callable[[list[LayerPair], Features, Features, TermOptions], nn.Module]] = {
    "kd": lambda pairs, s, t, o: LogitTerm(o.temperature),
    "fitnet": _fitnet,
    "at": _per_pair(ATLoss),
    "fsp": _fsp,
    "sp": _per_pair(SPLoss),
    "nst": _per_pair(NSTLoss),
    "rkd": lambda pairs, s, t, o: EmbeddingTerm(RKDLoss()),
    "rkd_distance": lambda pairs, s, t, o: EmbeddingTerm(RKDLoss(1.0, 0.0)),
    "rkd_angle": lambda pairs, s, t, o: EmbeddingTerm(RKDLoss(0.0, 1.0)),
    "pkt": lambda pairs, s, t, o: EmbeddingTerm(PKTLoss()),
    "crd": _crd,
}


class DistillationLoss(nn.Module):
    """The distillation terms (unweighted, by name) between a student's and a teacher's :class:`Features`.

    Holds every learned part (adapters, regressors, CRD heads and memories) so that one
    ``state_dict`` and one optimizer parameter group cover them.
    """

    def __init__(self, weights: Mapping[str, float], pairs: Mapping[str, list[LayerPair]], student: Features,
                 teacher: Features, options: TermOptions | None = None) -> None:
        super().__init__()
        options = options or TermOptions()
        self.weights = {n: w for n, w in weights.items() if n != "ce" and w > 0}
        for name in ("at", "nst"):
            if name in self.weights:
                _require_maps(name, pairs[name], student, teacher)
        self.terms = nn.ModuleDict({name: TERM_BUILDERS[name](pairs.get(name, []), student, teacher, options)
                                    for name in self.weights})

    def forward(self, student: Features, teacher: Features, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {name: term(student, teacher, index) for name, term in self.terms.items()}

    def adapters(self) -> list[nn.Module]:
        """The learned maps from student to teacher widths: FitNet regressors and FSP adapters."""
        found: list[nn.Module] = []
        for module in self.modules():
            if isinstance(module, FitNetLoss):
                found.append(module.regressor)
            elif isinstance(module, FSPTerm):
                found += [a for a in module.adapters if not isinstance(a, nn.Identity)]
        return found


# ------------------------------------------------------------------ sample indices for CRD's memory bank
class IndexRecordingBatchSampler(Sampler):
    """Yield the batches of ``batch_sampler`` and remember their dataset indices in order.

    A DataLoader returns batches in the order their indices were drawn (also with worker
    processes, which only prefetch), so :meth:`next_batch` gives the indices of the batch the
    training loop is about to use. A new pass over the loader forgets what was left over.
    """

    def __init__(self, batch_sampler: Sampler) -> None:
        self.batch_sampler = batch_sampler
        self.pending: deque[list[int]] = deque()

    def __iter__(self):
        self.pending.clear()
        for batch in self.batch_sampler:
            self.pending.append(list(batch))
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def next_batch(self) -> torch.Tensor:
        return torch.as_tensor(self.pending.popleft(), dtype=torch.long)


def indexed_loader(dataset: Dataset, cfg: TrainConfig) -> tuple[DataLoader, IndexRecordingBatchSampler]:
    """A shuffling DataLoader like :func:`fit`'s own, whose batches' dataset indices can be looked up."""
    batches = BatchSampler(RandomSampler(dataset), cfg.batch_size, drop_last=len(dataset) > cfg.batch_size)
    recorder = IndexRecordingBatchSampler(batches)
    loader = DataLoader(dataset, batch_sampler=recorder, num_workers=cfg.workers, persistent_workers=cfg.workers > 0)
    return loader, recorder


# ------------------------------------------------------------------ the training hook
class DistillHook(TrainHook):
    """Adds ``ce_weight * CE + sum_i w_i * term_i`` to :func:`netslim.train.fit`'s loss.

    The teacher runs in eval mode without gradients on every training batch; the learned parts of
    ``criterion`` join the optimizer (their learning rate follows the model's schedule) and, under
    DDP, are wrapped in their own ``DistributedDataParallel`` so that they stay identical on every
    worker. With ``checkpoint_path`` their state is saved after each epoch beside fit's checkpoint.
    """

    def __init__(self, teacher: nn.Module, criterion: DistillationLoss, student_source: FeatureSource,
                 teacher_source: FeatureSource, weights: Mapping[str, float],
                 index_source: IndexRecordingBatchSampler | None = None,
                 checkpoint_path: str | Path | None = None) -> None:
        self.teacher, self.criterion = teacher, criterion
        self.student_source, self.teacher_source = student_source, teacher_source
        self.weights = {n: w for n, w in weights.items() if n in criterion.terms}
        self.ce_weight = cross_entropy_weight(weights)
        self.index_source = index_source
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.runner: nn.Module = criterion
        self.optimizer: torch.optim.Optimizer | None = None
        self.group: int | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0
        self.epoch_means: dict[int, dict[str, float]] = {}

    def state_path(self, epoch: int) -> Path:
        assert self.checkpoint_path is not None
        return self.checkpoint_path.with_name(f"{self.checkpoint_path.name}.distill-{epoch}.pt")

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        device = next(model.parameters()).device
        self.teacher.eval()
        self.criterion.to(device).train()
        params = [p for p in self.criterion.parameters() if p.requires_grad]
        self.optimizer = optimizer
        if params:
            optimizer.add_param_group({"params": params})
            self.group = len(optimizer.param_groups) - 1
        self._restore_if_resuming()
        if is_distributed() and params:
            self.runner = nn.parallel.DistributedDataParallel(self.criterion, broadcast_buffers=False)

    def _restore_if_resuming(self) -> None:
        if self.checkpoint_path is None or not self.checkpoint_path.is_file():
            return
        epoch = int(torch.load(self.checkpoint_path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
        path = self.state_path(epoch)
        if not path.is_file():
            raise NetslimError(f"{self.checkpoint_path} (epoch {epoch}) has no distillation state {path.name} beside "
                               "it; delete the checkpoint to start this training over")
        self.criterion.load_state_dict(load_checkpoint(path))
        log.info("resumed the distillation state (adapters, heads, memories) of epoch %d", epoch)

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        if self.group is not None:  # fit schedules the groups it created; ours follows the first one
            self.optimizer.param_groups[self.group]["lr"] = self.optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        teacher = self.teacher_source.read(teacher_logits)
        student = self.student_source.read(outputs)
        index = self.index_source.next_batch() if self.index_source is not None else None
        parts = self.runner(student, teacher, index)
        total = self.ce_weight * loss
        for name, value in parts.items():
            total = total + self.weights[name] * value
            self._sums[name] = self._sums.get(name, 0.0) + value.detach().float()
        self._steps += 1
        return total

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.epoch_means[epoch + 1] = {n: float(v) / max(self._steps, 1) for n, v in self._sums.items()}
        self._sums, self._steps = {}, 0
        if self.checkpoint_path is not None and rank() == 0:
            save_torch(self.criterion.state_dict(), self.state_path(epoch + 1))
            for old in self.checkpoint_path.parent.glob(f"{self.checkpoint_path.name}.distill-*.pt"):
                if old.stem.rsplit("-", 1)[-1].isdigit() and int(old.stem.rsplit("-", 1)[-1]) < epoch:
                    old.unlink(missing_ok=True)  # keep this epoch's and the previous one's (fit writes its own next)

    def annotate(self, history: list[dict]) -> list[dict]:
        """Add ``distill_<name>`` (the epoch's mean unweighted term) to the epochs trained in this call."""
        for record in history:
            for name, value in self.epoch_means.get(record["epoch"], {}).items():
                record[f"distill_{name}"] = value
        return history


# ------------------------------------------------------------------ the public verb
@dataclass
class DistillResult:
    """What :func:`distill` returns: fit's per-epoch ``history`` and the ``criterion`` (adapters, heads)."""

    history: list[dict]
    criterion: DistillationLoss


def example_batch(data: Dataset | DataLoader, size: int = 2) -> torch.Tensor:
    """The first ``size`` inputs of a dataset (or of a DataLoader's dataset), stacked."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    return torch.stack([dataset[i][0] for i in range(min(size, len(dataset)))])


def _check_logits(weights: Mapping[str, float], student: Features, teacher: Features) -> None:
    if weights.get("kd", 0) > 0 and student.logits.shape[1:] != teacher.logits.shape[1:]:
        raise NetslimError(f"kd compares class probabilities, but the teacher gives {tuple(teacher.logits.shape[1:])} "
                           f"outputs per sample and the student {tuple(student.logits.shape[1:])}")


def distill(student: nn.Module, teacher: nn.Module, train_data: Dataset | DataLoader,
            losses: Mapping[str, float] | None = None, layers: LayerSpec = None, config: TrainConfig | None = None, *,
            temperature: float = 4.0, embedding: Sequence[str] | None = None, crd_dim: int = 128,
            crd_negatives: int = 16384, eval_data: Dataset | DataLoader | None = None,
            checkpoint_path: str | Path | None = None, device: str | torch.device | None = None,
            progress: bool = True, hooks: Sequence[TrainHook] = ()) -> DistillResult:
    """Train ``student`` in place on ``train_data`` with the labels and what ``teacher`` knows; return fit's
    per-epoch history (each epoch trained here with the ``distill_<loss>`` means added) and the
    :class:`DistillationLoss` with the learned adapters and heads.

    ``losses``: ``{name: weight}`` of ``kd`` (Hinton 2015), ``fitnet`` (Romero 2015), ``at`` (Zagoruyko
    2017), ``fsp`` (Yim 2017), ``sp`` (Tung 2019), ``nst`` (Huang 2017), ``rkd`` / ``rkd_distance`` /
    ``rkd_angle`` (Park 2019), ``pkt`` (Passalis 2018), ``crd`` (Tian 2020), and ``ce``, the labels'
    cross-entropy (default ``1 - kd`` for a KD weight in (0, 1], else 1). Default ``{"kd": 0.9}``.
    ``layers``: (teacher layer, student layer) pairs that the layer losses (fitnet, at, fsp, sp, nst)
    compare, or ``{loss: pairs}``; a plain name means the same layer in both models. ``embedding``:
    (teacher layer, student layer) whose outputs the relational losses (rkd, pkt, crd) compare;
    default: the inputs of each model's last ``nn.Linear``. CRD uses the paper's memory bank indexed
    by sample when ``train_data`` is a Dataset (outside DDP), else a queue of recent embeddings.
    The teacher moves to the device and stays in eval mode; extra ``hooks`` run after distillation's.
    """
    weights = validate_losses({"kd": 0.9} if losses is None else losses)
    pairs = layer_pairs(weights, layers)
    if embedding is not None:
        embedding = as_layer_pair(embedding)
    cfg = config or TrainConfig()
    device = torch.device(device) if device is not None else default_device()
    student.to(device)
    teacher_was_training = teacher.training
    teacher.to(device).eval()
    wants_embedding = any(weights.get(n, 0) > 0 for n in EMBEDDING_LOSSES)
    used = [p for n in pairs for p in pairs[n]]
    student_source = FeatureSource(student, [s for _, s in used], embedding[1] if embedding else None,
                                   wants_embedding, "student")
    try:
        teacher_source = FeatureSource(teacher, [t for t, _ in used], embedding[0] if embedding else None,
                                       wants_embedding, "teacher")
    except NetslimError:
        student_source.remove()
        raise
    try:
        example = example_batch(train_data).to(device)
        student_example, teacher_example = probe(student, student_source, example), probe(teacher, teacher_source, example)
        _check_logits(weights, student_example, teacher_example)
        loader, index_source = train_data, None
        if weights.get("crd", 0) > 0 and isinstance(train_data, Dataset) and not is_distributed():
            loader, index_source = indexed_loader(train_data, cfg)
        seed_everything(cfg.seed)  # the same adapters and heads on every run (and every DDP worker)
        options = TermOptions(temperature, crd_dim, crd_negatives, len(train_data) if index_source else None)
        criterion = DistillationLoss(weights, pairs, student_example, teacher_example, options)
        hook = DistillHook(teacher, criterion, student_source, teacher_source, weights, index_source, checkpoint_path)
        log.info("distilling with %s (cross-entropy weight %.3g)%s", hook.weights, hook.ce_weight,
                 "" if "crd" not in hook.weights else
                 f"; CRD memory: {'bank of ' + str(len(train_data)) + ' samples' if index_source else 'queue'}")
        history = fit(student, loader, cfg, hooks=[hook, *hooks], eval_data=eval_data,
                      checkpoint_path=checkpoint_path, device=device, progress=progress)
    finally:
        student_source.remove()
        teacher_source.remove()
        teacher.train(teacher_was_training)
    return DistillResult(hook.annotate(history), criterion)


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, eval_data: Dataset | DataLoader | None = None,
              device: str | torch.device | None = None, batch_size: int = 256, *,
              data: Dataset | DataLoader | None = None) -> float:
    """Fraction of ``eval_data``'s samples on which ``student`` and ``teacher`` predict the same class (top-1)
    (``data=``: the deprecated name of ``eval_data``)."""
    data = renamed_argument(eval_data, data, "data", "eval_data", "agreement")
    if data is None:
        raise NetslimError("agreement needs eval_data")
    device = torch.device(device) if device is not None else default_device()
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    modes = student.training, teacher.training
    student.eval().to(device)
    teacher.eval().to(device)
    same = total = 0
    try:
        for x, _ in loader:
            x = x.to(device)
            same += int((student(x).argmax(1) == teacher(x).argmax(1)).sum())
            total += len(x)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return same / max(total, 1)


__all__ = ["distill", "agreement", "DistillResult", "DistillHook", "DistillationLoss", "Features", "FeatureSource", "LOSSES",
           "WEIGHT_KEYS", "validate_losses", "layer_pairs", "cross_entropy_weight", "indexed_loader",
           "IndexRecordingBatchSampler", "TermOptions", "example_batch"]

"""Distillation losses, one small function or module per paper.

Logit losses compare (N, classes) outputs; layer losses compare two feature maps (N, C, H, W)
of a teacher and a student layer (spatial sizes are matched by adaptive average pooling);
relational losses compare (N, D) embeddings across the samples of a batch, so the student's
and the teacher's widths may differ. Every loss is computed in float32 (safe under AMP).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import NetslimError
from .features import as_embedding, make_adapter, match_spatial


# ------------------------------------------------------------------ logits
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Knowledge distillation (Hinton, Vinyals & Dean 2015, §2): ``KL(softmax(t/T) || softmax(s/T)) * T**2``,
    averaged over the batch; the ``T**2`` keeps the gradient scale independent of ``T``."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


class KDLoss(nn.Module):
    """Hinton et al. 2015: ``alpha * KD(T) + (1 - alpha) * CE(targets)`` (only the KD term without targets)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        soft = kd_loss(student_logits, teacher_logits, self.temperature)
        if targets is None:
            return soft
        return self.alpha * soft + (1 - self.alpha) * F.cross_entropy(student_logits.float(), targets)


# ------------------------------------------------------------------ layer features
class FitNetLoss(nn.Module):
    """FitNets hints (Romero et al. 2015, §2.2): ``||u_teacher - r(v_student)||^2`` with a learned regressor
    ``r`` (1x1 conv + BatchNorm for feature maps, linear for vectors) to the teacher's width; mean squared
    error over elements, spatial sizes matched by adaptive average pooling."""

    def __init__(self, student_channels: int, teacher_channels: int, spatial: bool = True) -> None:
        super().__init__()
        self.regressor = make_adapter(student_channels, teacher_channels, spatial, always=True)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(self.regressor(student).float(), teacher.float())
        return F.mse_loss(s, t)


def attention_map(features: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Activation-based spatial attention (Zagoruyko & Komodakis 2017, §3.1): ``mean_c |A_c|^p``, flattened
    and L2-normalized per sample."""
    return F.normalize(features.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


class ATLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis 2017, eq. 2, p = 2): squared distance of the normalized
    attention maps, averaged over the batch and positions (the paper's beta = 1000 is the usual weight).
    Channel counts may differ; spatial sizes are matched by adaptive average pooling."""

    def __init__(self, p: int = 2) -> None:
        super().__init__()
        self.p = p

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(student, teacher)
        return (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean()


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Flow of solution procedure (Yim et al. 2017, eq. 1): ``G_ij = sum_hw F1_i(h,w) F2_j(h,w) / (h w)``,
    (N, C1, C2); the larger map is average-pooled to the smaller one's size first."""
    a, b = match_spatial(first.float(), second.float())
    return torch.einsum("nihw,njhw->nij", a, b) / (a.shape[-2] * a.shape[-1])


class FSPLoss(nn.Module):
    """FSP (Yim et al. 2017, eq. 2): squared distance of the student's and teacher's FSP matrices between
    two layers, averaged over matrix entries and the batch (the paper sums the entries; the mean keeps
    the weight independent of the widths). Student maps must already have the teacher's widths."""

    def forward(self, student_first: torch.Tensor, student_second: torch.Tensor,
                teacher_first: torch.Tensor, teacher_second: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(fsp_matrix(student_first, student_second), fsp_matrix(teacher_first, teacher_second))


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """(N, N) batch similarity of Tung & Mori 2019, eq. 2: ``Q Q^T`` of the flattened activations, rows L2-normalized."""
    q = features.float().flatten(1)
    return F.normalize(q @ q.t(), dim=1)


class SPLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori 2019, eq. 4): ``||G_teacher - G_student||_F^2 / N^2`` of the
    batch similarity matrices; any widths and spatial sizes."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        n = student.shape[0]
        return (similarity_matrix(student) - similarity_matrix(teacher)).pow(2).sum() / (n * n)


class NSTLoss(nn.Module):
    """Neuron selectivity transfer (Huang & Wang 2017, eq. 4-6): squared MMD between the sets of
    L2-normalized channel maps of student and teacher with the polynomial kernel ``(x.y + c)^d``
    (d = 2, c = 0), averaged over the batch; channel counts may differ, spatial sizes are pooled to match."""

    def __init__(self, degree: int = 2, constant: float = 0.0) -> None:
        super().__init__()
        self.degree, self.constant = degree, constant

    def _kernel_mean(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2) + self.constant).pow(self.degree).mean(dim=(1, 2))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(student.float(), teacher.float())
        s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)
        mmd2 = self._kernel_mean(s, s) + self._kernel_mean(t, t) - 2 * self._kernel_mean(s, t)
        return mmd2.mean()


# ------------------------------------------------------------------ relations between samples
def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    square = e.pow(2).sum(1)
    d2 = (square[:, None] + square[None, :] - 2 * e @ e.t()).clamp_min(1e-12)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss (Park et al. 2019, eq. 5-6): Huber loss between the pairwise distances of
    the embeddings, each set divided by its mean distance."""
    s, t = as_embedding(student).float(), as_embedding(teacher).float()
    with torch.no_grad():
        dt = _pairwise_distances(t)
        dt = dt / dt[dt > 0].mean().clamp_min(1e-12)
    ds = _pairwise_distances(s)
    ds = ds / ds[ds > 0].mean().clamp_min(1e-12)
    return F.smooth_l1_loss(ds, dt)


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # diff[j, i] = unit(e_i - e_j)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()   # cos of the angle e_i e_j e_k


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss (Park et al. 2019, eq. 7-8): Huber loss between the cosines of the angles
    formed by every triplet of embeddings in the batch."""
    s, t = as_embedding(student).float(), as_embedding(teacher).float()
    with torch.no_grad():
        at = _angles(t)
    return F.smooth_l1_loss(_angles(s), at)


class RKDLoss(nn.Module):
    """Relational KD (Park et al. 2019): ``distance_weight * distance + angle_weight * angle``
    (the paper's 25 : 50 ratio by default)."""

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        loss = student.new_zeros((), dtype=torch.float32)
        if self.distance_weight:
            loss = loss + self.distance_weight * rkd_distance(student, teacher)
        if self.angle_weight:
            loss = loss + self.angle_weight * rkd_angle(student, teacher)
        return loss


def _cosine_conditional(e: torch.Tensor, eps: float) -> torch.Tensor:
    e = F.normalize(as_embedding(e).float(), dim=1)
    kernel = (e @ e.t() + 1) / 2  # cosine kernel in [0, 1]
    kernel = kernel * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))  # p(i|i) excluded
    return kernel / (kernel.sum(dim=1, keepdim=True) + eps)


class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018, eq. 8-11): the cosine-kernel conditional
    probabilities ``p(j|i)`` of the batch's embeddings; ``KL(teacher || student)`` per anchor ``i``,
    averaged over the anchors. Any widths."""

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        p_s = _cosine_conditional(student, self.eps)
        with torch.no_grad():
            p_t = _cosine_conditional(teacher, self.eps)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).sum(dim=1).mean()


class CRDLoss(nn.Module):
    """Contrastive representation distillation (Tian, Krishnan & Isola 2020, §3, eq. 18-19).

    Student and teacher embeddings pass through linear heads to ``feat_dim`` and are L2-normalized.
    A memory of past embeddings of both networks supplies the negatives. The critic is NCE's
    ``h = P / (P + N/M)`` with ``P = exp(v_s . v_t / tau) / Z`` (``Z`` estimated on the first batch,
    ``N`` negatives, ``M`` memory entries); the loss is ``-log h(positive) - sum log(1 - h(negative))``,
    symmetric (student anchors against teacher memory and the reverse).

    Two memories:

    * ``num_samples`` given and ``forward(..., index=sample_indices)``: the paper's memory bank, one
      entry per training sample, updated with ``momentum``; the positive is the other network's
      bank entry of the same sample, the ``num_negatives`` negatives are drawn uniformly from the bank
      (one draw shared by the batch).
    * otherwise (no sample index, e.g. under DDP or with a user's DataLoader): a FIFO queue of the
      last ``num_negatives`` embeddings (as MoCo's, He et al. 2020) gives the negatives, and the
      positive is the other network's current embedding of the same sample (detached).
    """

    def __init__(self, student_dim: int, teacher_dim: int, feat_dim: int = 128, num_negatives: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, num_samples: int | None = None) -> None:
        super().__init__()
        self.embed_student = nn.Linear(student_dim, feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, feat_dim)
        self.uses_bank = num_samples is not None
        size = num_samples if num_samples is not None else num_negatives
        self.num_negatives = min(num_negatives, size)
        self.temperature, self.momentum = temperature, momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(size, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_teacher", torch.rand(size, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("log_z", torch.full((2,), float("nan")))  # log Z for student / teacher anchors
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    def _nce(self, anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, slot: int) -> torch.Tensor:
        pos = (anchor * positive).sum(1, keepdim=True) / self.temperature      # (N, 1)
        neg = anchor @ negatives.t() / self.temperature                        # (N, K)
        scores = torch.cat([pos, neg], dim=1)
        size = self.memory_student.shape[0]                                    # M
        if torch.isnan(self.log_z[slot]):
            with torch.no_grad():  # Z = E[exp(score)] * M, fixed after the first batch as in the paper's code
                self.log_z[slot] = torch.logsumexp(scores.flatten(), 0) - math.log(scores.numel()) + math.log(size)
        log_p = scores - self.log_z[slot]
        log_noise = math.log(negatives.shape[0] / size)                          # log(N / M)
        log_denominator = torch.logaddexp(log_p, torch.full_like(log_p, log_noise))
        log_h_pos = log_p[:, 0] - log_denominator[:, 0]
        log_one_minus_h_neg = log_noise - log_denominator[:, 1:]
        return -(log_h_pos + log_one_minus_h_neg.sum(1)).mean()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=student.device.type, enabled=False):  # exp(score / 0.07) wants fp32
            return self._contrast(student, teacher, index)

    def _contrast(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if self.uses_bank and index is None:
            raise NetslimError("CRD with a memory bank (num_samples given) needs the batch's dataset indices")
        v_s = F.normalize(self.embed_student(as_embedding(student).float()), dim=1)
        v_t = F.normalize(self.embed_teacher(as_embedding(teacher).float().detach()), dim=1)
        if self.uses_bank:
            index = index.to(v_s.device)
            pos_t, pos_s = self.memory_teacher[index], self.memory_student[index]
            draw = torch.randint(0, self.memory_student.shape[0], (self.num_negatives,), device=v_s.device)
            neg_t, neg_s = self.memory_teacher[draw], self.memory_student[draw]
        else:
            pos_t, pos_s = v_t.detach(), v_s.detach()
            neg_t, neg_s = self.memory_teacher.clone(), self.memory_student.clone()  # the queue changes below
        loss = self._nce(v_s, pos_t, neg_t, 0) + self._nce(v_t, pos_s, neg_s, 1)
        if self.uses_bank:
            self._update_bank(v_s.detach(), v_t.detach(), index)
        else:
            self._enqueue(v_s.detach(), v_t.detach())
        return loss

    @torch.no_grad()
    def _update_bank(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor) -> None:
        for memory, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            memory[index] = F.normalize(memory[index] * self.momentum + v * (1 - self.momentum), dim=1)

    @torch.no_grad()
    def _enqueue(self, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        size = self.memory_student.shape[0]
        v_s, v_t = v_s[-size:], v_t[-size:]
        rows = (self.queue_pointer + torch.arange(len(v_s), device=v_s.device)) % size
        self.memory_student[rows], self.memory_teacher[rows] = v_s, v_t
        self.queue_pointer.copy_((self.queue_pointer + len(v_s)) % size)


__all__ = ["kd_loss", "KDLoss", "FitNetLoss", "attention_map", "ATLoss", "fsp_matrix", "FSPLoss",
           "similarity_matrix", "SPLoss", "NSTLoss", "rkd_distance", "rkd_angle", "RKDLoss", "PKTLoss",
           "CRDLoss"]

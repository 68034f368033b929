"""The knowledge-distillation baselines that BRCD is compared with (He et al., WWW 2024, and the KD methods of the
original release): losses between a batch of student codes and the frozen teacher's codes of the same images.

- ``rkd_loss``: Relational KD (Park et al., CVPR 2019), the distance and angle structure of the batch.
- ``pkt_loss``: Probabilistic Knowledge Transfer (Passalis and Tefas, ECCV 2018), cosine-kernel neighbour distributions.
- ``sp_loss``: Similarity-Preserving KD (Tung and Mori, ICCV 2019), row-normalised Gram matrices.
- ``hinton_kd_loss``: soft targets (Hinton et al., 2015), each code taken as logits over its bits.
- ``sskd_loss``: self-supervision KD (Xu et al., ECCV 2020) as the original release's baseline computes it: how
  transformed copies (rotations) of the images relate to the batch's untransformed images.
- ``CRDLoss``, ``CRCDLoss``, ``PACKDLoss``: the contrastive baselines with memory banks of the whole training set,
  modules with trained embedding heads (defined in brcd.kd_memory, importable from here).

Plain PyTorch, O(B^2) memory (RKD's angle term O(B^3)): baselines at the batch sizes distillation uses, not fused
kernels. Each docstring gives its formula. Averages are taken as the authors' released code takes them (over every
index pair or triplet, the degenerate ones contributing 0), so a loss weight means what it meant there. The losses
are differentiable with respect to the student; the teacher is a target (detach it, or its gradient flows as well).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kd_checks import check_pair, positive_finite
from .kd_memory import CRCDLoss, CRDLoss, PACKDLoss
from .ops import _require_tensor

__all__ = ["rkd_loss", "pkt_loss", "sp_loss", "hinton_kd_loss", "sskd_loss", "CRDLoss", "CRCDLoss", "PACKDLoss"]


def _distances(x: Tensor) -> Tensor:
    """Euclidean distances [B, B] between the rows; exactly 0 (and 0 gradient) between equal rows."""
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).clamp_min(0)
    d2 = d2 * (1 - torch.eye(len(x), dtype=x.dtype, device=x.device))  # the diagonal exactly, whatever rounding says
    positive = d2 > 0
    return torch.where(positive, d2.where(positive, torch.ones_like(d2)).sqrt(), torch.zeros_like(d2))


def _relative_distances(x: Tensor) -> Tensor:
    """Distances over their mean over the pairs i != j (all 0 where every row is the same)."""
    d = _distances(x)
    n = len(x)
    mean = d.sum() / (n * (n - 1))
    return d / mean.clamp_min(torch.finfo(x.dtype).tiny)


def _angles(x: Tensor) -> Tensor:
    """a[j, i, k] = <e_ij, e_kj> with e_ij = (x_i - x_j) / |x_i - x_j| (0 where x_i = x_j): the cosine of the angle
    at x_j."""
    diff = x[None, :, :] - x[:, None, :]  # [j, i] = x_i - x_j
    e = F.normalize(diff, p=2, dim=2, eps=1e-12)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_loss(student: Tensor, teacher: Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    """Relational knowledge distillation: ``distance_weight * L_D + angle_weight * L_A`` (the paper's 25 and 50).

    With ``d_ij`` the distance between codes i and j over its mean over the pairs i != j, and ``a_jik`` the cosine of
    the angle at code j of the triangle (i, j, k), ``L_D = mean over (i, j) of huber(d^s_ij - d^t_ij)`` and
    ``L_A = mean over (j, i, k) of huber(a^s_jik - a^t_jik)``, Huber with threshold 1 (smooth L1). Invariant to a
    translation of either code set, and to a scaling of it. Needs a batch of at least 2; O(B^3) memory for the angles.
    """
    teacher = check_pair(student, teacher, same_bits=False, min_batch=2)
    distance = F.smooth_l1_loss(_relative_distances(student), _relative_distances(teacher))
    angle = F.smooth_l1_loss(_angles(student), _angles(teacher))
    return distance_weight * distance + angle_weight * angle


def _neighbour_distributions(x: Tensor, eps: float) -> Tensor:
    """Row i: the distribution over j proportional to (cos(x_i, x_j) + 1) / 2, j = i included."""
    unit = x / (x.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer: ``mean over (i, j) of p^t_ij * log((p^t_ij + eps) / (p^s_ij + eps))``, where
    row i of ``p`` is the distribution over the batch proportional to the cosine kernel ``(cos(x_i, x_j) + 1) / 2``:
    the KL divergences of the student's neighbour distributions from the teacher's, summed over rows, over B^2.
    Invariant to a scaling of any code."""
    teacher = check_pair(student, teacher, same_bits=False, min_batch=2)
    p_s, p_t = _neighbour_distributions(student, eps), _neighbour_distributions(teacher, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _normalised_gram(x: Tensor) -> Tensor:
    return F.normalize(x @ x.T, p=2, dim=1, eps=1e-12)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving distillation: ``|G^t - G^s|_F^2 / B^2``, with ``G`` the Gram matrix ``X X^T`` of the
    batch's codes, each row scaled to unit norm. Invariant to a scaling of either code set."""
    teacher = check_pair(student, teacher, same_bits=False, min_batch=2)
    diff = _normalised_gram(teacher) - _normalised_gram(student)
    return (diff * diff).sum() / (len(student) ** 2)


def hinton_kd_loss(student: Tensor, teacher: Tensor, *, temperature: float = 4.0) -> Tensor:
    """Soft-target distillation: ``T^2 * mean over samples of KL(softmax(t / T) || softmax(s / T))``, the softmax
    taken over the bits of each code (T = 4 in the original release's baseline)."""
    teacher = check_pair(student, teacher, same_bits=True, min_batch=1)
    temperature = positive_finite(temperature, "temperature")
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


def sskd_loss(student_views: Tensor, teacher_views: Tensor, *, temperature: float = 0.5) -> Tensor:
    """Self-supervision distillation over views [V, B, K] of a batch: view 0 the images, views 1..V-1 transformed
    copies of them (the trainer gives rotations by 90, 180 and 270 degrees). Each transformed sample's cosines to the
    batch's untransformed codes, ``c_rj = cos(x_r, x_0j)`` over the B images j, become a distribution
    ``softmax(c_r / T)``; the loss is ``T^2 * mean over the (V - 1) * B transformed samples of KL(teacher || student)``
    (T = 0.5, as the original release's baseline; it keeps every sample)."""
    for name, t in (("student_views", student_views), ("teacher_views", teacher_views)):
        _require_tensor(t, name)
        if t.dim() != 3 or t.shape[0] < 2:
            raise ValueError(f"{name} must be a 3-D tensor [views >= 2, batch, bits], got shape {tuple(t.shape)}")
    if teacher_views.shape[:2] != student_views.shape[:2]:
        raise ValueError(f"teacher_views has {tuple(teacher_views.shape[:2])} views x samples but student_views has "
                         f"{tuple(student_views.shape[:2])}")
    check_pair(student_views[0], teacher_views[0], same_bits=False, min_batch=1,
                names=("student_views", "teacher_views"))
    temperature = positive_finite(temperature, "temperature")

    def log_distributions(views: Tensor) -> Tensor:
        unit = F.normalize(views, p=2, dim=2, eps=1e-8)
        cosines = unit[1:].reshape(-1, unit.shape[2]) @ unit[0].T  # [(V - 1) * B, B]
        return F.log_softmax(cosines / temperature, dim=1)

    log_q = log_distributions(student_views)
    log_p = log_distributions(teacher_views.to(student_views.dtype))
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature ** 2

"""The knowledge-distillation baselines that BRCD is compared with (He et al., WWW 2024, and the KD methods of the
original release): losses between a batch of student codes and the frozen teacher's codes of the same images.

- ``rkd_loss``: Relational KD (Park et al., CVPR 2019), the distance and angle structure of the batch.
- ``pkt_loss``: Probabilistic Knowledge Transfer (Passalis and Tefas, ECCV 2018), cosine-kernel neighbour distributions.
- ``sp_loss``: Similarity-Preserving KD (Tung and Mori, ICCV 2019), row-normalised Gram matrices.
- ``hinton_kd_loss``: soft targets (Hinton et al., 2015), each code taken as logits over its bits.
- ``CRDLoss``: Contrastive Representation Distillation (Tian et al., ICLR 2020), a module: trained embedding heads and
  memory banks of the whole training set, indexed by each sample's image.
- ``sskd_loss``: self-supervision KD (Xu et al., ECCV 2020) as the original release's baseline computes it: how
  transformed copies (rotations) of the images relate to the batch's untransformed images.

Plain PyTorch, O(B^2) memory (RKD's angle term O(B^3)): baselines at the batch sizes distillation uses, not fused
kernels. Each docstring gives its formula. Averages are taken as the authors' released code takes them (over every
index pair or triplet, the degenerate ones contributing 0), so a loss weight means what it meant there. The losses
are differentiable with respect to the student; the teacher is a target (detach it, or its gradient flows as well).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import _require_tensor

__all__ = ["rkd_loss", "pkt_loss", "sp_loss", "hinton_kd_loss", "sskd_loss", "CRDLoss"]


def _check_pair(student: Tensor, teacher: Tensor, *, same_bits: bool, min_batch: int,
                names: tuple = ("student", "teacher")) -> Tensor:
    """Checks the two code batches (named `names` in the messages); returns the teacher in the student's dtype."""
    student_name, teacher_name = names
    for name, t in ((student_name, student), (teacher_name, teacher)):
        _require_tensor(t, name)
        if t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [batch, bits], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"{teacher_name} has {teacher.shape[0]} rows but {student_name} has {student.shape[0]}: one "
                         "code per image of the batch in each")
    if same_bits and teacher.shape[1] != student.shape[1]:
        raise ValueError(f"{teacher_name} has {teacher.shape[1]} bits but {student_name} has {student.shape[1]}")
    if teacher.device != student.device:
        raise ValueError(f"{teacher_name} is on {teacher.device} but {student_name} is on {student.device}")
    if student.shape[0] < min_batch:
        raise ValueError(f"{student_name} must have at least {min_batch} rows (the loss compares samples of a batch), "
                         f"got {student.shape[0]}")
    return teacher.to(student.dtype)


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
    teacher = _check_pair(student, teacher, same_bits=False, min_batch=2)
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
    teacher = _check_pair(student, teacher, same_bits=False, min_batch=2)
    p_s, p_t = _neighbour_distributions(student, eps), _neighbour_distributions(teacher, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _normalised_gram(x: Tensor) -> Tensor:
    return F.normalize(x @ x.T, p=2, dim=1, eps=1e-12)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving distillation: ``|G^t - G^s|_F^2 / B^2``, with ``G`` the Gram matrix ``X X^T`` of the
    batch's codes, each row scaled to unit norm. Invariant to a scaling of either code set."""
    teacher = _check_pair(student, teacher, same_bits=False, min_batch=2)
    diff = _normalised_gram(teacher) - _normalised_gram(student)
    return (diff * diff).sum() / (len(student) ** 2)


def hinton_kd_loss(student: Tensor, teacher: Tensor, *, temperature: float = 4.0) -> Tensor:
    """Soft-target distillation: ``T^2 * mean over samples of KL(softmax(t / T) || softmax(s / T))``, the softmax
    taken over the bits of each code (T = 4 in the original release's baseline)."""
    teacher = _check_pair(student, teacher, same_bits=True, min_batch=1)
    temperature = _positive_finite(temperature, "temperature")
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
    _check_pair(student_views[0], teacher_views[0], same_bits=False, min_batch=1,
                names=("student_views", "teacher_views"))
    temperature = _positive_finite(temperature, "temperature")

    def log_distributions(views: Tensor) -> Tensor:
        unit = F.normalize(views, p=2, dim=2, eps=1e-8)
        cosines = unit[1:].reshape(-1, unit.shape[2]) @ unit[0].T  # [(V - 1) * B, B]
        return F.log_softmax(cosines / temperature, dim=1)

    log_q = log_distributions(student_views)
    log_p = log_distributions(teacher_views.to(student_views.dtype))
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature ** 2


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class CRDLoss(nn.Module):
    """Contrastive representation distillation over a training set of ``dataset_size`` images.

    Each model's codes are embedded by a linear head of its own and scaled to unit norm (``feat_dim`` dimensions).
    Two memory banks hold a running embedding of every training image, one of the student's and one of the teacher's.
    For sample i of image n_i, with m = ``negatives`` images r_1..r_m drawn uniformly from the training set and
    ``x_j = exp(<embedding_i, memory of the other model at image j> / temperature) / Z``:

        loss_direction = -mean_i [ log(x_{n_i} / (x_{n_i} + m / N)) + sum_k log((m / N) / (x_{r_k} + m / N)) ]

    (N = ``dataset_size``; a 1e-7 beside each denominator), a noise-contrastive estimate whose positive is the
    sample's own image in the other model's memory. ``Z`` is ``N`` times the mean of ``exp(...)`` over the first
    batch, then fixed (one per direction), as in the authors' code. The loss is the sum of both directions: the
    student's embedding against the teacher's memory, and the teacher's against the student's. After the loss, each
    bank's rows of the batch's images become ``normalise(momentum * row + (1 - momentum) * embedding)``.

    The heads are parameters to train beside the student (a trainer's optimizer must take them); the banks and ``Z``
    are buffers, in the state dict for resuming. Negatives are drawn from the default generator of the codes' device.
    Defaults are the authors' (128 dimensions, 500 negatives with a training set of 5,000 images, temperature 0.05,
    momentum 0.5).
    """

    def __init__(self, student_bits: int, teacher_bits: int, dataset_size: int, *, feat_dim: int = 128,
                 negatives: int = 500, temperature: float = 0.05, momentum: float = 0.5):
        super().__init__()
        student_bits, teacher_bits = _positive_int(student_bits, "student_bits"), _positive_int(teacher_bits,
                                                                                                "teacher_bits")
        self.dataset_size = _positive_int(dataset_size, "dataset_size")
        feat_dim = _positive_int(feat_dim, "feat_dim")
        self.negatives = _positive_int(negatives, "negatives")
        self.temperature = _positive_finite(temperature, "temperature")
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.embed_student = nn.Linear(student_bits, feat_dim)
        self.embed_teacher = nn.Linear(teacher_bits, feat_dim)
        bound = 1 / math.sqrt(feat_dim / 3)  # the authors' uniform start: rows of about unit norm
        self.register_buffer("memory_student", (torch.rand(self.dataset_size, feat_dim) * 2 - 1) * bound)
        self.register_buffer("memory_teacher", (torch.rand(self.dataset_size, feat_dim) * 2 - 1) * bound)
        # Z of each direction, NaN until the first batch sets it.
        self.register_buffer("normalisers", torch.full((2,), math.nan))

    def forward(self, student: Tensor, teacher: Tensor, index: Tensor) -> Tensor:
        teacher = _check_pair(student, teacher, same_bits=False, min_batch=1)
        if student.shape[1] != self.embed_student.in_features:
            raise ValueError(f"student has {student.shape[1]} bits but this loss was built for "
                             f"{self.embed_student.in_features}")
        if teacher.shape[1] != self.embed_teacher.in_features:
            raise ValueError(f"teacher has {teacher.shape[1]} bits but this loss was built for "
                             f"{self.embed_teacher.in_features}")
        if not isinstance(index, Tensor) or index.dtype != torch.int64 or index.shape != (student.shape[0],):
            raise ValueError(f"index must be an int64 tensor [batch] = [{student.shape[0]}] of training-set positions, "
                             f"got {index.dtype if isinstance(index, Tensor) else type(index).__name__} of shape "
                             f"{tuple(index.shape) if isinstance(index, Tensor) else '-'}")
        if self.memory_student.device != student.device:
            raise ValueError(f"the loss's memory is on {self.memory_student.device} but the codes are on "
                             f"{student.device}: move the module with .to(device)")
        if index.device not in (student.device, torch.device("cpu")):
            raise ValueError(f"index is on {index.device}; give it on the codes' device {student.device} or the CPU")
        # Checked where it lies: on the CPU (as a data loader gives it) for free, on a GPU with one wait.
        if index.numel() and not _within(index, self.dataset_size):
            raise ValueError(f"index must lie in [0, dataset_size) = [0, {self.dataset_size})")
        index = index.to(student.device, non_blocking=True)
        s = F.normalize(self.embed_student(student), dim=1)
        t = F.normalize(self.embed_teacher(teacher), dim=1)
        draws = torch.randint(self.dataset_size, (len(index), self.negatives), device=index.device)
        images = torch.cat([index[:, None], draws], dim=1)  # column 0: the positive
        student_side = self._scores(s, self.memory_teacher[images], 0)
        teacher_side = self._scores(t, self.memory_student[images], 1)
        loss = self._nce(student_side) + self._nce(teacher_side)
        with torch.no_grad():
            for memory, embedding in ((self.memory_student, s), (self.memory_teacher, t)):
                rows = memory[index] * self.momentum + embedding.detach().to(memory.dtype) * (1 - self.momentum)
                memory.index_copy_(0, index, F.normalize(rows, dim=1))
        return loss

    def _scores(self, embedding: Tensor, memory_rows: Tensor, direction: int) -> Tensor:
        """exp(<embedding_i, memory row> / temperature) / Z for each sample's [1 + negatives] rows; sets Z the first
        time, on the device (no wait for it)."""
        e = torch.exp(torch.bmm(memory_rows.to(embedding.dtype), embedding[:, :, None]).squeeze(2) / self.temperature)
        with torch.no_grad():
            current = self.normalisers[direction]
            z = torch.where(torch.isnan(current), e.mean().to(current.dtype) * self.dataset_size, current)
            self.normalisers[direction] = z
        return e / z.to(e.dtype)

    def _nce(self, x: Tensor) -> Tensor:
        noise = self.negatives / self.dataset_size
        positive = torch.log(x[:, 0] / (x[:, 0] + noise + 1e-7))
        negative = torch.log(noise / (x[:, 1:] + noise + 1e-7)).sum(dim=1)
        return -(positive + negative).mean()


def _within(index: Tensor, size: int) -> bool:
    """All of index in [0, size): one read of two numbers (on a GPU, one wait)."""
    low, high = torch.aminmax(index)
    return bool(low >= 0) and bool(high < size)

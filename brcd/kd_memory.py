"""The contrastive distillation baselines with memory banks of the whole training set, as the original BRCD release
trains them: modules whose embedding heads (and relation modules) train beside the student, whose banks are buffers
(in the state dict, so a run resumes with them), called with each sample's position in the training set.

- ``CRDLoss``: Contrastive Representation Distillation (Tian et al., ICLR 2020): each sample's embedding against the
  other model's memory of its own image and of random images (noise-contrastive estimation), both directions.
- ``CRCDLoss``: Complementary Relation Contrastive Distillation (Zhu et al., CVPR 2021): the student's relation of a
  sample to each anchor (a teacher embedding of the batch) against the teacher's relations of the same image and of
  random images to that anchor, from a memory of teacher embeddings.
- ``PACKDLoss``: the PACKD baseline of the original release (its ``PACKDConLoss``): the student's embedding against
  the teacher's embedding of the same image (InfoNCE), negatives from a memory of teacher embeddings, and, for
  several views of each image, positives weighted by an optimal-transport plan between the student's and the
  teacher's views.

Each docstring gives the formula; the tests compare each with it written out element by element. Negatives are drawn
uniformly from the training set with the default generator of the codes' device.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kd_checks import check_pair, momentum_value, positive_finite, positive_int
from .ops import _require_tensor

__all__ = ["CRDLoss", "CRCDLoss", "PACKDLoss"]


def _memory_start(rows: int, dim: int) -> Tensor:
    """The authors' start of a memory bank: uniform in +-1 / sqrt(dim / 3), rows of about unit norm."""
    bound = 1 / math.sqrt(dim / 3)
    return (torch.rand(rows, dim) * 2 - 1) * bound


def _check_bits(codes: Tensor, name: str, built_for: int) -> None:
    if codes.shape[-1] != built_for:
        raise ValueError(f"{name} has {codes.shape[-1]} bits but this loss was built for {built_for}")


def _check_positions(index, batch: int, dataset_size: int, codes: Tensor, memory: Tensor) -> Tensor:
    """Checks the batch's training-set positions against the codes and the memory; returns them on the codes'
    device."""
    if not isinstance(index, Tensor) or index.dtype != torch.int64 or index.shape != (batch,):
        raise ValueError(f"index must be an int64 tensor [batch] = [{batch}] of training-set positions, "
                         f"got {index.dtype if isinstance(index, Tensor) else type(index).__name__} of shape "
                         f"{tuple(index.shape) if isinstance(index, Tensor) else '-'}")
    if memory.device != codes.device:
        raise ValueError(f"the loss's memory is on {memory.device} but the codes are on {codes.device}: move the "
                         "module with .to(device)")
    if index.device not in (codes.device, torch.device("cpu")):
        raise ValueError(f"index is on {index.device}; give it on the codes' device {codes.device} or the CPU")
    # Checked where it lies: on the CPU (as a data loader gives it) for free, on a GPU with one wait.
    if index.numel() and not _within(index, dataset_size):
        raise ValueError(f"index must lie in [0, dataset_size) = [0, {dataset_size})")
    return index.to(codes.device, non_blocking=True)


def _within(index: Tensor, size: int) -> bool:
    """All of index in [0, size): one read of two numbers (on a GPU, one wait)."""
    low, high = torch.aminmax(index)
    return bool(low >= 0) and bool(high < size)


@torch.no_grad()
def _blend_rows(memory: Tensor, index: Tensor, embedding: Tensor, momentum: Union[float, Tensor]) -> None:
    """memory[index] <- normalise(momentum * memory[index] + (1 - momentum) * embedding); momentum a number or a
    column [batch, 1] of the memory's dtype, one per row."""
    rows = memory[index] * momentum + embedding.detach().to(memory.dtype) * (1 - momentum)
    memory.index_copy_(0, index, F.normalize(rows, dim=1))


def _nce(x: Tensor, negatives: int, dataset_size: int) -> Tensor:
    """Noise-contrastive estimation over scores x [..., 1 + negatives] (column 0 the positive), noise m / N; the mean
    over the leading dimensions."""
    noise = negatives / dataset_size
    positive = torch.log(x[..., 0] / (x[..., 0] + noise + 1e-7))
    negative = torch.log(noise / (x[..., 1:] + noise + 1e-7)).sum(dim=-1)
    return -(positive + negative).mean()


class _TwoHeads(nn.Module):
    """What CRD and CRCD share: their checked settings and a linear head per model to unit-norm embeddings."""

    def __init__(self, student_bits: int, teacher_bits: int, dataset_size: int, feat_dim: int, negatives: int,
                 temperature: float, momentum: float):
        super().__init__()
        student_bits = positive_int(student_bits, "student_bits")
        teacher_bits = positive_int(teacher_bits, "teacher_bits")
        self.dataset_size = positive_int(dataset_size, "dataset_size")
        self.feat_dim = positive_int(feat_dim, "feat_dim")
        self.negatives = positive_int(negatives, "negatives")
        self.temperature = positive_finite(temperature, "temperature")
        self.momentum = momentum_value(momentum)
        self.embed_student = nn.Linear(student_bits, self.feat_dim)
        self.embed_teacher = nn.Linear(teacher_bits, self.feat_dim)

    def _embeddings(self, student: Tensor, teacher: Tensor, index, memory: Tensor):
        """Checks the call's arguments; returns the embeddings s and t and the positions on the codes' device."""
        teacher = check_pair(student, teacher, same_bits=False, min_batch=1)
        _check_bits(student, "student", self.embed_student.in_features)
        _check_bits(teacher, "teacher", self.embed_teacher.in_features)
        index = _check_positions(index, len(student), self.dataset_size, student, memory)
        return F.normalize(self.embed_student(student), dim=1), F.normalize(self.embed_teacher(teacher), dim=1), index


class CRDLoss(_TwoHeads):
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
    are buffers, in the state dict for resuming. Defaults are the authors' (128 dimensions, 500 negatives with a
    training set of 5,000 images, temperature 0.05, momentum 0.5).
    """

    def __init__(self, student_bits: int, teacher_bits: int, dataset_size: int, *, feat_dim: int = 128,
                 negatives: int = 500, temperature: float = 0.05, momentum: float = 0.5):
        super().__init__(student_bits, teacher_bits, dataset_size, feat_dim, negatives, temperature, momentum)
        self.register_buffer("memory_student", _memory_start(self.dataset_size, self.feat_dim))
        self.register_buffer("memory_teacher", _memory_start(self.dataset_size, self.feat_dim))
        # Z of each direction, NaN until the first batch sets it.
        self.register_buffer("normalisers", torch.full((2,), math.nan))

    def forward(self, student: Tensor, teacher: Tensor, index: Tensor) -> Tensor:
        s, t, index = self._embeddings(student, teacher, index, self.memory_student)
        draws = torch.randint(self.dataset_size, (len(index), self.negatives), device=index.device)
        images = torch.cat([index[:, None], draws], dim=1)  # column 0: the positive
        student_side = self._scores(s, self.memory_teacher[images], 0)
        teacher_side = self._scores(t, self.memory_student[images], 1)
        loss = (_nce(student_side, self.negatives, self.dataset_size)
                + _nce(teacher_side, self.negatives, self.dataset_size))
        _blend_rows(self.memory_student, index, s, self.momentum)
        _blend_rows(self.memory_teacher, index, t, self.momentum)
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


class _Relation(nn.Module):
    """R(x, a) = W_out relu(W_sample x - W_anchor a) (with biases): how a sample relates to an anchor."""

    def __init__(self, dim: int):
        super().__init__()
        self.sample = nn.Linear(dim, dim)
        self.anchor = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, samples: Tensor, anchors: Tensor) -> Tensor:
        """samples [S, d], anchors [A, d] -> relations [S, A, d]."""
        return self.out(F.relu(self.sample(samples)[:, None, :] - self.anchor(anchors)[None, :, :]))


class _Critic(nn.Module):
    """A linear map to unit norm: the space where two relations are compared."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x), dim=-1)


class CRCDLoss(_TwoHeads):
    """Complementary relation contrastive distillation over a training set of ``dataset_size`` images: the student's
    relation of a sample to an anchor must pick out, among the teacher's relations of many images to that anchor, the
    one of the same image.

    Each model's codes are embedded by a linear head and scaled to unit norm (``feat_dim`` dimensions): s_i, t_i. The
    anchors are the teacher embeddings t_j of the first ``anchors`` samples of the batch (all of it by default; a
    shuffled batch makes them a random subset). Two relation modules, ``R(x, a) = W_o relu(W_x x - W_a a)``, and two
    critics (a linear map to unit norm) give the student's relation ``f_ij = h_S(R_S(s_i, t_j))`` and the teacher's
    relation of a memory row y, ``g(y, j) = h_T(R_T(y, t_j))``, M being the memory of teacher embeddings. With m =
    ``negatives`` images r_1..r_m drawn uniformly from the training set (once per call, shared by the batch), n_i
    sample i's image and ``x(y) = exp((<f_ij, g(y, j)> - 1) / temperature)`` (at most 1: both have unit norm):

        loss = -mean over (i, j) of [ log(x(M[n_i]) / (x(M[n_i]) + m / N)) + sum_k log((m / N) / (x(M[r_k]) + m / N)) ]

    (N = ``dataset_size``; a 1e-7 beside each denominator): the noise-contrastive estimate of CRD with relations in
    place of embeddings. As in CRD, the sample's current embedding is the anchor of the contrast and every candidate
    comes from the memory, so a student cannot score by telling current embeddings from remembered ones. After the
    loss, the memory rows of the batch's images become ``normalise(momentum * row + (1 - momentum) * t_i)``.

    The feature relations of the paper, not its gradient relations (the original release's CRCD has none either).
    Memory is O(B * A * m) for the scores and O(A * m * feat_dim) for the negatives' relations, which the shared draw
    keeps small. Defaults are the release's (128 dimensions, 500 negatives, temperature 0.05, momentum 0.5). Heads,
    relation modules and critics train beside the student; the memory is a buffer.
    """

    def __init__(self, student_bits: int, teacher_bits: int, dataset_size: int, *, feat_dim: int = 128,
                 negatives: int = 500, anchors: Optional[int] = None, temperature: float = 0.05,
                 momentum: float = 0.5):
        super().__init__(student_bits, teacher_bits, dataset_size, feat_dim, negatives, temperature, momentum)
        self.anchors = None if anchors is None else positive_int(anchors, "anchors")
        self.relation_student, self.relation_teacher = _Relation(self.feat_dim), _Relation(self.feat_dim)
        self.critic_student, self.critic_teacher = _Critic(self.feat_dim), _Critic(self.feat_dim)
        self.register_buffer("memory_teacher", _memory_start(self.dataset_size, self.feat_dim))

    def forward(self, student: Tensor, teacher: Tensor, index: Tensor) -> Tensor:
        s, t, index = self._embeddings(student, teacher, index, self.memory_teacher)
        anchors = t[: self.anchors]
        draws = torch.randint(self.dataset_size, (self.negatives,), device=index.device)
        remembered = lambda images: self.critic_teacher(self.relation_teacher(
            self.memory_teacher[images].to(s.dtype), anchors))
        student_relations = self.critic_student(self.relation_student(s, anchors))  # [B, A, d]
        scores = torch.cat([(student_relations * remembered(index)).sum(dim=2, keepdim=True),
                            torch.einsum("bad,mad->bam", student_relations, remembered(draws))], dim=2)
        loss = _nce(torch.exp((scores - 1) / self.temperature), self.negatives, self.dataset_size)
        _blend_rows(self.memory_teacher, index, t, self.momentum)
        return loss


class PACKDLoss(nn.Module):
    """The PACKD baseline of the original BRCD release (its ``PACKDConLoss``) over a training set of
    ``dataset_size`` images: InfoNCE between the student's and the teacher's embeddings of the same image, the
    negatives from a memory of teacher embeddings, the positives of several views of an image weighted by an
    optimal-transport plan between the two models' views.

    Codes are [B, K] (one view per image) or [B, V, K] (V views of each image, view 0 the image itself). The
    student's are embedded by a linear head to unit norm (``feat_dim`` dimensions): s_iv. The teacher's are too,
    t_iv, by a head of their own where ``feat_dim`` < the teacher's bits, and otherwise only scaled to unit norm
    (``feat_dim`` becoming the teacher's bits), as the release does. With pi_i the entropic optimal-transport plan
    between sample i's student and teacher views (Sinkhorn in the log domain: cost ``|s_iv - t_iw|^2``, marginals
    1 / V, regularisation ``sinkhorn_epsilon``, up to ``sinkhorn_iterations`` rounds, stopping once the mean L1
    change of the row potentials is below ``sinkhorn_tolerance``: one read of a number per round, on a GPU a wait), a
    constant (no gradient flows through it):

        p_i = sum over (v, w) of pi_i[v, w] <s_iv, t_iw>          (V = 1: p_i = <s_i, t_i>)
        n_ivk = <s_iv, M[r_ik]>   for m = ``negatives`` images r_i1..r_im drawn uniformly from the training set
        loss = -mean_i log( exp(p_i / T) / (exp(p_i / T) + sum over (v, k) of exp(n_ivk / T)) )

    (T = ``temperature``, M the memory of teacher embeddings). Before the scores, the memory rows of the batch's
    images take the teacher's view-0 embeddings: replaced the first time an image is seen (the release starts with
    momentum 0 for its first epoch), then ``normalise(momentum * row + (1 - momentum) * t_i0)``. Defaults are the
    release's (64 dimensions, 500 negatives, temperature 0.07, momentum 0.5, Sinkhorn 0.1 / 100 / 0.1). The heads
    train beside the student; the memory and which rows were written are buffers.
    """

    def __init__(self, student_bits: int, teacher_bits: int, dataset_size: int, *, feat_dim: int = 64,
                 negatives: int = 500, temperature: float = 0.07, momentum: float = 0.5,
                 sinkhorn_epsilon: float = 0.1, sinkhorn_iterations: int = 100, sinkhorn_tolerance: float = 0.1):
        super().__init__()
        student_bits = positive_int(student_bits, "student_bits")
        self.teacher_bits = positive_int(teacher_bits, "teacher_bits")
        self.dataset_size = positive_int(dataset_size, "dataset_size")
        feat_dim = positive_int(feat_dim, "feat_dim")
        self.negatives = positive_int(negatives, "negatives")
        self.temperature = positive_finite(temperature, "temperature")
        self.momentum = momentum_value(momentum)
        self.sinkhorn_epsilon = positive_finite(sinkhorn_epsilon, "sinkhorn_epsilon")
        self.sinkhorn_iterations = positive_int(sinkhorn_iterations, "sinkhorn_iterations")
        self.sinkhorn_tolerance = positive_finite(sinkhorn_tolerance, "sinkhorn_tolerance")
        if feat_dim >= self.teacher_bits:
            feat_dim, self.embed_teacher = self.teacher_bits, None
        else:
            self.embed_teacher = nn.Linear(self.teacher_bits, feat_dim)
        self.embed_student = nn.Linear(student_bits, feat_dim)
        self.register_buffer("memory_teacher", F.normalize(_memory_start(self.dataset_size, feat_dim), dim=1))
        self.register_buffer("written", torch.zeros(self.dataset_size, dtype=torch.bool))

    def forward(self, student: Tensor, teacher: Tensor, index: Tensor) -> Tensor:
        student, teacher = self._check_views(student, teacher)
        _check_bits(student, "student", self.embed_student.in_features)
        _check_bits(teacher, "teacher", self.teacher_bits)
        index = _check_positions(index, len(student), self.dataset_size, student, self.memory_teacher)
        s = F.normalize(self.embed_student(student), dim=2)  # [B, V, d]
        t = F.normalize(teacher if self.embed_teacher is None else self.embed_teacher(teacher), dim=2)
        momentum = self.written[index].to(self.memory_teacher.dtype)[:, None] * self.momentum  # 0 where first seen
        _blend_rows(self.memory_teacher, index, t[:, 0], momentum)
        self.written[index] = True
        draws = torch.randint(self.dataset_size, (len(index), self.negatives), device=index.device)
        negative = torch.einsum("bvd,bmd->bvm", s, self.memory_teacher[draws].to(s.dtype)).flatten(1)
        pairs = torch.einsum("bvd,bwd->bvw", s, t)  # [B, V, V]
        plan = self._transport_plan(s.detach(), t.detach()) if s.shape[1] > 1 else torch.ones_like(pairs)
        positive = (plan * pairs).sum(dim=(1, 2))
        logits = torch.cat([positive[:, None], negative], dim=1) / self.temperature
        return -(logits[:, 0] - torch.logsumexp(logits, dim=1)).mean()

    @staticmethod
    def _check_views(student: Tensor, teacher: Tensor):
        """[B, K] or [B, V, K] codes -> [B, V, K] each, teacher in the student's dtype."""
        for name, t in (("student", student), ("teacher", teacher)):
            _require_tensor(t, name)
            if t.dim() not in (2, 3):
                raise ValueError(f"{name} must be a tensor [batch, bits] or [batch, views, bits], got shape "
                                 f"{tuple(t.shape)}")
        if student.dim() != teacher.dim() or student.shape[:-1] != teacher.shape[:-1]:
            raise ValueError(f"teacher has batch x views {tuple(teacher.shape[:-1])} but student has "
                             f"{tuple(student.shape[:-1])}: one code per view of each image in each")
        flat = lambda x: x.reshape(-1, x.shape[-1])
        teacher = check_pair(flat(student), flat(teacher), same_bits=False, min_batch=1).view(teacher.shape)
        views = lambda x: x if x.dim() == 3 else x[:, None, :]
        return views(student), views(teacher)

    def _transport_plan(self, s: Tensor, t: Tensor) -> Tensor:
        """Each sample's entropic transport plan [B, V, V] between its student views s and teacher views t."""
        eps, views = self.sinkhorn_epsilon, s.shape[1]
        cost = torch.cdist(s, t) ** 2
        log_marginal = -math.log(views)
        u = torch.zeros(s.shape[:2], dtype=s.dtype, device=s.device)
        v = torch.zeros_like(u)
        scaled = lambda: (u[:, :, None] + v[:, None, :] - cost) / eps
        for _ in range(self.sinkhorn_iterations):
            previous = u
            u = eps * (log_marginal - torch.logsumexp(scaled(), dim=2)) + u
            v = eps * (log_marginal - torch.logsumexp(scaled(), dim=1)) + v
            if (u - previous).abs().sum(dim=1).mean() < self.sinkhorn_tolerance:
                break
        return torch.exp(scaled())

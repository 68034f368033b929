"""Training objectives, each a small module over the fused loss ops, in one registry.

- ``cibhash``: the teacher (and the student without distillation): NT-Xent between the codes of two views plus
  ``kl_weight`` times the symmetric Bernoulli KL between the views' bit probabilities (CIBHash).
- ``brcd``: the distilled student: ``cibhash`` on its own views plus ``kd_weight`` times the BRCD loss against the
  frozen teacher's codes (anchor: teacher view 1; structural: teacher view 2), with bit masks, groups and alpha.
- ``rkd``, ``pkt``, ``sp``, ``hinton``, ``sskd``, ``crd``, ``crcd``, ``packd``: the KD baselines BRCD is compared
  with, trained as the original release trains them: ``cibhash`` on the student's own views plus ``kd_weight`` times
  a loss (brcd.kd_losses) between its view-1 codes and the teacher's. ``crd``, ``crcd`` and ``packd`` keep memory
  banks of the training set: they are built with the set's size and the code length, and called with each sample's
  position in the set; ``sskd`` is called with both models' codes of rotated copies of the images.

>>> objective = make_objective("cibhash", temperature=0.3)
>>> loss = objective(probs1, codes1, probs2, codes2)
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .kd_losses import CRCDLoss, CRDLoss, PACKDLoss, hinton_kd_loss, pkt_loss, rkd_loss, sp_loss, sskd_loss
from .ops import brcd_loss, ntxent_loss

__all__ = ["OBJECTIVES", "LABELS", "DISTILLATION_OBJECTIVES", "DATASET_OBJECTIVES", "register_objective",
           "make_objective", "symmetric_bernoulli_kl", "CIBHashObjective", "BRCDObjective", "KDBaselineObjective"]

OBJECTIVES: Dict[str, Callable[..., nn.Module]] = {}
# How reports name each objective's model ("student with BRCD"); which objectives distil (their modules take the
# teacher's codes); and which are built for a training set (make_objective(..., dataset_size=N, bits=K)) and called
# with the batch's positions in it.
LABELS: Dict[str, str] = {}
DISTILLATION_OBJECTIVES: List[str] = []
DATASET_OBJECTIVES: List[str] = []


def register_objective(name: str, label: Optional[str] = None, distills: bool = False, per_dataset: bool = False):
    def wrap(factory):
        OBJECTIVES[name] = factory
        LABELS[name] = label or name
        if distills:
            DISTILLATION_OBJECTIVES.append(name)
        if per_dataset:
            DATASET_OBJECTIVES.append(name)
        return factory
    return wrap


def make_objective(name: str, **kwargs) -> nn.Module:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


def symmetric_bernoulli_kl(p: Tensor, q: Tensor, eps: float = 1e-7) -> Tensor:
    """(KL(p||q) + KL(q||p)) / 2 of independent Bernoulli bits, summed over bits, averaged over the batch."""
    p = p.clamp(eps, 1 - eps)
    q = q.clamp(eps, 1 - eps)

    def kl(a, b):
        return (a * (a.log() - b.log()) + (1 - a) * ((1 - a).log() - (1 - b).log())).sum(dim=1)

    return ((kl(p, q) + kl(q, p)) / 2).mean()


@register_objective("cibhash", "CIBHash")
class CIBHashObjective(nn.Module):
    def __init__(self, temperature: float = 0.3, kl_weight: float = 0.001):
        super().__init__()
        self.temperature = temperature
        self.kl_weight = kl_weight

    def forward(self, probs1: Tensor, codes1: Tensor, probs2: Tensor, codes2: Tensor) -> Tensor:
        return ntxent_loss(codes1, codes2, temperature=self.temperature) + self.kl_weight * symmetric_bernoulli_kl(
            probs1, probs2)


@register_objective("brcd", "BRCD", distills=True)
class BRCDObjective(nn.Module):
    # The trainer gives it both teacher views, and the clusters' groups, alpha and bit masks.
    needs_clusters = True

    def __init__(self, temperature: float = 0.3, kl_weight: float = 0.001, kd_weight: float = 1.0):
        super().__init__()
        self.own = CIBHashObjective(temperature, kl_weight)
        self.temperature = temperature
        self.kd_weight = kd_weight

    def forward(self, probs1: Tensor, codes1: Tensor, probs2: Tensor, codes2: Tensor, teacher_codes1: Tensor,
                teacher_codes2: Tensor, *, alpha: Union[float, Tensor] = 0.8, bit_mask: Optional[Tensor] = None,
                row_groups: Optional[Tensor] = None, col_groups: Optional[Tensor] = None,
                check_alpha: bool = True) -> Tensor:
        kd = brcd_loss(codes1, teacher_codes1.detach(), teacher_codes2.detach(), temperature=self.temperature,
                       alpha=alpha, bit_mask=bit_mask, row_groups=row_groups, col_groups=col_groups,
                       check_alpha=check_alpha)
        return self.own(probs1, codes1, probs2, codes2) + self.kd_weight * kd


class KDBaselineObjective(nn.Module):
    """A KD baseline as the original release trains one: the student's own CIBHash objective plus ``kd_weight`` times
    ``kd_loss`` between the student's view-1 codes and the teacher's; the teacher's codes are a fixed target. Some
    losses take more (``extra_input``): "index", the batch's positions in the training set (CRD's memory banks), or
    "rotations", both models' codes of the view-1 images rotated by 90, 180 and 270 degrees (SSKD). A kd_loss that is
    a module is a submodule: its parameters train with the student, its buffers are in the state dict.
    """

    needs_clusters = False
    EXTRA_INPUTS = (None, "index", "rotations")

    def __init__(self, kd_loss: Callable[..., Tensor], temperature: float = 0.3, kl_weight: float = 0.001,
                 kd_weight: float = 1.0, extra_input: Optional[str] = None):
        super().__init__()
        if extra_input not in self.EXTRA_INPUTS:
            raise ValueError(f"extra_input must be one of {self.EXTRA_INPUTS}, got {extra_input!r}")
        self.own = CIBHashObjective(temperature, kl_weight)
        self.kd_loss = kd_loss
        self.kd_weight = kd_weight
        self.extra_input = extra_input

    def forward(self, probs1: Tensor, codes1: Tensor, probs2: Tensor, codes2: Tensor, teacher_codes1: Tensor, *,
                index: Optional[Tensor] = None, rotated: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """index: [B] positions in the training set; rotated: (student codes, teacher codes) of the rotated images,
        [3B, K] each, all images rotated by 90 degrees, then by 180, then by 270."""
        target = teacher_codes1.detach()
        if self.extra_input == "index":
            if index is None:
                raise ValueError("index (the batch's positions in the training set) is required by this objective")
            kd = self.kd_loss(codes1, target, index)
        elif self.extra_input == "rotations":
            if rotated is None:
                raise ValueError("rotated (both models' codes of the rotated images) is required by this objective")
            student_rotated, teacher_rotated = rotated
            views = lambda first, rest: torch.cat([first, rest]).view(-1, *first.shape)
            kd = self.kd_loss(views(codes1, student_rotated), views(target, teacher_rotated.detach()))
        else:
            kd = self.kd_loss(codes1, target)
        return self.own(probs1, codes1, probs2, codes2) + self.kd_weight * kd


for _name, _loss, _label, _extra in (("rkd", rkd_loss, "RKD", None), ("pkt", pkt_loss, "PKT", None),
                                     ("sp", sp_loss, "SP", None), ("hinton", hinton_kd_loss, "Hinton KD", None),
                                     ("sskd", sskd_loss, "SSKD", "rotations")):
    register_objective(_name, _label, distills=True)(functools.partial(KDBaselineObjective, _loss, extra_input=_extra))


@register_objective("crd", "CRD", distills=True, per_dataset=True)
def crd_objective(temperature: float = 0.3, kl_weight: float = 0.001, kd_weight: float = 1.0, *, dataset_size: int,
                  bits: int, negatives: int = 500, feat_dim: int = 128, crd_temperature: float = 0.05,
                  momentum: float = 0.5) -> KDBaselineObjective:
    """CIBHash plus ``kd_weight`` times CRD: kd_losses.CRDLoss between student and teacher codes of ``bits`` bits,
    with memory banks of ``dataset_size`` images (``crd_temperature`` is its own; ``temperature`` is NT-Xent's)."""
    crd = CRDLoss(bits, bits, dataset_size, feat_dim=feat_dim, negatives=negatives, temperature=crd_temperature,
                  momentum=momentum)
    return KDBaselineObjective(crd, temperature, kl_weight, kd_weight, extra_input="index")


@register_objective("crcd", "CRCD", distills=True, per_dataset=True)
def crcd_objective(temperature: float = 0.3, kl_weight: float = 0.001, kd_weight: float = 1.0, *, dataset_size: int,
                   bits: int, negatives: int = 500, feat_dim: int = 128, crcd_temperature: float = 0.05,
                   momentum: float = 0.5) -> KDBaselineObjective:
    """CIBHash plus ``kd_weight`` times CRCD: kd_losses.CRCDLoss between student and teacher codes of ``bits`` bits,
    with a memory of ``dataset_size`` images (``crcd_temperature`` is its own; ``temperature`` is NT-Xent's)."""
    crcd = CRCDLoss(bits, bits, dataset_size, feat_dim=feat_dim, negatives=negatives, temperature=crcd_temperature,
                    momentum=momentum)
    return KDBaselineObjective(crcd, temperature, kl_weight, kd_weight, extra_input="index")


@register_objective("packd", "PACKD", distills=True, per_dataset=True)
def packd_objective(temperature: float = 0.3, kl_weight: float = 0.001, kd_weight: float = 1.0, *, dataset_size: int,
                    bits: int, negatives: int = 500, feat_dim: int = 64, packd_temperature: float = 0.07,
                    momentum: float = 0.5) -> KDBaselineObjective:
    """CIBHash plus ``kd_weight`` times PACKD: kd_losses.PACKDLoss between the student's and the teacher's view-1
    codes (one view per image, as the release trains it), with a memory of ``dataset_size`` images
    (``packd_temperature`` is its own; ``temperature`` is NT-Xent's)."""
    packd = PACKDLoss(bits, bits, dataset_size, feat_dim=feat_dim, negatives=negatives, temperature=packd_temperature,
                      momentum=momentum)
    return KDBaselineObjective(packd, temperature, kl_weight, kd_weight, extra_input="index")

"""Training objectives, each a small module over the fused loss ops, in one registry.

- ``cibhash``: the teacher (and the student without distillation): NT-Xent between the codes of two views plus
  ``kl_weight`` times the symmetric Bernoulli KL between the views' bit probabilities (CIBHash).
- ``brcd``: the distilled student: ``cibhash`` on its own views plus ``kd_weight`` times the BRCD loss against the
  frozen teacher's codes (anchor: teacher view 1; structural: teacher view 2), with bit masks, groups and alpha.
- ``rkd``, ``pkt``, ``sp``, ``hinton``: the KD baselines BRCD is compared with, trained as the original release trains
  them: ``cibhash`` on the student's own views plus ``kd_weight`` times a loss (brcd.kd_losses) between its view-1
  codes and the teacher's.

>>> objective = make_objective("cibhash", temperature=0.3)
>>> loss = objective(probs1, codes1, probs2, codes2)
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Union

from torch import Tensor, nn

from .kd_losses import hinton_kd_loss, pkt_loss, rkd_loss, sp_loss
from .ops import brcd_loss, ntxent_loss

__all__ = ["OBJECTIVES", "LABELS", "DISTILLATION_OBJECTIVES", "register_objective", "make_objective",
           "symmetric_bernoulli_kl", "CIBHashObjective", "BRCDObjective", "KDBaselineObjective"]

OBJECTIVES: Dict[str, Callable[..., nn.Module]] = {}
# How reports name each objective's model ("student with BRCD"), and which objectives distil: those whose modules
# take the teacher's codes.
LABELS: Dict[str, str] = {}
DISTILLATION_OBJECTIVES: List[str] = []


def register_objective(name: str, label: Optional[str] = None, distills: bool = False):
    def wrap(factory):
        OBJECTIVES[name] = factory
        LABELS[name] = label or name
        if distills:
            DISTILLATION_OBJECTIVES.append(name)
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
    ``kd_loss(student view-1 codes, teacher view-1 codes)``; the teacher's codes are a fixed target."""

    needs_clusters = False

    def __init__(self, kd_loss: Callable[[Tensor, Tensor], Tensor], temperature: float = 0.3, kl_weight: float = 0.001,
                 kd_weight: float = 1.0):
        super().__init__()
        self.own = CIBHashObjective(temperature, kl_weight)
        self.kd_loss = kd_loss
        self.kd_weight = kd_weight

    def forward(self, probs1: Tensor, codes1: Tensor, probs2: Tensor, codes2: Tensor, teacher_codes1: Tensor) -> Tensor:
        return self.own(probs1, codes1, probs2, codes2) + self.kd_weight * self.kd_loss(codes1, teacher_codes1.detach())


for _name, _loss, _label in (("rkd", rkd_loss, "RKD"), ("pkt", pkt_loss, "PKT"), ("sp", sp_loss, "SP"),
                             ("hinton", hinton_kd_loss, "Hinton KD")):
    register_objective(_name, _label, distills=True)(functools.partial(KDBaselineObjective, _loss))

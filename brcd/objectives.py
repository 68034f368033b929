"""Training objectives, each a small module over the fused loss ops, in one registry.

- ``cibhash``: the teacher (and the student without distillation): NT-Xent between the codes of two views plus
  ``kl_weight`` times the symmetric Bernoulli KL between the views' bit probabilities (CIBHash).
- ``brcd``: the distilled student: ``cibhash`` on its own views plus ``kd_weight`` times the BRCD loss against the
  frozen teacher's codes (anchor: teacher view 1; structural: teacher view 2), with bit masks, groups and alpha.

>>> objective = make_objective("cibhash", temperature=0.3)
>>> loss = objective(probs1, codes1, probs2, codes2)
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

from torch import Tensor, nn

from .ops import brcd_loss, ntxent_loss

__all__ = ["OBJECTIVES", "register_objective", "make_objective", "symmetric_bernoulli_kl", "CIBHashObjective",
           "BRCDObjective"]

OBJECTIVES: Dict[str, Callable[..., nn.Module]] = {}


def register_objective(name: str):
    def wrap(cls):
        OBJECTIVES[name] = cls
        return cls
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


@register_objective("cibhash")
class CIBHashObjective(nn.Module):
    def __init__(self, temperature: float = 0.3, kl_weight: float = 0.001):
        super().__init__()
        self.temperature = temperature
        self.kl_weight = kl_weight

    def forward(self, probs1: Tensor, codes1: Tensor, probs2: Tensor, codes2: Tensor) -> Tensor:
        return ntxent_loss(codes1, codes2, temperature=self.temperature) + self.kl_weight * symmetric_bernoulli_kl(
            probs1, probs2)


@register_objective("brcd")
class BRCDObjective(nn.Module):
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

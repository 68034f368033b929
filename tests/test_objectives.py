"""The objectives registry: CIBHash and BRCD objectives against their definitions."""
import math

import pytest
import torch

from brcd import reference as ref
from brcd.objectives import OBJECTIVES, make_objective, symmetric_bernoulli_kl


def bernoulli_kl_by_hand(p, q):
    total = 0.0
    for pi, qi in zip(p.flatten().tolist(), q.flatten().tolist()):
        total += pi * math.log(pi / qi) + (1 - pi) * math.log((1 - pi) / (1 - qi))
    return float(total)


def test_symmetric_kl_matches_definition():
    p = torch.tensor([[0.2, 0.9, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.6, 0.5]], dtype=torch.float64)
    want = (bernoulli_kl_by_hand(p, q) + bernoulli_kl_by_hand(q, p)) / 2
    assert float(symmetric_bernoulli_kl(p, q)) == pytest.approx(want, rel=1e-12)
    assert float(symmetric_bernoulli_kl(p, p)) == 0.0


def test_objectives_are_their_sums():
    g = torch.Generator().manual_seed(0)
    B, K = 16, 32
    p1, p2 = torch.rand(B, K, generator=g, dtype=torch.float64), torch.rand(B, K, generator=g, dtype=torch.float64)
    c1, c2 = (torch.where(p > 0.5, 1.0, -1.0).double() for p in (p1, p2))
    t1, t2 = torch.randn(B, K, generator=g, dtype=torch.float64).sign(), torch.randn(B, K, generator=g,
                                                                                    dtype=torch.float64).sign()
    teacher = make_objective("cibhash", temperature=0.3, kl_weight=0.001)
    want = ref.ntxent_loss(c1, c2, temperature=0.3) + 0.001 * symmetric_bernoulli_kl(p1, p2)
    assert float(teacher(p1, c1, p2, c2)) == pytest.approx(float(want), rel=1e-10)
    student = make_objective("brcd", temperature=0.3, kl_weight=0.001, kd_weight=2.0)
    groups = torch.randint(-1, 3, (2 * B,), generator=g)
    got = student(p1, c1, p2, c2, t1, t2, alpha=0.5, row_groups=groups, col_groups=groups)
    want = want + 2.0 * ref.brcd_loss(c1, t1, t2, temperature=0.3, alpha=0.5, row_groups=groups, col_groups=groups)
    assert float(got) == pytest.approx(float(want), rel=1e-10)
    assert set(OBJECTIVES) >= {"cibhash", "brcd"}
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("nope")


def test_brcd_objective_does_not_train_the_teacher():
    g = torch.Generator().manual_seed(1)
    p1, p2 = (torch.rand(8, 16, generator=g).requires_grad_() for _ in range(2))
    t1, t2 = (torch.randn(8, 16, generator=g).requires_grad_() for _ in range(2))
    c1, c2 = p1 * 2 - 1, p2 * 2 - 1
    make_objective("brcd")(p1, c1, p2, c2, t1, t2).backward()
    assert p1.grad is not None and t1.grad is None and t2.grad is None

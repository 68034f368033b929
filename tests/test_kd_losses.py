"""The KD baselines (brcd.kd_losses) against their formulas written out element by element, their invariances, their
gradients, and bad input."""
import itertools
import math

import pytest
import torch

from brcd import kd_losses
from brcd.kd_losses import hinton_kd_loss, pkt_loss, rkd_loss, sp_loss
from brcd.objectives import DISTILLATION_OBJECTIVES, LABELS, make_objective, symmetric_bernoulli_kl
from brcd import reference as ref
from conftest import device_params

LOSSES = {"rkd": rkd_loss, "pkt": pkt_loss, "sp": sp_loss, "hinton": hinton_kd_loss}


# --- the formulas, one element at a time, in Python floats -------------------------------------------------------

def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rows(x):
    return [list(map(float, r)) for r in x.double().tolist()]


def dist(a, b):
    return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))


def rkd_by_hand(s, t, wd=25.0, wa=50.0):
    s, t = rows(s), rows(t)
    n = len(s)

    def relative(x):
        d = [[dist(x[i], x[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean if mean > 0 else 0.0 for v in r] for r in d]

    def unit(a, b):  # (a - b) / |a - b|, 0 where a = b
        diff = [p - q for p, q in zip(a, b)]
        norm = math.sqrt(sum(v * v for v in diff))
        return [v / norm if norm > 0 else 0.0 for v in diff]

    def angle(x, i, j, k):
        return sum(p * q for p, q in zip(unit(x[i], x[j]), unit(x[k], x[j])))

    ds, dt = relative(s), relative(t)
    loss_d = sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n ** 2
    loss_a = sum(huber(angle(s, i, j, k) - angle(t, i, j, k)) for i, j, k in itertools.product(range(n), repeat=3))
    return wd * loss_d + wa * loss_a / n ** 3


def pkt_by_hand(s, t, eps=1e-7):
    def distributions(x):
        unit = [[v / (math.sqrt(sum(w * w for w in r)) + eps) for v in r] for r in x]
        k = [[(sum(p * q for p, q in zip(a, b)) + 1) / 2 for b in unit] for a in unit]
        return [[v / sum(r) for v in r] for r in k]

    ps, pt = distributions(rows(s)), distributions(rows(t))
    n = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n ** 2


def sp_by_hand(s, t):
    def gram(x):
        g = [[sum(p * q for p, q in zip(a, b)) for b in x] for a in x]
        return [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in g]

    gs, gt = gram(rows(s)), gram(rows(t))
    n = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(n) for j in range(n)) / n ** 2


def hinton_by_hand(s, t, temperature=4.0):
    total = 0.0
    for a, b in zip(rows(s), rows(t)):
        za = sum(math.exp(v / temperature) for v in a)
        zb = sum(math.exp(v / temperature) for v in b)
        for x, y in zip(a, b):
            q, p = math.exp(x / temperature) / za, math.exp(y / temperature) / zb
            total += p * math.log(p / q)
    return total / len(s) * temperature ** 2


BY_HAND = {"rkd": rkd_by_hand, "pkt": pkt_by_hand, "sp": sp_by_hand, "hinton": hinton_by_hand}


def codes(n, k, seed, signs=False, dtype=torch.float64, device="cpu"):
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x.sign() if signs else x).to(dtype=dtype, device=device)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("signs", [False, True], ids=["real", "pm1"])
@pytest.mark.parametrize("shape", [(2, 3), (5, 7), (6, 16)])
def test_matches_formula_written_out(name, signs, shape):
    n, k = shape
    s, t = codes(n, k, 1, signs), codes(n, k, 2, signs)
    if signs:  # ±1 codes repeat: equal rows, zero distances, ties
        s[1], t[-1] = s[0], t[0]
    assert float(LOSSES[name](s, t)) == pytest.approx(BY_HAND[name](s, t), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_devices_against_float64(name, device, dtype):
    s, t = codes(64, 32, 3), codes(64, 32, 4)
    want = float(LOSSES[name](s, t))
    got = LOSSES[name](s.to(device, dtype), t.to(device, dtype))
    assert got.dtype == dtype and got.device.type == device
    assert float(got) == pytest.approx(want, rel=1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_for_the_teachers_own_codes(name):
    t = codes(12, 16, 5, signs=True)
    t[3] = t[7]  # a duplicated code as well
    assert float(LOSSES[name](t.clone(), t)) == pytest.approx(0.0, abs=1e-12)
    assert float(LOSSES[name](codes(12, 16, 6, signs=True), t)) > 0


def test_invariances():
    s, t = codes(10, 8, 7), codes(10, 8, 8)
    shift = torch.randn(1, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    # RKD: translation and scaling of either side.
    assert float(rkd_loss(3.0 * s + shift, t)) == pytest.approx(float(rkd_loss(s, t)), rel=1e-10)
    assert float(rkd_loss(s, 0.5 * t - shift)) == pytest.approx(float(rkd_loss(s, t)), rel=1e-10)
    # PKT: a positive scaling of each code (cosines); SP: a scaling of the code set.
    scale = torch.rand(10, 1, generator=torch.Generator().manual_seed(10), dtype=torch.float64) + 0.5
    assert float(pkt_loss(scale * s, t)) == pytest.approx(float(pkt_loss(s, t)), rel=1e-6)
    assert float(sp_loss(4.0 * s, t)) == pytest.approx(float(sp_loss(s, t)), rel=1e-10)
    # Hinton KD is not scale invariant: the scale is the softmax's temperature.
    assert float(hinton_kd_loss(2.0 * s, t)) != pytest.approx(float(hinton_kd_loss(s, t)), rel=1e-3)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck(name):
    s = codes(6, 5, 11).requires_grad_()
    t = codes(6, 5, 12)
    assert torch.autograd.gradcheck(lambda x: LOSSES[name](x, t), (s,))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_equal_codes_give_finite_gradients(name):
    """±1 codes of a batch often coincide: zero distances and differences must not make NaN gradients."""
    s = codes(8, 6, 13, signs=True)
    s[2] = s[5] = s[0]
    s.requires_grad_()
    t = codes(8, 6, 14, signs=True)
    t[1] = t[4]
    LOSSES[name](s, t).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_nan_in_codes_gives_nan(name):
    s, t = codes(6, 5, 15), codes(6, 5, 16)
    s[2, 1] = math.nan
    assert math.isnan(float(LOSSES[name](s, t)))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bad_input_names_the_argument(name):
    fn = LOSSES[name]
    s, t = codes(6, 5, 17), codes(6, 5, 18)
    with pytest.raises(ValueError, match="student must be a 2-D"):
        fn(s[0], t)
    with pytest.raises(TypeError, match="teacher must be a floating-point"):
        fn(s, t.long())
    with pytest.raises(ValueError, match="teacher has 5 rows but student has 6"):
        fn(s, t[:5])
    with pytest.raises(TypeError, match="student must be a torch.Tensor"):
        fn(s.tolist(), t)


def test_bad_input_of_single_losses():
    s, t = codes(6, 5, 19), codes(6, 5, 20)
    for fn in (rkd_loss, pkt_loss, sp_loss):
        with pytest.raises(ValueError, match="student must have at least 2 rows"):
            fn(s[:1], t[:1])
        assert torch.isfinite(fn(s, codes(6, 9, 21)))  # relations compare samples: the widths may differ
    with pytest.raises(ValueError, match="teacher has 9 bits but student has 5"):
        hinton_kd_loss(s, codes(6, 9, 21))
    assert torch.isfinite(hinton_kd_loss(s[:1], t[:1]))
    for bad in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            hinton_kd_loss(s, t, temperature=bad)


def objective_inputs(seed: int, B: int, K: int, grad: bool = False):
    """A student's bit probabilities and codes of two views and the teacher's view-1 codes (float64), and the
    generator for whatever else a test draws: (p1, c1, p2, c2, t1, generator)."""
    g = torch.Generator().manual_seed(seed)
    p1, p2 = (torch.rand(B, K, generator=g, dtype=torch.float64).requires_grad_(grad) for _ in range(2))
    t1 = torch.randn(B, K, generator=g, dtype=torch.float64).sign().requires_grad_(grad)
    return p1, p1 * 2 - 1, p2, p2 * 2 - 1, t1, g


def cibhash_reference(p1, c1, p2, c2):
    """The student's own objective in every baseline: CIBHash at the objectives' defaults, from the references."""
    return ref.ntxent_loss(c1, c2, temperature=0.3) + 0.001 * symmetric_bernoulli_kl(p1, p2)


@pytest.mark.parametrize("name", ["rkd", "pkt", "sp", "hinton"])
def test_baseline_objectives_are_cibhash_plus_weighted_kd(name):
    p1, c1, p2, c2, t1, _ = objective_inputs(22, 16, 32, grad=True)
    objective = make_objective(name, temperature=0.3, kl_weight=0.001, kd_weight=2.0)
    got = objective(p1, c1, p2, c2, t1)
    want = cibhash_reference(p1, c1, p2, c2) + 2.0 * LOSSES[name](c1, t1)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    got.backward()
    assert p1.grad is not None and t1.grad is None  # the teacher's codes are a target
    assert name in DISTILLATION_OBJECTIVES and not objective.needs_clusters
    assert LABELS[name] and make_objective("brcd").needs_clusters


def test_module_exports_what_it_documents():
    assert set(kd_losses.__all__) == {"rkd_loss", "pkt_loss", "sp_loss", "hinton_kd_loss", "sskd_loss", "CRDLoss",
                                      "CRCDLoss", "PACKDLoss"}


# --- SSKD -------------------------------------------------------------------------------------------------------

def sskd_by_hand(sv, tv, temperature=0.5):
    def distributions(views):
        views = views.double().tolist()
        unit = [[[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in view] for view in views]
        out = []
        for view in unit[1:]:
            for r in view:
                logits = [sum(a * b for a, b in zip(r, o)) / temperature for o in unit[0]]
                z = sum(math.exp(x) for x in logits)
                out.append([math.exp(x) / z for x in logits])
        return out

    q, p = distributions(sv), distributions(tv)
    kl = sum(pi * math.log(pi / qi) for prow, qrow in zip(p, q) for pi, qi in zip(prow, qrow))
    return kl / len(p) * temperature ** 2


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape", [(2, 1, 3), (4, 5, 7), (3, 6, 16)])
def test_sskd_matches_formula_written_out(device, shape):
    g = torch.Generator().manual_seed(31)
    sv, tv = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2))
    got = kd_losses.sskd_loss(sv.to(device), tv.to(device))
    assert got.device.type == device and float(got) == pytest.approx(sskd_by_hand(sv, tv), rel=1e-10)
    assert float(kd_losses.sskd_loss(sv, tv, temperature=2.0)) == pytest.approx(sskd_by_hand(sv, tv, 2.0), rel=1e-10)


def test_sskd_zero_invariance_gradients_and_nan():
    g = torch.Generator().manual_seed(32)
    sv, tv = (torch.randn(4, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    assert float(kd_losses.sskd_loss(tv.clone(), tv)) == pytest.approx(0.0, abs=1e-12)
    scale = torch.rand(4, 6, 1, generator=g, dtype=torch.float64) + 0.5  # cosines: each code's scale is free
    assert float(kd_losses.sskd_loss(scale * sv, tv)) == pytest.approx(float(kd_losses.sskd_loss(sv, tv)), rel=1e-10)
    assert torch.autograd.gradcheck(lambda x: kd_losses.sskd_loss(x, tv), (sv.clone().requires_grad_(),))
    sv[2, 1, 3] = math.nan
    assert math.isnan(float(kd_losses.sskd_loss(sv, tv)))


def test_sskd_bad_input_names_the_argument():
    sv, tv = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    with pytest.raises(ValueError, match=r"student_views must be a 3-D tensor \[views >= 2"):
        kd_losses.sskd_loss(sv[0], tv)
    with pytest.raises(ValueError, match=r"teacher_views must be a 3-D tensor \[views >= 2"):
        kd_losses.sskd_loss(sv, tv[:1])
    with pytest.raises(ValueError, match="teacher_views has"):
        kd_losses.sskd_loss(sv, tv[:3])
    with pytest.raises(TypeError, match="teacher_views must be a floating-point"):
        kd_losses.sskd_loss(sv, tv.long())
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        kd_losses.sskd_loss(sv, tv, temperature=0)


def test_sskd_objective_takes_the_rotated_codes():
    B, K = 5, 16
    p1, c1, p2, c2, t1, g = objective_inputs(33, B, K)
    s_rot, t_rot = (torch.randn(3 * B, K, generator=g, dtype=torch.float64) for _ in range(2))
    objective = make_objective("sskd", kd_weight=2.0)
    got = objective(p1, c1, p2, c2, t1, rotated=(s_rot, t_rot))
    views = lambda first, rest: torch.stack([first, *rest.split(B)])
    want = cibhash_reference(p1, c1, p2, c2) + 2.0 * kd_losses.sskd_loss(views(c1, s_rot), views(t1, t_rot))
    assert float(got) == pytest.approx(float(want), rel=1e-10)
    assert LABELS["sskd"] == "SSKD" and "sskd" in DISTILLATION_OBJECTIVES
    with pytest.raises(ValueError, match="rotated"):
        objective(p1, c1, p2, c2, t1)

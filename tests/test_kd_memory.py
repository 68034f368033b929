"""The memory-bank distillation baselines (brcd.kd_memory: CRD, CRCD, PACKD) against their formulas written out
element by element, their memory updates, gradients, resume state, bad input and objectives."""
import copy
import math

import pytest
import torch

from brcd import kd_losses
from brcd.objectives import DATASET_OBJECTIVES, LABELS, make_objective
from conftest import device_params
from test_kd_losses import cibhash_reference, codes, objective_inputs, rows


def dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def unit(v):
    norm = math.sqrt(dot(v, v))
    return [x / norm for x in v]


def affine(linear, v):
    """A torch Linear applied by hand."""
    w, b = linear.weight.double().tolist(), linear.bias.double().tolist()
    return [dot(wr, v) + bi for wr, bi in zip(w, b)]


def embed(linear, x):
    return [unit(affine(linear, row)) for row in rows(x)]


@pytest.fixture
def drawn(monkeypatch):
    """The negatives each call draws, as lists (torch.randint wrapped)."""
    seen, randint = [], torch.randint

    def recording(*args, **kwargs):
        out = randint(*args, **kwargs)
        seen.append(out.tolist())
        return out

    monkeypatch.setattr(torch, "randint", recording)
    return seen


# --- CRD --------------------------------------------------------------------------------------------------------

def crd_by_hand(module, s, t, index, draws):
    """One CRD loss, element by element, from the module's heads, memory and normalisers as they are before the call
    (NaN normalisers: estimated from this batch, as the first call does)."""
    n, m, tau = module.dataset_size, module.negatives, module.temperature
    total = 0.0
    for direction, (linear, x, memory) in enumerate(((module.embed_student, s, module.memory_teacher),
                                                     (module.embed_teacher, t, module.memory_student))):
        emb, mem = embed(linear, x), memory.double().tolist()
        scores = [[math.exp(sum(a * b for a, b in zip(emb[i], mem[j])) / tau) for j in [int(index[i])] + draws[i]]
                  for i in range(len(emb))]
        z = float(module.normalisers[direction])
        if math.isnan(z):
            z = sum(map(sum, scores)) / (len(scores) * (m + 1)) * n
        noise = m / n
        for row in scores:
            x0 = row[0] / z
            total -= math.log(x0 / (x0 + noise + 1e-7)) / len(scores)
            total -= sum(math.log(noise / (v / z + noise + 1e-7)) for v in row[1:]) / len(scores)
    return total


def crd_case(seed=0, n=40, bits=12, batch=6, negatives=9, device="cpu"):
    torch.manual_seed(seed)
    module = kd_losses.CRDLoss(bits, bits, n, feat_dim=8, negatives=negatives).double().to(device)
    s, t = (codes(batch, bits, seed + k, signs=True, device=device) for k in (1, 2))
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch]
    return module, s, t, index


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("index_on_device", [False, True], ids=["cpu_index", "device_index"])
def test_crd_matches_formula_written_out_and_fixes_its_normalisers(drawn, device, index_on_device):
    module, s, t, index = crd_case(device=device)
    if index_on_device:
        index = index.to(device)
    for call in range(3):  # the first call estimates Z; later ones keep it and see the updated memory
        before = copy.deepcopy(module).cpu()
        got = module(s, t, index)
        want = crd_by_hand(before, s.cpu(), t.cpu(), index.cpu(), drawn[-1])
        assert got.device.type == device and float(got.detach()) == pytest.approx(want, rel=1e-10)
        assert torch.isfinite(module.normalisers).all() and module.memory_student.device.type == device
        if call:
            assert torch.equal(module.normalisers.cpu(), before.normalisers)


def test_crd_updates_the_memory_of_the_batch_only():
    module, s, t, index = crd_case(seed=3)
    before = copy.deepcopy(module)
    module(s, t, index)
    others = torch.ones(40, dtype=torch.bool)
    others[index] = False
    for name, linear, x in (("memory_student", module.embed_student, s), ("memory_teacher", module.embed_teacher, t)):
        old, new = getattr(before, name), getattr(module, name)
        assert torch.equal(old[others], new[others])
        embedding = torch.nn.functional.normalize(linear(x), dim=1)
        want = torch.nn.functional.normalize(0.5 * old[index] + 0.5 * embedding, dim=1)
        torch.testing.assert_close(new[index], want, rtol=1e-12, atol=1e-12)


def check_gradients(module, s, t, index, parameters):
    """gradcheck of the loss in both code tensors (each call from the same draws and the same state), a finite
    non-zero gradient for the student, and a non-zero gradient for each of the module's parameter tensors, of which
    there must be `parameters`."""
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_()

    def loss_of(x, y):
        torch.manual_seed(7)
        return copy.deepcopy(module)(x, y, index)

    assert torch.autograd.gradcheck(loss_of, (s, t))
    trained = copy.deepcopy(module)
    torch.manual_seed(7)
    trained(s, t.detach(), index).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())
    assert len(list(trained.parameters())) == parameters


def test_crd_gradients_and_gradcheck():
    module, s, t, index = crd_case(seed=4)
    module(s, t, index)  # the normalisers are fixed from here on
    check_gradients(module, s, t, index, parameters=4)  # both heads train


def test_crd_bad_input_names_the_argument():
    module, s, t, index = crd_case(seed=6)
    with pytest.raises(ValueError, match="index must be an int64 tensor"):
        module(s, t, index.int())
    with pytest.raises(ValueError, match="index must be an int64 tensor"):
        module(s, t, index[:3])
    with pytest.raises(ValueError, match=r"index must lie in \[0, dataset_size\) = \[0, 40\)"):
        module(s, t, torch.tensor([0, 1, 2, 3, 4, 40]))
    with pytest.raises(ValueError, match="student has 11 bits but this loss was built for 12"):
        module(s[:, :11], t, index)
    with pytest.raises(ValueError, match="teacher has 6 rows but student has 5"):
        module(s[:5], t, index[:5])
    for kwargs, name in (({"negatives": 0}, "negatives"), ({"feat_dim": 1.5}, "feat_dim"),
                         ({"temperature": 0.0}, "temperature"), ({"momentum": 1.0}, "momentum")):
        with pytest.raises(ValueError, match=name):
            kd_losses.CRDLoss(12, 12, 40, **kwargs)
    with pytest.raises(ValueError, match="dataset_size must be a positive integer"):
        kd_losses.CRDLoss(12, 12, 0)
    assert torch.isnan(module.normalisers).all()  # nothing above changed the loss's state


def test_crd_objective_takes_the_index():
    B, K = 8, 16
    p1, c1, p2, c2, t1, _ = objective_inputs(23, B, K)
    index = torch.arange(B)
    torch.manual_seed(0)
    objective = make_objective("crd", kd_weight=0.5, dataset_size=30, bits=K, negatives=7).double()
    crd = copy.deepcopy(objective.kd_loss)
    torch.manual_seed(1)
    got = objective(p1, c1, p2, c2, t1, index=index)
    torch.manual_seed(1)
    want = cibhash_reference(p1, c1, p2, c2) + 0.5 * crd(c1, t1, index)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    assert len(list(objective.parameters())) == 4 and "kd_loss.memory_student" in objective.state_dict()
    with pytest.raises(ValueError, match="index"):
        objective(p1, c1, p2, c2, t1)




# --- CRCD -------------------------------------------------------------------------------------------------------

def crcd_by_hand(module, s, t, index, draws):
    """One CRCD loss, element by element, from the module's layers and memory as they are before the call."""
    se, te = embed(module.embed_student, s), embed(module.embed_teacher, t)
    anchors = te[: module.anchors] if module.anchors else te
    memory = module.memory_teacher.double().tolist()

    def relation(mod, x, a):
        return affine(mod.out, [max(p - q, 0.0) for p, q in zip(affine(mod.sample, x), affine(mod.anchor, a))])

    def critic(mod, r):
        return unit(affine(mod.linear, r))

    n, m, tau = module.dataset_size, module.negatives, module.temperature
    noise = m / n
    total, pairs = 0.0, len(se) * len(anchors)
    for i, image in enumerate(index.tolist()):
        for a in anchors:
            f = critic(module.critic_student, relation(module.relation_student, se[i], a))
            score = lambda y: math.exp((dot(f, critic(module.critic_teacher, relation(module.relation_teacher, y,
                                                                                      a))) - 1) / tau)
            x0 = score(memory[image])
            total -= math.log(x0 / (x0 + noise + 1e-7)) / pairs
            total -= sum(math.log(noise / (score(memory[k]) + noise + 1e-7)) for k in draws) / pairs
    return total


def crcd_case(seed=0, n=30, bits=10, batch=5, negatives=7, anchors=None, device="cpu"):
    torch.manual_seed(seed)
    module = kd_losses.CRCDLoss(bits, bits + 2, n, feat_dim=6, negatives=negatives, anchors=anchors)
    module = module.double().to(device)
    s, t = codes(batch, bits, seed + 1, device=device), codes(batch, bits + 2, seed + 2, signs=True, device=device)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch]
    return module, s, t, index


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("anchors", [None, 3, 9], ids=["all", "three", "more_than_the_batch"])
def test_crcd_matches_formula_written_out(drawn, device, anchors):
    module, s, t, index = crcd_case(anchors=anchors, device=device)
    for _ in range(2):  # the second call sees the memory the first one wrote
        before = copy.deepcopy(module).cpu()
        got = module(s, t, index)
        want = crcd_by_hand(before, s.cpu(), t.cpu(), index, drawn[-1])
        assert got.device.type == device and float(got.detach()) == pytest.approx(want, rel=1e-10)
        assert len(drawn[-1]) == module.negatives  # one draw shared by the batch


def test_crcd_updates_the_teacher_memory_of_the_batch_only():
    module, s, t, index = crcd_case(seed=3)
    before = module.memory_teacher.clone()
    module(s, t, index)
    others = torch.ones(30, dtype=torch.bool)
    others[index] = False
    assert torch.equal(before[others], module.memory_teacher[others])
    embedding = torch.nn.functional.normalize(module.embed_teacher(t), dim=1)
    want = torch.nn.functional.normalize(0.5 * before[index] + 0.5 * embedding, dim=1)
    torch.testing.assert_close(module.memory_teacher[index], want, rtol=1e-12, atol=1e-12)


def test_crcd_gradients_and_gradcheck():
    module, s, t, index = crcd_case(seed=4, batch=4, negatives=3)
    # the heads, both relation modules and both critics all learn
    check_gradients(module, s, t, index, parameters=4 + 2 * 6 + 2 * 2)


def test_crcd_bad_input_names_the_argument():
    module, s, t, index = crcd_case(seed=6)
    memory = module.memory_teacher.clone()
    with pytest.raises(ValueError, match="index must be an int64 tensor"):
        module(s, t, index[:2])
    with pytest.raises(ValueError, match=r"index must lie in \[0, dataset_size\) = \[0, 30\)"):
        module(s, t, torch.tensor([0, 1, 2, 3, -1]))
    with pytest.raises(ValueError, match="teacher has 10 bits but this loss was built for 12"):
        module(s, s, index)
    with pytest.raises(TypeError, match="student must be a floating-point tensor"):
        module(s.long(), t, index)
    for kwargs, name in (({"anchors": 0}, "anchors"), ({"negatives": -1}, "negatives"),
                         ({"temperature": math.inf}, "temperature"), ({"momentum": -0.1}, "momentum")):
        with pytest.raises(ValueError, match=name):
            kd_losses.CRCDLoss(10, 12, 30, **kwargs)
    assert torch.equal(memory, module.memory_teacher)  # nothing above changed the loss's state


# --- PACKD ------------------------------------------------------------------------------------------------------

def transport_plan_by_hand(s_views, t_views, eps, rounds=3000):
    """The entropic plan with marginals 1 / V by plain Sinkhorn scaling (not in the log domain), run to its fixed
    point: diag(u) K diag(v), K = exp(-|s_v - t_w|^2 / eps)."""
    views = len(s_views)
    kernel = [[math.exp(-sum((p - q) ** 2 for p, q in zip(a, b)) / eps) for b in t_views] for a in s_views]
    u, v = [1.0] * views, [1.0] * views
    for _ in range(rounds):
        u = [1 / views / sum(kernel[a][b] * v[b] for b in range(views)) for a in range(views)]
        v = [1 / views / sum(kernel[a][b] * u[a] for a in range(views)) for b in range(views)]
    return [[u[a] * kernel[a][b] * v[b] for b in range(views)] for a in range(views)]


def packd_by_hand(module, s, t, index, draws):
    """One PACKD loss, element by element, from the module's heads, memory and written rows before the call; s and t
    [B, V, K]."""
    se = [embed(module.embed_student, views) for views in s]
    te = [embed(module.embed_teacher, views) if module.embed_teacher is not None else [unit(r) for r in rows(views)]
          for views in t]
    memory = module.memory_teacher.double().tolist()
    for i, image in enumerate(index.tolist()):  # the memory takes the batch's teacher view 0 first
        if module.written[image]:
            memory[image] = unit([module.momentum * a + (1 - module.momentum) * b
                                  for a, b in zip(memory[image], te[i][0])])
        else:
            memory[image] = list(te[i][0])
    tau, total = module.temperature, 0.0
    for i in range(len(se)):
        views = len(se[i])
        plan = transport_plan_by_hand(se[i], te[i], module.sinkhorn_epsilon) if views > 1 else [[1.0]]
        p = sum(plan[a][b] * dot(se[i][a], te[i][b]) for a in range(views) for b in range(views))
        negatives = [dot(sv, memory[r]) for sv in se[i] for r in draws[i]]
        total -= (p / tau - math.log(math.exp(p / tau) + sum(math.exp(x / tau) for x in negatives))) / len(se)
    return total


def packd_case(seed=0, n=30, bits=10, teacher_bits=12, batch=5, views=None, negatives=7, feat_dim=6,
               device="cpu", **kwargs):
    torch.manual_seed(seed)
    module = kd_losses.PACKDLoss(bits, teacher_bits, n, feat_dim=feat_dim, negatives=negatives, **kwargs)
    module = module.double().to(device)
    shape = (batch,) if views is None else (batch, views)
    g = torch.Generator().manual_seed(seed + 1)
    s = torch.randn(*shape, bits, generator=g, dtype=torch.float64).to(device)
    t = torch.randn(*shape, teacher_bits, generator=g, dtype=torch.float64).sign().to(device)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch]
    return module, s, t, index


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("views", [None, 1, 3], ids=["codes", "one_view", "three_views"])
@pytest.mark.parametrize("feat_dim", [6, 40], ids=["teacher_head", "teacher_normalised"])
def test_packd_matches_formula_written_out(drawn, device, views, feat_dim):
    # A tolerance far below rounding: the module's plan is the fixed point, as the one written out. (At the default
    # regularisation 0.1 both iterations creep towards it for 10^5 rounds on some samples: regularisation 1 here.)
    module, s, t, index = packd_case(views=views, feat_dim=feat_dim, device=device, sinkhorn_epsilon=1.0,
                                     sinkhorn_iterations=3000, sinkhorn_tolerance=1e-300)
    assert (module.embed_teacher is None) == (feat_dim >= 12)
    s3, t3 = (x.cpu() if views else x.cpu()[:, None] for x in (s, t))
    for _ in range(2):  # the first call replaces the batch's memory rows, the second blends them
        before = copy.deepcopy(module).cpu()
        got = module(s, t, index)
        want = packd_by_hand(before, s3, t3, index, drawn[-1])
        assert got.device.type == device and float(got.detach()) == pytest.approx(want, rel=1e-9)


def test_packd_transport_plan_has_the_marginals_and_stops_early():
    module, s, t, _ = packd_case(seed=2, views=4)
    s, t = (torch.nn.functional.normalize(x, dim=2) for x in (s[..., :10], s[..., :10] + 0.3 * t[..., :10]))
    plan = module._transport_plan(s, t)
    assert plan.shape == (5, 4, 4) and (plan > 0).all()
    # the last half-step fits the columns exactly, the rows to the stopping tolerance
    torch.testing.assert_close(plan.sum(dim=1), torch.full((5, 4), 0.25, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (plan.sum(dim=2) - 0.25).abs().max() < 0.1
    module.sinkhorn_tolerance = 1e-300
    converged = module._transport_plan(s, t)
    assert (converged.sum(dim=2) - 0.25).abs().max() < (plan.sum(dim=2) - 0.25).abs().max()
    # equal views cost the same everywhere: the plan spreads evenly
    same = module._transport_plan(s[:, :1].expand(-1, 4, -1), t[:, :1].expand(-1, 4, -1))
    torch.testing.assert_close(same, torch.full((5, 4, 4), 1 / 16, dtype=torch.float64), rtol=1e-12, atol=0)


def test_packd_memory_takes_the_teacher_view_zero_replacing_then_blending():
    module, s, t, index = packd_case(seed=3, views=2, feat_dim=40)
    before = module.memory_teacher.clone()
    others = torch.ones(30, dtype=torch.bool)
    others[index] = False
    view0 = torch.nn.functional.normalize(t[:, 0], dim=1)
    module(s, t, index)
    assert torch.equal(module.written, ~others) and torch.equal(module.memory_teacher[others], before[others])
    torch.testing.assert_close(module.memory_teacher[index], view0, rtol=1e-12, atol=1e-12)
    t2 = -t
    module(s, t2, index)
    want = torch.nn.functional.normalize(0.5 * view0 + 0.5 * torch.nn.functional.normalize(t2[:, 0], dim=1), dim=1)
    torch.testing.assert_close(module.memory_teacher[index], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("views", [None, 3])
@pytest.mark.parametrize("feat_dim", [6, 40], ids=["teacher_head", "teacher_normalised"])
def test_packd_gradients_and_gradcheck(views, feat_dim):
    module, s, t, index = packd_case(seed=4, views=views, feat_dim=feat_dim, batch=3, negatives=4)
    if views:  # the plan is a constant of the loss (no gradient flows through it): held at its value here
        plans, plan_of = [], module._transport_plan

        def held(a, b):
            if not plans:
                plans.append(plan_of(a, b))
            return plans[0]

        module._transport_plan = held
    check_gradients(module, s, t, index, parameters=4 if feat_dim < 12 else 2)  # a teacher head only below its bits


def test_packd_bad_input_names_the_argument():
    module, s, t, index = packd_case(seed=6, views=2)
    memory = module.memory_teacher.clone()
    with pytest.raises(ValueError, match=r"teacher has batch x views \(5, 1\) but student has \(5, 2\)"):
        module(s, t[:, :1], index)
    with pytest.raises(ValueError, match=r"teacher has batch x views \(5,\) but student has \(5, 2\)"):
        module(s, t[:, 0], index)
    with pytest.raises(ValueError, match=r"student must be a tensor \[batch, bits\] or \[batch, views, bits\]"):
        module(s[None], t[None], index)
    with pytest.raises(ValueError, match="student has 12 bits but this loss was built for 10"):
        module(t, t, index)
    with pytest.raises(ValueError, match="index must be an int64 tensor"):
        module(s, t, index.float())
    with pytest.raises(TypeError, match="teacher must be a floating-point tensor"):
        module(s, t.int(), index)
    for kwargs, name in (({"sinkhorn_epsilon": 0}, "sinkhorn_epsilon"), ({"sinkhorn_iterations": 0},
                                                                          "sinkhorn_iterations"),
                         ({"sinkhorn_tolerance": -1.0}, "sinkhorn_tolerance"), ({"momentum": 1}, "momentum"),
                         ({"feat_dim": 0}, "feat_dim"), ({"temperature": "0.07"}, "temperature")):
        with pytest.raises(ValueError, match=name):
            kd_losses.PACKDLoss(10, 12, 30, **kwargs)
    assert torch.equal(memory, module.memory_teacher) and not module.written.any()


def test_packd_nan_in_the_codes_gives_nan():
    module, s, t, index = packd_case(seed=7, views=3)
    s[1, 2, 0] = math.nan
    assert math.isnan(float(module(s, t, index).detach()))


# --- all three ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_case, rebuild", [
    (lambda: crd_case(seed=5), lambda: kd_losses.CRDLoss(12, 12, 40, feat_dim=8, negatives=9)),
    (lambda: crcd_case(seed=5), lambda: kd_losses.CRCDLoss(10, 12, 30, feat_dim=6, negatives=7)),
    (lambda: packd_case(seed=5, views=2), lambda: kd_losses.PACKDLoss(10, 12, 30, feat_dim=6, negatives=7)),
], ids=["crd", "crcd", "packd"])
def test_state_dict_resumes_the_same_loss(make_case, rebuild):
    module, s, t, index = make_case()
    module(s, t, index)  # memory written (and PACKD's rows marked), CRD's normalisers set
    restored = rebuild().double()
    restored.load_state_dict(module.state_dict())
    assert all(torch.equal(value, restored.state_dict()[key]) for key, value in module.state_dict().items())
    torch.manual_seed(8)
    a = module(s, t, index)
    torch.manual_seed(8)
    assert float(restored(s, t, index).detach()) == float(a.detach())


# --- the objectives ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, extra", [("crcd", {"feat_dim": 8}), ("packd", {"feat_dim": 8})])
def test_memory_objectives_are_cibhash_plus_weighted_kd_with_the_index(name, extra):
    B, K = 8, 16
    p1, c1, p2, c2, t1, _ = objective_inputs(24, B, K)
    index = torch.arange(B)
    torch.manual_seed(0)
    objective = make_objective(name, kd_weight=0.5, dataset_size=30, bits=K, negatives=7, **extra).double()
    loss = copy.deepcopy(objective.kd_loss)
    torch.manual_seed(1)
    got = objective(p1, c1, p2, c2, t1, index=index)
    torch.manual_seed(1)
    want = cibhash_reference(p1, c1, p2, c2) + 0.5 * loss(c1, t1, index)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
    assert name in DATASET_OBJECTIVES and LABELS[name] == name.upper()
    with pytest.raises(ValueError, match="index"):
        objective(p1, c1, p2, c2, t1)

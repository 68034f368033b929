"""The fused BRCD / NT-Xent loss against the original implementation's vectors and the package's reference."""
import math

import pytest
import torch

import brcd
from brcd import reference as ref
from conftest import device_params


def make_case(B, K, seed, *, mask="random", groups="random", alpha="vector", dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, K, generator=g, dtype=torch.float64)
    ta = torch.randn(B, K, generator=g, dtype=torch.float64)
    tv = torch.randn(B, K, generator=g, dtype=torch.float64)
    kw = {"temperature": 0.3}
    if alpha == "vector":
        kw["alpha"] = (torch.rand(B, generator=g, dtype=torch.float64) < 0.5).double() * 0.7 + 0.3 * torch.rand(
            B, generator=g, dtype=torch.float64)
    else:
        kw["alpha"] = float(alpha)
    if mask == "random":
        m = (torch.rand(B, K, generator=g) < 0.7).double()
        m[0] = 0  # a sample whose mask is all zeros
        kw["bit_mask"] = m
    elif mask == "real":
        kw["bit_mask"] = torch.rand(B, K, generator=g, dtype=torch.float64)
    if groups == "random":
        clusters = torch.randint(-1, 4, (B,), generator=g)
        kw["row_groups"] = torch.cat([clusters, clusters])
        kw["col_groups"] = torch.cat([clusters, torch.randint(-1, 4, (B,), generator=g)])
    elif groups == "all":  # every negative of every row dropped
        kw["row_groups"] = torch.zeros(2 * B, dtype=torch.long)
        kw["col_groups"] = torch.zeros(2 * B, dtype=torch.long)
    conv = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    kw = {k: conv(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return conv(s), conv(ta), conv(tv), kw


def loss_and_grads(fn, s, ta, tv, kw):
    s, ta, tv = (t.detach().clone().requires_grad_() for t in (s, ta, tv))
    loss = fn(s, ta, tv, **kw)
    grads = torch.autograd.grad(loss, (s, ta, tv))
    return loss.detach(), grads


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("device", device_params())
def test_reference_vectors(reference_cases, device):
    cases = [c for c in reference_cases if c["kind"] in ("brcd", "ntxent")]
    assert len(cases) >= 3
    for c in cases:
        dev = lambda t: None if t is None else t.to(device)
        leaf = lambda t: t.detach().clone().to(device).requires_grad_()  # never touch the shared fixture
        if c["kind"] == "brcd":
            s = leaf(c["student"])
            tv = leaf(c["teacher_view"])
            loss = brcd.brcd_loss(s, c["teacher_anchor"].to(device), tv, temperature=float(c["temperature"]),
                                  alpha=c["alpha"].to(device), bit_mask=dev(c["bit_mask"]),
                                  row_groups=dev(c["row_groups"]), col_groups=dev(c["col_groups"]))
            loss.backward()
            expected = [(s.grad, c["grad_student"]), (tv.grad, c["grad_teacher_view"])]
        else:
            a = leaf(c["view_a"])
            b = leaf(c["view_b"])
            loss = brcd.ntxent_loss(a, b, temperature=float(c["temperature"]))
            loss.backward()
            expected = [(a.grad, c["grad_a"]), (b.grad, c["grad_b"])]
        assert abs(loss.item() - c["loss"].item()) <= 1e-10 * max(1.0, abs(c["loss"].item()))
        for got, want in expected:
            assert float((got.cpu() - want).abs().max()) <= 1e-10 * max(1.0, float(want.abs().max()))


FUZZ = [(B, K) for B in (1, 2, 3, 64, 1000) for K in (1, 8, 63, 64, 256)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("B,K", FUZZ)
def test_fuzz_against_reference(device, B, K):
    seed = 17 * B + K
    variants = [("random", "random", "vector"), (None, None, 0.8), ("real", "random", 0.0), ("random", "all", 1.0)]
    mask, groups, alpha = variants[seed % len(variants)]
    s, ta, tv, kw = make_case(B, K, seed, mask=mask, groups=groups, alpha=alpha, device=device)
    want_loss, want_grads = loss_and_grads(ref.brcd_loss, s.cpu(), ta.cpu(), tv.cpu(),
                                           {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    got_loss, got_grads = loss_and_grads(brcd.brcd_loss, s, ta, tv, kw)
    assert torch.allclose(got_loss.cpu(), want_loss, rtol=1e-10, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g.cpu(), w, rtol=1e-9, atol=1e-12)
    # float32 kernels stay within 1e-5 relative of float64.
    s32, ta32, tv32 = (t.float() for t in (s, ta, tv))
    kw32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    l32, g32 = loss_and_grads(brcd.brcd_loss, s32, ta32, tv32, kw32)
    assert l32.dtype == torch.float32
    assert abs(l32.item() - want_loss.item()) <= 1e-5 * max(abs(want_loss.item()), 1e-3)
    for g, w in zip(g32, want_grads):
        if w.norm() > 1e-12:
            assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 3, 64, 300])
def test_gradients_of_some_inputs_only(device, dtype, B):
    """Distillation differentiates the student alone: the backward skips the products that feed only the teacher's
    gradients, and what it returns must equal the full backward's (same sums, same order: exactly)."""
    s, ta, tv, kw = make_case(B, 64, seed=B, dtype=dtype, device=device)
    full = [x.detach().requires_grad_() for x in (s, ta, tv)]
    brcd.brcd_loss(*full, **kw).backward()
    for wanted in ([0], [1], [2], [0, 2], [1, 2]):
        xs = [x.detach().requires_grad_(i in wanted) for i, x in enumerate((s, ta, tv))]
        brcd.brcd_loss(*xs, **kw).backward()
        for i in range(3):
            if i in wanted:
                assert torch.equal(xs[i].grad, full[i].grad), (wanted, i)
            else:
                assert xs[i].grad is None


def test_backward_op_returns_zeros_for_gradients_not_asked_for():
    s, ta, tv, kw = make_case(5, 8, seed=0)
    args = (s, ta, tv, 0.3, kw["alpha"], kw["bit_mask"], kw["row_groups"], kw["col_groups"])
    _, stats = torch.ops.brcd.contrastive_forward(*args)
    one = torch.ones((), dtype=s.dtype)
    every = torch.ops.brcd.contrastive_backward(one, *args, stats)
    some = torch.ops.brcd.contrastive_backward(one, *args, stats, [True, False, False])
    assert torch.equal(some[0], every[0])
    assert not some[1].any() and not some[2].any() and every[1].any() and every[2].any()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_form_of_a_shared_alpha_gives_the_same_loss(device, dtype):
    """A float, a CPU scalar (with codes on any device), a scalar on the codes' device and a [B] vector of one value
    are the same alpha."""
    s, ta, tv, kw = make_case(40, 16, seed=5, alpha=0.6, dtype=dtype, device=device)
    want, want_g = loss_and_grads(brcd.brcd_loss, s, ta, tv, kw)
    vector = torch.full((40,), 0.6, dtype=dtype, device=device)
    for alpha in (torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.6, dtype=dtype, device=device), vector):
        got, got_g = loss_and_grads(brcd.brcd_loss, s, ta, tv, dict(kw, alpha=alpha))
        assert torch.allclose(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0), alpha
        for g, w in zip(got_g, want_g):
            assert torch.allclose(g, w, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7), alpha
    with pytest.raises(ValueError, match="alpha must lie in"):
        brcd.brcd_loss(s, ta, tv, **dict(kw, alpha=torch.tensor(-0.5, dtype=torch.float64)))


@pytest.mark.parametrize("device", device_params())
def test_alpha_outside_the_unit_interval_names_the_first_sample(device):
    s, ta, tv, kw = make_case(6, 8, seed=1, device=device)
    alpha = kw["alpha"].clone()
    alpha[4] = 1.5
    alpha[2] = float("nan")
    with pytest.raises(ValueError, match="alpha must lie in \\[0, 1\\], got nan at index 2"):
        brcd.brcd_loss(s, ta, tv, **dict(kw, alpha=alpha))
    alpha[2] = 0.5
    with pytest.raises(ValueError, match="got 1.5 at index 4"):
        brcd.brcd_loss(s, ta, tv, **dict(kw, alpha=alpha))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_gpu_alpha_check_names_the_first_bad_value(dtype):
    """The check the wrapper runs on a GPU alpha (one reduction, one copy), here on CPU tensors: NaN and values on
    either side of [0, 1] are caught, the bounds themselves pass, the first bad index is named."""
    from brcd.ops import _check_alpha_range

    for ok in ([0.0, 1.0, 0.5], [1.0], 0.25):
        _check_alpha_range(torch.tensor(ok, dtype=dtype))
    bad = (([0.5, float("nan"), 2.0], "got nan at index 1"), ([0.5, 0.5, -0.25], "got -0.25 at index 2"),
           ([1.5, -1.0], "got 1.5 at index 0"), (float("inf"), "got inf at index 0"))
    for values, message in bad:
        with pytest.raises(ValueError, match="alpha must lie in \\[0, 1\\], " + message):
            _check_alpha_range(torch.tensor(values, dtype=dtype))


@pytest.mark.parametrize("device", device_params())
def test_check_alpha_false_drops_only_the_gpu_synchronisation(device):
    """check_alpha=False skips the one check that waits for a GPU (alpha's range) and nothing else: on the CPU the op
    still checks it; on a GPU a training step then never synchronises (torch's sync debug mode raises on one)."""
    s, ta, tv, kw = make_case(24, 16, seed=9, dtype=torch.float32, device=device)
    bad = dict(kw, alpha=torch.full((24,), 1.5, device=device))
    if device == "cpu":
        with pytest.raises(ValueError, match="alpha must lie in"):
            brcd.brcd_loss(s, ta, tv, **bad, check_alpha=False)
        return
    with pytest.raises(ValueError, match="alpha must lie in"):
        brcd.brcd_loss(s, ta, tv, **bad)
    want, want_g = loss_and_grads(brcd.brcd_loss, s, ta, tv, kw)
    student = s.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = brcd.brcd_loss(student, ta, tv, **kw, check_alpha=False)
        loss.backward()
        with pytest.raises(RuntimeError, match="synchroniz"):
            brcd.brcd_loss(student, ta, tv, **kw)  # the check reads the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(loss.detach(), want, rtol=1e-6, atol=0)
    assert torch.allclose(student.grad, want_g[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", device_params())
def test_all_negatives_dropped_gives_zero(device):
    s, ta, tv, kw = make_case(8, 16, 3, mask=None, groups="all", alpha=0.5, device=device)
    loss, grads = loss_and_grads(brcd.brcd_loss, s, ta, tv, kw)
    assert loss.item() == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads)
    # B = 1 has no negatives at all.
    s, ta, tv, kw = make_case(1, 16, 4, mask=None, groups=None, alpha=0.5, device=device)
    assert brcd.brcd_loss(s, ta, tv, **kw).item() == 0.0


@pytest.mark.parametrize("device", device_params())
def test_group_ids_of_any_size(device):
    """Group ids are labels, not indices: huge ones (past int32) and other negative "none" values give the same loss
    and gradients as small ones."""
    s, ta, tv, kw = make_case(150, 16, 12, device=device)
    want, want_g = loss_and_grads(brcd.brcd_loss, s, ta, tv, kw)
    big = dict(kw)
    for key in ("row_groups", "col_groups"):
        g = kw[key]
        big[key] = torch.where(g >= 0, g * 7 + 2**40, torch.full_like(g, -5))
    got, got_g = loss_and_grads(brcd.brcd_loss, s, ta, tv, big)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    for g, w in zip(got_g, want_g):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("device", device_params())
def test_ntxent_is_the_special_case(device):
    s, ta, tv, _ = make_case(32, 64, 5, mask=None, groups=None, device=device)
    assert torch.allclose(brcd.ntxent_loss(s, tv, temperature=0.2), ref.brcd_loss(
        s.cpu(), ta.cpu(), tv.cpu(), temperature=0.2, alpha=0.0).to(device), rtol=1e-12)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(device, dtype):
    s, ta, tv, kw = make_case(64, 64, 6, device=device)
    kw_lo = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    lo = [t.to(dtype) for t in (s, ta, tv)]
    loss, grads = loss_and_grads(brcd.brcd_loss, *lo, kw_lo)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    # Against float64 on the same rounded inputs: only the output rounding differs.
    up = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw_lo.items()}
    want = ref.brcd_loss(*(t.double().cpu() for t in lo), **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                             for k, v in up.items()})
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert abs(loss.double().item() - want.item()) <= tol * abs(want.item())


@pytest.mark.parametrize("device", device_params())
def test_non_contiguous_inputs(device):
    s, ta, tv, kw = make_case(20, 64, 7, device=device)

    def strided(t):  # a view with the same values, every other column of a wider buffer
        buf = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        buf[:, ::2] = t
        return buf[:, ::2]

    wide = [strided(t) for t in (s, ta, tv)]
    assert not wide[0].is_contiguous()
    expected = brcd.brcd_loss(s, ta, tv, **kw)
    kw["bit_mask"] = strided(kw["bit_mask"])
    assert torch.allclose(brcd.brcd_loss(*wide, **kw), expected, rtol=1e-12)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_gives_nan(device, poison):
    s, ta, tv, kw = make_case(16, 32, 8, device=device)
    for which in range(3):
        tensors = [s.clone(), ta.clone(), tv.clone()]
        tensors[which][3, 5] = poison
        if which == 1:  # the teacher anchor only enters through alpha * cos: give that sample alpha > 0
            kw = dict(kw, alpha=0.5)
        assert math.isnan(brcd.brcd_loss(*tensors, **kw).item())


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temperature_extremes_stay_finite(device, dtype):
    # Small temperatures take the running-maximum path (exp(-2/tau) is not a normal number), others a fixed shift.
    s, ta, tv, kw = make_case(64, 32, 9, mask=None, groups="random", device=device)
    for tau in (0.002, 0.01, 0.05, 5.0):
        kw_tau = dict(kw, temperature=tau)
        want, want_g = loss_and_grads(ref.brcd_loss, s.cpu(), ta.cpu(), tv.cpu(),
                                      {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw_tau.items()})
        cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in kw_tau.items()}
        got, got_g = loss_and_grads(brcd.brcd_loss, s.to(dtype), ta.to(dtype), tv.to(dtype), cast)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert torch.isfinite(got) and abs(got.item() - want.item()) <= tol * abs(want.item())
        for g, w in zip(got_g, want_g):
            if w.norm() > 1e-12:
                assert rel_err(g, w) <= (1e-9 if dtype == torch.float64 else 2e-5)


def test_gradcheck_float64():
    s, ta, tv, kw = make_case(5, 7, 10)
    inputs = tuple(t.clone().requires_grad_() for t in (s, ta, tv))
    assert torch.autograd.gradcheck(lambda a, b, c: brcd.brcd_loss(a, b, c, **kw), inputs)


@pytest.mark.parametrize("device", device_params())
def test_calls_of_changing_shapes(device):
    # The CPU kernels keep their buffers from call to call: a smaller problem after a larger one (padding rows and
    # bits past K where the larger one left data) must not see the old contents, NaN included.
    poisoned = torch.full((300, 70), float("nan"), device=device)
    assert math.isnan(brcd.brcd_loss(poisoned, poisoned, poisoned).item())
    for B, K in ((37, 63), (300, 70), (5, 17), (130, 64)):
        s, ta, tv, kw = make_case(B, K, B * K, dtype=torch.float32, device=device)
        want, want_g = loss_and_grads(ref.brcd_loss, s.double(), ta.double(), tv.double(),
                                      {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                                       for k, v in kw.items()})
        got, got_g = loss_and_grads(brcd.brcd_loss, s, ta, tv, kw)
        assert abs(got.item() - want.item()) <= 2e-5 * abs(want.item()), (B, K)
        for g, w in zip(got_g, want_g):
            assert rel_err(g, w) <= 2e-5, (B, K)


@pytest.mark.parametrize("device", device_params())
def test_second_derivative_is_refused(device):
    # create_graph=True gives the right first derivative; differentiating it again raises instead of silently
    # treating the second derivative as zero.
    s, ta, tv, kw = make_case(6, 8, 12, device=device)
    a = s.clone().requires_grad_()
    (grad,) = torch.autograd.grad(brcd.brcd_loss(a, ta, tv, **kw), a, create_graph=True)
    b = s.clone().requires_grad_()
    (want,) = torch.autograd.grad(ref.brcd_loss(b, ta, tv, **kw), b)
    assert rel_err(grad.detach(), want) <= 1e-10
    with pytest.raises(NotImplementedError, match="no second derivative"):
        grad.sum().backward()


def test_torch_compile_fullgraph():
    s, ta, tv, kw = make_case(16, 32, 11, dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, b, c, mask, rg, cg):
        return brcd.brcd_loss(a, b, c, alpha=0.8, bit_mask=mask, row_groups=rg, col_groups=cg) + 0.5 * \
            brcd.ntxent_loss(a, c)

    a = s.clone().requires_grad_()
    out = step(a, ta, tv, kw["bit_mask"], kw["row_groups"], kw["col_groups"])
    out.backward()
    b = s.clone().requires_grad_()
    eager = brcd.brcd_loss(b, ta, tv, alpha=0.8, bit_mask=kw["bit_mask"], row_groups=kw["row_groups"],
                           col_groups=kw["col_groups"]) + 0.5 * brcd.ntxent_loss(b, tv)
    eager.backward()
    assert torch.allclose(out, eager) and torch.allclose(a.grad, b.grad)


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_every_simd_path_matches_the_reference(level):
    """Each ISA build of the CPU loss (chosen once per process; BRCD_SIMD caps it), on both of its paths: the
    symmetric block-pair path (several blocks, a partial last one) and the running-maximum path (a tiny tau)."""
    import os
    import subprocess
    import sys

    script = r"""
import sys, torch, brcd
from brcd import reference as ref
sys.path.insert(0, sys.argv[1])
from test_loss import make_case, loss_and_grads, rel_err
for B, K, tau in ((150, 70, 0.3), (130, 64, 0.3), (300, 64, 0.3), (40, 33, 0.01)):  # 300: a thread team
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        s, ta, tv, kw = make_case(B, K, B + K)
        kw["temperature"] = tau
        want, want_g = loss_and_grads(ref.brcd_loss, s, ta, tv, kw)
        cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
        got, got_g = loss_and_grads(brcd.brcd_loss, s.to(dtype), ta.to(dtype), tv.to(dtype), cast)
        assert abs(got.item() - want.item()) <= tol * abs(want.item()), (B, K, dtype, got.item(), want.item())
        for g, w in zip(got_g, want_g):
            assert rel_err(g, w) <= tol, (B, K, dtype, rel_err(g, w))
print(brcd.build_info()["simd"])
"""
    env = dict(os.environ, BRCD_SIMD=level, OMP_NUM_THREADS="2")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", script, here], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    order = ["scalar", "avx2", "avx512_vpopcntdq"]
    chosen = out.stdout.strip().splitlines()[-1]
    assert order.index(chosen) <= order.index({"scalar": "scalar", "avx2": "avx2", "avx512": "avx512_vpopcntdq"}[level])

"""torch.library.opcheck for every brcd op: schema, fake kernels, autograd registration, dispatch."""
import pytest
import torch

import brcd
from conftest import device_params

ops = torch.ops.brcd


@pytest.mark.parametrize("device", device_params())
def test_opcheck_hamming(device):
    codes = torch.randn(20, 70, device=device)
    torch.library.opcheck(ops.pack_codes.default, (codes,))
    q = brcd.pack_codes(codes[:5])
    db = brcd.pack_codes(torch.randn(50, 70, device=device))
    torch.library.opcheck(ops.hamming_distance.default, (q, db))
    torch.library.opcheck(ops.hamming_topk.default, (q, db, 7))
    for radius in (0, 30, 70):
        torch.library.opcheck(ops.hamming_range_search.default, (q, db, radius))


def test_opcheck_average_precision():
    # CPU only: on a GPU, brcd.metrics ranks with hamming_topk and computes AP with torch.
    q = brcd.pack_codes(torch.randn(5, 70))
    db = brcd.pack_codes(torch.randn(50, 70))
    ids_q, ids_db = torch.randint(0, 3, (5,)), torch.randint(0, 3, (50,))
    torch.library.opcheck(ops.average_precision.default, (q, db, ids_q, ids_db, 9))
    torch.library.opcheck(ops.average_precision.default, (q, db, ids_q[:, None] == torch.arange(3),
                                                          ids_db[:, None] == torch.arange(3), 50))


def test_opcheck_distance_histograms():
    # CPU only, like average_precision: on a GPU, brcd.metrics counts with torch ops.
    q = brcd.pack_codes(torch.randn(5, 70))
    db = brcd.pack_codes(torch.randn(50, 70))
    ids_q, ids_db = torch.randint(0, 3, (5,)), torch.randint(0, 3, (50,))
    torch.library.opcheck(ops.distance_histograms.default, (q, db, ids_q, ids_db))
    torch.library.opcheck(ops.distance_histograms.default, (q, db, ids_q[:, None] == torch.arange(3),
                                                            ids_db[:, None] == torch.arange(3)))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_extras", [False, True])
@pytest.mark.parametrize("alpha_kind", ["vector", "cpu scalar"])
def test_opcheck_contrastive(device, dtype, with_extras, alpha_kind):
    B, K = 6, 16
    mk = lambda: torch.randn(B, K, device=device, dtype=dtype, requires_grad=True)
    s, ta, tv = mk(), mk(), mk()
    # A float alpha reaches the op as a float64 CPU scalar, whatever the codes' device.
    alpha = torch.rand(B, device=device, dtype=dtype) if alpha_kind == "vector" else torch.tensor(0.7, dtype=torch.float64)
    mask = (torch.rand(B, K, device=device) < 0.7).to(dtype) if with_extras else None
    groups = torch.randint(-1, 3, (2 * B,), device=device) if with_extras else None
    args = (s, ta, tv, 0.3, alpha, mask, groups, groups)
    torch.library.opcheck(ops.contrastive_forward.default, args)
    with torch.no_grad():
        loss, stats = ops.contrastive_forward(*args)
    grad = torch.ones((), device=device, dtype=dtype)
    torch.library.opcheck(ops.contrastive_backward.default,
                          (grad, s.detach(), ta.detach(), tv.detach(), 0.3, alpha, mask, groups, groups, stats))
    torch.library.opcheck(ops.contrastive_backward.default,  # the student's gradient only (distillation)
                          (grad, s.detach(), ta.detach(), tv.detach(), 0.3, alpha, mask, groups, groups, stats,
                           [True, False, False]))

"""Bad input raises a Python exception naming the argument; nothing crashes."""
import pytest
import torch

import brcd
from conftest import device_params


@pytest.mark.parametrize("device", device_params())
def test_hamming_bad_input(device):
    db = brcd.pack_codes(torch.randn(10, 64, device=device))
    q = brcd.pack_codes(torch.randn(3, 64, device=device))
    with pytest.raises(TypeError, match="query_packed"):
        brcd.hamming_topk(torch.randn(3, 8, device=device), db, 1)
    with pytest.raises(ValueError, match="bits"):
        brcd.hamming_topk(brcd.pack_codes(torch.randn(3, 72, device=device)), db, 1)
    with pytest.raises(ValueError, match="k must be"):
        brcd.hamming_topk(q, db, 0)
    with pytest.raises(ValueError, match="k must be"):
        brcd.hamming_topk(q, db, 11)
    with pytest.raises(TypeError, match="k must be an int"):
        brcd.hamming_topk(q, db, 2.5)
    with pytest.raises(ValueError, match="empty"):
        brcd.hamming_topk(q, db[:0], 1)
    with pytest.raises(ValueError, match="2-D"):
        brcd.hamming_distance(q[0], db)
    with pytest.raises(ValueError, match="codes"):
        brcd.pack_codes(torch.randn(5, device=device))
    with pytest.raises(TypeError, match="codes"):
        brcd.pack_codes([1, 2, 3])
    with pytest.raises(ValueError, match="nbits"):
        brcd.unpack_codes(db, 65)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hamming_mixed_devices():
    db = brcd.pack_codes(torch.randn(10, 64))
    q = brcd.pack_codes(torch.randn(3, 64)).cuda()
    with pytest.raises(ValueError, match="db_packed"):
        brcd.hamming_topk(q, db, 1)
    with pytest.raises(ValueError, match="db_packed"):
        brcd.hamming_range_search(q, db, 1)


@pytest.mark.parametrize("device", device_params())
def test_loss_bad_input(device):
    s, ta, tv = (torch.randn(6, 16, device=device) for _ in range(3))
    with pytest.raises(ValueError, match="teacher_view"):
        brcd.brcd_loss(s, ta, tv[:5])
    with pytest.raises(ValueError, match="teacher_anchor"):
        brcd.brcd_loss(s, ta[:, :8], tv)
    with pytest.raises(ValueError, match="temperature"):
        brcd.brcd_loss(s, ta, tv, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        brcd.brcd_loss(s, ta, tv, temperature=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        brcd.brcd_loss(s, ta, tv, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        brcd.brcd_loss(s, ta, tv, alpha=torch.full((6,), -0.1, device=device))
    with pytest.raises(ValueError, match="alpha"):
        brcd.brcd_loss(s, ta, tv, alpha=torch.rand(5, device=device))
    with pytest.raises(TypeError, match="student"):
        brcd.brcd_loss(s.int(), ta.int(), tv.int())
    with pytest.raises(TypeError, match="dtype"):
        brcd.brcd_loss(s, ta.double(), tv)
    g = torch.zeros(12, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="row_groups"):
        brcd.brcd_loss(s, ta, tv, row_groups=g[:11], col_groups=g)
    with pytest.raises(ValueError, match="together"):
        brcd.brcd_loss(s, ta, tv, row_groups=g)
    with pytest.raises(TypeError, match="col_groups"):
        brcd.brcd_loss(s, ta, tv, row_groups=g, col_groups=g.float())
    with pytest.raises(ValueError, match="bit_mask"):
        brcd.brcd_loss(s, ta, tv, bit_mask=torch.ones(6, 8, device=device))
    with pytest.raises(ValueError, match="view_b"):
        brcd.ntxent_loss(s, tv[:3])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_mixed_devices():
    s, ta, tv = (torch.randn(6, 16) for _ in range(3))
    with pytest.raises(ValueError, match="teacher_view"):
        brcd.brcd_loss(s, ta, tv.cuda())


def test_average_precision_op_bad_input():
    ap = torch.ops.brcd.average_precision
    q, db = brcd.pack_codes(torch.randn(3, 16)), brcd.pack_codes(torch.randn(10, 16))
    ql, dl = torch.zeros(3, dtype=torch.long), torch.zeros(10, dtype=torch.long)
    cases = [
        ((q, db, ql, dl, 0), ValueError, "k must be between 1"),
        ((q, db, ql, dl, 11), ValueError, "k must be between 1"),
        ((q, db, ql, dl[:9], 5), ValueError, "db_labels has 9 rows"),
        ((q, db, ql.float(), dl.float(), 5), TypeError, "query_labels: 1-D labels must be integer"),
        ((q, db, ql, torch.zeros(10, 4), 5), ValueError, "of one kind"),
        ((q, db, torch.zeros(3, 4), torch.zeros(10, 5), 5), ValueError, "of one kind"),
        ((q, brcd.pack_codes(torch.randn(10, 24)), ql, dl, 5), ValueError, "bytes per code"),
    ]
    for args, exc, needle in cases:
        with pytest.raises(exc, match=needle):
            ap(*args)

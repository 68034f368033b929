"""pack_codes, unpack_codes, hamming_distance and hamming_topk against NumPy / PyTorch references."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import brcd
from brcd import reference as ref
from conftest import device_params

ODD_BITS = [1, 7, 8, 63, 64, 65, 129, 256, 1000]


def random_codes(n, nbits, gen, dup_fraction=0.0):
    codes = torch.randn(n, nbits, generator=gen)
    if dup_fraction and n > 1:  # heavy ties: copy some rows over others
        m = int(n * dup_fraction)
        src = torch.randint(0, n, (m,), generator=gen)
        dst = torch.randint(0, n, (m,), generator=gen)
        codes[dst] = codes[src]
    return codes


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits", ODD_BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.bool, torch.float16])
def test_pack_matches_numpy_packbits(device, nbits, dtype):
    gen = torch.Generator().manual_seed(nbits)
    codes = torch.randn(37, nbits, generator=gen)
    if dtype == torch.bool:
        codes = codes > 0
    elif dtype == torch.int32:
        codes = codes.sign().to(torch.int32)
    else:
        codes = codes.to(dtype)
    packed = brcd.pack_codes(codes.to(device))
    expected = np.packbits((codes > 0).numpy(), axis=1, bitorder="little")
    assert packed.dtype == torch.uint8 and packed.device.type == device
    np.testing.assert_array_equal(packed.cpu().numpy(), expected)
    unpacked = brcd.unpack_codes(packed, nbits)
    assert torch.equal(unpacked.cpu(), (codes > 0).float() * 2 - 1)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8,
                                   torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool])
def test_pack_every_dtype_and_special_value(device, dtype):
    """Bit j is codes[:, j] > 0 for every dtype: -0, NaN and -inf give 0, +inf and the smallest subnormal give 1."""
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(23, 77, generator=gen) * 3
    if dtype.is_floating_point:
        tiny = torch.finfo(dtype).smallest_normal / 4  # a subnormal
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), tiny, -tiny])
        values[0, : special.numel()] = special
        values[1, -special.numel():] = special
    codes = (values > 0) if dtype == torch.bool else values.to(dtype)
    expected = np.packbits((codes.float() > 0).numpy(), axis=1, bitorder="little")
    np.testing.assert_array_equal(brcd.pack_codes(codes.to(device)).cpu().numpy(), expected)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int8])
def test_unpack_gives_signs_in_any_dtype(device, dtype):
    codes = torch.randn(9, 77, generator=torch.Generator().manual_seed(1)).to(device)
    for nbits in (77, 72, 1):  # a partial last byte, whole bytes, one bit
        got = brcd.unpack_codes(brcd.pack_codes(codes[:, :nbits]), nbits, dtype=dtype)
        assert got.dtype == dtype and got.is_contiguous() and got.shape == (9, nbits)
        assert torch.equal(got, torch.where(codes[:, :nbits] > 0, 1, -1).to(dtype))


@pytest.mark.parametrize("device", device_params())
def test_pack_non_contiguous_and_sliced(device):
    codes = torch.randn(40, 130, device=device)[::3, 1:66]
    assert not codes.is_contiguous()
    assert torch.equal(brcd.pack_codes(codes).cpu(), ref.pack_codes(codes.cpu()))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits", ODD_BITS)
def test_distance_exact(device, nbits):
    gen = torch.Generator().manual_seed(1000 + nbits)
    q = ref.pack_codes(random_codes(13, nbits, gen))
    db = ref.pack_codes(random_codes(203, nbits, gen, dup_fraction=0.3))
    got = brcd.hamming_distance(q.to(device), db.to(device))
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu(), ref.hamming_distance(q, db))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits", ODD_BITS)
@pytest.mark.parametrize("n,k", [(1, 1), (9, 9), (203, 1), (203, 10), (1031, 100), (1031, 1031)])
def test_topk_exact_with_ties(device, nbits, n, k):
    gen = torch.Generator().manual_seed(nbits * 7 + n + k)
    q = ref.pack_codes(random_codes(11, nbits, gen))
    db = ref.pack_codes(random_codes(n, nbits, gen, dup_fraction=0.5))
    d, i = brcd.hamming_topk(q.to(device), db.to(device), k)
    rd, ri = ref.hamming_topk(q, db, k)
    assert d.dtype == torch.int32 and i.dtype == torch.int64
    assert torch.equal(d.cpu(), rd)
    assert torch.equal(i.cpu(), ri)


@pytest.mark.parametrize("device", device_params())
def test_topk_all_equal_codes_breaks_ties_by_index(device):
    db = brcd.pack_codes(torch.ones(5000, 64)).to(device)
    q = brcd.pack_codes(torch.ones(3, 64)).to(device)
    d, i = brcd.hamming_topk(q, db, 1234)
    assert torch.equal(d.cpu(), torch.zeros(3, 1234, dtype=torch.int32))
    assert torch.equal(i.cpu(), torch.arange(1234).expand(3, -1))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits,queries", [(16, 1), (64, 1), (128, 13), (192, 2), (256, 9)])
def test_topk_few_queries_large_database(device, nbits, queries):
    # Few queries over a database large enough to be split into shards across threads, merged in index order. On
    # the CPU each shard is re-laid chunk by chunk (transposed in registers for rows of 1, 2 or 4 whole words).
    gen = torch.Generator().manual_seed(5 + nbits)
    db = ref.pack_codes(random_codes(120_003, nbits, gen, dup_fraction=0.2))
    q = ref.pack_codes(random_codes(queries, nbits, gen))
    for k in (1, 50, 3000):
        d, i = brcd.hamming_topk(q.to(device), db.to(device), k)
        rd, ri = ref.hamming_topk(q, db, k)
        assert torch.equal(d.cpu(), rd) and torch.equal(i.cpu(), ri)


@pytest.mark.parametrize("device", device_params())
def test_topk_when_the_sampled_threshold_is_too_tight(device):
    # The CPU guesses a starting threshold from a strided sample (every 8th block of 8 codes here). Make the sampled
    # blocks equal to the query and the rest far from it, and ask for more codes than the near ones: the guess is
    # too tight and the query must be rescanned in full to stay exact.
    n, nbits = 8192, 64
    codes = -torch.ones(n, nbits)
    block = torch.arange(n) // 8
    codes[block % 8 == 0] = 1.0
    codes[5000:5003, :3] = 1.0  # a few codes at distance 61, to check the order among the far ones
    q = brcd.pack_codes(torch.ones(2, nbits))
    db = brcd.pack_codes(codes)
    for k in (500, 2000):
        d, i = brcd.hamming_topk(q.to(device), db.to(device), k)
        rd, ri = ref.hamming_topk(q, db, k)
        assert torch.equal(d.cpu(), rd) and torch.equal(i.cpu(), ri)


@pytest.mark.parametrize("device", device_params())
def test_topk_when_a_strided_sample_misleads_the_bound(device):
    # The CUDA path bounds each query's k-th distance from every (n // 16384)-th code (every 12th here) and hands a
    # query whose bound was too tight (fewer than k codes within it) or too loose (more candidates than its buffer
    # holds, 1024 for k = 100) to the exact two-pass kernels. Both must give the reference answer.
    n, nbits, stride = 200_000, 64, 12
    gen = torch.Generator().manual_seed(11)
    codes = torch.randn(n, nbits, generator=gen)
    codes[torch.arange(100) * stride] = 1.0  # 100 sampled codes equal to the query, every other code far from it
    q = brcd.pack_codes(torch.ones(3, nbits))
    for k, extra_near in ((500, None), (100, slice(100_001, 106_001))):
        db_codes = codes.clone()
        if extra_near is not None:
            db_codes[extra_near] = 1.0  # 6000 more codes at distance 0: the candidates overflow
        db = brcd.pack_codes(db_codes)
        d, i = brcd.hamming_topk(q.to(device), db.to(device), k)
        rd, ri = ref.hamming_topk(q, db, k)
        assert torch.equal(d.cpu(), rd) and torch.equal(i.cpu(), ri)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits", [7, 64, 256])
@pytest.mark.parametrize("n", [2051, 20_003])
@pytest.mark.parametrize("k", [1, 10, 300])
def test_topk_never_returns_the_padding_past_the_database(device, nbits, n, k):
    """Kernels pad the database to whole blocks of codes with zero words. A query of all zero bits is at distance 0
    from that padding and farther from every real code: a kernel that let padding lanes through returns indices
    past the database."""
    gen = torch.Generator().manual_seed(n + nbits)
    codes = random_codes(n, nbits, gen)
    codes[:, 0] = 1.0  # no real code is all zeros
    q = ref.pack_codes(-torch.ones(3, nbits)).to(device)
    db = ref.pack_codes(codes).to(device)
    d, i = brcd.hamming_topk(q, db, k)
    rd, ri = ref.hamming_topk(q.cpu(), db.cpu(), k)
    assert int(i.max()) < n
    assert torch.equal(d.cpu(), rd) and torch.equal(i.cpu(), ri)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits", [64, 200, 256])
def test_topk_sampled_path_on_a_large_database(device, nbits):
    # Large enough for the CUDA path to sample its bound (every 12th code), with hundreds of candidates per query.
    gen = torch.Generator().manual_seed(nbits)
    q = ref.pack_codes(random_codes(40, nbits, gen))
    db = ref.pack_codes(random_codes(200_000, nbits, gen, dup_fraction=0.1))
    for k in (10, 1000):
        d, i = brcd.hamming_topk(q.to(device), db.to(device), k)
        rd, ri = ref.hamming_topk(q, db, k)
        assert torch.equal(d.cpu(), rd), f"k = {k}: {(d.cpu() != rd).any(1).sum()} queries differ in distances"
        assert torch.equal(i.cpu(), ri), f"k = {k}: {(i.cpu() != ri).any(1).sum()} queries differ in indices"


@pytest.mark.parametrize("device", [p for p in device_params() if p.id == "cuda"])
def test_topk_captured_in_a_cuda_graph(device):
    # Inside a capture the op must not wait for the GPU (the tensor-core path does, once): it takes the two-pass
    # kernels, and replays give the exact answer.
    gen = torch.Generator().manual_seed(13)
    q = ref.pack_codes(random_codes(30, 64, gen))
    db = ref.pack_codes(random_codes(50_000, 64, gen, dup_fraction=0.1))
    qd, dbd = q.to(device), db.to(device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs ask
        brcd.hamming_topk(qd, dbd, 100)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        d, i = brcd.hamming_topk(qd, dbd, 100)
    graph.replay()
    torch.cuda.synchronize()
    rd, ri = ref.hamming_topk(q, db, 100)
    assert torch.equal(d.cpu(), rd) and torch.equal(i.cpu(), ri)


@pytest.mark.parametrize("device", device_params())
def test_topk_many_queries_large_k(device):
    # On CUDA, k = 2048 takes 16384-key candidate buffers: the queries are served in chunks of 2048.
    gen = torch.Generator().manual_seed(12)
    q = ref.pack_codes(random_codes(2100, 64, gen))
    db = ref.pack_codes(random_codes(3000, 64, gen, dup_fraction=0.3))
    d, i = brcd.hamming_topk(q.to(device), db.to(device), 2048)
    rd, ri = ref.hamming_topk(q, db, 2048)
    assert torch.equal(d.cpu(), rd) and torch.equal(i.cpu(), ri)


@settings(max_examples=40, deadline=None)
@given(
    nq=st.integers(1, 20),
    n=st.integers(1, 300),
    nbits=st.integers(1, 200),
    kfrac=st.floats(0.0, 1.0),
    dup=st.sampled_from([0.0, 0.5, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_fuzz_cpu(nq, n, nbits, kfrac, dup, seed):
    gen = torch.Generator().manual_seed(seed)
    k = max(1, min(n, int(round(kfrac * n))))
    q = ref.pack_codes(random_codes(nq, nbits, gen))
    db = ref.pack_codes(random_codes(n, nbits, gen, dup_fraction=dup))
    d, i = brcd.hamming_topk(q, db, k)
    rd, ri = ref.hamming_topk(q, db, k)
    assert torch.equal(d, rd) and torch.equal(i, ri)
    assert torch.equal(brcd.hamming_distance(q, db), ref.hamming_distance(q, db))


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_every_simd_path_is_exact(level):
    """The SIMD level is chosen once per process: check each in a subprocess (BRCD_SIMD caps the level)."""
    script = r"""
import torch, brcd
from brcd import reference as ref
for nbits in (5, 64, 128, 130, 256, 333):
    g = torch.Generator().manual_seed(nbits)
    q = brcd.pack_codes(torch.randn(9, nbits, generator=g))
    db = brcd.pack_codes(torch.randn(777, nbits, generator=g))
    db[100:200] = db[0]
    assert torch.equal(brcd.hamming_distance(q, db), ref.hamming_distance(q, db))
    for k in (1, 17, 777):
        d, i = brcd.hamming_topk(q, db, k)
        rd, ri = ref.hamming_topk(q, db, k)
        assert torch.equal(d, rd) and torch.equal(i, ri)
# Several chunks of the database (the scans hold groups of queries over chunks of up to 16384 codes), a query
# count that is no multiple of a group, codes near the queries, so that hit logs fill up and spill mid-chunk, and a
# last block of 8 codes that is not full (its empty lanes must never count as hits).
for nbits in (64, 200, 256):
    g = torch.Generator().manual_seed(nbits + 1)
    qc = torch.randn(13, nbits, generator=g)
    near = qc[torch.randint(0, 13, (40_003,), generator=g)]
    near = torch.where(torch.rand(40_003, nbits, generator=g) < 0.2, -near, near)
    q, db = brcd.pack_codes(qc), brcd.pack_codes(near)
    for k in (10, 600, 3000):
        d, i = brcd.hamming_topk(q, db, k)
        rd, ri = ref.hamming_topk(q, db, k)
        assert torch.equal(d, rd) and torch.equal(i, ri), (nbits, k)
# Queries of all zero bits: the zero padding of the last block is nearer than any code and must never be returned.
for nbits in (7, 64, 256):
    g = torch.Generator().manual_seed(nbits + 2)
    codes = torch.randn(20_003, nbits, generator=g)
    codes[:, 0] = 1.0
    q, db = brcd.pack_codes(-torch.ones(5, nbits)), brcd.pack_codes(codes)
    for k in (1, 10, 300):
        d, i = brcd.hamming_topk(q, db, k)
        rd, ri = ref.hamming_topk(q, db, k)
        assert torch.equal(d, rd) and torch.equal(i, ri), (nbits, k)
# A database large enough to be sampled, k dense: the candidate scan, and mAP through the AP op.
g = torch.Generator().manual_seed(1)
codes = torch.randn(5001, 40, generator=g)
labels = torch.randint(0, 3, (5001,), generator=g)
q, db = brcd.pack_codes(codes[:9]), brcd.pack_codes(codes[9:])
d, i = brcd.hamming_topk(q, db, 300)
rd, ri = ref.hamming_topk(q, db, 300)
assert torch.equal(d, rd) and torch.equal(i, ri)
got = brcd.metrics.mean_average_precision(codes[:9], codes[9:], labels[:9], labels[9:], topk=300)
assert abs(got - ref.mean_average_precision(codes[:9], codes[9:], labels[:9], labels[9:], 300)) <= 1e-12
print(brcd.build_info()["simd"])
"""
    env = dict(os.environ, BRCD_SIMD=level)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    chosen = out.stdout.strip().splitlines()[-1]
    order = ["scalar", "avx2", "avx512_vpopcntdq"]
    assert order.index(chosen) <= order.index({"scalar": "scalar", "avx2": "avx2", "avx512": "avx512_vpopcntdq"}[level])

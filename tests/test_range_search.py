"""hamming_range_search and HammingIndex.range_search against the reference, hamming_topk and their own contract."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import brcd
from brcd import ops as brcd_ops
from brcd import reference as ref
from brcd.index import HammingIndex
from conftest import device_params
from test_hamming import ODD_BITS, random_codes


def assert_same(got, expected):
    lims, dist, idx = got
    assert (lims.dtype, dist.dtype, idx.dtype) == (torch.int64, torch.int32, torch.int64)
    for name, g, e in zip(("lims", "distances", "indices"), got, expected):
        assert torch.equal(g.cpu(), e), f"{name} differ"


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits", ODD_BITS)
def test_exact_with_ties_at_every_radius(device, nbits):
    gen = torch.Generator().manual_seed(3000 + nbits)
    q = ref.pack_codes(random_codes(11, nbits, gen))
    db = ref.pack_codes(random_codes(1031, nbits, gen, dup_fraction=0.5))
    # Radii from nothing-but-duplicates to the whole database (nbits and beyond), through the typical distances.
    for radius in sorted({0, 1, nbits // 4, nbits // 2 - 1, nbits // 2, nbits - 1, nbits, 8 * db.shape[1], 10**9}):
        if radius < 0:
            continue
        assert_same(brcd.hamming_range_search(q.to(device), db.to(device), radius),
                    ref.hamming_range_search(q, db, radius))


@pytest.mark.parametrize("device", device_params())
def test_results_are_the_top_k_prefix_within_the_radius(device):
    gen = torch.Generator().manual_seed(1)
    q = ref.pack_codes(random_codes(20, 64, gen)).to(device)
    db = ref.pack_codes(random_codes(5000, 64, gen, dup_fraction=0.2)).to(device)
    lims, dist, idx = brcd.hamming_range_search(q, db, 24)
    assert int(lims[0]) == 0 and bool((lims[1:] >= lims[:-1]).all())
    for qi in range(q.shape[0]):
        a, b = int(lims[qi]), int(lims[qi + 1])
        assert b > a, "every query should find some code within 24 of 64 bits among 5000"
        td, ti = brcd.hamming_topk(q[qi : qi + 1], db, b - a + 1)
        assert torch.equal(dist[a:b], td[0, :-1]) and torch.equal(idx[a:b], ti[0, :-1])
        assert int(td[0, -1]) > 24  # the next nearest code is outside the ball


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits,queries", [(16, 1), (64, 1), (128, 3), (256, 2), (65, 5)])
@pytest.mark.parametrize("near_share", [1.0, 0.001])
def test_few_queries_over_a_large_database(device, nbits, queries, near_share):
    # Few queries over a large database: the CPU scans shards of it in parallel, re-laid chunk by chunk, and joins
    # each query's hits shard after shard, which must keep index order among equal distances. Hits are dense where
    # every code is near a query (the CPU then appends every hit without a branch) and sparse where one in a
    # thousand is (it then scans as the top-k does, visiting only the blocks with a hit).
    gen = torch.Generator().manual_seed(nbits + queries)
    qc = random_codes(queries, nbits, gen)
    n = 120_003
    near = qc[torch.randint(0, queries, (n,), generator=gen)]
    near = torch.where(torch.rand(n, nbits, generator=gen) < 0.15, -near, near)
    codes = torch.where((torch.rand(n, generator=gen) < near_share)[:, None], near, random_codes(n, nbits, gen))
    q, db = ref.pack_codes(qc), ref.pack_codes(codes)
    radius = nbits // 8
    assert_same(brcd.hamming_range_search(q.to(device), db.to(device), radius), ref.hamming_range_search(q, db, radius))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits", [7, 64, 256])
def test_never_returns_the_padding_past_the_database(device, nbits):
    # A query of all zero bits is at distance 0 from the zero padding of the last block of codes, farther from every
    # real code: every real code is within nbits, the padding must never be among the results.
    gen = torch.Generator().manual_seed(nbits)
    codes = random_codes(2051, nbits, gen)
    codes[:, 0] = 1.0
    q = ref.pack_codes(-torch.ones(3, nbits)).to(device)
    db = ref.pack_codes(codes).to(device)
    lims, dist, idx = brcd.hamming_range_search(q, db, nbits)
    assert lims.tolist() == [0, 2051, 4102, 6153]
    assert int(idx.max()) < 2051 and int(dist.min()) >= 1
    assert_same((lims, dist, idx), ref.hamming_range_search(q.cpu(), db.cpu(), nbits))


@pytest.mark.parametrize("device", device_params())
def test_no_queries_and_no_results(device):
    db = brcd.pack_codes(torch.ones(100, 64, device=device))
    lims, dist, idx = brcd.hamming_range_search(db[:0], db, 3)
    assert lims.tolist() == [0] and dist.numel() == 0 and idx.numel() == 0
    assert lims.device == db.device and dist.device == db.device and idx.device == db.device
    far = brcd.pack_codes(-torch.ones(4, 64, device=device))
    lims, dist, idx = brcd.hamming_range_search(far, db, 63)
    assert lims.tolist() == [0, 0, 0, 0, 0] and dist.numel() == 0 and idx.numel() == 0
    lims, dist, idx = brcd.hamming_range_search(far, db, 64)
    assert lims.tolist() == [0, 100, 200, 300, 400]
    assert torch.equal(idx.cpu(), torch.arange(100).repeat(4)) and bool((dist == 64).all())


@pytest.mark.parametrize("device", device_params())
def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(4)
    q = ref.pack_codes(random_codes(30, 96, gen)).to(device)
    db = ref.pack_codes(random_codes(700, 200, gen)).to(device)[::2, 3:15]  # every other row, 96 of its bits
    assert not db.is_contiguous()
    assert_same(brcd.hamming_range_search(q[::3], db, 40), ref.hamming_range_search(q[::3].cpu(), db.cpu(), 40))


@pytest.mark.parametrize("chunk_pairs", [1, 1000, 1 << 26])
def test_the_composed_path_matches_the_kernel(monkeypatch, chunk_pairs):
    """The CUDA implementation is hamming_distance over chunks of queries plus torch ops; run on the CPU it must give
    what the CPU kernel gives, with one query per chunk, several per chunk and all at once."""
    monkeypatch.setattr(brcd_ops, "_RANGE_CHUNK_PAIRS", chunk_pairs)
    gen = torch.Generator().manual_seed(chunk_pairs)
    for nq, n, nbits in ((17, 300, 64), (0, 50, 7), (5, 1, 129), (40, 2000, 33)):
        q = ref.pack_codes(random_codes(nq, nbits, gen))
        db = ref.pack_codes(random_codes(n, nbits, gen, dup_fraction=0.5))
        for radius in (0, nbits // 3, nbits, 10**6):
            assert_same(brcd_ops._range_search_by_ops(q, db, radius), tuple(brcd.hamming_range_search(q, db, radius)))
    with pytest.raises(ValueError, match="radius"):
        brcd_ops._range_search_by_ops(q, db, -1)
    with pytest.raises(ValueError, match="bits"):  # the tensors are checked even with no queries
        brcd_ops._range_search_by_ops(ref.pack_codes(random_codes(0, 8, gen)), db, 1)


@settings(max_examples=40, deadline=None)
@given(
    nq=st.integers(0, 12),
    n=st.integers(1, 400),
    nbits=st.integers(1, 300),
    rfrac=st.floats(0.0, 1.1),
    dup=st.sampled_from([0.0, 0.5, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_range_search_fuzz_cpu(nq, n, nbits, rfrac, dup, seed):
    gen = torch.Generator().manual_seed(seed)
    radius = int(rfrac * nbits)
    q = ref.pack_codes(random_codes(nq, nbits, gen))
    db = ref.pack_codes(random_codes(n, nbits, gen, dup_fraction=dup))
    assert_same(brcd.hamming_range_search(q, db, radius), ref.hamming_range_search(q, db, radius))


@pytest.mark.parametrize("device", device_params())
def test_bad_input(device):
    db = brcd.pack_codes(torch.randn(10, 64, device=device))
    q = brcd.pack_codes(torch.randn(3, 64, device=device))
    with pytest.raises(ValueError, match="radius"):
        brcd.hamming_range_search(q, db, -1)
    with pytest.raises(TypeError, match="radius must be an int"):
        brcd.hamming_range_search(q, db, 2.0)
    with pytest.raises(TypeError, match="radius must be an int"):
        brcd.hamming_range_search(q, db, True)
    with pytest.raises(TypeError, match="query_packed"):
        brcd.hamming_range_search(torch.randn(3, 8, device=device), db, 1)
    with pytest.raises(TypeError, match="db_packed"):
        brcd.hamming_range_search(q, db.tolist(), 1)
    with pytest.raises(ValueError, match="bits"):
        brcd.hamming_range_search(brcd.pack_codes(torch.randn(3, 72, device=device)), db, 1)
    with pytest.raises(ValueError, match="empty"):
        brcd.hamming_range_search(q, db[:0], 1)
    with pytest.raises(ValueError, match="2-D"):
        brcd.hamming_range_search(q[0], db, 1)


@pytest.mark.parametrize("device", device_params())
def test_index_range_search(device):
    gen = torch.Generator().manual_seed(8)
    codes = random_codes(3000, 48, gen, dup_fraction=0.3)
    index = HammingIndex(48, device=device)
    index.add(codes[:1000])
    index.add(codes[1000:])  # two adds: ids run on across them
    queries = random_codes(6, 48, gen)
    expected = ref.hamming_range_search(ref.pack_codes(queries), ref.pack_codes(codes), 14)
    assert_same(index.range_search(queries.to(device), 14), expected)
    assert_same(index.range_search_packed(brcd.pack_codes(queries), 14), expected)  # CPU queries, any index device


def test_index_range_search_bad_arguments():
    index = HammingIndex(16)
    with pytest.raises(ValueError, match="empty"):
        index.range_search(torch.randn(1, 16), 1)
    index.add(torch.randn(5, 16))
    with pytest.raises(ValueError, match="radius"):
        index.range_search(torch.randn(1, 16), -2)
    with pytest.raises(TypeError, match="radius must be an int"):  # as hamming_range_search and MultiIndexHashing
        index.range_search(torch.randn(1, 16), 1.5)
    with pytest.raises(ValueError, match="shape"):
        index.range_search(torch.randn(1, 15), 1)
    with pytest.raises(TypeError, match="packed"):
        index.range_search(brcd.pack_codes(torch.randn(1, 16)), 1)


def test_torch_compile_fullgraph():
    """The fake kernel gives the results a size known only at run time, so a compiled graph can hold the op and use
    its outputs."""
    def mean_distance_in_ball(q, db):
        lims, dist, idx = brcd.hamming_range_search(q, db, 20)
        return lims, dist.float().mean(), idx

    gen = torch.Generator().manual_seed(2)
    q, db = brcd.pack_codes(torch.randn(5, 64, generator=gen)), brcd.pack_codes(torch.randn(500, 64, generator=gen))
    compiled = torch.compile(mean_distance_in_ball, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(q, db), mean_distance_in_ball(q, db)):
        assert torch.equal(got, expected)


def test_agrees_with_faiss_range_search():
    """faiss's IndexBinaryFlat.range_search keeps distances below its radius, ours at most ours: the same balls one
    apart, the same codes once each query's results are ordered by (distance, index)."""
    faiss = pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(6)
    db = ref.pack_codes(random_codes(3000, 64, gen, dup_fraction=0.2))
    q = ref.pack_codes(random_codes(7, 64, gen))
    index = faiss.IndexBinaryFlat(64)
    index.add(db.numpy())
    for radius in (0, 20, 26, 64):
        lims, dist, idx = index.range_search(q.numpy(), radius + 1)
        ordered_dist, ordered_idx = [], []
        for i in range(q.shape[0]):
            part = sorted(zip(dist[lims[i] : lims[i + 1]].tolist(), idx[lims[i] : lims[i + 1]].tolist()))
            ordered_dist += [d for d, _ in part]
            ordered_idx += [j for _, j in part]
        assert_same(brcd.hamming_range_search(q, db, radius), (torch.from_numpy(lims).long(),
                    torch.tensor(ordered_dist, dtype=torch.int32), torch.tensor(ordered_idx, dtype=torch.int64)))

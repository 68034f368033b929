"""MultiIndexHashing gives exactly what the linear scans give: hamming_range_search and hamming_topk."""
import pytest
import torch

import brcd
from brcd import multi_index
from brcd.multi_index import MultiIndexHashing
from brcd import reference as ref
from conftest import device_params
from test_hamming import random_codes


def clustered(n, nbits, gen, centres=20, flip=0.1):
    """Codes near a few centres: full buckets and many ties, the hard case for a multi-index."""
    c = torch.randn(centres, nbits, generator=gen).sign()
    pick = torch.randint(0, centres, (n,), generator=gen)
    return c[pick] * torch.where(torch.rand(n, nbits, generator=gen) < flip, -1.0, 1.0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits,substrings", [(64, None), (64, 4), (63, 3), (7, 2), (129, None), (256, 8), (32, 1)])
@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("costs", ["lookups always", "as measured"])
def test_range_search_and_knn_match_the_scans(monkeypatch, device, nbits, substrings, kind, costs):
    if costs == "lookups always":  # on a database this small the cost model would choose the scan nearly always
        monkeypatch.setattr(multi_index, "_PROBE_COST", 0)
        monkeypatch.setattr(multi_index, "_CANDIDATE_COST", 0)
    gen = torch.Generator().manual_seed(nbits * 10 + (substrings or 0))
    make = random_codes if kind == "random" else clustered
    db = ref.pack_codes(make(3000, nbits, gen)).to(device)
    db[1000:1100] = db[:100]  # exact duplicates
    # Some queries are database codes; more of them than the k-nearest search's sample, so that it looks codes up.
    q = torch.cat([db[:5], ref.pack_codes(make(75, nbits, gen)).to(device)])
    mih = MultiIndexHashing(db, nbits, substrings)
    for radius in sorted({0, 1, 2, 3, nbits // 8, nbits // 4, nbits // 3, nbits}):
        got = mih.range_search(q, radius)
        want = brcd.hamming_range_search(q, db, radius)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.device == w.device and torch.equal(g, w), radius
    for k in (1, 10, 257):
        d, i = mih.search(q, k)
        rd, ri = brcd.hamming_topk(q, db, k)
        assert torch.equal(d, rd) and torch.equal(i, ri), k


def test_the_lookup_path_is_taken_and_the_scan_fallbacks(monkeypatch):
    """Small radii over a large random database look codes up (the scan is never called); radii whose probes or
    candidates would cost more than the scan, and one past the probe limit, fall back to it, with the same answers."""
    gen = torch.Generator().manual_seed(0)
    db = ref.pack_codes(random_codes(60_000, 64, gen))
    q = ref.pack_codes(random_codes(9, 64, gen))
    mih = MultiIndexHashing(db, 64)
    assert mih.substrings == 4  # about log2(60000) = 16 bits per substring
    scans = []

    def scan(q, db, radius):
        scans.append(radius)
        return brcd.hamming_range_search(q, db, radius)

    monkeypatch.setattr(multi_index, "hamming_range_search", scan)
    for radius in (0, 3):
        got = mih.range_search(q, radius)
        assert all(torch.equal(g, w) for g, w in zip(got, brcd.hamming_range_search(q, db, radius)))
    assert scans == []
    for radius in (7, 30):  # 68 and 26,333 probe keys a query: more than scanning 60,000 codes
        got = mih.range_search(q, radius)
        assert all(torch.equal(g, w) for g, w in zip(got, brcd.hamming_range_search(q, db, radius)))
    monkeypatch.setattr(multi_index, "_MAX_PROBES", 0)
    got = mih.range_search(q, 3)  # one probe key per table: past the limit
    assert all(torch.equal(g, w) for g, w in zip(got, brcd.hamming_range_search(q, db, 3)))
    assert scans == [7, 30, 3]


def test_no_queries_and_bad_input():
    db = brcd.pack_codes(torch.randn(100, 20))
    mih = MultiIndexHashing(db, 20)
    lims, dist, idx = mih.range_search(db[:0], 3)
    assert lims.tolist() == [0] and dist.numel() == 0 and idx.numel() == 0
    assert "nbits=20, count=100" in repr(mih) and len(mih) == 100
    with pytest.raises(ValueError, match="nbits"):
        MultiIndexHashing(db, 25)
    with pytest.raises(ValueError, match="empty"):
        MultiIndexHashing(db[:0], 20)
    with pytest.raises(ValueError, match="substrings"):
        MultiIndexHashing(db, 20, substrings=21)
    with pytest.raises(ValueError, match="substrings"):
        MultiIndexHashing(brcd.pack_codes(torch.randn(10, 70)), 70, substrings=2)  # 35-bit substrings
    with pytest.raises(ValueError, match="db_packed"):
        MultiIndexHashing(torch.randn(10, 3), 20)
    with pytest.raises(ValueError, match="query_packed"):
        mih.range_search(brcd.pack_codes(torch.randn(2, 30)), 1)
    with pytest.raises(ValueError, match="radius"):
        mih.range_search(db, -1)
    with pytest.raises(TypeError, match="radius"):
        mih.range_search(db, 1.0)
    with pytest.raises(ValueError, match="k must be"):
        mih.search(db, 101)
    with pytest.raises(TypeError, match="k must be an int"):
        mih.search(db, True)

"""A short Hamming-search example: pack codes, search exactly (the k nearest, and a Hamming ball by a scan and by
multi-index hashing), save and load an index, measure mAP."""
import tempfile
import time
from pathlib import Path

import torch

import brcd
from brcd import metrics


def main():
    print("brcd", brcd.build_info())
    gen = torch.Generator().manual_seed(0)
    classes, nbits, n = 10, 64, 200_000
    centers = torch.randn(classes, nbits, generator=gen).sign()
    labels = torch.randint(0, classes, (n,), generator=gen)
    noise = torch.where(torch.rand(n, nbits, generator=gen) < 0.25, -1.0, 1.0)
    codes = centers[labels] * noise  # ±1 codes: noisy copies of one centre per class

    index = brcd.HammingIndex(nbits)
    index.add(codes[1000:])
    queries, query_labels = codes[:1000], labels[:1000]
    t0 = time.perf_counter()
    dist, ids = index.search(queries, k=10)
    dt = time.perf_counter() - t0
    print(f"searched {len(queries)} queries over {len(index)} codes in {dt * 1e3:.1f} ms")
    print("first query: distances", dist[0].tolist(), "ids", ids[0].tolist())

    lims, ball_dist, ball_ids = index.range_search(queries, radius=8)
    print(f"codes within distance 8: {(lims[1:] - lims[:-1]).float().mean():.1f} per query on average")
    mih = brcd.MultiIndexHashing(index.packed_codes, nbits)
    t0 = time.perf_counter()
    by_lookup = mih.range_search(brcd.pack_codes(queries), radius=8)
    dt = time.perf_counter() - t0
    assert all(torch.equal(a, b) for a, b in zip(by_lookup, (lims, ball_dist, ball_ids)))
    print(f"the same balls by {mih!r} in {dt * 1e3:.1f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "codes.bhi"
        index.save(path)
        again = brcd.HammingIndex.load(path)
        assert torch.equal(again.search(queries[:5], 10)[1], ids[:5])
        print(f"saved and reloaded {path.stat().st_size} bytes")

    m = metrics.mean_average_precision(queries, codes[1000:], query_labels, labels[1000:], topk=1000)
    print(f"mAP@1000 = {m:.4f}")


if __name__ == "__main__":
    main()

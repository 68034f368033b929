"""pytest-benchmark suite: brcd's ops side by side with the baselines of the issues (faiss `IndexBinaryFlat`, eager
PyTorch, torch.compile, the original evaluation loop) on the same data, one group per case and device. Every brcd
case first checks its answer against a baseline's, so a fast wrong answer fails instead of winning.

    pytest benchmarks/ --benchmark-only [-k topk] [--benchmark-save=NAME | --benchmark-compare]

The full-size tables of the issues' targets come from run_cpu.py and gpu_bench.py; this suite is for comparing
builds and machines (pytest-benchmark's saved runs, comparisons and histograms). Sizes: conftest.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import brcd
from brcd import metrics
from brcd import reference as ref
from cases import (augment_case, eager_ranking_metrics, fused_loss, loss_case, loss_step, map_case, multi_hot, one_hot,
                   original_map, packed_codes)
from conftest import SMOKE, size, timed


def faiss_flat_index(device: str, nbits: int, db_packed: torch.Tensor):
    """faiss's IndexBinaryFlat over the database, on this process's threads; the case is skipped off the CPU or
    without faiss."""
    if device != "cpu":
        pytest.skip("faiss-cpu runs on the CPU (the GPU machine has no faiss)")
    faiss = pytest.importorskip("faiss")
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexBinaryFlat(nbits)
    index.add(db_packed.numpy())
    return index


def pm1(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """±1 float codes of packed ones: the operands of the matmul baselines."""
    return brcd.unpack_codes(packed, nbits)


# ------------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("impl", ["brcd", "numpy"])
def test_pack(benchmark, device, impl):
    codes = torch.randn(size(1_000_000, 1000), 64, device=device)
    benchmark.group = f"pack_codes, {codes.shape[0]:,} x 64 bits, {device}"
    want = lambda: np.packbits(codes.cpu().numpy() > 0, axis=1, bitorder="little")
    if impl == "numpy":
        if device != "cpu":
            pytest.skip("NumPy runs on the CPU")
        benchmark(want)
        return
    assert np.array_equal(brcd.pack_codes(codes).cpu().numpy(), want())
    benchmark(timed(lambda: brcd.pack_codes(codes), device))


# ------------------------------------------------------------------------------------------------- distance
@pytest.mark.parametrize("impl", ["brcd", "torch"])
def test_hamming_distance(benchmark, device, impl):
    q, n = size((256, 100_000), (8, 500))
    qp, dp = packed_codes(q, 64, seed=1).to(device), packed_codes(n, 64, seed=2).to(device)
    qs, ds = pm1(qp, 64), pm1(dp, 64)
    matmul = lambda: (64 - qs @ ds.T) / 2  # the ±1 matmul (float32): exact for these integers
    benchmark.group = f"hamming_distance, {q} x {n:,}, 64 bits, {device}"
    if impl == "torch":
        benchmark(timed(matmul, device))
        return
    assert torch.equal(brcd.hamming_distance(qp, dp), matmul().round().int())
    benchmark(timed(lambda: brcd.hamming_distance(qp, dp), device))


# ------------------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("nbits,k", [(64, 10), (64, 1000), (256, 10), (256, 1000)], ids=lambda v: str(v))
@pytest.mark.parametrize("impl", ["brcd", "faiss", "torch"])
def test_hamming_topk(benchmark, device, nbits, k, impl):
    q, n = size((100, 1_000_000), (4, 5000))
    qp, dp = packed_codes(q, nbits, seed=1), packed_codes(n, nbits, seed=2)
    benchmark.group = f"hamming_topk, {q} x {n:,}, {nbits} bits, k = {k}, {device}"
    benchmark.extra_info["pairs"] = q * n
    if impl == "faiss":
        index = faiss_flat_index(device, nbits, dp)
        benchmark(lambda: index.search(qp.numpy(), k))
        return
    qp, dp = qp.to(device), dp.to(device)
    qs, ds = pm1(qp, nbits), pm1(dp, nbits)
    by_matmul = lambda: torch.topk(qs @ ds.T, k, dim=1)  # the largest ±1 dot is the smallest distance
    if impl == "torch":
        benchmark(timed(by_matmul, device))
        return
    dist, idx = brcd.hamming_topk(qp, dp, k)
    assert torch.equal(dist, ((nbits - by_matmul().values) / 2).round().int())
    assert torch.equal(brcd.hamming_distance(qp, dp).gather(1, idx), dist)
    benchmark(timed(lambda: brcd.hamming_topk(qp, dp, k), device))


# ------------------------------------------------------------------------------------------------- range search
def balls_by_matmul(qs: torch.Tensor, ds: torch.Tensor, nbits: int, radius: int):
    """The eager baseline of a range search: distances from a ±1 matmul, the pairs within the radius, a stable sort
    of each query's by distance. Same layout as brcd.hamming_range_search."""
    dist = ((nbits - qs @ ds.T) / 2).round().long()
    row, col = (dist <= radius).nonzero(as_tuple=True)
    d = dist[row, col]
    order = torch.sort(row * (nbits + 1) + d, stable=True).indices
    lims = torch.cat([row.new_zeros(1), torch.bincount(row, minlength=qs.shape[0]).cumsum(0)])
    return lims, d[order].int(), col[order]


@pytest.mark.parametrize("nbits,radius", [(64, 15), (64, 19), (256, 103)], ids=lambda v: str(v))
@pytest.mark.parametrize("impl", ["brcd", "faiss", "torch"])
def test_hamming_range_search(benchmark, device, nbits, radius, impl):
    """Radii of about 10 and 1000 codes per query of a million uniformly random ones (64 bits), 1000 of 256 bits."""
    q, n = size((100, 1_000_000), (4, 5000))
    qp, dp = packed_codes(q, nbits, seed=3), packed_codes(n, nbits, seed=4)
    benchmark.group = f"hamming_range_search, {q} x {n:,}, {nbits} bits, radius {radius}, {device}"
    benchmark.extra_info["pairs"] = q * n
    if impl == "faiss":
        index = faiss_flat_index(device, nbits, dp)
        benchmark(lambda: index.range_search(qp.numpy(), radius + 1))  # faiss's radius is exclusive
        return
    qp, dp = qp.to(device), dp.to(device)
    qs, ds = pm1(qp, nbits), pm1(dp, nbits)
    if impl == "torch":
        benchmark(timed(lambda: balls_by_matmul(qs, ds, nbits, radius), device))
        return
    for got, expected in zip(brcd.hamming_range_search(qp, dp, radius), balls_by_matmul(qs, ds, nbits, radius)):
        assert torch.equal(got, expected)
    benchmark(timed(lambda: brcd.hamming_range_search(qp, dp, radius), device))


@pytest.mark.parametrize("radius", [2, 4])
@pytest.mark.parametrize("impl", ["multi-index", "scan"])
def test_multi_index_range_search(benchmark, device, radius, impl):
    """A hash lookup over a million random 64-bit codes: the substring tables against the scan."""
    q, n = size((1000, 1_000_000), (50, 20_000))
    qp, dp = packed_codes(q, 64, seed=5).to(device), packed_codes(n, 64, seed=6).to(device)
    benchmark.group = f"multi-index range search, {q} x {n:,}, 64 bits, radius {radius}, {device}"
    if impl == "scan":
        benchmark(timed(lambda: brcd.hamming_range_search(qp, dp, radius), device))
        return
    mih = brcd.MultiIndexHashing(dp, 64)
    for got, expected in zip(mih.range_search(qp, radius), brcd.hamming_range_search(qp, dp, radius)):
        assert torch.equal(got, expected)
    benchmark(timed(lambda: mih.range_search(qp, radius), device))


# ------------------------------------------------------------------------------------------------- index
@pytest.mark.parametrize("impl", ["brcd", "faiss"])
def test_index_add_in_batches(benchmark, device, impl):
    """Filling an index batch by batch, as a database is encoded: the cost must stay linear in its size."""
    n, batch = size((2_000_000, 1000), (5000, 100))
    codes = packed_codes(n, 64, seed=3)
    benchmark.group = f"index add, {n:,} 64-bit codes in batches of {batch}, {device}"
    if impl == "faiss":
        if device != "cpu":
            pytest.skip("faiss-cpu runs on the CPU")
        faiss = pytest.importorskip("faiss")

        def fill_faiss():
            index = faiss.IndexBinaryFlat(64)
            for i in range(0, n, batch):
                index.add(codes[i : i + batch].numpy())
            return index

        benchmark.pedantic(fill_faiss, rounds=3)
        return

    def fill():
        index = brcd.HammingIndex(64, device=device)
        for i in range(0, n, batch):
            index.add_packed(codes[i : i + batch])
        return index

    assert torch.equal(fill().packed_codes.cpu(), codes)
    benchmark.pedantic(timed(fill, device), rounds=3)


# ------------------------------------------------------------------------------------------------- mAP
@pytest.mark.parametrize("impl", ["brcd", "original"])
def test_map_at_1000(benchmark, device, impl):
    q, n = size((500, 50_000), (20, 2000))
    qc, dc, ql, dl = map_case(q, n)
    args = (qc.numpy(), dc.numpy(), one_hot(ql, 10), one_hot(dl, 10), 1000)
    benchmark.group = f"mAP@1000, {q} x {n:,}, 64 bits, {device}"
    if impl == "original":
        if device != "cpu":
            pytest.skip("the original loop is NumPy")
        # Its stable-sort form, which ranks ties as the spec does; a run is seconds: three rounds.
        benchmark.pedantic(original_map, args=args, kwargs=dict(kind="stable"), rounds=3)
        return
    qc, dc, ql, dl = (t.to(device) for t in (qc, dc, ql, dl))
    run = lambda: metrics.mean_average_precision(qc, dc, ql, dl, 1000)
    assert run() == pytest.approx(original_map(*args, kind="stable"), abs=1e-12)
    benchmark(timed(run, device))


@pytest.mark.parametrize("labels", ["ids", "multi-hot"])
@pytest.mark.parametrize("impl", ["brcd", "plain"])
def test_retrieval_metrics(benchmark, device, labels, impl):
    """Everything the plain loop computes from one sort (mAP, P@K, NDCG@K, precision within a radius, P@N and R@N
    curves) against brcd's retrieval_scores and precision_recall_at_k."""
    q, n = size((500, 50_000), (20, 2000))
    qc, dc, ql, dl = map_case(q, n)
    if labels == "multi-hot":
        ql, dl = multi_hot(ql, 21, seed=1), multi_hot(dl, 21, seed=2)
    benchmark.group = f"retrieval metrics, K = 1000, {labels}, {q} x {n:,}, 64 bits, {device}"
    on = [t.to(device) for t in (qc, dc, ql, dl)]
    plain = lambda: eager_ranking_metrics(*on, 1000, 20)
    if impl == "plain":
        benchmark.pedantic(timed(plain, device), rounds=3)
        return
    run = lambda: (metrics.retrieval_scores(*on, topk=1000, radius=20), metrics.precision_recall_at_k(*on, 1000))
    (scores, curves), want = run(), plain()
    assert all(abs(scores[key] - want[key]) <= 1e-12 for key in scores)
    assert all(float((curves[key].to(want[key].device) - want[key]).abs().max()) <= 1e-12
               for key in ("precision", "recall"))
    benchmark(timed(run, device))


# ------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("B", [64, 1024])
@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
def test_loss_step(benchmark, device, B, impl):
    """Forward and backward of the BRCD loss (mask, groups, per-sample alpha), float32, with gradients for the student
    and the teacher's second view: the step the issue's targets are set on."""
    if impl == "compile" and SMOKE:
        pytest.skip("torch.compile takes seconds to compile: not in smoke runs")
    B = size(B, B // 16)
    s, ta, tv, kw = loss_case(B, device=device)
    # dynamic=False: a graph per batch size, as a fresh process compiles it (after a second size, torch.compile would
    # otherwise switch to one dynamic-shape graph, slower here: 32 ms against 21 ms at B = 1024).
    compiled = lambda: torch.compile(ref.brcd_loss, dynamic=False)
    fn = compiled() if impl == "compile" else {"fused": fused_loss, "eager": ref.brcd_loss}[impl]
    benchmark.group = f"loss forward + backward, B = {B}, K = 64, {device}"

    step = loss_step(fn, s, ta, tv, kw)
    loss, grad = step()  # and compiles, outside the timing
    if impl == "fused":
        a = s.detach().requires_grad_()
        want = ref.brcd_loss(a, ta, tv, **kw)
        want.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert torch.allclose(grad, a.grad, rtol=1e-4, atol=1e-6)
    benchmark(timed(step, device))


# ------------------------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("impl", ["batch", "torchvision"])
def test_two_view_augmentation(benchmark, device, impl):
    """Both training views of a batch of 32 x 32 RGB images: BatchAugment on the device against torchvision's
    transforms image by image on the CPU (a data loader's work for the batch)."""
    if impl == "torchvision" and device != "cpu":
        pytest.skip("torchvision's per-image transforms run in the CPU's data loader")
    batch = size(128, 16)
    per_image, batched = augment_case(3, 32, batch)
    run = batched(device) if impl == "batch" else per_image
    benchmark.group = f"two-view augmentation, {batch} x 3 x 32 x 32, {device}"
    for view in run():  # the model's input: float32 in [-1, 1], the batch's shape
        assert view.shape == (batch, 3, 32, 32) and view.dtype == torch.float32
        assert float(view.min()) >= -1 and float(view.max()) <= 1
    benchmark(timed(run, device))

"""The benchmarks' inputs and the original evaluation loop, shared by the scripts (run_cpu.py, gpu_bench.py) and the
pytest-benchmark suite (test_bench.py): every table and every suite run measures the same kind of data."""
from __future__ import annotations

import numpy as np
import torch

import brcd


def loss_case(B: int, K: int = 64, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Codes and keyword arguments of one BRCD loss step as distillation calls it: a bit mask (80 % of bits kept),
    false-negative groups from 10 clusters, a per-sample alpha (1 for about 30 % of the samples, else 0.8)."""
    g = torch.Generator(device=device).manual_seed(seed)
    s, ta, tv = (torch.randn(B, K, generator=g, device=device, dtype=dtype) for _ in range(3))
    clusters = torch.randint(0, 10, (B,), generator=g, device=device)
    kw = dict(temperature=0.3,
              alpha=(torch.rand(B, generator=g, device=device) < 0.3).to(dtype) * 0.2 + 0.8,
              bit_mask=(torch.rand(B, K, generator=g, device=device) < 0.8).to(dtype),
              row_groups=torch.cat([clusters, clusters]), col_groups=torch.cat([clusters, clusters]))
    return s, ta, tv, kw


def fused_loss(student, teacher_anchor, teacher_view, **kw):
    """brcd_loss as the benchmarks time it: like the eager reference (and the trainer), without checking that a
    per-sample alpha lies in [0, 1]; on a GPU that check reads its answer back, a device synchronisation per call (the
    GPU table times the checked call in a column of its own). On the CPU the op checks alpha regardless, for free."""
    return brcd.brcd_loss(student, teacher_anchor, teacher_view, check_alpha=False, **kw)


def loss_step(fn, s, ta, tv, kw, view_grad: bool = True):
    """One timed step of a loss implementation: forward and backward from fresh leaves, with gradients for the student
    and (view_grad) the teacher's second view; without it, the distillation step, where the teacher's codes are
    frozen. The step returns the loss and the student's gradient."""
    def run():
        a, b = s.detach().requires_grad_(), tv.detach().requires_grad_(view_grad)
        loss = fn(a, ta, b, **kw)
        loss.backward()
        return loss, a.grad
    return run


def packed_codes(n: int, nbits: int, seed: int = 0) -> torch.Tensor:
    """Uniformly random packed codes [n, nbits / 8] (uint8, the faiss and numpy.packbits layout)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, nbits // 8), dtype=np.uint8))


def map_case(q_count: int, n: int, nbits: int = 64, classes: int = 10, seed: int = 0):
    """±1 codes with class structure (each code is its class centre with 30 % of its bits flipped) and integer class
    labels: (query codes, database codes, query labels, database labels)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, nbits, generator=g).sign()
    ql, dl = torch.randint(0, classes, (q_count,), generator=g), torch.randint(0, classes, (n,), generator=g)
    flip = lambda m: torch.where(torch.rand(m, nbits, generator=g) < 0.3, -1.0, 1.0)
    return centers[ql] * flip(q_count), centers[dl] * flip(n), ql, dl


def one_hot(labels: torch.Tensor, classes: int) -> np.ndarray:
    return torch.nn.functional.one_hot(labels, classes).numpy().astype(np.float32)


def original_map(q_codes: np.ndarray, db_codes: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray, topk: int,
                 kind: str = "quicksort") -> float:
    """The original evaluation loop: per query, distances by a ±1 dot product, one argsort, AP over the top k."""
    nbits = q_codes.shape[1]
    total = 0.0
    for i in range(q_codes.shape[0]):
        relevant = (q_labels[i] @ db_labels.T > 0).astype(np.float32)
        dist = 0.5 * (nbits - q_codes[i] @ db_codes.T)
        order = np.argsort(dist, kind=kind)
        hits = relevant[order][:topk]
        count = int(hits.sum())
        if count == 0:
            continue
        ranks = np.arange(1, count + 1)
        positions = np.nonzero(hits)[0] + 1.0
        total += float(np.mean(ranks / positions))
    return total / q_codes.shape[0]


def multi_hot(labels: torch.Tensor, classes: int, extra: float = 0.1, seed: int = 1) -> torch.Tensor:
    """Multi-hot rows (int64 [n, classes]): each item's class plus every other label with probability `extra` (as in
    the NUS-WIDE and MS COCO hashing sets, whose images carry a few of their 21 or 80 labels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.one_hot(labels, classes) | (torch.rand(len(labels), classes, generator=g) < extra).long()


def eager_ranking_metrics(q_codes: torch.Tensor, db_codes: torch.Tensor, q_labels: torch.Tensor,
                          db_labels: torch.Tensor, k: int, radius: int = 2, chunk: int = 250) -> dict:
    """The evaluation a hashing project writes in plain PyTorch, all at once from one sort: per chunk of queries,
    distances by a ±1 matmul, a stable sort of each row (ties to the smaller index), relevance and shared-label
    counts from the label rows (0/1 matmuls); mAP@k, P@k, NDCG@k (gain 2^shared - 1, the ideal from every item's
    shared labels sorted), precision within `radius`, and P@N, R@N for N = 1..k."""
    nbits = q_codes.shape[1]
    qf, dbf = q_codes.sign().float(), db_codes.sign().float()
    if q_labels.dim() == 1:
        classes = int(max(q_labels.max(), db_labels.max())) + 1
        q_labels, db_labels = (torch.nn.functional.one_hot(x, classes) for x in (q_labels, db_labels))
    ql, dl = q_labels.float(), db_labels.float()
    positions = torch.arange(1, k + 1, dtype=torch.float64, device=q_codes.device)
    discounts = 1.0 / torch.log2(positions + 1)
    sums = {"ap": 0.0, "hits": 0, "ndcg": 0.0, "radius": 0.0}
    precision, recall, with_relevant = torch.zeros_like(positions), torch.zeros_like(positions), 0
    for q0 in range(0, len(qf), chunk):
        dist = 0.5 * (nbits - qf[q0 : q0 + chunk] @ dbf.T)
        order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
        shared = ql[q0 : q0 + chunk] @ dl.T
        ranked = torch.gather(shared, 1, order).double()
        rel = (ranked > 0).double()
        cum = rel.cumsum(1)
        found = cum[:, -1]
        sums["ap"] += float(torch.where(found > 0, (cum / positions * rel).sum(1) / found.clamp(min=1), 0).sum())
        sums["hits"] += int(found.sum())
        ideal = ((2 ** shared.topk(k, dim=1).values.double() - 1) * discounts).sum(1)
        dcg = ((2**ranked - 1) * discounts).sum(1)
        sums["ndcg"] += float(torch.where(ideal > 0, dcg / ideal.clamp(min=1e-300), 0).sum())
        inside = dist <= radius
        hits_inside = (inside & (shared > 0)).sum(1).double()
        count_inside = inside.sum(1).double()
        sums["radius"] += float(torch.where(count_inside > 0, hits_inside / count_inside.clamp(min=1), 0).sum())
        relevant = (shared > 0).sum(1).double()
        precision += (cum / positions).sum(0)
        recall += (cum[relevant > 0] / relevant[relevant > 0, None]).sum(0)
        with_relevant += int((relevant > 0).sum())
    q = len(qf)
    return {"map": sums["ap"] / q, f"precision_at_{k}": sums["hits"] / (k * q), f"ndcg_at_{k}": sums["ndcg"] / q,
            f"precision_within_radius_{radius}": sums["radius"] / q, "precision": precision / q,
            "recall": recall / max(with_relevant, 1)}


def augment_case(channels: int, size: int, batch: int, seed: int = 0):
    """A uint8 image batch and the two ways of making its two training views, each a function of no arguments:
    torchvision's transforms image by image (a data loader's work for one batch) and BatchAugment on a copy of the
    batch on `device` (returned by `batched(device)`)."""
    from brcd.augment import BatchAugment
    from brcd.data import TwoViewDataset, two_view_transform

    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, channels, size, size), generator=gen, dtype=torch.uint8)
    dataset = TwoViewDataset(images, two_view_transform(size, channels))
    augment = BatchAugment(size, channels)

    def per_image():
        views = [dataset[i] for i in range(batch)]
        return torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])

    def batched(device: str = "cpu"):
        on = images.to(device)
        return lambda: (augment(on, gen), augment(on, gen))

    return per_image, batched

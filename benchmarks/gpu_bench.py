"""GPU benchmarks: fused Hamming top-k against PyTorch (±1 matmul + torch.topk), the fused contrastive loss
(forward + backward) against the eager PyTorch reference, and the two-view augmentation of a training batch on the GPU
against torchvision's per-image transforms on one CPU core. Prints Markdown tables and writes them to --out.

Run by scripts/gpu_check.sh on the lent GPU machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import brcd  # noqa: E402
from brcd import reference as ref  # noqa: E402
from cases import augment_case, fused_loss, loss_case, loss_step  # noqa: E402
from common import git_revision, machine, table, time_cpu, time_cuda  # noqa: E402


def popc_pairs_limit(nbits: int) -> float:
    """Pairs/s one distance pass could reach if popcount issue were the only limit (16 popc/clk/SM)."""
    p = torch.cuda.get_device_properties(0)
    clock_hz = getattr(p, "clock_rate", 1_980_000) * 1e3
    words32 = (nbits + 31) // 32
    return p.multi_processor_count * 16 * clock_hz / words32


def tensor_core_pairs_limit(nbits: int) -> float:
    """Pairs/s at the int8 dense tensor-core rate of the H100/H200 datasheet (1979 TOPS): 2 ops per bit of a pair,
    bits rounded up to whole 64-bit words as the kernel computes them."""
    return 1979e12 / (2 * 64 * ((nbits + 63) // 64))


def torch_topk(q_pm1: torch.Tensor, db_pm1_t: torch.Tensor, k: int, chunk: int = 1000):
    """The PyTorch baseline: ±1 codes in fp16, dot products on tensor cores, then topk of the largest dots."""
    out_d, out_i = [], []
    nbits = q_pm1.shape[1]
    for q0 in range(0, q_pm1.shape[0], chunk):
        dots = q_pm1[q0 : q0 + chunk] @ db_pm1_t
        v, i = torch.topk(dots, k, dim=1)
        out_d.append(((nbits - v.float()) / 2).to(torch.int32))
        out_i.append(i)
    return torch.cat(out_d), torch.cat(out_i)


def bench_topk(q_count: int, n: int, nbits: int, ks) -> list:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(q_count, nbits, device="cuda", generator=gen)
    db = torch.randn(n, nbits, device="cuda", generator=gen)
    qp, dp = brcd.pack_codes(q), brcd.pack_codes(db)
    q16, db16t = q.sign().half(), db.sign().half().t().contiguous()
    rows = []
    for k in ks:
        t_brcd = time_cuda(lambda: brcd.hamming_topk(qp, dp, k), repeat=5, warmup=2)
        t_torch = time_cuda(lambda: torch_topk(q16, db16t, k), repeat=3, warmup=1)
        # Exact against the distance-matrix kernel (popcount, another code path) sorted by (distance, index) for 20
        # queries, and the same distances as the baseline for 200 (torch.topk does not order ties by index).
        d, i = brcd.hamming_topk(qp[:20], dp, k)
        full = brcd.hamming_distance(qp[:20], dp).long()
        order = torch.argsort(full * n + torch.arange(n, device="cuda"), dim=1)[:, :k]
        exact = bool(torch.equal(i, order) and torch.equal(d.long(), torch.gather(full, 1, order)))
        d, _ = brcd.hamming_topk(qp[:200], dp, k)
        d_ref, _ = torch_topk(q16[:200], db16t, k)
        same = bool(torch.equal(d, d_ref.sort(dim=1).values))
        pairs = q_count * n
        rows.append([f"{nbits}", f"{q_count}x{n:,}", k, t_brcd * 1e3, t_torch * 1e3, t_torch / t_brcd,
                     pairs / t_brcd / 1e9, popc_pairs_limit(nbits) / 1e9, tensor_core_pairs_limit(nbits) / 1e9,
                     "yes" if exact else "NO", "yes" if same else "NO"])
    return rows


def topk_table(rows: list) -> str:
    return table(["bits", "queries x db", "k", "brcd ms", "torch fp16 matmul+topk ms", "speed-up",
                  "brcd G pairs/s", "popc limit G pairs/s", "int8 tensor-core limit G pairs/s", "exact (20 queries)",
                  "same distances as torch (200)"],
                 rows)


def bench_loss(sizes, K: int, eager_max: int) -> str:
    rows = []
    props = torch.cuda.get_device_properties(0)
    for B in sizes:
        s, ta, tv, kw = loss_case(B, K, seed=B, device="cuda")
        fused = loss_step(fused_loss, s, ta, tv, kw)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        # Steps under a millisecond vary from call to call with the host: a median over more of them.
        repeat = 50 if B <= 1024 else (5 if B < 100_000 else 1)
        warmup = 2 if B < 100_000 else 0
        t_fused = time_cuda(fused, repeat=repeat, warmup=warmup)
        peak_fused = (torch.cuda.max_memory_allocated() - base) / 2**20
        # The default call: alpha's range checked, its answer read back (a device synchronisation per step).
        t_checked = time_cuda(loss_step(brcd.brcd_loss, s, ta, tv, kw), repeat=repeat, warmup=warmup)
        # The distillation step as the trainer runs it: the teacher's codes frozen.
        t_student = time_cuda(loss_step(fused_loss, s, ta, tv, kw, view_grad=False), repeat=repeat, warmup=warmup)
        # fwd: 2(2B)^2 K; bwd: recompute the same products plus the weighted sum of rows: 4(2B)^2 K.
        flops = 6 * (2 * B) ** 2 * K
        if B <= eager_max:
            eager = loss_step(ref.brcd_loss, s, ta, tv, kw)
            torch.cuda.reset_peak_memory_stats()
            t_eager = time_cuda(eager, repeat=repeat, warmup=2)
            peak_eager = (torch.cuda.max_memory_allocated() - base) / 2**20
            # The values agree (float32 fused against float64 reference on the same inputs).
            want = ref.brcd_loss(s.double(), ta.double(), tv.double(),
                                 **{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                                    for k, v in kw.items()})
            got = brcd.brcd_loss(s, ta, tv, **kw)
            rel = abs(got.item() - want.item()) / abs(want.item())
            rows.append([B, K, t_fused * 1e3, t_eager * 1e3, t_eager / t_fused, peak_fused, peak_eager,
                         flops / t_fused / 1e12, f"{rel:.1e}", t_checked * 1e3, t_student * 1e3])
        else:
            rows.append([B, K, t_fused * 1e3, "-", "-", peak_fused, "-", flops / t_fused / 1e12, "-",
                         t_checked * 1e3, t_student * 1e3])
        del s, ta, tv, kw
        torch.cuda.empty_cache()
    note = (f"\nFLOP count: 6 (2B)^2 K per forward+backward (the tiled products; exps not counted). "
            f"{props.name}: fp32 non-tensor-core peak is about 67 TFLOP/s (H100 SXM datasheet). Every column but "
            f"the last has gradients for the student and the teacher's second view; the last is the distillation "
            f"step as the trainer runs it, where only the student needs a gradient. The fused columns run as the "
            f"eager reference does, without checking that the per-sample alpha lies in [0, 1] (check_alpha=False); "
            f"'alpha checked' is the default call, whose check reads its answer back: a device synchronisation per "
            f"step.")
    return table(["B", "K", "fused fwd+bwd ms", "eager fwd+bwd ms", "speed-up", "fused peak MiB",
                  "eager peak MiB", "fused TFLOP/s", "rel. err vs fp64", "fused ms, alpha checked",
                  "fused ms, student grad only"], rows) + note


def bench_augment(cases) -> str:
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # a data-loader worker's share: one core
    for channels, size, batch in cases:
        per_image, batched = augment_case(channels, size, batch)
        t_gpu = time_cuda(batched("cuda"), repeat=20, warmup=3)
        t_cpu = time_cpu(per_image, repeat=1, warmup=0)
        rows.append([f"{channels}x{size}x{size}", batch, t_gpu * 1e3, t_cpu * 1e3, t_cpu / t_gpu])
    torch.set_num_threads(threads)
    return table(["images", "batch", "BatchAugment on the GPU ms", "torchvision image by image, one core ms",
                  "loader processes to keep pace"], rows) + (
        "\n\nBoth views of a batch of uint8 images as model input: BatchAugment on the GPU, the images already there (the "
        "choices drawn on the host and copied, pinned, per view; `brcd --augment batch`, the default on a GPU) "
        "against torchvision's transforms image by image on one core (a data-loader worker's work for the batch). "
        "The last column is how many loader processes would make the views as fast.")


def loss_breakdown(B: int, K: int) -> str:
    """Where one forward + backward of the fused loss spends its time: the profiler's table of device kernels and
    host-side operators."""
    from torch.profiler import ProfilerActivity, profile

    s, ta, tv, kw = loss_case(B, K, seed=B, device="cuda")
    run = loss_step(fused_loss, s, ta, tv, kw)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    return (f"B = {B}, K = {K}, 5 calls:\n```\n"
            + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=48)
            + "\n```\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                                     max_name_column_width=48) + "\n```")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("out/gpu"))
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--only", choices=["topk", "loss", "augment"], help="run one of the benchmarks")
    ap.add_argument("--breakdown", action="store_true", help="also profile one loss step at B = 64 and 8192")
    ap.add_argument("--loss-sizes", type=int, nargs="+", metavar="B",
                    help="batch sizes of the loss benchmark (default: 64 1024 8192 65536 262144; an A/B of two "
                         "builds in one call fits its time with 64 1024 8192)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    head = f"GPU benchmarks, brcd {git_revision()}, {machine('cuda')}\n"
    print(head, flush=True)
    text = head
    if args.only in (None, "topk"):
        if args.quick:
            topk = topk_table(bench_topk(1000, 100_000, 64, [10, 1000]))
        else:
            topk = topk_table(bench_topk(10_000, 1_000_000, 64, [10, 1000])
                              + bench_topk(10_000, 1_000_000, 256, [10, 1000]))
        print(topk, flush=True)
        text += f"\n## Hamming top-k\n\n{topk}\n"
    if args.only in (None, "loss"):
        if args.loss_sizes:
            loss = bench_loss(args.loss_sizes, 64, eager_max=8192)
        elif args.quick:
            loss = bench_loss([64, 1024], 64, eager_max=1024)
        else:
            loss = bench_loss([64, 1024, 8192, 65536, 262144], 64, eager_max=8192)
        print(loss, flush=True)
        text += f"\n## Contrastive loss, forward + backward\n\n{loss}\n"
    if args.only in (None, "augment"):
        augment = bench_augment([(3, 32, 128)] if args.quick else [(1, 28, 128), (3, 32, 128), (3, 32, 512),
                                                                    (3, 224, 128)])
        print(augment, flush=True)
        text += f"\n## Two-view augmentation of a training batch\n\n{augment}\n"
    if args.breakdown:
        parts = [loss_breakdown(B, 64) for B in (64, 8192)]
        (args.out / "loss_breakdown.md").write_text("\n\n".join(parts) + "\n")
        print("\n\n".join(parts), flush=True)
    (args.out / "gpu_bench.md").write_text(text)


if __name__ == "__main__":
    main()

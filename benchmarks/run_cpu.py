"""CPU benchmarks, printed as Markdown tables and written to docs/benchmarks-cpu.md.

  topk  brcd.hamming_topk against faiss IndexBinaryFlat (same data, same threads): N = 1,000,000, Q = 1,000,
        64 and 256 bits, k = 10 and 1000.
  range brcd.hamming_range_search against faiss IndexBinaryFlat.range_search: N = 1,000,000, Q = 1,000, 64 and
        256 bits, radii for about 10 and 1000 results per query.
  mih   brcd.MultiIndexHashing against the linear scans: 1,000 queries over 1,000,000 64-bit codes (random and
        clustered), radii 2, 4, 8 and k = 1, 10.
  map   brcd mAP@1000 (5,000 queries over 50,000 codes) against the original evaluation loop (one NumPy argsort
        per query).
  metrics  the other metrics of a ranking (NDCG@1000, P@N and R@N curves, and retrieval_scores: mAP, P@K, NDCG@K and
        precision within a radius at once), class ids and multi-hot labels, against plain PyTorch (one sort).
  loss  fused BRCD loss forward + backward against the eager PyTorch reference and torch.compile of it, with the
        peak extra memory of each (measured in a fresh process per case).
  augment  the two training views of a batch: brcd.augment.BatchAugment (the whole batch at once) against
        torchvision's transforms image by image (the data loader's work).

Usage: python benchmarks/run_cpu.py [--only topk range mih map metrics loss augment] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import brcd  # noqa: E402
from brcd import metrics  # noqa: E402
from brcd.index import atomic_write_bytes  # noqa: E402
from brcd import reference as ref  # noqa: E402
from cases import (augment_case, eager_ranking_metrics, fused_loss, loss_case, loss_step, map_case,  # noqa: E402
                   multi_hot, one_hot, original_map)
from common import git_revision, machine, table, time_cpu  # noqa: E402


# ------------------------------------------------------------------------------------------------- top-k
def bench_topk(n: int, q_count: int, bit_list, ks, small_queries=(1, 10)) -> str:
    """The batch rows (q_count queries, each k) and, at k = 10, the latency of small query batches (online search:
    per call, the database re-laid for the scan is part of brcd's time)."""
    import faiss

    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    rows = []
    rng = np.random.default_rng(0)
    for nbits in bit_list:
        db = torch.from_numpy(rng.integers(0, 256, size=(n, nbits // 8), dtype=np.uint8))
        index = faiss.IndexBinaryFlat(nbits)
        index.add(db.numpy())
        cases = [(q_count, k) for k in ks] + [(qc, 10) for qc in small_queries]
        for qc, k in cases:
            q = torch.from_numpy(rng.integers(0, 256, size=(qc, nbits // 8), dtype=np.uint8))
            repeat = 3 if qc >= 100 else 30
            # Each library's OpenMP threads spin for a while after its last parallel region: a pause between the
            # two keeps one from timing against the other's idle spinning.
            time.sleep(0.5)
            t_faiss = time_cpu(lambda: index.search(q.numpy(), k), repeat=repeat)
            time.sleep(0.5)
            t_brcd = time_cpu(lambda: brcd.hamming_topk(q, db, k), repeat=repeat)
            d_faiss, _ = index.search(q.numpy(), k)
            d_brcd, _ = brcd.hamming_topk(q, db, k)
            same = np.array_equal(d_faiss, d_brcd.numpy())
            pairs = n * qc
            rows.append([nbits, f"{qc}x{n:,}", k, t_brcd, t_faiss, t_faiss / t_brcd, pairs / t_brcd / 1e9,
                         pairs / t_faiss / 1e9, "yes" if same else "NO"])
            print(rows[-1], flush=True)
    return table(["bits", "queries x db", "k", "brcd s", "faiss s", "speed-up", "brcd G pairs/s", "faiss G pairs/s",
                  "same distances"], rows) + (
        f"\n\nBoth on {threads} threads; faiss-cpu {faiss.__version__}. Times are medians (3 runs for the batches of "
        "1000 queries, 30 for the small batches).")


# ------------------------------------------------------------------------------------------------- range search
def same_balls(lims, dist, idx, ours) -> bool:
    """faiss's range results (each query's in database order) hold the codes ours do, in (distance, index) order."""
    if not np.array_equal(lims, ours[0].numpy()):
        return False
    for i in range(len(lims) - 1):
        a, b = lims[i], lims[i + 1]
        order = np.lexsort((idx[a:b], dist[a:b]))
        if not (np.array_equal(dist[a:b][order], ours[1][a:b].numpy())
                and np.array_equal(idx[a:b][order], ours[2][a:b].numpy())):
            return False
    return True


def bench_range(n: int, q_count: int, cases, small_queries=(1, 10)) -> str:
    """brcd.hamming_range_search (distance <= r) against faiss IndexBinaryFlat.range_search (distance < r + 1) on
    uniformly random codes; radii chosen for about 10 and about 1000 results per query of a million codes."""
    import faiss

    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    rows = []
    rng = np.random.default_rng(0)
    for nbits, radii in cases:
        db = torch.from_numpy(rng.integers(0, 256, size=(n, nbits // 8), dtype=np.uint8))
        index = faiss.IndexBinaryFlat(nbits)
        index.add(db.numpy())
        for qc in (q_count, *small_queries):
            q = torch.from_numpy(rng.integers(0, 256, size=(qc, nbits // 8), dtype=np.uint8))
            repeat = 3 if qc >= 100 else 30
            for r in radii:
                time.sleep(0.5)  # as in bench_topk: neither library timed against the other's spinning threads
                t_faiss = time_cpu(lambda: index.range_search(q.numpy(), r + 1), repeat=repeat)
                time.sleep(0.5)
                t_brcd = time_cpu(lambda: brcd.hamming_range_search(q, db, r), repeat=repeat)
                ours = brcd.hamming_range_search(q, db, r)
                same = same_balls(*index.range_search(q.numpy(), r + 1), ours)
                rows.append([nbits, f"{qc}x{n:,}", r, int(ours[0][-1]) / qc, t_brcd, t_faiss, t_faiss / t_brcd,
                             n * qc / t_brcd / 1e9, "yes" if same else "NO"])
                print(rows[-1], flush=True)
    return table(["bits", "queries x db", "radius", "results per query", "brcd s", "faiss s", "speed-up",
                  "brcd G pairs/s", "same results"], rows) + (
        f"\n\nBoth on {threads} threads; faiss-cpu {faiss.__version__}, whose radius is exclusive (`range_search(x, "
        "r + 1)` is brcd's radius r). Times are medians (3 runs for the batches of 1000 queries, 30 for the small "
        "batches); brcd's include ordering each query's results by (distance, index), faiss's leave them in database "
        "order.")


# ------------------------------------------------------------------------------------------------- multi-index
def bench_multi_index(n: int, q_count: int) -> str:
    """brcd.MultiIndexHashing against the linear scans it falls back to (hamming_range_search, hamming_topk), on
    uniformly random 64-bit codes and on codes near 10,000 centres (5 % of bits flipped), as learned codes cluster."""
    from brcd.multi_index import MultiIndexHashing

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10_000, 64, generator=g).sign()

    def clustered(m):
        pick = torch.randint(0, centres.shape[0], (m,), generator=g)
        return brcd.pack_codes(centres[pick] * torch.where(torch.rand(m, 64, generator=g) < 0.05, -1.0, 1.0))

    random = lambda m: brcd.pack_codes(torch.randn(m, 64, generator=g))
    rows = []
    for name, draw in (("random", random), ("clustered", clustered)):
        db, q = draw(n), draw(q_count)
        t0 = time.perf_counter()
        mih = MultiIndexHashing(db, 64)
        build = time.perf_counter() - t0
        cases = [("radius", r, lambda r=r: mih.range_search(q, r), lambda r=r: brcd.hamming_range_search(q, db, r))
                 for r in (2, 4, 8)]
        cases += [("k", k, lambda k=k: mih.search(q, k), lambda k=k: brcd.hamming_topk(q, db, k)) for k in (1, 10)]
        for kind, value, by_lookup, by_scan in cases:
            same = all(torch.equal(a, b) for a, b in zip(by_lookup(), by_scan()))
            t_mih, t_scan = time_cpu(by_lookup, repeat=5), time_cpu(by_scan, repeat=5)
            per_query = ""
            if kind == "radius":
                per_query = f"{int(by_scan()[0][-1]) / q_count:.3g}"
            rows.append([name, f"{q_count}x{n:,}", mih.substrings, f"{kind} {value}", per_query, t_mih, t_scan,
                         t_scan / t_mih, "yes" if same else "NO"])
            print(rows[-1], flush=True)
        rows[-1 - len(cases) + 1][2] = f"{mih.substrings} (built in {build:.2f} s)"
    return table(["codes", "queries x db", "substrings", "search", "results per query", "multi-index s", "scan s",
                  "speed-up", "same results"], rows) + (
        "\n\nThe scan: hamming_range_search for a radius, hamming_topk for k. Times are medians of 5 runs.")


# ------------------------------------------------------------------------------------------------- mAP
def bench_map(q_count: int, n: int, nbits: int = 64, topk: int = 1000, classes: int = 10) -> str:
    qc, dc, ql, dl = map_case(q_count, n, nbits, classes)
    t_brcd = time_cpu(lambda: metrics.mean_average_precision(qc, dc, ql, dl, topk), repeat=3)
    m_brcd = metrics.mean_average_precision(qc, dc, ql, dl, topk)
    args = (qc.numpy(), dc.numpy(), one_hot(ql, classes), one_hot(dl, classes), topk)
    t0 = time.perf_counter()
    m_orig = original_map(*args)
    t_orig = time.perf_counter() - t0
    m_stable = original_map(*args, kind="stable")
    rows = [[f"{q_count}x{n:,}", nbits, topk, t_brcd, t_orig, t_orig / t_brcd, t_orig / q_count * 1e3,
             f"{m_brcd:.12f}", f"{m_stable:.12f}", f"{m_orig:.12f}"]]
    return table(["queries x db", "bits", "K", "brcd s", "original loop s", "speed-up", "original ms/query",
                  "brcd mAP", "original loop, stable sort", "original loop, its unstable argsort"], rows) + (
        "\n\nThe spec breaks ties by the smaller database index: the original loop with a stable sort gives the same "
        "value; with its default unstable argsort the value depends on tie order.")


def bench_metrics(q_count: int, n: int, nbits: int = 64, k: int = 1000, radius: int = 20) -> str:
    qc, dc, ql, dl = map_case(q_count, n, nbits, 10)
    rows = []
    for kind, (q_labels, db_labels) in (("class ids (10)", (ql, dl)),
                                        ("multi-hot (21)", (multi_hot(ql, 21, seed=1), multi_hot(dl, 21, seed=2)))):
        on = (qc, dc, q_labels, db_labels)
        t0 = time.perf_counter()
        eager = eager_ranking_metrics(*on, k, radius)
        t_eager = time.perf_counter() - t0
        scores = metrics.retrieval_scores(*on, topk=k, radius=radius)
        curves = metrics.precision_recall_at_k(*on, max_k=k)
        gap = max([abs(scores[key] - eager[key]) for key in scores] +
                  [float((curves[key] - eager[key]).abs().max()) for key in ("precision", "recall")])
        timed = {"ndcg_at_k": lambda: metrics.ndcg_at_k(*on, k),
                 "precision_recall_at_k": lambda: metrics.precision_recall_at_k(*on, max_k=k),
                 "retrieval_scores": lambda: metrics.retrieval_scores(*on, topk=k, radius=radius)}
        times = {name: time_cpu(fn, repeat=3) for name, fn in timed.items()}
        both = times["retrieval_scores"] + times["precision_recall_at_k"]
        rows.append([kind, f"{q_count:,}x{n:,}", t_eager, times["ndcg_at_k"], times["precision_recall_at_k"],
                     times["retrieval_scores"], both, t_eager / both, f"{gap:.1e}"])
    return table(["labels", "queries x db", "plain PyTorch s (all)", "brcd ndcg_at_k s", "brcd precision_recall_at_k s",
                  "brcd retrieval_scores s", "brcd both s", "speed-up", "largest difference"], rows) + (
        f"\n\n{nbits}-bit codes, K = {k}, radius {radius}. Plain PyTorch computes everything from one stable sort of "
        "each chunk's ±1-matmul distances (cases.eager_ranking_metrics); brcd's retrieval_scores gives mAP@K, P@K, "
        "NDCG@K and precision within the radius, precision_recall_at_k the P@N and R@N curves; both together do what "
        "the plain loop does. The largest difference is over every score and every point of the curves.")


# ------------------------------------------------------------------------------------------------- augmentation
AUGMENT_IMAGES = ((1, 28, "Fashion-MNIST size"), (3, 32, "CIFAR-10 size"))


def bench_augment(batches) -> str:
    rows = []
    for channels, size, what in AUGMENT_IMAGES:
        for batch in batches:
            per_image, batched = augment_case(channels, size, batch)
            t_loader = time_cpu(per_image, repeat=5)
            t_batch = time_cpu(batched("cpu"), repeat=5)
            rows.append([f"{channels}x{size}x{size} ({what})", batch, t_loader * 1e3, t_batch * 1e3,
                         t_loader / t_batch])
    return table(["images", "batch", "torchvision image by image ms", "BatchAugment ms", "speed-up"], rows) + (
        "\n\nBoth views of a batch of uint8 images, as model input (medians of 5). Image by image is what the data "
        "loader does for one batch (in the training process, or in each worker process); BatchAugment draws the same "
        "law for the whole batch at once (`brcd --augment batch`).")


# ------------------------------------------------------------------------------------------------- loss
class PeakRss:
    """Samples this process's resident memory every millisecond on a thread: the peak over a region."""

    def __init__(self):
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.001)

    def __enter__(self):
        self.start = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def loss_worker(B: int, impl: str, repeat: int) -> dict:
    """Runs in a fresh process: time of forward + backward and the peak resident memory it added."""
    s, ta, tv, kw = loss_case(B)
    # fused-student: the distillation step, where the teacher's codes are frozen and only the student needs a gradient.
    fn = {"fused": fused_loss, "fused-student": fused_loss, "eager": ref.brcd_loss}.get(impl)
    view_grad = impl != "fused-student"
    compile_s = 0.0
    if impl == "compile":
        fn = torch.compile(ref.brcd_loss)

    step = loss_step(fn, s, ta, tv, kw, view_grad)

    with PeakRss() as mem:
        t0 = time.perf_counter()
        step()  # warm-up (and compilation)
        first = time.perf_counter() - t0
    if impl == "compile":
        compile_s = first
        with PeakRss() as mem:  # the compiled step's own memory, not the compiler's
            step()
    if repeat:
        # Steps of a fraction of a millisecond are timed in runs of about 50 ms (the same for every implementation):
        # one step alone is at the mercy of the clock and of the scheduler.
        t0 = time.perf_counter()
        step()
        inner = int(min(1000, max(1, 0.05 / (time.perf_counter() - t0))))
        t = time_cpu(lambda: [step() for _ in range(inner)], repeat=repeat, warmup=0) / inner
    else:
        t = first
    return {"seconds": t, "peak_mib": (mem.peak - mem.start) / 2**20, "compile_s": compile_s}


def run_worker(B: int, impl: str, repeat: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--loss-worker", str(B), impl, str(repeat)], capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(B: int, impls, reps: int, rounds: int) -> dict:
    """Each implementation's worker, run in `rounds` alternating rounds: this VM's speed drifts by 10 to 20 % over
    minutes, and a drift that hit one implementation's only run would skew its ratio. Per implementation: the round
    with the median time, plus every round's time."""
    runs = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            runs[impl].append(run_worker(B, impl, reps))
    out = {}
    for impl, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[impl] = rs[0]
            continue
        ok.sort(key=lambda r: r["seconds"])
        out[impl] = dict(ok[len(ok) // 2], rounds=[r["seconds"] for r in rs if "error" not in r])
    return out


def bench_loss(sizes, eager_max: int, compile_max: int, rounds: int = 3) -> str:
    rows = []
    fmt = lambda r, key, scale=1.0: r[key] * scale if "error" not in r else r["error"]
    for B in sizes:
        reps = 5 if B <= 1024 else (2 if B <= 8192 else 0)
        slow = B >= 4096  # one round, one timed step for the baselines there: seconds each
        impls = ["fused", "fused-student"] + (["eager"] if B <= eager_max else []) + \
            (["compile"] if B <= compile_max else [])
        if slow:
            res = {impl: run_worker(B, impl, reps if impl.startswith("fused") else 1) for impl in impls}
        else:
            res = interleaved(B, impls, reps, rounds)
        fused, student_only = res["fused"], res["fused-student"]
        eager, comp = res.get("eager"), res.get("compile")
        ratio = lambda other: (other["seconds"] / fused["seconds"]) if other and "error" not in other else "-"

        def spread(other):
            # The ratio of each round's times: its smallest and largest.
            if not other or "rounds" not in other or "rounds" not in fused:
                return "-"
            rs = [o / f for o, f in zip(other["rounds"], fused["rounds"])]
            return f"{min(rs):.2f} to {max(rs):.2f}"

        rows.append([B, 64, fmt(fused, "seconds", 1e3),
                     fmt(eager, "seconds", 1e3) if eager else "-", ratio(eager), spread(eager),
                     fmt(comp, "seconds", 1e3) if comp else "-", ratio(comp), spread(comp),
                     fmt(fused, "peak_mib"), fmt(eager, "peak_mib") if eager else "-",
                     fmt(comp, "peak_mib") if comp else "-", fmt(comp, "compile_s") if comp else "-",
                     fmt(student_only, "seconds", 1e3)])
        print(rows[-1], flush=True)
    return table(["B", "K", "fused ms", "eager ms", "speed-up vs eager", "per round", "torch.compile ms",
                  "speed-up vs compile", "per round", "fused peak MiB", "eager peak MiB", "compile peak MiB",
                  "compile first call s", "fused ms, student grad only"], rows) + (
        "\n\nForward + backward of the full BRCD loss (bit mask, false-negative groups from 10 clusters, per-sample "
        "alpha), float32, with gradients for the student and the teacher's second view (as every column compares); "
        "the last column is the distillation step, where only the student needs a gradient. Up to B = 1024 every "
        f"implementation runs in {rounds} alternating rounds (a fresh process each): the times are the median "
        "round's, and \"per round\" gives the smallest and largest ratio of one round's times. Peak MiB: the highest "
        "resident memory during one step minus the memory before it, sampled "
        "every millisecond in a fresh process per case (inputs excluded). The first call of torch.compile "
        "includes its compilation, from a warm inductor cache after the first benchmark run.")


SECTIONS = {  # name -> (quick) -> the section's tables
    "topk": lambda quick: bench_topk(*((100_000, 100) if quick else (1_000_000, 1000)), [64, 256], [10, 1000]),
    "range": lambda quick: bench_range(*((100_000, 100) if quick else (1_000_000, 1000)),
                                       [(64, (15, 19)), (256, (94, 103))]),
    "mih": lambda quick: bench_multi_index(*((100_000, 100) if quick else (1_000_000, 1000))),
    "map": lambda quick: bench_map(*((500, 5000) if quick else (5000, 50_000))),
    "metrics": lambda quick: bench_metrics(*((500, 5000) if quick else (5000, 50_000))),
    "loss": lambda quick: bench_loss([64, 1024] if quick else [64, 1024, 4096, 8192, 65536], eager_max=8192,
                                     compile_max=8192),
    "augment": lambda quick: bench_augment([32] if quick else [128, 512]),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the script)")
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks-cpu.md")
    ap.add_argument("--loss-worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loss_worker:
        B, impl, repeat = args.loss_worker
        print(json.dumps(loss_worker(int(B), impl, int(repeat))))
        return
    stamp = f"Measured at brcd {git_revision()} on {time.strftime('%Y-%m-%d')}: {machine('cpu')}."
    fresh = {}
    for section in args.only:
        body = SECTIONS[section](args.quick)
        fresh[SECTION_TITLES[section]] = f"{stamp}\n\n{body}"
        print(f"## {SECTION_TITLES[section]}\n\n{fresh[SECTION_TITLES[section]]}\n", flush=True)
    if not args.quick:  # the measured sections replace theirs in docs/; the others stay as they were measured
        old = args.out.read_text() if args.out.exists() else ""
        atomic_write_bytes(args.out, [merge_sections(old, fresh).encode()])


SECTION_TITLES = {
    "topk": "Hamming top-k against faiss IndexBinaryFlat",
    "range": "Hamming range search against faiss IndexBinaryFlat",
    "mih": "Multi-index hashing against the linear scans",
    "map": "mAP@1000 against the original evaluation loop",
    "metrics": "Other retrieval metrics against plain PyTorch",
    "loss": "BRCD loss, forward + backward",
    "augment": "Two-view augmentation of a training batch",
}
HEADER = ("# CPU benchmarks\n\nWritten by `./dev.sh bench` (benchmarks/run_cpu.py); `run_cpu.py --only SECTION ...` "
          "measures some sections again and keeps the others. Each section names its commit, day and machine.\n")


def merge_sections(old: str, fresh: dict) -> str:
    """The tables file: the fresh sections (title -> body) in place of their namesakes in `old`, every section in
    SECTION_TITLES' order (a section of `old` that is not measured again is kept as it is)."""
    bodies = {}
    for chunk in old.split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        bodies[title.strip()] = body.strip()
    bodies.update(fresh)
    ordered = [t for t in SECTION_TITLES.values() if t in bodies] + [t for t in bodies if t not in
                                                                     SECTION_TITLES.values()]
    return HEADER + "".join(f"\n## {title}\n\n{bodies[title]}\n" for title in ordered)


if __name__ == "__main__":
    main()

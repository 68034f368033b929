"""The brcd command.

`brcd demo` runs the whole chain on Fashion-MNIST (teacher, clusters, a student without KD and a BRCD student, both
search paradigms; --baselines adds students distilled with KD baselines) and writes DIR/report.md and DIR/metrics.json.
`brcd distill --kd rkd` trains one student with a baseline instead of BRCD; `brcd compare --kd brcd hinton --seeds
0 1 2` trains students with several objectives over several seeds and tabulates them. `brcd evaluate` tests a
checkpoint, `brcd encode` writes the database's codes to a HammingIndex file, and `brcd index` searches one (the k
nearest codes, or every code within `--radius`). `brcd score` scores any method's codes saved as files. `brcd info`
prints what the installation has (brcd's build, torch, the GPUs).

Errors in the input (missing or corrupt data, unknown model names, bad numbers) print one line on stderr and exit
with status 2; a failed run (a NaN loss) exits with status 1. No traceback.

The training subcommands (demo, train-teacher, distill, compare) also run data-parallel over several processes:
`torchrun --nproc-per-node N -m brcd distill ...` (one GPU per process with --device cuda; --batch-size is the whole
batch, shared out among them). The first process validates, tests and writes the run directory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from . import distributed, metrics
from ._ext import build_info, cuda_available
from .code_stats import code_statistics
from .comparison import summarise_seeds
from .clustering import GROUP_MODES
from .code_files import check_file_type, load_codes, load_labels, save_codes, save_labels, save_scores
from .data import DataFileError, load_cifar10, load_fashion_mnist, load_image_list, make_split, synthetic_data
from .checkpoint import CHECKPOINT_FORMATS, load_model
from .index import HammingIndex, IndexFileError, atomic_write_bytes
from .models import STUDENT_DEFAULT, TEACHER_DEFAULT, ModelError, build_model
from .objectives import DISTILLATION_OBJECTIVES, LABELS
from .train import (AUGMENTATIONS, BRCD_ABLATIONS, PRECISIONS, TrainConfig, TrainingError, ablation_run_name,
                    augmentation, check_loop_config, checkpoint_path, encode, fit_clusters, student_run_name,
                    throughput, train_student, train_teacher)


def _int_at_least(minimum: int, expected: str):
    """An argparse type: an integer >= minimum, else the parser's one-line error saying what was expected."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value}")
    return value


def _device(text: str) -> str:
    """An argparse type: a torch device that this machine has (so that a missing GPU is one line, not a traceback)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device torch can use")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return text


def _topk_or_all(text: str) -> Optional[int]:
    """An argparse type: a positive cutoff, or `all` (None: the whole database)."""
    return None if text == "all" else _int_at_least(1, "a positive integer or 'all'")(text)


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="a YAML file of this command's options (names as the flags, - or _); flags override it")


def _data_args(p: argparse.ArgumentParser) -> None:
    """The data and the split: the same defaults everywhere, so that every subcommand sees the demo's split."""
    _config_arg(p)
    p.add_argument("--dataset", choices=("fashion-mnist", "cifar10", "list"), default="fashion-mnist",
                   help="list: your own images, DATA_DIR/train.txt and test.txt with 'path 0 1 0 ...' lines "
                        "(multi-hot labels, as the NUS-WIDE and MS COCO lists)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the Fashion-MNIST idx files, CIFAR-10's python pickle folder, or the list files")
    p.add_argument("--image-size", type=_positive_int, default=32,
                   help="--dataset list: images are resized to this square size")
    p.add_argument("--synthetic", action="store_true", help="a tiny synthetic data set instead (for tests)")
    p.add_argument("--train-per-class", type=_positive_int, default=200)
    p.add_argument("--val-queries", type=_positive_int, default=500)
    p.add_argument("--test-queries", type=_positive_int, default=1000)
    p.add_argument("--database-size", type=_positive_int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="the run's seed, and the split's unless --split-seed is given")
    p.add_argument("--split-seed", type=int, default=None,
                   help="the seed of the data split alone (default: --seed): keep it and vary --seed to repeat a "
                        "training run on the same images")
    p.add_argument("--device", type=_device, default="cpu")


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=_positive_int, default=64, help="code length (a distilled student takes its "
                   "teacher's)")
    p.add_argument("--val-database", type=_positive_int, default=2000, help="database codes used for validation")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--topk", type=_positive_int, default=1000)
    p.add_argument("--val-every", type=_positive_int, default=1, help="validate every N epochs (and after the last)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--checkpoint-format", choices=CHECKPOINT_FORMATS, default="pt",
                   help="the best checkpoints as torch files (weights_only loadable) or safetensors")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out exactly where its last finished epoch left it")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the models' forward passes in training: fp32, or bf16 under torch.autocast (tensor cores on a "
                        "GPU); the losses compute in float32, validation and encoding run in float32")
    p.add_argument("--augment", choices=AUGMENTATIONS, default="auto",
                   help="where the two augmented views are made: 'batch', the whole batch at once on the training "
                        "device (no loader work per step); 'loader', torchvision image by image in the data loader "
                        "(--workers); 'auto' (default): batch on a GPU, loader on the CPU")
    p.add_argument("--workers", type=_nonnegative_int, default=None,
                   help="data-loader processes for the loader's augmentation (default: none on the CPU, where they "
                        "would take the training's cores, and with --augment batch; else half the cores, at most 8). "
                        "A run is reproducible for a given count")


def _distill_args(p: argparse.ArgumentParser) -> None:
    """The distillation's settings: the KD term's weight, then BRCD's own (the KD baselines have none of them)."""
    p.add_argument("--kd-weight", type=_nonnegative_float, default=1.0,
                   help="weight of the distillation term (BRCD or a baseline) beside the student's own CIBHash loss")
    p.add_argument("--clusters", type=_positive_int, default=20, help="k-means clusters of the teacher's codes (BRCD)")
    p.add_argument("--margin", type=float, default=0.1, help="bit-mask margin (BRCD)")
    p.add_argument("--group-mode", choices=GROUP_MODES, default="offset+fn",
                   help="BRCD's ablations: none (neither), fn (false negatives only), offset (offset positives only), "
                        "offset+fn (the full method)")
    p.add_argument("--no-mask", action="store_true", help="BRCD's ablation: no bit mask")


# The images of a split that brcd encode writes: the database, or the queries that brcd evaluate tests with.
ENCODED_PARTS = ("database", "test-queries")

# The KD baselines: every distillation objective but BRCD itself.
KD_BASELINES = tuple(name for name in DISTILLATION_OBJECTIVES if name != "brcd")
_BASELINES_HELP = ", ".join(f"{name} ({LABELS[name]})" for name in KD_BASELINES)


def _model_args(p: argparse.ArgumentParser, role: str) -> None:
    """--teacher / --student (a timm name) and --teacher-weights / --student-weights (local backbone weights)."""
    p.add_argument(f"--{role}", default=TEACHER_DEFAULT if role == "teacher" else STUDENT_DEFAULT,
                   help="any timm model name")
    p.add_argument(f"--{role}-weights", type=Path, default=None,
                   help=f"local pretrained backbone weights for the {role} (.pt, .safetensors or a brcd checkpoint)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brcd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"brcd {build_info()['version']}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="teacher, clusters, students without KD and with BRCD; report and metrics")
    demo.add_argument("--out", type=Path, required=True, help="run directory (created)")
    _data_args(demo)
    _training_args(demo)
    _model_args(demo, "teacher")
    _model_args(demo, "student")
    demo.add_argument("--teacher-epochs", type=_positive_int, default=8)
    demo.add_argument("--student-epochs", type=_positive_int, default=10)
    demo.add_argument("--baselines", nargs="*", choices=KD_BASELINES, default=[], metavar="KD",
                      help=f"also distil a student with each of these KD baselines: {_BASELINES_HELP}")
    _distill_args(demo)

    teach = sub.add_parser("train-teacher", help="train a teacher with CIBHash: OUT/teacher.pt")
    teach.add_argument("--out", type=Path, required=True, help="run directory (created)")
    _data_args(teach)
    _training_args(teach)
    _model_args(teach, "teacher")
    teach.add_argument("--epochs", type=_positive_int, default=8)

    distill = sub.add_parser("distill", help="train a student from a teacher checkpoint with BRCD (or without KD)")
    distill.add_argument("--out", type=Path, required=True, help="run directory (created)")
    distill.add_argument("--teacher-checkpoint", type=Path, required=True)
    _data_args(distill)
    _training_args(distill)
    _model_args(distill, "student")
    distill.add_argument("--epochs", type=_positive_int, default=10)
    kd = distill.add_mutually_exclusive_group()
    kd.add_argument("--kd", choices=DISTILLATION_OBJECTIVES, default="brcd",
                    help=f"the distillation objective: brcd (the default), or a KD baseline: {_BASELINES_HELP}")
    kd.add_argument("--no-kd", action="store_true", help="the baseline: the student alone, with CIBHash")
    _distill_args(distill)

    compare = sub.add_parser("compare", help="students distilled with several objectives, each over several seeds, "
                             "from one teacher checkpoint on one split: a table of test mAP means, ranges and seeds")
    compare.add_argument("--out", type=Path, required=True, help="run directory (created): seed<N>/ per seed")
    compare.add_argument("--teacher-checkpoint", type=Path, required=True)
    _data_args(compare)
    _training_args(compare)
    _model_args(compare, "student")
    compare.add_argument("--epochs", type=_positive_int, default=10)
    compare.add_argument("--kd", nargs="+", choices=DISTILLATION_OBJECTIVES, default=["brcd"], metavar="KD",
                         help="the objectives, each beside the student without KD: brcd (the default) and any KD "
                              f"baseline: {_BASELINES_HELP}")
    compare.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                         help="the students' seeds (default 0 1 2); the split is --split-seed's, by default the first "
                              "seed's, in every run")
    compare.add_argument("--ablations", nargs="*", choices=tuple(BRCD_ABLATIONS), default=[], metavar="PART",
                         help="also BRCD students with one part taken away: "
                              + ", ".join(f"{k} ({left})" for k, (_, left) in BRCD_ABLATIONS.items()))
    compare.set_defaults(seed=None)  # --seeds replaces it: refused if given (run_compare)
    _distill_args(compare)

    evaluate = sub.add_parser("evaluate", help="test a checkpoint: mAP@topk, precision@topk, NDCG@topk and precision "
                              "within a Hamming radius (both paradigms with a teacher checkpoint)")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--teacher-checkpoint", type=Path, default=None,
                          help="encode the database with this model too: the asymmetric paradigm")
    evaluate.add_argument("--topk", type=_positive_int, default=1000)
    evaluate.add_argument("--radius", type=_nonnegative_int, default=2,
                          help="the Hamming radius of the hash-lookup precision (default 2)")
    _data_args(evaluate)

    enc = sub.add_parser("encode", help="encode the database (or the test queries) into a HammingIndex file, or into "
                         "a code file for brcd score or other tools")
    enc.add_argument("--checkpoint", type=Path, required=True)
    enc.add_argument("--out", type=Path, required=True,
                     help="the file to write: .bhi (a HammingIndex), or .npy, .pt, .txt, .csv (±1 columns, one per "
                          "bit)")
    enc.add_argument("--part", choices=ENCODED_PARTS, default="database",
                     help="which images of the split (default database; test-queries: those brcd evaluate queries "
                          "with)")
    enc.add_argument("--labels-out", type=Path, default=None,
                     help="also write their labels (class ids, or multi-hot rows) to this .npy, .pt, .txt or .csv file")
    _data_args(enc)

    index = sub.add_parser("index", help="search a HammingIndex file with test images encoded by a checkpoint")
    index.add_argument("--index", type=Path, required=True)
    index.add_argument("--checkpoint", type=Path, required=True)
    index.add_argument("--queries", type=_positive_int, default=5, help="how many test images to search with")
    found = index.add_mutually_exclusive_group()
    found.add_argument("-k", type=_positive_int, default=10, help="the k nearest codes of each query (default 10)")
    found.add_argument("--radius", type=_nonnegative_int, default=None,
                       help="instead of the k nearest, every code within this Hamming distance (a hash lookup)")
    _data_args(index)

    score = sub.add_parser("score", help="score any method's codes from files: mAP@topk, precision@topk, NDCG@topk "
                           "and precision within a Hamming radius", description=_SCORE_DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_arg(score)
    score.add_argument("--query-codes", type=Path, required=True, help="the queries' codes (.npy, .pt, .txt, .csv)")
    score.add_argument("--db-codes", type=Path, required=True,
                       help="the database's codes (the same formats, or a HammingIndex file .bhi)")
    score.add_argument("--query-labels", type=Path, required=True, help="class ids [n] or multi-hot rows [n, C]")
    score.add_argument("--db-labels", type=Path, required=True)
    score.add_argument("--packed", action="store_true",
                       help="the code files hold bytes of packed bits (numpy.packbits, either bit order, or "
                            "brcd.pack_codes), not one column per bit")
    score.add_argument("--topk", type=_topk_or_all, default=1000,
                       help="the cutoff K of mAP@K, precision@K and NDCG@K (default 1000); 'all': the whole database")
    score.add_argument("--radius", type=_nonnegative_int, default=2,
                       help="the Hamming radius of the hash-lookup precision (default 2)")
    score.add_argument("--curves", type=Path, default=None,
                       help="also write to this JSON file the precision-recall curve of Hamming-ball retrieval (each "
                            "radius) and precision@N and recall@N up to topk")
    score.add_argument("--per-query", type=Path, default=None,
                       help="also write each query's AP@K to this .npy, .pt, .txt or .csv file (for paired tests "
                            "between methods on the same queries); their mean is the mAP printed")
    score.add_argument("--device", type=_device, default="cpu", help="where to rank (cpu, cuda)")

    sub.add_parser("info", help="what this installation has: brcd's build (CUDA kernels, the popcount path chosen for "
                                "this processor, OpenMP threads), torch, and the GPUs brcd can use")
    return parser


_SCORE_DESCRIPTION = """\
Score the codes of any hashing method, saved as files: a row per item, a column per bit (+-1, 0/1 or real values,
bit = value > 0) or, with --packed, bytes of packed bits. Labels: integer class ids (one per item) or 0/1 multi-hot
rows. An item is relevant to a query when they share a label; rankings are by Hamming distance, ties to the smaller
database index. Prints mAP@K, precision@K, NDCG@K and precision within --radius as JSON.

example:
  brcd score --query-codes q.npy --db-codes db.npy --query-labels q_labels.npy --db-labels db_labels.npy --topk 5000
"""


def _data_and_split(args):
    if args.synthetic:
        data = synthetic_data()
    elif args.dataset == "cifar10":
        if args.data_dir is None:
            raise ValueError("--dataset cifar10 needs --data-dir (the folder with data_batch_1..5 and test_batch)")
        data = load_cifar10(args.data_dir)
    elif args.dataset == "list":
        if args.data_dir is None:
            raise ValueError("--dataset list needs --data-dir (the folder with train.txt and test.txt)")
        data = load_image_list(args.data_dir, image_size=args.image_size,
                               progress=not getattr(args, "no_progress", False))
    else:
        data = load_fashion_mnist(args.data_dir)
    split = make_split(data.train_labels, data.test_labels, train_per_class=args.train_per_class,
                       val_queries=args.val_queries, test_queries=args.test_queries,
                       database_size=args.database_size, seed=_split_seed(args))
    return data, split


def _split_seed(args) -> int:
    return args.seed if args.split_seed is None else args.split_seed


def _paradigm_scores(paradigm: str, *on, topk: int, radius: int) -> dict:
    """metrics.retrieval_scores of (query codes, database codes, their labels), keyed "<score>_<paradigm>" as
    metrics.json and brcd evaluate name them."""
    return {f"{key}_{paradigm}": value for key, value in metrics.retrieval_scores(*on, topk, radius).items()}


def run_info(args) -> dict:
    """brcd's build, torch's version and the GPUs: what to paste into a bug report."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"brcd": build_info(), "torch": torch.__version__, "torch_cuda": torch.version.cuda, "gpus": gpus,
            "cuda_kernels_usable": cuda_available()}


def run_evaluate(args) -> dict:
    data, split = _data_and_split(args)
    model = load_model(args.checkpoint, args.device)
    queries, query_labels = data.test_images[split.test_queries], data.test_labels[split.test_queries]
    db, db_labels = data.train_images[split.database], data.train_labels[split.database]
    q = encode(model, queries, device=args.device, desc="encoding queries")

    scores = lambda db_codes, paradigm: _paradigm_scores(paradigm, q, db_codes, query_labels, db_labels,
                                                         topk=args.topk, radius=args.radius)

    results = scores(encode(model, db, device=args.device, desc="encoding the database"), "symmetric")
    if args.teacher_checkpoint is not None:
        teacher_db = encode(load_model(args.teacher_checkpoint, args.device), db, device=args.device,
                            desc="encoding the database (teacher)")
        results.update(scores(teacher_db, "asymmetric"))
    return results


def run_score(args) -> dict:
    """The retrieval metrics of code files (brcd.code_files), their curves where --curves names a file and each
    query's AP where --per-query does."""
    if args.per_query is not None:
        check_file_type(args.per_query, "--per-query")  # before the work
    queries = load_codes(args.query_codes, "--query-codes", packed=args.packed)
    database = load_codes(args.db_codes, "--db-codes", packed=args.packed)
    same_width = queries.packed.shape[1] == database.packed.shape[1] and (
        queries.nbits is None or database.nbits is None or queries.nbits == database.nbits)
    if not same_width:
        describe = lambda c: f"{c.nbits} bits" if c.nbits else f"{c.packed.shape[1]} bytes of packed bits"
        hint = "" if args.packed else " (files of packed bytes need --packed)"
        raise ValueError(f"--query-codes holds codes of {describe(queries)} but --db-codes of {describe(database)}"
                         + hint)
    query_labels = load_labels(args.query_labels, "--query-labels", rows=len(queries))
    db_labels = load_labels(args.db_labels, "--db-labels", rows=len(database))
    on = [t.to(args.device) for t in (queries.packed, database.packed, query_labels, db_labels)]
    scores = metrics.retrieval_scores(*on, topk=args.topk, radius=args.radius)
    k = len(database) if args.topk is None else min(args.topk, len(database))
    bits = queries.nbits or database.nbits
    if args.curves is not None:
        ball, top_n = metrics.precision_recall_curve(*on), metrics.precision_recall_at_k(*on, max_k=k)
        curves = {"hamming_ball": {key: ball[key].tolist() for key in ("radius", "precision", "recall")},
                  "top_n": {"n": top_n["k"].tolist(), "precision": top_n["precision"].tolist(),
                            "recall": top_n["recall"].tolist()}}
        atomic_write_bytes(args.curves, [json.dumps(curves).encode()])
    if args.per_query is not None:  # the same values as the printed mAP's, query by query
        save_scores(args.per_query, metrics.average_precisions(*on, topk=args.topk), "--per-query")
    width = {"bits": bits} if bits else {"code_bytes": queries.packed.shape[1]}
    return {"queries": len(queries), "database": len(database), **width, "topk": k, **scores}


def run_encode(args) -> dict:
    check_file_type(args.out, "--out", codes=True)  # before the work
    if args.labels_out is not None:
        check_file_type(args.labels_out, "--labels-out")
    data, split = _data_and_split(args)
    model = load_model(args.checkpoint, args.device)
    if args.part == "database":
        images, labels = data.train_images[split.database], data.train_labels[split.database]
    else:
        images, labels = data.test_images[split.test_queries], data.test_labels[split.test_queries]
    codes = encode(model, images, device=args.device, desc=f"encoding the {args.part.replace('-', ' ')}")
    save_codes(args.out, codes, "--out")
    written = {"codes_file": str(args.out), "part": args.part, "codes": len(codes), "bits": model.bits}
    if args.labels_out is not None:
        save_labels(args.labels_out, labels, "--labels-out")
        written["labels_file"] = str(args.labels_out)
    return written


def run_index(args) -> dict:
    data, split = _data_and_split(args)
    index = HammingIndex.load(args.index)
    model = load_model(args.checkpoint, args.device)
    if model.bits != index.nbits:
        raise ValueError(f"{args.checkpoint} makes {model.bits}-bit codes but {args.index} holds {index.nbits}-bit "
                         "ones")
    chosen = split.test_queries[: args.queries]
    codes = encode(model, data.test_images[chosen], device=args.device)
    if args.radius is not None:
        lims, dist, ids = index.range_search(codes, args.radius)
        bounds = lims.tolist()
        found = [(ids[a:b], dist[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        dist, ids = index.search(codes, min(args.k, len(index)))
        found = list(zip(ids, dist))
    return {"queries": [{"test_image": int(t), "ids": i.tolist(), "distances": d.tolist()}
                        for t, (i, d) in zip(chosen, found)]}


@dataclass
class _Run:
    """What every training subcommand prepares: data, split, validation sets, config, a logger."""
    args: argparse.Namespace
    out: Path
    data: object
    train_images: torch.Tensor
    val: tuple  # (queries, query labels, database, database labels)
    cfg: TrainConfig
    started: float

    def make(self, name: str, bits: int, weights=None):
        channels, size = self.train_images.shape[1], self.train_images.shape[-1]
        return build_model(name, bits, in_chans=channels, img_size=size, pretrained_path=weights).to(self.args.device)

    def log(self, msg: str) -> None:
        if distributed.is_main():
            print(f"[brcd {self.args.command} {time.time() - self.started:6.0f}s] {msg}", file=sys.stderr, flush=True)


def _workers(args) -> int:
    """--workers, or its default: none where the model trains on the CPU (workers would compete with it for the cores)
    or where the views are made on the device (--augment batch), else half the cores (of this process's share, under
    torchrun), at most 8 (in the training process, a GPU would wait for the loader's augmentation at every step)."""
    if args.workers is not None:
        return args.workers
    if torch.device(args.device).type == "cpu" or augmentation(args.augment, args.device) == "batch":
        return 0
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(1, (os.cpu_count() or 2) // 2 // processes_here))


def _prepare_run(args) -> _Run:
    started = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume and distributed.is_main():
        (out / "metrics.jsonl").unlink(missing_ok=True)
        for stale in out.glob("*.last.pt"):  # a fresh run must not resume from an older one by accident
            stale.unlink()
    torch.manual_seed(args.seed)
    data, split = _data_and_split(args)
    train_images = data.train_images[split.train]
    val_db = split.database[: args.val_database]
    val = (data.test_images[split.val_queries], data.test_labels[split.val_queries], data.train_images[val_db],
           data.train_labels[val_db])
    cfg = TrainConfig(bits=args.bits, batch_size=min(args.batch_size, len(train_images)),
                      kd_weight=getattr(args, "kd_weight", 1.0),
                      num_clusters=getattr(args, "clusters", 20), margin=getattr(args, "margin", 0.1),
                      group_mode=getattr(args, "group_mode", "offset+fn"), use_mask=not getattr(args, "no_mask", False),
                      topk=args.topk, val_every=args.val_every, seed=args.seed, device=args.device,
                      progress=not args.no_progress, resume=args.resume, checkpoint_format=args.checkpoint_format,
                      augment=args.augment, workers=_workers(args), precision=args.precision)
    check_loop_config(cfg)
    if distributed.is_main():
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        config["processes"] = distributed.world_size()
        atomic_write_bytes(out / "config.json", [json.dumps(config, indent=2).encode()])
    distributed.barrier()  # no process trains before the main one has cleared the directory of an older run
    return _Run(args, out, (data, split), train_images, val, cfg, started)


def _train_teacher(run: _Run, name: str, epochs: int, bits: int):
    run.log(f"teacher {name}: CIBHash on {len(run.train_images)} images")
    teacher = run.make(name, bits, run.args.teacher_weights)
    scores = train_teacher(teacher, run.train_images, *run.val, replace(run.cfg, bits=bits, epochs=epochs), run.out,
                           "teacher")
    return teacher, scores


def _train_students(run: _Run, teacher, name: str, epochs: int, kd=("brcd",), plain: bool = True,
                    ablation: Optional[str] = None):
    """The student without KD (plain) and one distilled with each objective of `kd`; returns {run name: (model, best
    validation scores)}, the run names "student_no_kd" and student_run_name(objective). With an `ablation` (one of
    BRCD_ABLATIONS; kd then BRCD alone), the BRCD student takes its settings and the run name ablation_run_name(...).
    train_student refuses an unknown objective before it trains."""
    cfg = replace(run.cfg, bits=teacher.bits, epochs=epochs)
    if ablation is not None:
        if tuple(kd) != ("brcd",):
            raise ValueError(f"an ablation is of BRCD alone, got the objectives {tuple(kd)}")
        cfg = replace(cfg, **BRCD_ABLATIONS[ablation][0])
    students = {}
    if plain:
        run.log(f"student {name} without KD")
        model = run.make(name, teacher.bits, run.args.student_weights)
        students["student_no_kd"] = (model, train_teacher(model, run.train_images, *run.val, cfg, run.out,
                                                          "student_no_kd"))
    clusters = None
    for objective in kd:
        if objective == "brcd":
            run.log(f"k-means ({cfg.num_clusters} clusters) and bit masks (margin {cfg.margin})")
            clusters = fit_clusters(teacher, run.train_images, cfg)
            run.log(f"student {name} with BRCD ({cfg.group_mode}, mask {'on' if cfg.use_mask else 'off'})")
        else:
            run.log(f"student {name} with {LABELS.get(objective, objective)}")
        model = run.make(name, teacher.bits, run.args.student_weights)
        run_name = student_run_name(objective) if ablation is None else ablation_run_name(ablation)
        students[run_name] = (model, train_student(model, teacher, clusters, run.train_images, *run.val,
                                                   replace(cfg, kd=objective), run.out, run_name))
    return students


def _final_test(run: _Run, teacher, students: dict):
    """Test scores of the teacher (symmetric) and of every student in both paradigms (metrics.retrieval_scores: mAP,
    precision and NDCG at topk, precision within radius 2; keys "<score>_<paradigm>"), the statistics of each model's
    database codes, their curves (precision-recall of Hamming-ball retrieval, and precision@N up to topk), and the
    encoding throughput of the teacher and of the (first) student. Returns (results, curves): curves[model] =
    {"ball": ..., "top_n": ...}."""
    args = run.args
    data, split = run.data
    db_images, db_labels = data.train_images[split.database], data.train_labels[split.database]
    test_q, test_ql = data.test_images[split.test_queries], data.test_labels[split.test_queries]
    run.log(f"test: {len(test_q)} queries over {len(db_images)} database codes, mAP@{args.topk}")
    enc = lambda model, images: encode(model, images, device=args.device, desc="encoding test sets",
                                       progress=not args.no_progress)
    # mAP@topk, P@topk, NDCG@topk and precision within Hamming radius 2 (the hash-lookup figure of hashing papers).
    scores = lambda q, db, paradigm: _paradigm_scores(paradigm, q, db, test_ql, db_labels, topk=args.topk, radius=2)
    curve = lambda q, db: {"ball": metrics.precision_recall_curve(q, db, test_ql, db_labels),
                           "top_n": metrics.precision_recall_at_k(q, db, test_ql, db_labels, args.topk)}
    teacher_db, teacher_q = enc(teacher, db_images), enc(teacher, test_q)
    results = {"teacher": {**scores(teacher_q, teacher_db, "symmetric"), "code_statistics": _code_summary(teacher_db)}}
    curves = {"teacher": curve(teacher_q, teacher_db)}
    for name, model in students.items():
        q, db = enc(model, test_q), enc(model, db_images)
        results[name] = {**scores(q, db, "symmetric"), "code_statistics": _code_summary(db)}
        curves[name] = curve(q, db)
        # The asymmetric test uses the checkpoint that validated best in that paradigm, where there is one.
        asym_path = checkpoint_path(run.out, name, "asymmetric", args.checkpoint_format)
        if asym_path.exists():
            q = enc(load_model(asym_path, args.device), test_q)
        results[name].update(scores(q, teacher_db, "asymmetric"))
        curves[name + " (asymmetric)"] = curve(q, teacher_db)
    speed = {"teacher": throughput(teacher, test_q, device=args.device)}
    if students:
        speed["student"] = throughput(next(iter(students.values())), test_q, device=args.device)
    results["throughput_images_per_s"] = speed
    return results, curves


def _code_summary(codes: torch.Tensor) -> dict:
    """The scalar code statistics of a model's database codes, for metrics.json and the report."""
    stats = code_statistics(codes)
    return {key: stats[key] for key in ("mean_bit_entropy", "mean_imbalance", "mean_abs_correlation", "distinct_share")}


def _finish(run: _Run, results: dict, curves: dict, backbones: dict, bits: int) -> None:
    """metrics.json and report.md of the run directory."""
    from .report import render_report

    results["seconds"] = time.time() - run.started
    atomic_write_bytes(run.out / "metrics.json", [json.dumps(results, indent=2).encode()])
    report = render_report(run.out, run.args, results, curves, backbones, bits)
    atomic_write_bytes(run.out / "report.md", [report.encode()])
    run.log(f"done: {run.out / 'report.md'}")


def run_train_teacher(args) -> dict:
    run = _prepare_run(args)
    teacher, scores = _train_teacher(run, args.teacher, args.epochs, args.bits)
    if not distributed.is_main():  # the test and the report are the main process's
        return {}
    results, curves = _final_test(run, teacher, {})
    _finish(run, results, curves, {"teacher": args.teacher}, teacher.bits)
    return {"checkpoint": str(checkpoint_path(run.out, "teacher", fmt=args.checkpoint_format)),
            "best_validation": scores, "test": results["teacher"]}


def run_distill(args) -> dict:
    run = _prepare_run(args)
    teacher = load_model(args.teacher_checkpoint, args.device)
    students = _train_students(run, teacher, args.student, args.epochs, kd=() if args.no_kd else (args.kd,),
                               plain=args.no_kd)
    if not distributed.is_main():
        return {}
    results, curves = _final_test(run, teacher, {name: model for name, (model, _) in students.items()})
    backbones = {"teacher": teacher.name, **{name: args.student for name in students}}
    _finish(run, results, curves, backbones, teacher.bits)
    return {name: {"checkpoint": str(checkpoint_path(run.out, name, fmt=args.checkpoint_format)),
                   "best_validation": scores, "test": results[name]}
            for name, (_, scores) in students.items()}


def _listed(value, name: str, what: str = "", known=()) -> list:
    """A list option's values, in order without repeats. argparse checks a flag's values; a --config file's (a list,
    or one value) are checked here against `known`, before any work."""
    values = list(dict.fromkeys([value] if isinstance(value, (str, int)) else value or ()))
    for v in values:
        if known and v not in known:
            raise ValueError(f"{name}: unknown {what} {v!r}; known: {', '.join(known)}")
    return values


def run_demo(args) -> dict:
    baselines = _listed(args.baselines, "baselines", "KD baseline", KD_BASELINES)
    run = _prepare_run(args)
    teacher, _ = _train_teacher(run, args.teacher, args.teacher_epochs, args.bits)
    students = _train_students(run, teacher, args.student, args.student_epochs, kd=("brcd", *baselines))
    if not distributed.is_main():
        return {}
    # The BRCD student first: it is the one whose encoding throughput the report gives.
    order = (student_run_name("brcd"), "student_no_kd", *(student_run_name(b) for b in baselines))
    results, curves = _final_test(run, teacher, {name: students[name][0] for name in order})
    _finish(run, results, curves, {"teacher": args.teacher, **{name: args.student for name in order}}, teacher.bits)
    return results


def run_compare(args) -> dict:
    """For each seed, the student without KD, one per objective and one per BRCD ablation, trained and tested as
    `brcd distill` does, in OUT/seed<N>/; then OUT/comparison.json and OUT/comparison.md."""
    seeds = _listed(args.seeds, "seeds")
    objectives = _listed(args.kd, "kd", "objective", DISTILLATION_OBJECTIVES)
    ablations = _listed(args.ablations, "ablations", "BRCD ablation", tuple(BRCD_ABLATIONS))
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    if args.seed is not None:
        raise ValueError("compare takes the students' seeds as --seeds (and the split's as --split-seed), not --seed")
    split_seed = seeds[0] if args.split_seed is None else args.split_seed
    load_model(args.teacher_checkpoint, args.device)  # a bad checkpoint fails here, before any work
    per_seed, backbones = {}, {}
    for seed in seeds:
        run = _prepare_run(argparse.Namespace(**{**vars(args), "seed": seed, "split_seed": split_seed,
                                                 "out": args.out / f"seed{seed}"}))
        run.log(f"seed {seed} of {', '.join(map(str, seeds))}")
        students = {}
        plan = [(None, None), *((objective, None) for objective in objectives),
                *(("brcd", ablation) for ablation in ablations)]
        for objective, ablation in plan:
            # Each student as `brcd distill --seed N --split-seed S` (with the ablation's flags) trains it, to the
            # last digit: seeded afresh, the teacher loaded after the seed (rebuilding it draws random weights before
            # reading its own), so no student's numbers depend on the others trained before it.
            torch.manual_seed(seed)
            teacher = load_model(args.teacher_checkpoint, args.device)
            students.update(_train_students(run, teacher, args.student, args.epochs,
                                            kd=() if objective is None else (objective,), plain=objective is None,
                                            ablation=ablation))
        if not distributed.is_main():
            continue
        results, curves = _final_test(run, teacher, {name: model for name, (model, _) in students.items()})
        backbones = {"teacher": teacher.name, **{name: args.student for name in students}}
        _finish(run, results, curves, backbones, teacher.bits)
        per_seed[seed] = results
    if not distributed.is_main():
        return {}
    from .report import render_comparison

    summary = {**summarise_seeds(per_seed), "split_seed": split_seed, "topk": args.topk}
    atomic_write_bytes(args.out / "comparison.json", [json.dumps(summary, indent=2).encode()])
    atomic_write_bytes(args.out / "comparison.md",
                       [render_comparison(args, summary, backbones, split_seed).encode()])
    return summary


def _apply_config(parser: argparse.ArgumentParser, argv) -> None:
    """Set the chosen subcommand's defaults from its --config YAML, so that explicit flags still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv or not argv or argv[0] not in _subparsers(parser):
        return
    sub = _subparsers(parser)[argv[0]]
    i = argv.index("--config")
    if i + 1 >= len(argv):
        return  # argparse reports the missing value
    path = Path(argv[i + 1])
    import yaml

    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {path}: cannot be read as YAML ({str(exc).splitlines()[0]})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    known = {a.dest for a in sub._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise ValueError(f"--config {path}: unknown option {key!r} for brcd {argv[0]}")
        action = next(a for a in sub._actions if a.dest == dest)
        if action.type is not None and value is not None and not isinstance(value, bool):
            try:
                value = action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise ValueError(f"--config {path}: {key}: {exc}") from None
        defaults[dest] = value
    sub.set_defaults(**defaults)
    for action in sub._actions:  # a required option given in the file is no longer required on the line
        if action.dest in defaults:
            action.required = False


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# The subcommands that train, and so can run over several processes under torchrun.
DATA_PARALLEL_COMMANDS = ("demo", "train-teacher", "distill", "compare")


def main(argv=None) -> int:
    parser = build_parser()
    try:
        _apply_config(parser, argv)
    except ValueError as exc:
        print(f"brcd: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        run = {"demo": run_demo, "train-teacher": run_train_teacher, "distill": run_distill,
               "evaluate": run_evaluate, "encode": run_encode, "index": run_index,
               "compare": run_compare, "score": run_score, "info": run_info}[args.command]
        if distributed.launched_by_torchrun():
            if args.command not in DATA_PARALLEL_COMMANDS:
                raise ValueError(f"{args.command} runs in one process: start it without torchrun (the data-parallel "
                                 f"ones: {', '.join(DATA_PARALLEL_COMMANDS)})")
            args.device = distributed.init_from_environment(args.device)
        result = run(args)
        if distributed.is_main():
            print(json.dumps(result, indent=2))
        return 0
    except (DataFileError, ModelError, IndexFileError, ValueError) as exc:
        print(f"brcd: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"brcd: training stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        if distributed.distributed():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

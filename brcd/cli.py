"""The brcd command: `brcd demo` runs the whole chain on Fashion-MNIST (teacher, clusters, a student without KD and a
BRCD student, both search paradigms) and writes DIR/report.md and DIR/metrics.json.

Errors in the input (missing or corrupt data, unknown model names, bad numbers) print one line on stderr and exit
with status 2; a failed run (a NaN loss) exits with status 1. No traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import metrics
from .clustering import GROUP_MODES
from .data import DataFileError, load_fashion_mnist, make_split, synthetic_data
from .index import IndexFileError, atomic_write_bytes
from .models import STUDENT_DEFAULT, TEACHER_DEFAULT, ModelError, build_model
from .train import TrainConfig, TrainingError, encode, fit_clusters, throughput, train_student, train_teacher


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brcd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="teacher, clusters, students without KD and with BRCD; report and metrics")
    demo.add_argument("--out", type=Path, required=True, help="run directory (created)")
    demo.add_argument("--data-dir", type=Path, default=None, help="folder with the Fashion-MNIST idx files")
    demo.add_argument("--synthetic", action="store_true", help="a tiny synthetic data set instead (for tests)")
    demo.add_argument("--bits", type=_positive_int, default=64)
    demo.add_argument("--teacher", default=TEACHER_DEFAULT, help="any timm model name")
    demo.add_argument("--student", default=STUDENT_DEFAULT, help="any timm model name")
    demo.add_argument("--teacher-epochs", type=_positive_int, default=8)
    demo.add_argument("--student-epochs", type=_positive_int, default=10)
    demo.add_argument("--train-per-class", type=_positive_int, default=200)
    demo.add_argument("--val-queries", type=_positive_int, default=500)
    demo.add_argument("--test-queries", type=_positive_int, default=1000)
    demo.add_argument("--database-size", type=_positive_int, default=10000)
    demo.add_argument("--val-database", type=_positive_int, default=2000, help="database codes used for validation")
    demo.add_argument("--clusters", type=_positive_int, default=20)
    demo.add_argument("--margin", type=float, default=0.1, help="bit-mask margin")
    demo.add_argument("--group-mode", choices=GROUP_MODES, default="offset+fn")
    demo.add_argument("--no-mask", action="store_true", help="ablation: no bit mask")
    demo.add_argument("--batch-size", type=_positive_int, default=128)
    demo.add_argument("--topk", type=_positive_int, default=1000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--no-progress", action="store_true")
    return parser


def run_demo(args) -> dict:
    t_start = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    torch.manual_seed(args.seed)
    data = synthetic_data() if args.synthetic else load_fashion_mnist(args.data_dir)
    split = make_split(data.train_labels, data.test_labels, train_per_class=args.train_per_class,
                       val_queries=args.val_queries, test_queries=args.test_queries,
                       database_size=args.database_size, seed=args.seed)
    channels, size = data.train_images.shape[1], data.train_images.shape[-1]
    train_images = data.train_images[split.train]
    db_images, db_labels = data.train_images[split.database], data.train_labels[split.database]
    val_db, val_db_labels = db_images[: args.val_database], db_labels[: args.val_database]
    val_q, val_ql = data.test_images[split.val_queries], data.test_labels[split.val_queries]
    test_q, test_ql = data.test_images[split.test_queries], data.test_labels[split.test_queries]
    cfg = TrainConfig(bits=args.bits, batch_size=min(args.batch_size, len(train_images)),
                      num_clusters=args.clusters, margin=args.margin, group_mode=args.group_mode,
                      use_mask=not args.no_mask, topk=args.topk, seed=args.seed, device=args.device,
                      progress=not args.no_progress)
    (out / "config.json").write_text(json.dumps(vars(args) | {"out": str(out), "data_dir": str(args.data_dir)},
                                                indent=2))
    make = lambda name: build_model(name, args.bits, in_chans=channels, img_size=size).to(args.device)
    val = (val_q, val_ql, val_db, val_db_labels)

    log = lambda msg: print(f"[brcd demo {time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)
    log(f"teacher {args.teacher}: CIBHash on {len(train_images)} images")
    teacher = make(args.teacher)
    train_teacher(teacher, train_images, *val, replace(cfg, epochs=args.teacher_epochs), out, "teacher")
    log(f"k-means ({args.clusters} clusters) and bit masks (margin {args.margin})")
    clusters = fit_clusters(teacher, train_images, cfg)
    log(f"student {args.student} without KD")
    student_plain = make(args.student)
    train_teacher(student_plain, train_images, *val, replace(cfg, epochs=args.student_epochs), out,
                  "student_no_kd")
    log(f"student {args.student} with BRCD ({args.group_mode}, mask {'off' if args.no_mask else 'on'})")
    student = make(args.student)
    train_student(student, teacher, clusters, train_images, *val, replace(cfg, epochs=args.student_epochs), out,
                  "student_brcd")

    log(f"test: {len(test_q)} queries over {len(db_images)} database codes, mAP@{args.topk}")
    enc = lambda model, images: encode(model, images, device=args.device)
    teacher_db = enc(teacher, db_images)
    results = {"teacher": {"map_symmetric": metrics.mean_average_precision(enc(teacher, test_q), teacher_db,
                                                                            test_ql, db_labels, args.topk)}}
    for name, model in (("student_no_kd", student_plain), ("student_brcd", student)):
        results[name] = metrics.evaluate_paradigms(enc(model, test_q), enc(model, db_images), teacher_db, test_ql,
                                                   db_labels, args.topk)
    results["throughput_images_per_s"] = {"teacher": throughput(teacher, test_q, device=args.device),
                                          "student": throughput(student, test_q, device=args.device)}
    results["seconds"] = time.time() - t_start
    atomic_write_bytes(out / "metrics.json", [json.dumps(results, indent=2).encode()])
    write_report(out, args, results)
    log(f"done: {out / 'report.md'}")
    return results


def write_report(out: Path, args, results: dict) -> None:
    from .report import render_report

    atomic_write_bytes(out / "report.md", [render_report(out, args, results).encode()])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            results = run_demo(args)
            print(json.dumps(results, indent=2))
        return 0
    except (DataFileError, ModelError, IndexFileError, ValueError) as exc:
        print(f"brcd: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"brcd: training stopped: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

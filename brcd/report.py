"""The run report in Markdown: the results table, encoding throughput (a table and a bar chart), precision-recall
and precision@N curves and mAP over epochs (plots); and the table of a comparison over seeds."""
from __future__ import annotations

import json
from pathlib import Path

from .objectives import DISTILLATION_OBJECTIVES, LABELS
from .train import BRCD_ABLATIONS, ablation_run_name, student_run_name


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def _log_records(out: Path):
    """The run's per-epoch log (metrics.jsonl) as records; None where the run has none."""
    log = out / "metrics.jsonl"
    if not log.exists():
        return None
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _plot_curves(records, out: Path) -> str:
    plt = _pyplot()
    if records is None:
        return ""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for model in dict.fromkeys(r["model"] for r in records):
        for key in ("val_map_symmetric", "val_map_asymmetric"):
            pts = [(r["epoch"], r[key]) for r in records if r["model"] == model and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{model} ({key.split('_')[-1]})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation mAP")
    ax.legend(fontsize=7)
    _save(fig, out / "map_over_epochs.png")
    return "![validation mAP over epochs](map_over_epochs.png)\n"


def _training_table(records) -> str:
    """The training throughput of each model of the run, from its per-epoch log records (validation apart): "" for
    no log, or one without timings (written before they were kept)."""
    totals: dict = {}
    for r in records or []:
        if "train_seconds" in r:
            epochs, seconds, images, _ = totals.get(r["model"], (0, 0.0, 0, 1))
            totals[r["model"]] = (epochs + 1, seconds + r["train_seconds"], images + r["train_images"],
                                  r.get("processes", 1))
    if not totals:
        return ""
    rows = "".join(f"| {_ROLES.get(m, m)} | {epochs} | {processes} | {seconds:.1f} | {images / seconds:.0f} |\n"
                   for m, (epochs, seconds, images, processes) in totals.items())
    return ("## Training throughput\n\nThe epochs' steps, validation apart (an image: one step's two views through the "
            "model and, for a distilled student, through the teacher; images/s of all the processes together)."
            "\n\n| model | epochs | processes | training s | images/s |\n"
            f"|---|---|---|---|---|\n{rows}\n")


def _plot_pr(out: Path, curves: dict) -> str:
    fig, ax = _pyplot().subplots(figsize=(5, 4))
    for name, c in curves.items():
        ball = c["ball"]
        seen = ball["recall"] > 0  # radii at which some query retrieves something
        ax.plot(ball["recall"][seen].numpy(), ball["precision"][seen].numpy(), marker=".", label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Hamming-ball retrieval, radius 0 .. bits")
    ax.legend(fontsize=7)
    _save(fig, out / "pr_curves.png")
    return "![precision-recall curves](pr_curves.png)\n"


def _plot_top_n(out: Path, curves: dict) -> str:
    fig, ax = _pyplot().subplots(figsize=(5, 4))
    for name, c in curves.items():
        ax.plot(c["top_n"]["k"].numpy(), c["top_n"]["precision"].numpy(), label=name)
    ax.set_xlabel("N (top N of the Hamming ranking)")
    ax.set_ylabel("precision@N")
    ax.legend(fontsize=7)
    _save(fig, out / "precision_at_n.png")
    return "![precision@N curves](precision_at_n.png)\n"


def _plot_throughput(out: Path, names: list, values: list) -> str:
    fig, ax = _pyplot().subplots(figsize=(5, 2.2))
    ax.barh(names, values, color=["tab:blue", "tab:orange"])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("images / s (encoding)")
    ax.set_xlim(0, max(values) * 1.2)
    _save(fig, out / "throughput.png")
    return "![encoding throughput](throughput.png)\n"


_DATASET_NAMES = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "list": "image lists"}


# Models a report may hold, in the order of its tables: the run names of train.py and cli.py.
_ROLES = {"teacher": "teacher", "student_no_kd": "student without KD",
          **{student_run_name(name): f"student with {LABELS[name]}" for name in DISTILLATION_OBJECTIVES},
          **{ablation_run_name(name): f"student with BRCD ({left})" for name, (_, left) in BRCD_ABLATIONS.items()}}


def _score(value) -> str:
    """A score in a table: four decimals, or "-" where the model has none (a teacher's asymmetric mAP)."""
    return f"{value:.4f}" if isinstance(value, float) else "-"


def _data_name(args) -> str:
    if args.synthetic:
        return "synthetic"
    name = _DATASET_NAMES.get(args.dataset, args.dataset)
    return f"{name} ({args.data_dir})" if args.dataset == "list" else name


def render_report(out: Path, args, results: dict, curves: dict, backbones: dict, bits: int) -> str:
    """report.md of a run directory (demo, train-teacher or distill). results: {model: {"map_symmetric",
    "code_statistics", for students "map_asymmetric", and the other test scores of _final_test},
    "throughput_images_per_s": {"teacher", optional "student"}, "seconds"}; backbones: {model: timm name}; curves:
    {model: {"ball": precision_recall_curve's, "top_n": precision_recall_at_k's}}. Writes the plots beside it."""
    models = [m for m in _ROLES if m in results]
    table = "| model | backbone | mAP symmetric | mAP asymmetric (teacher database) |\n|---|---|---|---|\n"
    table += "".join(f"| {_ROLES[m]} | {backbones[m]} | {_score(results[m].get('map_symmetric'))} | "
                     f"{_score(results[m].get('map_asymmetric'))} |\n" for m in models)
    others = _other_scores_table(results, models)
    others = f"{_OTHER_SCORES_INTRO}.\n\n{others}\n" if others else ""
    stats = ("| model | mean bit entropy | mean imbalance | mean \\|bit correlation\\| | distinct codes |\n"
             "|---|---|---|---|---|\n")
    stats += "".join(f"| {_ROLES[m]} | {c['mean_bit_entropy']:.4f} | {c['mean_imbalance']:.4f} | "
                     f"{c['mean_abs_correlation']:.4f} | {100 * c['distinct_share']:.1f} % |\n"
                     for m in models for c in [results[m]["code_statistics"]])
    tp = results["throughput_images_per_s"]
    student_backbone = next((backbones[m] for m in models if m != "teacher"), "")
    speed = [("teacher", backbones["teacher"], tp["teacher"])]
    if "student" in tp:
        speed.insert(0, ("student", student_backbone, tp["student"]))
    speed_table = "| model | images/s |\n|---|---|\n" + "".join(
        f"| {role} ({name}) | {v:.0f} |\n" for role, name, v in reversed(speed))
    chart = _plot_throughput(out, [f"{role}\n{name}" for role, name, _ in speed], [v for _, _, v in speed])
    seeds = f"seed {args.seed}"
    if getattr(args, "split_seed", None) not in (None, args.seed):
        seeds += f" (split seed {args.split_seed})"
    data = _data_name(args)
    log = _log_records(out)
    return (
        f"# brcd {args.command}\n\n{bits}-bit codes, mAP@{args.topk}, data: {data}, {seeds}, "
        f"device {args.device}, {results['seconds']:.0f} s in all.\n\n## Test results\n\n{table}\n{others}"
        f"## Database codes\n\nOf the test database as each model encodes it (brcd.code_statistics): bit entropy 1 and "
        f"imbalance 0 where every bit splits the codes evenly, correlation 0 between independent bits.\n\n{stats}\n"
        f"## Encoding throughput\n\n{speed_table}\n{chart}\n{_training_table(log)}"
        f"## Precision-recall (test)\n\n{_plot_pr(out, curves)}\n"
        f"## Precision@N (test)\n\n{_plot_top_n(out, curves)}\n"
        f"## Validation during training\n\n{_plot_curves(log, out)}"
    )


_OTHER_SCORES = (("precision_at_", "P@{}"), ("ndcg_at_", "NDCG@{}"), ("precision_within_radius_", "P(r <= {})"))


def _other_scores_table(results: dict, models: list, fmt=_score) -> str:
    """A table of the test scores beside mAP (precision and NDCG at the cutoff, precision within a Hamming radius),
    each in both paradigms, where the results hold them (runs before they were recorded hold mAP only: ""). fmt
    writes one stored value (a number, or a comparison's statistics)."""
    columns = []  # (heading, key)
    for paradigm in ("symmetric", "asymmetric"):
        for prefix, heading in _OTHER_SCORES:
            key = next((k for m in models for k in results[m] if k.startswith(prefix)
                        and k.endswith(f"_{paradigm}")), None)
            if key is not None:
                columns.append((heading.format(key[len(prefix): -len(paradigm) - 1]) + f" {paradigm[:4]}.", key))
    if not columns:
        return ""
    head = "| model | " + " | ".join(h for h, _ in columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    return head + "".join(f"| {_ROLES.get(m, m)} | " + " | ".join(fmt(results[m].get(k)) for _, k in columns) + " |\n"
                          for m in models)


_OTHER_SCORES_INTRO = ("Beside mAP: precision and NDCG among the top results, and the precision of a hash lookup (the "
                       "codes within a Hamming radius; 0 for a query that finds none)")


def render_comparison(args, summary: dict, backbones: dict, split_seed: int) -> str:
    """comparison.md of `brcd compare`: summary is comparison.summarise_seeds's; backbones {model: timm name}."""
    seeds = summary["seeds"]
    spread = lambda stats: f"{stats['mean']:.4f} ± {stats['std']:.4f}" if stats["std"] is not None else (
        f"{stats['mean']:.4f}")
    fmt = lambda stats: (spread(stats), f"{stats['min']:.4f} to {stats['max']:.4f}",
                         " / ".join(f"{v:.4f}" for v in stats["by_seed"])) if stats else ("-", "-", "-")
    rows = []
    for model, scores in summary["models"].items():
        sym, asym = fmt(scores.get("map_symmetric")), fmt(scores.get("map_asymmetric"))
        rows.append(f"| {_ROLES.get(model, model)} | {backbones[model]} | {sym[0]} | {sym[1]} | {asym[0]} | "
                    f"{asym[1]} | {sym[2]} | {asym[2]} |\n")
    models = list(summary["models"])
    others = _other_scores_table(summary["models"], models, fmt=lambda stats: spread(stats) if stats else "-")
    return (
        f"# brcd compare\n\nTest mAP@{args.topk} of each model over the seeds {', '.join(map(str, seeds))} "
        f"(students trained once per seed from the same teacher checkpoint, on the split of seed {split_seed}; data: "
        f"{_data_name(args)}): the mean ± the sample standard deviation, the range and each seed's value. The "
        "asymmetric paradigm searches the teacher's database codes with the student's query codes. Each seed's run, "
        "with its report, is in seed<N>/.\n\n"
        "| model | backbone | symmetric mean | range | asymmetric mean | range | symmetric by seed | "
        "asymmetric by seed |\n|---|---|---|---|---|---|---|---|\n" + "".join(rows)
        + (f"\n{_OTHER_SCORES_INTRO}, mean ± sample standard deviation over the seeds.\n\n{others}" if others else "")
    )

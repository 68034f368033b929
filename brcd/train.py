"""Training loops: the CIBHash teacher, the students (without KD, with BRCD or a KD baseline), validation in both
paradigms, best checkpoints written atomically, early stopping, a JSON-lines metrics log, and NaN detection.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed, metrics
from .checkpoint import CHECKPOINT_FORMATS, TrainingError, load_checkpoint, save_checkpoint
from .augment import BatchAugment
from .clustering import bit_masks, kmeans, nearest_centroid, negative_groups
from .data import TwoViewDataset, to_device, to_model_input, two_view_transform
from .models import HashModel
from .objectives import DATASET_OBJECTIVES, DISTILLATION_OBJECTIVES, make_objective

__all__ = ["TrainConfig", "TrainingError", "checkpoint_path", "encode", "train_teacher", "fit_clusters",
           "train_student", "student_run_name", "Clusters", "throughput", "PRECISIONS", "AUGMENTATIONS",
           "augmentation", "check_loop_config", "ShardedBatches"]

# The precisions of the training steps' forward passes: float32, or bfloat16 under torch.autocast.
PRECISIONS = ("fp32", "bf16")
# Where the two views are made: "loader" (torchvision, image by image, in the data loader or its workers), "batch"
# (brcd.augment.BatchAugment, the whole batch at once on the training device), "auto" (batch on a GPU, loader on the
# CPU, where docs/demo.md's runs were made with it).
AUGMENTATIONS = ("auto", "loader", "batch")


@dataclass
class TrainConfig:
    bits: int = 64
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    temperature: float = 0.3
    kl_weight: float = 0.001
    kd_weight: float = 1.0
    kd: str = "brcd"  # the student's distillation objective: one of objectives.DISTILLATION_OBJECTIVES
    alpha: float = 0.8
    num_clusters: int = 20
    margin: float = 0.1
    group_mode: str = "offset+fn"  # one of clustering.GROUP_MODES
    use_mask: bool = True
    val_every: int = 1
    patience: int = 3
    topk: int = 1000
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    resume: bool = False
    checkpoint_format: str = "pt"  # "pt" | "safetensors": the best checkpoints (the resume state is always .pt)
    # Where the two views are made: one of AUGMENTATIONS (see `augmentation`).
    augment: str = "auto"
    # Data-loader processes for the loader's two-view augmentation; 0: in the training process, where a GPU waits for
    # it at every step (a batch of 128 Fashion-MNIST images: about 75 ms of one core of the development machine).
    workers: int = 0
    # Steps between reads of the loss (its finiteness check and the progress bar's value): each read waits for the
    # device. None: every step on the CPU (where nothing is queued), every 25 on a GPU.
    read_loss_every: Optional[int] = None
    # The models' forward passes in the training steps: "fp32", or "bf16" under torch.autocast (tensor cores on a GPU).
    # The objectives take the codes in float32 either way; validation and encoding run in float32.
    precision: str = "fp32"

    @property
    def device_type(self) -> str:
        """"cpu", "cuda", ...: what the loop's choices depend on (pinned batches, autocast, reads, generator)."""
        return torch.device(self.device).type


def encode(model: HashModel, images: Tensor, *, batch_size: int = 256, device: str = "cpu",
           desc: Optional[str] = None, progress: bool = True) -> Tensor:
    """±1 codes [n, bits] of uint8 images, in evaluation mode."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress or desc is None,
                      leave=False):
            # The uint8 batch goes to the device (a quarter of the float input's bytes, through pinned memory) and the
            # codes stay there until the end: one wait for the device, not one per batch.
            _, codes = model(to_model_input(to_device(images[i : i + batch_size], device)))
            out.append(codes)
    model.train(was_training)
    return torch.cat(out).cpu()


def throughput(model: HashModel, images: Tensor, *, batch_size: int = 256, device: str = "cpu") -> float:
    """Images encoded per second (one warm-up batch first)."""
    encode(model, images[:batch_size], batch_size=batch_size, device=device)
    t0 = time.perf_counter()
    encode(model, images, batch_size=batch_size, device=device)
    return len(images) / (time.perf_counter() - t0)


@dataclass
class Clusters:
    centroids: Tensor
    assignments: Tensor  # of the training images, in their order
    masks: Tensor


def fit_clusters(teacher: HashModel, train_images: Tensor, cfg: TrainConfig) -> Clusters:
    """k-means of the teacher's codes of the training images, and each cluster's bit mask. In a data-parallel run
    the main rank fits them and every rank receives its clusters."""
    clusters = None
    if distributed.is_main():
        codes = encode(teacher, train_images, device=cfg.device, desc="teacher codes", progress=cfg.progress)
        result = kmeans(codes, cfg.num_clusters, restarts=3, seed=cfg.seed, progress=cfg.progress)
        clusters = Clusters(result.centroids, result.assignments, bit_masks(codes, result.assignments,
                                                                            cfg.num_clusters, cfg.margin))
    return distributed.broadcast_object(clusters)


def augmentation(augment: str, device) -> str:
    """Where a run on `device` makes its two views: "batch" or "loader" (`augment`, one of AUGMENTATIONS, with "auto"
    decided by the device)."""
    if augment != "auto":
        return augment
    return "loader" if torch.device(device).type == "cpu" else "batch"


def _loader(images: Tensor, cfg: TrainConfig, gen: torch.Generator):
    """Shuffled two-view batches (view 1, view 2, positions in `images`), as `augmentation` decides for cfg; in a
    data-parallel run, this rank's share of each batch of cfg.batch_size images (every rank shuffles with the same
    `gen`). With loader workers, each epoch's workers seed their augmentation from `gen` (as the shuffling is; each
    rank's differently), so a run is reproducible for a given worker count and a resumed one continues exactly.
    Workers are not kept between epochs: persistent ones would take their seeds once, and a resumed run could not
    match."""
    if augmentation(cfg.augment, cfg.device) == "batch":
        return _BatchAugmentedLoader(images, cfg, gen)
    channels, size = images.shape[1], images.shape[-1]
    return torch.utils.data.DataLoader(TwoViewDataset(images, two_view_transform(size, channels)),
                                       batch_sampler=ShardedBatches(len(images), cfg.batch_size, gen,
                                                                    as_random_sampler=True),
                                       generator=gen, num_workers=cfg.workers, pin_memory=cfg.device_type == "cuda",
                                       worker_init_fn=functools.partial(_seed_worker, distributed.rank()))


def _seed_worker(rank: int, worker_id: int) -> None:
    """A loader worker's augmentation stream on `rank`: the data loader's (from `gen`, the same on every rank) on rank
    0, a different one on each other rank."""
    if rank:
        torch.manual_seed(distributed.rank_seed(torch.initial_seed(), rank))


class ShardedBatches:
    """The positions of each epoch's full batches of `batch_size` in a fresh shuffle of `n` drawn from `gen`: in a
    data-parallel run this rank's consecutive share of each, in one process the whole batch.

    `as_random_sampler`: draw from `gen` as torch's RandomSampler does, which a DataLoader with shuffle=True,
    drop_last=True and generator `gen` uses (after each epoch's shuffle, a second one for the remainder of n samples,
    of which it takes none): the batches of the runs made before this class, and of docs/demo.md, stay the same."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator, *, as_random_sampler: bool = False):
        self.n, self.batch_size, self.gen, self.as_random_sampler = n, batch_size, gen, as_random_sampler
        self.share = distributed.share(batch_size)
        self.first = distributed.rank() * self.share

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.gen)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start + self.first : start + self.first + self.share]
        if self.as_random_sampler:
            torch.randperm(self.n, generator=self.gen)


class _BatchAugmentedLoader:
    """Shuffled batches whose two views BatchAugment makes on the training device from the uint8 images: the host
    gathers and copies a batch of bytes, and draws the views' random choices from `gen` (so the state saved with
    the loader's resumes the augmentation too)."""

    def __init__(self, images: Tensor, cfg: TrainConfig, gen: torch.Generator):
        self.images, self.gen, self.device = images, gen, torch.device(cfg.device)
        self.batches = ShardedBatches(len(images), cfg.batch_size, gen)
        self.augment = BatchAugment(images.shape[-1], images.shape[1])
        # Each view's choices are drawn for the whole batch on every rank, which keeps the ranks' generators together
        # and gives the views one process would make.
        self.shard = (distributed.rank(), distributed.world_size())

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for idx in self.batches:
            if self.device.type == "cuda":  # the step copies the positions there: pinned, as the data loader pins them
                idx = idx.pin_memory()
            batch = to_device(self.images[idx], self.device)
            yield self.augment(batch, self.gen, self.shard), self.augment(batch, self.gen, self.shard), idx


def student_run_name(objective: str) -> str:
    """The run (checkpoints, log records, report rows) of a student distilled with `objective`."""
    return f"student_{objective}"


# BRCD with one part taken away, as the paper's ablations take it: {name: (TrainConfig fields, what is left)}.
BRCD_ABLATIONS = {
    "none": ({"group_mode": "none"}, "no groups"),
    "fn": ({"group_mode": "fn"}, "false negatives only"),
    "offset": ({"group_mode": "offset"}, "offset positives only"),
    "no-mask": ({"use_mask": False}, "no bit mask"),
}


def ablation_run_name(ablation: str) -> str:
    """The run of a BRCD student trained with one of BRCD_ABLATIONS."""
    if ablation not in BRCD_ABLATIONS:
        raise ValueError(f"unknown BRCD ablation {ablation!r}; known: {', '.join(BRCD_ABLATIONS)}")
    return f"{student_run_name('brcd')}_{ablation.replace('-', '_')}"


def checkpoint_path(out_dir: Path, name: str, paradigm: str = "symmetric", fmt: str = "pt") -> Path:
    """The best checkpoint of a model by one paradigm's validation mAP: NAME.FMT (symmetric) or NAME.PARADIGM.FMT."""
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint format must be one of {CHECKPOINT_FORMATS}, got {fmt!r}")
    return out_dir / (f"{name}.{fmt}" if paradigm == "symmetric" else f"{name}.{paradigm}.{fmt}")


class _StepLosses:
    """An epoch's step losses, kept on the device and read every `every` steps: one synchronisation per read instead of
    one per step, which would keep a GPU's queue from running ahead of the host. A read raises TrainingError at the
    first non-finite loss, naming its step, and adds the others to the epoch's total in step order."""

    def __init__(self, every: int, name: str, epoch: int, out_dir: Path):
        self.every, self.name, self.epoch, self.out_dir = every, name, epoch, out_dir
        self.pending: list = []
        self.first_step = 1  # the step of pending[0]
        self.total, self.steps, self.latest = 0.0, 0, math.nan

    def add(self, loss: Tensor) -> bool:
        """Keeps one step's loss; True when it is time to read."""
        self.pending.append(loss.detach())
        return len(self.pending) >= self.every

    def read(self) -> None:
        if not self.pending:
            return
        values = torch.stack(self.pending).tolist()  # the one wait for the device
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingError(f"{self.name}: the loss became {value} at epoch {self.epoch}, step "
                                    f"{self.first_step + offset}; the last good checkpoints stay in {self.out_dir}")
            self.total += value
        self.first_step += len(values)
        self.steps += len(values)
        self.latest = values[-1]
        self.pending.clear()


def check_loop_config(cfg: TrainConfig) -> None:
    """The settings of the training loop itself, checked before anything runs (the command line checks them before
    it builds the models)."""
    if cfg.workers < 0:
        raise ValueError(f"workers must be >= 0, got {cfg.workers}")
    if cfg.augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {cfg.augment!r}")
    if cfg.workers and augmentation(cfg.augment, cfg.device) == "batch":
        raise ValueError(f"workers ({cfg.workers}) run the loader's augmentation; with the batch augmentation the "
                         "views are made on the training device: workers must be 0")
    if cfg.read_loss_every is not None and cfg.read_loss_every < 1:
        raise ValueError(f"read_loss_every must be >= 1, got {cfg.read_loss_every}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    distributed.share(cfg.batch_size)


def _forward_precision(cfg: TrainConfig):
    """The context of a training step's model calls: bfloat16 autocast where cfg.precision is "bf16"."""
    return torch.autocast(cfg.device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _fit(model: HashModel, objective: torch.nn.Module, step: Callable, images: Tensor,
         validate: Callable[[], Dict[str, float]], cfg: TrainConfig, out_dir: Path, name: str) -> Dict[str, float]:
    """The shared loop: epochs of two-view batches; validation scores "val_map_<paradigm>"; the best checkpoint per
    paradigm; early stopping when no paradigm improved for `patience` validations; a stop on a NaN loss.
    The objective's own parameters (CRD's heads) train with the model, and its state (CRD's memory banks) is part of
    the resume state. Leaves the model with its best symmetric weights; returns the best score of each paradigm.

    In a data-parallel run (brcd.distributed) every rank runs this loop on its share of each batch (the step gathers
    the objective's inputs from all ranks), the gradients are averaged over the ranks after each backward, and the main
    rank alone validates (the others receive its scores), writes checkpoints and the log."""
    check_loop_config(cfg)
    main = distributed.is_main()
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = _loader(images, cfg, gen)
    objective.to(cfg.device)
    optimizer = torch.optim.AdamW([*model.parameters(), *objective.parameters()], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    best: Dict[str, float] = {}
    stale, first_epoch = 0, 1
    last = out_dir / f"{name}.last.pt"
    torch.manual_seed(distributed.rank_seed(cfg.seed))
    if cfg.resume and last.exists():
        # Everything the next epoch depends on: weights, optimizer, progress, and the random streams (the loader's
        # shuffling, its workers' seeds and the batch augmentation's choices; the global one of the loader's
        # augmentation in the training process, and the stochastic hash threshold's: the device's own generator on
        # a GPU).
        state = load_checkpoint(last)
        model.load_state_dict(state["state_dict"])
        objective.load_state_dict(state.get("objective", {}))
        optimizer.load_state_dict(state["optimizer"])
        best, stale, first_epoch = dict(state["best"]), state["stale"], state["epoch"] + 1
        ranks = state.get("ranks", 1)
        if ranks != distributed.world_size():
            raise ValueError(f"{last} was written by a run of {ranks} process(es); resume it with as many, not "
                             f"{distributed.world_size()}")
        # Each rank's own random streams (rank 0's are also kept alone, as a one-process run writes them).
        rng, device_rng = state["rank_rng"][distributed.rank()] if ranks > 1 else (state["rng"],
                                                                                   state.get("device_rng"))
        torch.set_rng_state(rng)
        gen.set_state(state["loader_rng"])
        if device_rng is not None and cfg.device_type == "cuda":
            torch.cuda.set_rng_state(device_rng, cfg.device)
        if state["stopped_early"]:
            best_path = checkpoint_path(out_dir, name, fmt=cfg.checkpoint_format)
            model.load_state_dict(load_checkpoint(best_path)["state_dict"])
            return best
    model.to(cfg.device).train()
    # Every rank starts from rank 0's weights and objective state (each drew its own, or read the same file).
    distributed.broadcast_state(model, objective)
    trained = [*model.parameters(), *objective.parameters()]
    read_every = cfg.read_loss_every if cfg.read_loss_every is not None else (1 if cfg.device_type == "cpu" else 25)
    for epoch in range(first_epoch, cfg.epochs + 1):
        losses = _StepLosses(read_every, name, epoch, out_dir)
        bar = tqdm(loader, desc=f"{name} epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and main),
                   leave=False)
        started = time.perf_counter()
        for v1, v2, idx in bar:
            # From pinned memory (on a GPU) the copies are asynchronous: the host goes on to queue the step's kernels.
            loss = step(v1.to(cfg.device, non_blocking=True), v2.to(cfg.device, non_blocking=True), idx)
            # Read before this step's update: with a read every step (the CPU's default) a non-finite loss never
            # reaches the weights; with deferred reads, the steps since the last read have updated them (the
            # checkpoints on disk predate them either way).
            if losses.add(loss):
                losses.read()
                bar.set_postfix(loss=f"{losses.latest:.4f}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(trained)
            optimizer.step()
        losses.read()
        if cfg.device_type == "cuda":  # the last step's backward and update, still queued after its loss was read
            torch.cuda.synchronize(cfg.device)
        seconds = time.perf_counter() - started
        # The epoch's training throughput (batches made, steps run; validation apart): images of the training set
        # per second, each one step's two views through the model (and, distilling, the teacher's passes); in a
        # data-parallel run, all the processes' together.
        record = {"model": name, "epoch": epoch, "loss": losses.total / max(1, losses.steps),
                  "train_seconds": seconds, "train_images": losses.steps * cfg.batch_size,
                  "processes": distributed.world_size()}
        # Each rank's batch-norm statistics came from its share of the batches: every rank keeps their mean.
        distributed.average_floating_buffers(model)
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
            scores = distributed.broadcast_object(validate() if main else None)
            record.update(scores)
            improved = False
            for key, value in scores.items():
                if value > best.get(key, -math.inf):
                    best[key], improved = value, True
                    paradigm = key.rsplit("_", 1)[-1]
                    if main:
                        save_checkpoint(checkpoint_path(out_dir, name, paradigm, cfg.checkpoint_format), model,
                                        asdict(cfg), {"epoch": epoch, "scores": scores, "name": name,
                                                      "selected_by": key})
            stale = 0 if improved else stale + 1
        stopped_early = stale >= cfg.patience
        device_rng = torch.cuda.get_rng_state(cfg.device) if cfg.device_type == "cuda" else None
        rank_rng = distributed.all_objects((torch.get_rng_state(), device_rng))  # rank 0's first
        if main:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            resume_state = {"optimizer": optimizer.state_dict(), "objective": objective.state_dict(), "epoch": epoch,
                            "best": best, "stale": stale,
                            "stopped_early": stopped_early, "name": name, "rng": rank_rng[0][0],
                            "loader_rng": gen.get_state(), "ranks": distributed.world_size()}
            if device_rng is not None:
                resume_state["device_rng"] = device_rng
            if distributed.world_size() > 1:
                resume_state["rank_rng"] = rank_rng
            save_checkpoint(last, model, asdict(cfg), resume_state)
        if stopped_early:
            break
    distributed.barrier()  # the main rank's checkpoints are on disk
    model.load_state_dict(load_checkpoint(checkpoint_path(out_dir, name, fmt=cfg.checkpoint_format))["state_dict"])
    return best


def _forward(cfg: TrainConfig, model: HashModel, views, teacher: Optional[HashModel] = None, teacher_views: int = 0):
    """A training step's forward passes, under the run's precision: the teacher's codes of the first `teacher_views`
    views (without gradients), then the model's (probabilities, codes) of every view, in that order (a model with
    dropout draws its masks in it). All in float32, as the objectives compute (a no-op in fp32; in bfloat16 the ±1
    codes are exact, the probabilities not)."""
    with _forward_precision(cfg):
        with torch.no_grad():
            teacher_codes = [teacher(v)[1] for v in views[:teacher_views]]
        student = [model(v) for v in views]
    return [t.float() for t in teacher_codes], [(p.float(), s.float()) for p, s in student]


def train_teacher(model: HashModel, images: Tensor, val_queries: Tensor, val_query_labels: Tensor,
                  val_db: Tensor, val_db_labels: Tensor, cfg: TrainConfig, out_dir: Path,
                  name: str = "teacher") -> Dict[str, float]:
    """CIBHash training (also the student without KD). Validation: symmetric mAP@topk."""
    objective = make_objective("cibhash", temperature=cfg.temperature, kl_weight=cfg.kl_weight)

    def step(v1, v2, idx):
        _, ((p1, c1), (p2, c2)) = _forward(cfg, model, (v1, v2))
        return objective(*distributed.gather_rows(p1, c1, p2, c2))

    def validate():
        q = encode(model, val_queries, device=cfg.device)
        db = encode(model, val_db, device=cfg.device)
        return {"val_map_symmetric": metrics.mean_average_precision(q, db, val_query_labels, val_db_labels,
                                                                     cfg.topk)}

    return _fit(model, objective, step, images, validate, cfg, out_dir, name)


def rotations_by_image(codes: Tensor) -> Tensor:
    """Codes [3n, K] of n images turned by 90, then 180, then 270 degrees as [n, 3, K]: a row of three per image, as
    brcd.distributed.gather_rows gathers rows."""
    return codes.unflatten(0, (3, -1)).transpose(0, 1)


def rotations_by_turn(codes: Tensor) -> Tensor:
    """The inverse of rotations_by_image: [n, 3, K] to [3n, K], all images by 90 degrees first."""
    return codes.transpose(0, 1).flatten(0, 1)


def train_student(model: HashModel, teacher: HashModel, clusters: Optional[Clusters], images: Tensor,
                  val_queries: Tensor, val_query_labels: Tensor, val_db: Tensor, val_db_labels: Tensor,
                  cfg: TrainConfig, out_dir: Path, name: Optional[str] = None) -> Dict[str, float]:
    """Distillation from a frozen teacher with the objective cfg.kd: BRCD (which needs the clusters of the teacher's
    codes) or a KD baseline (clusters unused, may be None). The run is named `name`, by default "student_<cfg.kd>".
    Validation in both paradigms; the teacher's database codes are computed once."""
    if cfg.kd not in DISTILLATION_OBJECTIVES:
        raise ValueError(f"kd must be one of {DISTILLATION_OBJECTIVES}, got {cfg.kd!r}")
    # An objective with memory of the training set (CRD) is built for it; the loader's indices are positions in it.
    per_dataset = dict(dataset_size=len(images), bits=cfg.bits) if cfg.kd in DATASET_OBJECTIVES else {}
    objective = make_objective(cfg.kd, temperature=cfg.temperature, kl_weight=cfg.kl_weight, kd_weight=cfg.kd_weight,
                               **per_dataset)
    if objective.needs_clusters and clusters is None:
        raise ValueError(f"the {cfg.kd} objective needs the clusters of the teacher's codes (fit_clusters)")
    name = name or student_run_name(cfg.kd)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # Validation is the main rank's (brcd.distributed).
    teacher_db = encode(teacher, val_db, device=cfg.device) if distributed.is_main() else None

    if objective.needs_clusters:
        centroids = clusters.centroids.to(cfg.device)
        masks = clusters.masks.to(cfg.device)
        assignments = clusters.assignments.to(cfg.device)

        def step(v1, v2, idx):
            (t1, t2), ((p1, s1), (p2, s2)) = _forward(cfg, model, (v1, v2), teacher, 2)
            # The batch's positions come pinned from the loader on a GPU: the copy does not wait for the device's
            # queue (gathering on the host and copying the result would, at every step).
            c = assignments[idx.to(cfg.device, non_blocking=True)]
            # In a data-parallel run, the whole batch's (one process: as they are).
            t1, t2, p1, s1, p2, s2, c = distributed.gather_rows(t1, t2, p1, s1, p2, s2, c)
            cv = nearest_centroid(t2, centroids)
            rows, cols, alpha = negative_groups(c, cv, base_alpha=cfg.alpha, mode=cfg.group_mode)
            # alpha is base_alpha or 1 (negative_groups checks base_alpha): no per-step device sync to check it again.
            return objective(p1, s1, p2, s2, t1, t2, alpha=alpha, bit_mask=masks[c] if cfg.use_mask else None,
                             row_groups=rows, col_groups=cols, check_alpha=False)
    else:
        def step(v1, v2, idx):
            extra = {}
            if objective.extra_input == "index":  # positions in the training set, on the CPU as the loader gives them
                # (in a data-parallel run the whole batch's, gathered where the codes are)
                extra["index"] = idx if not distributed.distributed() else distributed.gather_rows(
                    idx.to(cfg.device, non_blocking=True))
            # A baseline compares view 1 only: no teacher pass over view 2.
            (t1,), ((p1, s1), (p2, s2)) = _forward(cfg, model, (v1, v2), teacher, 1)
            rotated = (None, None)
            if objective.extra_input == "rotations":  # view 1 turned by 90, 180 and 270 degrees, through both
                turned = torch.cat([torch.rot90(v1, k, dims=(-2, -1)) for k in (1, 2, 3)])
                (teacher_rotated,), ((_, student_rotated),) = _forward(cfg, model, (turned,), teacher, 1)
                rotated = [rotations_by_image(r) for r in (student_rotated, teacher_rotated)]
            # In a data-parallel run, the whole batch's (one process: as they are); one gather for the lot.
            p1, s1, p2, s2, t1, *rotated = distributed.gather_rows(p1, s1, p2, s2, t1, *rotated)
            if objective.extra_input == "rotations":
                extra["rotated"] = tuple(rotations_by_turn(r) for r in rotated)
            return objective(p1, s1, p2, s2, t1, **extra)

    def validate():
        q = encode(model, val_queries, device=cfg.device)
        db = encode(model, val_db, device=cfg.device)
        scores = metrics.evaluate_paradigms(q, db, teacher_db, val_query_labels, val_db_labels, cfg.topk)
        return {"val_" + k: v for k, v in scores.items()}

    return _fit(model, objective, step, images, validate, cfg, out_dir, name)

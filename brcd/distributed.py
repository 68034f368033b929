"""Data-parallel training over several processes (`torchrun`), one place that knows it.

Each process (a rank) runs the model on its share of every batch. The contrastive objectives compare each code with
every other code of the batch, so the ranks' codes are gathered into the whole batch (`gather_rows`, differentiable)
and every rank computes the objective over it: the loss of a batch of B images on W ranks is the loss of the same B
images in one process, not W losses of B / W images (a contrastive loss over fewer negatives is a different loss).
The objective's cost is O(B^2 K) per rank, small beside the models' passes.

Gradients: the backward of `gather_rows` sums, for a rank's rows, the gradients that every rank's copy of the loss
sends them, and `average_gradients` then averages the parameters' gradients over the ranks. With every rank computing
the same loss that is exactly its gradient; where an objective draws random negatives (CRD and its kin), each rank
draws its own and the update is that of the mean of the ranks' losses.

Without an initialised process group (a plain run) every function here is the identity, so the training loop has one
path. The command line initialises the group from torchrun's environment (`init_from_environment`); a program that
calls brcd.train itself initialises its own.
"""
from __future__ import annotations

import datetime
import os
from typing import Iterable, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["rank", "world_size", "is_main", "distributed", "gather_rows", "average_gradients",
           "average_floating_buffers", "broadcast_state", "broadcast_object", "all_objects", "barrier",
           "init_from_environment", "rank_seed", "launched_by_torchrun", "share"]

# How long a rank waits at a collective for the others: the main rank validates, tests and writes reports while the
# others wait for its scores, which can take far longer than the collectives' usual ten minutes.
TIMEOUT = datetime.timedelta(hours=2)


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if distributed() else 1


def is_main() -> bool:
    """The rank that validates, writes checkpoints, logs and reports (the only one in a plain run)."""
    return rank() == 0


def rank_seed(seed: int, of_rank: Optional[int] = None) -> int:
    """The seed of a rank's own random streams (the models' stochastic thresholds, the loader's augmentation): the
    run's seed on rank 0, so that one process reproduces a plain run, a different stream on each other rank, so that
    the ranks' images do not share their random draws. `of_rank`: this process's rank unless given."""
    r = rank() if of_rank is None else of_rank
    return seed if r == 0 else (seed * 1_000_003 + r * 7_919) % (2 ** 63)


def share(batch_size: int) -> int:
    """Each rank's share of a batch of `batch_size` (all of it in one process); a ValueError naming batch_size where
    the ranks cannot share it evenly."""
    ranks = world_size()
    if batch_size % ranks:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of processes ({ranks}): each "
                         "takes an equal share of every batch")
    return batch_size // ranks


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str) -> str:
    """Joins the process group that torchrun's environment describes (NCCL for CUDA, gloo for the CPU) and returns the
    device of this rank: "cuda:LOCAL_RANK" for "cuda" (one GPU per process), the CPU unchanged."""
    if distributed():
        return device
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            raise ValueError(f"device: with torchrun each process takes the GPU of its local rank; give --device cuda, "
                             f"not {device!r}")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif dev.type != "cpu":
        raise ValueError(f"device: data-parallel training runs on CUDA or the CPU, got {device!r}")
    torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


class _GatherRows(torch.autograd.Function):
    """All ranks' [n, ...] tensors concatenated in rank order; the backward sums the ranks' gradients of the whole and
    returns this rank's rows (an all-reduce: every backend has one, unlike a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size())]
        torch.distributed.all_gather(parts, x)
        ctx.rows, ctx.rank = len(x), rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(*tensors: Optional[Tensor]):
    """Each tensor's rows from every rank, in rank order (the same number of rows on every rank), differentiable;
    None stays None. One tensor in, one out; several in, a list out.

    The tensors of one dtype travel in one collective, so a step's backward makes one all-reduce whatever autograd's
    order: two gathers' backwards taken in different orders on two ranks would add up each other's gradients."""
    out = list(tensors)
    if distributed():
        present = [i for i, t in enumerate(tensors) if t is not None]
        rows = {len(tensors[i]) for i in present}
        if len(rows) > 1:
            raise ValueError(f"gather_rows: the tensors have different numbers of rows {sorted(rows)}")
        for members in _by_dtype(present, lambda i: tensors[i].dtype):
            flat = [tensors[i].reshape(len(tensors[i]), -1) for i in members]
            gathered = _GatherRows.apply(torch.cat(flat, dim=1)).split([f.shape[1] for f in flat], dim=1)
            for i, g in zip(members, gathered):
                out[i] = g.reshape(-1, *tensors[i].shape[1:])
    return out[0] if len(out) == 1 else out


def _by_dtype(items, dtype_of) -> List[list]:
    """`items` grouped by dtype, in order of first appearance: what one collective can carry."""
    groups: dict = {}
    for item in items:
        groups.setdefault(dtype_of(item), []).append(item)
    return list(groups.values())


def _average_in_place(tensors: List[Tensor]) -> None:
    """Each tensor replaced by its mean over the ranks: one all-reduce per dtype instead of one per tensor."""
    for group in _by_dtype(tensors, lambda t: t.dtype):
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.all_reduce(flat)
        flat /= world_size()
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def average_gradients(parameters: Iterable[Tensor]) -> None:
    """Averages the parameters' gradients over the ranks, in place (a parameter without a gradient on every rank is
    left alone: the objectives and models use every parameter in each step, or none)."""
    if distributed():
        _average_in_place([p.grad for p in parameters if p.grad is not None])


def average_floating_buffers(module: torch.nn.Module) -> None:
    """Averages a module's floating-point buffers over the ranks (batch-norm statistics, each rank's from its share of
    the batches), so that every rank validates and saves the same model."""
    if distributed():
        _average_in_place([b for b in module.buffers() if b.is_floating_point()])


def broadcast_state(*modules: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (each rank built its models from its own random stream)."""
    if not distributed():
        return
    with torch.no_grad():
        for module in modules:
            for t in module.state_dict().values():
                torch.distributed.broadcast(t, 0)


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable object; tensors arrive on the CPU) on every rank."""
    if not distributed():
        return obj
    box = [obj if is_main() else None]
    torch.distributed.broadcast_object_list(box, 0)
    return box[0]


def all_objects(obj) -> Sequence:
    """Every rank's `obj`, in rank order, on every rank."""
    if not distributed():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if distributed():
        torch.distributed.barrier()

"""Checkpoints: state_dict, the model's spec and the run's config, loadable with torch.load(weights_only=True),
written atomically so that a crash never replaces a good checkpoint with part of one."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import torch

from .index import atomic_write_bytes
from .models import HashModel, build_model

__all__ = ["TrainingError", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model"]


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""


class CheckpointError(ValueError):
    """A file that is not a brcd checkpoint."""


def save_checkpoint(path: Path, model: HashModel, config: dict, extra: Optional[dict] = None) -> None:
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "model": model.spec, "config": config, **(extra or {})}, buffer)
    atomic_write_bytes(path, [buffer.getvalue()])


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # any unpickling failure means: not a checkpoint of ours
        raise CheckpointError(f"{path}: not a brcd checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "config", "model"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a brcd checkpoint (no state_dict, model and config)")
    return ckpt


def load_model(path: Path, device: str = "cpu") -> HashModel:
    """The model of a checkpoint, rebuilt from its spec, in evaluation mode."""
    ckpt = load_checkpoint(path)
    spec = dict(ckpt["model"])
    model = build_model(spec.pop("name"), spec.pop("bits"), **spec)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()

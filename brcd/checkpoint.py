"""Checkpoints: state_dict, the model's spec and the run's config, written atomically so that a crash never replaces a
good checkpoint with part of one. Two formats, chosen by the file's suffix:

- ``NAME.pt``: a torch file of plain containers, loadable with ``torch.load(path, weights_only=True)``;
- ``NAME.safetensors``: the tensors in safetensors, with spec, config and the rest as JSON in the file's metadata
  (key ``brcd``), readable without torch's pickle at all.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import torch

from .index import atomic_write_bytes
from .models import HashModel, build_model

__all__ = ["TrainingError", "CheckpointError", "CHECKPOINT_FORMATS", "save_checkpoint", "load_checkpoint",
           "load_model"]

CHECKPOINT_FORMATS = ("pt", "safetensors")
_METADATA_KEY = "brcd"


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""


class CheckpointError(ValueError):
    """A file that is not a brcd checkpoint."""


def _safetensors_bytes(state_dict: dict, meta: dict) -> bytes:
    from safetensors.torch import save

    tensors, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach().cpu().contiguous()
        # safetensors refuses tensors that share storage (tied weights): each gets its own copy.
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        tensors[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    try:
        text = json.dumps(meta)
    except TypeError as exc:
        raise CheckpointError(f"this checkpoint's metadata cannot be stored in safetensors ({exc})") from None
    return save(tensors, metadata={_METADATA_KEY: text})


def save_checkpoint(path: Path, model: HashModel, config: dict, extra: Optional[dict] = None) -> None:
    """Writes NAME.pt or NAME.safetensors (by the suffix); extra entries must be JSON values for safetensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        data = _safetensors_bytes(model.state_dict(), {"model": model.spec, "config": config, **(extra or {})})
    else:
        buffer = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "model": model.spec, "config": config, **(extra or {})},
                   buffer)
        data = buffer.getvalue()
    atomic_write_bytes(path, [data])


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        raw = path.read_bytes()
        state_dict = load(raw)
        # The header: 8 bytes of length, then JSON whose "__metadata__" holds ours.
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        ckpt = json.loads(header.get("__metadata__", {}).get(_METADATA_KEY, "null"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except (SafetensorError, ValueError, OSError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a brcd checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: a safetensors file without brcd's metadata (model and config)")
    ckpt["state_dict"] = state_dict
    return ckpt


def load_checkpoint(path: Path) -> dict:
    """A checkpoint of either format as one dict: state_dict, model (the spec), config, and what was saved with it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        ckpt = _load_safetensors(path)
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
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

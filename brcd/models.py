"""Hashing models: a timm backbone and a hash head (linear, sigmoid, sign with a straight-through gradient).

One factory, :func:`build_model`, knows how models are made; any timm name is accepted.

>>> teacher = build_model(TEACHER_DEFAULT, bits=64, in_chans=1, img_size=28)
>>> probs, codes = teacher(images)          # codes are ±1, gradients flow through probs
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["TEACHER_DEFAULT", "STUDENT_DEFAULT", "HashHead", "HashModel", "build_model", "ModelError"]

TEACHER_DEFAULT = "vit_tiny_patch16_224"
STUDENT_DEFAULT = "mobilenetv3_small_050"


class ModelError(ValueError):
    """An unknown model name, bad bits, or a weights file that does not fit."""


class SignST(torch.autograd.Function):
    """sign(x) in the forward, identity in the backward (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):
        return grad


class HashHead(nn.Module):
    """features -> bit probabilities -> ±1 codes. In training the threshold is uniform noise (stochastic binary
    codes, as CIBHash); in evaluation it is 0.5."""

    def __init__(self, in_features: int, bits: int, stochastic: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, bits)
        self.stochastic = stochastic

    def forward(self, features: Tensor) -> Tuple[Tensor, Tensor]:
        probs = torch.sigmoid(self.linear(features))
        threshold = torch.rand_like(probs) if (self.training and self.stochastic) else torch.full_like(probs, 0.5)
        return probs, SignST.apply(probs - threshold)


class HashModel(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, bits: int, name: str, spec: Optional[dict] = None):
        super().__init__()
        self.backbone = backbone
        self.head = HashHead(feature_dim, bits)
        self.name = name
        self.bits = bits
        # What build_model needs to make this model again (stored in checkpoints).
        self.spec = spec or {"name": name, "bits": bits}

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        return self.head(self.backbone(images))


def _small_image_kwargs(name: str, img_size: int) -> dict:
    # Vision transformers need the input size, and a patch small enough for small images: a 4 x 4 grid of patches
    # (16 tokens) for images up to 64 pixels.
    if name.startswith(("vit", "deit")):
        small = img_size <= 64 and img_size % 4 == 0
        return {"img_size": img_size, "patch_size": img_size // 4 if small else 16}
    return {}


def _read_weights(path: Path) -> dict:
    """A state_dict from a torch file (weights_only) or a safetensors file; a brcd checkpoint gives its backbone."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and safetensors failures alike: not a weights file
        raise ModelError(f"{path}: cannot load backbone weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state_dict of tensors")
    if state and all(k.startswith(("backbone.", "head.")) for k in state):  # a brcd model: its backbone
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first convolution's weight [out, c, kh, kw] for `in_chans` input channels, as timm adapts pretrained
    weights: summed over the channels for one channel, else the channels repeated in turn and scaled by
    c / in_chans (so a constant image gives the same response). Written here because timm's own helper changed its
    signature between releases."""
    base = weight.shape[1]
    if in_chans == base:
        return weight
    w = weight.float()
    if in_chans == 1:
        adapted = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // base)
        adapted = w.repeat(1, reps, 1, 1)[:, :in_chans] * (base / in_chans)
    return adapted.to(weight.dtype)


def _load_backbone_weights(backbone: nn.Module, path: Path, name: str, in_chans: int) -> None:
    """Loads what fits by name. A first convolution made for another number of input channels is adapted
    (adapt_first_conv); any other shape mismatch is an error."""
    state = _read_weights(path)
    own = backbone.state_dict()
    fitting = {k: v for k, v in state.items() if k in own}
    if not fitting:
        raise ModelError(f"{path}: none of its tensors fit {name}")
    for key, value in fitting.items():
        want = own[key].shape
        if value.shape == want:
            continue
        if value.dim() == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:] and want[1] == in_chans:
            fitting[key] = adapt_first_conv(value, in_chans)
        else:
            raise ModelError(f"{path}: does not fit {name} ({key} has shape {tuple(value.shape)}, the model needs "
                             f"{tuple(want)})")
    backbone.load_state_dict(fitting, strict=False)


def build_model(name: str, bits: int, *, in_chans: int = 3, img_size: int = 224,
                pretrained_path: Optional[Union[str, Path]] = None, **timm_kwargs) -> HashModel:
    """A timm backbone (no classifier, pretrained=False) with a hash head of `bits` bits.

    pretrained_path: local backbone weights, a torch state_dict (loaded with weights_only=True), a safetensors file
    (as timm's releases are) or a brcd checkpoint; nothing is downloaded. Tensors are matched by name.
    """
    import timm

    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ModelError(f"bits must be a positive integer, got {bits!r}")
    if not timm.is_model(name):
        raise ModelError(f"unknown model name {name!r} (any timm model name works, e.g. {STUDENT_DEFAULT!r})")
    kwargs = dict(pretrained=False, num_classes=0, in_chans=in_chans)
    kwargs.update(_small_image_kwargs(name, img_size))
    kwargs.update(timm_kwargs)
    backbone = timm.create_model(name, **kwargs)
    if pretrained_path is not None:
        _load_backbone_weights(backbone, Path(pretrained_path), name, in_chans)
    backbone.eval()
    with torch.no_grad():  # the feature size, whatever the model's head does with num_classes=0
        feature_dim = backbone(torch.zeros(1, in_chans, img_size, img_size)).shape[-1]
    backbone.train()
    spec = {"name": name, "bits": bits, "in_chans": in_chans, "img_size": img_size, **timm_kwargs}
    return HashModel(backbone, feature_dim, bits, name, spec)

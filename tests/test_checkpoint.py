"""Checkpoints in both formats: round trips, and files that are not checkpoints of ours."""
import json

import pytest
import torch

from brcd.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from brcd.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet10t", 16, in_chans=1, img_size=16).eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip(tmp_path, model, suffix):
    path = tmp_path / f"m{suffix}"
    save_checkpoint(path, model, {"bits": 16, "lr": 1e-3}, {"epoch": 3, "scores": {"val_map_symmetric": 0.5}})
    ckpt = load_checkpoint(path)
    assert ckpt["config"] == {"bits": 16, "lr": 1e-3} and ckpt["epoch"] == 3 and ckpt["model"] == model.spec
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][key], value), key
    loaded = load_model(path)
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(loaded(x)[0], model(x)[0])
    if suffix == ".pt":  # the torch format stays loadable without brcd
        assert "state_dict" in torch.load(path, weights_only=True)
    else:  # and safetensors without torch's pickle: the spec is JSON in the metadata
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            assert json.loads(f.metadata()["brcd"])["model"]["bits"] == 16


def test_not_checkpoints(tmp_path, model):
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, bare)
    with pytest.raises(CheckpointError, match="without brcd's metadata"):
        load_checkpoint(bare)
    for name in ("junk.safetensors", "junk.pt"):
        (tmp_path / name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        with pytest.raises(CheckpointError, match="not a brcd checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_a_failed_write_keeps_the_good_checkpoint(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"bits": 16})
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="metadata"):
        save_checkpoint(path, model, {"bits": 16}, {"not_json": object()})
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]

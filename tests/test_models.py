"""The model factory: timm backbones with a hash head."""
import pytest
import torch

from brcd.models import STUDENT_DEFAULT, TEACHER_DEFAULT, ModelError, build_model


@pytest.mark.parametrize("name", [TEACHER_DEFAULT, STUDENT_DEFAULT, "resnet10t"])
def test_codes_and_straight_through_gradient(name):
    torch.manual_seed(0)
    model = build_model(name, 16, in_chans=1, img_size=28)
    x = torch.randn(4, 1, 28, 28)
    probs, codes = model(x)
    assert probs.shape == codes.shape == (4, 16)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    codes.sum().backward()  # the sign passes gradients straight through to the probabilities
    assert model.head.linear.weight.grad is not None and model.head.linear.weight.grad.abs().sum() > 0
    model.eval()
    p, c = model(x)
    assert torch.equal(c, torch.where(p >= 0.5, 1.0, -1.0))  # deterministic threshold in evaluation


def test_bad_model_arguments(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        build_model("not_a_model", 16)
    with pytest.raises(ModelError, match="bits"):
        build_model(STUDENT_DEFAULT, 0)
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot load"):
        build_model(STUDENT_DEFAULT, 8, in_chans=1, img_size=28, pretrained_path=bad)


def test_local_pretrained_weights_load(tmp_path):
    torch.manual_seed(1)
    a = build_model("resnet10t", 8, in_chans=1, img_size=28)
    path = tmp_path / "backbone.pt"
    torch.save(a.backbone.state_dict(), path)
    b = build_model("resnet10t", 8, in_chans=1, img_size=28, pretrained_path=path)
    for (ka, va), (kb, vb) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    other = tmp_path / "other.pt"
    torch.save({"nothing.fits": torch.zeros(3)}, other)
    with pytest.raises(ModelError, match="fit"):
        build_model("resnet10t", 8, in_chans=1, img_size=28, pretrained_path=other)

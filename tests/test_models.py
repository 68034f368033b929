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


def test_pretrained_weights_from_safetensors_a_checkpoint_and_another_channel_count(tmp_path):
    from safetensors.torch import save_file

    from brcd.checkpoint import save_checkpoint

    torch.manual_seed(2)
    rgb = build_model("resnet10t", 8, in_chans=3, img_size=28)
    st = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.backbone.state_dict().items()}, st)
    same = build_model("resnet10t", 8, in_chans=3, img_size=28, pretrained_path=st)
    assert all(torch.equal(v, same.backbone.state_dict()[k]) for k, v in rgb.backbone.state_dict().items())
    # A grayscale model from RGB weights: the first convolution summed over the input channels.
    gray = build_model("resnet10t", 8, in_chans=1, img_size=28, pretrained_path=st)
    first = next(k for k, v in rgb.backbone.state_dict().items() if v.dim() == 4)
    assert torch.allclose(gray.backbone.state_dict()[first], rgb.backbone.state_dict()[first].sum(1, keepdim=True))
    # Five channels from RGB weights: R, G, B, R, G, scaled by 3/5.
    five = build_model("resnet10t", 8, in_chans=5, img_size=28, pretrained_path=st)
    w = rgb.backbone.state_dict()[first]
    assert torch.allclose(five.backbone.state_dict()[first], torch.cat([w, w[:, :2]], dim=1) * 0.6)
    # The backbone of a brcd checkpoint.
    ckpt = tmp_path / "teacher.pt"
    save_checkpoint(ckpt, rgb, {"bits": 8})
    again = build_model("resnet10t", 16, in_chans=3, img_size=28, pretrained_path=ckpt)
    assert all(torch.equal(v, again.backbone.state_dict()[k]) for k, v in rgb.backbone.state_dict().items())
    wrong = build_model("resnet18", 8, in_chans=3, img_size=28)
    bad = tmp_path / "resnet18.pt"
    torch.save(wrong.backbone.state_dict(), bad)
    with pytest.raises(ModelError, match="does not fit resnet10t"):
        build_model("resnet10t", 8, in_chans=3, img_size=28, pretrained_path=bad)

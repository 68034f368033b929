"""brcd.augment.BatchAugment: each step against torchvision's function for one image, the random choices' law
(torchvision's crop draw, the probabilities), and the views' determinism on every device."""
import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from brcd import augment as A
from brcd.augment import AugmentParams, BatchAugment
from conftest import device_params

DEVICES = device_params()


def _images(n=6, channels=3, size=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)


def _float(images, device):
    return (images.float() / 255).to(device)


def _jitter_one(x, op, factor):
    """BatchAugment's colour jitter with one operation (an index into COLOR_OPS) per image, by its factor."""
    n, channels = x.shape[:2]
    aug = BatchAugment(x.shape[-1], channels)
    order = torch.full((n, aug.color_ops), -1, device=x.device)
    order[:, 0] = op
    factors = torch.ones(n, 4, device=x.device)
    factors[:, 3] = 0
    factors[:, op] = factor
    return aug.color_jitter(x, order, factors, tuple(r.to(x.device) for r in A.hue_rows_of(order.cpu())))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, theirs, low, high", [
    (0, TF.adjust_brightness, 0.6, 1.4),
    (1, TF.adjust_contrast, 0.6, 1.4),
    (2, TF.adjust_saturation, 0.6, 1.4),
    (3, TF.adjust_hue, -0.1, 0.1),
], ids=list(A.COLOR_OPS))
def test_color_ops_match_torchvision_image_by_image(device, op, theirs, low, high):
    x = _float(_images(8), device)
    x[0] = 0.5  # a gray image: no hue, no saturation
    x[1, :, :4] = 1.0  # saturated and tied channels
    factor = torch.linspace(low, high, 8, device=device)
    ours = _jitter_one(x, op, factor)
    expected = torch.stack([theirs(x[i], float(factor[i])) for i in range(8)])
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6)
    assert torch.equal(_jitter_one(x, op, torch.full_like(factor, 0.0 if op == 3 else 1.0))[0], x[0])


@pytest.mark.parametrize("device", DEVICES)
def test_contrast_and_brightness_of_grayscale_images(device):
    x = _float(_images(4, channels=1), device)
    factor = torch.tensor([0.6, 0.9, 1.1, 1.4], device=device)
    for op, theirs in ((0, TF.adjust_brightness), (1, TF.adjust_contrast)):
        expected = torch.stack([theirs(x[i], float(factor[i])) for i in range(4)])
        torch.testing.assert_close(_jitter_one(x, op, factor), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_blur_matches_torchvision_and_sigma_zero_leaves_the_image(device):
    x = _float(_images(6), device)
    sigma = torch.tensor([0.1, 0.5, 1.0, 0.0, 0.3, 0.9], device=device)
    ours = A.gaussian_blur3(x, sigma)
    for i in range(6):
        if sigma[i] == 0:
            assert torch.equal(ours[i], x[i])
        else:
            expected = TF.gaussian_blur(x[i], [3, 3], [float(sigma[i])] * 2)
            torch.testing.assert_close(ours[i], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
def test_resized_crop_matches_torchvision(device, channels):
    """Bilinear, and (the crop never larger than the output) antialiasing changes nothing."""
    images = _images(6, channels).to(device)
    crop = torch.tensor([[0, 0, 20, 20], [2, 3, 10, 12], [5, 1, 15, 15], [0, 0, 14, 18], [3, 0, 17, 20],
                         [19, 19, 1, 1]], device=device)
    flip = torch.tensor([False, True, False, True, False, True], device=device)
    ours = BatchAugment(20, channels).resized_crop(images, crop, flip)
    for i in range(6):
        expected = TF.resized_crop(images[i].float() / 255, *crop[i].tolist(), [20, 20], antialias=True)
        if flip[i]:
            expected = TF.horizontal_flip(expected)
        torch.testing.assert_close(ours[i], expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("order, ops", [([0, 1], (TF.adjust_brightness, TF.adjust_contrast)),
                                        ([1, 0], (TF.adjust_contrast, TF.adjust_brightness)),
                                        ([3, 2, 0, 1], (TF.adjust_hue, TF.adjust_saturation, TF.adjust_brightness,
                                                        TF.adjust_contrast))])
def test_color_jitter_applies_each_images_own_order(order, ops):
    channels = 3 if len(order) == 4 else 1
    aug = BatchAugment(20, channels)
    x = _float(_images(2, channels), "cpu")
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.08]] * 2)
    rows = torch.tensor([order, [-1] * len(order)])  # image 1 is not jittered
    ours = aug.color_jitter(x, rows, factors, A.hue_rows_of(rows))
    expected = x[0]
    for op in ops:
        name = op.__name__.removeprefix("adjust_")
        expected = op(expected, float(factors[0, A.COLOR_OPS.index(name)]))
    torch.testing.assert_close(ours[0], expected, rtol=0, atol=2e-6)
    assert torch.equal(ours[1], x[1])


def test_identity_choices_give_the_image_back():
    images = _images(3)
    params = AugmentParams(crop=torch.tensor([[0, 0, 20, 20]] * 3), flip=torch.zeros(3, dtype=torch.bool),
                           color_order=torch.full((3, 4), -1), color_factors=torch.ones(3, 4),
                           grayscale=torch.zeros(3, dtype=torch.bool), blur_sigma=torch.zeros(3),
                           hue_rows=A.hue_rows_of(torch.full((3, 4), -1)))
    torch.testing.assert_close(BatchAugment(20, 3).apply(images, params), images.float() / 255, rtol=0, atol=1e-6)


def test_grayscale_choice_gives_three_equal_luma_channels():
    images = _images(2)
    params = AugmentParams(crop=torch.tensor([[0, 0, 20, 20]] * 2), flip=torch.zeros(2, dtype=torch.bool),
                           color_order=torch.full((2, 4), -1), color_factors=torch.ones(2, 4),
                           grayscale=torch.tensor([True, False]), blur_sigma=torch.zeros(2),
                           hue_rows=A.hue_rows_of(torch.full((2, 4), -1)))
    out = BatchAugment(20, 3).apply(images, params)
    expected = TF.rgb_to_grayscale(images[0].float() / 255, num_output_channels=3)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=2e-6)
    assert not torch.equal(out[1][0], out[1][1])


def test_crop_draws_follow_torchvision():
    """Boxes inside the image with 0.5 to 1 of its area (up to rounding) and ratios 3/4 to 4/3; positions uniform."""
    gen = torch.Generator().manual_seed(1)
    crop = BatchAugment(32, 3).sample(20000, 32, 32, gen).crop
    top, left, h, w = crop.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).double() / 32 ** 2
    assert area.min() >= 0.45 and area.max() <= 1.0
    ratio = w.double() / h
    assert ratio.min() >= 0.75 * 0.9 and ratio.max() <= 4 / 3 * 1.1
    # torchvision's own draw, with the global generator: the same law (means of area and ratio within 1 %).
    torch.manual_seed(1)
    theirs = torch.tensor([T.RandomResizedCrop(32, scale=(0.5, 1.0)).make_params([torch.zeros(1, 32, 32)])["height"]
                           for _ in range(4000)]).double()
    assert abs(h.double().mean() / theirs.mean() - 1) < 0.01
    # A uniform position among the 33 - h rows the box can start at: (top + 1/2) / (33 - h) averages 1/2.
    assert abs(((top.double() + 0.5) / (32 - h + 1).double()).mean() - 0.5) < 0.01
    assert abs(((left.double() + 0.5) / (32 - w + 1).double()).mean() - 0.5) < 0.01


@pytest.mark.parametrize("height, width", [(1, 100), (100, 1), (40, 40)])
def test_crop_fallback_is_torchvisions(height, width):
    """Where no try fits (a sliver of an image), the centre at the nearest allowed aspect ratio, as torchvision."""
    gen = torch.Generator().manual_seed(0)
    crop = BatchAugment(8, 3).sample(50, height, width, gen).crop
    if height == width:
        return  # every draw fits a square image; nothing falls back
    params = T.RandomResizedCrop(8, scale=(0.5, 1.0)).make_params([torch.zeros(1, height, width)])
    expected = torch.tensor([params["top"], params["left"], params["height"], params["width"]])
    assert (crop == expected).all()


def test_probabilities_and_orders():
    gen = torch.Generator().manual_seed(2)
    n = 40000
    p = BatchAugment(32, 3).sample(n, 32, 32, gen)
    jittered = p.color_order[:, 0] >= 0
    for share, expected in ((p.flip, 0.5), (jittered, 0.8), (p.grayscale, 0.2), (p.blur_sigma > 0, 0.5)):
        assert abs(share.double().mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert (p.color_order[~jittered] == -1).all()
    assert (p.color_order[jittered].sort(dim=1).values == torch.arange(4)).all()  # a permutation each
    first = p.color_order[jittered][:, 0]
    assert (torch.bincount(first, minlength=4).double() / len(first) - 0.25).abs().max() < 0.01
    factors = p.color_factors
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4
    assert factors[:, 3].min() >= -0.1 and factors[:, 3].max() <= 0.1
    sigma = p.blur_sigma[p.blur_sigma > 0]
    assert sigma.min() >= 0.1 and sigma.max() <= 1.0
    gray = BatchAugment(32, 1).sample(1000, 32, 32, gen)
    assert not gray.grayscale.any() and gray.color_order.shape == (1000, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_choices_reach_the_device_unchanged(device):
    gen = torch.Generator().manual_seed(3)
    for channels in (1, 3):
        p = BatchAugment(16, channels).sample(50, 16, 16, gen)
        q = p.to(device)
        for name in ("crop", "flip", "color_order", "grayscale", "color_factors", "blur_sigma"):
            assert torch.equal(getattr(p, name), getattr(q, name).cpu()), name
        assert len(q.hue_rows) == p.color_order.shape[1]
        for mine, moved in zip(p.hue_rows, q.hue_rows):
            assert moved.device.type == device and torch.equal(mine, moved.cpu())
        # Each jittered RGB image turns its hue at exactly one position; a grayscale one never.
        rows = torch.cat(p.hue_rows)
        jittered = (p.color_order[:, 0] >= 0).nonzero()[:, 0]
        expected = jittered if channels == 3 else jittered[:0]
        assert torch.equal(rows.sort().values, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
def test_views_are_model_input_and_follow_the_generator(device, channels):
    aug = BatchAugment(20, channels)
    images = _images(16, channels).to(device)
    a = aug(images, torch.Generator().manual_seed(5))
    b = aug(images, torch.Generator().manual_seed(5))
    c = aug(images, torch.Generator().manual_seed(6))
    assert a.shape == (16, channels, 20, 20) and a.dtype == torch.float32 and a.device == images.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    if device != "cpu":  # the same choices on any device: the same views up to float rounding
        on_cpu = aug(images.cpu(), torch.Generator().manual_seed(5))
        torch.testing.assert_close(a.cpu(), on_cpu, rtol=0, atol=1e-5)


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="channels"):
        BatchAugment(20, 2)
    with pytest.raises(ValueError, match="size"):
        BatchAugment(0, 3)
    aug = BatchAugment(20, 3)
    gen = torch.Generator()
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 3, 20, 20), gen)
    with pytest.raises(ValueError, match="channels"):
        aug(torch.zeros(2, 1, 20, 20, dtype=torch.uint8), gen)

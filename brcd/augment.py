"""The two-view augmentation of a whole batch at once, on the batch's device.

The same distribution as `brcd.data.two_view_transform` (torchvision's transforms, one image at a time in the data
loader): a random resized crop (scale 0.5 to 1, aspect ratio 3/4 to 4/3, ten tries then the centre, as torchvision
draws it) with bilinear resampling, a horizontal flip, colour jitter with probability 0.8 (brightness and contrast 0.4;
for RGB also saturation 0.4 and hue 0.1, the factors applied in a random order per image), random grayscale with
probability 0.2 (RGB), and a 3 x 3 Gaussian blur with probability 0.5 (sigma 0.1 to 1, reflected borders).

Every random choice is drawn on the CPU from one generator (the training loop's, saved with its resume state), as one
small table per batch; the pixels are worked on where the images are. On a GPU a training step then waits for no
loader process and copies uint8 images rather than two float views; the same generator state gives the same views on
any device. The pixel arithmetic is in float32 throughout (torchvision rounds a uint8 image after each step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import to_device

__all__ = ["BatchAugment", "AugmentParams", "COLOR_OPS", "hue_rows_of"]

# The law of the two views, the one place that states it (brcd.data.two_view_transform gives torchvision's transforms
# these values too).
CROP_SCALE = (0.5, 1.0)  # of the image's area
CROP_RATIO = (3 / 4, 4 / 3)  # width / height
CROP_TRIES = 10
FLIP_P = 0.5
JITTER_P = 0.8
BRIGHTNESS = CONTRAST = SATURATION = 0.4
HUE = 0.1
GRAYSCALE_P = 0.2
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 1.0)  # of a 3 x 3 kernel
_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's grayscale

# The colour-jitter operations, in the order of AugmentParams.color_factors' columns; a grayscale image has the first two.
COLOR_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass
class AugmentParams:
    """One batch's random choices (one row per image), drawn on the CPU by BatchAugment.sample.

    crop: [B, 4] int64 (top, left, height, width) of the crop in the source image; flip: [B] bool;
    color_order: [B, n_ops] int64, the jitter operations (indices into COLOR_OPS) in the order they apply, -1 where the
    image is not jittered; color_factors: [B, 4] (brightness, contrast, saturation factors, hue shift);
    grayscale: [B] bool; blur_sigma: [B] float, 0 where the image is not blurred; hue_rows: for each position of
    the order, the rows (int64) of the images whose operation there is the hue (`hue_rows_of(color_order)`).
    """

    crop: Tensor
    flip: Tensor
    color_order: Tensor
    color_factors: Tensor
    grayscale: Tensor
    blur_sigma: Tensor
    hue_rows: Tuple[Tensor, ...]

    def rows(self, start: int, stop: int) -> "AugmentParams":
        """The choices of images start to stop - 1 (CPU)."""
        order = self.color_order[start:stop]
        return AugmentParams(self.crop[start:stop], self.flip[start:stop], order, self.color_factors[start:stop],
                             self.grayscale[start:stop], self.blur_sigma[start:stop], hue_rows_of(order))

    def to(self, device) -> "AugmentParams":
        """The choices on `device`, in two copies (pinned, to a GPU): one float32 table of every per-image choice
        (each integer in it exact) and one vector of the hue rows, split by counts known here, on the host, so that
        the device never has to report a size."""
        table = to_device(torch.cat([self.crop.float(), self.flip.float()[:, None], self.color_order.float(),
                                     self.color_factors.float(), self.grayscale.float()[:, None],
                                     self.blur_sigma.float()[:, None]], dim=1), device)
        rows = to_device(torch.cat(self.hue_rows), device).split([len(r) for r in self.hue_rows])
        crop, flip, order, factors, gray, sigma = table.split([4, 1, self.color_order.shape[1], 4, 1, 1], dim=1)
        return AugmentParams(crop.long(), flip[:, 0] > 0.5, order.long(), factors, gray[:, 0] > 0.5, sigma[:, 0],
                             tuple(rows))


def hue_rows_of(color_order: Tensor) -> Tuple[Tensor, ...]:
    """For each position of a (CPU) jitter order, the rows whose operation there is the hue."""
    hue = COLOR_OPS.index("hue")
    return tuple((color_order[:, p] == hue).nonzero()[:, 0] for p in range(color_order.shape[1]))


class BatchAugment:
    """Two-view augmentation of uint8 image batches [B, C, H, W] (C = 1 or 3) into `size` x `size` model input in
    [-1, 1] (as `brcd.data.to_model_input`), on the images' device.

    >>> aug = BatchAugment(size=28, channels=1)
    >>> gen = torch.Generator().manual_seed(0)
    >>> view = aug(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), gen)   # float32 [4, 1, 28, 28]
    """

    def __init__(self, size: int, channels: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        self.size, self.channels = size, channels
        self.color_ops = len(COLOR_OPS) if channels == 3 else 2

    # ------------------------------------------------------------------------------------------------ the draws
    def sample(self, batch: int, height: int, width: int, gen: torch.Generator) -> AugmentParams:
        """The random choices for `batch` images of height x width, from `gen` (a CPU generator)."""
        def uniform(*shape, low=0.0, high=1.0):
            return torch.rand(*shape, generator=gen, dtype=torch.float64) * (high - low) + low

        crop = self._sample_crops(batch, height, width, uniform)
        flip = uniform(batch) < FLIP_P
        jitter = uniform(batch) < JITTER_P
        order = torch.argsort(uniform(batch, self.color_ops), dim=1)  # a random permutation per image
        order = torch.where(jitter[:, None], order, torch.full_like(order, -1))
        factors = torch.stack([uniform(batch, low=1 - BRIGHTNESS, high=1 + BRIGHTNESS),
                               uniform(batch, low=1 - CONTRAST, high=1 + CONTRAST),
                               uniform(batch, low=1 - SATURATION, high=1 + SATURATION),
                               uniform(batch, low=-HUE, high=HUE)], dim=1).float()
        grayscale = (uniform(batch) < GRAYSCALE_P) & (self.channels == 3)
        blur = uniform(batch) < BLUR_P
        sigma = torch.where(blur, uniform(batch, low=BLUR_SIGMA[0], high=BLUR_SIGMA[1]), 0.0).float()
        return AugmentParams(crop, flip, order, factors, grayscale, sigma, hue_rows_of(order))

    @staticmethod
    def _sample_crops(batch: int, height: int, width: int, uniform) -> Tensor:
        """torchvision's RandomResizedCrop draw for each image: up to ten (area, aspect ratio) tries, the first whose
        box fits, at a uniform position; the whole image (or its centre at the nearest allowed ratio) otherwise."""
        area = uniform(batch, CROP_TRIES, low=CROP_SCALE[0], high=CROP_SCALE[1]) * (height * width)
        ratio = torch.exp(uniform(batch, CROP_TRIES, low=math.log(CROP_RATIO[0]), high=math.log(CROP_RATIO[1])))
        w = torch.round(torch.sqrt(area * ratio)).long()
        h = torch.round(torch.sqrt(area / ratio)).long()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.long().argmax(dim=1, keepdim=True)
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        found = fits.any(dim=1)
        in_ratio = width / height
        if in_ratio < CROP_RATIO[0]:
            fallback_w, fallback_h = width, int(round(width / CROP_RATIO[0]))
        elif in_ratio > CROP_RATIO[1]:
            fallback_w, fallback_h = int(round(height * CROP_RATIO[1])), height
        else:
            fallback_w, fallback_h = width, height
        w = torch.where(found, w, fallback_w)
        h = torch.where(found, h, fallback_h)
        top = torch.where(found, (uniform(batch) * (height - h + 1)).long(), (height - h) // 2)
        left = torch.where(found, (uniform(batch) * (width - w + 1)).long(), (width - w) // 2)
        return torch.stack([top, left, h, w], dim=1)

    # ------------------------------------------------------------------------------------------------ the pixels
    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """The augmented images, float32 in [0, 1], [B, C, size, size] (params on the images' device)."""
        x = self.resized_crop(images, params.crop, params.flip)
        x = self.color_jitter(x, params.color_order, params.color_factors, params.hue_rows)
        if self.channels == 3:
            x = torch.where(_per_image(params.grayscale), grayscale(x).expand_as(x), x)
        return gaussian_blur3(x, params.blur_sigma)

    def __call__(self, images: Tensor, gen: torch.Generator, shard: Tuple[int, int] = (0, 1)) -> Tensor:
        """One view of a uint8 batch as model input in [-1, 1]: the choices drawn from `gen`, then applied where the
        images are (two copies of the choices to a GPU).

        `shard` = (rank, ranks): the images are that rank's share of a batch split evenly over the ranks of a
        data-parallel run. The choices of the whole batch are drawn (every rank's `gen` in the same state) and the
        rank's rows kept, so the ranks together make the views that one process makes of the whole batch."""
        rank, ranks = shard
        if not 0 <= rank < ranks:
            raise ValueError(f"shard must be (rank, ranks) with 0 <= rank < ranks, got {shard!r}")
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor [B, C, H, W]")
        if images.shape[1] != self.channels:
            raise ValueError(f"images have {images.shape[1]} channels, the augmentation was made for {self.channels}")
        n = images.shape[0]
        params = self.sample(n * ranks, images.shape[2], images.shape[3], gen)
        if ranks > 1:
            params = params.rows(rank * n, (rank + 1) * n)
        return self.apply(images, params.to(images.device)).mul_(2.0).sub_(1.0)
        return self.apply(images, params).mul_(2.0).sub_(1.0)

    def resized_crop(self, images: Tensor, crop: Tensor, flip: Tensor) -> Tensor:
        """Each image's crop box resized to size x size, bilinear (the centres of the output pixels mapped into the
        box, clamped to its edge pixels, as interpolating the cropped image does), then mirrored where `flip`."""
        n, _, height, width = images.shape
        crop = crop.to(torch.float32)
        top, left, h, w = crop.unbind(1)
        centres = torch.arange(self.size, device=images.device, dtype=torch.float32) + 0.5

        def source(start, length):  # [B, size] source coordinates of the output pixels along one axis
            at = start[:, None] + centres * (length / self.size)[:, None] - 0.5
            return torch.minimum(torch.maximum(at, start[:, None]), (start + length - 1)[:, None])

        ys, xs = source(top, h), source(left, w)
        xs = torch.where(flip[:, None], xs.flip(1), xs)
        # grid_sample's coordinates (align_corners=False): -1 and 1 are the outer edges of the first and last pixels.
        gx = (2 * xs + 1) / width - 1
        gy = (2 * ys + 1) / height - 1
        grid = torch.stack([gx[:, None, :].expand(n, self.size, self.size),
                            gy[:, :, None].expand(n, self.size, self.size)], dim=-1)
        x = images.to(torch.float32).div_(255.0)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def color_jitter(self, x: Tensor, order: Tensor, factors: Tensor, hue_rows: Tuple[Tensor, ...]) -> Tensor:
        """The jitter operations in each image's own order, a position at a time. Brightness, contrast and
        saturation are each a blend, f * x + (1 - f) * g (g: black, the mean luma, the pixel's luma), so one blend
        serves every image at a position, with f = 1 where the image's operation there is another (which leaves it
        exactly as it was); then the hue turns the images whose operation it is there (`hue_rows`, found on the host:
        on a GPU, finding them would wait for the device)."""
        for position in range(order.shape[1]):
            op = order[:, position]
            is_blend = (op >= 0) & (op <= 2)
            f = torch.where(is_blend, factors.gather(1, op.clamp(0, 2)[:, None])[:, 0], torch.ones_like(factors[:, 0]))
            gray = grayscale(x)
            toward = torch.where(_per_image(op == 1), gray.mean(dim=(2, 3), keepdim=True),
                                 torch.where(_per_image(op == 2), gray, torch.zeros_like(gray)))
            f = _per_image(f)
            x = (f * x + (1 - f) * toward).clamp_(0.0, 1.0)
            rows = hue_rows[position]
            if len(rows):  # a size known on the host
                x = x.index_copy(0, rows, adjust_hue(x[rows], factors[rows, 3]))
        return x


def _per_image(values: Tensor) -> Tensor:
    return values[:, None, None, None]


def grayscale(x: Tensor) -> Tensor:
    """[B, 1, H, W] luma of RGB images (a grayscale image is its own)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b)[:, None]


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Hue turned by `shift` (a fraction of the circle) in HSV, saturation and value kept."""
    r, g, b = x.unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    inverse = torch.where(chroma > 0, chroma.reciprocal(), torch.zeros_like(chroma))  # grays keep hue 0
    # The hue in sixths of the circle, from the largest channel (red first where channels tie, as torchvision's
    # conversion picks it), then shifted and brought back into [0, 6).
    hue6 = torch.where(value == r, (g - b) * inverse,
                       torch.where(value == g, (b - r) * inverse + 2.0, (r - g) * inverse + 4.0))
    hue6 = hue6 + (6.0 * shift)[:, None, None]
    hue6 = hue6 - 6.0 * torch.floor(hue6 * (1.0 / 6.0))
    # HSV back to RGB: channel c (offset 5 for red, 3 for green, 1 for blue) is
    # value - chroma * clamp(min(k, 4 - k), 0, 1) with k = (offset + hue6) mod 6, i.e. min(k, 4 - k) = 2 - |k - 2|.
    # offset - 2 for the three channels: 3, 1, -1 (arange, not a tensor from a list: that would be a copy to a GPU
    # that waits for its queue).
    offset = (3.0 - 2.0 * torch.arange(3, device=x.device, dtype=x.dtype))[None, :, None, None]
    d = offset + hue6[:, None]
    d = torch.where(d >= 4.0, d - 6.0, d)  # k - 2 in [-2, 4)
    return (value[:, None] - chroma[:, None] * (2.0 - d.abs()).clamp_(0.0, 1.0)).clamp_(0.0, 1.0)


def gaussian_blur3(x: Tensor, sigma: Tensor) -> Tensor:
    """A 3 x 3 Gaussian blur of each image with its own sigma (0: left as it is), reflected at the borders."""
    n, c, h, w = x.shape
    if h < 2 or w < 2:  # reflection needs two pixels: nothing to blur across
        return x
    s = sigma.to(x.dtype)
    side = torch.exp(-0.5 / torch.where(s > 0, s, torch.ones_like(s)) ** 2)
    side = torch.where(s > 0, side, torch.zeros_like(side)) / (1 + 2 * side)  # the outer taps; 0: no blur
    taps = torch.stack([side, 1 - 2 * side, side], dim=1).repeat_interleave(c, dim=0)  # per image and channel
    # Separable, as a grouped convolution (a group per image and channel) along the rows, then the columns.
    flat = F.pad(x.reshape(1, n * c, h, w), (1, 1, 1, 1), mode="reflect")
    flat = F.conv2d(flat, taps[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, taps[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)

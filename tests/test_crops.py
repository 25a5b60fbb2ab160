"""Crop geometry against torchvision's RandomResizedCrop.get_params (the oracle)."""

from __future__ import annotations

import random

import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from relabel_shards.crops import crop_box, random_resized_crop_params


class _TorchDraws(random.Random):
    """A ``random.Random`` whose draws come from torch's global generator, in torchvision's order."""

    def uniform(self, a, b):  # noqa: D102
        return torch.empty(1).uniform_(a, b).item()

    def randint(self, a, b):  # noqa: D102  (inclusive, like random.randint)
        return int(torch.randint(a, b + 1, size=(1,)).item())


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (64, 64), (1000, 12), (3, 700)])
@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.35, 1.0), (0.5, 2.0)),
                                         ((0.9, 1.0), (1.0, 1.0))])
def test_same_windows_as_torchvision_from_the_same_draws(size, scale, ratio):
    width, height = size
    img = torch.zeros(1, height, width)
    ours, theirs = [], []
    torch.manual_seed(0)
    for _ in range(300):
        i, j, h, w = RandomResizedCrop.get_params(img, list(scale), list(ratio))
        theirs.append((j, i, w, h))
    torch.manual_seed(0)
    rng = _TorchDraws()
    for _ in range(300):
        ours.append(random_resized_crop_params(width, height, scale, ratio, rng))
    # torchvision does the log/exp of the ratio in float32, we in float64: a rounding may differ by 1 px.
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    assert same >= 297, f"{same}/300 identical"
    for a, b in zip(ours, theirs, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1


def test_fallback_is_torchvisions_center_crop():
    # A 1000x10 image with scale >= 0.9 and square crops never fits: the centered fallback decides.
    rng = random.Random(0)
    assert random_resized_crop_params(1000, 10, (0.9, 1.0), (1.0, 1.0), rng) == (495, 0, 10, 10)
    img = torch.zeros(1, 10, 1000)
    i, j, h, w = RandomResizedCrop.get_params(img, [0.9, 1.0], [1.0, 1.0])
    assert (j, i, w, h) == (495, 0, 10, 10)


def test_windows_inside_the_image_and_seeded():
    a = [random_resized_crop_params(37, 91, rng=random.Random(s)) for s in range(200)]
    b = [random_resized_crop_params(37, 91, rng=random.Random(s)) for s in range(200)]
    assert a == b
    assert len(set(a)) > 150
    for left, top, w, h in a:
        assert 0 <= left and left + w <= 37 and 0 <= top and top + h <= 91 and w > 0 and h > 0
        x1, y1, x2, y2 = crop_box(left, top, w, h, 37, 91)
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        assert x2 - x1 == pytest.approx(w / 37) and y2 - y1 == pytest.approx(h / 91)


def test_box_is_normalized_by_width_and_height():
    assert crop_box(10, 20, 30, 40, 100, 200) == (0.1, 0.1, 0.4, 0.3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(width=0, height=5), "width and height must be integers >= 1, got width=0"),
    (dict(width=5, height=5, scale=(0.5, 0.1)), r"scale must satisfy 0 < lo <= hi <= 1, got \(0.5, 0.1\)"),
    (dict(width=5, height=5, scale=(0.0, 1.0)), "scale must satisfy"),
    (dict(width=5, height=5, ratio=(-1, 2)), r"ratio must satisfy 0 < lo <= hi < inf, got \(-1, 2\)"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_resized_crop_params(**kwargs)
    with pytest.raises(ValueError, match="crop and image sizes must be > 0"):
        crop_box(0, 0, 0, 1, 1, 1)

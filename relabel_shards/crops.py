"""Crop geometry: random-resized-crop parameters (torchvision's distribution) and their normalized box.

The loader draws the crop on the *original* image size, so the box it hands to ``label_pooling`` is in
the coordinates the label map was predicted on, whatever reduced-size decoding (PIL draft mode) the
image itself goes through afterwards.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["random_resized_crop_params", "crop_box", "check_scale_ratio"]


def check_scale_ratio(scale: Sequence[float], ratio: Sequence[float]) -> tuple[tuple[float, float],
                                                                               tuple[float, float]]:
    """Validate RandomResizedCrop's ``scale`` and ``ratio`` ranges and return them as float pairs.

    Raises:
        ValueError: a range is not two numbers ``lo <= hi``, ``scale`` is outside ``(0, 1]`` or ``ratio``
            is not positive.
    """
    if len(scale) != 2 or len(ratio) != 2:
        raise ValueError(f"scale and ratio must be (lo, hi) pairs, got scale={scale!r}, ratio={ratio!r}")
    s0, s1 = float(scale[0]), float(scale[1])
    r0, r1 = float(ratio[0]), float(ratio[1])
    if not (0.0 < s0 <= s1 <= 1.0):
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale!r}")
    if not (0.0 < r0 <= r1) or not math.isfinite(r1):
        raise ValueError(f"ratio must satisfy 0 < lo <= hi < inf, got {ratio!r}")
    return (s0, s1), (r0, r1)


def random_resized_crop_params(
    width: int,
    height: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    rng: random.Random | None = None,
) -> tuple[int, int, int, int]:
    """Draw a RandomResizedCrop window with torchvision's parameter distribution.

    The same algorithm as ``torchvision.transforms.RandomResizedCrop.get_params``: up to 10 tries of an
    area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``, a uniform position for
    the first window that fits, else a centered crop clamped to ``ratio``. Only the random source differs
    (a ``random.Random`` instead of torch's global generator), so the loader's crops are reproducible from
    explicit seeds.

    Args:
        width: original image width in pixels (>= 1).
        height: original image height in pixels (>= 1).
        scale: (lo, hi) range of the crop's area as a fraction of the image area, ``0 < lo <= hi <= 1``.
        ratio: (lo, hi) range of the crop's aspect ratio width / height, ``0 < lo <= hi``.
        rng: source of randomness; a fresh unseeded ``random.Random`` when None.

    Returns:
        ``(left, top, crop_w, crop_h)`` in integer pixels of the original image, with
        ``0 <= left``, ``left + crop_w <= width`` and likewise for top and height.

    Raises:
        ValueError: a size is not a positive integer or a range is invalid.
    """
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ValueError(f"width and height must be integers >= 1, got width={width!r}, height={height!r}")
    (s0, s1), (r0, r1) = check_scale_ratio(scale, ratio)
    rng = rng if rng is not None else random.Random()
    width, height = int(width), int(height)
    area = width * height
    log_r0, log_r1 = math.log(r0), math.log(r1)
    for _ in range(10):
        target_area = area * rng.uniform(s0, s1)
        aspect = math.exp(rng.uniform(log_r0, log_r1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)  # inclusive bounds, as torch.randint(0, height - h + 1)
            left = rng.randint(0, width - w)
            return left, top, w, h
    # Fallback to a central crop, exactly as torchvision.
    in_ratio = width / height
    if in_ratio < r0:
        w = width
        h = int(round(w / r0))
    elif in_ratio > r1:
        h = height
        w = int(round(h * r1))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_box(left: float, top: float, crop_w: float, crop_h: float, width: int, height: int
             ) -> tuple[float, float, float, float]:
    """The normalized ``(x1, y1, x2, y2)`` box of a crop window, as ``label_pooling`` takes it.

    Args:
        left, top: the window's top-left corner in pixels of the original image.
        crop_w, crop_h: the window's size in pixels (> 0).
        width, height: the original image's size in pixels (> 0).

    Returns:
        ``(left / width, top / height, (left + crop_w) / width, (top + crop_h) / height)``: 0 is the
        image's left / top edge and 1 its right / bottom edge, so ``x1 < x2`` and ``y1 < y2``.

    Raises:
        ValueError: a size is not positive.
    """
    if crop_w <= 0 or crop_h <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"crop and image sizes must be > 0, got crop {crop_w}x{crop_h}, "
                         f"image {width}x{height}")
    return (left / width, top / height, (left + crop_w) / width, (top + crop_h) / height)

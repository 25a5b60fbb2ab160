"""The pluggable sample transform: the default gives the loader's old crops; photometric ops compose."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from test_loader_factory import make_shards

from relabel_shards.crops import crop_box, random_resized_crop_params
from relabel_shards.decode import CropConfig, decode_image
from relabel_shards.images import open_image
from relabel_shards.transforms import (
    TIMM_COLOR_OPS,
    CenterCrop,
    Compose,
    Crop,
    Lighting,
    RandomResizedCropFlip,
)


def _old_decode_image(data: bytes, cfg: CropConfig, rng: random.Random):
    """decode.decode_image as it was before transforms were pluggable (commit beebda6), verbatim."""
    img = Image.open(io.BytesIO(data))
    orientation = img.getexif().get(0x0112, 1) if img.format in ("JPEG", "WEBP", "TIFF") else 1
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
    width, height = img.size
    if cfg.center_crop is None:
        left, top, cw, ch = random_resized_crop_params(width, height, cfg.scale, cfg.ratio, rng)
    else:
        cw = ch = max(1, min(width, height, round(min(width, height) * cfg.center_crop)))
        left, top = (width - cw) // 2, (height - ch) // 2
    size = cfg.image_size
    reduce = min(cw, ch) / size
    if cfg.draft and reduce >= 2 and img.format == "JPEG":
        img.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
    sx, sy = img.size[0] / width, img.size[1] / height
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    out = img.resize(
        (size, size), Image.Resampling.BILINEAR, box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    )
    if out.mode != "RGB":
        out = out.convert("RGB")
    flipped = cfg.center_crop is None and rng.random() < cfg.hflip
    if flipped:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out), crop_box(left, top, cw, ch, width, height), flipped, (width, height)


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(real_photos):
    """Real photos in the formats and modes a dataset holds; JPEG sides are multiples of 8 (see below)."""
    chelsea, coffee = real_photos["chelsea"], real_photos["coffee"]
    grey = np.asarray(Image.fromarray(coffee).convert("L"))
    return {
        "jpeg": _encode(chelsea[:296, :448], "JPEG", quality=90),
        "jpeg_grey": _encode(grey[:392, :592], "JPEG", quality=90),
        "png": _encode(coffee[:317, :433], "PNG"),
        "png_palette": _encode(np.asarray(Image.fromarray(chelsea).quantize(64).convert("RGB")), "PNG"),
    }


@pytest.mark.parametrize("name", ["jpeg", "jpeg_grey", "png", "png_palette"])
@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("center_crop", [None, 0.875])
def test_default_is_bit_identical_to_the_old_crops_with_the_same_draws(photos, name, draft, center_crop):
    """Same pixels, box, flip and size, and the rng left in the same state, so old seeds give old crops.

    With draft, the old code's scale (decoded size / size) equals PIL's (1/s) when the sides are
    multiples of 8, so the JPEGs here have such sides; elsewhere the old crops were off (test_images.py).
    """
    cfg = CropConfig(32, scale=(0.08, 1.0), hflip=0.5, draft=draft, center_crop=center_crop)
    for seed in range(12):
        r_old, r_new = random.Random(seed), random.Random(seed)
        old = _old_decode_image(photos[name], cfg, r_old)
        new = decode_image(photos[name], cfg, r_new)
        assert np.array_equal(old[0], new[0]) and new[0].dtype == np.uint8 and new[0].shape == (32, 32, 3)
        assert old[1:] == new[1:]
        assert r_old.getstate() == r_new.getstate()


def test_default_transform_objects_and_validation():
    data = _encode(np.zeros((40, 60, 3), np.uint8), "PNG")
    crop = RandomResizedCropFlip(16, hflip=1.0)(open_image(data), random.Random(0))
    assert isinstance(crop, Crop) and crop.flipped and crop.image.shape == (16, 16, 3)
    crop = CenterCrop(8, crop_pct=0.5)(open_image(data), random.Random(0))
    assert crop.box == (20 / 60, 10 / 40, 40 / 60, 30 / 40) and not crop.flipped
    with pytest.raises(ValueError, match="size must be an integer >= 1, got 0"):
        RandomResizedCropFlip(0)
    with pytest.raises(ValueError, match=r"hflip must be in \[0, 1\], got 2"):
        RandomResizedCropFlip(8, hflip=2)
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\], got 0"):
        CenterCrop(8, crop_pct=0)


# ------------------------------------------------------------------------------------------ photometric


def test_photometric_ops_keep_box_and_flip_and_are_reproducible(photos):
    from torchvision.transforms import ColorJitter

    t = Compose(RandomResizedCropFlip(32), photometric=[ColorJitter(0.4, 0.4, 0.4), Lighting(0.1)])
    random.seed(123)
    torch.manual_seed(123)
    before = (random.random(), float(torch.rand(1)))
    random.seed(123)
    torch.manual_seed(123)
    a = t(open_image(photos["jpeg"]), random.Random(5))
    b = t(open_image(photos["jpeg"]), random.Random(5))
    assert (random.random(), float(torch.rand(1))) == before  # the globals were restored
    plain = RandomResizedCropFlip(32)(open_image(photos["jpeg"]), random.Random(5))
    assert a.box == plain.box and a.flipped == plain.flipped  # the same window and flip
    assert np.array_equal(a.image, b.image) and a.image.dtype == np.uint8 and a.image.shape == (32, 32, 3)
    assert not np.array_equal(a.image, plain.image)  # the colours did change
    c = t(open_image(photos["jpeg"]), random.Random(6))
    assert not np.array_equal(c.image, a.image)


def test_timm_colour_ops_compose_and_geometric_ops_are_refused():
    from timm.data.auto_augment import rand_augment_transform
    from torchvision import transforms as T

    Compose(photometric=[rand_augment_transform("rand-m9-mstd0.5", {}, transforms=list(TIMM_COLOR_OPS))])
    with pytest.raises(ValueError, match=r"includes ops that move pixels \['Rotate', 'ShearX'"):
        Compose(photometric=[rand_augment_transform("rand-m9-mstd0.5", {})])
    for op in (T.RandomRotation(10), T.RandomHorizontalFlip(), T.RandomResizedCrop(8), T.RandAugment()):
        with pytest.raises(ValueError, match=f"photometric op {type(op).__name__} moves pixels"):
            Compose(photometric=[op])
    data = _encode(np.zeros((40, 60, 3), np.uint8), "PNG")
    resize = Compose(RandomResizedCropFlip(16), photometric=[lambda im: im.resize((8, 8))])
    with pytest.raises(ValueError, match=r"op changed the crop from \[16, 16, 3\] to \[8, 8, 3\]"):
        resize(open_image(data), random.Random(0))


# ------------------------------------------------------------------------------------------- the loader


def test_loader_takes_a_transform(tmp_path):
    from torchvision.transforms import ColorJitter

    from relabel_shards.loader import make_loader

    make_shards(tmp_path, [4, 4])
    t = Compose(CenterCrop(24, crop_pct=1.0), photometric=[ColorJitter(brightness=0.5)])
    batches = list(make_loader(str(tmp_path), batch_size=4, num_workers=0, transform=t, shuffle_buffer=0))
    assert [tuple(b["images"].shape) for b in batches] == [(4, 3, 24, 24)] * 2
    plain = list(
        make_loader(
            str(tmp_path), batch_size=4, num_workers=0, center_crop=1.0, image_size=24, shuffle_buffer=0
        )
    )
    for b, p in zip(batches, plain, strict=True):
        assert b["keys"] == p["keys"] and torch.equal(b["boxes"], p["boxes"]) and not b["flips"].any()
        assert not torch.equal(b["images"], p["images"])

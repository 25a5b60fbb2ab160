"""The one rule for opening an image (relabel_shards.images): build, the loader and show see one frame.

Real photos (scikit-image's chelsea) stored turned, with the EXIF orientation that turns them upright, as
PNG (eXIf chunk), MPO (multi-picture JPEG) and JPEG. The oracle for the loader's crops is a full decode of
the upright image and torchvision's ``resized_crop``.
"""

from __future__ import annotations

import io
import json
import random
import warnings

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from relabel_shards.decode import CropConfig, SampleError, decode_image, decode_sample
from relabel_shards.images import (
    ImageError,
    ImageSizeError,
    ImageTooLargeError,
    check_size,
    open_image,
    upright,
)
from relabel_shards.labelmap import encode_label_map
from relabel_shards.sources import decode_image as build_decode

# PIL's exif_transpose table; the stored image is the upright one turned by the inverse.
_T = Image.Transpose
_METHOD = {
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_270,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_90,
}
_INVERSE = {**_METHOD, 6: _T.ROTATE_90, 8: _T.ROTATE_270}


def stored_bytes(upright_arr: np.ndarray, fmt: str, orientation: int, **save) -> bytes:
    """``upright_arr`` stored turned so that EXIF ``orientation`` turns it upright again, as ``fmt``."""
    im = Image.fromarray(upright_arr)
    if orientation != 1:
        im = im.transpose(_INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    if fmt == "MPO":  # a second picture, as a stereo camera writes
        im.save(buf, "MPO", save_all=True, append_images=[im.rotate(7)], exif=exif.tobytes(), quality=95)
    else:
        im.save(buf, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}), **save)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == fmt
    return data


CASES = [("PNG", 6), ("PNG", 3), ("MPO", 8), ("MPO", 6), ("JPEG", 6), ("JPEG", 8), ("JPEG", 2)]


@pytest.fixture(scope="module")
def chelsea(real_photos):
    return real_photos["chelsea"]  # 451 x 300


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _oracle_crop(photo: Image.Image, box, size: int, flipped: bool) -> np.ndarray:
    """Full upright decode, then torchvision's resized_crop at the box (bilinear, antialias)."""
    w, h = photo.size
    left, top = round(box[0] * w), round(box[1] * h)
    cw, ch = round(box[2] * w) - left, round(box[3] * h) - top
    out = TF.resized_crop(photo, top, left, ch, cw, [size, size], InterpolationMode.BILINEAR, antialias=True)
    out = np.asarray(out)
    return out[:, ::-1] if flipped else out


@pytest.mark.parametrize("fmt, orientation", CASES)
def test_build_loader_and_show_see_the_same_upright_frame(chelsea, fmt, orientation):
    data = stored_bytes(chelsea, fmt, orientation)
    # build's frame (what the annotator sees and .json records)
    photo = build_decode(data)
    assert photo.size == (451, 300) and photo.mode == "RGB"
    assert _diff(np.asarray(photo), chelsea) < 4  # upright: the photo itself, up to JPEG loss
    # the loader's crops come from the same frame: the oracle crops the build frame at the loader's box
    rng = random.Random(orientation)
    for _ in range(6):
        img, box, flipped, size = decode_image(data, CropConfig(32, scale=(0.2, 1.0), draft=False), rng)
        assert size == photo.size
        assert _diff(img, _oracle_crop(photo, box, 32, flipped)) < 3
    # show draws the same frame: the figure's photo panel is open_image(...).to_pil()
    assert np.array_equal(np.asarray(open_image(data).to_pil()), np.asarray(photo))
    # and the annotator's preprocess of the raw bytes or of a plain-opened PIL image is the same frame
    from_bytes = np.asarray(upright(Image.open(io.BytesIO(data))))
    assert np.array_equal(from_bytes, np.asarray(photo))


def test_the_stored_frame_would_be_wrong(chelsea):
    """The oracle can tell: the stored (unturned) pixels differ from the upright ones by far more."""
    data = stored_bytes(chelsea, "PNG", 3)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert _diff(stored, chelsea) > 30


def test_build_writes_the_upright_size_and_the_loader_and_show_agree(tmp_path, chelsea, monkeypatch):
    """End to end: build a folder of turned PNG/MPO/JPEG photos; the loader's exact .json check passes."""
    from relabel_shards import show as show_mod
    from relabel_shards.build import build_shards
    from relabel_shards.loader import ReLabelDataset

    folder = tmp_path / "src" / "cat"
    folder.mkdir(parents=True)
    files = {}
    for fmt, o in CASES[:5]:
        name = f"{fmt.lower()}{o}"
        files[name] = stored_bytes(chelsea, fmt, o)
        (folder / f"{name}.{'png' if fmt == 'PNG' else 'jpg'}").write_bytes(files[name])
    out = tmp_path / "ds"
    build_shards(
        str(tmp_path / "src"), str(out), model="test_efficientnet", batch_size=4, num_workers=0, input_size=64
    )
    ds = ReLabelDataset(str(out), image_size=32, draft=False, shuffle_buffer=0, scale=(0.3, 1.0))
    seen = set()
    for s in ds:
        photo = build_decode(files[s["key"]])
        assert _diff(s["image"], _oracle_crop(photo, s["box"].tolist(), 32, s["flip"])) < 3
        seen.add(s["key"])
    assert seen == set(files)
    drawn = {}
    real_render = show_mod.render

    def spy(photo, *a, **kw):
        drawn["photo"] = np.asarray(photo)
        return real_render(photo, *a, **kw)

    monkeypatch.setattr(show_mod, "render", spy)
    show_mod.show_sample(str(out), "mpo8", tmp_path / "fig.png", topk=2)
    assert np.array_equal(drawn["photo"], np.asarray(build_decode(files["mpo8"])))


def _members(data: bytes, width, height) -> dict[str, bytes]:
    rec = encode_label_map(np.ones((1, 2, 2), np.float32), np.zeros((1, 2, 2), np.int64), 3)
    meta = json.dumps({"width": width, "height": height}).encode()
    return {"jpg": data, "cls": b"1", "rlm": rec, "json": meta}


def test_json_size_is_checked_exactly(chelsea):
    data = stored_bytes(chelsea, "JPEG", 6)  # stored 300x451, upright 451x300
    cfg, rng = CropConfig(16), random.Random(0)
    sample, _ = decode_sample("k", _members(data, 451, 300), "u.tar", cfg, rng, None)
    assert sample["image"].shape == (16, 16, 3)
    with pytest.raises(
        SampleError,
        match=r"u\.tar: sample 'k': \.json says 300x451 but the image is 451x300 "
        r"\(upright, after its EXIF orientation\)",
    ) as e:
        decode_sample("k", _members(data, 300, 451), "u.tar", cfg, rng, None)  # width and height swapped
    assert e.value.reason == "size_mismatch"
    with pytest.raises(ImageSizeError, match="says 300x451"):
        open_image(data, expect_size=(300, 451))
    check_size((451, 300), (451, 300))
    check_size((451, 300), (None, None))


# ------------------------------------------------------------------------------------------ draft mode


def _ramp(w: int, h: int) -> np.ndarray:
    """Red rises with x, green with y, blue flat: where a crop was taken shows in its mean colours."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w).round()[None, :]
    a[..., 1] = np.linspace(0, 255, h).round()[:, None]
    a[..., 2] = 128
    return a


@pytest.mark.parametrize("fmt", ["JPEG", "MPO"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_draft_crops_cover_the_full_decodes_window(fmt, orientation):
    """Draft decoding (1/2..1/8 in the DCT) crops the same window as a full decode + torchvision.

    505 x 377 = 8k+1 px: the last DCT block of each side is almost empty, the case where PIL's draft size
    (ceil(n / s)) and its scale (1 / s) differ most; the old code used the former and was off by up to
    about one output pixel. Shift measured on the ramps, in output pixels.
    """
    w, h = 505, 377
    up = _ramp(w, h)
    data = stored_bytes(up, fmt, orientation)
    photo = Image.fromarray(np.asarray(open_image(data).to_pil()))
    rng = random.Random(orientation)
    size, worst = 16, 0.0
    for _ in range(12):
        cw, ch = rng.randint(130, w), rng.randint(130, h)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        got = open_image(data).resized_crop(left, top, cw, ch, size, draft=True).astype(np.float64)
        want = TF.resized_crop(
            photo, top, left, ch, cw, [size, size], InterpolationMode.BILINEAR, antialias=True
        )
        want = np.asarray(want, dtype=np.float64)
        # mean colour difference / ramp slope = shift in source pixels; / (window / size) = output pixels
        dx = (got[:, 1:-1, 0] - want[:, 1:-1, 0]).mean() / (255 / (w - 1)) / (cw / size)
        dy = (got[1:-1, :, 1] - want[1:-1, :, 1]).mean() / (255 / (h - 1)) / (ch / size)
        worst = max(worst, abs(dx), abs(dy))
    assert worst < 0.25, f"draft crop off by {worst:.2f} output px"


def test_draft_scale_is_pils():
    data = stored_bytes(_ramp(505, 377), "JPEG", 1)
    im, s, pad = open_image(data)._decode(9.0)
    assert s == 8 and im.size == (64, 48) and pad == (0, 0)  # ceil(505 / 8) = 64, but the scale is 1/8
    im, s, pad = open_image(stored_bytes(_ramp(505, 377), "JPEG", 6))._decode(9.0)
    assert s == 8 and im.size == (64, 48) and pad == (7, 0)  # upright x runs back along stored y


# -------------------------------------------------------------------------------------- pixel limit


def test_pixel_limit_is_an_error_naming_the_size_not_a_warning(monkeypatch):
    data = stored_bytes(_ramp(120, 100), "PNG", 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # PIL alone would raise DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail the test
        img = open_image(data, max_pixels=None)
        assert img.to_pil().size == (120, 100)
        assert open_image(data, max_pixels=12_000).resized_crop(0, 0, 50, 50, 8).shape == (8, 8, 3)
        with pytest.raises(
            ImageTooLargeError,
            match=r"120x100 image has 12,000 pixels, over the limit of "
            r"11,999 \(max_image_pixels.*--max-image-pixels 12000",
        ):
            open_image(data, max_pixels=11_999)
    assert Image.MAX_IMAGE_PIXELS == 5000  # restored
    assert ImageTooLargeError.reason == "image_too_large"
    with pytest.raises(ValueError, match=r"max_pixels must be an int >= 0 \(0 or None: no limit\), got -1"):
        open_image(data, max_pixels=-1)


def test_bad_bytes_and_single_decode():
    with pytest.raises(ImageError, match="empty file"):
        open_image(b"")
    with pytest.raises(ImageError, match="PIL cannot identify it"):
        open_image(b"not an image at all")
    data = stored_bytes(_ramp(64, 48), "JPEG", 1)
    with pytest.raises(ImageError, match="cannot decode image"):
        open_image(data[:400]).to_pil()
    img = open_image(data)
    assert repr(img) == "UprightImage(format='JPEG', size=(64, 48), orientation=1, mode='RGB')"
    img.to_pil()
    with pytest.raises(RuntimeError, match="decodes once"):
        img.to_pil()


def test_orientation_for_every_format_with_exif(chelsea):
    small = chelsea[::4, ::4].copy()
    for fmt in ("PNG", "WEBP", "TIFF", "JPEG", "MPO"):
        img = open_image(stored_bytes(small, fmt, 6))
        assert img.orientation == 6 and img.size == (113, 75) and img.stored_size == (75, 113), fmt
        photo = img.to_pil()
        assert photo.size == (113, 75) and _diff(np.asarray(photo), small) < 4, fmt


def test_loader_and_show_apply_the_pixel_limit(tmp_path):
    from shard_factory import make_dataset
    from test_loader_factory import image_size_of, make_shards

    from relabel_shards.loader import ReLabelDataset, make_loader
    from relabel_shards.show import show_sample

    make_shards(tmp_path / "l", [4, 4])
    limit = 30_000
    big = sorted(f"s{i:05d}" for i in range(8) if image_size_of(i)[0] * image_size_of(i)[1] > limit)
    assert 0 < len(big) < 8
    with pytest.raises(
        ValueError,
        match=r"train-00000\d\.tar: sample 's\d+': cannot decode \.jpg: "
        r"ImageTooLargeError: \d+x\d+ image has [\d,]+ pixels, over the limit",
    ):
        list(
            make_loader(
                str(tmp_path / "l"), batch_size=2, num_workers=0, image_size=16, max_image_pixels=limit
            )
        )
    loader = make_loader(
        str(tmp_path / "l"),
        batch_size=2,
        num_workers=0,
        image_size=16,
        on_error="skip",
        max_image_pixels=limit,
        shuffle_buffer=0,
    )
    keys = {k for b in loader for k in b["keys"]}
    assert not keys & set(big) and loader.skipped == {"image_too_large": len(big)}
    with pytest.raises(ValueError, match=r"max_image_pixels must be an int >= 0"):
        ReLabelDataset(str(tmp_path / "l"), max_image_pixels=-1)

    make_dataset(tmp_path / "s", num_samples=2, image_size=(48, 32))
    with pytest.raises(
        ImageTooLargeError,
        match=r"train-000000\.tar: key 'img001': \.png: 48x32 image has "
        r"1,536 pixels, over the limit of 1,000",
    ):
        show_sample(str(tmp_path / "s"), "img001", tmp_path / "f.png", max_image_pixels=1000)
    assert show_sample(str(tmp_path / "s"), "img001", tmp_path / "f.png", max_image_pixels=0).key == "img001"

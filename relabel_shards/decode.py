"""Decode one shard sample for training: random-resized crop of the JPEG, its box, the flip, the label map.

The image is opened by the one rule of ``relabel_shards.images`` (upright, EXIF orientation for every
format) and cropped by the sample transform (``relabel_shards.transforms``; default: random-resized crop and
flip). The crop is drawn on the upright original size (so the box is in the label map's coordinates); a
JPEG/MPO is then decoded at 1/2, 1/4 or 1/8 size in the DCT (PIL draft mode) whenever the crop is
downscaled by 2x or more, which is where most of the decode time goes for large images
(benchmarks/bench_loader.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from relabel_shards.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageError,
    check_max_pixels,
    check_size,
    open_image,
)
from relabel_shards.labelmap import decode_label_map  # at import: each epoch's fresh workers inherit it
from relabel_shards.shards import IMAGE_EXTS, LABELMAP_EXT, ShardError, image_ext


class SampleError(ShardError):
    """One sample that cannot be used; ``reason`` says which kind (the loader's skip counters use it)."""

    def __init__(self, url: str, key: str, reason: str, what: str):
        super().__init__(f"{url}: sample {key!r}: {what}")
        self.url, self.key, self.reason = url, key, reason


@dataclass(frozen=True)
class CropConfig:
    """The crop: output side ``image_size`` px, RandomResizedCrop ``scale``/``ratio``, flip chance."""

    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    draft: bool = True
    center_crop: float | None = None  # evaluation: centered square, crop_pct of the short side, no flip
    transform: Callable | None = None  # a sample transform (relabel_shards.transforms) instead of the above
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # larger images are errors (0/None: no limit)

    def __post_init__(self) -> None:
        check_max_pixels(self.max_image_pixels, "max_image_pixels")
        if self.transform is not None and not callable(self.transform):
            raise TypeError(f"transform must be a callable (image, rng) -> crop, got {self.transform!r}")


@dataclass(frozen=True)
class Geometry:
    """What every label map of a dataset shares: top-k, map height and width, number of classes."""

    k: int
    height: int
    width: int
    num_classes: int


def decode_image(data: bytes, cfg: CropConfig, rng: random.Random) -> tuple[np.ndarray, tuple[float, ...],
                                                                            bool, tuple[int, int]]:
    """Crop, resize and maybe flip one encoded image.

    Opens it by the one rule (``relabel_shards.images.open_image``: EXIF orientation for every format,
    ``cfg.max_image_pixels``), then applies ``cfg.transform``, or the default built from ``cfg``
    (:func:`default_transform`).

    Args:
        data: the image file's bytes (any format PIL reads; draft mode applies to JPEG and MPO).
        cfg: crop settings.
        rng: draws the crop window, then the flip.

    Returns:
        ``(image, box, flipped, (width, height))``: uint8 ``[S, S, 3]`` RGB, the normalized
        ``(x1, y1, x2, y2)`` box of the window in the upright original image, whether it was mirrored,
        and the upright original size in pixels.

    Raises:
        relabel_shards.images.ImageError: not an image, or over the pixel limit (``reason`` says which).
    """
    img = open_image(data, max_pixels=cfg.max_image_pixels)
    image, box, flipped = (cfg.transform or default_transform(cfg))(img, rng)
    return image, tuple(box), bool(flipped), img.size


def default_transform(cfg: CropConfig) -> Callable:
    """The sample transform ``cfg``'s crop options describe: random-resized crop and flip, or center crop."""
    from relabel_shards.transforms import CenterCrop, RandomResizedCropFlip

    if cfg.center_crop is not None:
        return CenterCrop(cfg.image_size, cfg.center_crop, cfg.draft)
    return RandomResizedCropFlip(cfg.image_size, cfg.scale, cfg.ratio, cfg.hflip, cfg.draft)


def _check_header(url: str, key: str, data: bytes, geometry: Geometry | None, what: str):
    """The record's header, checked against the dataset's geometry before any payload is decompressed."""
    from relabel_shards.labelmap import read_header

    try:
        header = read_header(data)
    except Exception as e:  # noqa: BLE001 - LabelMapError and whatever a damaged record provokes
        raise SampleError(url, key, "corrupt_labelmap", f"corrupt label map {what}: {e}") from e
    got = Geometry(header.k, header.height, header.width, header.num_classes)
    if geometry is not None and got != geometry:
        raise SampleError(url, key, "labelmap_mismatch",
                          f"label map has k={got.k}, {got.height}x{got.width}, "
                          f"num_classes={got.num_classes}; "
                          f"the dataset's maps have k={geometry.k}, {geometry.height}x{geometry.width}, "
                          f"num_classes={geometry.num_classes}")
    return header, got


def _decode_record(url: str, key: str, data: bytes, geometry: Geometry | None, what: str
                   ) -> tuple[np.ndarray, np.ndarray, Geometry, Any]:
    header, got = _check_header(url, key, data, geometry, what)
    try:
        rec = decode_label_map(data)
    except Exception as e:  # noqa: BLE001 - LabelMapError and whatever a damaged record provokes
        raise SampleError(url, key, "corrupt_labelmap", f"corrupt label map {what}: {e}") from e
    if rec.values.shape != rec.indices.shape:
        raise SampleError(url, key, "corrupt_labelmap", f"label map values {rec.values.shape} and indices "
                                                        f"{rec.indices.shape} differ in shape")
    # The image the record was made from (labelmap.ImageBinding, where the record carries one).
    binding = getattr(rec, "image", None) or getattr(header, "image", None)
    return rec.values, rec.indices, got, binding


def decode_sample(key: str, members: dict[str, bytes], url: str, cfg: CropConfig, rng: random.Random,
                  geometry: Geometry | None | dict[str, Geometry | None], *,
                  records: dict[str, tuple[str, str, bytes]] | None = None
                  ) -> tuple[dict[str, Any], Geometry | dict[str, Geometry]]:
    """Turn one sample's members into the loader's per-sample dict.

    Args:
        key: the sample key (names the sample in errors).
        members: extension -> bytes; needs an image and ``cls``, and the label-map record unless
            ``records`` is given; ``json`` optional.
        url: the shard's URL (names the shard in errors).
        cfg: crop settings.
        rng: the sample's own random source (crop window, then flip).
        geometry: the (k, h, w, C) every record must have; None to accept the first record's. For a join,
            one per label set: ``{name: Geometry | None}``.
        records: a join's label records, ``{set name: (label shard url, its key, record bytes)}``; the
            set named ``""`` (a single set) comes out as ``values`` / ``indices``, others under ``maps``.

    Returns:
        ``(sample, geometry)``: ``sample`` holds ``image`` uint8 ``[S, S, 3]``, ``label`` int, ``box``
        float32 ``[4]``, ``values`` ``[k, h, w]`` and ``indices`` ``[k, h, w]`` as stored (full shards and
        a single joined set), ``maps`` ``{name: (values, indices)}`` (named sets), ``flip`` bool and
        ``key``; ``geometry`` is the record's (a dict per set for a join).

    Raises:
        SampleError: a member is missing, the image, class or label map is corrupt or inconsistent, or a
            record was made for another image (its byte length or annotated size differ).
    """
    img_ext = image_ext(members)
    need = ["cls"] if records is not None else ["cls", LABELMAP_EXT]
    missing = [e for e in need if e not in members]
    if img_ext is None:
        missing.insert(0, "image (" + "/".join(IMAGE_EXTS[:3]) + "/...)")
    if missing:
        raise SampleError(url, key, "missing_member",
                          f"missing member(s) {', '.join(missing)}; it has {sorted(members)}")
    sources = {"": (url, key, members[LABELMAP_EXT])} if records is None else records
    geos = {"": geometry} if records is None else dict(geometry or {})  # type: ignore[arg-type]
    maps, got_geos, bindings = {}, {}, {}
    image_bytes = members[img_ext]
    for name, (lurl, lkey, data) in sources.items():
        if records is not None and not data:  # relabel_shards.pairing: an empty record keeps the key's place
            raise SampleError(url, key, "unlabeled",
                              f"label set {name or lurl!r} has no label for this image (an empty record in "
                              f"{lurl}: the build could not annotate it, see that label set's failures)")
        what = f".{LABELMAP_EXT}" if records is None else f"{lurl} key {lkey!r}"
        where, wkey = (url, key) if records is None else (lurl, lkey)
        values, indices, got, binding = _decode_record(where, wkey, data, geos.get(name), what)
        if binding is not None and int(binding.size) != len(image_bytes):
            raise SampleError(url, key, "image_mismatch",
                              f"the label record ({lurl} key {lkey!r}) was made for an image of "
                              f"{binding.size} bytes; the image ({url} key {key!r}) has {len(image_bytes)}")
        maps[name], got_geos[name], bindings[name] = (values, indices), got, (lurl, lkey, binding)
    num_classes = min(g.num_classes for g in got_geos.values())
    try:
        label = int(members["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise SampleError(url, key, "bad_label", f"class member .cls is not an integer: {e}") from e
    if not 0 <= label < num_classes:
        raise SampleError(url, key, "bad_label", f"class {label} not in [0, num_classes={num_classes})")
    try:
        image, box, flipped, size = decode_image(image_bytes, cfg, rng)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on damaged files
        raise SampleError(url, key, e.reason if isinstance(e, ImageError) else "corrupt_image",
                          f"cannot decode .{img_ext}: {type(e).__name__}: {e}") from e
    for lurl, lkey, binding in bindings.values():
        if binding is not None and (int(binding.width), int(binding.height)) != tuple(size):
            raise SampleError(url, key, "image_mismatch",
                              f"the label record ({lurl} key {lkey!r}) annotated a {binding.width}x"
                              f"{binding.height} image; the image ({url} key {key!r}) is {size[0]}x{size[1]}")
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError(url, key, "corrupt_json", f"member .json is not valid JSON: {e}") from e
        want = (meta.get("width"), meta.get("height")) if isinstance(meta, dict) else None
        try:  # build records the upright (EXIF-applied) size: exactly that one
            check_size(size, want)
        except ValueError as e:
            raise SampleError(url, key, "size_mismatch", str(e)) from e
    sample = {"image": image, "label": label, "box": np.asarray(box, dtype=np.float32), "flip": flipped,
              "key": key}
    if "" in maps:
        sample["values"], sample["indices"] = maps.pop("")
    if maps:
        sample["maps"] = maps
    return sample, (got_geos[""] if records is None else got_geos)

"""Draw one sample: the photo, then one heatmap per top class over it, each named (``relabel-shards show``).

The heatmap of class c is the per-cell softmax probability of c: at each map cell the top-k logits are
scattered into a C-vector of zeros (classes absent from the top-k keep logit 0, as in LabelPooling) and
soft-maxed, then the h x w grid is upsampled bilinearly (cell centres at ``(q + 0.5) / w``, the
convention of the label-map record) to the image. The classes shown are the top classes of the whole
image: the softmax of the cell-mean logits, which is exactly ``label_pooling`` with the box (0, 0, 1, 1).
All panels share one colour scale, so they can be compared; the legend gives it.

Drawing uses Pillow only (no matplotlib). Class names: ImageNet's from timm when C == 1000, else
``class_names`` from ``_info.json``, else the indices.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from relabel_shards.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, check_max_pixels, open_image
from relabel_shards.shards import (
    INFO_NAME,
    LABELMAP_EXT,
    ShardError,
    get_split,
    join,
    read_info,
    split_member_name,
    url_to_fs,
)
from relabel_shards.shards import image_ext as find_image_ext

logger = logging.getLogger(__name__)

# matplotlib's "inferno" at 0, 0.1, ..., 1 (its published 11-step hex values); interpolated linearly.
_INFERNO = np.array([
    (0x00, 0x00, 0x04), (0x16, 0x0b, 0x39), (0x42, 0x0a, 0x68), (0x6a, 0x17, 0x6e), (0x93, 0x26, 0x67),
    (0xbc, 0x37, 0x54), (0xdd, 0x51, 0x3a), (0xf3, 0x78, 0x19), (0xfc, 0xa5, 0x0a), (0xf6, 0xd7, 0x46),
    (0xfc, 0xff, 0xa4),
], dtype=np.float32)

# Figure geometry in pixels.
MARGIN = 12
TITLE_H = 50  # two text lines above each panel
LEGEND_H = 44
COLUMNS = 3


class SampleNotFoundError(KeyError):
    """No sample with the key asked for; the message names the key and where it was looked for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ShowResult:
    """What :func:`show_sample` drew.

    Attributes:
        path: the PNG written.
        key: the sample's key; ``shard`` the shard it came from.
        size: (width, height) of the PNG in pixels.
        classes: the classes drawn, best first: (index, name, probability over the whole image).
    """

    path: str
    key: str
    shard: str
    size: tuple[int, int]
    classes: list[tuple[int, str, float]]


# ------------------------------------------------------------------------------------------- numbers


def _as_numpy(x: Any, dtype: type) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().float().numpy() if dtype is np.float32 else x.detach().cpu().long().numpy()
    return np.asarray(x, dtype=dtype)


def dense_logits(values: Any, indices: Any, num_classes: int) -> np.ndarray:
    """The dense map, float32 ``[C, h, w]``: ``values[k, h, w]`` added at ``indices[k, h, w]`` into zeros."""
    v = _as_numpy(values, np.float32)
    idx = _as_numpy(indices, np.int64)
    if v.shape != idx.shape or v.ndim != 3:
        raise ValueError(f"values and indices must both be [k, h, w], got {v.shape} and {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
        raise ValueError(f"indices must be in [0, num_classes={num_classes}), got [{idx.min()}, {idx.max()}]")
    k, h, w = v.shape
    dense = np.zeros((num_classes, h * w), dtype=np.float32)
    cells = np.broadcast_to(np.arange(h * w), (k, h * w))
    np.add.at(dense, (idx.reshape(k, -1), cells), v.reshape(k, -1))
    return dense.reshape(num_classes, h, w)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def cell_probabilities(values: Any, indices: Any, num_classes: int) -> np.ndarray:
    """Per-cell softmax over C of the dense map: float32 ``[C, h, w]``, each cell sums to 1."""
    return _softmax(dense_logits(values, indices, num_classes), axis=0)


def image_probabilities(values: Any, indices: Any, num_classes: int) -> np.ndarray:
    """Softmax of the cell-mean logits, float32 ``[C]``: ``label_pooling`` over the box (0, 0, 1, 1)."""
    return _softmax(dense_logits(values, indices, num_classes).mean(axis=(1, 2)), axis=0)


# --------------------------------------------------------------------------------------------- names


def class_names(num_classes: int, section: Mapping[str, Any] | None = None) -> list[str]:
    """Short names for C classes: ImageNet's (timm) when C == 1000, else ``_info.json``'s, else indices.

    ImageNet names are the first synonym of timm's description ("tabby, tabby cat" -> "tabby").
    """
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]
    names = (section or {}).get("class_names")
    if isinstance(names, Sequence) and not isinstance(names, str) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


# ------------------------------------------------------------------------------------------- reading


def _meta_class_name(raw: bytes) -> str | None:
    """The class name a sample's ``.json`` gives, if any (``class_name``, ``class`` or ``label_name``)."""
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    for field in ("class_name", "class", "label_name"):
        if isinstance(meta.get(field), str):
            return meta[field]
    return None


def find_sample(url: str, key: str | None, *, split: str | None = None, storage_options: dict | None = None,
                shard: str | None = None) -> tuple[str, dict[str, bytes], dict[str, Any]]:
    """Find the sample ``key`` in a dataset and read its members.

    Args:
        url: dataset directory or URL prefix with ``_info.json``, or one shard's ``.tar`` URL.
        key: the sample key; None takes the first sample (of ``shard``, else of the first shard).
        split: the split to search (None: the only one).
        storage_options: passed to fsspec.
        shard: search only this shard file name (faster on large datasets).

    Returns:
        (shard file name, {extension: bytes}, the split's ``relabel_shards`` section or {}).

    Raises:
        SampleNotFoundError: no sample with that key (a ``KeyError``).
        FileNotFoundError: no ``_info.json`` (and ``url`` is not a ``.tar``).
    """
    name, _key, members, section = _find(url, key, split=split, storage_options=storage_options, shard=shard)
    return name, members, section


def _find(url: str, key: str | None, *, split: str | None, storage_options: dict | None, shard: str | None
          ) -> tuple[str, str, dict[str, bytes], dict[str, Any]]:
    """:func:`find_sample`, with the key found (the first sample's when ``key`` is None)."""
    if url.endswith(".tar"):
        base, names = url.rsplit("/", 1) if "/" in url else ("", url)
        names = [names]
        try:
            section = get_split(read_info(base or ".", storage_options), split).get("relabel_shards") or {}
        except (FileNotFoundError, ShardError):
            section = {}
    else:
        base = url
        s = get_split(read_info(url, storage_options), split, join(url, INFO_NAME))
        section = s.get("relabel_shards") or {}
        names = [shard] if shard else list(s.get("filenames") or [])
    for name in names:
        fs, path = url_to_fs(join(base, name) if base else name, storage_options)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            members: dict[str, bytes] = {}
            for info in tar:  # headers only; member data is skipped by seeking
                k, ext = split_member_name(info.name)
                if key is None and info.isfile():
                    key = k  # the first sample
                if k == key and info.isfile():
                    fo = tar.extractfile(info)
                    members[ext] = fo.read() if fo is not None else b""
                elif members:  # members of a sample are adjacent: the sample is complete
                    break
            if members:
                assert key is not None
                return name, key, members, section
    plural = "s" if len(names) != 1 else ""
    if key is None:
        raise SampleNotFoundError(f"no sample in {url} ({len(names)} shard{plural} searched)")
    raise SampleNotFoundError(f"no sample with key {key!r} in {url} ({len(names)} shard{plural} searched)")


# ------------------------------------------------------------------------------------------- drawing


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def colormap(x: np.ndarray) -> np.ndarray:
    """Inferno colours for values in [0, 1]: float32 ``[..., 3]`` in 0..255."""
    t = np.clip(x, 0.0, 1.0) * (len(_INFERNO) - 1)
    lo = np.floor(t).astype(np.int64).clip(0, len(_INFERNO) - 2)
    frac = (t - lo)[..., None]
    return _INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac


def _upsample(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear ``[h, w]`` -> ``[H, W]``, cell centres at ``(q + 0.5) / w`` (Pillow's pixel centres)."""
    return np.asarray(Image.fromarray(cells.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def overlay(photo: Image.Image, prob: np.ndarray, vmax: float) -> Image.Image:
    """The photo in dimmed grey with ``prob[h, w]`` (scaled by ``vmax``) in inferno over it."""
    heat = np.clip(_upsample(prob, photo.size) / vmax, 0.0, 1.0)  # (H, W)
    grey = np.asarray(photo.convert("L"), dtype=np.float32)[..., None] * 0.55
    alpha = (0.25 + 0.7 * np.sqrt(heat))[..., None]
    rgb = grey * (1 - alpha) + colormap(heat) * alpha
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8), mode="RGB")


def layout(image_size: tuple[int, int], panels: int, panel_size: int) -> tuple[int, int, int]:
    """(columns, panel image width, panel image height) of the figure.

    Three panels a row, each image's longer side ``panel_size``; an image at least twice as wide as high
    gets two a row at 1.5 x ``panel_size`` instead, so that wide pictures stay legible at the same width.
    """
    w, h = image_size
    cols, long_side = (2, panel_size * 3 // 2) if w >= 2 * h else (COLUMNS, panel_size)
    scale = long_side / max(w, h)
    return min(panels, cols), max(1, round(w * scale)), max(1, round(h * scale))


def figure_size(image_size: tuple[int, int], panels: int, panel_size: int) -> tuple[int, int]:
    """(width, height) of the figure for an image of ``image_size`` (w, h) and ``panels`` panels."""
    cols, pw, ph = layout(image_size, panels, panel_size)
    rows = math.ceil(panels / cols)
    return MARGIN + cols * (pw + MARGIN), MARGIN + rows * (TITLE_H + ph + MARGIN) + LEGEND_H


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render(photo: Image.Image, values: Any, indices: Any, num_classes: int, names: Sequence[str], *,
           topk: int = 5, title: str = "", subtitle: str = "",
           panel_size: int = 320) -> tuple[Image.Image, list[tuple[int, str, float]]]:
    """The figure: the photo, then the heatmaps of the image's ``topk`` classes (see :func:`layout`).

    Args:
        photo: the upright RGB image the map was made from.
        values: ``[k, h, w]`` logits; ``indices``: ``[k, h, w]`` class indices.
        num_classes: C.
        names: C display names.
        topk: classes drawn, in [1, C].
        title, subtitle: the two lines above the photo.
        panel_size: longer side of each panel's image in pixels, >= 16.

    Returns:
        (the RGB figure, [(class index, name, whole-image probability), ...] best first).
    """
    if not 1 <= topk <= num_classes:
        raise ValueError(f"topk must be in [1, num_classes={num_classes}], got {topk}")
    if panel_size < 16:
        raise ValueError(f"panel_size must be >= 16 pixels, got {panel_size}")
    probs = cell_probabilities(values, indices, num_classes)  # (C, h, w)
    pooled = image_probabilities(values, indices, num_classes)  # (C,)
    top = np.argsort(-pooled, kind="stable")[:topk]
    classes = [(int(c), names[int(c)], float(pooled[c])) for c in top]
    vmax = max(float(probs[top].max()), 1e-6)

    photo = photo.convert("RGB")
    cols, pw, ph = layout(photo.size, 1 + topk, panel_size)
    small = photo.resize((pw, ph), Image.BICUBIC)
    fig = Image.new("RGB", figure_size(photo.size, 1 + topk, panel_size), "white")
    draw = ImageDraw.Draw(fig)
    big, small_font = _font(18), _font(14)
    panels = [(small, title, subtitle)]
    for rank, (c, name, p) in enumerate(classes, 1):
        panels.append((overlay(small, probs[c], vmax), f"{rank}. {name}",
                       f"whole-image target {p:.1%} · peak cell {float(probs[c].max()):.0%} · #{c}"))
    for i, (img, line1, line2) in enumerate(panels):
        x = MARGIN + (i % cols) * (pw + MARGIN)
        y = MARGIN + (i // cols) * (TITLE_H + ph + MARGIN)
        draw.text((x, y + 2), _fit(draw, line1, big, pw), fill=(20, 20, 20), font=big)
        draw.text((x, y + 26), _fit(draw, line2, small_font, pw), fill=(90, 90, 90), font=small_font)
        fig.paste(img, (x, y + TITLE_H))

    # Legend: the colour bar and what it measures.
    y = fig.height - LEGEND_H + 4
    bar_w = min(256, fig.width - 2 * MARGIN)
    bar = colormap(np.linspace(0, 1, bar_w, dtype=np.float32))[None].repeat(12, axis=0)
    fig.paste(Image.fromarray(bar.round().astype(np.uint8), mode="RGB"), (MARGIN, y))
    k, h, w = _as_numpy(values, np.float32).shape
    text = (f"0 … {vmax:.0%}  per-cell probability of the class (softmax of the top-{k} logits over "
            f"{num_classes} classes, {h}x{w} cells)")
    draw.text((MARGIN + bar_w + 8, y - 2), _fit(draw, text, small_font, fig.width - bar_w - 3 * MARGIN),
              fill=(60, 60, 60), font=small_font)
    return fig, classes


def _paired_image(url: str, images: str, shard_name: str, key: str, section: Mapping[str, Any],
                  split: str | None, storage_options: dict | None) -> dict[str, bytes]:
    """The members of ``key`` in the image shard paired with label shard ``shard_name`` (label sets)."""
    names = list(get_split(read_info(url, storage_options), split).get("filenames") or [])
    paired = list((section.get("pairs_with") or {}).get("filenames") or [])
    if shard_name not in names or names.index(shard_name) >= len(paired):
        raise ValueError(f"{shard_name}: the label set's pairs_with names no image shard for it")
    _, members, _ = find_sample(join(images, paired[names.index(shard_name)]), key,
                                storage_options=storage_options)
    return members


def image_format(out: str) -> str:
    """The Pillow format for a figure file, from its suffix (``x.jpg`` -> JPEG; no suffix -> PNG).

    Raises:
        ValueError: a suffix Pillow cannot write, naming the usual ones.
    """
    suffix = os.path.splitext(out)[1].lower()
    if not suffix:
        return "PNG"
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"out {out!r}: cannot write a {suffix!r} image; use .png, .jpg or .webp")
    return fmt


def show_sample(url: str, key: str | None, out: str | os.PathLike, *, topk: int = 5, split: str | None = None,
                shard: str | None = None, storage_options: dict | None = None,
                panel_size: int = 320, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                images: str | None = None) -> ShowResult:
    """Find sample ``key`` in the dataset at ``url`` and write its figure (see :func:`render`).

    Args:
        url: dataset directory or URL prefix with ``_info.json``, or one shard's ``.tar``.
        key: the sample key; None draws the first sample.
        out: the image path; its suffix picks the format (``.png``, ``.jpg``, ``.webp``, ...; none: PNG).
            Folders are created.
        topk: classes drawn, in [1, C].
        split, shard, storage_options: see :func:`find_sample`.
        panel_size: longer side of each panel's image in pixels.
        max_image_pixels: a larger image is an error naming the sample (0 or None: no limit).
        images: for label shards, the image shards they pair with (directory or URL prefix): the image is
            read from the image shard paired with the label shard that holds ``key``.

    Raises:
        SampleNotFoundError: no such key.
        ValueError: ``topk`` out of range, the sample lacks its image or label map, or its image does not
            open (``relabel_shards.images.ImageError``: not an image, too large).
        LabelMapError: the label map does not decode.
    """
    from relabel_shards.labelmap import decode_label_map

    check_max_pixels(max_image_pixels, "max_image_pixels")
    out = os.fspath(out)
    fmt = image_format(out)
    shard_name, key, members, section = _find(url, key, split=split, storage_options=storage_options,
                                              shard=shard)
    if find_image_ext(members) is None and images is not None and section.get("kind") == "labels":
        members = {**_paired_image(url, images, shard_name, key, section, split, storage_options), **members}
    image_ext = find_image_ext(members)
    if image_ext is None or LABELMAP_EXT not in members:
        raise ValueError(f"{shard_name}: key {key!r} has members {sorted(members)}; show needs an image "
                         f"and .{LABELMAP_EXT}")
    lm = decode_label_map(members[LABELMAP_EXT])
    try:  # the one rule: label maps describe the upright image
        photo = open_image(members[image_ext], max_pixels=max_image_pixels).to_pil()
    except ImageError as e:
        raise type(e)(f"{shard_name}: key {key!r}: .{image_ext}: {e}") from None
    names = class_names(int(lm.num_classes), section)
    subtitle = f"{photo.width}x{photo.height} px · {shard_name}"
    if "cls" in members:
        try:
            label = int(members["cls"])
        except ValueError:
            label = None
        if label is not None:  # the source's label; its name comes from the sample's own .json
            label_name = _meta_class_name(members.get("json", b""))
            subtitle = f"label {label}" + (f" ({label_name})" if label_name else "") + " · " + subtitle
    fig, classes = render(photo, lm.values, lm.indices, int(lm.num_classes), names, topk=topk, title=key,
                          subtitle=subtitle, panel_size=panel_size)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    if fmt == "PNG":
        fig.save(out, format="PNG", optimize=True)
    else:
        fig.save(out, format=fmt, **({"quality": 92} if fmt in ("JPEG", "WEBP") else {}))
    logger.info("wrote %s (%dx%d)", out, *fig.size)
    return ShowResult(path=out, key=key, shard=shard_name, size=fig.size, classes=classes)

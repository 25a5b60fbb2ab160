"""Synthetic shards for the loader tests, written with the project's own shard writer.

Sample ``i`` has key ``s{i:05d}``, class ``i % num_classes`` and a JPEG whose pixel colours encode their
coordinates: red = 255 * x / (W - 1), green = 255 * y / (H - 1), blue = 40 + (i % 4) * 50. Its label
map holds ``i`` in ``values[0, 0, 0]``, so a test can tell which image a map travelled with. Sizes vary
per sample (between ``min_side`` and 255 px) so crops and draft decoding see different shapes.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from relabel_shards.shards import make_split_info, sample_members, shard_name, write_info, write_shard

K, MAP_H, MAP_W, NUM_CLASSES = 2, 3, 4, 7


def key_of(i: int) -> str:
    return f"s{i:05d}"


def image_size_of(i: int, min_side: int = 96) -> tuple[int, int]:
    """(width, height) of sample i's image."""
    span = 256 - min_side
    return min_side + (i * 37) % span, min_side + (i * 53 + 11) % span


def coord_jpeg(i: int, size: tuple[int, int], quality: int = 95) -> bytes:
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.round(np.linspace(0, 255, w))[None, :]
    arr[..., 1] = np.round(np.linspace(0, 255, h))[:, None]
    arr[..., 2] = 40 + (i % 4) * 50
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def label_map(i: int, k: int = K, h: int = MAP_H, w: int = MAP_W, num_classes: int = NUM_CLASSES
              ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    values = -np.sort(-rng.uniform(0, 6, size=(k, h, w)), axis=0).astype(np.float32)
    values[0, 0, 0] = i  # which sample this map belongs to (exact in float16 up to 2048)
    indices = np.stack([np.roll(np.arange(num_classes), -j)[:k] for j in range(h * w)], axis=1)
    return values, indices.reshape(k, h, w).astype(np.int64)


def sample(i: int, *, min_side: int = 96, encoding: str = "compact", label: int | None = None,
           bind: bool = False) -> list[tuple[str, bytes]]:
    """Sample i's members; ``bind``: the record carries its image's binding (labelmap.ImageBinding)."""
    from relabel_shards import labelmap

    size = image_size_of(i, min_side)
    values, indices = label_map(i)
    label = i % NUM_CLASSES if label is None else label
    jpeg = coord_jpeg(i, size)
    extra = {"image": labelmap.ImageBinding.of(jpeg, *size)} if bind else {}
    return sample_members(key_of(i), image=jpeg, image_ext="jpg", label=label,
                          meta={"source": f"{key_of(i)}.jpg", "width": size[0], "height": size[1]},
                          labelmap=labelmap.encode_label_map(values, indices, NUM_CLASSES, encoding=encoding,
                                                             **extra))


def make_shards(out: str | Path, lengths: list[int], *, split: str = "train",
                storage_options: dict | None = None, prefix: str = "train",
                transform: Any = None, label_of: Any = None, bind: bool = False) -> dict[str, Any]:
    """Write shards of the given lengths (samples numbered across shards) and ``_info.json``.

    ``transform(i, members) -> members`` may damage a sample on its way into the shard. ``label_of(i)``
    gives sample i's class (default ``i % NUM_CLASSES``, classes interleaved); :func:`class_sorted` gives
    shards of one or two classes each, as a build from a sorted image folder used to write.
    """
    out = str(out)
    records, i = [], 0
    for j, n in enumerate(lengths):
        samples = []
        for _ in range(n):
            members = sample(i, label=None if label_of is None else label_of(i), bind=bind)
            samples.append(transform(i, members) if transform else members)
            i += 1
        records.append(write_shard(out, shard_name(prefix, j), samples, storage_options))
    project = {"k": K, "height": MAP_H, "width": MAP_W, "num_classes": NUM_CLASSES}
    return write_info(out, make_split_info(split, records, project), storage_options)


def truncate_tar(path: Path, keep_samples: int, cut_into_member: int = 100) -> None:
    """Cut a local tar in the middle of the first member after ``keep_samples`` complete samples."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    per_sample = len(members) // len({m.name.split(".")[0] for m in members})
    m = members[keep_samples * per_sample]
    data = path.read_bytes()
    path.write_bytes(data[: m.offset_data + cut_into_member])


def class_sorted(total: int, num_classes: int = NUM_CLASSES):
    """``label_of`` for a class-sorted dataset: samples 0..total-1 in ``num_classes`` contiguous runs."""
    return lambda i: i * num_classes // total


def split_into_columns(full: str | Path, images: str | Path, labels: str | Path, *,
                       storage_options: dict | None = None, split: str = "train") -> None:
    """Split full shards into image shards (image, cls, json) and label shards (``key.rlm`` only).

    The label set's ``_info.json`` says ``kind: labels`` and pairs with the image shards (file names,
    counts, key digests), as ``build --labels-only`` writes it (interface 2 of the label-shards issue).
    """
    from relabel_shards.pairing import key_digest
    from relabel_shards.shards import get_split, read_info, url_to_fs
    from relabel_shards.tarstream import iter_tar_samples

    full, images, labels = str(full), str(images), str(labels)
    sp = get_split(read_info(full, storage_options), split)
    img_records, lab_records, digests = [], [], []
    for name in sp["filenames"]:
        fs, path = url_to_fs(f"{full}/{name}", storage_options)
        with fs.open(path, "rb") as f:
            samples = list(iter_tar_samples(f, name))
        img = [[(f"{k}.{e}", d) for e, d in m.items() if e != "rlm"] for k, m in samples]
        lab = [[(f"{k}.rlm", m["rlm"])] for k, m in samples]
        img_records.append(write_shard(images, name, img, storage_options))
        lab_records.append(write_shard(labels, name, lab, storage_options))
        digests.append(key_digest(k for k, _ in samples))
    write_info(images, {"name": split, "num_samples": sp["num_samples"], "filenames": sp["filenames"],
                        "shard_lengths": sp["shard_lengths"]}, storage_options)
    geometry = {f: sp["relabel_shards"][f] for f in ("k", "height", "width", "num_classes")}
    project = {"kind": "labels", **geometry,
               "pairs_with": {"filenames": sp["filenames"], "shard_lengths": sp["shard_lengths"],
                              "key_digests": digests}}
    write_info(labels, make_split_info(split, lab_records, project), storage_options)

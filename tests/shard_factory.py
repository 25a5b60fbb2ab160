"""Tiny label-map datasets written with the project's own shard writer, for the inspection-command tests.

Used by tests/test_verify.py, tests/test_show.py and tests/test_cli_info.py (imported by name: pytest puts
``tests/`` on ``sys.path``). Images are small PNGs whose pixels encode their index; label maps are random
top-k records except where a test asks for a known layout.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from relabel_shards.shards import make_split_info, sample_members, shard_name, write_info, write_shard

# A label map for one sample: (index, rng) -> (values [k,h,w] float32, indices [k,h,w] int64)
MapFn = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def random_map(k: int, h: int, w: int, num_classes: int) -> MapFn:
    """Random logits in [0, 6) with k distinct random classes per cell, sorted by value (top-k order)."""

    def fn(i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        values = -np.sort(-rng.uniform(0, 6, size=(k, h, w)).astype(np.float32), axis=0)
        indices = np.argsort(rng.random((num_classes, h, w)), axis=0)[:k]
        return values, indices.astype(np.int64)

    return fn


def png_bytes(i: int, size: tuple[int, int]) -> bytes:
    """A small RGB PNG of ``size`` (w, h) whose red channel is ``i`` and green a horizontal ramp."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = i % 256
    arr[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(out: str | Path, *, num_samples: int = 6, shard_size: int = 4, k: int = 3, h: int = 4,
                 w: int = 6, num_classes: int = 10, class_names: list[str] | None = None,
                 image_size: tuple[int, int] = (48, 32), map_fn: MapFn | None = None, split: str = "train",
                 images: dict[int, tuple[bytes, str]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Write ``num_samples`` samples (keys ``img000``, ...) in shards of ``shard_size`` plus ``_info.json``.

    Returns the written ``_info.json`` as a dict.
    """
    from relabel_shards.labelmap import encode_label_map

    rng = np.random.default_rng(seed)
    map_fn = map_fn or random_map(k, h, w, num_classes)
    samples = []
    for i in range(num_samples):
        values, indices = map_fn(i, rng)
        image, ext = (images or {}).get(i, (png_bytes(i, image_size), "png"))
        record = encode_label_map(values, indices, num_classes)
        samples.append(sample_members(f"img{i:03d}", image=image, image_ext=ext, label=i % num_classes,
                                      meta={"source": f"src/img{i:03d}.{ext}", "width": image_size[0],
                                            "height": image_size[1]}, labelmap=record))
    records = []
    for s in range(0, num_samples, shard_size):
        records.append(write_shard(str(out), shard_name(split, s // shard_size), samples[s:s + shard_size]))
    project = {
        "annotator": {"model": "test_model", "input_size": [3, 32, 48], "interpolation": "bicubic"},
        "k": k, "height": h, "width": w, "num_classes": num_classes,
        "class_names": class_names or [f"class{c}" for c in range(num_classes)],
        "failures": [{"path": "src/broken.jpg", "reason": "cannot identify image file"}],
    }
    return write_info(str(out), make_split_info(split, records, project), name="tiny")

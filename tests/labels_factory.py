"""Image shards as others publish them (.jpg, .cls, .json; timm's _info.json), for the label-shard,
join and publish tests (tests/test_labels*.py, test_join.py, test_publish.py; imported by name)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from relabel_shards.labelmap import ImageBinding, encode_label_map
from relabel_shards.pairing import KIND_LABELS, key_digest, pairs_with_entry
from relabel_shards.shards import ShardRecord, make_split_info, write_info, write_shard


def jpeg(i: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    """A small JPEG of ``size`` (w, h), different for each ``i``."""
    rng = np.random.default_rng(seed * 100_003 + i)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2, :, 0] = (i * 37) % 256
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_image_shards(
    out: Path,
    keys: list[list[str]],
    *,
    prefix: str = "imgs-train",
    broken: set[str] = frozenset(),
    sizes: dict[str, tuple[int, int]] | None = None,
    info: bool = True,
    seed: int = 0,
) -> list[str]:
    """Write one image shard per list of keys (``{prefix}-{i:04d}.tar``, timm's naming) and a timm-style
    ``_info.json`` (no project section). Keys in ``broken`` get bytes that are not an image. Returns the shard
    paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths, records = [], []
    n = 0
    for s, shard_keys in enumerate(keys):
        samples = []
        for key in shard_keys:
            size = (sizes or {}).get(key, (64 + (n % 3) * 8, 48))
            data = b"not a jpeg at all" if key in broken else jpeg(n, size, seed)
            meta = {"filename": f"{key}.JPEG", "width": size[0], "height": size[1]}
            samples.append(
                [
                    (f"{key}.jpg", data),
                    (f"{key}.cls", str(n % 7).encode()),
                    (f"{key}.json", json.dumps(meta).encode()),
                ]
            )
            n += 1
        name = f"{prefix}-{s:04d}.tar"
        rec = write_shard(str(out), name, samples)
        records.append(rec)
        paths.append(str(out / name))
    if info:
        split = {
            "name": "train",
            "num_samples": sum(r.num_samples for r in records),
            "filenames": [r.filename for r in records],
            "shard_lengths": [r.num_samples for r in records],
        }
        write_info(str(out), split, name="imgs")
    return paths


def tar_members(path: str | Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of a tar, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def shard_records(path: str | Path) -> dict[str, bytes]:
    """key -> ``.rlm`` bytes of one shard (full or label shard)."""
    return {n.split(".", 1)[0]: d for n, d in tar_members(path) if n.endswith(".rlm")}


def records_of(paths: list[str]) -> list[ShardRecord]:
    return [ShardRecord(Path(p).name, len(shard_records(p)), Path(p).stat().st_size, "") for p in paths]


def make_label_set(out, image_paths, *, drop=(), seed=0, num_classes=10):
    """Label shards aligned to ``image_paths``: random 3x4x4 maps over 10 classes, bound to each image."""
    rng = np.random.default_rng(seed)
    records, keys_per = [], []
    for i, p in enumerate(image_paths):
        samples, keys = [], []
        for name, data in tar_members(p):
            if not name.endswith(".jpg"):
                continue
            key = name.split(".")[0]
            keys.append(key)
            if key in drop:
                samples.append([(f"{key}.rlm", b"")])
                continue
            v = -np.sort(-rng.uniform(0, 6, (3, 4, 4)).astype(np.float32), axis=0)
            idx = np.argsort(rng.random((num_classes, 4, 4)), axis=0)[:3]
            w, h = Image.open(io.BytesIO(data)).size
            rec = encode_label_map(v, idx, num_classes, image=ImageBinding.of(data, w, h))
            samples.append([(f"{key}.rlm", rec)])
        records.append(write_shard(str(out), f"train-{i:06d}.tar", samples))
        keys_per.append(keys)
    pw = pairs_with_entry(image_paths, [len(k) for k in keys_per], [key_digest(k) for k in keys_per])
    project = {
        "kind": KIND_LABELS,
        "pairs_with": pw,
        "k": 3,
        "height": 4,
        "width": 4,
        "num_classes": num_classes,
        "encoding": "compact",
        "annotator": {"model": "synthetic"},
        "failures": [{"key": k, "source": k, "reason": "dropped by the test"} for k in sorted(drop)],
        "num_failures": len(drop),
    }
    write_info(str(out), make_split_info("train", records, project), name="labels")
    return {k: d for r in records for k, d in shard_records(out / r.filename).items()}

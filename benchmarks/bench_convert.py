"""Convert throughput and size: ``convert_official`` files/s on the CPU against torch.load-only reading.

In one run, on the same synthetic release (JPEGs in an ImageFolder + one official-format ``.pt`` per image):

- baseline: read every ``.pt`` file and ``torch.load(weights_only=True)`` it, nothing else (one process);
- ``convert_official`` end to end (read + check the JPEG, load + check the map, encode the record, write
  shards), with ``--num-workers`` worker processes and with none, with and without ``check_images``;
- bytes per image: the ``.pt`` file (legacy and zip serialization) against the record (compact, lossless)
  and the whole sample's shard bytes minus the JPEG (record + .cls + .json + tar headers).

    python benchmarks/bench_convert.py                   # ~1 min on 2 cores
    python benchmarks/bench_convert.py --images 4096 --num-workers 8

The maps are synthetic: spatially coherent top-1 objects and lower ranks drawn from ``--classes-per-map``
classes, with continuous logits. Record sizes depend on that content; real maps may differ.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_header, print_table, write_json  # noqa: E402


def official_map(rng: np.random.Generator, classes_per_map: int) -> torch.Tensor:
    """[2, 5, 15, 15] float32: three objects as the top-1 class by region, lower ranks from a small set."""
    pool = rng.choice(1000, classes_per_map, replace=False)  # this image's classes; pool[:3] are objects
    r, q = np.mgrid[0:15, 0:15]
    cut_r, cut_q = rng.integers(4, 11, 2)
    top1 = np.where(q < cut_q, 0, np.where(r < cut_r, 1, 2))  # (15, 15) positions into pool
    scores = rng.random((classes_per_map, 15, 15))
    scores[top1, r, q] = 2.0  # the object ranks first in its region
    classes = pool[np.argsort(-scores, axis=0)[:5]]  # (5, 15, 15), distinct per cell
    top = rng.uniform(4.0, 14.0, (1, 15, 15))
    gaps = np.cumsum(rng.uniform(0.2, 2.5, (4, 15, 15)), axis=0)
    return torch.from_numpy(np.stack([np.concatenate([top, top - gaps]), classes]).astype(np.float32))


def make_release(root: Path, n: int, size: tuple[int, int], classes_per_map: int, legacy: bool,
                 seed: int = 0) -> tuple[Path, Path]:
    """``n`` JPEGs (quality 90, 4 classes) and their official-format maps; returns (images, maps)."""
    images, maps = root / "train", root / "relabel"
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        cls = f"n{i % 4:08d}"
        (images / cls).mkdir(parents=True, exist_ok=True)
        (maps / cls).mkdir(parents=True, exist_ok=True)
        fx, fy, ph = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(x * fx + ph), np.cos(y * fy + ph), np.sin((x + y) * fx * fy * 20)], -1)
        img = ((base + 1) * 110 + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        (images / cls / f"{cls}_{i}.JPEG").write_bytes(buf.getvalue())
        torch.save(official_map(rng, classes_per_map), maps / cls / f"{cls}_{i}.pt",
                   _use_new_zipfile_serialization=not legacy)
    return images, maps


def load_only(maps: Path) -> int:
    """The baseline: read and torch.load(weights_only=True) every .pt file; returns the count."""
    n = 0
    for p in sorted(maps.rglob("*.pt")):
        t = torch.load(io.BytesIO(p.read_bytes()), map_location="cpu", weights_only=True)
        n += t.shape[0] > 0
    return n


def member_bytes(out: Path) -> dict[str, float]:
    """Mean bytes per sample in the shards: total, JPEG, record, and everything but the JPEG."""
    import tarfile

    total = jpeg = rlm = 0
    samples = 0
    for shard in sorted(out.glob("*.tar")):
        total += shard.stat().st_size
        with tarfile.open(shard) as tar:
            for ti in tar:
                if ti.name.endswith(".JPEG") or ti.name.endswith(".jpg"):
                    jpeg += ti.size
                    samples += 1
                elif ti.name.endswith(".rlm"):
                    rlm += ti.size
    return {"shard_bytes_per_image": total / samples, "jpeg_bytes_per_image": jpeg / samples,
            "record_bytes_per_image": rlm / samples,
            "non_jpeg_shard_bytes_per_image": (total - jpeg) / samples}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--size", default="500x375", help="WxH of the synthetic JPEGs")
    p.add_argument("--classes-per-map", type=int, default=40)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_convert.json"))
    args = p.parse_args(argv)
    import logging

    from relabel_shards.convert import convert_official

    logging.getLogger("relabel_shards").setLevel(logging.ERROR)  # "4 class folders, not 1000" on every call

    info = machine_info()
    print_header("relabel-shards convert: official .pt maps + JPEGs -> shards", info)
    w, h = (int(v) for v in args.size.split("x"))
    rows: list[dict] = []
    sizes: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for legacy in (True, False):
            name = "legacy" if legacy else "zip"
            images, maps = make_release(tmp_path / name, args.images, (w, h), args.classes_per_map, legacy)
            pt = [f.stat().st_size for f in maps.rglob("*.pt")]
            sizes[f"pt_bytes_{name}"] = statistics.mean(pt)
            if not legacy:
                continue  # the conversion is timed on the legacy files (the release's format, 9,353 bytes)
            cases = [("torch.load only (baseline)", lambda maps=maps: load_only(maps))]
            for workers in sorted({0, args.num_workers}):
                for check in (True, False):
                    def run(workers=workers, check=check, images=images, maps=maps):
                        out = Path(tempfile.mkdtemp(dir=tmp))
                        convert_official(str(images), str(maps), str(out / "ds"), shard_size=args.shard_size,
                                         num_workers=workers, check_images=check)
                        return out
                    cases.append((f"convert, {workers} workers, check_images={check}", run))
            base = None
            for label, fn in cases:
                fn()  # warm-up: imports, page cache
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                rate = args.images / med
                base = base or rate
                rows.append({"case": label, "median_s": med, "files_per_s": rate, "vs_load_only": rate / base,
                             "repeats": args.repeats})
            for encoding in ("compact", "lossless"):
                out = tmp_path / f"out-{encoding}"
                convert_official(str(images), str(maps), str(out), shard_size=args.shard_size, num_workers=0,
                                 encoding=encoding)
                for k, v in member_bytes(out).items():
                    sizes[f"{k}_{encoding}"] = v
    print(f"# {args.images} images {w}x{h}, synthetic maps with {args.classes_per_map} classes each, "
          f"{os.cpu_count()} cores; median over {args.repeats} repeats after one warm-up")
    print_table(rows, ["case", "median_s", "files_per_s", "vs_load_only"])
    print()
    size_rows = [{"what": k, "bytes_per_image": v} for k, v in sizes.items()]
    print_table(size_rows, ["what", "bytes_per_image"])
    payload = {"machine": info, "args": vars(args), "timings": rows, "sizes": sizes}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()

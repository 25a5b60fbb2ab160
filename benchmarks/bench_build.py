"""Build throughput: the whole ``build_shards`` pipeline against the annotator's forward pass alone.

Both run on the same images in the same batches, in one run: the forward-only baseline gets its batches
already decoded and preprocessed (in memory), so it measures the model (plus top-k and the copy to the CPU);
the pipeline reads JPEG files, decodes and resizes them in DataLoader workers, runs the same annotator,
encodes the label maps and writes shards in the writer thread. Goal (issue 3): pipeline >= 95 % of
forward-only.

    python benchmarks/bench_build.py                      # embedded EfficientNet-Lite0, CPU, 1-3 min here
    python benchmarks/bench_build.py --device cuda --images 2048 --batch-size 128 --num-workers 8

The images are synthetic JPEGs of --size pixels (default 500x375, ImageNet's most common size) with photo-like
smooth content, so decoding costs what it costs on real photos of that size.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_header, print_table, timeit, write_json  # noqa: E402


def make_images(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``n`` JPEGs (quality 90) in an ImageFolder layout with 4 classes; smooth gradients plus mild noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        fx, fy, ph = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(x * fx + ph), np.cos(y * fy + ph), np.sin((x + y) * fx * fy * 20)], -1)
        img = ((base + 1) * 110 + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        (d / f"img{i:06d}.jpg").write_bytes(buf.getvalue())
    return root


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="timm model name (default: the embedded EfficientNet-Lite0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", default="500x375", help="WxH of the synthetic JPEGs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--encoding", default="compact")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_build.json"))
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))

    from relabel_shards.annotator import create_annotator
    from relabel_shards.build import build_shards

    info = machine_info()
    print_header("bench_build: build_shards pipeline vs annotator forward only", info)
    work = Path(tempfile.mkdtemp(prefix="bench_build-"))
    src = make_images(work / "src", args.images, size)

    torch.manual_seed(0)
    ann = create_annotator(args.model, device=args.device)
    print(
        f"# annotator: {ann!r}; {args.images} images {size[0]}x{size[1]}, batch {args.batch_size}, "
        f"workers {args.num_workers}, shard size {args.shard_size}"
    )

    # The same batches the build forms: each shard's images in order, batch_size at a time.
    files = sorted(src.rglob("*.jpg"), key=lambda f: (f.parent.name, f.name))
    batches = []
    for s in range(0, len(files), args.shard_size):
        shard = files[s : s + args.shard_size]
        for b in range(0, len(shard), args.batch_size):
            imgs = [ann.preprocess(Image.open(f).convert("RGB")) for f in shard[b : b + args.batch_size]]
            batches.append(torch.stack(imgs))

    def forward_all() -> None:
        for x in batches:
            ann(x)

    # Forward-only and pipeline runs alternate, so a machine whose load drifts slows both alike; the first
    # round is a warm-up (allocator, oneDNN/cuDNN plans, worker start) and is not counted.
    sync = args.device.startswith("cuda")
    fwd_times, times = [], []
    for r in range(args.repeats + 1):
        f = timeit(forward_all, repeats=1, warmup=0, sync_cuda=sync)["median_s"]
        out = work / f"out{r}"
        t0: list[float] = []
        t_start = time.perf_counter()
        build_shards(
            str(src),
            str(out),
            model=args.model,
            device=args.device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            shard_size=args.shard_size,
            encoding=args.encoding,
            progress=lambda done, total, t0=t0: t0.append(time.perf_counter()) if not t0 else None,
        )
        t_end = time.perf_counter()
        if r > 0:
            fwd_times.append(f)
            times.append(t_end - t0[0])  # from the first batch request to shards + _info.json written
        print(
            f"# round {r}{' (warm-up)' if r == 0 else ''}: forward only {f:.2f} s, pipeline "
            f"{t_end - t0[0]:.2f} s (+{t0[0] - t_start:.2f} s setup: source listing, model)"
        )
    fwd = {
        "median_s": statistics.median(fwd_times),
        "min_s": min(fwd_times),
        "max_s": max(fwd_times),
        "repeats": len(fwd_times),
    }
    pipe = statistics.median(times)
    rows = [
        {
            "mode": "forward only (preprocessed batches)",
            "seconds": fwd["median_s"],
            "images_per_s": args.images / fwd["median_s"],
            "ratio": 1.0,
        },
        {
            "mode": "build_shards pipeline",
            "seconds": pipe,
            "images_per_s": args.images / pipe,
            "ratio": fwd["median_s"] / pipe,
        },
    ]
    print_table(rows, ["mode", "seconds", "images_per_s", "ratio"])
    verdict = "meets" if rows[1]["ratio"] >= 0.95 else "misses"
    print(
        f"# pipeline keeps {100 * rows[1]['ratio']:.1f} % of forward-only throughput "
        f"({verdict} the 95 % goal)"
    )
    payload = {"machine": info, "args": vars(args), "rows": rows, "forward": fwd, "pipeline_runs_s": times}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()

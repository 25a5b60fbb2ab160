"""Join at scale: ``join_labels`` time and memory on a synthetic label set of >= 200k keys.

In one run, on synthetic data (tiny stand-in images and tiny real records, each bound to its image):

- label shards L: ``--keys`` keys in shards of 1,000, keys in one order;
- image shards I: the same keys in another sharding and order (shards of 1,250, shuffled across shards, as
  timm/imagenet-1k-wds is), a few images without a label and a few labels without an image;
- baseline: one plain pass over I (every sample's members read: what any writer of I-aligned shards pays);
- ``build_index(L)``: time, Python-heap peak (tracemalloc; numpy arrays included) and the index's bytes;
- ``join_labels(L, I, OUT, labels_only=True)`` end to end (index, lookups, record reads, writing the label
  shards), with ``--num-workers`` workers; process peak RSS before and after.

    python benchmarks/bench_join.py                    # 200k keys, ~3 min on 2 cores (data made once)
    python benchmarks/bench_join.py --keys 50000 --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine_info, print_header, print_table, write_json  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_data(root: Path, n: int, seed: int = 0) -> tuple[Path, list[str]]:
    """Label shards (1,000 a shard) in ``root/L``, image shards (1,250 a shard, shuffled) in ``root/I``."""
    from relabel_shards.labelmap import ImageBinding, encode_label_map
    from relabel_shards.pairing import KIND_LABELS
    from relabel_shards.shards import make_split_info, write_info, write_shard

    rng = np.random.default_rng(seed)
    keys = [f"n{(i % 1000):08d}_{i}" for i in range(n)]
    images = {k: hashlib.sha256(k.encode()).digest() * 4 for k in keys}  # 128-byte stand-ins, distinct
    values = np.full((1, 1, 1), 3.0, np.float32)
    labelled = keys[: n - 50]  # the last 50 images have no label
    records = []
    for s in range(0, len(labelled), 1000):
        samples = []
        for k in labelled[s : s + 1000]:
            rec = encode_label_map(
                values, np.array([[[int(k[1:9])]]]), 1000, image=ImageBinding.of(images[k], 64, 48)
            )
            samples.append([(f"{k}.rlm", rec)])
        records.append(write_shard(str(root / "L"), f"train-{s // 1000:06d}.tar", samples))
    extra = [f"orphan_{i}" for i in range(50)]  # labels without an image
    samples = [
        [(f"{k}.rlm", encode_label_map(values, np.array([[[1]]]), 1000, image=ImageBinding.of(b"x", 1, 1)))]
        for k in extra
    ]
    records.append(write_shard(str(root / "L"), f"train-{len(records):06d}.tar", samples))
    write_info(
        str(root / "L"),
        make_split_info(
            "train",
            records,
            {"kind": KIND_LABELS, "pairs_with": None, "k": 1, "height": 1, "width": 1, "num_classes": 1000},
        ),
    )
    order = rng.permutation(n)
    urls = []
    for s in range(0, n, 1250):
        samples = [
            [(f"{keys[i]}.jpg", images[keys[i]]), (f"{keys[i]}.cls", b"1")] for i in order[s : s + 1250]
        ]
        rec = write_shard(str(root / "I"), f"imgs-{s // 1250:04d}.tar", samples)
        urls.append(str(root / "I" / rec.filename))
    return root / "L", urls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/bench_join.json")
    args = ap.parse_args()

    from relabel_shards.join import build_index, join_labels
    from relabel_shards.sources import iter_shard_samples

    info = machine_info()
    print_header(f"join: {args.keys:,} keys, label shards of 1,000 against image shards of 1,250", info)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        labels, images = make_data(root, args.keys)
        print(f"# made the data in {time.perf_counter() - t0:.0f} s")
        rss0 = _rss_mib()

        plain, index_s, join_s = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n = sum(1 for u in images for _ in iter_shard_samples(u))
            plain.append(time.perf_counter() - t0)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            index = build_index(str(labels))
            index_s.append(time.perf_counter() - t0)
        tracemalloc.start()  # a separate run: tracing every allocation slows the scan many times over
        index = build_index(str(labels))
        _, heap_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        index_bytes = sum(a.nbytes for a in (index.keys, index.shard, index.offset, index.size))
        rss_index = _rss_mib()
        for r in range(args.repeats):
            t0 = time.perf_counter()
            s = join_labels(
                str(labels), images, root / f"out{r}", labels_only=True, num_workers=args.num_workers
            )
            join_s.append(time.perf_counter() - t0)
        rss_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        proj = s.info["relabel_shards"]
        out_bytes = sum(p.stat().st_size for p in (root / "out0").glob("*.tar"))
    rows = [
        {
            "step": "plain pass over the image shards (baseline)",
            "median s": statistics.median(plain),
            "samples/s": n / statistics.median(plain),
        },
        {
            "step": "build_index (one pass over the label shards' headers)",
            "median s": statistics.median(index_s),
            "samples/s": len(index) / statistics.median(index_s),
        },
        {
            "step": f"join_labels --labels-only, {args.num_workers} workers",
            "median s": statistics.median(join_s),
            "samples/s": n / statistics.median(join_s),
        },
    ]
    print_table(rows, ["step", "median s", "samples/s"])
    print(
        f"# index: {len(index):,} keys, {index_bytes / 2**20:.1f} MiB of arrays "
        f"({index_bytes / len(index):.1f} B per key), Python-heap peak while building "
        f"{heap_peak / 2**20:.1f} MiB; process RSS {rss0:.0f} MiB before, {rss_index:.0f} MiB with the "
        f"index, peak {rss_max:.0f} MiB over the run (workers are separate processes)"
    )
    print(
        f"# join / plain pass: {statistics.median(join_s) / statistics.median(plain):.2f}x the time; "
        f"{proj['images_without_label']} images without a label, {proj['labels_without_image']['count']} "
        f"labels without an image; {out_bytes / 2**20:.1f} MiB of label shards written"
    )
    write_json(
        args.json,
        {
            "machine": info,
            "keys": args.keys,
            "num_workers": args.num_workers,
            "plain_s": plain,
            "index_s": index_s,
            "join_s": join_s,
            "index_bytes": index_bytes,
            "index_heap_peak_bytes": heap_peak,
            "rss_before_mib": rss0,
            "rss_with_index_mib": rss_index,
            "rss_peak_mib": rss_max,
            "images_without_label": proj["images_without_label"],
            "labels_without_image": proj["labels_without_image"]["count"],
        },
    )


if __name__ == "__main__":
    main()

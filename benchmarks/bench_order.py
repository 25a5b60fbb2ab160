"""Sample order at ImageNet scale without images: classes per batch, from shard layout to batches.

Section ``diversity`` (issue 10, item 1): shards are written the way ``build``/``convert`` write them
(``relabel_shards.plan``: source order, or a seeded global permutation) from the labels of an ImageNet-sized
class-sorted source (1,281,167 samples, 1,000 classes, shards of 1,000). The loader's own order code then
deals them out (``order.assign_shards`` over 8 ranks x 8 workers, each reader's shards streamed in order
through ``order.shuffle_buffer`` of 1,000, batches of 128 per reader, as the DataLoader forms them), and the
distinct classes of every batch are counted. The baseline, in the same run, is the i.i.d. expectation
``sum_c 1 - (1 - p_c)^128``; ``diversity.assess``'s estimate from the recorded histograms is shown beside
the simulation. Goal: shuffled shards >= 97% of i.i.d.

The script is a set of sections, each a function returning rows; ``SECTIONS`` maps a name to it and the
JSON output holds one key per section: ``diversity`` (above), ``interleave`` (class-sorted shards at 1-16
shards in flight), ``assignment`` (10k shards to 1,024 readers) and ``resume`` (bytes read again at 90 %),
the last three from the loader's epoch plan (``bench_stream.py``, which also measures resume bytes through
S3 with ``--s3``). Run: ``python benchmarks/bench_order.py [--scale 0.1] [--sections diversity ...]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relabel_shards.diversity import assess, observed_shard_classes  # noqa: E402
from relabel_shards.order import assign_shards, derive_seed, samples_per_slot, shuffle_buffer  # noqa: E402
from relabel_shards.plan import cut, ordered  # noqa: E402

IMAGENET = {
    "samples": 1_281_167,
    "classes": 1000,
    "shard_size": 1000,
    "ranks": 8,
    "workers": 8,
    "buffer": 1000,
    "batch": 128,
}


def class_sorted_labels(num_samples: int, num_classes: int) -> list[int]:
    """Labels of a source in ImageFolder order: class 0's images, then class 1's, ... (sizes differ by 1)."""
    base, extra = divmod(num_samples, num_classes)
    out: list[int] = []
    for c in range(num_classes):
        out += [c] * (base + (1 if c < extra else 0))
    return out


def write_layout(labels: Sequence[int], shard_size: int, shuffle: bool, seed: int = 0) -> list[list[int]]:
    """The labels of each shard, as build/convert write them (``plan.ordered`` then ``plan.cut``)."""
    return cut(ordered(labels, shuffle, seed), shard_size)


def reader_streams(
    shards: Sequence[Sequence[int]], ranks: int, workers: int, buffer: int, seed: int, epoch: int
) -> Iterator[list[int]]:
    """Each reader's (rank x worker) labels in the order its batches get them: the loader's order code.

    Shards come from ``assign_shards`` (seed, epoch); a reader streams its shards in order through
    ``shuffle_buffer`` seeded as the loader seeds it, and stops at its quota (``samples_per_slot``).
    """
    slots = assign_shards([len(s) for s in shards], ranks * workers, seed, epoch)
    quota = samples_per_slot(sum(len(s) for s in shards), ranks * workers)
    for rank in range(ranks):
        for wid in range(workers):
            rng = random.Random(derive_seed("buffer", seed, epoch, rank, wid))
            stream = (c for i in slots[rank * workers + wid] for c in shards[i])
            yield list(shuffle_buffer(stream, buffer, rng))[:quota]


def batch_distinct(streams: Iterator[list[int]], batch: int) -> list[int]:
    """Distinct classes in every full batch of every reader."""
    out = []
    for labels in streams:
        for b in range(0, len(labels) - batch + 1, batch):
            out.append(len(set(labels[b : b + batch])))
    return out


def iid_expectation(labels: Sequence[int], batch: int) -> float:
    """Expected distinct classes in ``batch`` i.i.d. draws from the labels' class distribution."""
    counts: dict[int, int] = {}
    for c in labels:
        counts[c] = counts.get(c, 0) + 1
    n = len(labels)
    return sum(1.0 - (1.0 - k / n) ** batch for k in counts.values())


def diversity_rows(cfg: dict[str, int], epochs: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Section ``diversity``: class-sorted and shuffled shards through the loader's order (one shard in
    flight per reader), distinct classes per batch over ``epochs`` epochs, against i.i.d."""
    labels = class_sorted_labels(cfg["samples"], cfg["classes"])
    iid = iid_expectation(labels, cfg["batch"])
    rows = []
    for layout, shuffle in (("class-sorted (--no-shuffle)", False), ("shuffled (default)", True)):
        t0 = time.perf_counter()
        shards = write_layout(labels, cfg["shard_size"], shuffle, seed)
        means, all_counts = [], []
        for epoch in range(epochs):
            counts = batch_distinct(
                reader_streams(shards, cfg["ranks"], cfg["workers"], cfg["buffer"], seed, epoch), cfg["batch"]
            )
            means.append(statistics.fmean(counts))
            all_counts += counts
        est = assess(observed_shard_classes(shards), batch_size=cfg["batch"], num_classes=cfg["classes"])
        all_counts.sort()
        rows.append(
            {
                "layout": layout,
                "shards": len(shards),
                "readers": cfg["ranks"] * cfg["workers"],
                "batches": len(all_counts),
                "mean": statistics.median(means),  # median over epochs of the epoch's mean
                "median": statistics.median(all_counts),
                "p1": all_counts[len(all_counts) // 100],
                "min": all_counts[0],
                "iid": iid,
                "ratio": statistics.median(means) / iid,
                "estimate": est.expected,
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


def interleave_rows(cfg: dict[str, int]) -> list[dict[str, Any]]:
    """Issue 10, item 2: classes per batch on class-sorted shards at several shards in flight, through the
    loader's own epoch plan (``relabel_shards.stream``; ``bench_stream.py``), 8 of the 64 readers, at the
    full ImageNet layout whatever ``--scale``."""
    import bench_stream as bs

    readers = list(range(0, 64, 8))
    iid = bs.CLASSES * (1 - (1 - 1 / bs.CLASSES) ** bs.BATCH)
    rows = []
    for shuffled, flights in ((False, (1, 2, 4, 8, 16)), (True, (4,))):
        lengths, classes = bs.imagenet_layout(shuffled=shuffled)
        for k in flights:
            row = bs.diversity(lengths, classes, k, readers, 1000)
            rows.append({"shards": "shuffled" if shuffled else "class-sorted", "in_flight": k, **row,
                         "vs_iid": row["mean"] / iid})
    return rows


def assignment_rows(cfg: dict[str, int]) -> list[dict[str, Any]]:
    """Issue 10, item 6: 10,000 shards to 1,024 readers, the heap against the former linear scan, same run."""
    import bench_stream as bs

    return [bs.assignment(5)]


def resume_rows(cfg: dict[str, int]) -> list[dict[str, Any]]:
    """Issue 10, item 4: what a resume at 90 % of an epoch reads again, from the plan (same topology and
    elastic); ``bench_stream.py --s3`` adds the row measured through the S3 server on loopback."""
    import bench_stream as bs

    return bs.resume_bytes(bs.imagenet_layout(shuffled=False)[0])


SECTIONS: dict[str, Callable[[dict[str, int]], list[dict[str, Any]]]] = {
    "diversity": diversity_rows,
    "interleave": interleave_rows,
    "assignment": assignment_rows,
    "resume": resume_rows,
}
COLUMNS = {
    "diversity": [
        "layout",
        "shards",
        "readers",
        "batches",
        "mean",
        "median",
        "p1",
        "min",
        "iid",
        "ratio",
        "estimate",
        "seconds",
    ],
    "interleave": ["shards", "in_flight", "median", "mean", "p5", "min", "vs_iid", "batches"],
    "assignment": ["heap_ms", "scan_ms", "speedup"],
    "resume": ["resume", "read_fraction", "read_again_fraction", "shards_opened"],
}


def scaled(scale: float) -> dict[str, int]:
    """The ImageNet layout with samples and classes scaled (the per-shard and per-batch figures kept)."""
    cfg = dict(IMAGENET)
    cfg["samples"] = max(cfg["shard_size"] * 64, int(cfg["samples"] * scale))
    cfg["classes"] = max(10, int(cfg["classes"] * scale))
    return cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from _common import machine_info, print_header, write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of ImageNet's samples and classes")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_order.json"))
    args = p.parse_args(argv)
    info = machine_info()
    print_header("bench_order: classes per batch, shard layout to batches (no images)", info)
    cfg = scaled(args.scale)
    print(f"# layout: {cfg}")
    payload: dict[str, Any] = {"machine": info, "config": cfg}
    from _common import print_table

    for name in args.sections:
        rows = SECTIONS[name](cfg)
        print(f"\n## {name}")
        print_table(rows, COLUMNS[name])
        payload[name] = rows
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

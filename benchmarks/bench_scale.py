"""Planning and bookkeeping at ImageNet-21k scale on synthetic metadata (no image is read or decoded).

Each part runs in its own subprocess, so its peak memory (``ru_maxrss`` after the part minus before it,
imports and inputs excluded) is its own. Parts, at 13M samples, 13k shards of 1,000, 21k classes, 1,024
readers (8 x 128), unless ``--scale`` shrinks them (sample counts then are extrapolated linearly in the
``at_full_scale`` columns):

- ``source``: the folder source's items as ``open_source`` makes them for ``root/class/image.JPEG`` (the
  ``sources.ItemTable`` column store, a directory listing at a time, then the key-uniqueness check), built
  from synthetic names.
- ``plan``: build's plan on those items: the seeded permutation, the cut into shards, the fingerprint.
- ``info``: ``_info.json`` of 13k shards (sizes, sha256, per-shard class histograms of shuffled shards,
  21k class names): ``make_split_info`` + ``write_info``, then ``read_info``; its size on disk.
- ``order``: the loader's order and length: ``order.assign_shards`` over 1,024 readers and
  ``samples_per_slot``, from that ``_info.json``'s shard lengths.
- ``diversity``: ``class_sorted_warning`` on that ``_info.json`` (what ``info``, ``verify`` and the loader
  call).
- ``verify``: ``verify_shards``'s cost per shard on small real shards (x 13k), and the memory of its
  split-wide bookkeeping (every key, for duplicates) at 13M keys.
- ``finalize``: ``ShardJob.finalize`` (build, convert and join's last step) over 13k synthetic sidecars of
  1,000 keys: reading them all, the key-uniqueness check, ``_info.json``; and the key check alone by
  64-bit hashes against the dict of every key it used before.

Goal (issue 12, item 10): each part well under a minute and a few hundred MB.
Run: ``python benchmarks/bench_scale.py [--scale 0.1] [--parts info order]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

FULL = {"samples": 13_000_000, "shard_size": 1000, "classes": 21_000, "readers": 1024}


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Peak:
    """Peak resident memory above the start, sampled every 5 ms in a thread (import peaks excluded)."""

    def __enter__(self) -> _Peak:
        import threading

        self.start = self.peak = _current_rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _current_rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _current_rss_mb())

    def begin(self) -> _Peak:
        return self.__enter__()

    def end(self) -> float:
        """Stop sampling; the peak in MB above the start."""
        self.__exit__()
        return self.peak - self.start


def _table(n: int, classes: int):
    """A folder source's items as ``open_source`` makes them (``sources._TableBuilder`` rows, then the
    key-uniqueness check), from synthetic ``root/class/image.JPEG`` names."""
    from relabel_shards.sources import _check_unique, _TableBuilder

    names = [f"n{c:08d}" for c in range(classes)]
    per = -(-n // classes)
    rows = _TableBuilder()
    for c in range(classes):  # one folder at a time, as open_source walks them
        rows.add_many([f"{names[c]}/{names[c]}_{i}.JPEG" for i in range(c * per, min(n, (c + 1) * per))], c)
    table = rows.table("folder", "/data/imagenet21k/train", None, "/data/imagenet21k/train", names)
    _check_unique(table)
    return table


def part_source(cfg: dict) -> dict:
    import numpy  # noqa: F401  (imports are not the items' memory)

    import relabel_shards.sources  # noqa: F401

    pk, t0 = _Peak().begin(), time.perf_counter()
    table = _table(cfg["linear_samples"], cfg["classes"])
    return {
        "seconds": time.perf_counter() - t0,
        "peak_mb": pk.end(),
        "n": len(table),
        "linear": True,
        "table_mb": table.nbytes / 2**20,
    }


def part_plan(cfg: dict) -> dict:
    from relabel_shards.build import _job_description, _plan
    from relabel_shards.plan import job_fingerprint, order_info
    from relabel_shards.sources import Source

    src = Source(
        kind="folder",
        url="/data/imagenet21k/train",
        items=_table(cfg["linear_samples"], cfg["classes"]),
        classes=tuple(f"n{c:08d}" for c in range(cfg["classes"])),
    )
    pk, t0 = _Peak().begin(), time.perf_counter()
    plan = _plan(src, cfg["shard_size"], True, 0)
    t_plan = time.perf_counter() - t0
    settings = {"shard_size": cfg["shard_size"], "order": order_info(True, 0, "folder")}
    fp = job_fingerprint(_job_description(src, settings, {"model": "x"}))
    return {
        "seconds": time.perf_counter() - t0,
        "plan_seconds": t_plan,
        "peak_mb": pk.end(),
        "shards": len(plan),
        "fingerprint": fp[:12],
        "linear": True,
    }


def _info_split(cfg: dict) -> dict:
    import numpy as np

    from relabel_shards.diversity import shard_classes_entry
    from relabel_shards.shards import ShardRecord, make_split_info

    n_shards = -(-cfg["samples"] // cfg["shard_size"])
    rng = np.random.default_rng(0)
    records, hists = [], []
    for i in range(n_shards):
        n = min(cfg["shard_size"], cfg["samples"] - i * cfg["shard_size"])
        records.append(
            ShardRecord(
                filename=f"train-{i:06d}.tar", num_samples=n, bytes=110_000_000 + i, sha256=f"{i:064x}"
            )
        )
        labels = rng.integers(0, cfg["classes"], n)  # a shuffled shard: about n distinct classes
        c, k = np.unique(labels, return_counts=True)
        hists.append(shard_classes_entry(dict(zip(c.tolist(), k.tolist(), strict=True))))
    project = {
        "k": 5,
        "height": 15,
        "width": 15,
        "num_classes": cfg["classes"],
        "class_names": [f"class number {c}, a synthetic name" for c in range(cfg["classes"])],
        "dataset_classes": [f"n{c:08d}" for c in range(cfg["classes"])],
        "failures": [],
        "num_failures": 0,
        "order": {"shuffled": True, "seed": 0},
        "shard_classes": hists,
    }
    return make_split_info("train", records, project)


def part_info(cfg: dict) -> dict:
    from relabel_shards.shards import read_info, write_info

    split = _info_split(cfg)
    with tempfile.TemporaryDirectory() as d:
        pk, t0 = _Peak().begin(), time.perf_counter()
        write_info(d, split)
        t_write = time.perf_counter() - t0
        size = os.path.getsize(os.path.join(d, "_info.json"))
        t1 = time.perf_counter()
        info = read_info(d)
        t_read = time.perf_counter() - t1
    assert info["splits"]["train"]["num_samples"] == cfg["samples"]
    with tempfile.TemporaryDirectory() as d:  # and at ImageNet-1k's layout, for the README
        write_info(d, _info_split({"samples": 1_281_167, "shard_size": 1000, "classes": 1000}))
        size_1k = os.path.getsize(os.path.join(d, "_info.json"))
    return {
        "seconds": t_write + t_read,
        "write_seconds": t_write,
        "read_seconds": t_read,
        "peak_mb": pk.end(),
        "info_mb": size / 2**20,
        "info_mb_imagenet1k": size_1k / 2**20,
    }


def part_order(cfg: dict) -> dict:
    from relabel_shards.order import assign_shards, samples_per_slot

    lengths = _info_split(cfg)["shard_lengths"]
    pk, t0 = _Peak().begin(), time.perf_counter()
    slots = assign_shards(lengths, cfg["readers"], 0, 0)
    per = samples_per_slot(sum(lengths), cfg["readers"])
    return {
        "seconds": time.perf_counter() - t0,
        "peak_mb": pk.end(),
        "slots": len(slots),
        "samples_per_slot": per,
    }


def part_diversity(cfg: dict) -> dict:
    from relabel_shards.diversity import class_sorted_warning

    split = _info_split(cfg)
    pk, t0 = _Peak().begin(), time.perf_counter()
    warning = class_sorted_warning(split)
    return {"seconds": time.perf_counter() - t0, "peak_mb": pk.end(), "warns": warning is not None}


def _small_dataset(out: str, shards: int, per_shard: int = 2) -> None:
    """``shards`` real shards of ``per_shard`` tiny samples (8x8 PNG, 1x1 map) and their _info.json."""
    import io

    import numpy as np
    from PIL import Image

    from relabel_shards.labelmap import encode_label_map
    from relabel_shards.shards import make_split_info, sample_members, shard_name, write_info, write_shard

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    rec = encode_label_map(np.ones((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.int64), 10)
    records = []
    for s in range(shards):
        samples = [
            sample_members(
                f"k{s}_{j}",
                image=buf.getvalue(),
                image_ext="png",
                label=j,
                meta={"width": 8, "height": 8},
                labelmap=rec,
            )
            for j in range(per_shard)
        ]
        records.append(write_shard(out, shard_name("train", s), samples))
    write_info(out, make_split_info("train", records, {"k": 1, "height": 1, "width": 1, "num_classes": 10}))


def part_verify(cfg: dict) -> dict:
    from relabel_shards.verify import VerifyReport, _SplitChecker, verify_shards

    shards = 200
    with tempfile.TemporaryDirectory() as d:
        _small_dataset(d, shards)
        verify_shards(d)  # warm
        t0 = time.perf_counter()
        report = verify_shards(d)
        per_shard = (time.perf_counter() - t0) / shards
    assert report.ok, report.problems[:3]
    # the split-wide bookkeeping: every key of the split, as read_shard records it
    checker = _SplitChecker(VerifyReport(url="x", split="train"), (None, None, None, None))
    per = cfg["shard_size"]
    keys = [f"n{i // 619:08d}_{i}" for i in range(cfg["linear_samples"])]  # made before the clock starts
    names = [f"train-{s:06d}.tar" for s in range(-(-len(keys) // per))]
    pk, t1 = _Peak().begin(), time.perf_counter()
    for i, key in enumerate(keys):
        checker.note_key(key, names[i // per])
    checker.finish_keys()
    keys_s = time.perf_counter() - t1
    return {  # seconds: the per-shard overhead x 13k shards, plus the key bookkeeping at 13M keys
        "seconds": per_shard * -(-cfg["samples"] // cfg["shard_size"]) + keys_s / cfg["scale"],
        "per_shard_ms": per_shard * 1e3,
        "keys_seconds": keys_s,
        "peak_mb": pk.end(),
        "linear_mb": True,
    }


def part_finalize(cfg: dict) -> dict:
    """``ShardJob.finalize`` over synthetic sidecars as build writes them (1,000 keys, the full class
    histogram, the job description; empty shard files): reading every sidecar, the key-uniqueness check,
    the project (build's ``shard_classes``) and ``_info.json``. Baselines on the same sidecars: every
    ``ShardStats`` held as parsed (what finalize held before), and the key check by a dict of every key."""
    import gc

    import numpy as np

    from relabel_shards.build import _top_entry
    from relabel_shards.diversity import shard_classes_entry
    from relabel_shards.shards import ShardRecord
    from relabel_shards.writer import ShardJob, ShardStats, _check_unique_keys

    per = cfg["shard_size"]
    shards = -(-cfg["linear_samples"] // per)
    rng = np.random.default_rng(0)
    job_desc = {
        "source": {"kind": "folder", "url": "/data/imagenet21k/train", "num_files": cfg["samples"]},
        "items": "0" * 64,
        "settings": {"shard_size": per, "seed": 0},
        "annotator": {"model": "x"},
    }
    with tempfile.TemporaryDirectory() as d:
        for i in range(shards):  # sidecars as build writes them: keys, full class histogram, job description
            name = f"train-{i:06d}.tar"
            open(os.path.join(d, name), "wb").close()
            keys = tuple(f"n{(i * per + j) // 619:08d}_{i * per + j}" for j in range(per))
            rec = ShardRecord(filename=name, num_samples=per, bytes=0, sha256="0" * 64)
            c, k = np.unique(rng.integers(0, cfg["classes"], per), return_counts=True)
            extra = {
                "map_shapes": [[15, 15]],
                "job": job_desc,
                "classes": shard_classes_entry(dict(zip(c.tolist(), k.tolist(), strict=True)), top=1 << 30),
            }
            with open(os.path.join(d, f"train-{i:06d}_stats.json"), "wb") as f:
                f.write(
                    ShardStats(record=rec, keys=keys, failures=(), fingerprint="f", extra=extra).to_json()
                )
        with tempfile.TemporaryDirectory() as warm:  # imports and thread pools are not finalize's memory
            w = ShardJob(warm, prefix="train", num_shards=1, fingerprint="w", world_size=1, rank=0)
            out = w.open(0)
            out.add("k", [("k.txt", b"x")])
            out.commit()
            w.finalize("train", {"k": 1})
        job = ShardJob(d, prefix="train", num_shards=shards, fingerprint="f", world_size=1, rank=0)
        gc.collect()
        pk, t0 = _Peak().begin(), time.perf_counter()
        info = job.finalize("train", lambda stats: {"shard_classes": [_top_entry(st) for st in stats]})
        seconds = time.perf_counter() - t0
        peak = pk.end()
        assert info is not None and info["num_samples"] == shards * per
        gc.collect()
        pk, t3 = _Peak().begin(), time.perf_counter()
        stats = [job.read_stats(i) for i in range(shards)]  # what finalize held before: every ShardStats
        full_s, full_mb = time.perf_counter() - t3, pk.end()
    pk, t1 = _Peak().begin(), time.perf_counter()
    _check_unique_keys(stats)
    check_s, check_mb = time.perf_counter() - t1, pk.end()
    gc.collect()
    pk, t2 = _Peak().begin(), time.perf_counter()
    seen: dict[str, str] = {}  # the check before: a dict of every key
    for st in stats:
        for k in st.keys:
            if k in seen:
                raise AssertionError(k)
            seen[k] = st.record.filename
    dict_s, dict_mb = time.perf_counter() - t2, pk.end()
    return {
        "seconds": seconds,
        "peak_mb": peak,
        "shards": shards,
        "keys_check_seconds": check_s,
        "keys_check_mb": check_mb,
        "keys_dict_seconds_before": dict_s,
        "keys_dict_mb_before": dict_mb,
        "all_stats_seconds_before": full_s,
        "all_stats_mb_before": full_mb,
        "linear": True,
    }


PARTS = {
    "source": part_source,
    "plan": part_plan,
    "info": part_info,
    "order": part_order,
    "diversity": part_diversity,
    "verify": part_verify,
    "finalize": part_finalize,
}


def _child(part: str, cfg: dict) -> None:
    print(json.dumps(PARTS[part](cfg)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="fraction of the 13M samples for the sample-linear parts (source, plan, keys)",
    )
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_scale.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, json.loads(args.cfg))
        return {}
    from _common import machine_info, print_header, print_table, write_json

    info = machine_info()
    print_header("bench_scale: planning and bookkeeping at ImageNet-21k scale (synthetic metadata)", info)
    cfg = {**FULL, "scale": args.scale, "linear_samples": int(FULL["samples"] * args.scale)}
    print(
        f"# config: {cfg} (source, plan and verify's keys run on linear_samples; their at_full_scale "
        "figures are measured / scale; the other parts run at full scale)"
    )
    rows = []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [
                str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parent),
                os.environ.get("PYTHONPATH", ""),
            ]
        ),
    }
    for part in args.parts:
        res = subprocess.run(
            [sys.executable, __file__, "--child", part, "--cfg", json.dumps(cfg)],
            capture_output=True,
            text=True,
            env=env,
        )
        if res.returncode != 0:
            raise SystemExit(f"part {part} failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        row = {"part": part, **r}
        row["seconds_at_full_scale"] = r["seconds"] / args.scale if r.get("linear") else r["seconds"]
        linear_mb = r.get("linear") or r.get("linear_mb")
        row["mb_at_full_scale"] = r["peak_mb"] / args.scale if linear_mb else r["peak_mb"]
        rows.append(row)
        print(f"# {part}: {r}", flush=True)
    print_table(rows, ["part", "seconds", "peak_mb", "seconds_at_full_scale", "mb_at_full_scale"])
    payload = {"machine": info, "config": cfg, "scale": args.scale, "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

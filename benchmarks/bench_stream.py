"""The shard stream (relabel_shards/stream.py): diversity per batch, shard assignment time, resume bytes.

All three are computed with the loader's own plan code (``stream.EpochPlan``: assignment, interleaving,
shuffle buffer, resume), on sample ids, without images, at the ImageNet layout of issue 10: 1,282 shards of
1,000 samples (1,281,167 in all), 1,000 classes, 8 ranks x 8 workers, shuffle buffer 1,000, batch 128.

1. Diversity: distinct classes per batch of 128 from one worker's stream (a DataLoader worker batches its own
   stream), for class-sorted shards (a build from a sorted folder: 1-2 classes per shard) at several
   ``shards_in_flight``, and for shuffled shards; the i.i.d. expectation: 1000 (1 - (1 - 1/1000)^128) = 120.3.
2. Assignment: ``order.assign_shards`` of 10,000 shards to 1,024 readers, the heap against the former linear
   scan (same output; checked).
3. Resume bytes: a checkpoint at 90 % of the epoch; the samples the resumed job reads (a shard is read from
   its start up to the last sample still needed), and of those the ones read again (read before the
   checkpoint), as a fraction of the epoch; for the same topology and for an elastic resume on 4 x 8.
   Samples stand for bytes (shards of equal-sized samples). ``--s3`` adds a measured row: bytes fetched from
   an S3 API server (moto) on loopback by ``make_loader`` at small scale.

    python benchmarks/bench_stream.py            # about a minute on 2 busy cores
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_header, print_table, write_json  # noqa: E402

from relabel_shards.order import assign_shards, derive_seed  # noqa: E402
from relabel_shards.stream import EpochPlan, Topology  # noqa: E402

TOTAL, CLASSES, SHARD, BATCH = 1_281_167, 1000, 1000, 128


def imagenet_layout(shuffled: bool, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """Shard lengths and the class of each sample id (sorted by class, or a seeded global permutation)."""
    per_class = np.full(CLASSES, TOTAL // CLASSES)
    per_class[: TOTAL % CLASSES] += 1
    classes = np.repeat(np.arange(CLASSES), per_class)
    if shuffled:
        classes = np.random.default_rng(seed).permutation(classes)
    lengths = [SHARD] * (TOTAL // SHARD) + ([TOTAL % SHARD] if TOTAL % SHARD else [])
    return lengths, classes


def reader_ids(plan: EpochPlan, reader: int) -> np.ndarray:
    p = plan.pass_plan(reader, 0)
    ids = plan.offsets[p.shard_of[p.yields]] + p.index_of[p.yields]
    return ids[: plan.quota(reader)]


def diversity(lengths, classes, in_flight: int, readers: list[int], buffer: int) -> dict:
    plan = EpochPlan(lengths, 0, 0, Topology(8, 8, in_flight=in_flight, buffer=buffer))
    distinct = []
    for r in readers:
        cls = classes[reader_ids(plan, r)]
        for b in range(0, len(cls) - BATCH + 1, BATCH):
            distinct.append(len(np.unique(cls[b : b + BATCH])))
    d = np.asarray(distinct)
    return {
        "median": float(np.median(d)),
        "mean": float(d.mean()),
        "p5": float(np.percentile(d, 5)),
        "min": int(d.min()),
        "batches": len(d),
    }


def _scan_assign(lengths, num_slots, seed, epoch):
    order = list(range(len(lengths)))
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    loads, slots = [0] * num_slots, [[] for _ in range(num_slots)]
    for i in order:
        s = min(range(num_slots), key=lambda j: (loads[j], len(slots[j]), j))
        slots[s].append(i)
        loads[s] += lengths[i]
    return slots


def assignment(repeats: int) -> dict:
    lengths = [1250] * 10_000
    heap = []
    for rep in range(repeats):
        t0 = time.perf_counter()
        got = assign_shards(lengths, 1024, 0, rep)
        heap.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    want = _scan_assign(lengths, 1024, 0, repeats - 1)
    scan = time.perf_counter() - t0
    assert got == want
    return {
        "heap_ms": 1e3 * float(np.median(heap)),
        "scan_ms": 1e3 * scan,
        "speedup": scan / float(np.median(heap)),
    }


def _read_before(plan: EpochPlan, reader: int, pos: int) -> dict[int, int]:
    """Samples of each shard a reader had read when it had yielded ``pos`` (reads are lazy: up to the last
    one an emitted sample needed)."""
    p = plan.pass_plan(reader, 0)
    cursor = int(p.yields[:pos].max()) + 1 if pos else 0
    shards, idx = p.shard_of[:cursor], p.index_of[:cursor]
    out: dict[int, int] = {}
    for s, i in zip(shards.tolist(), idx.tolist(), strict=True):
        out[s] = max(out.get(s, 0), i + 1)
    return out


def _resumed_reads(plan: EpochPlan, reader: int, start: int) -> dict[int, int]:
    """Samples of each shard the resumed reader reads: from the start to its last sample still needed."""
    p = plan.pass_plan(reader, 0)
    need = p.yields[start : plan.quota(reader)]
    out: dict[int, int] = {}
    for s, i in zip(p.shard_of[need].tolist(), p.index_of[need].tolist(), strict=True):
        out[s] = max(out.get(s, 0), i + 1)
    return out


def resume_bytes(lengths, frac: float = 0.9) -> list[dict]:
    topo = Topology(8, 8, in_flight=4, buffer=1000)
    plan = EpochPlan(lengths, 0, 0, topo)
    before: dict[int, int] = {}
    pos = {}
    for r in range(topo.readers):
        pos[r] = int(frac * plan.quota(r))
        for s, n in _read_before(plan, r, pos[r]).items():
            before[s] = max(before.get(s, 0), n)
    rows = []
    # same topology: each reader continues its own plan
    after: dict[int, int] = {}
    for r in range(topo.readers):
        for s, n in _resumed_reads(plan, r, pos[r]).items():
            after[s] = max(after.get(s, 0), n)
    rows.append(_bytes_row("same 8 x 8, shards from their start (no byte offsets)", before, after))
    # same topology with the state's byte offsets: the buffered samples by their spans, open shards
    # continue where they stood; what is read again is the samples read but not yet yielded
    buffered = unread = 0
    for r in range(topo.readers):
        p = plan.pass_plan(r, 0)
        cursor = int(p.yields[: pos[r]].max()) + 1
        buffered += int((p.yields[pos[r] :] < cursor).sum())
        unread += plan.quota(r) - cursor
    rows.append(
        {
            "resume": "same 8 x 8, byte offsets (the default)",
            "read_fraction": (unread + buffered) / TOTAL,
            "read_again_fraction": buffered / TOTAL,
            "shards_opened": None,
        }
    )
    # elastic: the consumed bitmap, planned afresh for 4 ranks x 8 workers
    consumed = plan.consumed_mask(pos)
    new = EpochPlan(lengths, 0, 0, Topology(4, 8, in_flight=4, buffer=1000, batch_size=BATCH), base=consumed)
    after = {}
    for r in range(new.topology.readers):
        for s, take in new.pieces[r]:
            after[s] = max(after.get(s, 0), int(take[-1]) + 1)
    rows.append(_bytes_row("elastic 8 x 8 -> 4 x 8, shards from their start", before, after))
    # elastic with the byte offsets: buffered samples by their spans, open shards from where they stood,
    # shards never opened from their start (a piece that starts inside one reads past its head)
    held: set[tuple[int, int]] = set()
    next_of: dict[int, int] = {}
    for r in range(topo.readers):
        p = plan.pass_plan(r, 0)
        cursor = int(p.yields[: pos[r]].max()) + 1
        for c in p.yields[pos[r] :][p.yields[pos[r] :] < cursor].tolist():
            held.add((int(p.shard_of[c]), int(p.index_of[c])))
        for s, i in zip(p.shard_of[:cursor].tolist(), p.index_of[:cursor].tolist(), strict=True):
            next_of[s] = max(next_of.get(s, 0), i + 1)
    read = 0
    for r in range(new.topology.readers):
        for s, take in new.pieces[r]:
            rest = [i for i in take.tolist() if (s, i) not in held]
            if rest:
                read += max(rest) + 1 - next_of.get(s, 0)
    rows.append(
        {
            "resume": "elastic 8 x 8 -> 4 x 8, byte offsets (the default)",
            "read_fraction": (read + len(held)) / TOTAL,
            "read_again_fraction": len(held) / TOTAL,
            "shards_opened": None,
        }
    )
    return rows


def _bytes_row(name, before, after) -> dict:
    total = TOTAL
    again = sum(min(n, before.get(s, 0)) for s, n in after.items())
    return {
        "resume": name,
        "read_fraction": sum(after.values()) / total,
        "read_again_fraction": again / total,
        "shards_opened": len(after),
    }


def s3_measured() -> dict:
    """make_loader through moto on loopback: 100 shards x 6 samples, checkpoint at 90 %, bytes per object."""
    import json
    import os
    import tempfile

    import s3fs
    from moto.server import ThreadedMotoServer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_loader_factory import make_shards

    from relabel_shards.loader import make_loader

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }
    )
    try:
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench-stream")
        url = "s3://bench-stream/ds"
        with tempfile.TemporaryDirectory():
            make_shards(url, [6] * 100)
        fetched: dict[str, int] = {}
        real = s3fs.core.S3File._fetch_range

        def counting(self, start, end):
            data = real(self, start, end)
            fetched[self.key] = fetched.get(self.key, 0) + len(data)
            return data

        s3fs.core.S3File._fetch_range = counting
        epoch = sum(fs.size(p) for p in fs.glob(f"{url}/*.tar"))
        opts = dict(batch_size=10, num_workers=0, image_size=8, seed=1, shards_in_flight=2, shuffle_buffer=4)
        first = make_loader(url, **opts)
        for i, _ in enumerate(first):
            if i == 53:
                break
        state = json.loads(json.dumps(first.state_dict()))
        before = {k: v for k, v in fetched.items() if k.endswith(".tar")}
        fetched.clear()
        second = make_loader(url, **opts)
        second.load_state_dict(state)
        n = sum(len(b["keys"]) for b in second)
        after = {k: v for k, v in fetched.items() if k.endswith(".tar")}
        s3fs.core.S3File._fetch_range = real
        again = sum(v for k, v in after.items() if k in before)
        return {
            "resume": "measured: S3 loopback, 100 x 6 samples, 1 x 1, in flight 2, buffer 4",
            "read_fraction": sum(after.values()) / epoch,
            "read_again_fraction": again / epoch,
            "shards_opened": len(after),
            "samples_after": n,
        }
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readers", type=int, default=8, help="readers simulated for diversity (of 64)")
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--s3", action="store_true", help="add the measured S3 row")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_stream.json"))
    args = p.parse_args(argv)
    info = machine_info()
    print_header("bench_stream: diversity per batch, assignment time, resume bytes (the loader's plan)", info)
    readers = list(range(0, 64, max(1, 64 // args.readers)))[: args.readers]
    rows = []
    sorted_lengths, sorted_classes = imagenet_layout(shuffled=False)
    for k in args.in_flight:
        rows.append(
            {
                "shards": "class-sorted",
                "in_flight": k,
                "buffer": 1000,
                **diversity(sorted_lengths, sorted_classes, k, readers, 1000),
            }
        )
    shuf_lengths, shuf_classes = imagenet_layout(shuffled=True)
    rows.append(
        {
            "shards": "shuffled",
            "in_flight": 4,
            "buffer": 1000,
            **diversity(shuf_lengths, shuf_classes, 4, readers, 1000),
        }
    )
    iid = CLASSES * (1 - (1 - 1 / CLASSES) ** BATCH)
    for r in rows:
        r["vs_iid"] = r["mean"] / iid
    print(
        f"# diversity: distinct classes per batch of {BATCH}, {len(readers)} of 64 readers (8 ranks x 8 "
        f"workers), i.i.d. expectation {iid:.1f}"
    )
    print_table(rows, ["shards", "in_flight", "buffer", "median", "mean", "p5", "min", "vs_iid", "batches"])
    assign = assignment(args.repeats)
    print(
        f"# assignment of 10,000 shards to 1,024 readers: heap {assign['heap_ms']:.1f} ms (median of "
        f"{args.repeats}; goal < 50 ms), former scan {assign['scan_ms']:.0f} ms, {assign['speedup']:.0f}x"
    )
    res = resume_bytes(sorted_lengths)
    if args.s3:
        res.append(s3_measured())
    print(
        "# resume at 90 % of the epoch: samples read by the resumed job, and read again, / the epoch's "
        "(goal: read again <= 5 %)"
    )
    print_table(res, ["resume", "read_fraction", "read_again_fraction", "shards_opened"])
    write_json(
        args.out,
        {
            "machine": info,
            "args": vars(args),
            "diversity": rows,
            "iid": iid,
            "assignment": assign,
            "resume": res,
        },
    )


if __name__ == "__main__":
    main()

"""The shard stream's plan (no I/O): assignment, interleaving, the buffer, quotas, exact and elastic plans."""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
import time

import numpy as np
import pytest

from relabel_shards.order import assign_shards, derive_seed, shuffle_buffer
from relabel_shards.shards import ShardError
from relabel_shards.stream import (
    EpochPlan,
    ShardSet,
    Topology,
    _interleave,
    buffer_order,
    equal_batch_quotas,
    pack_bits,
    unpack_bits,
)
from relabel_shards.stream_read import _TarTap, read_stream


def _scan_assign(lengths, num_slots, seed, epoch):
    """The former assign_shards (a linear scan per shard): the oracle for the heap."""
    order = list(range(len(lengths)))
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    loads, slots = [0] * num_slots, [[] for _ in range(num_slots)]
    for i in order:
        s = min(range(num_slots), key=lambda j: (loads[j], len(slots[j]), j))
        slots[s].append(i)
        loads[s] += lengths[i]
    return slots


def test_assign_shards_heap_equals_the_scan():
    rng = random.Random(0)
    for case in range(60):
        lengths = [rng.randint(0, 30) for _ in range(rng.randint(1, 120))]
        slots = rng.randint(1, len(lengths))
        assert assign_shards(lengths, slots, case, 3) == _scan_assign(lengths, slots, case, 3)


def test_assign_10k_shards_to_1024_readers_is_fast():
    lengths = [1250] * 9000 + [1000] * 1000
    assign_shards(lengths, 1024, 0, 0)  # warm
    t0 = time.perf_counter()
    slots = assign_shards(lengths, 1024, 0, 1)
    took = time.perf_counter() - t0
    loads = [sum(lengths[i] for i in s) for s in slots]
    assert max(loads) - min(loads) <= 1250  # balanced to within one shard
    assert took < 0.25  # goal 50 ms (bench_stream.py measures it; this bound leaves room for a busy machine)


def test_buffer_order_is_the_shuffle_buffer():
    for n, size in [(0, 5), (1, 5), (7, 1), (10, 4), (100, 13), (50, 80)]:
        want = list(shuffle_buffer(range(n), size, random.Random(5)))
        assert buffer_order(n, size, random.Random(5)).tolist() == want


def _pieces(lengths):
    return [(s, np.arange(n)) for s, n in enumerate(lengths)]


@pytest.mark.parametrize("in_flight", [1, 2, 4, 9])
def test_interleave_reads_each_piece_in_order_with_at_most_k_open(in_flight):
    lengths = [5, 3, 8, 1, 6, 4, 7]
    shard_of, index_of = _interleave(_pieces(lengths), in_flight, random.Random(1))
    assert len(shard_of) == sum(lengths)
    spans = []
    for s, n in enumerate(lengths):
        at = np.flatnonzero(shard_of == s)
        assert index_of[at].tolist() == list(range(n))  # front to back
        spans.append((at[0], at[-1]))
    for c in range(len(shard_of)):
        assert sum(a <= c <= b for a, b in spans) <= in_flight
    if in_flight == 1:
        assert shard_of.tolist() == [s for s, n in enumerate(lengths) for _ in range(n)]
    else:
        assert max(sum(a <= c <= b for a, b in spans) for c in range(len(shard_of))) >= min(in_flight, 5)


@pytest.mark.parametrize(
    "total,world,workers,batch",
    [
        (40, 2, 2, 3),
        (41, 2, 2, 4),
        (17, 3, 1, 4),
        (100, 4, 3, 8),
        (9, 2, 2, 4),
        (1000, 8, 4, 32),
        (7, 2, 3, 2),
    ],
)
def test_equal_batch_quotas(total, world, workers, batch):
    q = equal_batch_quotas(total, world, workers, batch)
    per_rank = [q[r * workers : (r + 1) * workers] for r in range(world)]
    batches = {sum(-(-x // batch) for x in qs) for qs in per_rank}
    assert len(batches) == 1  # every rank yields as many batches
    assert sum(q) == total  # every sample once (these cases are all feasible)


def test_equal_batch_quotas_corner_case_repeats_rather_than_unequal_batches():
    # one worker per rank, 2 ranks, 9 samples, batch 4: 5 = 2 batches, 4 = 1 batch; the short rank repeats one
    q = equal_batch_quotas(9, 2, 1, 4)
    assert [-(-x // 4) for x in q] == [2, 2] and sum(q) == 10


def _yields(plan, reader, quota):
    """The sample ids a reader yields: its first ``quota`` positions over passes."""
    out, pas = [], 0
    while len(out) < quota:
        p = plan.pass_plan(reader, pas)
        out += (plan.offsets[p.shard_of[p.yields]] + p.index_of[p.yields]).tolist()
        pas += 1
    return out[:quota]


def test_whole_epoch_plan_is_exactly_once_on_even_shards():
    lengths = [10] * 12
    plan = EpochPlan(lengths, 3, 1, Topology(2, 3, in_flight=2, buffer=7))
    seen = [i for r in range(6) for i in _yields(plan, r, plan.quota(r))]
    assert sorted(seen) == list(range(120))


@pytest.mark.parametrize("old,new", [((2, 2), (3, 1)), ((1, 1), (2, 2)), ((3, 2), (1, 4)), ((2, 2), (2, 2))])
def test_elastic_plan_takes_every_remaining_sample_once(old, new):
    lengths = [9, 12, 7, 10, 11, 8, 13, 10]
    total = sum(lengths)
    before = EpochPlan(lengths, 0, 2, Topology(*old, in_flight=3, buffer=6))
    rng = random.Random(4)
    positions = {r: rng.randint(0, before.quota(r)) for r in range(old[0] * old[1])}
    consumed = before.consumed_mask(positions)
    done = sorted(i for r, p in positions.items() for i in _yields(before, r, p))
    assert sorted(np.flatnonzero(consumed).tolist()) == sorted(set(done))
    consumed = unpack_bits(pack_bits(consumed), total)  # through the checkpoint's text form
    after = EpochPlan(lengths, 0, 2, Topology(*new, in_flight=2, buffer=5, batch_size=4), base=consumed)
    readers = new[0] * new[1]
    rest = [i for r in range(readers) for i in _yields(after, r, after.quota(r))]
    left = np.flatnonzero(~consumed).tolist()
    if new[1] > 1:
        assert sorted(rest) == left  # each remaining sample once
    else:  # one worker per rank: equal batches may need a few repeats (equal_batch_quotas' corner case)
        assert sorted(set(rest)) == left and len(rest) - len(left) == sum(after.quotas) - len(left) < new[0]
    batches = [sum(-(-after.quota(r * new[1] + w) // 4) for w in range(new[1])) for r in range(new[0])]
    assert len(set(batches)) == 1


def _tars(lengths) -> dict[str, bytes]:
    from relabel_shards.shards import write_tar

    out = {}
    for s, n in enumerate(lengths):
        buf = io.BytesIO()
        write_tar(buf, [[(f"s{s}_{i}.cls", b"0"), (f"s{s}_{i}.txt", bytes(100 + i))] for i in range(n)])
        out[f"mem://shard-{s}-.tar"] = buf.getvalue()
    return out


def _fake_stream(tars, read):
    """open_stream over in-memory tars, counting the bytes each URL serves."""

    class Counting(io.BytesIO):
        def __init__(self, url, offset):
            super().__init__(tars[url])
            self.url = url
            self.seek(offset)

        def readinto(self, b):
            n = super().readinto(b)
            read[self.url] = read.get(self.url, 0) + n
            return n

    return Counting


def _raise(*args):
    raise args[-1]


def _run(shards, plan, start, count, tars, read, **kw):
    stream = read_stream(shards, plan, 0, start, _fake_stream(tars, read), _raise, **kw)
    got = list(itertools.islice(stream, count))
    return [(pos, item.key) for pos, _, item, _ in got], (got[-1][3] if got else None)


def test_resume_reads_again_only_what_it_needs():
    lengths = [10] * 40
    tars = _tars(lengths)
    shards = ShardSet(tuple(tars), tuple(lengths))
    plan = EpochPlan(lengths, 0, 0, Topology(1, 1, in_flight=3, buffer=8))
    read: dict[str, int] = {}
    start = 360  # 90 % of the epoch
    head, where = _run(shards, plan, 0, start, tars, read)
    state = json.loads(json.dumps(where()))
    before = dict(read)
    tail, _ = _run(shards, plan, start, 400 - start, tars, read)
    full = head + tail
    assert sorted(k for _, k in full) == sorted(f"s{s}_{i}" for s in range(40) for i in range(10))
    # without byte offsets: only the shards holding a sample still to come are opened, each from its start
    read.clear()
    tail, _ = _run(shards, plan, start, 400 - start, tars, read)
    assert tail == full[start:]  # the same samples in the same order as the uninterrupted run
    assert sorted(read) == sorted({f"mem://shard-{k[1:].split('_')[0]}-.tar" for _, k in tail})
    whole_shards = sum(read.values())
    # with the state's byte offsets: buffered samples by their spans, open shards from where they stood
    read.clear()

    def fetch(url, a, b):
        read[url] = read.get(url, 0) + (b if b is not None else len(tars[url])) - a
        return tars[url][a:b]

    tail, _ = _run(shards, plan, start, 400 - start, tars, read, resume=state, fetch=fetch)
    assert tail == full[start:]
    unread = sum(len(t) for t in tars.values()) - sum(before.values())  # what the first run never read
    buffered = sum(e - a for _, spans, _ in state["buffered"] for a, e in spans)
    assert 1 <= len(state["buffered"]) <= 8 and len(state["open"]) <= 3
    assert sum(read.values()) <= unread + buffered + 3 * 10240  # + tarfile's read-ahead per reopened shard
    assert sum(read.values()) < whole_shards


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_tap_finds_each_sample_start_as_tarfile_does(fmt):
    """Long names (pax records, GNU long-name headers, ustar prefixes), non-ASCII names, empty members."""
    from relabel_shards.tarstream import iter_tar_samples

    long_dir = "d" * 60 + "/" + "e" * 60 if fmt == tarfile.USTAR_FORMAT else "x" * 150
    names = [f"{long_dir}/k{i}{'é' if fmt != tarfile.USTAR_FORMAT and i == 2 else ''}" for i in range(5)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, key in enumerate(names):
            for ext, data in (("jpg", bytes(range(256)) * (i + 1)), ("cls", b""), ("rlm", b"x" * 513)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    want = {}
    for m in members:  # tarfile's offset: the first header block of the member (extended headers included)
        want.setdefault(m.name.rsplit(".", 2)[0].split(".")[0], m.offset)
    tap = _TarTap(io.BytesIO(raw))
    got = {}
    for key, _ in iter_tar_samples(tap, "mem.tar"):
        got[key] = tap.starts[key]
    assert got == {k: want[k] for k in got} and len(got) == 5
    assert tap.end is not None and raw[tap.end : tap.end + 1024] == bytes(1024)
    # a reader started at a sample's offset parses the rest of the tar from there
    third = list(got)[2]
    rest = [k for k, _ in iter_tar_samples(io.BytesIO(raw[got[third] :]), "mem.tar")]
    assert rest == list(got)[2:]


def test_resume_refuses_a_shard_that_changed_since_the_checkpoint():
    lengths = [10] * 6
    tars = _tars(lengths)
    shards = ShardSet(tuple(tars), tuple(lengths))
    plan = EpochPlan(lengths, 0, 0, Topology(1, 1, in_flight=2, buffer=4))
    _, where = _run(shards, plan, 0, 30, tars, {})
    state = where()
    assert state["open"] and all(k is not None for *_, k in state["buffered"])
    changed = dict(tars)
    s = int(state["open"][0][0])  # a shard the checkpoint holds open
    url = shards.urls[s]
    # the same bytes shifted by a sample: every offset the checkpoint holds now lands on another sample
    from relabel_shards.shards import write_tar

    buf = io.BytesIO()
    write_tar(
        buf,
        [[(f"s{s}_{i}.cls", b"0"), (f"s{s}_{i}.txt", bytes(100 + i))] for i in range(1, 10)]
        + [[(f"s{s}_x.cls", b"0"), (f"s{s}_x.txt", b"")]],
    )
    changed[url] = buf.getvalue()

    def fetch(u, a, b):
        return changed[u][a:b]

    def run():
        stream = read_stream(
            shards, plan, 0, 30, _fake_stream(changed, {}), _raise, resume=state, fetch=fetch
        )
        return [item.key for _, _, item, _ in itertools.islice(stream, 30)]

    with pytest.raises(ShardError, match="the checkpoint saw .* there: the shard changed since the state"):
        run()

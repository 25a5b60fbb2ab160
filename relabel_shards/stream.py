"""The shard stream: which samples each reader takes, in which order, read how, and where it stands.

What a reader (one rank x DataLoader worker) does with an epoch, in stages::

    shard lengths (_info.json), seed, epoch, ranks x workers     -> EpochPlan: the reader's pieces
      (whole shards; after an elastic resume, the samples left)     (shard, indices), and its quota
    pieces -> reads: up to ``shards_in_flight`` pieces open at once, the next sample drawn from a random open
      one, each piece read front to back                           (interleave; sample ids, no I/O)
    reads -> yields: the shuffle buffer's order                    (buffer_order; positions, no I/O)
    yields[pos:] -> RawSample(key, image shard members, label records by set name)    (read_stream: I/O)

Everything before the last stage is a function of integers, so a reader's position is one number, ``pos``
(how far along its yields it is). A resumed reader recomputes the plan and opens only the shards that hold
a sample it still has to yield: the shards that were in flight or had samples in the shuffle buffer (cheap
resume, no replay of the epoch's reads). The samples a reader consumed are ``yields[:pos]``, so the state
of a whole job is a bitmap over the epoch's samples (1 bit per sample: 160 KB for ImageNet); from it a job
with another number of ranks or workers plans the rest of the epoch (elastic resume).

Reading: a piece's image shard and its label shards (one per joined label set) are read together, sample
by sample, in lockstep; keys must agree. Nothing is ever sought, indexed or held beyond the shuffle
buffer: per reader at most ``shards_in_flight`` shards x (1 + label sets) streams are open, and the
samples between a read and its yield (at most ``shuffle_buffer``) are held.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import io
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from relabel_shards.order import assign_shards, derive_seed, samples_per_slot
from relabel_shards.shards import LABELMAP_EXT, ShardError, split_member_name
from relabel_shards.tarstream import iter_tar_samples

log = logging.getLogger(__name__)

__all__ = [
    "LengthMismatch",
    "ShardSet",
    "Topology",
    "EpochPlan",
    "RawSample",
    "read_stream",
    "equal_batch_quotas",
    "pack_bits",
    "unpack_bits",
]


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class ShardSet:
    """The shards as the stream reads them: image (or full) shards and the label sets aligned to them.

    ``labels`` maps a label set's name to its label shard URLs; label shard ``i`` pairs with ``urls[i]``.
    """

    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    labels: tuple[tuple[str, tuple[str, ...]], ...] = ()
    offsets: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "offsets", np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]))

    @property
    def total(self) -> int:
        return int(self.offsets[-1])


@dataclass(frozen=True)
class Topology:
    """How an epoch is split: ranks x workers readers, each with ``in_flight`` open shards and a buffer."""

    world: int
    workers: int
    in_flight: int = 4
    buffer: int = 1000
    batch_size: int = 1

    @property
    def readers(self) -> int:
        return self.world * self.workers


@dataclass
class RawSample:
    """One sample as read: the image shard's members and each joined label set's record (name -> bytes)."""

    url: str
    key: str
    members: dict[str, bytes]
    records: dict[str, tuple[str, str, bytes]]  # set name -> (label shard url, its key, record bytes)
    sample_id: int


class LengthMismatch(ShardError):
    """A shard holds another number of samples than ``_info.json`` lists (the epoch would change size)."""


@dataclass
class Missing:
    """A sample the stream could not read (its shard was truncated or damaged): ``error`` says why."""

    shard: int
    error: ShardError


# ------------------------------------------------------------------------------------------------ bits


def pack_bits(mask: np.ndarray) -> str:
    """A boolean array as base64 of its packed bits (JSON-safe; 1.28M samples -> 214 KB of text)."""
    return base64.b64encode(np.packbits(mask.astype(bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    """The inverse of :func:`pack_bits` for an array of ``n`` booleans."""
    raw = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), np.uint8)
    if raw.size != (n + 7) // 8:
        raise ValueError(f"bitmap holds {raw.size * 8} bits, the dataset has {n} samples")
    return np.unpackbits(raw, count=n).astype(bool)


# ------------------------------------------------------------------------------------------------ plan


def equal_batch_quotas(total: int, world: int, workers: int, batch_size: int) -> list[int]:
    """Samples per reader (rank-major) so every sample is taken once and every rank yields as many batches.

    Rank r takes ``total // world`` samples, one more for the first ``total % world`` ranks. Each rank makes
    ``T = ceil(ceil(total / world) / batch_size)`` batches, spread over its workers as evenly as possible,
    each worker's samples filling its batches (a DataLoader worker batches its own stream). Where a rank has
    fewer samples than ``T`` batches need (a corner case: one worker, or fewer samples than batches), its
    readers' quotas exceed the samples they hold and they repeat some (see :class:`EpochPlan`).
    """
    per_rank = [total // world + (r < total % world) for r in range(world)]
    t = -(-max(per_rank) // batch_size) if total else 0
    quotas = []
    for n in per_rank:
        tw = [t // workers + (w < t % workers) for w in range(workers)]
        lo = [(x - 1) * batch_size + 1 if x else 0 for x in tw]
        hi = [x * batch_size for x in tw]
        q = list(lo)
        extra = n - sum(lo)
        for w in range(workers):  # fill the workers' batches in order
            add = max(0, min(extra, hi[w] - lo[w]))
            q[w] += add
            extra -= add
        quotas += q
    return quotas


def _interleave(
    pieces: Sequence[tuple[int, np.ndarray]], in_flight: int, rng: random.Random
) -> tuple[np.ndarray, np.ndarray]:
    """The read order of ``pieces`` with up to ``in_flight`` open: (shard of each read, index in the shard).

    Pieces open in list order; each read comes from an open piece drawn uniformly, so the pieces end at
    staggered times and the next one opens in the freed place.
    """
    total = sum(len(ix) for _, ix in pieces)
    shard_of = np.empty(total, np.int64)
    index_of = np.empty(total, np.int64)
    queue = iter([(s, ix.tolist()) for s, ix in pieces if len(ix)])
    open_: list[list] = []  # [shard, indices, cursor]
    for s, ix in queue:
        open_.append([s, ix, 0])
        if len(open_) >= in_flight:
            break
    k = 0
    while open_:
        j = rng.randrange(len(open_)) if len(open_) > 1 else 0
        piece = open_[j]
        shard_of[k] = piece[0]
        index_of[k] = piece[1][piece[2]]
        k += 1
        piece[2] += 1
        if piece[2] == len(piece[1]):
            nxt = next(queue, None)
            if nxt is None:
                open_.pop(j)
            else:
                open_[j] = [nxt[0], nxt[1], 0]
    return shard_of, index_of


def buffer_order(n: int, size: int, rng: random.Random) -> np.ndarray:
    """The order a shuffle buffer of ``size`` emits ``n`` reads in, as read positions.

    The buffer is filled, then each new read replaces a random held one, which is emitted; at the end the
    rest comes out shuffled (webdataset's ``shuffle``). ``size <= 1`` keeps the read order.
    """
    if size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    out = np.empty(n, np.int64)
    buf = list(range(min(size, n)))
    size = len(buf)
    randrange = rng.randrange
    k = 0
    for item in range(size, n):
        j = randrange(size)
        out[k] = buf[j]
        buf[j] = item
        k += 1
    rng.shuffle(buf)
    out[k:] = buf
    return out


@dataclass(frozen=True)
class PassPlan:
    """One pass of a reader over its pieces: reads ``(shard_of, index_of)`` and the emit order ``yields``."""

    shard_of: np.ndarray
    index_of: np.ndarray
    yields: np.ndarray


class EpochPlan:
    """Which samples each reader of an epoch yields, in which order; a function of integers only.

    Args:
        lengths: samples per shard.
        seed, epoch: every random choice derives from these.
        topology: ranks x workers, shards in flight, buffer size, batch size.
        shuffle_shards: draw the shard order from (seed, epoch) (else from (seed, 0)).
        evaluation: every sample at least once (each reader yields the largest reader's load).
        base: samples consumed before this plan (an elastic resume); None for a whole epoch.

    A whole epoch gives each reader whole shards (``order.assign_shards``) and the quota
    ``ceil(total / readers)``, as before: with uneven shards a reader with more stops early, one with fewer
    reads its shards again. After an elastic resume the samples left are balanced exactly: shards shuffled,
    dealt to the readers by load, and cut at sample granularity to :func:`equal_batch_quotas` (the reader
    that takes the tail of a shard reads past its head without decoding it).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        seed: int,
        epoch: int,
        topology: Topology,
        *,
        shuffle_shards: bool = True,
        evaluation: bool = False,
        base: np.ndarray | None = None,
    ):
        self.lengths = [int(n) for n in lengths]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        self.seed, self.epoch, self.topology = int(seed), int(epoch), topology
        self.base = base
        readers = topology.readers
        self._cache: dict[tuple[int, int], PassPlan] = {}
        if base is None:
            slots = assign_shards(self.lengths, readers, self.seed, self.epoch if shuffle_shards else 0)
            self.pieces = [[(s, np.arange(self.lengths[s], dtype=np.int64)) for s in slot] for slot in slots]
            loads = [sum(self.lengths[s] for s in slot) for slot in slots]
            q = max(loads) if evaluation else samples_per_slot(int(self.offsets[-1]), readers)
            self.quotas = [q] * readers
            self.tag = "epoch"
        else:
            self.tag = "resume-" + hashlib.blake2b(np.packbits(base).tobytes(), digest_size=8).hexdigest()
            self._plan_rest(base)

    def _plan_rest(self, base: np.ndarray) -> None:
        topo = self.topology
        left = [
            np.flatnonzero(~base[self.offsets[s] : self.offsets[s + 1]]) for s in range(len(self.lengths))
        ]
        remaining = int(sum(len(x) for x in left))
        self.quotas = equal_batch_quotas(remaining, topo.world, topo.workers, topo.batch_size)
        if sum(self.quotas) > remaining:
            log.warning(
                "the rest of epoch %d (%d samples) cannot give %d ranks x %d workers equal batches of "
                "%d each sample once: %d samples repeat",
                self.epoch,
                remaining,
                topo.world,
                topo.workers,
                topo.batch_size,
                sum(self.quotas) - remaining,
            )
        order = [s for s in range(len(left)) if len(left[s])]
        random.Random(derive_seed("rest", self.seed, self.epoch, self.tag)).shuffle(order)
        heap = [(0, 0, j) for j in range(topo.readers)]
        dealt: list[list[int]] = [[] for _ in range(topo.readers)]
        for s in order:  # the heaviest-first deal of order.assign_shards, over the samples left
            load, count, j = heap[0]
            dealt[j].append(s)
            heapq.heapreplace(heap, (load + len(left[s]), count + 1, j))
        flat = [(s, left[s]) for slot in dealt for s in slot]
        self.pieces = [[] for _ in range(topo.readers)]
        it, cur = iter(flat), None
        for r, q in enumerate(self.quotas):
            need = q
            while need > 0:
                if cur is None or not len(cur[1]):
                    cur = next(it, None)
                    if cur is None:
                        break
                take = cur[1][:need]
                self.pieces[r].append((cur[0], take))
                cur = (cur[0], cur[1][need:])
                need -= len(take)
            if not self.pieces[r] and q and flat:  # nothing left for this reader: it repeats a sample
                self.pieces[r].append((flat[0][0], flat[0][1][:q]))

    # -- per reader -------------------------------------------------------------------------------

    def quota(self, reader: int) -> int:
        """Samples ``reader`` yields in this plan."""
        return self.quotas[reader]

    def pass_plan(self, reader: int, pas: int) -> PassPlan:
        """The reads and emit order of ``reader``'s pass ``pas`` (0: the plan; further passes repeat)."""
        got = self._cache.get((reader, pas))
        if got is not None:
            return got
        pieces = list(self.pieces[reader])
        if pas:  # a repeat: same pieces, another order
            random.Random(derive_seed("repeat", self.seed, self.epoch, self.tag, reader, pas)).shuffle(pieces)
        rng = random.Random(derive_seed("interleave", self.seed, self.epoch, self.tag, reader, pas))
        shard_of, index_of = _interleave(pieces, self.topology.in_flight, rng)
        rng = random.Random(derive_seed("buffer", self.seed, self.epoch, self.tag, reader, pas))
        plan = PassPlan(shard_of, index_of, buffer_order(len(shard_of), self.topology.buffer, rng))
        if len(self._cache) > 4 * self.topology.workers + 8:
            self._cache.clear()
        self._cache[(reader, pas)] = plan
        return plan

    def consumed(self, reader: int, pos: int) -> np.ndarray:
        """Sample ids ``reader`` has yielded (or skipped as bad) in its first ``pos`` positions, pass 0."""
        p = self.pass_plan(reader, 0)
        done = p.yields[:pos]
        return self.offsets[p.shard_of[done]] + p.index_of[done]

    def consumed_mask(self, readers: dict[int, int]) -> np.ndarray:
        """The base plus every listed reader's consumed samples, as a boolean mask over the epoch."""
        mask = np.zeros(int(self.offsets[-1]), bool) if self.base is None else self.base.copy()
        for r, pos in readers.items():
            mask[self.consumed(r, pos)] = True
        return mask


# --------------------------------------------------------------------------------------------- reading


class _TarTap(io.RawIOBase):
    """A tar stream passed through unchanged, noting where each sample starts (no extra reads, no seeks).

    It walks the 512-byte headers as the bytes go by: ``starts[key]`` is the offset of the first header
    block (extended headers included) of the key's first member; ``end`` the offset of the end-of-archive
    marker. A reader resumed at such an offset parses the tar from there (``RetryingReader`` re-opens at
    any byte), which is how a resume reads again only what it needs.
    """

    def __init__(self, inner: Any, base: int = 0):
        super().__init__()
        self.inner = inner
        self.pos = base  # offset of the next byte in the object
        self.starts: dict[str, int] = {}
        self.end: int | None = None
        self._next = base  # offset of the next header block
        self._hdr = bytearray()
        self._ext_at: int | None = None  # first extended header of the member being described
        self._ext_type = b""
        self._ext_left = 0  # bytes of extended-header data still to collect
        self._ext_data = bytearray()
        self._ext_name: str | None = None
        self._last_key: str | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: D102
        n = self.inner.readinto(buf)
        if n:
            self._feed(memoryview(buf)[:n])
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()

    def _feed(self, data: memoryview) -> None:
        i, n = 0, len(data)
        while i < n and self.end is None:
            at = self.pos + i
            if self._ext_left:  # collect an extended header's data (a long name, pax records)
                take = min(self._ext_left, n - i)
                self._ext_data += data[i : i + take]
                self._ext_left -= take
                i += take
                if not self._ext_left:
                    self._ext_done()
                continue
            if at < self._next:  # member data: pass
                i += min(self._next - at, n - i)
                continue
            take = min(512 - len(self._hdr), n - i)
            self._hdr += data[i : i + take]
            i += take
            if len(self._hdr) == 512:
                self._header(self.pos + i - 512)
                self._hdr.clear()
        self.pos += n

    def _header(self, at: int) -> None:
        h = bytes(self._hdr)
        if not any(h):
            self.end = at
            return
        field = h[124:136]
        if field[0] & 0x80:  # base-256
            size = int.from_bytes(field[1:], "big")
        else:
            text = field.split(b"\0", 1)[0].strip()
            size = int(text, 8) if text else 0
        typ = h[156:157]
        data_end = at + 512 + size
        self._next = data_end + (-size) % 512
        if typ in (b"x", b"g", b"L", b"K"):
            if self._ext_at is None:
                self._ext_at = at
            self._ext_type, self._ext_left, self._ext_data = typ, size, bytearray()
            if not size:
                self._ext_done()
            return
        name = h[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if h[257:263] == b"ustar\0" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        name = self._ext_name or name
        start = self._ext_at if self._ext_at is not None else at
        self._ext_at, self._ext_name = None, None
        if typ in (b"0", b"\0", b"7"):  # regular files: the members iter_tar_samples groups
            key = split_member_name(name)[0]
            if key != self._last_key:
                self.starts[key] = start
                self._last_key = key

    def _ext_done(self) -> None:
        data = bytes(self._ext_data)
        if self._ext_type == b"L":
            self._ext_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif self._ext_type == b"x":
            for line in data.split(b"\n"):
                _, _, rec = line.partition(b" ")
                k, _, v = rec.partition(b"=")
                if k == b"path":
                    self._ext_name = v.decode("utf-8", "replace")


class _Column:
    """One tar of a piece (the image shard or a label shard), read forward from a sample boundary."""

    def __init__(self, url: str, open_stream: Callable, offset: int):
        self.url = url
        self.tap = _TarTap(open_stream(url, offset), offset)
        self.samples = iter_tar_samples(self.tap, url)

    def span(self, key: str) -> tuple[int, int]:
        """(start, end) byte offsets of the sample just read (it ends where the next one starts)."""
        start = self.tap.starts.pop(key)
        nxt = next(iter(self.tap.starts.values()), None)
        return start, nxt if nxt is not None else (self.tap.end if self.tap.end is not None else -1)

    def close(self) -> None:
        self.tap.close()


class _ShardCursor:
    """One open piece: the image shard and its label shards, read forward together in lockstep.

    ``offsets`` (one per column) start the reads at sample ``first`` instead of the shard's start.
    """

    def __init__(
        self,
        shards: ShardSet,
        shard: int,
        open_stream: Callable,
        first: int = 0,
        offsets: Sequence[int] | None = None,
        expect: str | None = None,
    ):
        self.shard = shard
        self.url = shards.urls[shard]
        self.length = shards.lengths[shard]
        urls = [self.url] + [u[shard] for _, u in shards.labels]
        offsets = list(offsets) if offsets is not None else [0] * len(urls)
        self.names = [name for name, _ in shards.labels]
        self.columns: list[_Column] = []
        try:
            for url, off in zip(urls, offsets, strict=True):
                self.columns.append(_Column(url, open_stream, off))
        except BaseException:
            self.close()
            raise
        self.next = first
        self.next_offsets = offsets
        self.expect = expect  # the key a checkpoint saw at ``first``: the shard must not have changed

    def next_key(self) -> str | None:
        """The key of the next sample, where its header has been read already."""
        return next(iter(self.columns[0].tap.starts), None)

    def take(self, index: int, sample_id: int) -> tuple[RawSample | ShardError, list[tuple[int, int]]]:
        """Read forward to sample ``index``: the sample (or its per-sample pairing ``SampleError``) and its
        byte span in each column."""
        item: Any = None
        spans: list[tuple[int, int]] = []
        while self.next <= index:
            item, spans = self._one(sample_id)
            self.next += 1
            self.next_offsets = [e for _, e in spans]
        return item, spans

    def _one(self, sample_id: int) -> tuple[RawSample | ShardError, list[tuple[int, int]]]:
        from relabel_shards.decode import SampleError

        image = self.columns[0]
        try:
            key, members = next(image.samples)
        except StopIteration:
            raise LengthMismatch(
                f"{self.url}: _info.json says {self.length} samples, the shard holds {self.next} (truncated?)"
            ) from None
        spans = [image.span(key)]
        if self.expect is not None:
            if key != self.expect:
                raise ShardError(
                    f"{self.url}: the sample at byte {spans[0][0]} is {key!r}, the checkpoint saw "
                    f"{self.expect!r} there: the shard changed since the state was saved"
                )
            self.expect = None
        records, err = {}, None
        for name, col in zip(self.names, self.columns[1:], strict=True):
            try:
                lkey, lmembers = next(col.samples)
            except StopIteration:
                raise LengthMismatch(
                    f"{col.url}: label shard ends after {self.next} samples, before image shard "
                    f"{self.url}'s key {key!r}"
                ) from None
            spans.append(col.span(lkey))
            if err is not None:
                continue
            if lkey != key:
                err = SampleError(
                    self.url,
                    key,
                    "key_mismatch",
                    f"label shard {col.url} has key {lkey!r} where the image shard has {key!r} "
                    f"(sample {self.next} of both)",
                )
            elif set(lmembers) != {LABELMAP_EXT}:
                err = SampleError(
                    col.url,
                    lkey,
                    "missing_member",
                    f"a label-shard sample holds exactly one member .{LABELMAP_EXT}; it has "
                    f"{sorted(lmembers)}",
                )
            else:
                records[name] = (col.url, lkey, lmembers[LABELMAP_EXT])
        item = err if err is not None else RawSample(self.url, key, members, records, sample_id)
        return item, spans

    def check_end(self) -> None:
        """After the listed last sample: the shard (and each label shard) must end here."""
        for col in self.columns:
            extra = next(col.samples, None)
            if extra is not None:
                raise LengthMismatch(
                    f"{col.url}: _info.json says {self.length} samples, the shard holds more "
                    f"(key {extra[0]!r} is sample {self.length + 1})"
                )

    def close(self) -> None:
        for col in self.columns:
            col.close()


def _fetch_one(
    shards: ShardSet,
    shard: int,
    spans: Sequence[Sequence[int]],
    fetch: Callable,
    sample_id: int,
    key: str | None = None,
) -> RawSample | ShardError:
    """One sample read again by its byte spans (one ranged read per column)."""

    def opener(url: str, offset: int) -> io.BytesIO:
        start, end = next(sp for u, sp in zip(urls, spans, strict=True) if u == url)
        # the sample's members, then an end-of-archive marker (end < 0: the sample runs to the object's end)
        return io.BytesIO(fetch(url, start, end if end >= 0 else None) + bytes(1024))

    urls = [shards.urls[shard]] + [u[shard] for _, u in shards.labels]
    cur = _ShardCursor(shards, shard, opener, 0, [sp[0] for sp in spans], key)
    try:
        return cur._one(sample_id)[0]
    finally:
        cur.close()


def read_stream(
    shards: ShardSet,
    plan: EpochPlan,
    reader: int,
    start: int,
    open_stream: Callable,
    on_shard_error: Callable[[int, int, ShardError], None],
    *,
    resume: dict | None = None,
    fetch: Callable | None = None,
) -> Iterator[tuple[int, int, RawSample | ShardError | Missing, Callable[[], dict]]]:
    """Yield ``(pos, pass, item, where)`` for ``reader``'s positions ``start, start + 1, ...`` over passes.

    ``item`` is a :class:`RawSample`, a per-sample ``SampleError`` (key mismatch between columns), or
    :class:`Missing` (its shard could not be read that far; the error is a ``ShardError``). ``where()``
    gives, after that position, what a resume needs to read no more than the samples still to come: the
    byte spans of the samples read but not yet yielded, and where each open shard stands (JSON-able).

    Only the shards holding a sample at a position >= ``start`` are opened. With ``resume`` (a ``where()``
    of the same plan at ``start``), buffered samples are read again by their byte spans and open shards
    continue where they stood; without it, each such shard is read from its start.

    Args:
        open_stream: ``open_stream(url, offset) -> binary stream`` positioned at byte ``offset``.
        on_shard_error: ``(shard, pass, error)`` for a shard that cannot be read (truncated, damaged, or
            another sample count than ``_info.json`` lists); raise it to stop, return to go on without the
            shard's unread samples (their positions come as :class:`Missing`).
        fetch: ``fetch(url, start, end) -> bytes``, a ranged read (for ``resume``).
    """
    base = 0
    for pas in range(1 << 30):
        p = plan.pass_plan(reader, pas)
        n = len(p.yields)
        if n == 0:
            return
        if start >= base + n:
            base += n
            continue
        j0 = max(0, start - base)
        here = resume if resume is not None and resume.get("pass") == pas else None
        yield from _read_pass(shards, plan, p, j0, base, pas, open_stream, on_shard_error, here, fetch)
        base += n


def _read_pass(
    shards: ShardSet,
    plan: EpochPlan,
    p: PassPlan,
    j0: int,
    base: int,
    pas: int,
    open_stream: Callable,
    on_shard_error: Callable,
    resume: dict | None,
    fetch: Callable | None,
) -> Iterator[tuple[int, int, RawSample | ShardError | Missing, Callable[[], dict]]]:
    from relabel_shards.decode import SampleError

    n = len(p.yields)
    wanted = np.zeros(n, bool)
    wanted[p.yields[j0:]] = True
    shard_of, index_of = p.shard_of.tolist(), p.index_of.tolist()
    offsets = plan.offsets
    store: dict[int, RawSample | ShardError | Missing] = {}
    spans: dict[int, list[tuple[int, int]]] = {}
    cursors: dict[int, _ShardCursor] = {}
    dead: dict[int, ShardError] = {}
    refetch: dict[int, list] = {}
    restart: dict[int, tuple[int, list[int]]] = {}
    if resume is not None and fetch is not None:
        refetch = {
            int(e[0]): (e[1], e[2] if len(e) > 2 else None)
            for e in resume.get("buffered", [])
            if wanted[int(e[0])]
        }
        restart = {
            int(e[0]): (int(e[1]), [int(o) for o in e[2]], e[3] if len(e) > 3 else None)
            for e in resume.get("open", [])
        }
    last: dict[int, int] = {}
    for c in np.flatnonzero(wanted).tolist():
        if c not in refetch:
            last[shard_of[c]] = c
    cursor = 0

    def where() -> dict:
        return {
            "pass": pas,
            "buffered": [
                [c, [list(x) for x in spans[c]], getattr(store[c], "key", None)] for c in store if c in spans
            ],
            "open": [[s, cur.next, list(cur.next_offsets), cur.next_key()] for s, cur in cursors.items()],
        }

    try:
        for j in range(j0, n):
            r = int(p.yields[j])
            while cursor <= r:
                c = cursor
                cursor += 1
                if not wanted[c]:
                    continue
                s, i = shard_of[c], index_of[c]
                if s in dead:
                    store[c] = Missing(s, dead[s])
                    continue
                try:
                    if c in refetch:
                        sp, key = refetch[c]
                        store[c] = _fetch_one(shards, s, sp, fetch, int(offsets[s]) + i, key)
                        spans[c] = [tuple(x) for x in sp]
                        continue
                    cur = cursors.get(s)
                    if cur is None:
                        first, offs, key = restart.get(s, (0, None, None))
                        if i < first:  # a sample before where the shard stood: read it from the start
                            first, offs, key = 0, None, None
                        cur = cursors[s] = _ShardCursor(shards, s, open_stream, first, offs, key)
                    store[c], spans[c] = cur.take(i, int(offsets[s]) + i)
                except ShardError as e:
                    if isinstance(e, SampleError):
                        raise
                    dead[s] = e
                    store[c] = Missing(s, e)
                    if s in cursors:
                        cursors.pop(s).close()
                    on_shard_error(s, pas, e)
                    continue
                if last.get(s) == c:
                    cur = cursors.pop(s)
                    try:
                        if i == shards.lengths[s] - 1:
                            cur.check_end()
                    except ShardError as e:
                        on_shard_error(s, pas, e)
                    finally:
                        cur.close()
            spans.pop(r, None)
            yield base + j, pas, store.pop(r), where
    finally:
        for cur in cursors.values():
            cur.close()

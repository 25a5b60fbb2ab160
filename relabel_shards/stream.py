"""The shard stream: which samples each reader takes, in which order, read how, and where it stands.

What a reader (one rank x DataLoader worker) does with an epoch, in stages::

    shard lengths (_info.json), seed, epoch, ranks x workers     -> EpochPlan: the reader's pieces
      (whole shards; after an elastic resume, the samples left)     (shard, indices), and its quota
    pieces -> reads: up to ``shards_in_flight`` pieces open at once, the next sample drawn from a random open
      one, each piece read front to back                           (interleave; sample ids, no I/O)
    reads -> yields: the shuffle buffer's order                    (buffer_order; positions, no I/O)
    yields[pos:] -> RawSample(key, image shard members, label records by set name)   (stream_read.py: I/O)

Everything before the last stage is a function of integers, so a reader's position is one number, ``pos``
(how far along its yields it is). A resumed reader recomputes the plan and reads only what it still has to
yield: no replay of the epoch's reads. The samples a reader consumed are ``yields[:pos]``, so the state of a
whole job is a bitmap over the epoch's samples (1 bit per sample: 160 KB for ImageNet); from it a job with
another number of ranks or workers plans the rest of the epoch (elastic resume).

The last stage, reading, is ``relabel_shards.stream_read``: lockstep columns, and the byte offsets that
let a resume read again only the samples it held.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from relabel_shards.order import assign_shards, derive_seed, samples_per_slot
from relabel_shards.shards import ShardError

log = logging.getLogger(__name__)

__all__ = [
    "LengthMismatch",
    "ShardSet",
    "Topology",
    "EpochPlan",
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

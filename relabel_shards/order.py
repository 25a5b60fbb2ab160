"""Sample order for the streaming loader: ranks, shard assignment per epoch, quotas, the shuffle buffer.

Every random choice derives from explicit integers (seed, epoch, rank, worker), so the same arguments give
the same order on any machine, whatever the number of processes that read the data.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from relabel_shards.dist import resolve_rank

T = TypeVar("T")


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed from a tuple of integers and strings (stable across processes and Python versions)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the package's one rule, ``relabel_shards.dist.resolve_rank``."""
    return resolve_rank(rank, world_size)


def assign_shards(lengths: Sequence[int], num_slots: int, seed: int, epoch: int) -> list[list[int]]:
    """Split shard indices over ``num_slots`` readers (rank x worker), shuffled per (seed, epoch).

    The shards are visited in a permutation drawn from (seed, epoch), and each goes to the slot holding the
    fewest samples so far (ties to the lowest slot). With equal shard lengths this is a round robin, so
    ``n * num_slots`` equal shards give every slot exactly ``n`` shards.

    Args:
        lengths: samples per shard, from ``_info.json``.
        num_slots: ``world_size * num_workers``.

    Returns:
        For each slot, the shard indices it reads, in reading order.

    Raises:
        ValueError: fewer shards than slots (some reader would idle or hang a DDP job).
    """
    n = len(lengths)
    if n < num_slots:
        raise ValueError(f"{n} shards cannot feed {num_slots} readers (ranks x DataLoader workers): need at "
                         f"least {num_slots} shards; write more, smaller shards or use fewer workers")
    order = list(range(n))
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    # A heap of (load, shards held, slot): the same choice as a scan for the smallest tuple, in O(log slots)
    # per shard instead of O(slots) (10,000 shards x 1,024 readers: 3.4 s by scan; bench_stream.py).
    heap = [(0, 0, j) for j in range(num_slots)]
    slots: list[list[int]] = [[] for _ in range(num_slots)]
    for i in order:
        load, count, s = heap[0]
        slots[s].append(i)
        heapq.heapreplace(heap, (load + lengths[i], count + 1, s))
    return slots


def samples_per_slot(total: int, num_slots: int) -> int:
    """How many samples each reader yields per epoch: ``ceil(total / num_slots)``, the same for all.

    A reader whose shards hold fewer samples goes round its shards again; one with more stops early. With
    shards that divide evenly there is neither, and every sample is read exactly once.
    """
    return math.ceil(total / num_slots)


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Shuffle a stream with a buffer of ``size`` items: fill it, then emit a random one per new item.

    ``size <= 1`` passes the stream through unchanged.
    """
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], item
        yield out
    rng.shuffle(buf)
    yield from buf

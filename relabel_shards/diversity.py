"""How many classes a training batch can hold, judged from per-shard class histograms (no images read).

A reader that streams whole shards sequentially draws each batch from the few shards it has open (the shuffle
buffer holds about one shard), so a dataset whose shards each hold one or two classes gives batches of a
handful of classes, whatever the buffer does. ``build`` and ``convert`` write each shard's class histogram
into ``_info.json`` (``relabel_shards.shard_classes``, see :func:`shard_classes_entry`); for other datasets
the labels seen in the first shards serve (:func:`observed_shard_classes`).

The estimate: a batch of ``B`` is drawn without replacement from the pooled samples of ``shards_in_flight``
shards; the expected number of distinct classes is ``sum_c 1 - C(N - n_c, B) / C(N, B)``. The i.i.d.
reference draws ``B`` from the whole split: ``sum_c 1 - (1 - p_c)^B``. Shards are *class-sorted* when the
first is below ``CLASS_SORTED_RATIO`` of the second.

Pure functions of numbers: nothing here reads files (``info``, ``verify`` and the loader do, then call
:func:`class_sorted_warning`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The most frequent classes kept per shard in _info.json. With 1,000 ImageNet classes a shuffled shard of
# 1,000 holds about 632 of them; keeping all would make _info.json ~3.5 MB at ImageNet-1k and ~80 MB at 21k
# scale (benchmarks/bench_scale.py). The top 16 plus the count of distinct classes size an estimate as well:
# a class-sorted shard's histogram is complete, a shuffled shard's rest is spread evenly.
TOP_CLASSES = 16

# Below this fraction of the i.i.d. expectation, shards count as class-sorted. Shards written in a seeded
# global permutation reach >= 0.99 (benchmarks/bench_order.py); class-sorted ImageNet shards ~0.07.
CLASS_SORTED_RATIO = 0.8

# Windows of shards evaluated (spread evenly over the split); enough for a stable mean, fast at 13k shards.
MAX_WINDOWS = 512


@dataclass(frozen=True)
class ShardClasses:
    """The class make-up of one shard.

    Attributes:
        num_samples: samples in the shard (with a known class).
        distinct: distinct classes in it.
        top: the most frequent classes, ``{class index: count}``; complete when ``len(top) == distinct``.
    """

    num_samples: int
    distinct: int
    top: Mapping[int, int]

    @property
    def complete(self) -> bool:
        return len(self.top) == self.distinct

    @property
    def rest(self) -> tuple[int, int]:
        """(classes, samples) of the shard outside ``top``."""
        return self.distinct - len(self.top), self.num_samples - sum(self.top.values())


@dataclass(frozen=True)
class Diversity:
    """Expected distinct classes per batch (see the module docstring).

    Attributes:
        expected: with ``shards_in_flight`` shards feeding each batch.
        iid: for an i.i.d. draw from the whole split.
        batch_size, shards_in_flight: the setting judged.
        shards: shards the estimate rests on.
    """

    expected: float
    iid: float
    batch_size: int
    shards_in_flight: int
    shards: int

    @property
    def ratio(self) -> float:
        return self.expected / self.iid if self.iid > 0 else 1.0

    @property
    def class_sorted(self) -> bool:
        return self.ratio < CLASS_SORTED_RATIO


def shard_classes(labels: Iterable[int], top: int = TOP_CLASSES) -> ShardClasses:
    """The :class:`ShardClasses` of one shard from its samples' class labels."""
    hist = Counter(int(x) for x in labels)
    kept = sorted(hist.items(), key=lambda cn: (-cn[1], cn[0]))[:top]
    return ShardClasses(num_samples=sum(hist.values()), distinct=len(hist), top=dict(kept))


def shard_classes_entry(hist: Mapping[int, int] | Counter, top: int = TOP_CLASSES) -> dict[str, Any]:
    """One shard's entry of ``_info.json``'s ``shard_classes``: ``{"distinct": D, "top": {"c": n, ...}}``.

    ``top`` holds the ``top`` most frequent classes (ties: lower index first); keys are class indices as
    strings (JSON). The histogram is complete when ``len(top) == distinct``.
    """
    kept = sorted(((int(c), int(n)) for c, n in hist.items() if n > 0), key=lambda cn: (-cn[1], cn[0]))
    return {"distinct": len(kept), "top": {str(c): n for c, n in kept[:top]}}


def recorded_shard_classes(split_info: Mapping[str, Any]) -> list[ShardClasses] | None:
    """The per-shard class make-up recorded in a split of ``_info.json``, or None where there is none."""
    section = split_info.get("relabel_shards") or {}
    entries = section.get("shard_classes") if isinstance(section, Mapping) else None
    lengths = split_info.get("shard_lengths") or []
    if not isinstance(entries, Sequence) or not entries or len(entries) != len(lengths):
        return None
    out = []
    try:
        for e, n in zip(entries, lengths, strict=True):
            top = {int(c): int(k) for c, k in (e.get("top") or {}).items()}
            distinct = int(e["distinct"])
            known = max(int(n) if distinct else 0, sum(top.values()))
            out.append(ShardClasses(num_samples=known, distinct=distinct, top=top))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return out


def observed_shard_classes(labels_per_shard: Iterable[Iterable[int] | ShardClasses]) -> list[ShardClasses]:
    """:class:`ShardClasses` from the labels read from some shards (e.g. the first ones a loader opened);
    an entry that already is a :class:`ShardClasses` is kept."""
    return [x if isinstance(x, ShardClasses) else shard_classes(x) for x in labels_per_shard]


def _absent(total: float, count: float, batch: int) -> float:
    """P(a class with ``count`` of ``total`` samples is absent from ``batch`` drawn without replacement)."""
    if count <= 0:
        return 1.0
    if total - count < batch:
        return 0.0
    # C(total - count, batch) / C(total, batch) through lgamma (counts of the spread rest are fractional)
    return math.exp(
        math.lgamma(total - count + 1)
        - math.lgamma(total - count - batch + 1)
        - math.lgamma(total + 1)
        + math.lgamma(total - batch + 1)
    )


def expected_distinct(
    shards: Sequence[ShardClasses], batch_size: int, shards_in_flight: int = 1, num_classes: int | None = None
) -> float:
    """Expected distinct classes in a batch drawn from ``shards_in_flight`` shards at once.

    Windows pool shards ``i, i + s, i + 2s, ...`` with ``s = len(shards) // m`` (shards far apart, as a
    shuffled shard assignment gives; for class-sorted shards they hold different classes), ``m`` being
    ``shards_in_flight`` or, for shards smaller than a batch, as many as a batch takes; the mean over up to
    ``MAX_WINDOWS`` windows is returned. A shuffle buffer mixes a little more than this: on class-sorted
    ImageNet shards of 1,000 with a buffer of 1,000 the loader's batches of 128 held 8 classes against the
    1.8 estimated for one shard in flight (benchmarks/bench_order.py), so read the figure as a floor. The
    classes outside each shard's ``top`` are spread evenly over its other classes; pooled, they are at most
    ``num_classes`` minus the named ones.
    """
    if batch_size < 1 or shards_in_flight < 1:
        raise ValueError(
            f"batch_size and shards_in_flight must be >= 1, got {batch_size}, {shards_in_flight}"
        )
    shards = [s for s in shards if s.num_samples > 0]
    if not shards:
        return 0.0
    # a batch larger than the shards in flight reaches into the next shards: pool enough to fill it
    mean_len = sum(s.num_samples for s in shards) / len(shards)
    m = min(max(shards_in_flight, math.ceil(batch_size / mean_len)), len(shards))
    stride = max(1, len(shards) // m)
    starts = (
        range(len(shards))
        if len(shards) <= MAX_WINDOWS
        else [i * len(shards) // MAX_WINDOWS for i in range(MAX_WINDOWS)]
    )
    total = 0.0
    for i in starts:
        named: Counter = Counter()
        rest_classes = rest_samples = 0
        for j in range(m):
            s = shards[(i + j * stride) % len(shards)]
            named.update(s.top)
            rc, rs = s.rest
            rest_classes, rest_samples = rest_classes + rc, rest_samples + rs
        if num_classes is not None:
            rest_classes = max(0, min(rest_classes, num_classes - len(named)))
        pool = sum(named.values()) + rest_samples
        b = min(batch_size, int(pool))
        e = sum(1.0 - _absent(pool, n, b) for n in named.values())
        if rest_classes > 0 and rest_samples > 0:
            e += rest_classes * (1.0 - _absent(pool, rest_samples / rest_classes, b))
        total += e
    return total / len(starts)


def iid_distinct(shards: Sequence[ShardClasses], batch_size: int, num_classes: int | None = None) -> float:
    """Expected distinct classes in ``batch_size`` i.i.d. draws from the whole split.

    Exact when every shard's histogram is complete; otherwise the classes (``num_classes``, else the most
    that the shards show) are taken as equally frequent.
    """
    n = sum(s.num_samples for s in shards)
    if n <= 0:
        return 0.0
    b = min(batch_size, n)
    if all(s.complete for s in shards):
        hist: Counter = Counter()
        for s in shards:
            hist.update(s.top)
        return sum(1.0 - (1.0 - c / n) ** b for c in hist.values())
    seen = {c for s in shards for c in s.top}
    k = max(num_classes or 0, len(seen), max(s.distinct for s in shards))
    return k * (1.0 - (1.0 - 1.0 / k) ** b)


def assess(
    shards: Sequence[ShardClasses],
    *,
    batch_size: int = 128,
    shards_in_flight: int = 1,
    num_classes: int | None = None,
) -> Diversity:
    """:class:`Diversity` of a split from its shards' class make-up."""
    return Diversity(
        expected=expected_distinct(shards, batch_size, shards_in_flight, num_classes),
        iid=iid_distinct(shards, batch_size, num_classes),
        batch_size=batch_size,
        shards_in_flight=shards_in_flight,
        shards=len(shards),
    )


REMEDY = (
    "Remedy: rebuild with shuffling (`relabel-shards build` and `convert` write a seeded global permutation "
    "by default; --shuffle-seed N, and not --no-shuffle). For image shards that are not yours, write a "
    "shuffled copy first: extract them (tar xf), list each key's image and its .cls as 'path<TAB>label' "
    "lines, and `relabel-shards build LIST OUT` (or `webdataset.ShardWriter` fed by "
    "`WebDataset(urls).shuffle(...)` with a buffer larger than a shard)."
)


def class_sorted_warning(
    split_info: Mapping[str, Any],
    *,
    batch_size: int = 128,
    shards_in_flight: int = 1,
    observed: Iterable[Iterable[int] | ShardClasses] | None = None,
) -> str | None:
    """The warning to give when a split's shards are class-sorted, or None when they are not (or unknown).

    Args:
        split_info: ``splits.<name>`` of ``_info.json`` (its ``relabel_shards.shard_classes`` is used).
        batch_size: the training batch size judged.
        shards_in_flight: shards each reader streams at once (interleaved reading); more are pooled where a
            batch needs them. The shuffle buffer's extra mixing is not counted (the figure is a floor).
        observed: the class labels of samples in some shards, one iterable (or ShardClasses) per shard, used
            when the split records no histograms (e.g. other people's image shards).

    Returns:
        One paragraph with the expected classes per batch, the i.i.d. figure and the remedy; None when the
        shards are not class-sorted or nothing is known about them.
    """
    shards = recorded_shard_classes(split_info)
    source = "the per-shard class histograms in _info.json"
    if shards is None and observed is not None:
        shards = observed_shard_classes(observed)
        source = f"the labels of the first {len(shards)} shard{'s' if len(shards) != 1 else ''} read"
    if not shards:
        return None
    section = split_info.get("relabel_shards") or {}
    classes = section.get("dataset_classes") if isinstance(section, Mapping) else None
    k = len(classes) if isinstance(classes, Sequence) and not isinstance(classes, str) else None
    d = assess(shards, batch_size=batch_size, shards_in_flight=shards_in_flight, num_classes=k)
    if not d.class_sorted:
        return None
    mean_distinct = sum(s.distinct for s in shards) / len(shards)
    inflight = f"{shards_in_flight} shard{'s' if shards_in_flight != 1 else ''} in flight per reader"
    return (
        f"split {split_info.get('name', '?')!r} looks class-sorted: its shards hold {mean_distinct:.1f} "
        f"distinct classes on average, so a batch of {batch_size} ({inflight}) holds about "
        f"{d.expected:.1f} distinct classes, against {d.iid:.1f} for an i.i.d. draw ({d.ratio:.0%}; from "
        f"{source}). BatchNorm statistics and gradients suffer while every other number looks right. "
        + REMEDY
    )

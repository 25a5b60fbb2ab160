"""The streaming loader: ``ReLabelDataset`` (an ``IterableDataset``) and ``make_loader`` (its DataLoader).

It composes three parts, per DataLoader worker::

    stream.py: _info.json lengths + (seed, epoch, ranks x workers) -> this reader's raw samples
               (key, image shard members, joined label records), several shards interleaved, a shuffle
               buffer, resumable at any position
    decode.decode_sample: raw sample -> {image, label, box, values, indices, flip, key}
    collate: samples -> batch {images [B,3,S,S] uint8, labels [B] int64, boxes [B,4] float32,
             values/indices [B,k,h,w], flips, keys}

Every reader (rank x worker) yields the same number of samples per epoch, ``ceil(total / readers)``, so
every rank yields the same number of batches and DDP never waits on a rank that ran dry. The position of
each reader travels with each batch, which makes ``state_dict()`` exact at any batch boundary; resuming
reopens only the shards that still hold samples to yield (see stream.py), and a state saved under another
number of ranks or workers resumes elastically from its bitmap of consumed samples.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from relabel_shards.crops import check_scale_ratio
from relabel_shards.decode import CropConfig, SampleError, decode_sample
from relabel_shards.diversity import class_sorted_warning
from relabel_shards.images import DEFAULT_MAX_IMAGE_PIXELS
from relabel_shards.order import assign_shards, derive_seed, resolve_world
from relabel_shards.shardlist import resolve_labels, resolve_shards
from relabel_shards.shards import ShardError, url_to_fs
from relabel_shards.stream import (
    EpochPlan,
    LengthMismatch,
    Missing,
    ShardSet,
    Topology,
    pack_bits,
    unpack_bits,
)
from relabel_shards.stream_read import read_stream
from relabel_shards.tarstream import RetryingReader, fsspec_opener

__all__ = ["ReLabelDataset", "ReLabelLoader", "make_loader", "collate", "merge_state_dicts"]

log = logging.getLogger(__name__)
_STATE_VERSION = 2
_STATE_KEYS = ("version", "seed", "epoch", "total", "world_size", "num_workers", "shards_in_flight",
               "shuffle_buffer", "batch_size", "base", "readers", "ranks", "consumed")


def _int_option(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------- dataset


class ReLabelDataset(IterableDataset):
    """Stream ReLabel shards as training samples: cropped uint8 image, box, label and label map.

    Args:
        urls: a directory or URL prefix holding ``_info.json`` (local, ``s3://``, ``gs://``, ``http(s)://``),
            or shard URLs (brace patterns, lists) listed in the ``_info.json`` beside them. Full shards
            (image + ``.rlm``), or image shards (image + ``.cls``) when ``labels`` is given.
        labels: label shards to join with the image shards ``urls``, read in lockstep (label shard i with
            image shard i, same keys in order): a label set's directory (its maps come out as ``values`` /
            ``indices``), or ``{name: directory}`` for several (each comes out as ``batch[name]["values"]``
            / ``["indices"]``). A label set made for other image shards is an error before any read.
        split: the ``_info.json`` split to read (optional when there is one).
        image_size: output side S in pixels.
        scale, ratio: RandomResizedCrop ranges (area fraction; aspect width / height).
        hflip: probability of a horizontal flip, in [0, 1].
        shuffle_buffer: samples held in each reader's shuffle buffer (<= 1: no sample shuffle).
        shards_in_flight: shards each reader streams at once, drawing its next sample from a random one
            (more: more classes per batch from class-sorted shards; each costs an open connection and its
            read-ahead, see README).
        shuffle_shards: shuffle the shard order per (seed, epoch).
        seed: the seed every random choice derives from.
        epoch: the starting epoch (see :meth:`set_epoch`).
        on_error: ``"raise"`` (the error names the URL and key) or ``"skip"`` (count, log and go on).
        rank, world_size: explicit place in a distributed job; default: torch.distributed, else RANK /
            WORLD_SIZE, else a single process.
        storage_options: fsspec options for the URLs (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``
            for S3-compatible stores).
        draft: decode JPEGs at reduced size when the crop is downscaled 2x or more.
        center_crop: for evaluation: instead of the random crop, the centered square whose side is this
            fraction of the short side (timm's ``crop_pct``), never flipped.
        retries: re-opens of a shard after transient read errors.
        transform: a sample transform ``(image, rng) -> (crop, box, flipped)`` (``relabel_shards.transforms``)
            that replaces the crop options above (``center_crop`` then only selects evaluation's reading).
        max_image_pixels: images with more pixels are errors (skipped with ``on_error="skip"``, counted as
            ``image_too_large``); 0 or None: no limit.
    """

    def __init__(self, urls: str | Sequence[str], *, labels: str | Mapping[str, str] | None = None,
                 split: str | None = None, image_size: int = 224,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5,
                 shuffle_buffer: int = 1000, shuffle_shards: bool = True, shards_in_flight: int = 4,
                 seed: int = 0, epoch: int = 0,
                 on_error: str = "raise", rank: int | None = None, world_size: int | None = None,
                 storage_options: dict | None = None, draft: bool = True, retries: int = 3,
                 center_crop: float | None = None, transform: Callable | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be in [0, 1], got {hflip!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if shuffle_buffer < 0 or retries < 0 or epoch < 0:
            raise ValueError(f"shuffle_buffer, retries and epoch must be >= 0, got {shuffle_buffer}, "
                             f"{retries}, {epoch}")
        self.shards_in_flight = _int_option("shards_in_flight", shards_in_flight, 1)
        if center_crop is not None and not 0.0 < center_crop <= 1.0:
            raise ValueError(f"center_crop must be in (0, 1] or None, got {center_crop!r}")
        scale, ratio = check_scale_ratio(scale, ratio)
        self.crop = CropConfig(int(image_size), scale, ratio, float(hflip), bool(draft),
                               None if center_crop is None else float(center_crop), transform,
                               max_image_pixels)
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle_shards = bool(shuffle_shards)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.on_error = on_error
        self.rank, self.world_size = rank, world_size
        if rank is not None or world_size is not None:
            resolve_world(rank, world_size)  # validate now
        self.storage_options = storage_options
        self.retries = int(retries)
        self._splits: list[dict] = []  # the _info.json splits read (for the class-sorted warning)
        self.shards, self.geometry = resolve_shards(urls, split, storage_options, self._splits)
        self.label_sets = [] if labels is None else resolve_labels(labels, self.shards, split,
                                                                   storage_options)
        self.shard_set = ShardSet(tuple(u for u, _ in self.shards), tuple(n for _, n in self.shards),
                                  tuple((ls.name, ls.urls) for ls in self.label_sets))
        self.total = self.shard_set.total
        if self.total == 0:
            raise ShardError(f"{urls!r}: _info.json lists no samples")
        self.num_workers = 0  # make_loader sets the DataLoader's; sizes the epoch
        self.batch_size = 1  # make_loader sets it; sizes the rest of an epoch after an elastic resume
        # pinned in the main process: DataLoader workers have no torch.distributed
        self._world: tuple[int, int] | None = None
        self._progress: dict[int, dict[str, Any]] = {}  # worker -> {"pos", "good", "skipped"}
        self._base: np.ndarray | None = None  # samples consumed before this plan (elastic resume)
        self._plan_cache: tuple[tuple, EpochPlan] | None = None
        # after an elastic resume: byte spans of the saved job's buffered samples, keyed (shard, index), and
        # where its open shards stood, {shard: (next index, offsets)}: the new readers read no more again
        self._known: tuple[dict, dict] | None = None
        self._resumed = False  # a loaded position that set_epoch(same epoch) must keep

    # -- epoch, plan, length, counters ------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at its beginning: shard order and shuffles derive from (seed, epoch).

        Right after :meth:`load_state_dict`, ``set_epoch`` of the loaded epoch keeps the loaded position, so
        the usual loop (``for epoch in ...: set_epoch(epoch); for batch in loader``) resumes mid-epoch.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self._resumed and int(epoch) == self.epoch:
            self._resumed = False
            return
        self._resumed = False
        self.epoch = int(epoch)
        self._progress = {}
        self._base = None
        self._known = None

    def world(self) -> tuple[int, int]:
        """(rank, world_size) of this process, resolved once in the main process and kept for the workers."""
        if self._world is not None:
            return self._world
        world = resolve_world(self.rank, self.world_size)
        if get_worker_info() is None:
            self._world = world
        return world

    def _readers(self) -> tuple[int, int, int]:
        rank, world = self.world()
        return rank, world, max(1, self.num_workers)

    def _topology(self, world: int, workers: int) -> Topology:
        return Topology(world, workers, self.shards_in_flight, self.shuffle_buffer,
                        self.batch_size if self._base is not None else 1)

    def plan(self, world: int | None = None, workers: int | None = None) -> EpochPlan:
        """This epoch's :class:`~relabel_shards.stream.EpochPlan` for ``world`` ranks x ``workers``."""
        if world is None or workers is None:
            _, world, workers = self._readers()
        topo = self._topology(world, workers)
        key = (self.seed, self.epoch, topo, self.shuffle_shards, self.crop.center_crop is not None,
               None if self._base is None else id(self._base))
        if self._plan_cache is None or self._plan_cache[0] != key:
            plan = EpochPlan([n for _, n in self.shards], self.seed, self.epoch, topo,
                             shuffle_shards=self.shuffle_shards, evaluation=self.crop.center_crop is not None,
                             base=self._base)
            self._plan_cache = (key, plan)
        return self._plan_cache[1]

    def _quotas(self) -> list[int]:
        rank, world, workers = self._readers()
        plan = self.plan(world, workers)
        return [plan.quota(rank * workers + w) for w in range(workers)]

    def samples_per_worker(self) -> int:
        """Samples a DataLoader worker of this rank yields per epoch (the most, after an elastic resume)."""
        return max(self._quotas())

    def batches(self, batch_size: int) -> int:
        """Batches this rank yields in the current plan (the same on every rank)."""
        return sum(-(-q // batch_size) for q in self._quotas())

    def __len__(self) -> int:
        """Samples this rank yields per epoch (or, after an elastic resume, in the rest of the epoch)."""
        return sum(self._quotas())

    def warn_if_class_sorted(self, batch_size: int) -> str | None:
        """Log (once) and return the class-sorted warning for these shards at this batch size, if any."""
        for sp in self._splits:
            text = class_sorted_warning(sp, batch_size=batch_size, shards_in_flight=self.shards_in_flight)
            if text:
                log.warning("%s", text)
                return text
        return None

    def check_readers(self) -> None:
        """Raise ``ValueError`` now if there are too few shards for ranks x workers."""
        _, world, workers = self._readers()
        assign_shards([n for _, n in self.shards], world * workers, self.seed, self.epoch)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples (or shards, for ``truncated_tar``) skipped so far this epoch on this rank, by reason.

        Each bad sample counts once per epoch, also when its reader goes round its shards again.
        """
        total: Counter = Counter()
        for p in self._progress.values():
            total.update(p["skipped"])
        return dict(total)

    def _note(self, state: tuple) -> None:
        wid, pos, good, skipped, where = state
        self._progress[wid] = {"pos": pos, "good": good, "skipped": dict(skipped), "where": where}

    def epoch_complete(self) -> bool:
        """Whether every reader of this rank has yielded its quota for the current epoch."""
        quotas = self._quotas()
        return all(self._progress.get(w, {}).get("good", 0) >= q for w, q in enumerate(quotas))

    # -- resume -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the job is in the epoch: enough to continue without repeating or skipping a sample.

        Holds every reader's position and the bitmap of the epoch's consumed samples. Under
        torch.distributed this is a collective (every rank must call it): the ranks' states are gathered,
        so each rank returns the whole job's state and rank 0 alone can save it. Without torch.distributed,
        merge the ranks' states with :func:`merge_state_dicts` to resume under another world size.
        """
        rank, world, workers = self._readers()
        plan = self.plan(world, workers)
        for p in self._progress.values():  # in this process, where() is evaluated when asked for
            if callable(p.get("where")):
                p["where"] = p["where"]()
        readers = {rank * workers + w: int(p["pos"]) for w, p in self._progress.items()}
        state = {"version": _STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "total": self.total,
                 "world_size": world, "num_workers": workers, "shards_in_flight": self.shards_in_flight,
                 "shuffle_buffer": self.shuffle_buffer, "batch_size": plan.topology.batch_size,
                 "shuffle_shards": self.shuffle_shards,
                 "base": None if self._base is None else pack_bits(self._base),
                 "readers": {str(rank * workers + w): dict(p) for w, p in self._progress.items()},
                 "ranks": [rank], "consumed": pack_bits(plan.consumed_mask(readers))}
        import torch.distributed as dist

        if world > 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() == world:
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, state)
            state = merge_state_dicts(parts)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (same data).

        With the same world size, workers, ``shards_in_flight`` and ``shuffle_buffer`` the rest of the
        epoch is exactly the one the saved run would have read. Otherwise (elastic) the samples the state
        marks as not consumed are dealt afresh to this job's readers: each is seen once, every rank
        yields the same number of batches.

        Raises:
            ValueError: not a state of this loader, another dataset, or a state lacking the ranks needed.
        """
        if not isinstance(state, Mapping) or any(k not in state for k in _STATE_KEYS):
            missing = sorted(set(_STATE_KEYS) - set(state)) if isinstance(state, Mapping) else "all"
            raise ValueError(f"not a ReLabelDataset state_dict (missing {missing}); pass what "
                             "loader.state_dict() returned")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"state version must be {_STATE_VERSION}, got {state['version']!r}")
        if state["total"] != self.total:
            raise ValueError(f"cannot resume: the state has total={state['total']}, this loader has "
                             f"{self.total} samples; resume with the same data")
        rank, world, workers = self._readers()
        consumed = unpack_bits(state["consumed"], self.total)
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        same = (state["world_size"], state["num_workers"], state["shards_in_flight"], state["shuffle_buffer"],
                state.get("shuffle_shards", True)) == (world, workers, self.shards_in_flight,
                                                        self.shuffle_buffer, self.shuffle_shards)
        if same and state["base"] is not None:
            same = state["batch_size"] == self.batch_size
        if same and rank in state["ranks"]:
            self._base = None if state["base"] is None else unpack_bits(state["base"], self.total)
            self._known = None
            mine = range(rank * workers, (rank + 1) * workers)
            self._progress = {r - rank * workers: {"pos": int(p["pos"]), "good": int(p["good"]),
                                                   "skipped": dict(p["skipped"]), "where": p.get("where")}
                              for r, p in ((int(k), v) for k, v in state["readers"].items()) if r in mine}
        else:
            if sorted(state["ranks"]) != list(range(state["world_size"])):
                raise ValueError(f"cannot resume under another world size or worker count from the state of "
                                 f"ranks {sorted(state['ranks'])} of {state['world_size']}: save it under "
                                 "torch.distributed (state_dict gathers every rank) or merge the ranks' "
                                 "states with merge_state_dicts")
            self._base = consumed
            self._progress = {}
            self._known = self._known_offsets(state)
            log.info("elastic resume: %d of %d samples of epoch %d left for %d ranks x %d workers",
                     int((~consumed).sum()), self.total, self.epoch, world, workers)
        self._plan_cache = None
        self._resumed = True

    def _known_offsets(self, state: dict[str, Any]) -> tuple[dict, dict]:
        """What the saved job's readers had read but not yielded, by (shard, index), from their ``where``."""
        base = None if state["base"] is None else unpack_bits(state["base"], self.total)
        topo = Topology(int(state["world_size"]), int(state["num_workers"]), int(state["shards_in_flight"]),
                        int(state["shuffle_buffer"]), int(state["batch_size"]) if base is not None else 1)
        old = EpochPlan([n for _, n in self.shards], self.seed, self.epoch, topo,
                        shuffle_shards=bool(state.get("shuffle_shards", True)),
                        evaluation=self.crop.center_crop is not None, base=base)
        spans: dict[tuple[int, int], list] = {}
        opened: dict[int, tuple[int, list]] = {}
        for k, p in state["readers"].items():
            where = p.get("where")
            if not where or where.get("pass") != 0:  # later passes repeat samples: nothing left to save
                continue
            pp = old.pass_plan(int(k), 0)
            for c, sp, *key in where["buffered"]:
                spans[(int(pp.shard_of[c]), int(pp.index_of[c]))] = (sp, *key)
            for s, i, offs, *key in where["open"]:
                opened[int(s)] = (int(i), offs, *key)
        return spans, opened

    def _elastic_where(self, plan: EpochPlan, reader: int) -> dict | None:
        """``where`` for a reader of an elastic plan: its samples the saved job held, and open shards."""
        if self._known is None:
            return None
        spans, opened = self._known
        p = plan.pass_plan(reader, 0)
        pairs = zip(p.shard_of.tolist(), p.index_of.tolist(), strict=True)
        buffered = [[c, *spans[si]] for c, si in enumerate(pairs) if si in spans]
        mine = {s for s, _ in plan.pieces[reader]}
        return {"pass": 0, "buffered": buffered, "open": [[s, *v] for s, v in opened.items() if s in mine]}

    # -- reading ----------------------------------------------------------------------------------

    def _open_stream(self, url: str, offset: int) -> RetryingReader:
        reader = RetryingReader(fsspec_opener(url, self.storage_options), url, retries=self.retries)
        reader.pos = offset  # the first open starts there
        return reader

    def _ranged(self) -> bool:
        """Whether the shards' store serves byte ranges cheaply (local files, S3, GCS); plain HTTP streams
        from the start, so a resume there reads each needed shard from its start instead."""
        fs, _ = url_to_fs(self.shards[0][0], self.storage_options)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return protocol in ("file", "local", "s3", "s3a", "gs", "gcs")

    def _fetch(self, url: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of ``url`` (to its end for None): one ranged request on object stores."""
        fs, path = url_to_fs(url, self.storage_options)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol in ("s3", "s3a", "gs", "gcs"):
            from relabel_shards.storage import Policy, call, split_options

            # one deadline for the ranged read, retries and back-off included (relabel_shards.storage)
            policy = Policy(read_deadline=split_options(self.storage_options)[1].read_deadline,
                            retries=self.retries)
            return call(fs, "cat_file", path, url=url, policy=policy, what=f"read of bytes {start}-{end}",
                        start=start, end=end)
        reader = self._open_stream(url, start)
        try:
            return reader.read() if end is None else reader.read(end - start)
        finally:
            reader.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, workers = (0, 1) if info is None else (info.id, info.num_workers)
        in_worker = info is not None
        rank, world = self.world()
        if workers != max(1, self.num_workers):
            self.num_workers = workers if in_worker else 0
        plan = self.plan(world, workers)
        reader = rank * workers + wid
        quota = plan.quota(reader)
        start = self._progress.get(wid, {"pos": 0, "good": 0, "skipped": {}})
        if not in_worker and start["good"] >= quota:
            log.warning("epoch %d was already read to the end; reading it again "
                        "(call set_epoch for the next)",
                        self.epoch)
            start = {"pos": 0, "good": 0, "skipped": {}}
        skipped: Counter = Counter(start["skipped"])
        good, fails = int(start["good"]), 0
        if good >= quota:
            return
        geometry: Any = self.geometry
        if self.label_sets:
            geometry = {ls.name: ls.geometry for ls in self.label_sets}
        records_wanted = bool(self.label_sets)

        def on_shard_error(shard: int, pas: int, e: ShardError) -> None:
            if self.on_error == "raise":
                raise e
            if pas == 0:  # a later pass meets the same damage again; count each once per epoch
                skipped["length_mismatch" if isinstance(e, LengthMismatch) else "truncated_tar"] += 1
                log.warning("skipping the rest of a shard: %s", e)

        where0 = start.get("where")
        where0 = where0() if callable(where0) else where0
        if where0 is None and not int(start["pos"]):
            where0 = self._elastic_where(plan, reader)
        for pos, pas, item, where in read_stream(self.shard_set, plan, reader, int(start["pos"]),
                                                 self._open_stream, on_shard_error, resume=where0,
                                                 fetch=self._fetch if self._ranged() else None):
            if isinstance(item, Missing):  # counted once per shard by on_shard_error
                fails += 1
                if fails > max(1000, 2 * quota):
                    raise ShardError(f"no readable sample in this reader's last {fails} positions; last: "
                                     f"{item.error}") from item.error
                continue
            try:
                if isinstance(item, ShardError):
                    raise item
                rng = random.Random(derive_seed("crop", self.seed, self.epoch, pas, item.key))
                sample, got = decode_sample(item.key, item.members, item.url, self.crop, rng, geometry,
                                            records=item.records if records_wanted else None)
            except SampleError as e:
                # an image its label set has no label for (the build listed it as failed) is skipped anyway
                if self.on_error == "raise" and e.reason != "unlabeled":
                    raise
                fails += 1
                if pas == 0:  # a sample read again to fill the quota is not counted twice
                    skipped[e.reason] += 1
                    log.warning("skipping: %s", e)
                if fails > max(1000, 2 * quota):
                    raise ShardError(f"gave up after {fails} bad samples in a row; last: {e}") from e
                continue
            fails = 0
            if records_wanted:
                geometry = {k: v or got[k] for k, v in geometry.items()}
            else:
                geometry = geometry or got
            good += 1
            state = (wid, pos + 1, good, dict(skipped), where)  # where(): evaluated by collate, per batch
            if in_worker:
                sample["_state"] = state
            else:
                self._note(state)
            yield sample
            if good >= quota:
                break
        if skipped:
            log.warning("epoch %d rank %d worker %d: skipped %s", self.epoch, rank, wid, dict(skipped))


def merge_state_dicts(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One job state from the states of its ranks (each rank's readers and the union of consumed samples).

    ``ReLabelDataset.state_dict`` does this itself under torch.distributed.
    """
    if not states:
        raise ValueError("merge_state_dicts needs at least one state")
    first = dict(states[0])
    for s in states[1:]:
        for k in ("seed", "epoch", "total", "world_size", "num_workers", "base"):
            if s[k] != first[k]:
                raise ValueError(f"cannot merge states with different {k}: {first[k]!r} and {s[k]!r}")
    n = int(first["total"])
    mask = np.zeros(n, bool)
    readers: dict[str, Any] = {}
    ranks: set[int] = set()
    for s in states:
        mask |= unpack_bits(s["consumed"], n)
        readers.update(s["readers"])
        ranks.update(int(r) for r in s["ranks"])
    first.update(readers=readers, ranks=sorted(ranks), consumed=pack_bits(mask))
    return first


# ---------------------------------------------------------------------------------------------- batches


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into the batch DESIGN.md "Loader output" describes.

    Every tensor is a view of one buffer, each written once; in a DataLoader worker the buffer is in shared
    memory (as torch's default_collate does), so handing the batch to the main process copies nothing and
    passes one shared-memory segment instead of six (each cost about 1 ms per batch of 32 here).

    Returns:
        ``images`` uint8 ``[B, 3, S, S]``, ``labels`` int64 ``[B]``, ``boxes`` float32 ``[B, 4]``
        (normalized x1, y1, x2, y2), ``values`` / ``indices`` ``[B, k, h, w]`` in their stored dtypes
        (full shards, or one joined label set), ``flips`` bool ``[B]`` (whether the image was mirrored; the
        box is not), ``keys`` list[str]; for each named label set of a join, ``batch[name]`` =
        ``{"values": [B, k, h, w], "indices": [B, k, h, w]}``.
    """
    n, first = len(samples), samples[0]
    parts = {  # name -> (dtype, shape, the samples' arrays or scalars)
        "images": (torch.uint8, (n, 3, *first["image"].shape[:2]), [s["image"] for s in samples]),
        "labels": (torch.int64, (n,), [s["label"] for s in samples]),
        "boxes": (torch.float32, (n, 4), [s["box"] for s in samples]),
        "flips": (torch.bool, (n,), [s["flip"] for s in samples]),
    }
    if "values" in first:  # full shards, or a single joined label set
        for name in ("values", "indices"):
            parts[name] = (torch.from_numpy(first[name]).dtype, (n, *first[name].shape),
                           [s[name] for s in samples])
    for name, (values, indices) in first.get("maps", {}).items():  # named label sets: batch[name][...]
        parts[(name, "values")] = (torch.from_numpy(values).dtype, (n, *values.shape),
                                   [s["maps"][name][0] for s in samples])
        parts[(name, "indices")] = (torch.from_numpy(indices).dtype, (n, *indices.shape),
                                    [s["maps"][name][1] for s in samples])
    sizes = {k: -(-int(np.prod(shape)) * dt.itemsize // 64) * 64 for k, (dt, shape, _) in parts.items()}
    total = sum(sizes.values())
    if get_worker_info() is not None:
        proto = torch.empty(0, dtype=torch.uint8)
        buf = proto.new(proto._typed_storage()._new_shared(total, device=proto.device))
    else:
        buf = torch.empty(total, dtype=torch.uint8)
    batch, off = {}, 0
    for name, (dt, shape, items) in parts.items():
        t = buf[off:off + int(np.prod(shape)) * dt.itemsize].view(dt).view(shape)
        off += sizes[name]
        out = t.numpy()
        if name == "images":  # (B, S, S, 3) samples into (B, 3, S, S)
            np.stack(items, out=out.transpose(0, 2, 3, 1))
        elif out.ndim > 1:
            np.stack(items, out=out)
        else:
            out[:] = items
        if isinstance(name, tuple):
            batch.setdefault(name[0], {})[name[1]] = t
        else:
            batch[name] = t
    batch["keys"] = [s["key"] for s in samples]
    if "_state" in samples[-1]:  # the worker's position after this batch, and what a resume re-reads
        *head, where = samples[-1]["_state"]
        batch["_state"] = (*head, where() if callable(where) else where)
    return batch


class ReLabelLoader:
    """A DataLoader over a :class:`ReLabelDataset` that knows its length, epoch and position.

    Iterating gives DESIGN.md's batches (see :func:`collate`). ``len()`` is the number of batches this rank
    yields per epoch, equal on every rank.
    """

    def __init__(self, dataset: ReLabelDataset, batch_size: int, num_workers: int, **dataloader_options: Any):
        batch_size = _int_option("batch_size", batch_size, 1)
        num_workers = _int_option("num_workers", num_workers, 0)
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dataloader_options = dataloader_options
        dataset.num_workers = num_workers
        dataset.batch_size = batch_size
        dataset.check_readers()
        dataset.warn_if_class_sorted(batch_size)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (after an elastic resume: in the rest of the epoch)."""
        return self.dataset.batches(self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (shard order and shuffles derive from seed and epoch)."""
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The dataset's position after the last batch handed out (see ``ReLabelDataset.state_dict``)."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` with the next batch."""
        self.dataset.load_state_dict(state)

    @property
    def skipped(self) -> dict[str, int]:
        """Skip counts of this epoch on this rank, by reason."""
        return self.dataset.skipped

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        ds._resumed = False  # reading has begun: a later set_epoch starts its epoch afresh
        ds.world()  # pin rank and world size here: DataLoader workers cannot ask torch.distributed
        if ds.epoch_complete():
            log.warning("epoch %d was already read to the end; reading it again "
                        "(call set_epoch for the next)",
                        ds.epoch)
            ds._progress = {}
        loader = DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate,
                            **self.dataloader_options)
        for batch in loader:
            state = batch.pop("_state", None)
            if state is not None:
                ds._note(state)
            yield batch
        counts = ds.skipped
        (log.warning if counts else log.info)("epoch %d: %d samples, skipped %s", ds.epoch, len(ds),
                                              counts or "none")


def make_loader(urls: str | Sequence[str], batch_size: int, num_workers: int = 4, *, pin_memory: bool = False,
                prefetch_factor: int | None = None, multiprocessing_context: Any = None, timeout: float = 0,
                worker_init_fn: Any = None, persistent_workers: bool = False,
                **dataset_options: Any) -> ReLabelLoader:
    """A batch loader over ReLabel shards: ``ReLabelDataset(urls, **dataset_options)`` in a DataLoader.

    Args:
        urls: see :class:`ReLabelDataset`.
        batch_size: samples per batch (each worker's last batch of an epoch may be smaller).
        num_workers: DataLoader worker processes (0: read in this process).
        pin_memory, prefetch_factor, multiprocessing_context, timeout, worker_init_fn: passed to
            ``torch.utils.data.DataLoader`` (``prefetch_factor``, ``multiprocessing_context`` and ``timeout``
            only with workers). ``timeout`` bounds the wait for one batch from the workers; the reads
            themselves are bounded by ``storage_options={"read_deadline": seconds}`` (each read of a shard,
            retries included; ``relabel_shards.storage``).
        persistent_workers: not supported (must be False): workers start afresh each epoch because they take
            the epoch and the resume position with them.
        **dataset_options: keyword options of :class:`ReLabelDataset` (``labels`` to join label shards
            with image shards ``urls``, ``seed``, ``image_size``, ``shards_in_flight``, ``on_error``,
            ``rank``, ``storage_options``, ...).

    Returns:
        A :class:`ReLabelLoader`: iterate it for batch dicts; ``set_epoch``, ``state_dict``,
        ``load_state_dict``, ``len``, ``skipped``.

    Raises:
        ValueError: bad options, or fewer shards than ranks x workers (the message gives the number needed).
    """
    batch_size = _int_option("batch_size", batch_size, 1)
    num_workers = _int_option("num_workers", num_workers, 0)
    if persistent_workers:
        raise ValueError("persistent_workers=True is not supported: each epoch's workers take that epoch and "
                         "the resume position with them, so they start afresh (the cost is one worker start "
                         "per epoch)")
    if timeout and num_workers == 0:
        raise ValueError(f"timeout applies to DataLoader workers; got timeout={timeout!r} with num_workers=0")
    dl: dict[str, Any] = {"pin_memory": pin_memory, "worker_init_fn": worker_init_fn}
    if num_workers > 0:
        dl["timeout"] = timeout
        if prefetch_factor is not None:
            dl["prefetch_factor"] = prefetch_factor
        if multiprocessing_context is not None:
            dl["multiprocessing_context"] = multiprocessing_context
    return ReLabelLoader(ReLabelDataset(urls, **dataset_options), batch_size, num_workers, **dl)

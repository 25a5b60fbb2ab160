"""The streaming loader: ``ReLabelDataset`` (an ``IterableDataset``) and ``make_loader`` (its DataLoader).

What a stream carries at each stage, per DataLoader worker::

    _info.json -> [(shard url, samples)]              (resolve_shards; the epoch length comes from here)
      -> this reader's shards for (seed, epoch)       (order.assign_shards over ranks x workers)
      -> (url, key, {ext: bytes}, pass)               (tarstream: sequential reads, retries; round again
                                                       while the reader's quota is not met)
      -> shuffle buffer seeded by (seed, epoch, rank, worker)
      -> decoded sample {image, label, box, values, indices, flip, key}   (decode.decode_sample)
      -> batch {images [B,3,S,S] uint8, labels [B] int64, boxes [B,4] float32, values/indices [B,k,h,w], keys}

Every reader (rank x worker) yields the same number of samples per epoch, ``ceil(total / readers)``, so
every rank yields the same number of batches and DDP never waits on a rank that ran dry. The position of
each reader (samples taken from its shuffle buffer, samples yielded, skip counts) travels with each batch,
which makes ``state_dict()`` exact at any batch boundary; resuming replays the tar reads of the skipped
part (no decoding) and continues with the next sample.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from relabel_shards.crops import check_scale_ratio
from relabel_shards.decode import CropConfig, SampleError, decode_sample
from relabel_shards.images import DEFAULT_MAX_IMAGE_PIXELS
from relabel_shards.order import assign_shards, derive_seed, resolve_world, samples_per_slot, shuffle_buffer
from relabel_shards.shardlist import resolve_shards
from relabel_shards.shards import ShardError
from relabel_shards.tarstream import RetryingReader, fsspec_opener, iter_tar_samples

__all__ = ["ReLabelDataset", "ReLabelLoader", "make_loader", "collate"]

log = logging.getLogger(__name__)
_STATE_VERSION = 1


# --------------------------------------------------------------------------------------------- dataset


class ReLabelDataset(IterableDataset):
    """Stream ReLabel shards as training samples: cropped uint8 image, box, label and label map.

    Args:
        urls: a directory or URL prefix holding ``_info.json`` (local, ``s3://``, ``gs://``, ``http(s)://``),
            or shard URLs (brace patterns, lists) listed in the ``_info.json`` beside them.
        split: the ``_info.json`` split to read (optional when there is one).
        image_size: output side S in pixels.
        scale, ratio: RandomResizedCrop ranges (area fraction; aspect width / height).
        hflip: probability of a horizontal flip, in [0, 1].
        shuffle_buffer: samples held in each reader's shuffle buffer (<= 1: no sample shuffle).
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

    def __init__(self, urls: str | Sequence[str], *, split: str | None = None, image_size: int = 224,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5,
                 shuffle_buffer: int = 1000, shuffle_shards: bool = True, seed: int = 0, epoch: int = 0,
                 on_error: str = "raise", rank: int | None = None, world_size: int | None = None,
                 storage_options: dict | None = None, draft: bool = True, retries: int = 3,
                 center_crop: float | None = None, transform: Callable | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be in [0, 1], got {hflip!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if shuffle_buffer < 0 or retries < 0 or epoch < 0:
            raise ValueError(f"shuffle_buffer, retries and epoch must be >= 0, got {shuffle_buffer}, "
                             f"{retries}, {epoch}")
        if center_crop is not None and not 0.0 < center_crop <= 1.0:
            raise ValueError(f"center_crop must be in (0, 1] or None, got {center_crop!r}")
        scale, ratio = check_scale_ratio(scale, ratio)
        self.crop = CropConfig(image_size, scale, ratio, float(hflip), bool(draft),
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
        self.shards, self.geometry = resolve_shards(urls, split, storage_options)
        self.total = sum(n for _, n in self.shards)
        if self.total == 0:
            raise ShardError(f"{urls!r}: _info.json lists no samples")
        self.num_workers = 0  # make_loader sets the DataLoader's; sizes the epoch
        # pinned in the main process: DataLoader workers have no torch.distributed
        self._world: tuple[int, int] | None = None
        self._progress: dict[int, dict[str, Any]] = {}  # worker -> {"raw", "good", "skipped"}
        self._resumed = False  # a loaded position that set_epoch(same epoch) must keep

    # -- epoch, length, counters ------------------------------------------------------------------

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

    def samples_per_worker(self) -> int:
        """Samples each DataLoader worker of each rank yields per epoch."""
        _, world, workers = self._readers()
        return self._quota(world, workers)

    def _slots(self, world: int, workers: int) -> list[list[int]]:
        lengths = [n for _, n in self.shards]
        return assign_shards(lengths, world * workers, self.seed, self.epoch if self.shuffle_shards else 0)

    def _quota(self, world: int, workers: int) -> int:
        """Samples every reader (rank x worker) yields per epoch, the same for all, so no DDP rank waits.

        Training: ``ceil(total / readers)``; with uneven shards a reader with more samples stops early and
        one with fewer reads its shards again. Evaluation (``center_crop``): the largest reader's load, so
        every sample is read at least once; the readers with less repeat some, to be merged by key.
        """
        if self.crop.center_crop is None:
            return samples_per_slot(self.total, world * workers)
        lengths = [n for _, n in self.shards]
        return max(sum(lengths[i] for i in slot) for slot in self._slots(world, workers))

    def __len__(self) -> int:
        """Samples this rank yields per epoch (the same on every rank)."""
        return self.samples_per_worker() * self._readers()[2]

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

    def _note(self, state: tuple[int, int, int, dict]) -> None:
        wid, raw, good, skipped = state
        self._progress[wid] = {"raw": raw, "good": good, "skipped": dict(skipped)}

    def epoch_complete(self) -> bool:
        """Whether every reader of this rank has yielded its quota for the current epoch."""
        quota, workers = self.samples_per_worker(), self._readers()[2]
        return all(self._progress.get(w, {}).get("good", 0) >= quota for w in range(workers))

    # -- resume -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the epoch: enough to continue without repeating or skipping a sample."""
        rank, world, workers = self._readers()
        return {"version": _STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "rank": rank,
                "world_size": world, "num_workers": workers, "total": self.total,
                "workers": {str(w): dict(p) for w, p in self._progress.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (same data, world size and number of workers).

        Raises:
            ValueError: the state comes from another world size, worker count or dataset.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state version must be {_STATE_VERSION}, got {state.get('version')!r}")
        _, world, workers = self._readers()
        for name, here in (("world_size", world), ("num_workers", workers), ("total", self.total)):
            if state[name] != here:
                raise ValueError(f"cannot resume: the state has {name}={state[name]}, this loader has "
                                 f"{here}; "
                                 "resume with the same data, world size and num_workers")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._progress = {int(w): {"raw": int(p["raw"]), "good": int(p["good"]),
                                   "skipped": dict(p["skipped"])} for w, p in state["workers"].items()}
        self._resumed = True

    # -- reading ----------------------------------------------------------------------------------

    def _read_shard(self, url: str, expected: int, pas: int) -> Iterator[tuple[str, str, dict, int]]:
        reader = RetryingReader(fsspec_opener(url, self.storage_options), url, retries=self.retries)
        n = 0
        try:
            for key, members in iter_tar_samples(reader, url):
                n += 1
                yield url, key, members, pas
        finally:
            reader.close()
        if n != expected:
            raise ShardError(f"{url}: _info.json says {expected} samples, the shard holds {n}"
                             + (" (truncated?)" if n < expected else ""))

    def _pass(self, shard_ids: list[int], pas: int, skipped: Counter) -> Iterator[tuple[str, str, dict, int]]:
        got = 0
        for i in shard_ids:
            url, n = self.shards[i]
            try:
                for item in self._read_shard(url, n, pas):
                    got += 1
                    yield item
            except ShardError as e:
                if self.on_error == "raise" or isinstance(e, SampleError):
                    raise
                if pas == 0:  # a later pass meets the same damage again; count each once per epoch
                    skipped["truncated_tar"] += 1
                    log.warning("skipping the rest of a shard: %s", e)
        if got == 0:
            raise ShardError(f"no readable sample in shards {[self.shards[i][0] for i in shard_ids]}")

    def _stream(self, shard_ids: list[int], skipped: Counter, rng: random.Random
                ) -> Iterator[tuple[str, str, dict, int]]:
        # Pass 0 reads the reader's shards once; further passes (same shards, shuffled afresh) only run
        # while the reader's quota is not met. Each pass has its own buffer, so passes never mix.
        for pas in itertools.count():
            yield from shuffle_buffer(self._pass(shard_ids, pas, skipped), self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, workers = (0, 1) if info is None else (info.id, info.num_workers)
        in_worker = info is not None
        rank, world = self.world()
        if workers != max(1, self.num_workers):
            self.num_workers = workers if in_worker else 0
        quota = self._quota(world, workers)
        mine = self._slots(world, workers)[rank * workers + wid]
        start = self._progress.get(wid, {"raw": 0, "good": 0, "skipped": {}})
        if not in_worker and start["good"] >= quota:
            log.warning("epoch %d was already read to the end; reading it again "
                        "(call set_epoch for the next)",
                        self.epoch)
            start = {"raw": 0, "good": 0, "skipped": {}}
        skipped: Counter = Counter()
        buf_rng = random.Random(derive_seed("buffer", self.seed, self.epoch, rank, wid))
        stream = self._stream(mine, skipped, buf_rng)
        raw, good, fails = 0, int(start["good"]), 0
        geometry = self.geometry
        if good >= quota:
            return
        for url, key, members, pas in stream:
            raw += 1
            if raw <= start["raw"]:  # resume: replay the reads, decode nothing
                if raw == start["raw"]:
                    skipped.clear()
                    skipped.update(start["skipped"])
                continue
            rng = random.Random(derive_seed("crop", self.seed, self.epoch, pas, key))
            try:
                sample, got = decode_sample(key, members, url, self.crop, rng, geometry)
            except SampleError as e:
                if self.on_error == "raise":
                    raise
                fails += 1
                if pas == 0:  # a sample read again to fill the quota is not counted twice
                    skipped[e.reason] += 1
                    log.warning("skipping: %s", e)
                if fails > max(1000, 2 * quota):
                    raise ShardError(f"gave up after {fails} bad samples in a row; last: {e}") from e
                continue
            fails = 0
            geometry = geometry or got
            good += 1
            state = (wid, raw, good, dict(skipped))
            if in_worker:
                sample["_state"] = state
            else:
                self._note(state)
            yield sample
            if good >= quota:
                break
        if skipped:
            log.warning("epoch %d rank %d worker %d: skipped %s", self.epoch, rank, wid, dict(skipped))


# ---------------------------------------------------------------------------------------------- batches


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into the batch DESIGN.md "Loader output" describes.

    Every tensor is a view of one buffer, each written once; in a DataLoader worker the buffer is in shared
    memory (as torch's default_collate does), so handing the batch to the main process copies nothing and
    passes one shared-memory segment instead of six (each cost about 1 ms per batch of 32 here).

    Returns:
        ``images`` uint8 ``[B, 3, S, S]``, ``labels`` int64 ``[B]``, ``boxes`` float32 ``[B, 4]``
        (normalized x1, y1, x2, y2), ``values`` / ``indices`` ``[B, k, h, w]`` in their stored dtypes,
        ``flips`` bool ``[B]`` (whether the image was mirrored; the box is not), ``keys`` list[str].
    """
    n, first = len(samples), samples[0]
    parts = {  # name -> (dtype, shape, the samples' arrays or scalars)
        "images": (torch.uint8, (n, 3, *first["image"].shape[:2]), [s["image"] for s in samples]),
        "labels": (torch.int64, (n,), [s["label"] for s in samples]),
        "boxes": (torch.float32, (n, 4), [s["box"] for s in samples]),
        "values": (torch.from_numpy(first["values"]).dtype, (n, *first["values"].shape),
                   [s["values"] for s in samples]),
        "indices": (torch.from_numpy(first["indices"]).dtype, (n, *first["indices"].shape),
                    [s["indices"] for s in samples]),
        "flips": (torch.bool, (n,), [s["flip"] for s in samples]),
    }
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
        batch[name] = t
    batch["keys"] = [s["key"] for s in samples]
    if "_state" in samples[-1]:
        batch["_state"] = samples[-1]["_state"]  # the worker's position after this batch
    return batch


class ReLabelLoader:
    """A DataLoader over a :class:`ReLabelDataset` that knows its length, epoch and position.

    Iterating gives DESIGN.md's batches (see :func:`collate`). ``len()`` is the number of batches this rank
    yields per epoch, equal on every rank.
    """

    def __init__(self, dataset: ReLabelDataset, batch_size: int, num_workers: int, **dataloader_options: Any):
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dataloader_options = dataloader_options
        dataset.num_workers = num_workers
        dataset.check_readers()

    def __len__(self) -> int:
        per_worker = -(-self.dataset.samples_per_worker() // self.batch_size)
        return per_worker * max(1, self.num_workers)

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
        **dataset_options: keyword options of :class:`ReLabelDataset` (``seed``, ``image_size``,
            ``on_error``, ``rank``, ``storage_options``, ...).

    Returns:
        A :class:`ReLabelLoader`: iterate it for batch dicts; ``set_epoch``, ``state_dict``,
        ``load_state_dict``, ``len``, ``skipped``.

    Raises:
        ValueError: bad options, or fewer shards than ranks x workers (the message gives the number needed).
    """
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

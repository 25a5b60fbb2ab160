"""Pair a label set with images sharded another way, by sample key (``relabel-shards join``).

Data flow for one rank (all ranks run the same call; ``relabel_shards.writer`` does ranks and resume)::

    LABELS (label shards or full shards + _info.json)
      one sequential pass over the tar headers -> LabelIndex: sorted keys (numpy bytes) -> (label shard,
      data offset, size) of each key.rlm member; nothing of the records is held
    IMAGES (image shards, or an image folder): output shard i = image shard i (or folder chunk i)
      DataLoader workers: read the images in order, look each key up in the index, read its record with one
        seek + read (open label shards kept in a small LRU), check the record's image binding against the
        image, yield chunks of finished samples and failures
      writer thread: append to shard i's temporary tar, commit at the end   (writer.ChunkSink)
    after this rank's shards: ShardJob.finalize writes _info.json once every shard exists; it lists every
    image without a label (also in ``failures``) and every label without an image

Output: full shards (the image sample's members passed through + ``key.rlm``), or with ``labels_only`` and
image shards, label shards aligned to IMAGES (``relabel_shards.pairing``: an image without a label keeps its
place with an empty ``key.rlm``).

A record's image binding (``labelmap.ImageBinding``) must describe the image it is paired with. A record
made from the same bytes (same size and sha256) is copied as is. A record made from another copy of the
image (re-encoded or resized, as in timm's ``imagenet-12k`` copies) with the same aspect ratio (within
``ASPECT_TOLERANCE``), or a record without a binding, is re-encoded with the new image's binding (its map is
in normalized coordinates, so it still applies): counted as ``rebound``. Another aspect ratio is a failure:
that label was made for another picture.

Memory and speed (``benchmarks/bench_join.py``): the index costs about ``len(key) + 16`` bytes per key (20
MB per million ImageNet keys) and is built at the speed of reading tar headers; records are fetched one seek
each, so keep a remote label set on local disk first (it is small: about 3 KB per image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from relabel_shards.labelindex import LabelIndex, RecordReader, build_index
from relabel_shards.shards import (
    FORMAT_VERSION,
    LABELMAP_EXT,
    ShardError,
    json_bytes,
    sample_members,
    split_member_name,
)

log = logging.getLogger(__name__)

ASPECT_TOLERANCE = 0.02  # relative width/height difference still taken for a copy of the same picture
CHUNK = 64  # samples per worker -> writer hand-off


# ---------------------------------------------------------------------------------------- image facts


def upright_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image after its EXIF orientation, from the header only (nothing decoded): the
    project's one image rule (``relabel_shards.images.open_image``), without the pixel limit.

    Raises:
        ValueError: empty or not an image (``images.ImageError``).
    """
    from relabel_shards.images import open_image

    return open_image(data, max_pixels=None).size


def bind_record(record: bytes, image: bytes, size: tuple[int, int] | None = None) -> tuple[bytes, bool]:
    """The record bound to ``image``: (record, rebound). Same image bytes: the record as is.

    Args:
        record: a label-map record (with or without an image binding).
        image: the image file's bytes it is paired with.
        size: the image's upright (width, height), when known (else read from its header).

    Raises:
        ValueError: the record was made for a picture of another aspect ratio, or ``image`` is not an image.
        LabelMapError: a corrupt record.
    """
    from relabel_shards.labelmap import ImageBinding, decode_label_map, encode_label_map, read_header

    head = read_header(record)
    b = head.image
    if b is not None and b.size == len(image) and b.sha256 == hashlib.sha256(image).digest():
        return record, False
    w, h = size if size is not None else upright_size(image)
    if b is not None and abs((b.width / b.height) / (w / h) - 1) > ASPECT_TOLERANCE:
        raise ValueError(
            f"its label was made for another picture ({b.width}x{b.height} px, {b.size} bytes), "
            f"this image is {w}x{h} px, {len(image)} bytes"
        )
    lm = decode_label_map(record)
    kw: dict[str, Any] = {"encoding": "lossless"}
    if head.value_codec == "quantized":
        kw = {"encoding": "compact", "step": head.step}
    elif head.value_codec == "float16":
        kw = {"encoding": "float16"}
    return encode_label_map(
        lm.values, lm.indices, lm.num_classes, image=ImageBinding.of(image, w, h), **kw
    ), True


# ------------------------------------------------------------------------------------------- labelers


class IndexLabeler:
    """``labeler(key, image bytes) -> record``: the label set's record for ``key``, bound to the image.

    Picklable before first use (DataLoader workers open their own label shards).
    """

    kind = "join"

    def __init__(self, index: LabelIndex):
        self.index = index
        self._reader: RecordReader | None = None

    def find(self, keys: Sequence[str]) -> np.ndarray:
        return self.index.find(keys)

    def __call__(self, key: str, row: int, image: bytes, size: tuple[int, int] | None) -> tuple[bytes, bool]:
        if self._reader is None:
            self._reader = RecordReader(self.index)
        return bind_record(self._reader.read(row), image, size)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


# ---------------------------------------------------------------------------------------- the stream


def parse_match_by(match_by: str) -> str | None:
    """``"key"`` -> None (the sample key); ``"json:FIELD"`` -> FIELD (the stem of that ``.json`` field).

    Raises:
        ValueError: anything else.
    """
    if match_by == "key":
        return None
    if match_by.startswith("json:") and len(match_by) > 5:
        return match_by[5:]
    raise ValueError(f"match_by must be 'key' or 'json:FIELD' (e.g. json:filename), got {match_by!r}")


def _failure(key: str, source: str, reason: str) -> dict:
    return {"key": key, "source": source, "reason": reason}


NO_LABEL = "image without a label"


class AlignedStream:
    """Chunks for ``ChunkSink``: each task's images in order, each given its record (or a failure).

    ``tasks`` are (output shard index, payload): an image shard URL, or a list of ``FileItem`` of an image
    folder. ``labels_only`` yields ``[(key.rlm, record)]`` per sample (an empty record for a failure);
    otherwise full samples (image members + ``key.rlm``), failures without a sample.
    """

    def __init__(
        self,
        tasks: list[tuple[int, Any]],
        labeler: Any,
        labels_only: bool,
        storage_options: dict | None,
        match_by: str = "key",
    ):
        self.tasks = tasks
        self.labeler = labeler
        self.labels_only = labels_only
        self.storage_options = storage_options
        self.match_by = parse_match_by(match_by)

    def __iter__(self) -> Iterator[dict]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            for index, payload in self.tasks[wid::nw]:
                entries: list[dict] = []
                for e in self._samples(payload):
                    entries.append(e)
                    if len(entries) == CHUNK:
                        yield {"task": index, "entries": entries, "end": False}
                        entries = []
                yield {"task": index, "entries": entries, "end": True}
        finally:
            if hasattr(self.labeler, "close"):
                self.labeler.close()

    def _samples(self, payload: Any) -> Iterator[dict]:
        if isinstance(payload, str):
            yield from self._batched(self._shard_images(payload))
        else:
            yield from self._batched(self._folder_images(payload))

    def _shard_images(self, url: str) -> Iterator[dict]:
        from relabel_shards.sources import image_member, iter_shard_samples

        name = url.rsplit("/", 1)[-1]
        try:
            for key, members in iter_shard_samples(url, self.storage_options):
                kept = [(n, d) for n, d in members if split_member_name(n)[1] != LABELMAP_EXT]
                img = image_member(kept)
                if img is None:
                    yield _failure(
                        key, f"{name}#{key}", f"no image member (members: {', '.join(n for n, _ in members)})"
                    )
                    continue
                try:
                    lookup = self._lookup_key(key, kept)
                except ValueError as e:
                    yield _failure(key, f"{name}#{key}", str(e))
                    continue
                yield {
                    "key": key,
                    "lookup": lookup,
                    "source": f"{name}#{key}",
                    "image": img[1],
                    "members": kept,
                    "size": None,
                }
        except (ShardError, OSError) as e:
            yield {**_failure("", url, f"image shard unreadable from here on: {e}"), "end_of_shard": True}

    def _folder_images(self, items: list) -> Iterator[dict]:
        from relabel_shards.sources import read_bytes

        for it in items:
            if it.error is not None:
                yield _failure(it.key, it.source, it.error)
                continue
            try:
                data = read_bytes(it.path, self.storage_options)
                w, h = upright_size(data)
            except (OSError, ValueError) as e:
                yield _failure(it.key, it.source, str(getattr(e, "strerror", None) or e))
                continue
            meta: dict[str, Any] = {"source": it.source, "width": w, "height": h}
            if it.class_name is not None:
                meta["class_name"] = it.class_name
            members = sample_members(
                it.key, image=data, image_ext=it.image_ext, label=it.label, meta=meta, labelmap=b""
            )[:-1]
            yield {"key": it.key, "source": it.source, "image": data, "members": members, "size": (w, h)}

    def _lookup_key(self, key: str, members: list[tuple[str, bytes]]) -> str:
        """The key the label is looked up by: the sample key, or the file stem a ``.json`` field names."""
        if self.match_by is None:
            return key
        from relabel_shards.shards import key_from_path

        raw = next((d for n, d in members if split_member_name(n)[1] == "json"), None)
        try:
            value = json.loads(raw)[self.match_by] if raw is not None else None
        except (ValueError, KeyError, TypeError):
            value = None
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"no .json field {self.match_by!r} to match its label by (match_by json:{self.match_by})"
            )
        return key_from_path(value)

    def _batched(self, samples: Iterator[dict]) -> Iterator[dict]:
        """Look keys up a batch at a time (one vectorized search), then label each sample in order."""
        batch: list[dict] = []
        for s in samples:
            batch.append(s)
            if len(batch) == CHUNK:
                yield from self._label(batch)
                batch = []
        yield from self._label(batch)

    def _label(self, batch: list[dict]) -> Iterator[dict]:
        todo = [s for s in batch if "reason" not in s]
        rows = self.labeler.find([s.get("lookup", s["key"]) for s in todo])
        found = dict(zip((id(s) for s in todo), rows, strict=True))
        for s in batch:
            if "reason" in s:
                yield s
                continue
            row = int(found[id(s)])
            if row < 0:
                yield _failure(s["key"], s["source"], NO_LABEL)
                continue
            try:
                record, rebound = self.labeler(s["key"], row, s["image"], s["size"])
            except ValueError as e:  # LabelMapError too
                yield _failure(s["key"], s["source"], str(e))
                continue
            member = (f"{s['key']}.{LABELMAP_EXT}", record)
            yield {
                "key": s["key"],
                "lookup": s.get("lookup", s["key"]),
                "members": [member] if self.labels_only else [*s["members"], member],
                "rebound": rebound,
            }


# ------------------------------------------------------------------------------------------- the job


@dataclass
class JoinSummary:
    """What one rank's :func:`join_labels` did (``BuildSummary``'s fields plus the pairing counts)."""

    rank: int
    world_size: int
    num_shards: int
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    images: int = 0
    failures: list[dict] = field(default_factory=list)
    info: dict | None = None
    rebound: int = 0
    labels_without_image: int | None = None


def join_labels(
    labels: str | os.PathLike,
    images: str | os.PathLike | list[str],
    out: str | os.PathLike,
    *,
    labels_only: bool = False,
    shard_size: int = 1000,
    prefix: str | None = None,
    split: str = "train",
    labels_split: str | None = None,
    num_workers: int = 4,
    rank: int | None = None,
    world_size: int | None = None,
    strict: bool = False,
    storage_options: dict | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> JoinSummary:
    """Pair the label set ``labels`` with ``images`` by sample key and write full shards or label shards.

    Args:
        labels: a label set: label shards or full shards with ``_info.json`` (local or fsspec URL).
        images: image shards (paths, brace patterns, URLs; each needs an image member, and ``.cls`` to train
            on) or an ImageFolder directory.
        out: output directory or ``s3://`` / ``gs://`` prefix.
        labels_only: write label shards aligned to the image shards (IMAGES must be shards) instead of full
            shards.
        shard_size: samples per shard for an image folder (image shards keep their sharding).
        prefix, split, name: output shard prefix (default: ``split``), split name and dataset name.
        labels_split: the label set's split; None when it holds one.
        num_workers: worker processes that read images and records (0: in this process).
        rank, world_size: this rank (``relabel_shards.writer.resolve_rank``).
        strict: an image without a label, a label without an image or a mismatched record is an error.
        storage_options: fsspec options for every URL.
        progress: called as ``progress(images_done, images_total)`` (total None when unknown).
        overwrite: write into a folder that holds a dataset this project did not write (refused otherwise).

    Returns:
        JoinSummary of this rank; ``info`` is the split written to ``_info.json``, if this rank wrote it.

    Raises:
        FileNotFoundError: LABELS or IMAGES missing.
        ValueError: bad arguments, ``labels_only`` with an image folder, a strict failure, or an output
            directory holding another job's shards.
    """
    from relabel_shards.build import _check_args
    from relabel_shards.plan import check_output, job_fingerprint
    from relabel_shards.sources import open_source

    prefix = _check_args(shard_size, 1, num_workers, "compact", split, prefix)
    labels, out = os.fspath(labels), os.fspath(out)
    src = open_source(images, storage_options)
    if labels_only and src.kind != "shards":
        raise ValueError(
            f"labels_only needs image shards as images (label shards pair with image shards one "
            f"to one), got a {src.kind} source {src.url!r}: write full shards instead"
        )
    index = build_index(labels, split=labels_split, storage_options=storage_options)
    labeler = IndexLabeler(index)
    settings = {
        "labels_only": bool(labels_only),
        "shard_size": None if src.kind == "shards" else shard_size,
        "prefix": prefix,
        "split": split,
    }
    description = _description(src, labels, index, settings)
    fingerprint = job_fingerprint(description)
    check_output(out, prefix, fingerprint, description, storage_options)

    def project(stats: list) -> dict:
        return _project(stats, src, index, settings)

    return run_aligned(
        src,
        out,
        labeler,
        fingerprint,
        project,
        labels_only=labels_only,
        shard_size=shard_size,
        prefix=prefix,
        split=split,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        strict=strict,
        storage_options=storage_options,
        progress=progress,
        name=name,
        unused=lambda stats: _labels_without_image(index, stats),
        description=description,
        overwrite=overwrite,
    )


def run_aligned(
    src: Any,
    out: str,
    labeler: Any,
    fingerprint: str,
    project: Callable[[list], dict],
    *,
    labels_only: bool,
    shard_size: int,
    prefix: str,
    split: str,
    num_workers: int,
    rank: int | None,
    world_size: int | None,
    strict: bool,
    storage_options: dict | None,
    progress: Callable[[int, int | None], None] | None,
    name: str | None,
    unused: Callable[[list], list[dict]] | None = None,
    match_by: str = "key",
    description: dict | None = None,
    overwrite: bool = False,
) -> JoinSummary:
    """The job behind ``join`` and ``convert --labels-only``: one output shard per image shard (or folder
    chunk), each image given ``labeler``'s record, through ``ShardJob`` (ranks, resume, ``_info.json``).

    ``description`` (the job's, whose digest is ``fingerprint``) goes into each sidecar, so that a rerun with
    other arguments into the same OUT is told what differs (``plan.check_output``). ``unused(stats)`` lists
    the labels no image took (``{"key", "source", "reason"}``); with ``strict`` any is
    an error raised before ``_info.json`` is written.
    """
    from torch.utils.data import DataLoader

    from relabel_shards.build import _input_shard_total, _plan
    from relabel_shards.plan import FailureTally
    from relabel_shards.writer import ChunkSink, ShardJob

    plan = _plan(src, shard_size)
    job = ShardJob(
        out,
        prefix=prefix,
        num_shards=len(plan),
        fingerprint=fingerprint,
        rank=rank,
        world_size=world_size,
        storage_options=storage_options,
        overwrite=overwrite,
    )
    todo, summary = job.start(JoinSummary)
    total = _input_shard_total(src, todo) if src.kind == "shards" else sum(len(plan[i]) for i in todo)
    rebound: dict[int, int] = {}
    matched: dict[int, list[str]] = {}  # lookup keys per shard, when they are not the sample keys

    def fill(shard, chunk: dict) -> None:  # writer thread, chunks in order
        for e in chunk["entries"]:
            if "reason" in e:
                shard.fail({k: e[k] for k in ("key", "source", "reason")})
                if labels_only and e["key"]:  # the key keeps its place: no label (pairing.py)
                    shard.add(e["key"], [(f"{e['key']}.{LABELMAP_EXT}", b"")])
                continue
            shard.add(e["key"], e["members"])
            rebound[chunk["task"]] = rebound.get(chunk["task"], 0) + bool(e.get("rebound"))
            if match_by != "key":
                matched.setdefault(chunk["task"], []).append(e["lookup"])

    def extra(index: int) -> dict:
        out: dict[str, Any] = {"rebound": rebound.pop(index, 0)}
        if description is not None:
            out["job"] = description
        if match_by != "key":
            out["matched_by"] = matched.pop(index, [])
        return out

    if todo:
        stream = AlignedStream([(i, plan[i]) for i in todo], labeler, labels_only, storage_options, match_by)
        workers = min(num_workers, len(todo))
        loader = DataLoader(
            _Iterable(stream),
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=4 if workers > 0 else None,
            multiprocessing_context="fork" if workers > 0 and os.name == "posix" else None,
        )
        chunks = iter(loader)  # forks the workers before the writer thread exists
        done = 0
        tally = FailureTally("join")
        with ChunkSink(job, fill, extra) as sink:
            if progress is not None:
                progress(0, total)
            for chunk in chunks:
                failed = tally.take(chunk, strict=strict)
                summary.failures.extend(failed)
                sink.submit(chunk)
                summary.images += len(chunk["entries"]) - len(failed)
                summary.rebound += sum(bool(e.get("rebound")) for e in chunk["entries"])
                done += len(chunk["entries"])
                if progress is not None:
                    progress(done, total)
        tally.log_total()
        if hasattr(labeler, "close"):
            labeler.close()

    def whole(stats: list) -> dict:
        proj = project(stats)
        left = unused(stats) if unused is not None else []
        count = sum(int(f.get("count", 1)) for f in left)
        if strict and left:
            raise ValueError(
                f"{left[0]['source']}: {left[0]['reason']} (strict: {count} labels without an image; "
                "_info.json not written)"
            )
        proj["labels_without_image"] = {
            "count": count,
            "keys": [f["key"] if "count" not in f else f["source"] for f in left],
        }
        proj["images_without_label"] = sum(f.get("reason") == NO_LABEL for st in stats for f in st.failures)
        proj["rebound"] = sum(int(st.extra.get("rebound", 0)) for st in stats)
        summary.labels_without_image = count
        if labels_only:
            from relabel_shards.build import label_set_fields

            proj.update(label_set_fields(stats, src.shard_urls))
        return proj

    summary.info = job.finalize(split, whole, name=name)
    return summary


class _Iterable:
    """Wraps :class:`AlignedStream` as a torch ``IterableDataset`` without importing torch at module level."""

    def __new__(cls, stream: AlignedStream):
        from torch.utils.data import IterableDataset

        class _DS(IterableDataset):
            def __iter__(self):
                return iter(stream)

        return _DS()


def _identity(x: Any) -> Any:
    return x


def _labels_without_image(index: LabelIndex, stats: list) -> list[dict]:
    """Every record of the index that no output sample took, in index (key) order."""
    taken = [k for st in stats for k in st.keys]
    failed = {f["key"] for st in stats for f in st.failures}
    taken = [k for k in taken if k not in failed]  # placeholders of label shards hold no label
    rows = index.find(taken)
    used = np.zeros(len(index), dtype=bool)
    used[rows[rows >= 0]] = True
    names = [u.rsplit("/", 1)[-1] for u in index.shard_urls]
    return [
        _failure(index.key(r), f"{names[int(index.shard[r])]}#{index.key(r)}", "label without an image")
        for r in np.flatnonzero(~used)
    ]


def _description(src: Any, labels: str, index: LabelIndex, settings: dict) -> dict:
    """Everything that decides the output bytes; its digest is the fingerprint (``plan.job_fingerprint``)."""
    from relabel_shards.pairing import key_digest
    from relabel_shards.plan import items_digest

    lab = index.section.get("shards") or index.split.get("filenames")
    return {
        "format_version": FORMAT_VERSION,
        "job": "join",
        "labels": labels,
        "label_shards": key_digest(json_bytes(x).decode() for x in lab or []),
        "images": src.describe(),
        "image_shards": key_digest(src.shard_urls),
        "items": items_digest(src.items),
        "settings": settings,
    }


# What a joined set keeps of its label set's section: the annotator and the map geometry.
_KEPT = (
    "annotator",
    "k",
    "height",
    "width",
    "num_classes",
    "class_names",
    "encoding",
    "labelmap_ext",
    "map_shapes",
    "layout",
)


def _project(stats: list, src: Any, index: LabelIndex, settings: dict) -> dict:
    proj = {k: index.section[k] for k in _KEPT if k in index.section}
    proj.update(
        {
            "labelmap_ext": LABELMAP_EXT,
            "source": src.describe(),
            "dataset_classes": list(src.classes) if src.classes is not None else None,
            "shard_size": settings["shard_size"],
            "joined_from": {
                "labels": index.url,
                "labels_kind": index.section.get("kind", "full"),
                "labels_num_samples": int(len(index)),
            },
        }
    )
    return proj

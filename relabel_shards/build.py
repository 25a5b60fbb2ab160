"""The batch job: read a source, run the annotator, write label-map shards (``relabel-shards build``).

Data flow for one rank (all ranks run the same call; see ``relabel_shards.writer`` for ranks and resume)::

    source items (sources.py)  ->  plan (plan.py): the items in a seeded global permutation (--no-shuffle:
      source order), shard i = ordered[i*shard_size:(i+1)*shard_size]; or input shard i (order kept)
      DataLoader workers: read bytes, decode, preprocess (annotator.preprocess), stack into chunks
      # a chunk: {"task": i, "entries": [sample or failure, ...], "images": [uint8 Tensor[n,3,H,W], ...],
      #           "end": bool}
      main thread: annotator(images) on the device (normalized there)  ->  values/indices [n,k,h,w] on the CPU
      writer thread: encode_label_map, append to shard i's temporary tar, commit at "end"  (writer.py)
    after this rank's shards: ShardJob.finalize writes _info.json once every shard exists

Each worker takes whole shards (worker w of W gets this rank's pending shards w, w+W, ...), so a shard's
samples arrive in order and are streamed into its tar without buffering the whole shard; a chunk never spans
two shards, so the batches the model sees (and so its outputs) do not depend on workers, ranks or resumes.

With ``keep_aspect`` images differ in size: a chunk holds one stacked tensor per distinct size, in order of
first appearance, and the annotator runs once per size (images of the same size still share a batch).

Throughput limit of the writer side: one thread encodes every label map; ``encode_label_map`` took about
0.7 ms per 5x15x15 record on this project's loaded 2-core CPU (so roughly 1,400 records/s per rank). That is
far above the paper's annotator on one GPU; a much faster annotator is writer-bound per rank (use more ranks).

Byte-identical resumes need deterministic inference for the same batch: true on the CPU; on CUDA cuDNN's
forward convolutions are deterministic with ``torch.backends.cudnn.benchmark`` off (the default), and
``torch.use_deterministic_algorithms(True)`` is the caller's switch for the rest. Batches do not depend on
workers, ranks or resumes, but do on ``batch_size``: keep it when resuming for identical bytes.

Input shards map one to one onto output shards (``shard_size`` does not apply): every member passes through
unchanged and ``key.rlm`` is appended. A sample that already holds an ``.rlm`` member gets the new one
instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from relabel_shards.diversity import shard_classes_entry
from relabel_shards.images import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels, check_size
from relabel_shards.plan import (
    FailureTally,
    check_not_all_failed,
    check_output,
    items_digest,
    job_fingerprint,
    order_info,
    plan_items,
)
from relabel_shards.shards import (
    FORMAT_VERSION,
    LABELMAP_EXT,
    ShardError,
    sample_members,
    split_member_name,
)
from relabel_shards.sources import (
    DuplicateKeyError,
    DuplicateMemberError,
    FileItem,
    Source,
    decode_image,
    image_member,
    iter_shard_samples,
    open_source,
    read_bytes,
)
from relabel_shards.storage import StorageError, named_errors
from relabel_shards.writer import ChunkSink, ShardJob, ShardStats

log = logging.getLogger(__name__)

ENCODINGS = ("compact", "lossless")

ProgressFn = Callable[[int, "int | None"], None]


@dataclass
class BuildSummary:
    """What one rank's :func:`build_shards` call did.

    Attributes:
        rank, world_size: this rank.
        num_shards: shards in the whole plan (all ranks).
        written: indices of the shards this call wrote.
        skipped: indices of this rank's shards that were already complete (resume).
        images: images annotated by this call.
        failures: inputs this call skipped (each ``{"key", "source", "reason"}``).
        info: the split written to ``_info.json``, or None when another rank still had shards to write.
    """

    rank: int
    world_size: int
    num_shards: int
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    images: int = 0
    failures: list[dict] = field(default_factory=list)
    info: dict | None = None


# ------------------------------------------------------------------------------------------- workers


def _failure(key: str, source: str, reason: str) -> dict:
    return {"key": key, "source": source, "reason": reason}


class _ChunkStream(IterableDataset):
    """Iterable dataset for the DataLoader: this rank's pending shards, decoded and preprocessed in chunks."""

    def __init__(
        self,
        tasks: list[tuple[int, Any]],
        preprocess: Callable,
        batch_size: int,
        storage_options: dict | None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.tasks = tasks
        self.preprocess = preprocess  # image -> uint8 Tensor[3, H, W]: 1/4 of float32 in shared memory
        self.batch_size = batch_size
        self.storage_options = storage_options
        self.max_image_pixels = max_image_pixels

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, payload in self.tasks[wid::nw]:
            if isinstance(payload, str):
                samples = self._shard_samples(payload)
            else:  # a shard's FileItems (made here, in the worker, from the plan's indices)
                samples = self._file_samples(list(payload))
            yield from self._chunks(index, samples)

    def _chunks(self, index: int, samples: Iterator[dict]) -> Iterator[dict]:
        entries: list[dict] = []
        tensors: list = []
        for entry in samples:
            tensor = entry.pop("tensor", None)
            if tensor is not None:
                tensors.append(tensor)
            entries.append(entry)
            if len(tensors) == self.batch_size:
                yield self._chunk(index, entries, tensors, end=False)
                entries, tensors = [], []
        yield self._chunk(index, entries, tensors, end=True)

    @staticmethod
    def _chunk(index: int, entries: list[dict], tensors: list, end: bool) -> dict:
        shapes: dict[tuple, int] = {}
        groups: list[list] = []
        rows = iter(tensors)
        for e in entries:
            if "reason" in e:
                continue
            t = next(rows)
            g = shapes.setdefault(tuple(t.shape), len(shapes))
            if g == len(groups):
                groups.append([])
            e["group"], e["row"] = g, len(groups[g])
            groups[g].append(t)
        images = [torch.stack(g) for g in groups]  # each (n, 3, H, W)
        return {"task": index, "entries": entries, "images": images, "end": end}

    def _decoded(
        self, key: str, source: str, data: bytes, meta: bytes | None = None
    ) -> tuple[Any, tuple[int, int]] | dict:
        try:
            img = decode_image(data, self.max_image_pixels)
            if meta is not None:  # an input shard's .json: the loader checks it exactly, so check it here
                check_size(img.size, _recorded_size(meta))
        except ValueError as e:
            return _failure(key, source, str(e))
        return self.preprocess(img), img.size

    def _file_samples(self, items: list[FileItem]) -> Iterator[dict]:
        for it in items:
            if it.error is not None:
                yield _failure(it.key, it.source, it.error)
                continue
            try:
                data = read_bytes(it.path, self.storage_options)
            except StorageError as e:  # the storage failed, not the file: stop the build, say why
                yield {**_failure(it.key, it.source, str(e)), "fatal": True, "storage": type(e).__name__}
                continue
            except OSError as e:
                yield _failure(it.key, it.source, f"cannot read file: {e.strerror or e}")
                continue
            dec = self._decoded(it.key, it.source, data)
            if isinstance(dec, dict):
                yield dec
                continue
            tensor, (w, h) = dec
            meta: dict[str, Any] = {"source": it.source, "width": w, "height": h}
            if it.class_name is not None:
                meta["class_name"] = it.class_name
            members = sample_members(
                it.key, image=data, image_ext=it.image_ext, label=it.label, meta=meta, labelmap=b""
            )[:-1]  # the label map is appended by the writer thread
            yield {
                "key": it.key,
                "members": members,
                "tensor": tensor,
                "size": (w, h),
                "label": it.label,
                "image": _bind(data, w, h),
            }

    def _shard_samples(self, url: str) -> Iterator[dict]:
        repeated: list[DuplicateMemberError] = []  # samples that repeat a member: failures, listed in order
        try:
            for key, members in iter_shard_samples(url, self.storage_options, on_duplicate=repeated.append):
                while repeated:
                    e = repeated.pop(0)
                    yield _failure(e.key, f"{url}#{e.key}", str(e))
                source = f"{url}#{key}"
                kept = [(n, d) for n, d in members if split_member_name(n)[1] != LABELMAP_EXT]
                img = image_member(kept)
                exts = {split_member_name(n)[1] for n, _ in kept}
                if img is None or "cls" not in exts:  # the loader needs both: fail here, not mid-training
                    names = ", ".join(n for n, _ in members)
                    what = "no image member" if img is None else "no .cls member (the class index)"
                    yield _failure(key, source, f"{what} (members: {names})")
                    continue
                meta = next((d for n, d in kept if split_member_name(n)[1] == "json"), None)
                dec = self._decoded(key, source, img[1], meta)
                if isinstance(dec, dict):
                    yield dec
                    continue
                tensor, size = dec
                yield {
                    "key": key,
                    "members": kept,
                    "tensor": tensor,
                    "size": size,
                    "label": _cls(kept),
                    "image": _bind(img[1], *size),
                }
        except DuplicateKeyError as e:
            yield {**_failure("", url, str(e)), "fatal": True}  # never a skip: keys must be unique
        except StorageError as e:  # the storage failed, not the shard: stop the build, say why
            yield {**_failure("", url, str(e)), "fatal": True, "storage": type(e).__name__}
        except (ShardError, OSError) as e:
            yield _failure("", url, f"input shard unreadable from here on: {e}")
        for e in repeated:
            yield _failure(e.key, f"{url}#{e.key}", str(e))


def _recorded_size(meta: bytes) -> tuple[Any, Any] | None:
    """``(width, height)`` from a sample's ``.json``, or None where it records none (or is not JSON)."""
    import json

    try:
        d = json.loads(meta)
    except (UnicodeDecodeError, ValueError):
        return None
    return (d.get("width"), d.get("height")) if isinstance(d, dict) else None


def _bind(data: bytes, width: int, height: int) -> tuple[int, bytes, int, int]:
    """What the record's image binding needs (``labelmap.ImageBinding``), computed in the worker."""
    return len(data), hashlib.sha256(data).digest(), width, height


def _cls(members: list[tuple[str, bytes]]) -> int | None:
    """The class index of an input sample's ``.cls`` member, None when it has none or it is not an integer."""
    for name, data in members:
        if split_member_name(name)[1] == "cls":
            try:
                return int(data.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                return None
    return None


# ---------------------------------------------------------------------------------------------- plan


def _plan(src: Source, shard_size: int, shuffle: bool = True, shuffle_seed: int = 0) -> list[Any]:
    """Payload per output shard: a list of FileItems (folder/list sources, in the written order) or an
    input shard URL (input shards keep their order: output shard i pairs with input shard i)."""
    if src.kind == "shards":
        return list(src.shard_urls)
    return plan_items(src.items, shard_size, shuffle, shuffle_seed)


def _input_shard_total(src: Source, todo: list[int]) -> int | None:
    """Samples in the input shards still to do, from the inputs' own ``_info.json`` (timm layout) if any."""
    from relabel_shards.shards import read_info

    def where(url: str) -> tuple[str, str]:
        return (url.rsplit("/", 1)[0], url.rsplit("/", 1)[1]) if "/" in url else (".", url)

    lengths: dict[tuple[str, str], int] = {}
    for d in sorted({where(u)[0] for u in src.shard_urls}):
        try:
            info = read_info(d, src.storage_options)
        except (FileNotFoundError, ShardError, OSError, ValueError):
            return None
        for split in info.get("splits", {}).values():
            for f, n in zip(split.get("filenames", []), split.get("shard_lengths", []), strict=False):
                lengths[(d, f)] = int(n)
    try:
        return sum(lengths[where(src.shard_urls[i])] for i in todo)
    except KeyError:
        return None


def _job_description(src: Source, plan_settings: dict, annotator_config: dict) -> dict:
    """Everything that decides the output bytes; its digest is the fingerprint (``plan.job_fingerprint``)."""
    if src.kind == "shards":
        import hashlib

        items = hashlib.sha256("".join(u + "\n" for u in src.shard_urls).encode()).hexdigest()
    else:
        items = items_digest(src.items)
    return {
        "format_version": FORMAT_VERSION,
        "source": src.describe(),
        "items": items,
        "settings": plan_settings,
        "annotator": annotator_config,
    }


def _class_mismatch(src: Source, ann) -> str | None:
    """Why the dataset's classes (``.cls``) and the annotator's (label maps) differ, or None if they agree."""
    num = ann.num_classes
    if src.classes is not None:
        if len(src.classes) != num:
            return f"the source has {len(src.classes)} classes, the annotator {num}"
        names = list(src.classes)
        if ann.class_names is not None and names == list(ann.class_names):
            return None
        if num == 1000:
            try:
                from timm.data import ImageNetInfo

                if names == list(ImageNetInfo("imagenet-1k").label_names()):
                    return None  # ImageNet's synset folders (n01440764, ...) in timm's order
            except Exception:  # noqa: BLE001 - names are a check, not a requirement
                pass
        if ann.class_names is None:
            return None  # nothing to compare the names with
        i = next((j for j, (a, b) in enumerate(zip(names, ann.class_names, strict=True)) if a != b), 0)
        return (f"class {i} is {names[i]!r} in the source and {str(ann.class_names[i])!r} for the annotator "
                "(the names differ)")
    if src.kind != "shards":
        labels = getattr(src.items, "labels", None)
        top = int(labels.max()) if labels is not None else max((it.label for it in src.items), default=-1)
        if top >= num:
            return f"the source's labels go up to {top}, the annotator has {num} classes"
    return None


def _check_args(
    shard_size: int, batch_size: int, num_workers: int, encoding: str, split: str, prefix: str | None
) -> str:
    for name, value, low in (
        ("shard_size", shard_size, 1),
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if not isinstance(split, str) or not split or "/" in split:
        raise ValueError(f"split must be a non-empty name without '/', got {split!r}")
    prefix = split if prefix is None else prefix
    if not isinstance(prefix, str) or not prefix or "/" in prefix or prefix.startswith("."):
        raise ValueError(
            f"prefix must be a non-empty file name prefix without '/' or a leading '.', got {prefix!r}"
        )
    return prefix


def _default_device(device: str | None) -> str | None:
    """torchrun's LOCAL_RANK picks the GPU when no device is named."""
    if device is not None:
        return device
    local = os.environ.get("LOCAL_RANK")
    if local is not None and torch.cuda.is_available():
        return f"cuda:{int(local)}"
    return None


# --------------------------------------------------------------------------------------------- build


def build_shards(
    source: str | os.PathLike | list[str],
    out: str | os.PathLike,
    *,
    model: str | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    topk: int = 5,
    input_size: int | tuple[int, int] | None = None,
    keep_aspect: bool = False,
    encoding: str = "compact",
    shard_size: int = 1000,
    prefix: str | None = None,
    split: str = "train",
    batch_size: int = 64,
    num_workers: int = 4,
    device: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    strict: bool = False,
    storage_options: dict | None = None,
    progress: ProgressFn | None = None,
    seed: int = 0,
    name: str | None = None,
    resume_check: str = "sha256",
    shuffle: bool = True,
    shuffle_seed: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    key_from: str = "stem",
    labels_only: bool = False,
    overwrite: bool = False,
    check_classes: bool = True,
) -> BuildSummary:
    """Annotate every image of ``source`` and write WebDataset shards with label maps to ``out``.

    Args:
        source: an ImageFolder directory, a ``path<TAB>label`` list file, or WebDataset shards (path, brace
            pattern, URL, or a list of them); see ``relabel_shards.sources``.
        out: output directory or ``s3://`` / ``gs://`` URL prefix.
        model, pretrained, checkpoint, topk, input_size, keep_aspect: the annotator
            (``relabel_shards.annotator.create_annotator``); ``model=None`` is the embedded
            EfficientNet-Lite0.
        encoding: the label-map record encoding, ``"compact"`` or ``"lossless"``
            (``relabel_shards.labelmap``).
        shard_size: samples per shard (folder/list sources; shard sources keep their input sharding).
        prefix: shard name prefix (``{prefix}-{index:06d}.tar``); defaults to ``split``.
        split: the split's name in ``_info.json``.
        batch_size: images per annotator call.
        num_workers: DataLoader worker processes that read, decode and resize (0: in this process).
        device: where the annotator runs; None: ``cuda:$LOCAL_RANK`` under torchrun, else CUDA if any,
            else CPU.
        rank, world_size: this rank; None: torch.distributed, else ``RANK``/``WORLD_SIZE``, else 0 of 1.
        strict: a bad input is an error (naming the file) instead of a skipped failure listed in
            ``_info.json``.
        storage_options: fsspec options for ``source`` and ``out`` URLs.
        progress: called as ``progress(images_done, images_total)`` after each batch (total None when unknown,
            as for shard sources).
        seed: seeds the weights of a random-weight model (tests), so every rank and rerun gets the same ones.
        name: the dataset name in ``_info.json`` (default: the last component of ``out``).
        resume_check: ``"sha256"`` (read each complete shard once before skipping it) or ``"size"``
            (``relabel_shards.writer.ShardJob``).
        shuffle: write a folder's or list's images in a seeded global permutation, so that every shard holds
            a fair sample of the classes (a loader that streams shards cannot mix classes it is not given);
            False keeps the source order. Input shards always keep theirs.
        shuffle_seed: the permutation's seed (``relabel_shards.plan.permutation``); recorded in
            ``_info.json``'s ``order``.
        max_image_pixels: an image with more pixels is a failure naming the file (PIL's decompression-bomb
            guard, made one per-file error); 0 or None: no limit.
        key_from: sample keys from the file name (``"stem"``) or the relative path (``"path"``, for
            layouts whose file names repeat across classes); see ``relabel_shards.sources``.
        labels_only: write label shards (one ``key.rlm`` per sample, no image) instead of full shards. From
            image shards, label shard i holds exactly the keys of input shard i in order (an image that
            fails keeps its place with an empty ``key.rlm`` and is listed in the failures) and
            ``_info.json`` names the image shards it pairs with (``relabel_shards.pairing``).
        overwrite: write into a folder that holds a dataset this project did not write (refused otherwise;
            ``relabel_shards.writer.ShardJob.check_output``).
        check_classes: warn when the source's classes (``.cls``) differ from the annotator's (count, names,
            or labels out of range); False where ``.cls`` only describes the images (the demo's photos).

    Returns:
        BuildSummary of this rank's work; ``info`` is the split written to ``_info.json`` by this call,
        if any.

    Raises:
        FileNotFoundError: the source or a file it lists does not exist.
        ValueError: an empty source, duplicate keys, an unknown model, a bad argument, a bad input with
            ``strict``, an output that is a file or holds shards of a different build (the message says
            which settings differ).
        AllInputsFailedError: every input failed (a ``ValueError``; the message counts them by kind).
    """
    prefix = _check_args(shard_size, batch_size, num_workers, encoding, split, prefix)
    check_max_pixels(max_image_pixels, "max_image_pixels")
    out = os.fspath(out)
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "::".join(map(str, source))
    with named_errors(str(where)):
        src = open_source(source, storage_options, key_from=key_from)
    from relabel_shards.annotator import create_annotator
    from relabel_shards.labelmap import TAR_FIT_STEP, encode_label_map

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ann = create_annotator(
            model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            topk=topk,
            input_size=input_size,
            device=_default_device(device),
            keep_aspect=keep_aspect,
        )
    mismatch = _class_mismatch(src, ann) if check_classes else None
    if mismatch is not None:
        log.warning("%s: .cls holds the source's class index, while the label maps use the annotator's "
                    "classes; pooled targets and .cls then name different classes", mismatch)
    plan = _plan(src, shard_size, shuffle, shuffle_seed)
    settings = {
        "encoding": encoding,
        "shard_size": shard_size if src.kind != "shards" else None,
        "prefix": prefix,
        "split": split,
        "seed": seed if ann.weights_sha256 is None else None,
        "order": order_info(shuffle, shuffle_seed, src.kind),
        "tar_fit_step": TAR_FIT_STEP if encoding == "compact" else None,
    }
    if labels_only:
        settings["labels_only"] = True  # only then: full builds keep their fingerprint
    ann_config = ann.config()
    description = _job_description(src, settings, ann_config)
    fingerprint = job_fingerprint(description)
    check_output(out, prefix, fingerprint, description, storage_options)
    job = ShardJob(
        out,
        prefix=prefix,
        num_shards=len(plan),
        fingerprint=fingerprint,
        rank=rank,
        world_size=world_size,
        storage_options=storage_options,
        resume_check=resume_check,
        overwrite=overwrite,
    )
    todo, summary = job.start(BuildSummary)
    total = _input_shard_total(src, todo) if src.kind == "shards" else sum(len(plan[i]) for i in todo)
    if todo:
        _run(
            job,
            [(i, plan[i]) for i in todo],
            ann,
            encode_label_map,
            encoding,
            batch_size,
            num_workers,
            strict,
            storage_options,
            progress,
            total,
            summary,
            description,
            max_image_pixels,
            labels_only=labels_only,
            placeholders=labels_only and src.kind == "shards",
        )
    summary.info = job.finalize(
        split, lambda stats: _project(stats, src, ann, ann_config, encoding, settings), name=name
    )
    check_not_all_failed("build", summary.images, summary.failures, summary.info, out)
    return summary


def _run(
    job: ShardJob,
    tasks: list[tuple[int, Any]],
    ann,
    encode_label_map: Callable,
    encoding: str,
    batch_size: int,
    num_workers: int,
    strict: bool,
    storage_options: dict | None,
    progress: ProgressFn | None,
    total: int | None,
    summary: BuildSummary,
    description: dict,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    labels_only: bool = False,
    placeholders: bool = False,
) -> None:
    from relabel_shards.labelmap import TAR_FIT_STEP, ImageBinding

    fit = TAR_FIT_STEP if encoding == "compact" else None  # a coarser step where it saves a tar block

    stream = _ChunkStream(tasks, ann.preprocess, batch_size, storage_options, max_image_pixels)
    cuda = getattr(ann, "device", None) is not None and torch.device(ann.device).type == "cuda"
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=min(num_workers, len(tasks)),
        pin_memory=cuda,
        prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context="fork" if num_workers > 0 and os.name == "posix" else None,
    )
    num_classes = ann.num_classes
    shapes: dict[int, set] = {}
    classes: dict[int, Counter] = {}
    tally = FailureTally("build")

    def fill(shard, chunk: dict, outputs: list) -> None:  # runs in the writer thread, chunks in order
        index = chunk["task"]
        for e in chunk["entries"]:
            if "reason" in e:
                shard.fail(_failure(e["key"], e["source"], e["reason"]))
                if placeholders and e["key"]:  # the key keeps its place in the label shard: no label
                    shard.add(e["key"], [(f"{e['key']}.{LABELMAP_EXT}", b"")])
                continue
            values, indices = outputs[e["group"]]
            v, i = values[e["row"]].numpy(), indices[e["row"]].numpy()  # (k, h, w)
            shapes.setdefault(index, set()).add(tuple(v.shape[1:]))
            try:
                record = encode_label_map(
                    v, i, num_classes, encoding=encoding, image=ImageBinding(*e["image"]), tar_fit_step=fit
                )
            except ValueError as err:  # e.g. non-finite logits from a broken checkpoint: name the sample
                raise ValueError(
                    f"{job.filename(index)} key {e['key']}: cannot encode its label map: {err}"
                ) from err
            member = (f"{e['key']}.{LABELMAP_EXT}", record)
            shard.add(e["key"], [member] if labels_only else [*e["members"], member])
            if e.get("label") is not None:
                classes.setdefault(index, Counter())[e["label"]] += 1

    def extra(index: int) -> dict:
        return {
            "map_shapes": sorted(list(s) for s in shapes.pop(index, ())),
            "classes": shard_classes_entry(classes.pop(index, Counter()), top=1 << 30),
            "job": description,
        }

    chunks = iter(loader)  # forks the workers before the writer thread exists (no lock held across a fork)
    done = 0
    with ChunkSink(job, fill, extra) as sink:
        if progress is not None:
            progress(0, total)
        for chunk in chunks:
            failed = tally.take(chunk, strict=strict)
            summary.failures.extend(_failure(f["key"], f["source"], f["reason"]) for f in failed)
            outputs = [ann(images) for images in chunk["images"]]
            sink.submit(chunk, outputs)
            done += len(chunk["entries"])  # images and failures: the total counts both
            summary.images += sum(len(g) for g in chunk["images"])
            if progress is not None:
                progress(done, total)
    tally.log_total()


def _top_entry(stats: ShardStats) -> dict:
    """A shard's ``shard_classes`` entry for ``_info.json`` from the full histogram in its sidecar."""
    full = (stats.extra.get("classes") or {}).get("top") or {}
    return shard_classes_entry({int(c): int(n) for c, n in full.items()})


def _project(
    stats: list[ShardStats], src: Source, ann, ann_config: dict, encoding: str, settings: dict
) -> dict:
    """Our section of ``_info.json``'s split (the writer adds shards, failures and the format version)."""
    shapes = sorted({tuple(s) for st in stats for s in st.extra.get("map_shapes", [])})
    height, width = shapes[0] if len(shapes) == 1 else (None, None)
    project: dict[str, Any] = {
        "annotator": ann_config,
        "k": ann.topk,
        "height": height,
        "width": width,
        "num_classes": ann.num_classes,
        "class_names": ann.class_names,
        "encoding": encoding,
        "labelmap_ext": LABELMAP_EXT,
        "source": src.describe(),
        "dataset_classes": list(src.classes) if src.classes is not None else None,
        "shard_size": settings["shard_size"],
        "seed": settings["seed"],
        "order": settings["order"],
        "shard_classes": [_top_entry(st) for st in stats],
    }
    if len(shapes) > 1:
        project["map_shapes"] = [list(s) for s in shapes]
    if settings.get("labels_only"):
        project.update(label_set_fields(stats, src.shard_urls if src.kind == "shards" else None))
    return project


def label_set_fields(stats: list[ShardStats], image_shards: Sequence[str] | None) -> dict:
    """``kind`` and ``pairs_with`` of a label set whose shard i was made from ``image_shards[i]`` (None: from
    an image folder, paired with nothing yet)."""
    from relabel_shards.pairing import KIND_LABELS, key_digest, pairs_with_entry

    pairs = None
    if image_shards is not None:
        pairs = pairs_with_entry(
            [u.rsplit("/", 1)[-1] for u in image_shards],
            [st.record.num_samples for st in stats],
            [key_digest(st.keys) for st in stats],
        )
    return {"kind": KIND_LABELS, "pairs_with": pairs}

"""Import the official ReLabel release into label-map shards (``relabel-shards convert``).

Data flow for one rank (all ranks run the same call; ``relabel_shards.writer`` does ranks and resume)::

    IMAGES (ImageFolder, sources.py) + RELABEL_ROOT (*.pt, official_maps.py), paired by relative path
      plan: the items in a seeded global permutation (plan.py; --no-shuffle: path order), shard
        i = ordered[i*shard_size:(i+1)*shard_size] (+ its share of the maps without an image)
      DataLoader workers (CPU): read the JPEG, check it decodes, torch.load(weights_only=True) the map, check
        it, lay it out (hw | wh), encode the record; a chunk of whole samples or failures per yield
      # a chunk: {"task": i, "entries": [{"key", "members"} or {"key", "source", "reason", ...}],
      #           "items": number of entries that are images of the plan, "end": bool}
      writer thread: append to shard i's temporary tar, commit at "end"
    after this rank's shards: ShardJob.finalize writes _info.json once every shard exists

Shards, sidecars and ``_info.json`` are those of ``build`` (same members, same resume, same ranks); the
annotator section says the maps came from the official release and in which layout they were stored.
Failures (``_info.json``'s ``failures``) name the file at fault in ``source``, relative to its root: the image
(bad image, image without a map), or the map (bad map, map without an image).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from relabel_shards.build import BuildSummary, ProgressFn, _check_args, _top_entry
from relabel_shards.diversity import shard_classes_entry
from relabel_shards.official_maps import (
    LAYOUTS,
    MAP_EXT,
    NUM_CLASSES,
    OFFICIAL_SHAPE,
    OfficialMapError,
    load_official_map,
    map_relpath,
    read_map_file,
    split_official_map,
)
from relabel_shards.plan import (
    AllInputsFailedError,
    FailureTally,
    check_not_all_failed,
    check_output,
    cut,
    items_digest,
    job_fingerprint,
    order_info,
    ordered,
)
from relabel_shards.shards import (
    FORMAT_VERSION,
    LABELMAP_EXT,
    join,
    key_from_path,
    sample_members,
    url_to_fs,
)
from relabel_shards.sources import FileItem, Source, open_source, read_bytes
from relabel_shards.storage import StorageError, named_errors
from relabel_shards.writer import ChunkSink, ShardJob, ShardStats

log = logging.getLogger(__name__)

OFFICIAL_MODEL = "relabel_imagenet (official release)"
OFFICIAL_URL = "https://github.com/naver-ai/relabel_imagenet"
CHUNK = 32  # samples per worker -> main-process hand-off (bounded memory, a smooth progress bar)

# ConvertSummary is BuildSummary: same fields, same meaning ("images" = samples written by this call).
ConvertSummary = BuildSummary


def _failure(key: str, source: str, reason: str, **extra: Any) -> dict:
    return {"key": key, "source": source, "reason": reason, **extra}


# ---------------------------------------------------------------------------------------------- inputs


def _map_files(relabel_root: str, storage_options: dict | None) -> set[str]:
    """Relative paths of the ``.pt`` files under the release root (hidden files skipped; others logged)."""
    fs, root = url_to_fs(relabel_root, storage_options)
    if not fs.isdir(root):
        raise FileNotFoundError(f"relabel_root {relabel_root!r} is not a directory")
    root = root.rstrip("/")
    maps: set[str] = set()
    other = 0
    for p in fs.find(root):
        rel = p[len(root) + 1:] if p.startswith(root + "/") else posixpath.relpath(p, root)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if rel.endswith(MAP_EXT):
            maps.add(rel)
        else:
            other += 1
    if other:
        log.info("relabel_root %s: ignoring %d files that are not %s label maps", relabel_root, other,
                 MAP_EXT)
    if not maps:
        raise ValueError(f"relabel_root {relabel_root!r} holds no {MAP_EXT} label maps")
    return maps


def _check_image(data: bytes) -> tuple[int, int]:
    """(width, height) of image bytes after decoding them (JPEGs at 1/8 scale: every byte is still parsed).

    Raises:
        ValueError: empty, not an image, or not decodable (truncated, corrupt); the message says which.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
            return size
    except UnidentifiedImageError:
        raise ValueError("not a decodable image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image: {e}") from None


def _upright(data: bytes) -> tuple[int, int, int]:
    """(width, height, orientation) of image bytes after their EXIF orientation, from the header only: the
    project's one image rule (``images.open_image``), without the pixel limit (the release's images are what
    they are)."""
    from relabel_shards.images import open_image

    im = open_image(data, max_pixels=None)
    return im.width, im.height, im.orientation


def _fit(encoding: str) -> float | None:
    """``encode_label_map``'s ``tar_fit_step`` for an encoding: a coarser compact step where it saves a tar
    block (``labelmap.TAR_FIT_STEP``)."""
    from relabel_shards.labelmap import TAR_FIT_STEP

    return TAR_FIT_STEP if encoding == "compact" else None


def _oriented(maps: tuple[Any, Any], orientation: int) -> tuple[Any, Any]:
    """The official (values, indices) turned upright with their image.

    The official maps were made from images opened without their EXIF orientation (torchvision's
    ImageFolder loader), so they describe the stored frame; the loader crops the upright frame, and a map
    cell grid turns exactly with its image (``images.orient_grid``).
    """
    import numpy as np

    from relabel_shards.images import orient_grid

    return tuple(np.ascontiguousarray(orient_grid(a, orientation)) for a in maps)


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header only (``check_images=False``)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except UnidentifiedImageError:
        raise ValueError("not a decodable image (PIL cannot identify it)") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image header: {e}") from None


# --------------------------------------------------------------------------------------------- workers


def _identity(x: Any) -> Any:
    return x


class _ConvertStream(IterableDataset):
    """This rank's pending shards as chunks of finished samples (members incl. the record) and failures."""

    def __init__(self, tasks: list[tuple[int, list[FileItem], list[dict]]], relabel_root: str,
                 maps: frozenset, layout: str, encoding: str, check_images: bool,
                 storage_options: dict | None):
        self.tasks = tasks
        self.relabel_root = relabel_root
        self.maps = maps
        self.layout = layout
        self.encoding = encoding
        self.check_images = check_images
        self.storage_options = storage_options

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, items, orphans in self.tasks[wid::nw]:
            entries: list[dict] = []
            for it in items:
                entries.append(self._sample(it))
                if len(entries) == CHUNK:
                    yield {"task": index, "entries": entries, "items": len(entries), "end": False}
                    entries = []
            n_items = len(entries)
            entries.extend(orphans)  # failures of maps without an image, made by _pair
            yield {"task": index, "entries": entries, "items": n_items, "end": True}

    def _sample(self, it: FileItem) -> dict:
        from relabel_shards.labelmap import ImageBinding, encode_label_map

        if it.error is not None:
            return _failure(it.key, it.source, it.error)
        mrel = map_relpath(it.source)
        if mrel not in self.maps:
            return _failure(it.key, it.source, f"image without a label map (no {mrel} in the release)")
        try:
            image = read_bytes(it.path, self.storage_options)
        except StorageError as e:  # the storage failed, not the file: stop, say why
            return {**_failure(it.key, it.source, str(e)), "fatal": True, "storage": type(e).__name__}
        except OSError as e:
            return _failure(it.key, it.source, f"cannot read file: {e.strerror or e}")
        try:
            if self.check_images:
                _check_image(image)
            else:
                _image_size(image)
            w, h, orientation = _upright(image)
        except ValueError as e:
            return _failure(it.key, it.source, str(e))
        try:
            raw = read_map_file(join(self.relabel_root, mrel), self.storage_options)  # big: refused unread
            t = load_official_map(raw)
        except StorageError as e:
            return {**_failure(it.key, mrel, str(e)), "fatal": True, "storage": type(e).__name__}
        except OSError as e:
            return _failure(it.key, mrel, f"cannot read label map: {e.strerror or e}", image=it.source)
        except OfficialMapError as e:
            return _failure(it.key, mrel, f"bad label map: {e}", image=it.source)
        values, indices = _oriented(split_official_map(t, self.layout), orientation)  # (k, rows, cols)
        record = encode_label_map(values, indices, NUM_CLASSES, encoding=self.encoding,
                                  image=ImageBinding.of(image, w, h), tar_fit_step=_fit(self.encoding))
        meta: dict[str, Any] = {"source": it.source, "width": w, "height": h, "labelmap_source": mrel}
        if it.class_name is not None:
            meta["class_name"] = it.class_name
        members = sample_members(it.key, image=image, image_ext=it.image_ext, label=it.label, meta=meta,
                                 labelmap=record)
        return {"key": it.key, "members": members, "label": it.label}


# ------------------------------------------------------------------------------------------------ plan


def _pair(src: Source, maps: set[str]) -> tuple[list[FileItem], list[dict], int]:
    """(images without a map, failures of maps without an image, number of such maps), in source/path order.

    Maps of a class folder the image folder lacks altogether are one failure for the folder (with their
    count), so converting a subset of ImageNet against the whole release lists 900 folders, not 1.1M files.
    """
    claimed = {map_relpath(it.source) for it in src.items}
    missing = [it for it in src.items if it.error is None and map_relpath(it.source) not in maps]
    classes = set(src.classes or ())
    orphans: list[dict] = []
    folders: dict[str, int] = {}
    for m in sorted(maps - claimed):
        top = m.split("/", 1)[0] if "/" in m else None
        if top is not None and top not in classes:
            folders[top] = folders.get(top, 0) + 1
        else:
            orphans.append(_failure(key_from_path(m), m, "label map without an image (no image "
                                    f"{posixpath.splitext(m)[0]}.* in the image folder)"))
    orphans += [_failure(key_from_path(d), f"{d}/", f"{n} label maps without an image (the image folder has "
                                                     f"no class folder {d})") for d, n in folders.items()]
    return missing, sorted(orphans, key=lambda f: f["source"]), len(maps - claimed)


def _assign_orphans(plan: list[list[FileItem]], orphans: list[dict]) -> list[list[dict]]:
    """The maps without an image (failures, in path order) spread evenly over the shards, in order."""
    out: list[list[dict]] = [[] for _ in plan]
    for j, f in enumerate(orphans):
        out[j * len(plan) // len(orphans)].append(f)
    return out


def _job_description(src: Source, relabel_root: str, maps: set[str], settings: dict) -> dict:
    """Everything that decides the output bytes; its digest is the fingerprint (``plan.job_fingerprint``)."""
    import hashlib

    hm = hashlib.sha256("\n".join(sorted(maps)).encode())
    return {"format_version": FORMAT_VERSION, "job": "convert", "source": src.describe(),
            "relabel_root": relabel_root, "items": items_digest(src.items), "maps": hm.hexdigest(),
            "num_maps": len(maps), "settings": settings}


def _nothing_paired(src: Source, maps: set[str], relabel_root: str, images: str) -> str:
    """Why no image found its map, with a guess at the cause (a root one level too high or too low)."""
    rels = [map_relpath(it.source) for it in src.items if it.error is None]
    heads = {m.split("/", 1)[0] for m in maps if "/" in m}
    hint = ""
    inner = {m.split("/", 1)[1] for m in maps if "/" in m}
    if any(r in inner for r in rels[:1000]):
        hint = (f" RELABEL_ROOT looks one level too high: the maps sit under "
                f"{join(relabel_root, sorted(heads)[0])}/")
    elif any("/" in r and r.split("/", 1)[1] in maps for r in rels[:1000]):
        hint = " RELABEL_ROOT looks one level too low: give the folder that holds the class folders."
    example = rels[0] if rels else "?"
    return (f"no image of {images} has a label map in {relabel_root} (e.g. no {example} there; "
            f"{len(rels):,} images, {len(maps):,} maps, paired by relative path).{hint}")


def _class_names() -> list[str] | None:
    try:
        from timm.data import ImageNetInfo

        names = ImageNetInfo("imagenet-1k").label_descriptions()
    except Exception:  # noqa: BLE001 - names are a convenience; the shards do not depend on them
        return None
    return list(names) if len(names) == NUM_CLASSES else None


# --------------------------------------------------------------------------------------------- convert


def convert_official(
    images: str | os.PathLike,
    relabel_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layout: str = "hw",
    encoding: str = "compact",
    shard_size: int = 1000,
    prefix: str | None = None,
    split: str = "train",
    num_workers: int = 4,
    rank: int | None = None,
    world_size: int | None = None,
    strict: bool = False,
    check_images: bool = True,
    storage_options: dict | None = None,
    progress: ProgressFn | None = None,
    name: str | None = None,
    shuffle: bool = True,
    shuffle_seed: int = 0,
    overwrite: bool = False,
) -> ConvertSummary:
    """Pair each image of an ImageFolder with its official ReLabel map and write label-map shards to ``out``.

    Args:
        images: the ImageNet train folder (ImageFolder layout: ``class/image.JPEG``), local or fsspec URL.
        relabel_root: the extracted release (``class/image.pt``, float32 ``[2, 5, 15, 15]`` each).
        out: output directory or ``s3://`` / ``gs://`` URL prefix.
        layout: ``"hw"`` stores each map's last two dims as (rows, cols) unchanged: ``label_pooling(...,
            swap_xy=True)`` then reproduces the official targets exactly. ``"wh"`` transposes them, so that
            correct boxes (``swap_xy=False``) reproduce the official targets. Recorded in ``_info.json``.
        encoding: the record encoding, ``"compact"`` (pooled targets within 2e-3) or ``"lossless"`` (float32).
        shard_size: samples per shard.
        prefix: shard name prefix (``{prefix}-{index:06d}.tar``); defaults to ``split``.
        split: the split's name in ``_info.json``.
        num_workers: worker processes that read, check and encode (0: in this process).
        rank, world_size: this rank; None: torch.distributed, else ``RANK``/``WORLD_SIZE``, else 0 of 1.
        strict: a bad image or map, an image without a map or a map without an image is an error (naming the
            file) instead of a skipped failure listed in ``_info.json``.
        check_images: decode every image (JPEGs at 1/8 scale) so broken files fail here, not in training;
            False reads only the header for the width and height.
        storage_options: fsspec options for the URLs.
        progress: called as ``progress(images_done, images_total)`` after each chunk of samples.
        name: the dataset name in ``_info.json`` (default: the last component of ``out``).
        shuffle: write the images in a seeded global permutation, so that every shard holds a fair sample
            of the classes; False keeps the folder's path order (class-sorted shards).
        shuffle_seed: the permutation's seed (``relabel_shards.plan.permutation``).
        overwrite: write into a folder that holds a dataset this project did not write (refused otherwise).

    Returns:
        ConvertSummary (``BuildSummary``) of this rank's work; ``info`` is the split written to ``_info.json``
        by this call, if any.

    Raises:
        FileNotFoundError: ``images`` or ``relabel_root`` does not exist.
        ValueError: a bad argument, ``images`` not an ImageFolder, no maps, duplicate keys, a bad input with
            ``strict``, an output that is a file or holds shards of a different job (saying what differs).
        AllInputsFailedError: no image has a map (e.g. a release root one level too high: said so), or every
            input failed; a ``ValueError``.
    """
    prefix = _check_args(shard_size, 1, num_workers, encoding, split, prefix)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    out, relabel_root = os.fspath(out), os.fspath(relabel_root)
    with named_errors(str(images)):
        src = open_source(images, storage_options)
    if src.kind != "folder":
        raise ValueError(f"images must be an ImageFolder directory (class/image files), got a {src.kind} "
                         f"source: {src.url!r}")
    # the pairing walks the items several times: make the FileItems once (ImageNet-1k: 1.28M, ~0.5 GB)
    src = dataclasses.replace(src, items=tuple(src.items))
    if src.classes is not None and len(src.classes) != NUM_CLASSES:
        log.warning("images has %d class folders, not %d: .cls holds the folder's index, while the label "
                    "maps use ImageNet-1k's class indices", len(src.classes), NUM_CLASSES)
    with named_errors(relabel_root):
        maps = _map_files(relabel_root, storage_options)
    missing, orphans, n_orphans = _pair(src, maps)
    if missing and len(missing) == sum(it.error is None for it in src.items):
        raise AllInputsFailedError(_nothing_paired(src, maps, relabel_root, os.fspath(images)))
    if strict and (missing or orphans):
        what = (f"{missing[0].source}: image without a label map (no {map_relpath(missing[0].source)} in the "
                "release)" if missing else f"{orphans[0]['source']}: {orphans[0]['reason']}")
        raise ValueError(f"{what} (strict: {len(missing)} images without a map, {n_orphans} maps without "
                         "an image)")
    plan = cut(ordered(src.items, shuffle, shuffle_seed), shard_size)
    n = len(plan)
    plan_orphans = _assign_orphans(plan, orphans)
    settings = {"layout": layout, "encoding": encoding, "shard_size": shard_size, "prefix": prefix,
                "split": split, "check_images": bool(check_images),
                "order": order_info(shuffle, shuffle_seed, src.kind), "tar_fit_step": _fit(encoding)}
    description = _job_description(src, relabel_root, maps, settings)
    fingerprint = job_fingerprint(description)
    check_output(out, prefix, fingerprint, description, storage_options)
    job = ShardJob(out, prefix=prefix, num_shards=n, fingerprint=fingerprint, rank=rank,
                   world_size=world_size, storage_options=storage_options, overwrite=overwrite)
    todo, summary = job.start(ConvertSummary)
    if todo:
        stream = _ConvertStream([(i, plan[i], plan_orphans[i]) for i in todo], relabel_root, frozenset(maps),
                                layout, encoding, bool(check_images), storage_options)
        total = sum(len(plan[i]) for i in todo)
        _run(job, stream, min(num_workers, len(todo)), strict, progress, total, summary, description)
    summary.info = job.finalize(split, lambda stats: _project(stats, src, relabel_root, layout, encoding,
                                                              settings), name=name)
    check_not_all_failed("convert", summary.images, summary.failures, summary.info, out)
    return summary


def _run(job: ShardJob, stream: _ConvertStream, num_workers: int, strict: bool, progress: ProgressFn | None,
         total: int, summary: ConvertSummary, description: dict) -> None:
    loader = DataLoader(stream, batch_size=None, collate_fn=_identity, num_workers=num_workers,
                        prefetch_factor=4 if num_workers > 0 else None,
                        multiprocessing_context="fork" if num_workers > 0 and os.name == "posix" else None)

    classes: dict[int, Counter] = {}
    tally = FailureTally("conversion")

    def fill(shard, chunk: dict) -> None:  # runs in the writer thread, chunks in order
        for e in chunk["entries"]:
            if "reason" in e:
                shard.fail(e)
            else:
                shard.add(e["key"], e["members"])
                classes.setdefault(chunk["task"], Counter())[e["label"]] += 1

    def extra(index: int) -> dict:
        return {"map_shapes": [list(OFFICIAL_SHAPE[2:])], "job": description,
                "classes": shard_classes_entry(classes.pop(index, Counter()), top=1 << 30)}

    chunks = iter(loader)  # forks the workers before the writer thread exists (no lock held across a fork)
    done = 0
    with ChunkSink(job, fill, extra) as sink:
        if progress is not None:
            progress(0, total)
        for chunk in chunks:
            failed = tally.take(chunk, strict=strict)
            summary.failures.extend(failed)
            sink.submit(chunk)
            summary.images += len(chunk["entries"]) - len(failed)
            done += chunk["items"]  # images of the plan; maps without an image are not counted in the total
            if progress is not None:
                progress(done, total)
    tally.log_total()


def _project(stats: list[ShardStats], src: Source, relabel_root: str, layout: str, encoding: str,
             settings: dict) -> dict:
    """Our section of ``_info.json``'s split (the writer adds shards, failures and the format version)."""
    k, h, w = OFFICIAL_SHAPE[1:]
    return {
        "annotator": {
            "model": OFFICIAL_MODEL,
            "url": OFFICIAL_URL,
            "release_root": relabel_root,
            "layout": layout,
            "swap_xy_reproduces_official": layout == "hw",
            "num_classes": NUM_CLASSES,
            "topk": k,
        },
        "layout": layout,
        "k": k,
        "height": h if layout == "hw" else w,
        "width": w if layout == "hw" else h,
        "num_classes": NUM_CLASSES,
        "class_names": _class_names(),
        "encoding": encoding,
        "labelmap_ext": LABELMAP_EXT,
        "source": src.describe(),
        "dataset_classes": list(src.classes) if src.classes is not None else None,
        "shard_size": settings["shard_size"],
        "check_images": settings["check_images"],
        "order": settings["order"],
        "shard_classes": [_top_entry(st) for st in stats],
    }


# ------------------------------------------------------------------------------- label shards (issue 9)


class _OfficialLabeler:
    """``labeler`` for ``join.run_aligned``: the official map of a key (``class/stem.pt``), encoded with the
    image's binding."""

    def __init__(self, relabel_root: str, by_key: dict[str, str], layout: str, encoding: str,
                 storage_options: dict | None):
        self.relabel_root = relabel_root
        self.paths = sorted(by_key.items())
        self.rows = {k: i for i, (k, _) in enumerate(self.paths)}
        self.layout = layout
        self.encoding = encoding
        self.storage_options = storage_options

    def find(self, keys: list[str]):
        import numpy as np

        return np.array([self.rows.get(k, -1) for k in keys], dtype=np.int64)

    def __call__(self, key: str, row: int, image: bytes, size: tuple[int, int] | None) -> tuple[bytes, bool]:
        from relabel_shards.labelmap import ImageBinding, encode_label_map

        mrel = self.paths[row][1]
        try:
            raw = read_map_file(join(self.relabel_root, mrel), self.storage_options)  # big: refused unread
        except OSError as e:
            raise ValueError(f"cannot read label map {mrel}: {e.strerror or e}") from None
        try:
            maps = split_official_map(load_official_map(raw), self.layout)  # (k, rows, cols)
        except OfficialMapError as e:
            raise ValueError(f"bad label map {mrel}: {e}") from None
        w, h, orientation = _upright(image)  # the image itself, not its .json (``size``), decides
        values, indices = _oriented(maps, orientation)
        record = encode_label_map(values, indices, NUM_CLASSES, encoding=self.encoding,
                                  image=ImageBinding.of(image, w, h), tar_fit_step=_fit(self.encoding))
        return record, False


def _maps_without_image(by_key: dict[str, str], stats: list) -> list[dict]:
    """Maps no image took; a class folder none of whose maps was taken is one entry with its count."""
    taken = {k for st in stats for k in st.extra.get("matched_by", st.keys)}
    failed = {f["key"] for st in stats for f in st.failures}
    taken -= failed
    folders: dict[str, list[str]] = {}
    for k, rel in sorted(by_key.items(), key=lambda kv: kv[1]):
        folders.setdefault(rel.split("/", 1)[0] if "/" in rel else "", []).append(k)
    out: list[dict] = []
    for folder, keys in folders.items():
        left = [k for k in keys if k not in taken]
        if folder and len(left) == len(keys) and len(keys) > 1:
            out.append(_failure(key_from_path(folder), f"{folder}/", f"{len(keys)} label maps without an "
                                "image (no image of this class folder in the image shards)", count=len(keys)))
            continue
        out += [_failure(k, by_key[k], "label map without an image") for k in left]
    return out


def convert_official_labels(
    images: str | os.PathLike | list[str],
    relabel_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layout: str = "hw",
    encoding: str = "compact",
    match_by: str = "key",
    prefix: str | None = None,
    split: str = "train",
    num_workers: int = 4,
    rank: int | None = None,
    world_size: int | None = None,
    strict: bool = False,
    storage_options: dict | None = None,
    progress: ProgressFn | None = None,
    name: str | None = None,
    overwrite: bool = False,
):
    """The official release as label shards aligned to image shards (``convert --labels-only``).

    Label shard i holds, for each sample of image shard i in order, the official map of its key
    (``RELABEL_ROOT/<class>/<key>.pt``) as a record bound to that image; ``_info.json`` pairs the set with the
    image shards (``relabel_shards.pairing``). An image without a map keeps its place with an empty record.

    Args:
        images: image shards (paths, brace patterns, URLs), e.g. ``timm/imagenet-1k-wds``'s train shards.
        relabel_root, out, layout, encoding, prefix, split, num_workers, rank, world_size, strict,
            storage_options, progress, name, overwrite: as in :func:`convert_official`.
        match_by: ``"key"``: a sample's key is the ImageNet file stem (``n01440764_10026``); ``"json:FIELD"``:
            the stem of the file name in the sample's ``.json`` field FIELD (e.g. ``json:filename``).

    Returns:
        ``relabel_shards.join.JoinSummary`` of this rank.

    Raises:
        FileNotFoundError, ValueError: as :func:`convert_official`; IMAGES not shards; two maps with one stem.
    """
    from relabel_shards.build import label_set_fields
    from relabel_shards.join import parse_match_by, run_aligned
    from relabel_shards.pairing import key_digest

    prefix = _check_args(1, 1, num_workers, encoding, split, prefix)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    parse_match_by(match_by)
    out, relabel_root = os.fspath(out), os.fspath(relabel_root)
    src = open_source(images, storage_options)
    if src.kind != "shards":
        raise ValueError(f"--labels-only needs image shards as IMAGES (label shards pair with image shards "
                         f"one to one), got a {src.kind} source: {src.url!r}")
    maps = _map_files(relabel_root, storage_options)
    by_key: dict[str, str] = {}
    for rel in sorted(maps):
        k = key_from_path(rel)
        if k in by_key:
            raise ValueError(f"relabel_root {relabel_root!r}: {by_key[k]} and {rel} have the same file stem "
                             f"{k!r}")
        by_key[k] = rel
    labeler = _OfficialLabeler(relabel_root, by_key, layout, encoding, storage_options)
    settings = {"layout": layout, "encoding": encoding, "prefix": prefix, "split": split, "labels_only": True,
                "match_by": match_by, "tar_fit_step": _fit(encoding)}
    description = {**_job_description(src, relabel_root, maps, settings), "job": "convert-labels",
                   "image_shards": key_digest(src.shard_urls)}
    fingerprint = job_fingerprint(description)
    check_output(out, prefix, fingerprint, description, storage_options)

    def project(stats: list) -> dict:
        kept = {"shard_size": None, "check_images": False, "order": order_info(False, None, "shards")}
        proj = _project(stats, src, relabel_root, layout, encoding, kept)
        proj.update(label_set_fields(stats, src.shard_urls))
        proj["match_by"] = match_by
        return proj

    return run_aligned(src, out, labeler, fingerprint, project, labels_only=True, shard_size=1, prefix=prefix,
                       split=split, num_workers=num_workers, rank=rank, world_size=world_size, strict=strict,
                       storage_options=storage_options, progress=progress, name=name,
                       unused=lambda stats: _maps_without_image(by_key, stats), match_by=match_by,
                       description=description, overwrite=overwrite)

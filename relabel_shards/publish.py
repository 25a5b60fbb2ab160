"""A release someone else can download, check and train on (``relabel-shards publish DATASET DEST``).

What DEST receives, in this order (so a reader never sees a card for shards that are not all there):

1. every shard of every split in ``_info.json``, checked against its listed size and sha256 first; a file
   already at DEST with the same size and sha256 is kept (resume: rerun the same command after a failure);
2. ``preview.png`` (``show``'s heat maps of one sample) when images are at hand: full shards, or label shards
   with ``images=`` (the image shards they pair with);
3. ``_info.json``;
4. ``README.md``: a dataset card with the Hugging Face Hub's YAML front matter (license, ``configs`` /
   ``data_files`` per split, tags) and a body that says what the labels are, the annotator, the map
   geometry, the image shards they pair with, how to load them, the pooling semantics, sizes and failures;
5. ``SHA256SUMS`` of everything above (``sha256sum -c SHA256SUMS`` in a downloaded copy checks it).

DEST is a folder, an fsspec URL (``s3://``, ``gs://``, ...; each file is written whole: a temporary name and
a rename locally, one upload remotely), or ``hf://datasets/ORG/NAME`` (through ``huggingface_hub``, the
optional extra ``hf``: one commit with the files the repository lacks, compared by size and LFS sha256).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relabel_shards.card import PREVIEW_NAME, dataset_card
from relabel_shards.shards import INFO_NAME, LABELMAP_EXT, ShardError, join, read_info, url_to_fs

log = logging.getLogger(__name__)

SUMS_NAME = "SHA256SUMS"
CARD_NAME = "README.md"
_CHUNK = 1 << 20


@dataclass
class PublishSummary:
    """What :func:`publish` did.

    Attributes:
        dest: where the release went.
        uploaded: files written by this call (relative names).
        kept: files already at DEST with the same size and sha256 (resume).
        files: every file of the release with (bytes, sha256), in SHA256SUMS order.
        card: the dataset card's text.
    """

    dest: str
    uploaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    card: str = ""


# ------------------------------------------------------------------------------------------- dest parse


def parse_hf_dest(dest: str) -> tuple[str, str]:
    """``hf://datasets/ORG/NAME[/folder]`` -> (``ORG/NAME``, folder in the repository, may be "").

    Raises:
        ValueError: not a dataset repository URL of that form.
    """
    rest = dest[len("hf://") :].strip("/")
    parts = rest.split("/")
    if len(parts) < 3 or parts[0] != "datasets" or not parts[1] or not parts[2] or "@" in rest:
        raise ValueError(
            f"dest {dest!r}: publishing to the Hugging Face Hub needs hf://datasets/ORG/NAME "
            "(a dataset repository, optionally /FOLDER; no @revision)"
        )
    return f"{parts[1]}/{parts[2]}", "/".join(parts[3:])


# ----------------------------------------------------------------------------------------- destinations


def _sha_of(fs: Any, path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with fs.open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


class _FsDest:
    """A folder or fsspec URL: files land whole (temporary name + rename locally, one upload remotely)."""

    def __init__(self, url: str, storage_options: dict | None):
        from relabel_shards.shards import _is_local

        self.url = url
        self.fs, self.root = url_to_fs(url, storage_options)
        self.local = _is_local(self.fs)
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def has(self, name: str, size: int, sha256: str) -> bool:
        path = join(self.root, name)
        try:
            if self.fs.size(path) != size:
                return False
        except FileNotFoundError:
            return False
        return _sha_of(self.fs, path) == (size, sha256)

    def put(self, name: str, local_path: str) -> None:
        path = join(self.root, name)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(name)}.", suffix=".tmp", dir=os.path.dirname(path)
            )
            try:
                with os.fdopen(fd, "wb") as out, open(local_path, "rb") as src:
                    while block := src.read(_CHUNK):
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.fs.put_file(local_path, path)

    def finish(self) -> None:
        pass


class _HfDest:
    """A Hub dataset repository: collects the missing files, then one commit (``huggingface_hub``)."""

    def __init__(self, url: str, token: str | None = None):
        from relabel_shards._optional import require

        self.url = url
        self.repo_id, self.folder = parse_hf_dest(url)
        hub = require("huggingface_hub", f"publishing to {url}")
        self.api = hub.HfApi(token=token)
        self._hub = hub
        try:
            self.api.create_repo(self.repo_id, repo_type="dataset", exist_ok=True)
            self.existing = {}
            for f in self.api.list_repo_tree(self.repo_id, repo_type="dataset", recursive=True, expand=True):
                lfs = getattr(f, "lfs", None)
                if getattr(f, "size", None) is not None:
                    self.existing[f.path] = (int(f.size), lfs.sha256 if lfs is not None else None)
        except Exception as e:  # noqa: BLE001 - offline, no token, no permission: one clear line
            raise RuntimeError(
                f"cannot reach the Hugging Face Hub repository {self.repo_id} for {url} "
                f"({type(e).__name__}: {e}); log in with `huggingface-cli login` or set "
                "HF_TOKEN, and check the network"
            ) from None
        self.ops: list[Any] = []

    def _path(self, name: str) -> str:
        return posixpath.join(self.folder, name) if self.folder else name

    def has(self, name: str, size: int, sha256: str) -> bool:
        return self.existing.get(self._path(name)) == (size, sha256)  # small non-LFS files: sent again

    def put(self, name: str, local_path: str) -> None:
        self.ops.append(
            self._hub.CommitOperationAdd(path_in_repo=self._path(name), path_or_fileobj=local_path)
        )

    def finish(self) -> None:
        if self.ops:
            self.api.create_commit(
                self.repo_id,
                repo_type="dataset",
                operations=self.ops,
                commit_message=f"relabel-shards publish ({len(self.ops)} files)",
            )


# ------------------------------------------------------------------------------------------------ publish


def publish(
    dataset: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    images: str | None = None,
    preview: bool = True,
    license: str | None = None,
    title: str | None = None,
    storage_options: dict | None = None,
    dest_storage_options: dict | None = None,
    token: str | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> PublishSummary:
    """Copy a dataset (label shards or full shards) to ``dest`` as a release, with resume.

    Args:
        dataset: the dataset directory or URL prefix holding ``_info.json`` and its shards.
        dest: a folder, an fsspec URL (``s3://``, ``gs://``) or ``hf://datasets/ORG/NAME``.
        images: the image shards a label set pairs with (directory or URL prefix holding the files named in
            ``pairs_with``): used for the preview picture only.
        preview: draw ``preview.png`` when an image is at hand.
        license: the card's ``license`` (a Hub license id). None: ImageNet's terms (``license: other``,
            ``license_name: imagenet``) when the maps have 1000 classes, else ``other``.
        title: the card's title (default: the dataset name in ``_info.json``).
        storage_options, dest_storage_options: fsspec options for ``dataset`` / ``images`` and ``dest``.
        token: Hugging Face token for ``hf://`` (default: the logged-in one).
        progress: called as ``progress(file name, bytes)`` as files are read.

    Returns:
        PublishSummary: what was uploaded and kept, every file's size and sha256, the card.

    Raises:
        FileNotFoundError: no ``_info.json``, or a listed shard is missing.
        ShardError: a shard's size or sha256 differs from ``_info.json`` (a damaged dataset is not published).
        ValueError: a malformed ``hf://`` DEST.
        ImportError: ``hf://`` without ``huggingface_hub`` (``pip install 'relabel-shards[hf]'``).
        RuntimeError: the Hub cannot be reached.
    """
    dataset, dest = os.fspath(dataset).rstrip("/"), os.fspath(dest).rstrip("/")
    info = read_info(dataset, storage_options)
    splits = info.get("splits") or {}
    if not splits:
        raise ShardError(f"{join(dataset, INFO_NAME)} lists no splits: nothing to publish")
    target = _HfDest(dest, token) if dest.startswith("hf://") else _FsDest(dest, dest_storage_options)
    summary = PublishSummary(dest=dest)
    with tempfile.TemporaryDirectory(prefix="relabel-publish-") as tmp:
        for s in splits.values():
            section = s.get("relabel_shards") or {}
            listed = {r.get("filename"): r for r in section.get("shards") or [] if isinstance(r, Mapping)}
            for name in s.get("filenames") or []:
                local = _local_copy(dataset, name, tmp, storage_options)
                size, digest = _sha_of_local(local, name, progress)
                rec = listed.get(name)
                if rec is not None and (rec.get("bytes"), rec.get("sha256")) != (size, digest):
                    raise ShardError(
                        f"{join(dataset, name)}: {size:,} bytes, sha256 {digest[:16]}…, "
                        f"{INFO_NAME} says {rec.get('bytes')!r} bytes, sha256 "
                        f"{str(rec.get('sha256'))[:16]}…: the dataset is damaged; rebuild or "
                        "restore the shard before publishing"
                    )
                _send(target, name, local, size, digest, summary)
                if local.startswith(tmp):
                    os.unlink(local)
        extra: dict[str, str] = {}
        if preview:
            png = _preview(dataset, info, images, storage_options)
            if png is not None:
                extra[PREVIEW_NAME] = _write_tmp(tmp, PREVIEW_NAME, png)
        extra[INFO_NAME] = _local_copy(dataset, INFO_NAME, tmp, storage_options)
        for name in (PREVIEW_NAME, INFO_NAME):
            if name in extra:
                size, digest = _sha_of_local(extra[name], name, progress)
                _send(target, name, extra[name], size, digest, summary)
        card = dataset_card(
            info,
            summary.files,
            license=license,
            title=title,
            preview=PREVIEW_NAME in extra,
            url=dest,
            record_version=_record_version(dataset, info, storage_options),
        )
        summary.card = card
        path = _write_tmp(tmp, CARD_NAME, card.encode("utf-8"))
        _send(target, CARD_NAME, path, *_sha_of_local(path, CARD_NAME, None), summary)
        sums = "".join(f"{d}  {n}\n" for n, (_, d) in summary.files.items()).encode()
        path = _write_tmp(tmp, SUMS_NAME, sums)
        size, digest = _sha_of_local(path, SUMS_NAME, None)
        _send(target, SUMS_NAME, path, size, digest, summary)
        del summary.files[SUMS_NAME]
        target.finish()
    log.info(
        "published %s to %s: %d files written, %d kept",
        dataset,
        dest,
        len(summary.uploaded),
        len(summary.kept),
    )
    return summary


def _send(target: Any, name: str, local: str, size: int, digest: str, summary: PublishSummary) -> None:
    summary.files[name] = (size, digest)
    if target.has(name, size, digest):
        summary.kept.append(name)
        log.info("%s: already at the destination with the same sha256, kept", name)
        return
    target.put(name, local)
    summary.uploaded.append(name)


def _local_copy(dataset: str, name: str, tmp: str, storage_options: dict | None) -> str:
    """A local path holding ``dataset/name``: the file itself when local, else a download into ``tmp``."""
    from relabel_shards.shards import _is_local

    fs, root = url_to_fs(dataset, storage_options)
    path = join(root, name)
    if _is_local(fs):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is listed in {INFO_NAME} but missing")
        return path
    local = os.path.join(tmp, name.replace("/", "_"))
    try:
        fs.get_file(path, local)
    except FileNotFoundError:
        raise FileNotFoundError(f"{join(dataset, name)} is listed in {INFO_NAME} but missing") from None
    return local


def _sha_of_local(path: str, name: str, progress: Callable[[str, int], None] | None) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            n += len(block)
            if progress is not None:
                progress(name, len(block))
    return n, h.hexdigest()


def _write_tmp(tmp: str, name: str, data: bytes) -> str:
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ------------------------------------------------------------------------------------------------ preview


def _preview(
    dataset: str, info: Mapping[str, Any], images: str | None, storage_options: dict | None
) -> bytes | None:
    """``show``'s figure of the first labelled sample of the first split (PNG bytes); None without images."""
    from relabel_shards.labelmap import decode_label_map
    from relabel_shards.pairing import KIND_LABELS
    from relabel_shards.shards import image_ext
    from relabel_shards.show import class_names, find_sample, render

    split = next(iter(info["splits"].values()))
    section = split.get("relabel_shards") or {}
    names = list(split.get("filenames") or [])
    if not names:
        return None
    first = _first_record(join(dataset, names[0]), storage_options)
    if first is None:
        return None
    key, record = first
    members: dict[str, bytes] = {}
    if section.get("kind") == KIND_LABELS:
        pw = section.get("pairs_with") or {}
        if images is None or not pw.get("filenames"):
            return None
        _, members, _ = find_sample(join(images, pw["filenames"][0]), key, storage_options=storage_options)
    else:
        _, members, _ = find_sample(join(dataset, names[0]), key, storage_options=storage_options)
    ext = image_ext(members)
    if ext is None:
        return None
    from PIL import Image, ImageOps

    lm = decode_label_map(record)
    with Image.open(io.BytesIO(members[ext])) as im:
        photo = ImageOps.exif_transpose(im).convert("RGB")
    fig, _ = render(
        photo,
        lm.values,
        lm.indices,
        int(lm.num_classes),
        class_names(int(lm.num_classes), section),
        topk=min(3, int(lm.num_classes)),
        title=key,
        subtitle=f"{photo.width}x{photo.height} px",
        panel_size=256,
    )
    buf = io.BytesIO()
    fig.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _record_version(dataset: str, info: Mapping[str, Any], storage_options: dict | None) -> int | None:
    """The format version in the header of the dataset's first record (None when it has none)."""
    from relabel_shards.labelmap import LabelMapError, read_header

    split = next(iter(info["splits"].values()))
    names = list(split.get("filenames") or [])
    first = _first_record(join(dataset, names[0]), storage_options) if names else None
    if first is None:
        return None
    try:
        return int(read_header(first[1]).version)
    except LabelMapError:
        return None


def _first_record(url: str, storage_options: dict | None) -> tuple[str, bytes] | None:
    import tarfile

    from relabel_shards.shards import split_member_name

    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for ti in tar:
            key, ext = split_member_name(ti.name)
            if ext == LABELMAP_EXT and ti.size > 0:
                return key, tar.extractfile(ti).read()
    return None

"""Enumerating the inputs of a build: an ImageFolder directory, a list file, or existing WebDataset shards.

Three kinds of source, told apart by :func:`open_source`:

- ``folder``: an ImageFolder-style directory (local or fsspec URL). Classes are the sorted sub-directories and
  files are walked in sorted order, exactly as ``torchvision.datasets.ImageFolder`` does; a file whose
  extension is not an image extension is not dropped silently but becomes a failure of the build
  ("not an image file").
- ``list``: a text file of ``path<TAB>label`` lines (blank lines and ``#`` comments skipped). Relative
  paths are relative to the list file's directory. Labels are integers, or else class names (then numbered
  in sorted order, like ImageFolder's folders).
- ``shards``: existing WebDataset ``.tar`` shards (a path, a brace pattern such as
  ``in-{000000..000009}.tar``, a ``::``-joined list, a URL, or a list of those). Their samples pass through
  unchanged; they are read at build time by :func:`iter_shard_samples`, one input shard per output shard.

Keys come from :func:`relabel_shards.shards.key_from_path`; two files with the same key are an error naming
both.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from relabel_shards.shards import (
    IMAGE_EXTS,
    ShardError,
    StrictTarInfo,
    expand_urls,
    image_ext,
    key_from_path,
    split_member_name,
    url_to_fs,
)

log = logging.getLogger(__name__)

SOURCE_KINDS = ("folder", "list", "shards")


class DuplicateKeyError(ShardError):
    """Two samples of an input shard share a key (an error even where bad inputs are skipped)."""


@dataclass(frozen=True)
class FileItem:
    """One input image file of a folder or list source.

    Attributes:
        key: the sample key (no dots, unique within the source).
        path: where to read the bytes (local path or fsspec URL).
        source: the path as recorded in ``.json`` and in failures: relative to the folder, or as written in
            the list file (so nothing host-dependent lands in the shards).
        label: the class index written to ``.cls``.
        class_name: the class's name where known (ImageFolder folder, named list labels), else None.
        error: a reason known before reading (e.g. not an image extension); the item then becomes a failure.
    """

    key: str
    path: str
    source: str
    label: int
    class_name: str | None = None
    error: str | None = None

    @property
    def image_ext(self) -> str:
        """The output member extension: the file's own, lower case, ``jpeg`` spelled ``jpg`` (timm's key)."""
        ext = posixpath.splitext(self.source)[1].lstrip(".").lower()
        return "jpg" if ext in ("jpeg", "jpe") else ext


@dataclass(frozen=True)
class Source:
    """An enumerated source: ``items`` for folder/list sources, ``shard_urls`` for shard sources."""

    kind: str
    url: str
    items: tuple[FileItem, ...] = ()
    shard_urls: tuple[str, ...] = ()
    classes: tuple[str, ...] | None = None
    storage_options: dict | None = field(default=None, compare=False)

    def describe(self) -> dict:
        """What ``_info.json`` records of the source (as the user gave it: nothing host-dependent added)."""
        d: dict = {"kind": self.kind, "url": self.url}
        if self.kind == "shards":
            d["num_shards"] = len(self.shard_urls)
        else:
            d["num_files"] = len(self.items)
        return d


# ------------------------------------------------------------------------------------------ detection


def _is_url(s: str) -> bool:
    return "://" in s


def _looks_like_shards(s: str) -> bool:
    return (
        "::" in s or ("{" in s and ".." in s) or s.rstrip("/").lower().endswith((".tar", ".tar.gz", ".tgz"))
    )


def open_source(source: str | os.PathLike | Sequence[str], storage_options: dict | None = None) -> Source:
    """Enumerate a source (see the module docstring for the three kinds).

    Args:
        source: a directory, a list file, shard path(s)/pattern(s)/URL(s), local or fsspec URL.
        storage_options: fsspec options for URLs (credentials, endpoint).

    Raises:
        FileNotFoundError: the source (or a listed file, or an input shard) does not exist.
        ValueError: the source holds no images, a list line is malformed, or two inputs share a key.
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("source: got an empty list of shards")
        return _shard_source([str(s) for s in source], storage_options)
    source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a path, URL or list of shard URLs, got {source!r}")
    if _looks_like_shards(source):
        return _shard_source([source], storage_options)
    fs, path = url_to_fs(source, storage_options)
    if fs.isdir(path):
        return _folder_source(source, fs, path, storage_options)
    if fs.isfile(path):
        return _list_source(source, fs, path, storage_options)
    raise FileNotFoundError(f"source {source!r} does not exist")


def _check_unique(items: list[FileItem]) -> None:
    seen: dict[str, str] = {}
    for it in items:
        other = seen.get(it.key)
        if other is not None:
            raise ValueError(
                f"duplicate sample key {it.key!r}: {other!r} and {it.source!r} "
                "(keys are file names without extension; rename one)"
            )
        seen[it.key] = it.source


def _finish(kind: str, url: str, items: list[FileItem], classes, storage_options) -> Source:
    if not items:
        raise ValueError(f"source {url!r} holds no images")
    _check_unique(items)
    return Source(
        kind=kind,
        url=url,
        items=tuple(items),
        classes=tuple(classes) if classes is not None else None,
        storage_options=storage_options,
    )


def _ext_error(name: str) -> str | None:
    ext = posixpath.splitext(name)[1].lstrip(".").lower()
    if ext in IMAGE_EXTS or ext in ("pgm", "jpe"):
        return None
    return f"not an image file (extension {ext or 'none'!r})"


def _folder_source(url: str, fs, root: str, storage_options) -> Source:
    root = root.rstrip("/")
    classes = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False) if fs.isdir(p))
    if not classes:
        raise ValueError(
            f"source {url!r}: no class sub-directories (expected an ImageFolder layout root/class/img)"
        )
    items: list[FileItem] = []
    for label, cls in enumerate(classes):
        cdir = f"{root}/{cls}"
        walked = sorted(fs.walk(cdir), key=lambda t: t[0])  # same order as torchvision's sorted(os.walk(...))
        for dirpath, _dirs, files in walked:
            for fname in sorted(files):
                if fname.startswith("."):
                    continue  # hidden files (.DS_Store, editors' temp files) are not dataset members
                full = f"{dirpath.rstrip('/')}/{fname}"
                rel = posixpath.relpath(full, root) if not _is_url(url) else full[len(root) + 1 :]
                items.append(
                    FileItem(
                        key=key_from_path(rel),
                        path=_full_url(url, fs, full),
                        source=rel,
                        label=label,
                        class_name=cls,
                        error=_ext_error(fname),
                    )
                )
    return _finish("folder", url, items, classes, storage_options)


def _full_url(url: str, fs, path: str) -> str:
    """A path from ``fs`` turned back into something ``url_to_fs`` opens (protocol restored for URLs)."""
    if not _is_url(url):
        return path
    return fs.unstrip_protocol(path)


def _list_source(url: str, fs, path: str, storage_options) -> Source:
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"source {url!r}: a list file must be UTF-8 text ({e})") from None
    base = posixpath.dirname(path)
    rows: list[tuple[str, str, int]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1].strip():
            raise ValueError(f"{url}:{lineno}: expected 'path<TAB>label', got {line!r}")
        rows.append((parts[0], parts[1].strip(), lineno))
    if not rows:
        raise ValueError(f"source {url!r} holds no images (the list file has no 'path<TAB>label' lines)")
    try:
        labels = [int(lab) for _, lab, _ in rows]
        names: list[str | None] = [None] * len(rows)
        classes = None
    except ValueError:
        classes = sorted({lab for _, lab, _ in rows})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[lab] for _, lab, _ in rows]
        names = [lab for _, lab, _ in rows]
    items = []
    for (p, _, lineno), label, name in zip(rows, labels, names, strict=True):
        if label < 0:
            raise ValueError(f"{url}:{lineno}: label must be >= 0, got {label}")
        if _is_url(p) or posixpath.isabs(p):
            full = p
        else:
            full = _full_url(url, fs, posixpath.normpath(f"{base}/{p}"))
        items.append(
            FileItem(
                key=key_from_path(p), path=full, source=p, label=label, class_name=name, error=_ext_error(p)
            )
        )
    missing = [it for it in items if not _is_url(it.path) and not os.path.exists(it.path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"source {url!r}: listed file {missing[0].source!r} does not exist "
            f"(looked at {missing[0].path}){more}"
        )
    return _finish("list", url, items, classes, storage_options)


def _shard_source(specs: list[str], storage_options) -> Source:
    urls = expand_urls(specs)
    if not urls:
        raise ValueError(f"source {specs!r}: no shards")
    for u in urls:
        if not _is_url(u) and not os.path.isfile(u):
            raise FileNotFoundError(f"source shard {u!r} does not exist")
    if len(set(urls)) != len(urls):
        dup = next(u for u in urls if urls.count(u) > 1)
        raise ValueError(f"source lists shard {dup!r} twice")
    return Source(
        kind="shards", url="::".join(specs), shard_urls=tuple(urls), storage_options=storage_options
    )


# ------------------------------------------------------------------------------------------- reading


def read_bytes(path: str, storage_options: dict | None = None) -> bytes:
    """The bytes of a local file or fsspec URL."""
    if not _is_url(path):
        with open(path, "rb") as f:
            return f.read()
    from relabel_shards.storage import cat

    return cat(path, storage_options)  # one read deadline, retries (relabel_shards.storage)


def iter_shard_samples(
    url: str, storage_options: dict | None = None
) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """Yield ``(key, [(member name, bytes), ...])`` for each sample of a WebDataset tar, in order.

    Members are grouped the way webdataset groups them (key = name up to the basename's first dot, adjacent
    members). Directories and other non-file members are skipped. Nothing is decoded here.

    Raises:
        ShardError: the tar is malformed, or a key comes back after another key (members not adjacent).
    """
    seen: set[str] = set()
    key: str | None = None
    members: list[tuple[str, bytes]] = []
    last_done: str | None = None
    try:
        from relabel_shards.tarstream import RetryingReader, fsspec_opener

        raw = RetryingReader(fsspec_opener(url, storage_options), url).open_now()  # deadline + retries
        with raw, tarfile.open(fileobj=raw, mode="r|*", tarinfo=StrictTarInfo) as tar:
            for ti in tar:
                if not ti.isreg():
                    continue
                k, _ext = split_member_name(ti.name)
                f = tar.extractfile(ti)
                data = f.read() if f is not None else b""
                if len(data) != ti.size:
                    raise tarfile.ReadError(f"member {ti.name!r} holds {len(data)} of {ti.size} bytes")
                if k != key:
                    if key is not None:
                        yield key, members
                        last_done = key
                    if k in seen:
                        raise DuplicateKeyError(
                            f"{url}: key {k!r} appears twice (its members are not adjacent, "
                            "or two samples share it)"
                        )
                    seen.add(k)
                    key, members = k, []
                members.append((ti.name, data))
    except (tarfile.TarError, EOFError) as e:
        where = f" after key {last_done!r}" if last_done is not None else " before its first whole sample"
        pending = f" (key {key!r} incomplete)" if key is not None else ""
        raise ShardError(f"{url}: truncated or corrupt tar{where}{pending} ({e})") from None
    if key is not None:
        yield key, members


def image_member(members: Sequence[tuple[str, bytes]]) -> tuple[str, bytes] | None:
    """The first member whose extension is an image extension (``jpg``, ``png``, ...), or None."""
    by_ext = {split_member_name(name)[1]: (name, data) for name, data in reversed(members)}
    ext = image_ext(split_member_name(name)[1] for name, _ in members)
    return None if ext is None else by_ext[ext]


def decode_image(data: bytes):
    """Decode image bytes fully into an upright RGB ``PIL.Image`` (a truncated or non-image file raises here).

    The EXIF orientation is applied (label maps describe the upright image, DESIGN.md), so ``.size`` is the
    upright width and height that the sample's ``.json`` records.

    Raises:
        ValueError: the bytes are empty or not a decodable image; the message says why.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not a decodable image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image: {e}") from None

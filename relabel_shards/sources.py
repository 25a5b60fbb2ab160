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

Keys (:func:`sample_key`) come from the relative path, by one of two stable rules (``key_from``):

- ``"stem"`` (the default): the file name without its extension, as ImageNet's keys
  (``n01440764/n01440764_10026.JPEG`` -> ``n01440764_10026``; :func:`relabel_shards.shards.key_from_path`).
- ``"path"``: for layouts whose file names repeat across classes (Caltech-101's ``image_0001.jpg``,
  Places365): the whole relative path without the file's extension, its ``/`` turned into ``_``
  (``accordion/image_0001.jpg`` -> ``accordion_image_0001``). The path is the one relative to the folder,
  or as written in the list file (a URL's ``scheme://`` and a leading ``/`` dropped).

In both rules every character other than ``A-Z a-z 0-9 _ -`` (dots included) becomes ``_``, so keys hold no
dots. Two files with the same key are an error naming both, before anything is read.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from relabel_shards.images import DEFAULT_MAX_IMAGE_PIXELS, open_image
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
from relabel_shards.tarstream import duplicate_member_message

log = logging.getLogger(__name__)

SOURCE_KINDS = ("folder", "list", "shards")
KEY_FROM = ("stem", "path")


class DuplicateKeyError(ShardError):
    """Two samples of an input shard share a key (an error even where bad inputs are skipped)."""


class DuplicateMemberError(ShardError):
    """A sample of an input shard repeats an extension (two adjacent samples with one key, or a member
    written twice): which copy is the sample is unknowable, so the sample is unusable."""

    def __init__(self, url: str, key: str, member: str) -> None:
        super().__init__(duplicate_member_message(url, key, member))
        self.url, self.key, self.member = url, key, member


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


# key_from_path over NUL-separated sources: drop directories, then the last extension, then unsafe characters
_DIRS = re.compile(r"[^\0]*/")
_EXT = re.compile(r"\.[^.\0]*(?=\0|\Z)")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-\0]")


class ItemTable(Sequence[FileItem]):
    """The items of a folder or list source, stored as columns; a :class:`FileItem` is made on access.

    Per item only the relative path (``source``) and the label (int32) are kept, and of the path only the
    part that differs within its segment (a run of rows added together, e.g. one directory listing): the
    segment's common prefix (``n01440764/n01440764_``) and suffix (``.JPEG``) are stored once, the middle
    (``10026``) in one UTF-8 buffer with uint32 offsets. The key, the full path, the class name and an
    extension error derive from the source. At ImageNet-21k scale (13M images) this takes about 12 bytes an
    image (benchmarks/bench_scale.py); a tuple of FileItems took about 450.

    Args:
        kind: ``"folder"`` (path = root + "/" + source) or ``"list"`` (path = source when it is a URL or
            absolute, else normalized against the list file's folder).
        url: the source URL as given; ``fs`` and ``base`` (the folder root, or the list file's folder) as
            ``url_to_fs`` gave them.
        blob, offsets: the middles, each followed by a NUL byte (no path holds one):
            ``blob[offsets[i]:offsets[i + 1] - 1]`` (uint32 or uint64 ``[n + 1]``).
        labels: int32 ``[n]``.
        seg_first: int64 ``[s + 1]``, the first item of each segment, then ``n``; ``heads``, ``tails``: each
            segment's common prefix and suffix (``source(i) = heads[s] + middle(i) + tails[s]``).
        classes: class names by label, or None (then ``class_name`` is None).
    """

    def __init__(
        self,
        kind: str,
        url: str,
        fs,
        base: str,
        blob: bytes,
        offsets,
        labels,
        seg_first,
        heads: Sequence[str],
        tails: Sequence[str],
        classes: Sequence[str] | None,
        key_from: str = "stem",
    ):
        self.kind, self.url, self.fs, self.base, self.key_from = kind, url, fs, base, key_from
        self.blob, self.offsets, self.labels = blob, offsets, labels
        self.seg_first, self.heads, self.tails = seg_first, list(heads), list(tails)
        self.classes = tuple(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """The bytes held by the columns (the segments' strings counted by their UTF-8 length)."""
        strings = sum(len(s.encode()) for s in self.heads) + sum(len(s.encode()) for s in self.tails)
        return len(self.blob) + self.offsets.nbytes + self.labels.nbytes + self.seg_first.nbytes + strings

    def _segment(self, i: int) -> int:
        return int(self.seg_first.searchsorted(i, "right")) - 1

    def source(self, i: int) -> str:
        s = self._segment(i)
        mid = self.blob[int(self.offsets[i]) : int(self.offsets[i + 1]) - 1].decode()
        return self.heads[s] + mid + self.tails[s]

    def _text(self, a: int, b: int, names: bool = False) -> str:
        """The sources of items ``a`` to ``b - 1`` (``a < b``) joined by NUL, built a segment at a time by
        C-level string operations (the middles are NUL-separated in the blob already). ``names``: without the
        directories that a segment's prefix holds (the file names, what a key is made of, stay the same)."""
        parts: list[str] = []
        s = self._segment(a)
        while a < b:
            end = min(b, int(self.seg_first[s + 1]))
            mids = self.blob[int(self.offsets[a]) : int(self.offsets[end]) - 1].decode()
            head, tail = self.heads[s], self.tails[s]
            if names:  # the prefix's directories: the file name (the last part) stays the same
                head = head.replace("\\", "/").rsplit("/", 1)[-1]
            parts.append(head + mids.replace("\0", f"{tail}\0{head}") + tail if head or tail else mids)
            a, s = end, s + 1
        return "\0".join(parts)

    def sources(self, a: int, b: int) -> list[str]:
        """The sources of items ``a`` to ``b - 1``, in order (decoded a segment at a time)."""
        return self._text(a, b).split("\0") if a < b else []

    def _chunks(self, chunk: int = 1 << 16, names: bool = False) -> Iterator[str]:
        n = len(self)
        for a in range(0, n, chunk):
            yield self._text(a, min(n, a + chunk), names)

    def iter_sources(self) -> Iterator[str]:
        """Every source in order, decoded a chunk at a time (several times faster than :meth:`source`)."""
        for text in self._chunks():
            yield from text.split("\0")

    def iter_keys(self) -> Iterator[str]:
        """Every key in order: :func:`sample_key` of each source; for ``key_from="stem"`` done by regular
        expressions over a chunk of sources at a time (about 2.5x faster). A source without a key gives
        ``""``."""
        if self.key_from != "stem":
            for src in self.iter_sources():
                try:
                    yield sample_key(src, self.key_from)
                except ValueError:
                    yield ""
            return
        for text in self._chunks(names=True):
            if "/" in text or "\\" in text:  # some segment kept its directories
                text = _DIRS.sub("", text.replace("\\", "/"))
            yield from _UNSAFE.sub("_", _EXT.sub("", text)).split("\0")

    def _path(self, src: str) -> str:
        if self.kind == "folder":
            return _full_url(self.url, self.fs, f"{self.base}/{src}")
        if _is_url(src) or posixpath.isabs(src):
            return src
        return _full_url(self.url, self.fs, posixpath.normpath(f"{self.base}/{src}"))

    def item(self, i: int) -> FileItem:
        src, label = self.source(i), int(self.labels[i])
        name = self.classes[label] if self.classes is not None else None
        return FileItem(key=sample_key(src, self.key_from), path=self._path(src), source=src, label=label,
                        class_name=name, error=_ext_error(src))

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.item(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of {len(self)}")
        return self.item(i)

    def __iter__(self) -> Iterator[FileItem]:
        return (self.item(i) for i in range(len(self)))

    def take(self, indices) -> list[FileItem]:
        """The items at ``indices`` (any integer sequence), in that order."""
        return [self.item(int(i)) for i in indices]

    def digest(self) -> str:
        """sha256 over kind, base, the sources, the labels and the class names, in order: the offsets of the
        NUL-terminated sources (uint64), the sources, the labels (int32), as one buffer of whole sources
        would give them (so fingerprints do not depend on how the columns are stored)."""
        import hashlib

        import numpy as np

        h = hashlib.sha256(f"{self.kind}\n{self.base}\n{self.key_from}\n".encode())
        n, step = len(self), 1 << 20
        # bytes each segment adds to each of its sources (its prefix and suffix)
        extra = np.array(
            [len(a.encode()) + len(b.encode()) for a, b in zip(self.heads, self.tails, strict=True)] + [0],
            dtype=np.uint64,
        )
        total = np.zeros(1, dtype="<u8")
        h.update(total.tobytes())
        for a in range(0, n, step):
            b = min(n, a + step)
            segs = self.seg_first.searchsorted(np.arange(a, b), "right") - 1
            lengths = np.diff(self.offsets[a : b + 1].astype(np.uint64)) + extra[segs]
            ends = np.cumsum(lengths, dtype=np.uint64) + total[0]
            h.update(ends.astype("<u8").tobytes())
            total[0] = ends[-1]
        for text in self._chunks():
            h.update(text.encode() + b"\0")
        h.update(np.asarray(self.labels, dtype="<i4").tobytes())
        h.update("\n".join(self.classes or ()).encode())
        return h.hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemTable) and self.digest() == other.digest()

    __hash__ = None  # type: ignore[assignment]


def _common_suffix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return a[len(a) - n :]


class _TableBuilder:
    """Collects (source, label) rows for an :class:`ItemTable` without a Python object per row."""

    def __init__(self) -> None:
        import array

        self.blob = bytearray()
        self.offsets = array.array("I", [0])  # uint32 while the middles fit in 4 GiB, then uint64
        self.labels = array.array("i")
        self.seg_first = array.array("q")
        self.heads: list[str] = []
        self.tails: list[str] = []

    def _append(self, middles: Sequence[str], labels: int | Sequence[int]) -> None:
        import array
        import itertools

        text = "\0".join(middles)
        data = text.encode()
        sizes = map(len, middles) if len(data) == len(text) else (len(m.encode()) for m in middles)
        if len(self.blob) + len(data) + 1 >= 1 << 32 and self.offsets.typecode == "I":
            self.offsets = array.array("Q", self.offsets)
        ends = itertools.accumulate((k + 1 for k in sizes), initial=len(self.blob))
        next(ends)  # the current end is there already
        self.offsets.extend(ends)
        self.blob += data
        self.blob += b"\0"
        if isinstance(labels, int):
            self.labels.extend(array.array("i", [labels]) * len(middles))
        else:
            self.labels.extend(labels)

    def add(self, source: str, label: int) -> None:
        """One row (kept whole, in a segment without prefix and suffix)."""
        if not self.heads or self.heads[-1] or self.tails[-1]:
            self.seg_first.append(len(self.labels))
            self.heads.append("")
            self.tails.append("")
        self._append([source], label)

    def add_many(self, sources: Sequence[str], label: int | Sequence[int]) -> None:
        """Rows (a folder's files, one label; or a block of a list, a label each) as one segment: their
        common prefix and suffix are stored once."""
        if len(sources) < 2:
            for s, lab in zip(
                sources, [label] * len(sources) if isinstance(label, int) else label, strict=True
            ):
                self.add(s, lab)
            return
        head = posixpath.commonprefix(sources)  # type: ignore[arg-type]
        k = len(head)
        room = min(map(len, sources)) - k  # the suffix must not overlap the prefix
        tail = _common_suffix(sources[0], sources[-1])[-room:] if room > 0 else ""
        for s in sources:
            if not tail:
                break
            if not s.endswith(tail):
                tail = _common_suffix(tail, s)
        j = len(tail)
        self.seg_first.append(len(self.labels))
        self.heads.append(head)
        self.tails.append(tail)
        self._append([s[k : len(s) - j] for s in sources] if k or j else sources, label)

    def table(self, kind: str, url: str, fs, base: str, classes, key_from: str = "stem") -> ItemTable:
        import numpy as np

        # the buffers are shared, not copied (the blob stays a bytearray)
        first = np.array([*self.seg_first, len(self.labels)], dtype=np.int64)
        offsets = np.frombuffer(self.offsets, dtype=np.uint32 if self.offsets.typecode == "I" else np.uint64)
        return ItemTable(
            kind,
            url,
            fs,
            base,
            self.blob,
            offsets,
            np.frombuffer(self.labels, dtype=np.int32),
            first,
            self.heads,
            self.tails,
            classes,
            key_from,
        )


@dataclass(frozen=True)
class Source:
    """An enumerated source: ``items`` for folder/list sources, ``shard_urls`` for shard sources."""

    kind: str
    url: str
    items: Sequence[FileItem] = ()
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


def sample_key(relpath: str, key_from: str = "stem") -> str:
    """The sample key of a source file by the rule ``key_from`` (``"stem"`` or ``"path"``, see the module).

    Raises:
        ValueError: an unknown rule, or a path that gives no key.
    """
    if key_from == "stem":
        return key_from_path(relpath)
    if key_from != "path":
        raise ValueError(f"key_from must be one of {list(KEY_FROM)}, got {key_from!r}")
    path = relpath.replace("\\", "/").split("://", 1)[-1]
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"cannot derive a sample key from path {relpath!r}")
    parts[-1] = key_from_path(parts[-1])  # the file name without its extension, made safe
    return "_".join(key_from_path(p + ".x") for p in parts)  # ".x": a directory name keeps all its dots


def open_source(
    source: str | os.PathLike | Sequence[str], storage_options: dict | None = None, key_from: str = "stem"
) -> Source:
    """Enumerate a source (see the module docstring for the three kinds).

    Args:
        source: a directory, a list file, shard path(s)/pattern(s)/URL(s), local or fsspec URL.
        storage_options: fsspec options for URLs (credentials, endpoint).
        key_from: how folder and list sources name samples: ``"stem"`` (file name) or ``"path"`` (relative
            path), see the module docstring. Shard sources keep their keys.

    Raises:
        FileNotFoundError: the source (or a listed file, or an input shard) does not exist.
        ValueError: the source holds no images, a list line is malformed, or two inputs share a key.
    """
    if key_from not in KEY_FROM:
        raise ValueError(f"key_from must be one of {list(KEY_FROM)}, got {key_from!r}")
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
        return _folder_source(source, fs, path, storage_options, key_from)
    if fs.isfile(path):
        return _list_source(source, fs, path, storage_options, key_from)
    raise FileNotFoundError(f"source {source!r} does not exist")


def _check_unique(items: Sequence[FileItem], key_from: str = "stem") -> None:
    """Raise on two items with one key, naming both (keys are tracked as 64-bit hashes: 13M keys in ~100 MB).

    Raises:
        ValueError: a duplicate key.
    """
    import numpy as np

    sources = items.source if isinstance(items, ItemTable) else (lambda i: items[i].source)
    n = len(items)
    keys = items.iter_keys() if isinstance(items, ItemTable) else (it.key for it in items)
    hashes = np.fromiter(map(hash, keys), dtype=np.int64, count=n)
    if isinstance(items, ItemTable) and (empty := np.flatnonzero(hashes == hash(""))).size:
        sample_key(items.source(int(empty[0])), key_from)  # raises ValueError naming the path
    hashes.sort()  # in place: 8 bytes an item in all
    dups = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not dups:
        return
    seen: dict[str, str] = {}
    for i in range(n):  # only when some hash repeats: find the first pair of sources with one key
        src = sources(i)
        key = sample_key(src, key_from)
        if hash(key) in dups:
            if key in seen:
                fix = (
                    "keys are file names without extension: use key_from='path' (--key-from path) to name "
                    "samples by their relative path, or rename one"
                    if key_from == "stem"
                    else "keys are relative paths with '/' and unsafe characters as '_': rename one"
                )
                raise ValueError(f"duplicate sample key {key!r}: {seen[key]!r} and {src!r} ({fix})")
            seen[key] = src


def _finish(kind: str, url: str, items: Sequence[FileItem], classes, storage_options,
            key_from: str) -> Source:
    if not len(items):
        raise ValueError(f"source {url!r} holds no images")
    _check_unique(items, key_from)
    return Source(
        kind=kind,
        url=url,
        items=items,
        classes=tuple(classes) if classes is not None else None,
        storage_options=storage_options,
    )


def _ext_error(name: str) -> str | None:
    ext = posixpath.splitext(name)[1].lstrip(".").lower()
    if ext in IMAGE_EXTS or ext in ("pgm", "jpe"):
        return None
    return f"not an image file (extension {ext or 'none'!r})"


def _folder_source(url: str, fs, root: str, storage_options, key_from: str) -> Source:
    root = root.rstrip("/")
    classes = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False) if fs.isdir(p))
    if not classes:
        raise ValueError(
            f"source {url!r}: no class sub-directories (expected an ImageFolder layout root/class/img)"
        )
    rows = _TableBuilder()
    for label, cls in enumerate(classes):
        cdir = f"{root}/{cls}"
        walked = sorted(fs.walk(cdir), key=lambda t: t[0])  # same order as torchvision's sorted(os.walk(...))
        for dirpath, _dirs, files in walked:
            d = dirpath.rstrip("/")
            rel = posixpath.relpath(d, root) if not _is_url(url) else d[len(root) + 1 :]
            # hidden files (.DS_Store, editors' temp files) are not dataset members
            rows.add_many([f"{rel}/{f}" for f in sorted(files) if not f.startswith(".")], label)
    table = rows.table("folder", url, fs, root, classes, key_from)
    return _finish("folder", url, table, classes, storage_options, key_from)


def _full_url(url: str, fs, path: str) -> str:
    """A path from ``fs`` turned back into something ``url_to_fs`` opens (protocol restored for URLs)."""
    if not _is_url(url):
        return path
    return fs.unstrip_protocol(path)


def _list_source(url: str, fs, path: str, storage_options, key_from: str) -> Source:
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
        classes = None
    except ValueError:
        classes = sorted({lab for _, lab, _ in rows})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[lab] for _, lab, _ in rows]
    for (_, _, lineno), label in zip(rows, labels, strict=True):
        if label < 0:
            raise ValueError(f"{url}:{lineno}: label must be >= 0, got {label}")
    table = _TableBuilder()
    for a in range(0, len(rows), 1024):  # a segment per block of lines: their common prefix stored once
        table.add_many([p for p, _, _ in rows[a : a + 1024]], labels[a : a + 1024])
    items = table.table("list", url, fs, base, classes, key_from)
    paths = (items._path(items.source(i)) for i in range(len(items)))
    missing = [i for i, p in enumerate(paths) if not _is_url(p) and not os.path.exists(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        first = items[missing[0]]
        raise FileNotFoundError(
            f"source {url!r}: listed file {first.source!r} does not exist (looked at {first.path}){more}"
        )
    return _finish("list", url, items, classes, storage_options, key_from)


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
    url: str,
    storage_options: dict | None = None,
    *,
    on_duplicate: Callable[[DuplicateMemberError], None] | None = None,
) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """Yield ``(key, [(member name, bytes), ...])`` for each sample of a WebDataset tar, in order.

    Members are grouped the way webdataset groups them (key = name up to the basename's first dot, adjacent
    members). Directories and other non-file members are skipped. Nothing is decoded here.

    Args:
        url: the shard.
        storage_options: fsspec options.
        on_duplicate: None to raise on a sample that repeats an extension; else called with the error (once
            per such sample), and the sample, all of its members, is left out while reading goes on.

    Raises:
        DuplicateMemberError: a sample repeats an extension, and ``on_duplicate`` is None.
        ShardError: the tar is malformed, or a key comes back after another key (members not adjacent).
    """
    seen: set[str] = set()
    key: str | None = None
    members: list[tuple[str, bytes]] = []
    exts: set[str] = set()
    bad = False  # the current sample repeated an extension: drop it whole
    last_done: str | None = None
    try:
        from relabel_shards.tarstream import RetryingReader, fsspec_opener

        raw = RetryingReader(fsspec_opener(url, storage_options), url).open_now()  # deadline + retries
        with raw, tarfile.open(fileobj=raw, mode="r|*", tarinfo=StrictTarInfo) as tar:
            for ti in tar:
                if not ti.isreg():
                    continue
                k, ext = split_member_name(ti.name)
                f = tar.extractfile(ti)
                data = f.read() if f is not None else b""
                if len(data) != ti.size:
                    raise tarfile.ReadError(f"member {ti.name!r} holds {len(data)} of {ti.size} bytes")
                if k != key:
                    if key is not None:
                        if not bad:
                            yield key, members
                        last_done = key
                    if k in seen:
                        raise DuplicateKeyError(
                            f"{url}: key {k!r} appears twice (its members are not adjacent, "
                            "or two samples share it)"
                        )
                    seen.add(k)
                    key, members, exts, bad = k, [], set(), False
                if ext in exts and not bad:
                    err = DuplicateMemberError(url, k, ti.name)
                    if on_duplicate is None:
                        raise err
                    on_duplicate(err)
                    bad = True
                exts.add(ext)
                members.append((ti.name, data))
    except (tarfile.TarError, EOFError) as e:
        where = f" after key {last_done!r}" if last_done is not None else " before its first whole sample"
        pending = f" (key {key!r} incomplete)" if key is not None else ""
        raise ShardError(f"{url}: truncated or corrupt tar{where}{pending} ({e})") from None
    if key is not None and not bad:
        yield key, members


def image_member(members: Sequence[tuple[str, bytes]]) -> tuple[str, bytes] | None:
    """The first member whose extension is an image extension (``jpg``, ``png``, ...), or None."""
    by_ext = {split_member_name(name)[1]: (name, data) for name, data in reversed(members)}
    ext = image_ext(split_member_name(name)[1] for name, _ in members)
    return None if ext is None else by_ext[ext]


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """Decode image bytes fully into an upright RGB ``PIL.Image`` (a truncated or non-image file raises here).

    The one rule of ``relabel_shards.images.open_image``: the EXIF orientation is applied for every format
    (label maps describe the upright image, DESIGN.md), so ``.size`` is the upright width and height that
    the sample's ``.json`` records.

    Args:
        data: the file's bytes.
        max_pixels: images with more pixels fail (``ImageTooLargeError``); 0 or None: no limit.

    Raises:
        ValueError: the bytes are empty, not a decodable image, or over the pixel limit; the message says
            why (a ``relabel_shards.images.ImageError``).
    """
    return open_image(data, max_pixels=max_pixels).to_pil()

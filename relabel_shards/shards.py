"""Writing and reading WebDataset shards and ``_info.json``: keys, members, atomic writes, checksums, URLs.

The layout (see README "Shard layout" and DESIGN.md):

- ``{prefix}-{index:06d}.tar``: standard tar files. A sample is the members that share a key, adjacent:
  the image bytes untouched (``key.jpg`` or the source's own extension), ``key.cls`` (class index as
  ASCII decimal), ``key.json`` (source, width, height, class name), then ``key.rlm`` (the label-map
  record, ``relabel_shards.labelmap``). Members passed through from input shards keep their order;
  ``key.rlm`` always comes last.
- Every member has mtime 0, uid/gid 0, empty user and group names and mode 0o444, so the same input
  gives the same bytes.
- ``_info.json`` beside the shards, timm's layout plus our own section per split (:func:`make_split_info`).

Writes are atomic: a shard is written to a local temporary file and then renamed (local) or uploaded
(object storage, where an upload becomes visible whole); ``_info.json`` is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

INFO_NAME = "_info.json"
LABELMAP_EXT = "rlm"
FORMAT_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


class ShardError(ValueError):
    """A shard or ``_info.json`` that is missing, malformed or disagrees with itself; the message names it."""


# ----------------------------------------------------------------------------------------------- keys


def key_from_path(relpath: str) -> str:
    """The sample key for a source file: its basename without the extension, unsafe characters as ``_``.

    ``n01440764/n01440764_10026.JPEG`` -> ``n01440764_10026``. Keys never hold dots, because webdataset
    splits a member name into key and extension at the first dot of the basename.
    """
    base = os.path.basename(relpath.replace("\\", "/"))
    stem = base.rsplit(".", 1)[0] if "." in base else base
    key = _KEY_UNSAFE.sub("_", stem)
    if not key:
        raise ValueError(f"cannot derive a sample key from path {relpath!r}")
    return key


def image_ext(exts: Iterable[str]) -> str | None:
    """The sample's image member: the first extension that is exactly an image extension (case-insensitive).

    Every reader and writer picks the image with this one rule, so the label map built for a sample is
    the one its image is trained with: ``seg.png`` or ``mask.png`` members are never the image.
    """
    return next((e for e in exts if e.lower() in IMAGE_EXTS), None)


def shard_name(prefix: str, index: int) -> str:
    """``{prefix}-{index:06d}.tar``."""
    return f"{prefix}-{index:06d}.tar"


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into (key, extension) the way webdataset does: at the basename's first dot."""
    dirname, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), ext


# ---------------------------------------------------------------------------------------------- write


@dataclass(frozen=True)
class ShardRecord:
    """What ``_info.json`` says of one written shard."""

    filename: str
    num_samples: int
    bytes: int
    sha256: str


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def write_tar(fileobj: io.BufferedIOBase, samples: Iterable[Sequence[tuple[str, bytes]]]) -> int:
    """Write samples, each a sequence of (member name, bytes), into an uncompressed tar; return the count.

    Member names are written as given and in the given order; the caller keeps each sample's members
    adjacent and its keys unique.
    """
    n = 0
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for members in samples:
            for name, data in members:
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            n += 1
    return n


def sample_members(
    key: str,
    *,
    image: bytes,
    image_ext: str,
    label: int,
    meta: dict[str, Any],
    labelmap: bytes,
) -> list[tuple[str, bytes]]:
    """The members of one sample built from a plain image, in the shard's fixed order."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key must hold no '.' or '/', got {key!r}")
    return [
        (f"{key}.{image_ext.lower()}", image),
        (f"{key}.cls", str(int(label)).encode("ascii")),
        (f"{key}.json", json_bytes(meta)),
        (f"{key}.{LABELMAP_EXT}", labelmap),
    ]


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no extra white space, UTF-8. Same object, same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def file_sha256(fileobj: io.BufferedIOBase, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size in bytes, hex sha256) of a readable binary file object, read from its current position."""
    h = hashlib.sha256()
    size = 0
    while block := fileobj.read(chunk):
        h.update(block)
        size += len(block)
    return size, h.hexdigest()


_UMASK: list[int] = []


def _umask_mode(path: str, mode: int = 0o666) -> None:
    """Give a ``mkstemp`` file (created 0o600) the mode a plain ``open`` would: ``mode`` less the umask."""
    if not _UMASK:  # os.umask can only be read by setting it: do that once
        _UMASK.append(os.umask(0o022))
        os.umask(_UMASK[0])
    os.chmod(path, mode & ~_UMASK[0])


def temp_name(filename: str) -> tuple[str, str]:
    """(prefix, suffix) of the temporary files that stand in for ``filename`` while it is written.

    A killed writer leaves such a file behind; a rerun removes them (``relabel_shards.writer``).
    """
    return f".{filename}.", ".tmp"


class PartialShard:
    """One shard being written sample by sample into a local temporary file; :meth:`commit` publishes it.

    The tar bytes are exactly those :func:`write_tar` gives for the same samples. A local destination gets
    the finished file by ``os.replace`` (the temporary file lives in the destination directory); a remote
    one by a single upload, so a reader never sees a partial shard under its final name.
    """

    def __init__(self, out: str, filename: str, storage_options: dict | None = None):
        self.filename = filename
        self.num_samples = 0
        self._fs, root = url_to_fs(out, storage_options)
        self._url = join(out, filename)
        self._final = join(root, filename)
        self._local = _is_local(self._fs)
        self._storage_options = storage_options
        if self._local:
            os.makedirs(root, exist_ok=True)
        prefix, suffix = temp_name(filename)
        fd, self._tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=root if self._local else None)
        self._file = os.fdopen(fd, "w+b")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, members: Sequence[tuple[str, bytes]]) -> None:
        """Append one sample's members, in the given order."""
        for name, data in members:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self.num_samples += 1

    def commit(self) -> ShardRecord:
        """Finish the tar, move or upload it under its final name, and describe it.

        An upload is retried after transient errors within ``read_deadline`` plus one second per MiB
        (``relabel_shards.storage``); the temporary file is removed whatever happens.
        """
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.seek(0)
            size, digest = file_sha256(self._file)
            self._file.close()
            if self._local:
                _umask_mode(self._tmp)
                os.replace(self._tmp, self._final)
            else:
                from relabel_shards.storage import UPLOAD_MIN_RATE, call, split_options

                _, policy = split_options(self._storage_options)
                call(self._fs, "put_file", self._tmp, self._final, url=self._url, policy=policy,
                     what="upload", deadline=policy.read_deadline + size / UPLOAD_MIN_RATE)
        finally:
            self.abort()
        return ShardRecord(filename=self.filename, num_samples=self.num_samples, bytes=size, sha256=digest)

    def abort(self) -> None:
        """Drop the temporary file (a no-op after :meth:`commit`); never raises for a failing close.

        Closing flushes what is buffered, which fails again on a full disk (ENOSPC): the file is removed
        all the same, so a failed shard never keeps filling the disk.
        """
        try:
            if not self._file.closed:
                self._file.close()
        except OSError as e:
            log.warning("%s: closing the temporary file failed (%s); removing it", self.filename, e)
        finally:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass


def write_shard(out: str, filename: str, samples: Iterable[Sequence[tuple[str, bytes]]],
                storage_options: dict | None = None) -> ShardRecord:
    """Write one shard atomically to ``out/filename`` (local directory or fsspec URL) and describe it.

    The tar is assembled in a local temporary file; a local destination gets it by ``os.replace``, a remote
    one by a single upload, so a reader never sees a partial shard under its final name.
    """
    shard = PartialShard(out, filename, storage_options)
    try:
        for members in samples:
            shard.add(members)
    except BaseException:
        shard.abort()
        raise
    return shard.commit()


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``url`` so that readers see the old file or the new one, never a part."""
    fs, path = url_to_fs(url, storage_options)
    if _is_local(fs):
        d = os.path.dirname(path) or "."
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _umask_mode(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        from relabel_shards.storage import UPLOAD_MIN_RATE, call, split_options

        _, policy = split_options(storage_options)
        call(fs, "pipe_file", path, data, url=url, policy=policy, what="upload",
             deadline=policy.read_deadline + len(data) / UPLOAD_MIN_RATE)


def check_writable(out: str, storage_options: dict | None = None) -> None:
    """Write and remove a small probe object in ``out``, so a job fails before its first batch, not after.

    Raises:
        relabel_shards.storage.StorageError: no bucket, no credentials, access denied, unreachable, stalled
            (the message names ``out`` and the likely fix); OSError: a local folder that cannot be written.
    """
    import uuid

    fs, root = url_to_fs(out, storage_options)
    if _is_local(fs):
        os.makedirs(root, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=root)
        os.close(fd)
        os.unlink(probe)
        return
    from relabel_shards.storage import call, split_options

    _, policy = split_options(storage_options)
    name = f".relabel-shards-write-check-{uuid.uuid4().hex}"
    path = join(root, name)
    try:
        call(fs, "pipe_file", path, b"", url=out, policy=policy, what="test write")
    except FileNotFoundError as e:  # S3 says so for a missing bucket
        raise _no_bucket(out, e) from e
    try:
        call(fs, "rm_file", path, url=out, policy=policy, what="delete of the test object")
    except Exception as e:  # noqa: BLE001 - writing works, which is what was asked; say what is left
        log.warning("%s: could not delete the test object %s (%s)", out, name, e)


def _no_bucket(out: str, e: BaseException) -> Exception:
    from relabel_shards.storage import StorageNotFoundError, explain

    mapped = explain(e, out)
    return mapped if mapped is not None else StorageNotFoundError(
        f"{out}: cannot write there ({e}): does the bucket exist?", out)


# ------------------------------------------------------------------------------------------ _info.json


def make_split_info(split: str, shards: Sequence[ShardRecord], project: dict[str, Any]) -> dict[str, Any]:
    """One split of ``_info.json``: timm's fields plus ``relabel_shards`` (our section).

    ``project`` holds what the writer knows (annotator, labelmap geometry, class names, failures, ...);
    the shard list with sizes and sha256 and the format version are filled in here.
    """
    return {
        "name": split,
        "num_samples": sum(s.num_samples for s in shards),
        "filenames": [s.filename for s in shards],
        "shard_lengths": [s.num_samples for s in shards],
        "relabel_shards": {
            "format_version": FORMAT_VERSION,
            **project,
            "shards": [asdict(s) for s in shards],
        },
    }


def write_info(out: str, split_info: dict[str, Any], storage_options: dict | None = None,
               name: str | None = None, drop_foreign: bool = False) -> dict[str, Any]:
    """Add or replace one split in ``out/_info.json`` (other splits are kept) and write it atomically.

    ``drop_foreign``: start afresh over an ``_info.json`` with splits this project did not write (no
    ``relabel_shards`` section): those splits and the old name go.
    """
    try:
        info = read_info(out, storage_options)
    except (FileNotFoundError, ShardError) as e:
        if isinstance(e, ShardError) and not drop_foreign:
            raise
        info = {}
    if drop_foreign and foreign_splits(info):
        info = {}
    if name is not None or "name" not in info:
        info["name"] = name or os.path.basename(out.rstrip("/")) or "dataset"
    info.setdefault("splits", {})[split_info["name"]] = split_info
    write_bytes_atomic(join(out, INFO_NAME), json.dumps(info, indent=1, sort_keys=True).encode() + b"\n",
                       storage_options)
    return info


def read_info(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Read ``_info.json`` from a directory or URL prefix (or the file's own URL).

    One read deadline bounds it (``storage_options["read_deadline"]``, see ``relabel_shards.storage``).

    Raises:
        FileNotFoundError: there is no ``_info.json`` there.
        ShardError: it is not valid JSON, or has no ``splits`` object.
        relabel_shards.storage.StorageError: the storage cannot be reached, refuses access, or stalls (the
            message names the URL and the likely fix).
    """
    from relabel_shards.storage import cat

    if not url.rstrip("/").endswith(".json"):
        url = join(url, INFO_NAME)
    try:
        raw = cat(url, storage_options)
    except FileNotFoundError as e:
        if getattr(e, "url", None):  # a StorageNotFoundError: the bucket itself is missing
            raise
        raise FileNotFoundError(f"no {INFO_NAME} at {url}") from None
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{url}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits", {}), dict):
        raise ShardError(f"{url}: expected an object with a 'splits' object")
    return info


def foreign_splits(info: dict[str, Any]) -> list[str]:
    """The splits of an ``_info.json`` that this project did not write (no ``relabel_shards`` section)."""
    return sorted(str(k) for k, v in (info.get("splits") or {}).items()
                  if not isinstance(v, dict) or not isinstance(v.get("relabel_shards"), dict))


def get_split(info: dict[str, Any], split: str | None, where: str = INFO_NAME) -> dict[str, Any]:
    """The named split of an ``_info.json`` (the only one, when ``split`` is None)."""
    splits = info.get("splits", {})
    if split is None:
        if len(splits) != 1:
            raise ShardError(f"{where} holds splits {sorted(splits)}; name one with split=...")
        return next(iter(splits.values()))
    if split not in splits:
        raise ShardError(f"{where} has no split {split!r}; it holds {sorted(splits)}")
    return splits[split]


# ------------------------------------------------------------------------------------------------ read


class StrictTarInfo(tarfile.TarInfo):
    """Read tars with ``tarfile.open(..., tarinfo=StrictTarInfo)``: only a zero block ends the archive.

    Plain ``tarfile`` stops iterating quietly at the end of data or at a damaged header after the first
    member, so a shard cut at a member boundary, or with a flipped header byte, reads as a shorter shard and
    its lost samples vanish without a word. With this class those raise ``tarfile.ReadError`` instead.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise tarfile.ReadError(f"truncated: data ends at byte {tarfile_.offset} without the "
                                    "end-of-archive marker") from None
        except tarfile.InvalidHeaderError as e:
            raise tarfile.ReadError(f"damaged tar header at byte {tarfile_.offset} ({e})") from None


# ----------------------------------------------------------------------------------------------- URLs


def url_to_fs(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path) for a local path or URL; a missing s3fs/gcsfs names its extra.

    Every remote filesystem gets connect and read timeouts (``relabel_shards.storage``); our own keys of
    ``storage_options`` (``read_deadline``, ``retries``) are not passed to fsspec.
    """
    import fsspec  # light, but keep ``import relabel_shards.shards`` free of it until needed

    from relabel_shards.storage import filesystem_kwargs, split_options, tune_filesystem

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        from relabel_shards._optional import require

        require("s3fs", f"reading or writing {url}")
    elif protocol in ("gs", "gcs"):
        from relabel_shards._optional import require

        require("gcsfs", f"reading or writing {url}")
    options, policy = split_options(storage_options)
    fs, path = fsspec.core.url_to_fs(url, **filesystem_kwargs(protocol, options, policy))
    tune_filesystem(fs)
    return fs, path


def join(base: str, name: str) -> str:
    """Join a directory or URL prefix and a relative name with exactly one '/'."""
    return f"{base.rstrip('/')}/{name}" if base else name


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (``train-{000000..000009}.tar``) and '::'-joined lists into a flat list."""
    from webdataset.shardlists import expand_urls as _wds_expand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        out.extend(_wds_expand(item))
    return out

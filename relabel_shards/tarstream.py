"""Sequential tar reading over fsspec with retries: a stream of ``(key, {extension: bytes})`` samples.

One shard is read front to back once (no seeks in the normal case), the way object stores like it. A
transient error (connection reset, timeout, 5xx surfacing as ``OSError``) re-opens the object and continues
at the byte where it stopped, up to ``retries`` times with exponential back-off.
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from relabel_shards.shards import ShardError, StrictTarInfo, split_member_name, url_to_fs

log = logging.getLogger(__name__)

# Errors that say "the data is not there" rather than "the connection hiccuped": never retried.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_MODULES = ("aiohttp", "botocore", "urllib3", "requests", "google", "fsspec", "s3fs", "gcsfs")
_READ_BLOCK = 8 << 20  # 8 MiB range requests on object stores; sequential reads either way


def is_transient(exc: BaseException) -> bool:
    """Whether an I/O error is worth a retry: network and timeout errors, not missing or forbidden files."""
    if isinstance(exc, _PERMANENT) or isinstance(exc, ShardError):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return type(exc).__module__.split(".")[0] in _TRANSIENT_MODULES


class RetryingReader(io.RawIOBase):
    """A read-only binary stream that re-opens its source at the current offset after transient errors.

    Args:
        opener: ``opener(offset)`` returns a binary file positioned at byte ``offset`` of the object.
        name: the URL, for messages.
        retries: how many re-opens one ``read`` may use before the error propagates.
        backoff: seconds before the first retry; doubled on each further one.
    """

    def __init__(self, opener: Callable[[int], BinaryIO], name: str, retries: int = 3, backoff: float = 0.5):
        super().__init__()
        self._opener = opener
        self.name = name
        self.retries = retries
        self.backoff = backoff
        self.pos = 0
        self.retried = 0
        self._f: BinaryIO | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: D102
        view = memoryview(buf).cast("B")
        attempt = 0
        while True:
            try:
                if self._f is None:
                    self._f = self._opener(self.pos)
                data = self._f.read(len(view))
            except Exception as e:  # noqa: BLE001 - classified right below
                if attempt >= self.retries or not is_transient(e):
                    raise
                delay = self.backoff * (2**attempt)
                attempt += 1
                self.retried += 1
                log.warning("%s: %s at byte %d; retry %d/%d in %.1f s", self.name, e, self.pos, attempt,
                            self.retries, delay)
                self._close_inner()
                time.sleep(delay)
                continue
            n = len(data)
            view[:n] = data
            self.pos += n
            return n

    def _close_inner(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; we drop it anyway
                pass
            self._f = None

    def close(self) -> None:
        self._close_inner()
        super().close()


def fsspec_opener(url: str, storage_options: dict | None = None) -> Callable[[int], BinaryIO]:
    """``opener(offset)`` for :class:`RetryingReader`: an fsspec file of ``url`` positioned at ``offset``.

    HTTP(S) is opened as a plain stream (no range requests, which simple servers ignore); object stores
    get large sequential range reads.
    """
    fs, path = url_to_fs(url, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    kwargs: dict = {"block_size": 0} if protocol in ("http", "https") else {}
    if protocol not in ("file", "local", "http", "https"):
        kwargs = {"block_size": _READ_BLOCK, "cache_type": "readahead"}

    def opener(offset: int) -> BinaryIO:
        f = fs.open(path, "rb", **kwargs)
        if offset:
            try:
                f.seek(offset)
            except (io.UnsupportedOperation, ValueError, NotImplementedError):
                left = offset  # a plain stream: read up to where we were
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        raise EOFError(f"{url}: ended at byte {offset - left} on re-open, expected {offset}"
                                       ) from None
                    left -= len(chunk)
        return f

    return opener


def duplicate_member_message(url: str, key: str, name: str) -> str:
    """The error for a tar member whose extension the sample already has (shared by every tar reader)."""
    return (
        f"{url}: key {key!r}: member {name!r} repeats an extension of the same sample (two samples with "
        "the same key next to each other, or a member written twice); refusing to pick one copy"
    )


def iter_tar_samples(stream: BinaryIO, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar stream's members into samples: ``(key, {extension: bytes})``, in file order.

    Members of one sample must be adjacent (webdataset's rule); directories and other non-files are ignored.

    Raises:
        ShardError: the tar is truncated or corrupt (naming ``url`` and the last complete key), a key
            comes back after other keys (the shard was not written with adjacent members), or an extension
            repeats within one sample (two samples with the same key next to each other, or a member written
            twice: one copy would silently replace the other, as webdataset also refuses).
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    seen: set[str] = set()
    last_done: str | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=StrictTarInfo) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_member_name(info.name)
                if k != key:
                    if key is not None:
                        yield key, members
                        last_done = key
                    if k in seen:
                        raise ShardError(f"{url}: key {k!r} appears again after other keys; members of a "
                                         "sample must be adjacent")
                    seen.add(k)
                    key, members = k, {}
                if ext in members:
                    raise ShardError(duplicate_member_message(url, k, info.name))
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name!r} holds {len(data)} of {info.size} bytes")
                members[ext] = data
    except (tarfile.TarError, EOFError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        where = f"after key {last_done!r}" if last_done else "before the first complete sample"
        pending = f" (key {key!r} incomplete)" if key is not None else ""
        raise ShardError(f"{url}: truncated or corrupt tar {where}{pending}: {e}") from e
    if key is not None:
        yield key, members

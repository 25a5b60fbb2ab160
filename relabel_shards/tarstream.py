"""Sequential tar reading over fsspec with retries and a deadline: a stream of ``(key, {ext: bytes})``.

One shard is read front to back once (no seeks in the normal case), the way object stores like it. A
transient error (connection reset, timeout, 5xx) re-opens the object and continues at the byte where it
stopped, with exponential back-off, up to ``retries`` times and within one deadline per read
(``read_deadline``, see ``relabel_shards.storage``); then an error names the URL. A timeout is never
taken for a missing file.
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from relabel_shards.shards import ShardError, StrictTarInfo, split_member_name, url_to_fs
from relabel_shards.storage import Policy, is_async, is_transient, retrying, run, split_options

__all__ = ["RetryingReader", "fsspec_opener", "is_transient", "iter_tar_samples"]

log = logging.getLogger(__name__)

_READ_BLOCK = 8 << 20  # 8 MiB range requests on object stores; sequential reads either way


class RetryingReader(io.RawIOBase):
    """A read-only binary stream that re-opens its source at the current offset after transient errors.

    Args:
        opener: ``opener(offset)`` returns a binary file positioned at byte ``offset`` of the object. An
            opener from :func:`fsspec_opener` also takes ``timeout=`` (seconds), and so do its files'
            ``read``: every attempt is then cut off when the read's deadline passes.
        name: the URL, for messages.
        retries: how many re-opens one ``read`` may use before the error propagates.
        backoff: seconds before the first retry; doubled on each further one.
        deadline: seconds one ``read`` may take, all attempts and back-off included; None: the opener's
            ``read_deadline`` (from its ``storage_options``), else the default (``relabel_shards.storage``).

    Attributes:
        retried: retries used so far (each is also logged as a warning).

    Raises (from ``read``):
        relabel_shards.storage.StorageTimeoutError: the deadline passed; StorageError: out of retries.
        Errors that are not transient (``FileNotFoundError``, ...) at once.
    """

    def __init__(self, opener: Callable[..., BinaryIO], name: str, retries: int = 3, backoff: float = 0.5,
                 deadline: float | None = None):
        super().__init__()
        self._opener = opener
        self.name = name
        self.retries = retries
        self.backoff = backoff
        if deadline is None:
            deadline = getattr(opener, "read_deadline", None) or split_options(None)[1].read_deadline
        self.policy = Policy(read_deadline=float(deadline), retries=retries, backoff=backoff)
        self._bounded = bool(getattr(opener, "bounded", False))
        self.pos = 0
        self.retried = 0
        self._f: Any = None

    def readable(self) -> bool:
        return True

    def _attempt(self, n: int, left: float) -> bytes:
        try:
            if self._f is None:
                self._f = self._opener(self.pos, timeout=left) if self._bounded else self._opener(self.pos)
            return self._f.read(n, timeout=left) if self._bounded else self._f.read(n)
        except BaseException:
            self._close_inner()
            raise

    def open_now(self) -> RetryingReader:
        """Open the source now (with retries and the deadline) rather than at the first read: a missing
        object raises ``FileNotFoundError`` here."""
        if self._f is None:
            retrying(lambda left: self._attempt(0, left), self.name, self.policy, "open",
                     on_retry=self._count)
        return self

    def _count(self) -> None:
        self.retried += 1

    def readinto(self, buf) -> int:  # noqa: D102
        view = memoryview(buf).cast("B")
        data = retrying(lambda left: self._attempt(len(view), left), self.name, self.policy,
                        f"read at byte {self.pos}", on_retry=self._count)
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


class _RangeFile:
    """An object on an async object store (s3fs, gcsfs) read by range requests, each bounded in time."""

    def __init__(self, fs: Any, path: str, offset: int, timeout: float, block: int = _READ_BLOCK):
        start = time.monotonic()
        self._fs, self._path, self._block = fs, path, block
        self._size = int(run(fs, "info", path, timeout=timeout)["size"])
        self._pos = offset
        self._buf = b""
        self._left = timeout - (time.monotonic() - start)

    def read(self, n: int = -1, timeout: float | None = None) -> bytes:
        if not self._buf and self._pos < self._size:
            end = min(self._pos + max(self._block, n if n > 0 else 0), self._size)
            self._buf = run(self._fs, "cat_file", self._path, start=self._pos, end=end,
                            timeout=timeout if timeout is not None else self._left)
            self._pos += len(self._buf)
        out, self._buf = (self._buf, b"") if n < 0 or n >= len(self._buf) else (self._buf[:n], self._buf[n:])
        return out

    def close(self) -> None:
        self._buf = b""


class _HttpStream:
    """An HTTP(S) object read as one streamed GET (a ``Range`` from ``offset`` where the server honours it),
    each step bounded in time. Simple servers (``python -m http.server``) ignore ranges; then the bytes before
    ``offset`` are read and dropped."""

    def __init__(self, fs: Any, url: str, offset: int, timeout: float):
        from fsspec.asyn import sync

        end = time.monotonic() + timeout
        self._loop = fs.loop
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        self._f = sync(fs.loop, fs.open_async, url, "rb", size=-1, headers=headers, timeout=timeout)
        self._read = lambda n, t: sync(self._loop, self._f.read, n, timeout=max(t, 1e-3))
        try:
            self._read(0, end - time.monotonic())  # sends the GET: 404 -> FileNotFoundError, status checked
            status = getattr(self._f.r, "status", 200)
            left = offset if offset and status != 206 else 0
            while left:
                chunk = self._read(min(left, 1 << 20), end - time.monotonic())
                if not chunk:
                    raise EOFError(f"{url}: ended at byte {offset - left} on re-open, expected {offset}")
                left -= len(chunk)
        except BaseException:
            self.close()
            raise

    def read(self, n: int = -1, timeout: float | None = None) -> bytes:
        return self._read(n, timeout if timeout is not None else 60.0)

    def close(self) -> None:
        from fsspec.asyn import sync

        r, self._f.r = getattr(self._f, "r", None), None
        if r is not None:
            self._loop.call_soon_threadsafe(r.close)
        if not self._f.closed:
            try:
                sync(self._loop, self._f.close, timeout=1)
            except Exception:  # noqa: BLE001 - closing a dead connection may fail; it is dropped either way
                self._f.closed = True


def fsspec_opener(url: str, storage_options: dict | None = None) -> Callable[..., BinaryIO]:
    """``opener(offset, timeout=None)`` for :class:`RetryingReader`: ``url`` positioned at ``offset``.

    HTTP(S) is opened as a plain stream; object stores get large sequential range reads; every request of
    a remote object is cancelled when ``timeout`` (what is left of the read's deadline) runs out. The opener
    carries ``read_deadline`` from ``storage_options`` for the reader.
    """
    fs, path = url_to_fs(url, storage_options)
    _, policy = split_options(storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    remote = is_async(fs)

    def opener(offset: int, timeout: float | None = None) -> Any:
        left = policy.read_deadline if timeout is None else timeout
        if remote and protocol in ("http", "https"):
            return _HttpStream(fs, path, offset, left)
        if remote:
            return _RangeFile(fs, path, offset, left)
        f = fs.open(path, "rb")
        if offset:
            f.seek(offset)
        return _Plain(f)

    opener.bounded = True  # type: ignore[attr-defined]
    opener.read_deadline = policy.read_deadline  # type: ignore[attr-defined]
    return opener


def duplicate_member_message(url: str, key: str, name: str) -> str:
    """The error for a tar member whose extension the sample already has (shared by every tar reader)."""
    return (
        f"{url}: key {key!r}: member {name!r} repeats an extension of the same sample (two samples with "
        "the same key next to each other, or a member written twice); refusing to pick one copy"
    )


class _Plain:
    """A local (or synchronous fsspec) file with the ``read(n, timeout=)`` of the bounded openers."""

    def __init__(self, f: Any):
        self._f = f

    def read(self, n: int = -1, timeout: float | None = None) -> bytes:
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()


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

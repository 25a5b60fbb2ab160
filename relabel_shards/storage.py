"""Bounded waits and plain-language errors for object storage (fsspec: ``s3://``, ``gs://``, ``http(s)://``).

Three rules, applied to every fsspec filesystem this package creates (:func:`filesystem_kwargs`, called by
``relabel_shards.shards.url_to_fs``):

- **Timeouts on every request.** Connecting may take ``CONNECT_TIMEOUT`` s and a socket may stay silent for
  ``READ_TIMEOUT`` s (capped at the read deadline, and at half of it for reads, so a stalled connection
  leaves time for a retry): aiohttp's ``ClientTimeout`` for HTTP and GCS,
  botocore's ``connect_timeout`` / ``read_timeout`` for S3, whose own retries are cut down
  (``total_max_attempts`` 2, s3fs's retries 2) so that retrying is decided here, counted and logged.
- **One deadline per read.** ``storage_options={"read_deadline": seconds}`` (default
  ``DEFAULT_READ_DEADLINE``, or the ``RELABEL_SHARDS_READ_DEADLINE`` environment variable) bounds one read
  (a block of a shard, a whole ``_info.json``) from its first attempt to its last retry: each attempt runs as
  a coroutine on fsspec's event loop under ``asyncio.wait_for`` with what is left of the deadline, and
  transient errors are retried with exponential back-off while time is left. A stalled server then costs
  at most the deadline, and the error names the URL. Uploads (a shard, a sidecar, ``_info.json``) get the
  deadline plus one second per MiB. Calls that other modules make on the filesystem directly (listing a
  source folder: ``isdir``, ``walk``, ``find``) are bounded by the per-request timeouts and the cut-down
  library retries only (S3: at most 4 attempts of connect + read timeout).
- **Errors a user can act on.** :func:`explain` turns botocore / aiohttp / google-auth errors (no
  credentials, no bucket, access denied, endpoint unreachable, timeout) into a :class:`StorageError` whose
  one-line message names the URL and the likely fix. A timeout or a refused connection is never reported
  as "not found" (fsspec's HTTP filesystem turns any failure of its HEAD request into
  ``FileNotFoundError``; :func:`is_transient` looks at the cause).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_READ_DEADLINE = 120.0  # s: one read, all retries included
CONNECT_TIMEOUT = 10.0  # s: TCP (+TLS) connect, per request
READ_TIMEOUT = 30.0  # s: the longest silence on a socket, per request
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5  # s before the first retry; doubled each time
UPLOAD_MIN_RATE = 1 << 20  # bytes/s an upload is allowed beyond the deadline (a 1 GiB shard: 1024 s more)
DEADLINE_ENV = "RELABEL_SHARDS_READ_DEADLINE"
# Our keys in ``storage_options``; removed before the rest goes to fsspec.
OWN_OPTIONS = ("read_deadline", "retries")

# Errors that say "the data is not there" rather than "the connection hiccuped": never retried.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_MODULES = (
    "aiohttp",
    "botocore",
    "aiobotocore",
    "urllib3",
    "requests",
    "google",
    "fsspec",
    "s3fs",
    "gcsfs",
)


class StorageError(OSError):
    """Object storage could not be used: the message names the URL, what went wrong and the likely fix.

    Attributes:
        url: the object or prefix concerned.
    """

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url

    def __str__(self) -> str:
        return str(self.args[0])


class StorageTimeoutError(StorageError, TimeoutError):
    """A read or write did not finish within its deadline (all retries included)."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A bucket (not merely an object) does not exist."""


class StoragePermissionError(StorageError, PermissionError):
    """Credentials are missing, or do not allow this access."""


@dataclass(frozen=True)
class Policy:
    """How long one read may take and how often it is tried (from ``storage_options``; see the module doc).

    Attributes:
        read_deadline: seconds for one read, first attempt to last retry.
        retries: further attempts after a transient error, within the deadline.
        backoff: seconds before the first retry, doubled each time.
    """

    read_deadline: float = DEFAULT_READ_DEADLINE
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF

    @property
    def connect_timeout(self) -> float:
        return min(CONNECT_TIMEOUT, self.read_deadline)

    @property
    def read_timeout(self) -> float:
        # half the deadline at most, so that a stalled connection leaves time for a retry
        return min(READ_TIMEOUT, self.read_deadline / 2)


def split_options(storage_options: dict | None) -> tuple[dict, Policy]:
    """(the options for fsspec, the :class:`Policy`): ``read_deadline`` and ``retries`` are ours.

    Raises:
        ValueError: ``read_deadline`` not a positive number, or ``retries`` not an integer >= 0.
    """
    opts = dict(storage_options or {})
    deadline = opts.pop("read_deadline", None)
    if deadline is None:
        env = os.environ.get(DEADLINE_ENV)
        deadline = DEFAULT_READ_DEADLINE if env in (None, "") else env
    try:
        deadline = float(deadline)
    except (TypeError, ValueError):
        raise ValueError(f"read_deadline must be a number of seconds > 0, got {deadline!r}") from None
    if not deadline > 0:
        raise ValueError(f"read_deadline must be a number of seconds > 0, got {deadline!r}")
    retries = opts.pop("retries", DEFAULT_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    return opts, Policy(read_deadline=deadline, retries=retries)


def filesystem_kwargs(protocol: str, options: dict, policy: Policy) -> dict:
    """fsspec options for ``protocol`` with our timeouts added where the user did not set their own."""
    opts = dict(options)
    if protocol in ("http", "https", "gs", "gcs"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=policy.connect_timeout, sock_read=policy.read_timeout
        )
        if protocol in ("http", "https"):
            client = dict(opts.get("client_kwargs") or {})
            client.setdefault("timeout", timeout)
            opts["client_kwargs"] = client
        else:
            opts.setdefault("requests_timeout", timeout)
    elif protocol in ("s3", "s3a"):
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("connect_timeout", policy.connect_timeout)
        config.setdefault("read_timeout", policy.read_timeout)
        config.setdefault("retries", {"total_max_attempts": 2, "mode": "standard"})
        opts["config_kwargs"] = config
    return opts


def tune_filesystem(fs: Any) -> None:
    """Cut s3fs's own retry loop (5 attempts by default, each with botocore's) to 2: we retry above it."""
    if type(fs).__module__.startswith("s3fs") and getattr(fs, "retries", 2) > 2:
        fs.retries = 2


# ------------------------------------------------------------------------------------------- errors


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_timeout(e: BaseException) -> bool:
    name = type(e).__name__
    return isinstance(e, TimeoutError) or "Timeout" in name


def _is_connect_failure(e: BaseException) -> bool:
    name = type(e).__name__
    return isinstance(e, ConnectionRefusedError) or name in (
        "ClientConnectorError",
        "ClientConnectorDNSError",
        "EndpointConnectionError",
        "ConnectionRefusedError",
    )


def is_transient(exc: BaseException) -> bool:
    """Whether an I/O error is worth a retry: network errors, timeouts and 5xx, not missing or forbidden data.

    A ``FileNotFoundError`` caused by a timeout or a failed connection (fsspec's HTTP filesystem raises one
    for any failed HEAD request) is transient; one caused by a 404, or with no cause, is not.
    """
    from relabel_shards.shards import ShardError

    if isinstance(exc, StorageError) or isinstance(exc, ShardError):
        return False
    if isinstance(exc, FileNotFoundError):
        cause = exc.__cause__
        if cause is None or _status(cause) in (403, 404):
            return False
        return is_transient(cause)
    if isinstance(exc, _PERMANENT):
        return False
    status = _status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if _is_timeout(exc) or isinstance(exc, (ConnectionError, OSError)):
        return True
    name = type(exc).__name__
    if name in (
        "NoCredentialsError",
        "PartialCredentialsError",
        "DefaultCredentialsError",
        "NoRegionError",
        "ParamValidationError",
    ):
        return False
    return type(exc).__module__.split(".")[0] in _TRANSIENT_MODULES


def _backend(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] in _TRANSIENT_MODULES


def explain(
    exc: BaseException, url: str | None = None, *, deadline: float | None = None, fallback: bool = True
) -> StorageError | None:
    """A :class:`StorageError` with a one-line message and a fix for a storage backend error, else None.

    Recognized: no credentials, access denied, no bucket, endpoint unreachable (refused, DNS), timeouts,
    and (``fallback``) any other botocore / aiohttp / google-auth error (named by its type). A missing object
    is left alone (None): it stays the caller's ``FileNotFoundError``. So are errors of local files.
    """
    if isinstance(exc, StorageError):
        return exc
    chain = _chain(exc)
    remote = url is not None and "://" in url and not url.startswith("file://")
    if not remote and not any(_backend(e) for e in chain):
        return None
    where = url or "object storage"
    for e in chain:
        name, text = type(e).__name__, " ".join(str(e).split())
        code = ""
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket" or "bucket does not exist" in text.lower():
            return StorageNotFoundError(
                f"{where}: the bucket does not exist: check its name (and the endpoint / region), or create "
                "it first",
                url,
            )
        if isinstance(exc, FileNotFoundError) and not (exc.__cause__ is not None and is_transient(exc)):
            return None  # a missing object: not ours to reword
        if name in (
            "NoCredentialsError",
            "PartialCredentialsError",
            "DefaultCredentialsError",
            "RefreshError",
            "NoAuthTokenError",
        ):
            fix = (
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
                "storage_options={'anon': True} for a public bucket"
                if where.startswith(("s3:", "s3a:"))
                else "set GOOGLE_APPLICATION_CREDENTIALS or run 'gcloud auth application-default login', "
                "or pass storage_options={'token': 'anon'} for a public bucket"
                if where.startswith(("gs:", "gcs:"))
                else "provide credentials"
            )
            return StoragePermissionError(f"{where}: no credentials ({text}): {fix}", url)
        status = _status(e)
        denied = code in (
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
            "AllAccessDisabled",
            "InvalidToken",
        )
        if denied or status in (401, 403) or isinstance(e, PermissionError):
            return StoragePermissionError(
                f"{where}: access denied ({code or text or status}): these credentials may not read or write "
                "here; check the bucket policy / IAM role, or use other credentials",
                url,
            )
        if _is_connect_failure(e) or (isinstance(e, OSError) and getattr(e, "errno", None) in (111, 113)):
            return StorageError(
                f"{where}: cannot connect ({name}: {text}): is the endpoint right (AWS_ENDPOINT_URL, "
                "client_kwargs={'endpoint_url': ...}) and is the server up?",
                url,
            )
        if _is_timeout(e):
            limit = f" within {deadline:g} s" if deadline else ""
            return StorageTimeoutError(
                f"{where}: no answer{limit} (the server accepted the connection but stalled): check the "
                "server, or allow more time with read_deadline (--read-deadline)",
                url,
            )
    top = chain[0]
    if fallback and _backend(top) and not isinstance(top, FileNotFoundError):
        return StorageError(f"{where}: {type(top).__name__}: {' '.join(str(top).split())}", url)
    return None


# --------------------------------------------------------------------------------------- bounded calls


def is_async(fs: Any) -> bool:
    """Whether ``fs`` is an fsspec ``AsyncFileSystem`` (http, s3fs, gcsfs): its calls can be cancelled."""
    from fsspec.asyn import AsyncFileSystem

    return isinstance(fs, AsyncFileSystem) and not getattr(fs, "asynchronous", False)


def run(fs: Any, method: str, *args: Any, timeout: float | None, **kwargs: Any) -> Any:
    """``fs.<method>(*args, **kwargs)``, cancelled after ``timeout`` seconds on async filesystems.

    ``method`` is the public name (``cat_file``); on an async filesystem its coroutine (``_cat_file``) runs
    on fsspec's loop under ``asyncio.wait_for``, so a stalled server costs ``timeout`` at most.
    """
    if is_async(fs) and hasattr(fs, "_" + method):
        from fsspec.asyn import sync

        return sync(fs.loop, getattr(fs, "_" + method), *args, timeout=max(timeout or 0, 1e-3), **kwargs)
    return getattr(fs, method)(*args, **kwargs)


def retrying(
    attempt: Callable[[float], T],
    url: str,
    policy: Policy,
    what: str = "read",
    on_retry: Callable[[], None] | None = None,
    deadline: float | None = None,
) -> T:
    """``attempt(seconds_left)``, again after transient errors with back-off, within one deadline.

    Args:
        attempt: does the work; gets the seconds left and must not run longer (see :func:`run`).
        url: for messages.
        policy: deadline, retries and back-off.
        what: the operation, for log lines ("read", "upload", ...).
        on_retry: called once per retry (a counter).
        deadline: seconds for this call instead of ``policy.read_deadline``.

    Raises:
        StorageTimeoutError: out of time; StorageError: out of retries or a backend error that
        :func:`explain` recognizes; the original error otherwise (not found, a data error, ...).
    """
    limit = policy.read_deadline if deadline is None else deadline
    end = time.monotonic() + limit
    tries = 0
    refused: StorageError | None = None  # an earlier attempt could not connect: say that, not "no answer"
    while True:
        try:
            return attempt(max(end - time.monotonic(), 1e-3))
        except Exception as e:  # noqa: BLE001 - classified right below
            left = end - time.monotonic()
            transient = is_transient(e)
            if transient and refused is None and any(_is_connect_failure(c) for c in _chain(e)):
                refused = explain(e, url)
            delay = min(policy.backoff * (2**tries), max(left, 0.0))
            if transient and tries < policy.retries and left - delay > 0.05:
                tries += 1
                if on_retry is not None:
                    on_retry()
                log.warning(
                    "%s: %s during %s (%s); retry %d/%d in %.1f s",
                    url,
                    type(e).__name__,
                    what,
                    _text(e),
                    tries,
                    policy.retries,
                    delay,
                )
                time.sleep(delay)
                continue
            retried = f"{tries} retr{'y' if tries == 1 else 'ies'}"
            mapped = explain(e, url, fallback=not transient)
            if transient and refused is not None:
                mapped = refused
            if (
                transient
                and not (mapped is not None and "cannot connect" in str(mapped))
                and (left <= 0.05 or _is_timeout(e))
            ):
                mapped = StorageTimeoutError(
                    f"{url}: {what} got no answer within the {limit:g} s deadline ({retried}; last: "
                    f"{type(e).__name__}: {_text(e)}): check the server, or allow more time with "
                    "read_deadline (--read-deadline)",
                    url,
                )
            elif mapped is None and transient:
                mapped = StorageError(
                    f"{url}: {what} failed after {retried}: {type(e).__name__}: "
                    f"{_text(e)}; check the server and the network",
                    url,
                )
            if mapped is not None:
                raise mapped from e
            raise


def _text(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or "no message"


@contextmanager
def named_errors(url: str) -> Iterator[None]:
    """Raise a storage backend error from the block as the :class:`StorageError` of :func:`explain`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        mapped = explain(e, url)
        if mapped is None:
            raise
        raise mapped from e


def call(
    fs: Any,
    method: str,
    *args: Any,
    url: str,
    policy: Policy,
    what: str = "read",
    deadline: float | None = None,
    **kwargs: Any,
) -> Any:
    """``fs.<method>(*args, **kwargs)`` under :func:`retrying` (each attempt cancelled when time runs out)."""
    return retrying(
        lambda left: run(fs, method, *args, timeout=left, **kwargs), url, policy, what, deadline=deadline
    )


def cat(url: str, storage_options: dict | None = None) -> bytes:
    """The whole object at ``url`` (local path or URL), within one read deadline.

    Raises:
        FileNotFoundError: there is nothing at ``url``; StorageError: see :func:`retrying`.
    """
    from relabel_shards.shards import url_to_fs

    fs, path = url_to_fs(url, storage_options)
    _, policy = split_options(storage_options)
    return call(fs, "cat_file", path, url=url, policy=policy)

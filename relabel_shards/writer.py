"""The resumable, rank-aware shard job shared by ``build`` and ``convert``: plan, skip, write, ``_info.json``.

How a job runs (every rank runs the same code with the same arguments):

1. **Plan.** The caller fixes ``num_shards`` and what shard ``i`` holds (a known slice of its ordered input)
   and a ``fingerprint``: a digest of everything that decides the bytes (input list, model, settings). Shard
   ``i`` is ``{prefix}-{i:06d}.tar`` and belongs to rank ``i % world_size``.
2. **Skip.** :meth:`ShardJob.pending` lists this rank's shards that are not complete: a shard is complete when
   its stats sidecar ``{prefix}-{i:06d}_stats.json`` exists, was written with the same fingerprint (another
   fingerprint is an error: the output directory holds a different build), and the shard's size and sha256
   match it (the shard is read once to check). Temporary files a killed run left behind for this rank's
   shards are removed.
3. **Write.** :meth:`ShardJob.open` gives a :class:`ShardOutput` that streams samples into a temporary file;
   :meth:`ShardOutput.commit` publishes the shard (rename, or one upload) and only then writes the sidecar
   (img2dataset-style: sample count, bytes, sha256, keys, the failures of that shard). A run killed at any
   moment leaves either no shard, a shard without sidecar (rewritten on rerun: same bytes), or both.
4. **``_info.json``.** :meth:`ShardJob.finalize`, called by every rank after its own shards: when
   ``torch.distributed`` is initialized with this world size, all ranks meet at a barrier and rank 0 writes
   it; otherwise each rank looks for every sidecar and, if all are there, assembles ``_info.json`` from them.
   The last rank to finish therefore always writes it; two ranks finishing together write the same bytes
   (it holds nothing time- or host-dependent), so the race is harmless. Keys are checked to be unique across
   shards here. Remote outputs get ``_info.json`` last, after every shard. Under ``torch.distributed`` the
   ranks meet through the process group's store rather than a plain barrier: a rank that fails says so
   (:meth:`ShardJob.fail`, called by :class:`ChunkSink` and at exit), and the waiting ranks raise at once
   instead of hanging.

Before the first shard (:meth:`ShardJob.pending`) a job checks that it may write there: the destination takes
a test write (a missing bucket fails now, not after a shard of work), a folder holding a dataset this
project did not write is refused unless ``overwrite`` (an ``_info.json`` without our section,
``{prefix}-*.tar`` files without our sidecars), and a local folder is locked per rank
(``relabel_shards.outlock``) so a second build of the same rank stops with "another build is writing here"
instead of deleting the first one's temporary files. Object stores take no lock (their temporaries are
local files with unique names).

Test hook (tests only): ``RELABEL_SHARDS_TEST_PAUSE_AFTER`` = ``add:N`` (or ``N``) makes the process's writer
stop after its N-th sample, or ``publish:N`` after its N-th shard is published but before its sidecar is
written; it then creates the file named by ``RELABEL_SHARDS_TEST_PAUSE_FILE`` (if set) and sleeps until
killed. Kill tests use it to kill at a known point on machines of any speed.

:class:`SerialExecutor` runs the encoding and writing in one background thread so the producer never waits
on compression, disk or uploads.
"""

from __future__ import annotations

import atexit
import glob
import json
import logging
import os
import posixpath
import queue
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from relabel_shards.dist import RankFailedError, distributed_world, meet_ranks, report_failure, resolve_rank
from relabel_shards.outlock import RankLock
from relabel_shards.shards import (
    INFO_NAME,
    PartialShard,
    ShardError,
    ShardRecord,
    _is_local,
    check_writable,
    file_sha256,
    foreign_splits,
    join,
    json_bytes,
    make_split_info,
    read_info,
    shard_name,
    temp_name,
    url_to_fs,
    write_bytes_atomic,
    write_info,
)

log = logging.getLogger(__name__)

STATS_VERSION = 1
PAUSE_ENV, PAUSE_FILE_ENV = "RELABEL_SHARDS_TEST_PAUSE_AFTER", "RELABEL_SHARDS_TEST_PAUSE_FILE"
_pause_counts: dict[str, int] = {}
_job_runs: dict[tuple[str, str, str], int] = {}  # (out, prefix, fingerprint) -> jobs made in this process


class ForeignOutputError(FileExistsError):
    """The output folder holds a dataset this project did not write (refused unless ``overwrite``)."""


def _test_pause(event: str) -> None:
    """The kill tests' hook (see the module docstring); a no-op unless ``RELABEL_SHARDS_TEST_PAUSE_AFTER``."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    kind, _, n = spec.rpartition(":")
    if (kind or "add") != event:
        return
    _pause_counts[event] = _pause_counts.get(event, 0) + 1
    if _pause_counts[event] != int(n):
        return
    flag = os.environ.get(PAUSE_FILE_ENV)
    if flag:
        with open(flag, "w") as f:
            f.write(f"{event}:{n}\n")
    while True:  # until killed
        time.sleep(3600)
RESUME_CHECKS = ("sha256", "size")


@dataclass(frozen=True)
class ShardStats:
    """The sidecar of one complete shard (``{prefix}-{i:06d}_stats.json``)."""

    record: ShardRecord
    keys: tuple[str, ...]
    failures: tuple[dict, ...]
    fingerprint: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json_bytes(
            {
                "version": STATS_VERSION,
                "filename": self.record.filename,
                "num_samples": self.record.num_samples,
                "bytes": self.record.bytes,
                "sha256": self.record.sha256,
                "keys": list(self.keys),
                "failures": list(self.failures),
                "fingerprint": self.fingerprint,
                "extra": self.extra,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> ShardStats:
        try:
            d = json.loads(raw)
            return cls(
                record=ShardRecord(
                    filename=d["filename"],
                    num_samples=int(d["num_samples"]),
                    bytes=int(d["bytes"]),
                    sha256=str(d["sha256"]),
                ),
                keys=tuple(d["keys"]),
                failures=tuple(d["failures"]),
                fingerprint=str(d["fingerprint"]),
                extra=dict(d.get("extra") or {}),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{where}: not a valid stats file ({type(e).__name__}: {e})") from None


class _KeyList(Sequence[str]):
    """A shard's keys in one NUL-joined string (tar member names hold no NUL): ~16 bytes a key where a tuple
    of strings takes ~70. Iterates, indexes and compares like the tuple it stands for."""

    __slots__ = ("_text", "_n")

    def __init__(self, keys: Sequence[str]):
        self._text, self._n = "\0".join(keys), len(keys)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[str]:
        return iter(self._text.split("\0") if self._n else ())

    def __getitem__(self, i):  # type: ignore[override]
        return tuple(self)[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __repr__(self) -> str:
        return repr(tuple(self))

    __hash__ = None  # type: ignore[assignment]


class _HeldStats:
    """A sidecar as :meth:`ShardJob.finalize` holds it while it gathers every shard's (13k at ImageNet-21k
    scale): the keys as a :class:`_KeyList`, ``extra`` as compressed JSON, parsed on each access. Reads like
    :class:`ShardStats` (``record``, ``keys``, ``failures``, ``fingerprint``, ``extra``)."""

    __slots__ = ("record", "keys", "failures", "fingerprint", "_extra")

    def __init__(self, stats: ShardStats):
        self.record, self.failures, self.fingerprint = stats.record, stats.failures, stats.fingerprint
        self.keys = _KeyList(stats.keys)
        self._extra = zlib.compress(json.dumps(stats.extra, separators=(",", ":")).encode(), 1)

    @property
    def extra(self) -> dict:
        return json.loads(zlib.decompress(self._extra))


class ShardOutput:
    """One shard of the job being written: add samples in order, note failures, then commit."""

    def __init__(self, job: ShardJob, index: int):
        self.index = index
        self._job = job
        self._shard = PartialShard(job.out, job.filename(index), job.storage_options)
        self._keys: list[str] = []
        self._failures: list[dict] = []

    def add(self, key: str, members: Sequence[tuple[str, bytes]]) -> None:
        """Append one sample (its members adjacent, in the given order)."""
        self._shard.add(members)
        self._keys.append(key)
        _test_pause("add")

    def fail(self, failure: dict) -> None:
        """Record an input that was skipped (JSON-able; e.g. ``{"source": ..., "reason": ...}``)."""
        self._failures.append(dict(failure))

    def commit(self, extra: dict | None = None) -> ShardStats:
        """Publish the shard, then its sidecar; ``extra`` (JSON-able) goes into the sidecar for finalize."""
        record = self._shard.commit()
        _test_pause("publish")
        stats = ShardStats(
            record=record,
            keys=tuple(self._keys),
            failures=tuple(self._failures),
            fingerprint=self._job.fingerprint,
            extra=dict(extra or {}),
        )
        write_bytes_atomic(self._job.stats_url(self.index), stats.to_json(), self._job.storage_options)
        log.info("wrote %s (%d samples, %d bytes)", record.filename, record.num_samples, record.bytes)
        return stats

    def abort(self) -> None:
        self._shard.abort()


class ShardJob:
    """The output side of a sharded job for one rank (see the module docstring for the protocol).

    Args:
        out: output directory or fsspec URL prefix (``s3://bucket/path``, ``gs://...``).
        prefix: shard name prefix: shards are ``{prefix}-{index:06d}.tar``.
        num_shards: how many shards the whole job (all ranks) writes.
        fingerprint: digest of everything that decides the output bytes; sidecars carry it.
        rank, world_size: this rank (see :func:`resolve_rank`).
        storage_options: fsspec options for ``out`` (and ``read_deadline``, see ``relabel_shards.storage``).
        resume_check: how a shard with a sidecar is checked before it is skipped: ``"sha256"`` reads it once
            and compares size and digest (catches later damage too); ``"size"`` compares the size only (enough
            against kill -9, since a shard appears under its final name only whole; no read of large outputs).
        overwrite: write into a folder that holds a dataset this project did not write (its ``_info.json``
            splits are replaced; its other files are left as they are and listed in a warning).
        wait_timeout: seconds rank 0 waits for the other ranks in :meth:`finalize` under
            ``torch.distributed``; None: the process group's default (30 min).
    """

    def __init__(
        self,
        out: str,
        *,
        prefix: str,
        num_shards: int,
        fingerprint: str,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: dict | None = None,
        resume_check: str = "sha256",
        overwrite: bool = False,
        wait_timeout: float | None = None,
    ):
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {num_shards!r}")
        if not prefix or "/" in prefix or prefix.startswith("."):
            raise ValueError(f"prefix must be a non-empty file name prefix without '/', got {prefix!r}")
        self.out = os.fspath(out)
        self.prefix = prefix
        self.num_shards = num_shards
        self.fingerprint = fingerprint
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if resume_check not in RESUME_CHECKS:
            raise ValueError(f"resume_check must be one of {list(RESUME_CHECKS)}, got {resume_check!r}")
        self.resume_check = resume_check
        self.storage_options = storage_options
        self.overwrite = bool(overwrite)
        self.wait_timeout = wait_timeout
        self._fs, self._root = url_to_fs(self.out, storage_options)
        self._lock: RankLock | None = None
        # which run of this job in this process: the same on every rank (they make the same jobs in order)
        ident = (self.out, self.prefix, self.fingerprint)
        self._seq = _job_runs[ident] = _job_runs.get(ident, -1) + 1
        self._finished = False
        self._failed_reported = False

    # names
    def filename(self, index: int) -> str:
        return shard_name(self.prefix, index)

    def stats_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}_stats.json"

    def stats_url(self, index: int) -> str:
        return join(self.out, self.stats_name(index))

    def owned(self) -> list[int]:
        """This rank's shard indices: ``i % world_size == rank``."""
        return list(range(self.rank, self.num_shards, self.world_size))

    # resume
    def read_stats(self, index: int) -> ShardStats | None:
        """The sidecar of shard ``index``, or None when there is none (or it is unreadable: rewritten)."""
        from relabel_shards.storage import StorageError, cat

        try:
            raw = cat(self.stats_url(index), self.storage_options)
        except FileNotFoundError as e:
            if isinstance(e, StorageError):  # the bucket, not the sidecar, is missing
                raise
            return None
        try:
            stats = ShardStats.from_json(raw, join(self.out, self.stats_name(index)))
        except ShardError as e:
            log.warning("%s; the shard will be written again", e)
            return None
        if stats.fingerprint != self.fingerprint:
            raise ValueError(
                f"{join(self.out, self.stats_name(index))} was written by a different build "
                f"(fingerprint {stats.fingerprint[:12]}, this one {self.fingerprint[:12]}): "
                "use another output directory or remove the old shards"
            )
        return stats

    def is_complete(self, index: int) -> bool:
        """Whether shard ``index`` has a sidecar from this build and its bytes match it (``resume_check``)."""
        stats = self.read_stats(index)
        if stats is None:
            return False
        try:
            if self.resume_check == "size":
                size, digest = self._size(index), stats.record.sha256
            else:
                from relabel_shards.tarstream import RetryingReader, fsspec_opener

                url = join(self.out, self.filename(index))
                with RetryingReader(fsspec_opener(url, self.storage_options), url) as f:
                    size, digest = file_sha256(f)
        except FileNotFoundError:
            log.warning("%s: stats exist but the shard does not; writing it again", self.filename(index))
            return False
        if (size, digest) != (stats.record.bytes, stats.record.sha256):
            log.warning("%s: size/sha256 disagree with its stats; writing it again", self.filename(index))
            return False
        return True

    def _size(self, index: int) -> int:
        """The byte size of shard ``index`` as stored (bounded by the read deadline)."""
        from relabel_shards.storage import call, split_options

        _, policy = split_options(self.storage_options)
        return int(call(self._fs, "size", join(self._root, self.filename(index)),
                        url=join(self.out, self.filename(index)), policy=policy))

    def check_output(self) -> None:
        """Refuse a folder holding a dataset this project did not write, unless ``overwrite``.

        Foreign: an ``_info.json`` with a split that has no ``relabel_shards`` section (or that is not valid
        JSON), or a ``{prefix}-*.tar`` file without our ``_stats.json`` sidecar beside it, other than this
        job's own shard names (a killed run leaves its last shard without one). Tars under other names are
        left alone: nothing this job writes lands on them.

        Raises:
            ForeignOutputError: naming what was found and the way out.
        """
        found: list[str] = []
        try:
            info = read_info(self.out, self.storage_options)
            if foreign_splits(info):
                found.append(f"{INFO_NAME} with splits {foreign_splits(info)} not written by relabel-shards")
        except FileNotFoundError as e:
            from relabel_shards.storage import StorageError

            if isinstance(e, StorageError):
                raise
        except ShardError as e:
            found.append(f"an {INFO_NAME} that is not ours ({e})")
        from relabel_shards.storage import call, split_options

        try:
            listed = call(self._fs, "ls", self._root, detail=False, url=self.out,
                          policy=split_options(self.storage_options)[1], what="listing")
            names = {posixpath.basename(n.rstrip("/")) for n in listed}
        except (FileNotFoundError, NotADirectoryError):
            names = set()
        ours = re.compile(re.escape(self.prefix) + r"-(\d{6})\.tar")
        stray = sorted(n for n in names if n.startswith(f"{self.prefix}-") and n.endswith(".tar")
                       and f"{n[:-4]}_stats.json" not in names
                       and not ((m := ours.fullmatch(n)) and int(m[1]) < self.num_shards))
        if stray:
            found.append(f"{len(stray)} .tar file{'s' if len(stray) > 1 else ''} without relabel-shards "
                         f"sidecars ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''})")
        if not found:
            return
        if self.overwrite:
            log.warning("%s: writing over a dataset this project did not write (overwrite): %s; files of it "
                        "that this job does not replace stay", self.out, "; ".join(found))
            return
        raise ForeignOutputError(f"{self.out} holds another dataset: {'; '.join(found)}. Write to an empty "
                                 "folder, or pass overwrite=True (--overwrite) to write over it")

    def remove_stale_temps(self, indices: Sequence[int]) -> None:
        """Remove temporary files a killed run left for these shards (local outputs only)."""
        if not _is_local(self._fs):
            return
        for i in indices:
            for name in (self.filename(i), self.stats_name(i)):
                prefix, suffix = temp_name(name)
                for p in glob.glob(os.path.join(glob.escape(self._root), f"{glob.escape(prefix)}*{suffix}")):
                    log.debug("removing stale %s", p)
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass

    def start(self, summary_type: Callable[..., Any]) -> tuple[list[int], Any]:
        """:meth:`pending`, and a job summary of this rank made from it: ``summary_type(rank=, world_size=,
        num_shards=, written=, skipped=)`` (build's, convert's and join's summaries share these fields).

        Returns:
            ``(todo, summary)``: the shards still to write, and the summary (``written``: those,
            ``skipped``: this rank's shards that were complete already).
        """
        todo = self.pending()
        left = set(todo)
        summary = summary_type(rank=self.rank, world_size=self.world_size, num_shards=self.num_shards,
                               written=list(todo), skipped=[i for i in self.owned() if i not in left])
        return todo, summary

    def pending(self) -> list[int]:
        """This rank's shards still to write, in order (stale temporary files of its shards are removed).

        First checks that the output may be written (:func:`relabel_shards.shards.check_writable`,
        :meth:`check_output`) and takes this rank's lock on a local folder.

        Raises:
            relabel_shards.outlock.OutputInUseError: another process holds this rank's lock ("another
                build is writing here").
            ForeignOutputError: see :meth:`check_output`.
            relabel_shards.storage.StorageError: the destination cannot be written (no bucket, access
                denied, unreachable, stalled).
        """
        check_writable(self.out, self.storage_options)
        self.check_output()
        self._finished = False
        if _is_local(self._fs) and self._lock is None:
            self._lock = RankLock(os.path.join(self._root, f".{self.prefix}.rank{self.rank}.lock"), self.out,
                                   self.rank)
        atexit.unregister(self._at_exit)
        atexit.register(self._at_exit)  # a rank that dies of an exception still tells the others
        owned = self.owned()
        self.remove_stale_temps(owned)
        try:
            todo = [i for i in owned if not self.is_complete(i)]
        except BaseException:
            self._release()
            raise
        log.info(
            "rank %d/%d: %d of its %d shards to write", self.rank, self.world_size, len(todo), len(owned)
        )
        if not todo:
            self._release()  # nothing to write: no need to keep others out
        return todo

    def open(self, index: int) -> ShardOutput:
        if index % self.world_size != self.rank:
            raise ValueError(f"shard {index} belongs to rank {index % self.world_size}, not rank {self.rank}")
        return ShardOutput(self, index)

    # _info.json
    def finalize(
        self,
        split: str,
        project: dict[str, Any] | Callable[[list[ShardStats]], dict[str, Any]],
        name: str | None = None,
    ) -> dict[str, Any] | None:
        """Write ``_info.json``'s ``split`` once every shard is complete; return it, or None when not yet.

        ``project`` (our section of the split, or a function of all shards' stats that returns it) gets
        ``failures`` and ``num_failures`` added here, gathered from the sidecars in shard order.

        Raises:
            ValueError: a key appears in two shards.
        """
        try:
            return self._finalize(split, project, name)
        finally:
            self._finished = True
            self._release()

    def _finalize(self, split, project, name):
        if self._dist() and self.world_size > 1:
            self._meet()
            if self.rank != 0:
                return None
        all_stats: list[ShardStats] = []
        for i in range(self.num_shards):
            stats = self.read_stats(i)
            if stats is None:
                log.info(
                    "rank %d: shard %s not written yet; %s is left to the last rank",
                    self.rank,
                    self.filename(i),
                    INFO_NAME,
                )
                return None
            try:
                size = self._size(i)
            except FileNotFoundError:
                size = None
            if size != stats.record.bytes:
                log.info("rank %d: shard %s not complete yet", self.rank, self.filename(i))
                return None
            all_stats.append(_HeldStats(stats))  # type: ignore[arg-type]  (compact: 13k of them at 21k scale)
        _check_unique_keys(all_stats)
        proj = dict(project(all_stats) if callable(project) else project)
        failures = [f for s in all_stats for f in s.failures]
        proj["failures"] = failures
        proj["num_failures"] = len(failures)
        split_info = make_split_info(split, [s.record for s in all_stats], proj)
        self._remove_stale_info_temps()
        try:
            write_info(self.out, split_info, self.storage_options, name=name, drop_foreign=self.overwrite)
        except FileNotFoundError:
            # another rank finishing at the same moment removed our temporary file as stale; its _info.json
            # has the same bytes, but write ours again so that this call's promise holds
            write_info(self.out, split_info, self.storage_options, name=name, drop_foreign=self.overwrite)
        log.info(
            "wrote %s (%d shards, %d samples, %d failures)",
            join(self.out, INFO_NAME),
            self.num_shards,
            split_info["num_samples"],
            len(failures),
        )
        return split_info

    # ranks
    def _dist(self) -> bool:
        return distributed_world() == self.world_size

    def _key(self) -> str:
        return f"relabel_shards/{self.out}/{self.prefix}/{self.fingerprint[:16]}/run{self._seq}"

    def _meet(self) -> None:
        """Wait until every rank has finished its shards; raise at once when one of them failed."""
        try:
            meet_ranks(self._key(), self.world_size, self.wait_timeout)
        except RankFailedError as e:
            raise RankFailedError(f"{e}; {INFO_NAME} of {self.out} is not written: fix the cause and rerun "
                                  "(complete shards are kept)") from None
        except TimeoutError as e:
            raise TimeoutError(f"{e}; {INFO_NAME} of {self.out} is not written") from None

    def fail(self, error: BaseException | str) -> None:
        """Tell the other ranks that this rank failed (they stop waiting in :meth:`finalize`); unlock."""
        self._finished = True
        if not self._failed_reported and self.world_size > 1 and self._dist():
            self._failed_reported = True
            report_failure(self._key(), f"rank {self.rank} failed: {error}")
        self._release()

    def _at_exit(self) -> None:
        if not self._finished:
            self.fail("it exited before finishing its shards")

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        atexit.unregister(self._at_exit)

    def _remove_stale_info_temps(self) -> None:
        if not _is_local(self._fs):
            return
        prefix, suffix = temp_name(INFO_NAME)
        for p in glob.glob(os.path.join(glob.escape(self._root), f"{glob.escape(prefix)}*{suffix}")):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _check_unique_keys(all_stats: Sequence[ShardStats]) -> None:
    """Raise on a key met twice, naming the first such key in shard order and both shards.

    Keys are tracked as 64-bit hashes (13M keys in ~100 MB where a dict of them took ~1 GB,
    benchmarks/bench_scale.py); names are resolved only for hashes that repeat, as ``verify`` does.
    """
    import numpy as np

    n = sum(len(s.keys) for s in all_stats)
    hashes = np.fromiter((hash(k) for s in all_stats for k in s.keys), dtype=np.int64, count=n)
    hashes.sort()  # in place: 8 bytes a key in all
    dups = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    del hashes
    if not dups:
        return
    seen: dict[str, str] = {}
    for s in all_stats:
        for k in s.keys:
            if hash(k) not in dups:
                continue
            other = seen.get(k)
            if other is not None:
                raise ValueError(f"duplicate sample key {k!r}: in {other} and in {s.record.filename}")
            seen[k] = s.record.filename


class SerialExecutor:
    """Run submitted callables one after another in a background thread, in submission order.

    The queue is bounded (``maxsize``), so a producer that outruns the writer waits instead of filling memory.
    An exception in a task stops the thread; it is raised again from the next :meth:`submit` or :meth:`close`.
    """

    _STOP = object()

    def __init__(self, maxsize: int = 8, name: str = "relabel-shards-writer"):
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is self._STOP:
                return
            if self._error is not None:
                continue  # drain without running: the job has failed
            try:
                fn()
            except BaseException as e:  # handed to the producer thread
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[[], Any]) -> None:
        self._raise()
        while True:
            try:
                self._queue.put(fn, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():  # pragma: no cover - the thread only ends on _STOP
                    raise RuntimeError("the background writer thread has stopped") from None
                self._raise()

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every submitted task, stop the thread, and (``raise_errors``) raise a task's exception."""
        self._queue.put(self._STOP)
        self._thread.join()
        if raise_errors:
            self._raise()


class ChunkSink:
    """Write a stream of chunks into this rank's shards from one background thread (build and convert).

    A chunk is a dict with ``task`` (its shard index), ``end`` (the shard's last chunk) and ``entries``;
    chunks of one shard arrive in order and shards one after another. ``fill(shard, chunk, *args)`` runs in
    the writer thread and adds the chunk's samples and failures to the open :class:`ShardOutput`;
    ``extra(index)`` gives the sidecar's extra fields when the shard is committed. As a context manager: a
    clean exit waits for every write and raises a writer error; an exception aborts the open shards (their
    temporary files go).

    Create the chunk iterator (which may fork DataLoader workers) before entering: no thread may hold a lock
    across a fork.
    """

    def __init__(self, job: ShardJob, fill: Callable[..., None],
                 extra: Callable[[int], dict | None] | None = None, maxsize: int = 8):
        self.job, self._fill, self._extra = job, fill, extra
        self._open: dict[int, ShardOutput] = {}
        self._writer = SerialExecutor(maxsize=maxsize)

    def submit(self, chunk: dict, *args: Any) -> None:
        """Queue ``chunk`` and ``args`` for ``fill`` in the writer thread; waits while the queue is full."""
        self._writer.submit(lambda: self._write(chunk, *args))

    def _write(self, chunk: dict, *args: Any) -> None:
        index = chunk["task"]
        shard = self._open.get(index)
        if shard is None:
            shard = self._open[index] = self.job.open(index)
        self._fill(shard, chunk, *args)
        if chunk["end"]:
            shard.commit(extra=self._extra(index) if self._extra is not None else None)
            del self._open[index]

    def __enter__(self) -> ChunkSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._writer.close()
            except BaseException as e:
                self.job.fail(e)
                raise
            return
        self._writer.close(raise_errors=False)
        for shard in self._open.values():
            shard.abort()
        self.job.fail(exc if exc is not None else exc_type.__name__)

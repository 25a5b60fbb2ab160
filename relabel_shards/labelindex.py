"""Where each record of a label set is: key -> (label shard, byte offset, size), from one pass over headers.

Used by ``relabel-shards join`` (``relabel_shards.join``): a label set (label shards or full shards) is
indexed once, sequentially, without holding any record; records are then read one seek each
(:class:`RecordReader`).
Memory: about ``len(key) + 20`` bytes per key in numpy arrays (``benchmarks/bench_join.py``: 36 bytes per
key, 6.9 MiB for 200,000 keys, built at ~117,000 keys/s on a 2-core machine).
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from relabel_shards.shards import (
    INFO_NAME,
    LABELMAP_EXT,
    ShardError,
    StrictTarInfo,
    _is_local,
    get_split,
    join,
    read_info,
    split_member_name,
    url_to_fs,
)

log = logging.getLogger(__name__)

OPEN_SHARDS = 32  # label shards a worker keeps open while fetching records


@dataclass
class LabelIndex:
    """Where each record of a label set is: key -> (label shard, byte offset of the record, its size).

    Attributes:
        url: the label set (directory or URL prefix with ``_info.json``).
        split: the split's ``_info.json`` entry.
        shard_urls: the label shards, in ``_info.json`` order.
        keys: np.ndarray [n] bytes (UTF-8 keys), sorted.
        shard, offset, size: np.ndarray [n] int32 / int64 / int64, in the order of ``keys``.
        storage_options: fsspec options for ``url``.
    """

    url: str
    split: dict
    shard_urls: list[str]
    keys: np.ndarray
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    storage_options: dict | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def section(self) -> dict:
        return self.split.get("relabel_shards") or {}

    def find(self, keys: Sequence[str]) -> np.ndarray:
        """Rows of ``keys`` in the index, -1 where a key has no record. np.ndarray [len(keys)] int64."""
        if not len(keys) or not len(self.keys):
            return np.full(len(keys), -1, dtype=np.int64)
        q = np.array([k.encode("utf-8") for k in keys])
        pos = np.searchsorted(self.keys, q)
        pos = np.minimum(pos, len(self.keys) - 1)
        return np.where(self.keys[pos] == q, pos, -1).astype(np.int64)

    def key(self, row: int) -> str:
        return bytes(self.keys[row]).decode("utf-8")


def build_index(labels: str, *, split: str | None = None, storage_options: dict | None = None) -> LabelIndex:
    """Index a label set in one sequential pass over its shards' tar headers (data is skipped locally).

    Args:
        labels: the label set: label shards or full shards with ``_info.json`` (local or fsspec URL).
        split: the split; None when ``_info.json`` holds one.

    Raises:
        FileNotFoundError: no ``_info.json`` or a listed shard is missing.
        ShardError: a corrupt tar, or a key with two records.
    """
    labels = os.fspath(labels)
    s = get_split(read_info(labels, storage_options), split, join(labels, INFO_NAME))
    urls = [join(labels, f) for f in s.get("filenames") or []]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for i, url in enumerate(urls):
        keys, offsets, sizes = _scan_records(url, storage_options)
        parts.append(
            (
                np.array([k.encode("utf-8") for k in keys], dtype=bytes) if keys else np.array([], "S1"),
                np.full(len(keys), i, np.int32),
                np.array(offsets, np.int64),
                np.array(sizes, np.int64),
            )
        )
    keys = np.concatenate([p[0] for p in parts]) if parts else np.array([], "S1")
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    dup = np.flatnonzero(keys[1:] == keys[:-1]) if len(keys) > 1 else np.array([], np.int64)
    shard = np.concatenate([p[1] for p in parts])[order] if parts else np.array([], np.int32)
    if len(dup):
        k = bytes(keys[dup[0]]).decode()
        a, b = sorted({int(shard[dup[0]]), int(shard[dup[0] + 1])})
        raise ShardError(f"{labels}: key {k!r} has two records (in {urls[a]} and {urls[b]})")
    offset = np.concatenate([p[2] for p in parts])[order] if parts else np.array([], np.int64)
    size = np.concatenate([p[3] for p in parts])[order] if parts else np.array([], np.int64)
    log.info("indexed %d records of %d shards in %s", len(keys), len(urls), labels)
    return LabelIndex(labels, s, urls, keys, shard, offset, size, storage_options)


def _scan_records(url: str, storage_options: dict | None) -> tuple[list[str], list[int], list[int]]:
    """(keys, data offsets, sizes) of the non-empty ``.rlm`` members of one tar.

    Plain ustar headers (what our writer emits for ASCII names under 100 bytes) are parsed here, one 512-byte
    read and a seek per member (~10x faster than ``tarfile``'s per-member cost, which dominated the index
    build in ``benchmarks/bench_join.py``); any other header (PAX, GNU long names) hands the shard to
    ``tarfile``.
    """
    fs, path = url_to_fs(url, storage_options)
    try:
        with open(path, "rb") if _is_local(fs) else fs.open(path, "rb") as f:
            fast = _scan_ustar(f, url)
            if fast is not None:
                return fast
        keys: list[str] = []
        offsets: list[int] = []
        sizes: list[int] = []
        mode = "r:" if _is_local(fs) else "r|"  # locally seek over the data; remotely stream through it
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode=mode, tarinfo=StrictTarInfo) as tar:
            for ti in tar:
                if not ti.isreg():
                    continue
                key, ext = split_member_name(ti.name)
                if ext == LABELMAP_EXT and ti.size > 0:  # empty: a key without a label (pairing.py)
                    keys.append(key)
                    offsets.append(ti.offset_data)
                    sizes.append(ti.size)
    except FileNotFoundError:
        raise FileNotFoundError(f"label shard {url} is missing (listed in its {INFO_NAME})") from None
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"{url}: truncated or corrupt tar ({e})") from None
    return keys, offsets, sizes


_RLM_SUFFIX = f".{LABELMAP_EXT}".encode()


def _scan_ustar(f: Any, url: str) -> tuple[list[str], list[int], list[int]] | None:
    """The fast path of :func:`_scan_records`; None when a header is not plain ustar/v7 (then ``tarfile``)."""
    keys: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    pos = 0
    while True:
        f.seek(pos)
        hdr = f.read(512)
        if len(hdr) < 512:
            raise ShardError(
                f"{url}: truncated or corrupt tar (data ends at byte {pos + len(hdr)} without the "
                "end-of-archive marker)"
            )
        if hdr == bytes(512):
            return keys, offsets, sizes
        typeflag = hdr[156:157]
        if typeflag not in (b"0", b"\0", b"5") or hdr[124] & 0x80:
            return None  # PAX/GNU extension headers, links, base-256 sizes: tarfile reads those
        try:
            size = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
            checksum = int(hdr[148:156].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(f"{url}: truncated or corrupt tar (damaged header at byte {pos})") from None
        if checksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ShardError(f"{url}: truncated or corrupt tar (bad header checksum at byte {pos})")
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        base = name.rsplit(b"/", 1)[-1]
        if typeflag != b"5" and size > 0 and base.endswith(_RLM_SUFFIX) and base.index(b".") == len(base) - 4:
            try:
                key, _ = split_member_name(name.decode("utf-8"))
            except UnicodeDecodeError:
                return None
            keys.append(key)
            offsets.append(pos + 512)
            sizes.append(size)
        pos += 512 + -(-size // 512) * 512


class RecordReader:
    """Reads records by index row: one seek + read each, label shards kept open in a small LRU."""

    def __init__(self, index: LabelIndex, max_open: int = OPEN_SHARDS):
        self.index = index
        self.max_open = max_open
        self._open: OrderedDict[int, Any] = OrderedDict()

    def read(self, row: int) -> bytes:
        s = int(self.index.shard[row])
        f = self._open.pop(s, None)
        if f is None:
            fs, path = url_to_fs(self.index.shard_urls[s], self.index.storage_options)
            f = open(path, "rb") if _is_local(fs) else fs.open(path, "rb")
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open[s] = f
        f.seek(int(self.index.offset[row]))
        n = int(self.index.size[row])
        data = f.read(n)
        if len(data) != n:
            raise ShardError(
                f"{self.index.shard_urls[s]}: record of key {self.index.key(row)!r} cut short "
                f"({len(data)} of {n} bytes): the label shard changed since it was indexed"
            )
        return data

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

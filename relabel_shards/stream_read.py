"""Reading an epoch plan (relabel_shards/stream.py): image and label shards in lockstep, resumable by byte.

A piece's image shard and its label shards (one per joined label set) are read together, sample by sample,
in lockstep; keys must agree. While streaming nothing is sought, indexed or held beyond the shuffle buffer:
per reader at most ``shards_in_flight`` x (1 + label sets) streams are open, and only the samples between a
read and its yield (at most ``shuffle_buffer``) are held. As the bytes go by, a passive walk over the tar
headers notes where each sample starts, so a resume can fetch exactly the samples it held (ranged reads)
and reopen each open shard where it stood.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from relabel_shards.shards import LABELMAP_EXT, ShardError, split_member_name
from relabel_shards.stream import EpochPlan, LengthMismatch, Missing, PassPlan, RawSample, ShardSet
from relabel_shards.tarstream import iter_tar_samples

__all__ = ["read_stream"]


class _TarTap(io.RawIOBase):
    """A tar stream passed through unchanged, noting where each sample starts (no extra reads, no seeks).

    It walks the 512-byte headers as the bytes go by: ``starts[key]`` is the offset of the first header
    block (extended headers included) of the key's first member; ``end`` the offset of the end-of-archive
    marker. A reader resumed at such an offset parses the tar from there (``RetryingReader`` re-opens at
    any byte), which is how a resume reads again only what it needs.
    """

    def __init__(self, inner: Any, base: int = 0):
        super().__init__()
        self.inner = inner
        self.pos = base  # offset of the next byte in the object
        self.starts: dict[str, int] = {}
        self.end: int | None = None
        self._next = base  # offset of the next header block
        self._hdr = bytearray()
        self._ext_at: int | None = None  # first extended header of the member being described
        self._ext_type = b""
        self._ext_left = 0  # bytes of extended-header data still to collect
        self._ext_data = bytearray()
        self._ext_name: str | None = None
        self._last_key: str | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: D102
        n = self.inner.readinto(buf)
        if n:
            self._feed(memoryview(buf)[:n])
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()

    def _feed(self, data: memoryview) -> None:
        i, n = 0, len(data)
        while i < n and self.end is None:
            at = self.pos + i
            if self._ext_left:  # collect an extended header's data (a long name, pax records)
                take = min(self._ext_left, n - i)
                self._ext_data += data[i : i + take]
                self._ext_left -= take
                i += take
                if not self._ext_left:
                    self._ext_done()
                continue
            if at < self._next:  # member data: pass
                i += min(self._next - at, n - i)
                continue
            take = min(512 - len(self._hdr), n - i)
            self._hdr += data[i : i + take]
            i += take
            if len(self._hdr) == 512:
                self._header(self.pos + i - 512)
                self._hdr.clear()
        self.pos += n

    def _header(self, at: int) -> None:
        h = bytes(self._hdr)
        if not any(h):
            self.end = at
            return
        field = h[124:136]
        if field[0] & 0x80:  # base-256
            size = int.from_bytes(field[1:], "big")
        else:
            text = field.split(b"\0", 1)[0].strip()
            size = int(text, 8) if text else 0
        typ = h[156:157]
        data_end = at + 512 + size
        self._next = data_end + (-size) % 512
        if typ in (b"x", b"g", b"L", b"K"):
            if self._ext_at is None:
                self._ext_at = at
            self._ext_type, self._ext_left, self._ext_data = typ, size, bytearray()
            if not size:
                self._ext_done()
            return
        name = h[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if h[257:263] == b"ustar\0" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        name = self._ext_name or name
        start = self._ext_at if self._ext_at is not None else at
        self._ext_at, self._ext_name = None, None
        if typ in (b"0", b"\0", b"7"):  # regular files: the members iter_tar_samples groups
            key = split_member_name(name)[0]
            if key != self._last_key:
                self.starts[key] = start
                self._last_key = key

    def _ext_done(self) -> None:
        data = bytes(self._ext_data)
        if self._ext_type == b"L":
            self._ext_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif self._ext_type == b"x":
            for line in data.split(b"\n"):
                _, _, rec = line.partition(b" ")
                k, _, v = rec.partition(b"=")
                if k == b"path":
                    self._ext_name = v.decode("utf-8", "replace")


class _Column:
    """One tar of a piece (the image shard or a label shard), read forward from a sample boundary."""

    def __init__(self, url: str, open_stream: Callable, offset: int):
        self.url = url
        self.tap = _TarTap(open_stream(url, offset), offset)
        self.samples = iter_tar_samples(self.tap, url)

    def span(self, key: str) -> tuple[int, int]:
        """(start, end) byte offsets of the sample just read (it ends where the next one starts)."""
        start = self.tap.starts.pop(key)
        nxt = next(iter(self.tap.starts.values()), None)
        return start, nxt if nxt is not None else (self.tap.end if self.tap.end is not None else -1)

    def close(self) -> None:
        self.tap.close()


class _ShardCursor:
    """One open piece: the image shard and its label shards, read forward together in lockstep.

    ``offsets`` (one per column) start the reads at sample ``first`` instead of the shard's start.
    """

    def __init__(
        self,
        shards: ShardSet,
        shard: int,
        open_stream: Callable,
        first: int = 0,
        offsets: Sequence[int] | None = None,
        expect: str | None = None,
    ):
        self.shard = shard
        self.url = shards.urls[shard]
        self.length = shards.lengths[shard]
        urls = [self.url] + [u[shard] for _, u in shards.labels]
        offsets = list(offsets) if offsets is not None else [0] * len(urls)
        self.names = [name for name, _ in shards.labels]
        self.columns: list[_Column] = []
        try:
            for url, off in zip(urls, offsets, strict=True):
                self.columns.append(_Column(url, open_stream, off))
        except BaseException:
            self.close()
            raise
        self.next = first
        self.next_offsets = offsets
        self.expect = expect  # the key a checkpoint saw at ``first``: the shard must not have changed

    def next_key(self) -> str | None:
        """The key of the next sample, where its header has been read already."""
        return next(iter(self.columns[0].tap.starts), None)

    def take(self, index: int, sample_id: int) -> tuple[RawSample | ShardError, list[tuple[int, int]]]:
        """Read forward to sample ``index``: the sample (or its per-sample pairing ``SampleError``) and its
        byte span in each column."""
        item: Any = None
        spans: list[tuple[int, int]] = []
        while self.next <= index:
            item, spans = self._one(sample_id)
            self.next += 1
            self.next_offsets = [e for _, e in spans]
        return item, spans

    def _one(self, sample_id: int) -> tuple[RawSample | ShardError, list[tuple[int, int]]]:
        from relabel_shards.decode import SampleError

        image = self.columns[0]
        try:
            key, members = next(image.samples)
        except StopIteration:
            raise LengthMismatch(
                f"{self.url}: _info.json says {self.length} samples, the shard holds {self.next} (truncated?)"
            ) from None
        spans = [image.span(key)]
        if self.expect is not None:
            if key != self.expect:
                raise ShardError(
                    f"{self.url}: the sample at byte {spans[0][0]} is {key!r}, the checkpoint saw "
                    f"{self.expect!r} there: the shard changed since the state was saved"
                )
            self.expect = None
        records, err = {}, None
        for name, col in zip(self.names, self.columns[1:], strict=True):
            try:
                lkey, lmembers = next(col.samples)
            except StopIteration:
                raise LengthMismatch(
                    f"{col.url}: label shard ends after {self.next} samples, before image shard "
                    f"{self.url}'s key {key!r}"
                ) from None
            spans.append(col.span(lkey))
            if err is not None:
                continue
            if lkey != key:
                err = SampleError(
                    self.url,
                    key,
                    "key_mismatch",
                    f"label shard {col.url} has key {lkey!r} where the image shard has {key!r} "
                    f"(sample {self.next} of both)",
                )
            elif set(lmembers) != {LABELMAP_EXT}:
                err = SampleError(
                    col.url,
                    lkey,
                    "missing_member",
                    f"a label-shard sample holds exactly one member .{LABELMAP_EXT}; it has "
                    f"{sorted(lmembers)}",
                )
            else:
                records[name] = (col.url, lkey, lmembers[LABELMAP_EXT])
        item = err if err is not None else RawSample(self.url, key, members, records, sample_id)
        return item, spans

    def check_end(self) -> None:
        """After the listed last sample: the shard (and each label shard) must end here."""
        for col in self.columns:
            extra = next(col.samples, None)
            if extra is not None:
                raise LengthMismatch(
                    f"{col.url}: _info.json says {self.length} samples, the shard holds more "
                    f"(key {extra[0]!r} is sample {self.length + 1})"
                )

    def close(self) -> None:
        for col in self.columns:
            col.close()


def _fetch_one(
    shards: ShardSet,
    shard: int,
    spans: Sequence[Sequence[int]],
    fetch: Callable,
    sample_id: int,
    key: str | None = None,
) -> RawSample | ShardError:
    """One sample read again by its byte spans (one ranged read per column)."""

    def opener(url: str, offset: int) -> io.BytesIO:
        start, end = next(sp for u, sp in zip(urls, spans, strict=True) if u == url)
        # the sample's members, then an end-of-archive marker (end < 0: the sample runs to the object's end)
        return io.BytesIO(fetch(url, start, end if end >= 0 else None) + bytes(1024))

    urls = [shards.urls[shard]] + [u[shard] for _, u in shards.labels]
    cur = _ShardCursor(shards, shard, opener, 0, [sp[0] for sp in spans], key)
    try:
        return cur._one(sample_id)[0]
    finally:
        cur.close()


def read_stream(
    shards: ShardSet,
    plan: EpochPlan,
    reader: int,
    start: int,
    open_stream: Callable,
    on_shard_error: Callable[[int, int, ShardError], None],
    *,
    resume: dict | None = None,
    fetch: Callable | None = None,
) -> Iterator[tuple[int, int, RawSample | ShardError | Missing, Callable[[], dict]]]:
    """Yield ``(pos, pass, item, where)`` for ``reader``'s positions ``start, start + 1, ...`` over passes.

    ``item`` is a :class:`RawSample`, a per-sample ``SampleError`` (key mismatch between columns), or
    :class:`Missing` (its shard could not be read that far; the error is a ``ShardError``). ``where()``
    gives, after that position, what a resume needs to read no more than the samples still to come: the
    byte spans of the samples read but not yet yielded, and where each open shard stands (JSON-able).

    Only the shards holding a sample at a position >= ``start`` are opened. With ``resume`` (a ``where()``
    of the same plan at ``start``), buffered samples are read again by their byte spans and open shards
    continue where they stood; without it, each such shard is read from its start.

    Args:
        open_stream: ``open_stream(url, offset) -> binary stream`` positioned at byte ``offset``.
        on_shard_error: ``(shard, pass, error)`` for a shard that cannot be read (truncated, damaged, or
            another sample count than ``_info.json`` lists); raise it to stop, return to go on without the
            shard's unread samples (their positions come as :class:`Missing`).
        fetch: ``fetch(url, start, end) -> bytes``, a ranged read (for ``resume``).
    """
    base = 0
    for pas in range(1 << 30):
        p = plan.pass_plan(reader, pas)
        n = len(p.yields)
        if n == 0:
            return
        if start >= base + n:
            base += n
            continue
        j0 = max(0, start - base)
        here = resume if resume is not None and resume.get("pass") == pas else None
        yield from _read_pass(shards, plan, p, j0, base, pas, open_stream, on_shard_error, here, fetch)
        base += n


def _read_pass(
    shards: ShardSet,
    plan: EpochPlan,
    p: PassPlan,
    j0: int,
    base: int,
    pas: int,
    open_stream: Callable,
    on_shard_error: Callable,
    resume: dict | None,
    fetch: Callable | None,
) -> Iterator[tuple[int, int, RawSample | ShardError | Missing, Callable[[], dict]]]:
    from relabel_shards.decode import SampleError

    n = len(p.yields)
    wanted = np.zeros(n, bool)
    wanted[p.yields[j0:]] = True
    shard_of, index_of = p.shard_of.tolist(), p.index_of.tolist()
    offsets = plan.offsets
    store: dict[int, RawSample | ShardError | Missing] = {}
    spans: dict[int, list[tuple[int, int]]] = {}
    cursors: dict[int, _ShardCursor] = {}
    dead: dict[int, ShardError] = {}
    refetch: dict[int, list] = {}
    restart: dict[int, tuple[int, list[int]]] = {}
    if resume is not None and fetch is not None:
        refetch = {
            int(e[0]): (e[1], e[2] if len(e) > 2 else None)
            for e in resume.get("buffered", [])
            if wanted[int(e[0])]
        }
        restart = {
            int(e[0]): (int(e[1]), [int(o) for o in e[2]], e[3] if len(e) > 3 else None)
            for e in resume.get("open", [])
        }
    last: dict[int, int] = {}
    for c in np.flatnonzero(wanted).tolist():
        if c not in refetch:
            last[shard_of[c]] = c
    cursor = 0

    def where() -> dict:
        return {
            "pass": pas,
            "buffered": [
                [c, [list(x) for x in spans[c]], getattr(store[c], "key", None)] for c in store if c in spans
            ],
            "open": [[s, cur.next, list(cur.next_offsets), cur.next_key()] for s, cur in cursors.items()],
        }

    try:
        for j in range(j0, n):
            r = int(p.yields[j])
            while cursor <= r:
                c = cursor
                cursor += 1
                if not wanted[c]:
                    continue
                s, i = shard_of[c], index_of[c]
                if s in dead:
                    store[c] = Missing(s, dead[s])
                    continue
                try:
                    if c in refetch:
                        sp, key = refetch[c]
                        store[c] = _fetch_one(shards, s, sp, fetch, int(offsets[s]) + i, key)
                        spans[c] = [tuple(x) for x in sp]
                        continue
                    cur = cursors.get(s)
                    if cur is None:
                        first, offs, key = restart.get(s, (0, None, None))
                        if i < first:  # a sample before where the shard stood: read it from the start
                            first, offs, key = 0, None, None
                        cur = cursors[s] = _ShardCursor(shards, s, open_stream, first, offs, key)
                    store[c], spans[c] = cur.take(i, int(offsets[s]) + i)
                except ShardError as e:
                    if isinstance(e, SampleError):
                        raise
                    dead[s] = e
                    store[c] = Missing(s, e)
                    if s in cursors:
                        cursors.pop(s).close()
                    on_shard_error(s, pas, e)
                    continue
                if last.get(s) == c:
                    cur = cursors.pop(s)
                    try:
                        if i == shards.lengths[s] - 1:
                            cur.check_end()
                    except ShardError as e:
                        on_shard_error(s, pas, e)
                    finally:
                        cur.close()
            spans.pop(r, None)
            yield base + j, pas, store.pop(r), where
    finally:
        for cur in cursors.values():
            cur.close()

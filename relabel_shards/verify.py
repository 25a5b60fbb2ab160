"""Read every shard of a dataset once, sequentially, and check it against ``_info.json`` and the layout.

What is checked (DESIGN.md "Shard layout", "The label-map record"):

- each shard listed in ``_info.json`` exists, and its byte count and sha256 match the listed ones;
- the tar reads to its end (a truncated or corrupt tar is named, with the last key read);
- each sample has one image member, ``.cls`` (an integer), ``.json`` (a JSON object) and ``.rlm``;
  its members are adjacent, its key holds no dot and appears once in the whole split. A build from input
  shards (``_info.json``'s source kind ``"shards"``) passes the input's members through as they are, so there
  ``.json`` is the input's: neither required nor checked;
- every label map decodes, and all have the same k, h, w and C, equal to those in ``_info.json`` (a build
  that kept each image's aspect ratio lists its several (h, w) in ``map_shapes``; k and C still agree);
- the sample count of each shard and of the split match ``shard_lengths`` and ``num_samples``.

Shards are streamed (``tarfile`` stream mode over an fsspec file), so local paths, ``s3://``, ``gs://`` and
``http(s)://`` work alike and memory stays at one member. Every problem is collected (up to a bound) rather
than stopping at the first, so one run says everything that is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relabel_shards.shards import (
    IMAGE_EXTS,
    LABELMAP_EXT,
    StrictTarInfo,
    get_split,
    join,
    read_info,
    split_member_name,
    url_to_fs,
)

logger = logging.getLogger(__name__)

_REQUIRED = ("cls", "json", LABELMAP_EXT)
_OWN_EXTS = {*IMAGE_EXTS, "cls", "json", LABELMAP_EXT}


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_shards`.

    Attributes:
        url: the dataset directory or URL prefix.
        split: the split checked.
        shards: shards read (listed in ``_info.json``).
        samples: samples read.
        bytes: bytes read.
        geometry: ``(k, h, w, C)`` of the first label map read, None when none decoded.
        map_shapes: the distinct (h, w) of the label maps read.
        problems: the first ``max_problems`` problems, each naming its shard (and key where there is one).
        num_problems: all problems found, shown or not.
        warnings: what is sound but harms training (class-sorted shards: ``relabel_shards.diversity``).
    """

    url: str
    split: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    geometry: tuple[int, int, int, int] | None = None
    problems: list[str] = field(default_factory=list)
    num_problems: int = 0
    max_problems: int = 50
    map_shapes: set[tuple[int, int]] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return self.num_problems == 0

    def add(self, problem: str) -> None:
        """Record one problem (kept in ``problems`` while fewer than ``max_problems`` are kept)."""
        self.num_problems += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(problem)
        logger.debug("verify: %s", problem)

    def summary(self) -> str:
        """One line: what was read and whether it is sound."""
        geo = ""
        if self.geometry is not None:
            k, h, w, c = self.geometry
            geo = f", label maps k={k} {h}x{w} C={c}"
            if len(self.map_shapes) > 1:
                geo = f", label maps k={k} C={c} in {len(self.map_shapes)} shapes (h x w)"
        read = (f"{self.samples:,} sample{'s' if self.samples != 1 else ''} in {self.shards:,} "
                f"shard{'s' if self.shards != 1 else ''} ({self.bytes:,} bytes){geo}")
        if self.ok:
            return f"OK: split {self.split!r} of {self.url}: {read}"
        hidden = self.num_problems - len(self.problems)
        more = f" ({hidden:,} not listed)" if hidden else ""
        return (f"FAILED: split {self.split!r} of {self.url}: {self.num_problems:,} problem"
                f"{'s' if self.num_problems != 1 else ''}{more}; read {read}")


class _HashingReader:
    """A read-only file wrapper that hashes, counts and reports every byte that passes through."""

    def __init__(self, f: Any, progress: Callable[[int], None] | None) -> None:
        self._f = f
        self._progress = progress
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.tail = b""  # the last 1024 bytes read: a whole tar ends in two zero blocks


    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.nbytes += len(data)
        self.tail = (self.tail + data)[-1024:]
        if self._progress is not None and data:
            self._progress(len(data))
        return data

    def drain(self, chunk: int = 1 << 20) -> None:
        while self.read(chunk):
            pass


def key_hash(key: str) -> int:
    """A 64-bit hash of a sample key, as an unsigned integer: Python's string hash, so only compare it within
    one process (it is ~50x cheaper than a digest: 13M keys in under a second)."""
    return hash(key) & 0xFFFF_FFFF_FFFF_FFFF


def _key_with_hash(shard_url: str, storage_options: dict | None, h: int) -> str | None:
    """The key of ``shard_url`` whose :func:`key_hash` is ``h`` (reading its member names), or None."""
    fs, path = url_to_fs(shard_url, storage_options)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|", tarinfo=StrictTarInfo) as tar:
            for info in tar:
                key = split_member_name(info.name)[0]
                if key_hash(key) == h:
                    return key
    except (tarfile.TarError, EOFError, OSError):
        return None
    return None


class _SplitChecker:
    """The state that spans shards: keys seen, label-map geometry, the report."""

    def __init__(self, report: VerifyReport, expected_geometry: tuple[Any, Any, Any, Any],
                 map_shapes: set[tuple[int, int]] | None = None, *, own_json: bool = True) -> None:
        self.report = report
        # whether build wrote each sample's .json (folder and list sources), or passed the input's through
        self.own_json = own_json
        self.expected = expected_geometry  # from _info.json; entries may be None
        # Builds that keep each image's aspect ratio declare several (h, w) in _info.json's map_shapes;
        # k and C must still agree everywhere.
        self.map_shapes = map_shapes or set()
        # every key of the split, for duplicates across shards: 64-bit hashes in numpy arrays, one per shard
        # (12 bytes a key: 160 MB at 13M keys, where a dict of the keys took ~2 GB; benchmarks/bench_scale.py)
        self._shards: list[str] = []
        self._hashes: list[int] = []
        self._hash_arrays: list[Any] = []
        self._shard_arrays: list[Any] = []
        # (shard name, hash) -> the key, by reading that shard's member names again (only for duplicates)
        self.resolve_key: Callable[[str, int], str | None] = lambda shard, h: None
        self.geometries: dict[tuple[int, int, int, int], int] = {}
        self.labels: list[int] = []  # the .cls of the shard being read (for the class-sorted check)

    def note_key(self, key: str, shard: str) -> None:
        """Remember a key of ``shard`` (shards one after another) for :meth:`finish_keys`."""
        if not self._shards or self._shards[-1] != shard:
            self._flush()
            self._shards.append(shard)
        self._hashes.append(key_hash(key))

    def _flush(self) -> None:
        import numpy as np

        if self._hashes:
            self._hash_arrays.append(np.array(self._hashes, dtype=np.uint64))
            self._shard_arrays.append(len(self._shards) - 1)  # the shard these hashes belong to
            self._hashes = []

    def finish_keys(self) -> None:
        """Report every key that appears in two shards (named through ``resolve_key``), once all are read."""
        import numpy as np

        self._flush()
        if not self._hash_arrays:
            return
        ends = np.cumsum([len(a) for a in self._hash_arrays])  # position -> array -> shard
        hashes = np.concatenate(self._hash_arrays)
        self._hash_arrays = []
        h = np.sort(hashes)  # 8 bytes a key twice at the peak (~210 MB at 13M keys)
        dups = np.unique(h[1:][h[1:] == h[:-1]])
        del h
        if not len(dups):
            return
        for value in dups.tolist():  # rare: a duplicate (or a hash collision)
            where = np.flatnonzero(hashes == value)  # reading order
            shard_of = [self._shards[self._shard_arrays[int(np.searchsorted(ends, p, side="right"))]]
                        for p in where.tolist()]
            earlier = shard_of[0]
            first_key = self.resolve_key(earlier, value)
            for later in shard_of[1:]:
                key = self.resolve_key(later, value)
                if key is not None and key != first_key:
                    continue  # two keys with one 64-bit hash, not a duplicate
                self.report.add(f"{later}: key {key!r}: duplicate key, already in {earlier}")

    def check_sample(self, shard: str, key: str, members: dict[str, bytes]) -> None:
        add = self.report.add
        where = f"{shard}: key {key!r}"
        images = [e for e in members if e.lower() in IMAGE_EXTS]
        if len(images) != 1:
            add(f"{where}: expected one image member ({'/'.join(IMAGE_EXTS[:3])}/...), found "
                f"{len(images)} (members: {', '.join(sorted(members)) or 'none'})")
        for ext in _REQUIRED:
            if ext not in members and (ext != "json" or self.own_json):
                add(f"{where}: missing .{ext} member (members: {', '.join(sorted(members)) or 'none'})")
        if "cls" in members:
            try:
                self.labels.append(int(members["cls"].decode("ascii").strip()))
            except (UnicodeDecodeError, ValueError):
                add(f"{where}: .cls is not an integer: {members['cls'][:20]!r}")
        if "json" in members and self.own_json:
            try:
                meta = json.loads(members["json"])
                if not isinstance(meta, dict):
                    raise ValueError(f"expected an object, got {type(meta).__name__}")
            except (UnicodeDecodeError, ValueError) as e:
                add(f"{where}: .json is not a JSON object ({e})")
        if LABELMAP_EXT in members:
            self.check_record(where, members[LABELMAP_EXT])

    def check_record(self, where: str, record: bytes) -> Any:
        """Decode one record and check its geometry; the decoded map, or None when it does not decode."""
        from relabel_shards.labelmap import LabelMapError, decode_label_map

        add = self.report.add
        try:
            lm = decode_label_map(record)
        except LabelMapError as e:
            add(f"{where}: label map: {e}")
            return None
        k, h, w = (int(x) for x in lm.values.shape)
        geo = (k, h, w, int(lm.num_classes))
        first = self.geometries.setdefault(geo, 0) == 0
        self.geometries[geo] += 1
        want = tuple(e if e is not None else g for e, g in zip(self.expected, geo, strict=True))
        if (h, w) in self.map_shapes:
            want = (want[0], h, w, want[3])
        if geo != want and first:
            add(f"{where}: label map has k={k} h={h} w={w} C={geo[3]}, _info.json says "
                f"k={want[0]} h={want[1]} w={want[2]} C={want[3]}")
        if self.report.geometry is None:
            self.report.geometry = geo
        self.report.map_shapes.add((h, w))
        return lm

    def read_shard(self, fileobj: _HashingReader, shard: str) -> int:
        """Stream one tar; check each sample; return the number of samples read."""
        add = self.report.add
        n = 0
        current: str | None = None
        members: dict[str, bytes] = {}
        in_shard: set[str] = set()

        def finish() -> None:
            nonlocal n
            if current is None:
                return
            n += 1
            self.check_sample(shard, current, members)

        try:
            with tarfile.open(fileobj=fileobj, mode="r|", tarinfo=StrictTarInfo) as tar:  # type: ignore[call-overload]
                for info in tar:
                    if not info.isfile():
                        if not info.isdir():
                            add(f"{shard}: member {info.name!r} is not a regular file")
                        continue
                    key, ext = split_member_name(info.name)
                    if "." in ext and ext.rsplit(".", 1)[-1].lower() in _OWN_EXTS:
                        add(f"{shard}: member {info.name!r}: its name holds more than one dot, so readers "
                            f"take key {key!r} and extension {ext!r}; keys must hold no dots")
                    if key != current:
                        finish()
                        if key in in_shard:
                            add(f"{shard}: key {key!r}: members not adjacent (the key appears again after "
                                f"other keys)")
                        else:
                            self.note_key(key, shard)
                        in_shard.add(key)
                        current, members = key, {}
                    f = tar.extractfile(info)
                    data = f.read() if f is not None else b""
                    if ext in members:
                        add(f"{shard}: key {key!r}: member .{ext} appears twice")
                    members[ext] = data
                finish()
        except (tarfile.TarError, EOFError, OSError) as e:
            last = f" after key {current!r}" if current is not None else ""
            add(f"{shard}: unreadable tar{last} ({type(e).__name__}: {e}); truncated or corrupt")
            return n
        fileobj.drain()  # the zero blocks after the end-of-archive marker count toward size and sha256
        if fileobj.nbytes % 512 or fileobj.tail != bytes(1024):
            # tarfile stops quietly at end of data, so a tar cut at a member boundary reads as shorter
            last = f" after key {current!r}" if current is not None else ""
            add(f"{shard}: no end-of-archive marker{last} ({fileobj.nbytes:,} bytes); truncated")
        return n


class _LabelChecker(_SplitChecker):
    """A label set: one ``.rlm`` per sample (empty for a listed failure); with image shards, read in lockstep,
    each record's image binding checked against its image (size, sha256, upright width and height)."""

    def __init__(self, report: VerifyReport, expected_geometry: tuple[Any, Any, Any, Any],
                 map_shapes: set[tuple[int, int]], failed: set[str], images: str | None,
                 pairs: Mapping[str, Any], storage_options: dict | None) -> None:
        super().__init__(report, expected_geometry, map_shapes)
        self.failed = failed
        self.images = images
        self.pairs = pairs
        self.storage_options = storage_options
        self._image_iter: Any = None
        self._image_url = ""

    def start_shard(self, index: int) -> None:
        """Open the image shard paired with label shard ``index`` (``images`` given)."""
        if self.images is None:
            return
        from relabel_shards.sources import iter_shard_samples

        names = list(self.pairs.get("filenames") or [])
        if index >= len(names):
            self.report.add(f"_info.json: pairs_with names {len(names)} image shards; label shard {index} "
                            "has none")
            self._image_iter = iter(())
            return
        self._image_url = join(self.images, names[index])
        self._image_iter = iter_shard_samples(self._image_url, self.storage_options)

    def _next_image(self) -> tuple[str, list[tuple[str, bytes]]] | None:
        from relabel_shards.shards import ShardError

        try:
            return next(self._image_iter)
        except StopIteration:
            return None
        except (ShardError, OSError) as e:
            self.report.add(f"{self._image_url}: unreadable image shard ({e})")
            self._image_iter = iter(())
            return None

    def end_shard(self, shard: str) -> None:
        if self._image_iter is None:
            return
        extra = self._next_image()
        if extra is not None:
            self.report.add(f"{shard}: ends before its image shard {self._image_url} (which goes on with key "
                            f"{extra[0]!r})")
        self._image_iter = None

    def check_sample(self, shard: str, key: str, members: dict[str, bytes]) -> None:
        add = self.report.add
        where = f"{shard}: key {key!r}"
        if set(members) != {LABELMAP_EXT}:
            add(f"{where}: a label shard sample holds one .{LABELMAP_EXT} member, found "
                f"{', '.join(sorted(members)) or 'none'}")
        record = members.get(LABELMAP_EXT)
        lm = None
        if record == b"":
            if key not in self.failed:
                add(f"{where}: empty .{LABELMAP_EXT} (no label) but the key is not listed in failures")
        elif record is not None:
            lm = self.check_record(where, record)
        if self._image_iter is None:
            return
        image = self._next_image()
        if image is None:
            add(f"{where}: its image shard {self._image_url} has no sample left")
            return
        ikey, imembers = image
        if ikey != key:
            add(f"{where}: the image shard {self._image_url} has key {ikey!r} here; the shards are not "
                "aligned")
            return
        if lm is None or lm.image is None:
            if lm is not None:
                add(f"{where}: the record has no image binding to check")
            return
        self._check_binding(where, lm.image, imembers)

    def _check_binding(self, where: str, bound: Any, imembers: list[tuple[str, bytes]]) -> None:
        import hashlib

        from relabel_shards.join import upright_size
        from relabel_shards.sources import image_member

        add = self.report.add
        img = image_member(imembers)
        if img is None:
            add(f"{where}: no image member in {self._image_url}")
            return
        data = img[1]
        if len(data) != bound.size or hashlib.sha256(data).digest() != bound.sha256:
            add(f"{where}: the record was made from another image ({bound.size:,} bytes, sha256 "
                f"{bound.sha256.hex()[:16]}…) than {self._image_url}'s {img[0]} ({len(data):,} bytes, sha256 "
                f"{hashlib.sha256(data).hexdigest()[:16]}…)")
            return
        try:
            size = upright_size(data)
        except ValueError as e:
            add(f"{where}: image {img[0]} in {self._image_url}: {e}")
            return
        if size != (bound.width, bound.height):
            add(f"{where}: the record was annotated at {bound.width}x{bound.height} px, the upright image is "
                f"{size[0]}x{size[1]}")


def verify_shards(url: str, *, split: str | None = None, storage_options: dict | None = None,
                  max_problems: int = 50, progress: Callable[[int], None] | None = None,
                  images: str | None = None) -> VerifyReport:
    """Read every shard of one split sequentially and check it (see the module docstring).

    Args:
        url: dataset directory or URL prefix holding ``_info.json`` (local, ``s3://``, ``gs://``, ``http(s)://``).
        split: the split to check; None when ``_info.json`` holds exactly one.
        storage_options: passed to fsspec.
        max_problems: problems kept in the report's list (all are counted), >= 1.
        progress: called with each number of bytes read (for a progress bar).
        images: for a label set: the image shards it pairs with (directory or URL prefix holding the files its
            ``pairs_with`` names); each image shard is read beside its label shard and every record's image
            binding checked (byte length, sha256, upright width and height).

    Returns:
        The report; ``report.ok`` is False when anything is wrong, and ``report.problems`` says what.

    Raises:
        FileNotFoundError: there is no ``_info.json`` at ``url``.
        ShardError: ``_info.json`` is not valid JSON, or ``split`` is missing or ambiguous.
        ValueError: ``max_problems`` < 1.
    """
    from relabel_shards.describe import is_shard_url, shard_split
    from relabel_shards.diversity import ShardClasses, class_sorted_warning, shard_classes

    if max_problems < 1:
        raise ValueError(f"max_problems must be >= 1, got {max_problems}")
    listed = True
    if is_shard_url(url):  # one shard: checked against its entry in the _info.json beside it, if any
        url, name, one = shard_split(url, split, storage_options)
        listed = one is not None
        s = one if one is not None else {"name": split or "?", "filenames": [name], "shard_lengths": []}
    else:
        info = read_info(url, storage_options)
        s = get_split(info, split, join(url, "_info.json"))
    report = VerifyReport(url=url, split=str(s.get("name", split)), max_problems=max_problems)
    section: Mapping[str, Any] = s.get("relabel_shards") or {}
    add = report.add
    if not listed:
        report.warnings.append(f"{s['filenames'][0]} is not listed in an _info.json beside it: its layout "
                               "and label maps are checked, not its sample count, size or sha256")
    elif not section:
        add("_info.json: the split has no relabel_shards section (not written by relabel-shards)")
    filenames = list(s.get("filenames") or [])
    lengths = list(s.get("shard_lengths") or [])
    records = {r.get("filename"): r for r in section.get("shards") or [] if isinstance(r, Mapping)}
    if listed and len(lengths) != len(filenames):
        add(f"_info.json: {len(filenames)} filenames but {len(lengths)} shard_lengths")
    if records and set(records) != set(filenames):
        add(f"_info.json: the shard list of relabel_shards names {sorted(set(records) ^ set(filenames))[:5]} "
            f"not in both it and filenames")
    if listed and s.get("num_samples") != sum(x for x in lengths if isinstance(x, int)):
        add(f"_info.json: num_samples {s.get('num_samples')} != sum of shard_lengths {sum(lengths)}")

    shapes = {tuple(x) for x in section.get("map_shapes") or [] if isinstance(x, list) and len(x) == 2}
    geometry = tuple(section.get(x) for x in ("k", "height", "width", "num_classes"))
    checker: _SplitChecker
    if section.get("kind") == "labels":
        pairs = section.get("pairs_with") or {}
        if images is not None:
            _check_image_pairing(s, images, storage_options, add)
        failed = {str(f.get("key")) for f in section.get("failures") or [] if isinstance(f, Mapping)}
        checker = _LabelChecker(report, geometry, shapes, failed, images, pairs, storage_options)
    else:
        if images is not None:
            add("--images applies to label shards; this split holds full shards (their images are inside)")
        source = section.get("source")
        passed_through = isinstance(source, Mapping) and source.get("kind") == "shards"  # build's member rule
        checker = _SplitChecker(report, geometry, shapes, own_json=not passed_through)
    checker.resolve_key = lambda shard, h: _key_with_hash(join(url, shard), storage_options, h)
    observed: list[ShardClasses] = []  # each shard's class make-up, from its .cls (a few numbers per shard)
    for i, name in enumerate(filenames):
        shard_url = join(url, name)
        fs, path = url_to_fs(shard_url, storage_options)
        try:
            f = fs.open(path, "rb")
        except FileNotFoundError:
            add(f"{name}: missing (listed in _info.json, not found at {shard_url})")
            continue
        with f:
            reader = _HashingReader(f, progress)
            checker.labels = []
            if isinstance(checker, _LabelChecker):
                checker.start_shard(i)
            n = checker.read_shard(reader, name)
            if isinstance(checker, _LabelChecker):
                checker.end_shard(name)
            observed.append(shard_classes(checker.labels))
        report.shards += 1
        report.samples += n
        report.bytes += reader.nbytes
        if i < len(lengths) and n != lengths[i]:
            add(f"{name}: {n} samples read, _info.json says {lengths[i]}")
        rec = records.get(name)
        if rec is None:
            continue
        size = rec.get("bytes")
        if isinstance(size, int) and reader.nbytes != size:
            hint = " (truncated?)" if reader.nbytes < size else ""
            add(f"{name}: {reader.nbytes:,} bytes, _info.json says {size:,}{hint}")
        digest = reader.sha.hexdigest()
        if isinstance(rec.get("sha256"), str) and digest != rec["sha256"]:
            add(f"{name}: sha256 {digest[:16]}… differs from _info.json's {rec['sha256'][:16]}…")
    checker.finish_keys()
    kinds = {(k, c) if (h, w) in checker.map_shapes else (k, h, w, c) for k, h, w, c in checker.geometries}
    if len(kinds) > 1:
        counts = ", ".join(f"k={k} {h}x{w} C={c}: {n}" for (k, h, w, c), n in checker.geometries.items())
        add(f"label maps differ in shape across the split ({counts}); all must be the same")
    if report.samples == 0 and not any(x for x in lengths if isinstance(x, int)):
        add("the split holds no samples: nothing to train on (every input of its build failed?); see "
            "`relabel-shards info` for the failures _info.json lists")
    warning = class_sorted_warning(s, observed=observed)
    if warning:
        report.warnings.append(warning)
    logger.info("%s", report.summary())
    return report


def _check_image_pairing(split: Mapping[str, Any], images: str, storage_options: dict | None,
                         add: Callable[[str], None]) -> None:
    """``pairs_with`` against the image shards' own ``_info.json`` when they have one."""
    from relabel_shards.pairing import check_pairs_with
    from relabel_shards.shards import ShardError

    try:
        image_info = read_info(images, storage_options)
    except FileNotFoundError:
        return  # anyone's shards: the keys are compared sample by sample
    try:
        check_pairs_with(split, get_split(image_info, split.get("name") if split.get("name") in
                                          image_info.get("splits", {}) else None, join(images, "_info.json")))
    except ShardError as e:
        add(str(e))

"""The plan shared by ``build`` and ``convert``: sample order, the job's fingerprint, honest failure reports.

- **Order.** Folder and list sources are written in a seeded global permutation of the source
  (:func:`permutation`), so that every shard holds a fair sample of the classes: a reader that streams whole
  shards can only mix the classes of the shards it has open (``relabel_shards.diversity``). Input shards keep
  their order: output shard *i* pairs with input shard *i*.
- **Fingerprint.** :func:`job_fingerprint` digests a description of everything that decides the bytes
  (inputs, order, settings, annotator). Each shard's sidecar keeps the description, so a rerun into an output
  that holds another build's shards is told which settings differ (:func:`check_output`).
- **Failures.** :class:`FailureTally` logs a few examples per kind of failure and counts the rest, and
  raises :class:`AllInputsFailedError` when nothing but failures came out (a release root one level too high
  must not end in exit 0 after 1.28M warnings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from relabel_shards.shards import json_bytes, url_to_fs

log = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 3  # failures logged one by one per kind of reason; the rest are counted


# ----------------------------------------------------------------------------------------------- order


def permutation(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)``, int64 ``[n]``, the same on every machine and numpy version.

    It is the stable argsort of ``n`` raw 64-bit outputs of ``PCG64(seed)``: numpy fixes a bit generator's
    raw stream (unlike ``Generator.permutation``, whose algorithm may change between versions).
    """
    if n < 0 or isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"n and shuffle_seed must be integers >= 0, got n={n!r}, shuffle_seed={seed!r}")
    raw = np.random.PCG64(int(seed)).random_raw(n)
    return np.argsort(raw, kind="stable")


def ordered(items: Sequence, shuffle: bool, seed: int) -> list:
    """``items`` in the written order: the seeded permutation with ``shuffle``, else as given."""
    if not shuffle:
        return list(items)
    return [items[i] for i in permutation(len(items), seed).tolist()]


def cut(items: Sequence, shard_size: int) -> list[list]:
    """``items`` cut into consecutive shards of ``shard_size`` (the last may be shorter)."""
    return [list(items[i : i + shard_size]) for i in range(0, len(items), shard_size)]


class ShardItems(Sequence):
    """One shard's items of an ``ItemTable``, made on access (the plan of 13M images holds indices only)."""

    def __init__(self, table: Sequence, indices: np.ndarray):
        self.table, self.indices = table, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.table.take(self.indices[i])
        return self.table[int(self.indices[i])]

    def __iter__(self):
        return iter(self.table.take(self.indices))


def plan_items(items: Sequence, shard_size: int, shuffle: bool, seed: int) -> list[Sequence]:
    """The items of each shard in the written order: :func:`ordered` then :func:`cut`; an ``ItemTable``
    (``hasattr take``) is cut into :class:`ShardItems` views of one index array instead."""
    if not hasattr(items, "take"):
        return cut(ordered(items, shuffle, seed), shard_size)
    idx = permutation(len(items), seed) if shuffle else np.arange(len(items))
    return [ShardItems(items, idx[i : i + shard_size]) for i in range(0, len(items), shard_size)]


def order_info(shuffle: bool, seed: int | None, kind: str) -> dict[str, Any]:
    """What ``_info.json`` records of the sample order (``relabel_shards.order``)."""
    if kind == "shards":
        return {"shuffled": False, "seed": None, "note": "input shards keep their order and sharding"}
    return {"shuffled": bool(shuffle), "seed": int(seed) if shuffle and seed is not None else None}


# ----------------------------------------------------------------------------------------- fingerprint


def items_digest(items: Sequence) -> str:
    """sha256 over the items' key, source, label and class name, in the given order (an ``ItemTable``
    digests its columns)."""
    if hasattr(items, "digest"):
        return items.digest()
    h = hashlib.sha256()
    step = 1 << 16
    for i in range(0, len(items), step):
        h.update(
            "".join(
                f"{it.key}\t{it.source}\t{it.label}\t{it.class_name}\n" for it in items[i : i + step]
            ).encode()
        )
    return h.hexdigest()


def job_fingerprint(description: Mapping[str, Any]) -> str:
    """The fingerprint of a job: sha256 of its description's canonical JSON."""
    return hashlib.sha256(json_bytes(dict(description))).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """Which entries of two job descriptions differ, as ``name: there -> now`` phrases."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        if key.endswith("items") and isinstance(a.get(key), str):
            diffs.append(
                "the input list differs (same count, other files, labels or order)"
                if a.get("source.num_files") == b.get("source.num_files")
                else "the input list differs"
            )
            continue
        diffs.append(f"{key}: {_short(a.get(key, '<absent>'))} there, {_short(b.get(key, '<absent>'))} now")
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_output(
    out: str,
    prefix: str,
    fingerprint: str,
    description: Mapping[str, Any],
    storage_options: dict | None = None,
) -> None:
    """Refuse an ``out`` that is a file, or that holds shards of another job (saying what differs).

    Raises:
        ValueError: ``out`` is an existing file, or a sidecar there has another fingerprint.
    """
    fs, root = url_to_fs(out, storage_options)
    try:
        if fs.isfile(root):
            raise ValueError(f"OUT {out!r} is a file; give a directory (or URL prefix) for the shards")
        if not fs.isdir(root):
            return
        names = sorted(
            p
            for p in fs.ls(root, detail=False)
            if re.fullmatch(re.escape(prefix) + r"-\d{6}_stats\.json", posixpath.basename(p))
        )
    except FileNotFoundError:
        return
    if not names:
        return
    try:
        stats = json.loads(fs.cat_file(names[0]))
    except (OSError, ValueError):
        return  # an unreadable sidecar is rewritten by the writer
    if not isinstance(stats, dict) or stats.get("fingerprint") in (None, fingerprint):
        return
    there = (stats.get("extra") or {}).get("job")
    what = (
        describe_difference(there, description)
        if isinstance(there, Mapping)
        else "its sidecars do not say how (an older version wrote them)"
    )
    raise ValueError(
        f"{out} holds shards of a different build ({posixpath.basename(names[0])}): {what}. "
        "Use another output directory, or remove the old shards and their _stats.json files"
    )


# -------------------------------------------------------------------------------------------- failures


class AllInputsFailedError(ValueError):
    """A build or convert wrote no sample: every input failed (the message says why, by kind)."""


def reason_kind(reason: str) -> str:
    """The kind of a failure reason: its text before the first ``(`` or ``:`` (details differ per file)."""
    return re.split(r"[(:]", reason, maxsplit=1)[0].strip() or reason


def summarize_failures(
    failures: Iterable[Mapping[str, Any]], examples: int = EXAMPLES_PER_REASON
) -> list[str]:
    """One line per kind of failure, most frequent first: ``count x kind (e.g. src, src, src)``."""
    counts: Counter = Counter()
    seen: dict[str, list[str]] = {}
    for f in failures:
        kind = reason_kind(str(f.get("reason", "")))
        counts[kind] += 1
        ex = seen.setdefault(kind, [])
        if len(ex) < examples:
            ex.append(str(f.get("source", f.get("key", "?"))))
    return [f"{n:,} x {kind} (e.g. {', '.join(seen[kind])})" for kind, n in counts.most_common()]


class FailureTally:
    """Count a job's failures by kind; log the first few of each kind and a one-line total at the end."""

    def __init__(self, job_name: str, examples: int = EXAMPLES_PER_REASON):
        self.job_name = job_name
        self.examples = examples
        self.counts: Counter = Counter()

    def take(self, chunk: Mapping[str, Any], *, strict: bool) -> list[dict]:
        """The failed entries of a chunk (those with a ``reason``), tallied.

        Raises:
            ValueError: an entry marked ``fatal``, or any failure when ``strict`` (naming file and reason).
        """
        failed = [e for e in chunk["entries"] if "reason" in e]
        if not failed:
            return failed
        fatal = [e for e in failed if e.get("fatal")]
        if fatal:
            raise ValueError(fatal[0]["reason"])
        if strict:
            f = failed[0]
            raise ValueError(f"{f['source']}: {f['reason']} (strict: a bad input stops the {self.job_name})")
        self.add(failed)
        return failed

    def add(self, failures: Iterable[Mapping[str, Any]]) -> None:
        for f in failures:
            kind = reason_kind(str(f.get("reason", "")))
            self.counts[kind] += 1
            n = self.counts[kind]
            if n <= self.examples:
                more = " (further ones of this kind are counted, not listed)" if n == self.examples else ""
                log.warning("skipping %s: %s%s", f.get("source"), f.get("reason"), more)
            else:
                log.debug("skipping %s: %s", f.get("source"), f.get("reason"))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def log_total(self) -> None:
        if self.total:
            log.warning(
                "%s skipped %d inputs: %s",
                self.job_name,
                self.total,
                "; ".join(f"{n} x {k}" for k, n in self.counts.most_common()),
            )


def check_not_all_failed(
    job_name: str,
    images: int,
    failures: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any] | None,
    out: str,
) -> None:
    """Raise when this call wrote no sample but had failures, or the finished split holds no sample.

    Raises:
        AllInputsFailedError: naming the count, the kinds of failure with examples, and what to do.
    """
    finished_empty = info is not None and int(info.get("num_samples", 0)) == 0
    if not ((images == 0 and failures) or finished_empty):
        return
    listed = failures or (info or {}).get("relabel_shards", {}).get("failures") or []
    n = len(listed) if failures else int((info or {}).get("relabel_shards", {}).get("num_failures", 0))
    kinds = "; ".join(summarize_failures(listed)) or "no input at all"
    raise AllInputsFailedError(
        f"{job_name} failed: every one of its {n:,} inputs failed and no sample was written to {out} "
        f"({kinds}). Check the source paths; {out} now holds only failure lists: remove it before a rerun"
    )

"""Which image shards a label set belongs to: key digests and the ``pairs_with`` check (DESIGN.md).

A **label set** is label shards (``kind: "labels"``): label shard *i* holds, for each key of image shard *i*
and in the same order, one member ``<key>.rlm``. Its ``_info.json`` split says which image shards it pairs
with, in the project section::

    "relabel_shards": {"kind": "labels",
                       "pairs_with": {"filenames": [...], "shard_lengths": [...], "key_digests": [...]}, ...}

``key_digests[i]`` is :func:`key_digest` of image shard *i*'s keys, so a label set made for other image
shards is caught from the two ``_info.json`` files alone, before a sample is read (:func:`check_pairs_with`).

A key whose image could not be annotated keeps its place with an **empty** ``<key>.rlm`` (zero bytes) and is
listed in the split's ``failures``: the label shard still holds exactly the image shard's keys, so lockstep
readers never lose their step; an empty record is "no label for this image".

Full shards (image and record in one tar) have ``kind: "full"`` or no kind.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from relabel_shards.shards import ShardError

KIND_LABELS = "labels"
KIND_FULL = "full"


def key_digest(keys: Iterable[str]) -> str:
    """Hex sha256 of the keys joined by ``"\\n"`` (UTF-8), in order: one shard's key list in 64 characters."""
    h = hashlib.sha256()
    for i, k in enumerate(keys):
        h.update(b"\n" if i else b"")
        h.update(k.encode("utf-8"))
    return h.hexdigest()


def split_kind(split_info: Mapping[str, Any]) -> str:
    """``"labels"`` for a label set, else ``"full"`` (full shards, or any split without our section)."""
    section = split_info.get("relabel_shards") or {}
    return KIND_LABELS if section.get("kind") == KIND_LABELS else KIND_FULL


def pairs_with_entry(
    filenames: Sequence[str], shard_lengths: Sequence[int], key_digests: Sequence[str]
) -> dict[str, list]:
    """The ``pairs_with`` object of a label set's ``_info.json`` (image shard names as base names)."""
    if not len(filenames) == len(shard_lengths) == len(key_digests):
        raise ValueError(
            f"pairs_with: {len(filenames)} filenames, {len(shard_lengths)} shard_lengths and "
            f"{len(key_digests)} key_digests; they must be equally long"
        )
    return {
        "filenames": [posixpath.basename(str(f)) for f in filenames],
        "shard_lengths": [int(n) for n in shard_lengths],
        "key_digests": [str(d) for d in key_digests],
    }


def image_key_digests(image_info_split: Mapping[str, Any]) -> list[str] | None:
    """The key digests an image split's ``_info.json`` declares (``key_digests`` at the split's top level or
    in our section), or None when it declares none (timm's own ``_info.json``)."""
    for where in (image_info_split, image_info_split.get("relabel_shards") or {}):
        d = where.get("key_digests")
        if isinstance(d, list):
            return [str(x) for x in d]
    return None


def check_pairs_with(label_info_split: Mapping[str, Any], image_info_split: Mapping[str, Any]) -> None:
    """Check that a label set was made for these image shards, from the two ``_info.json`` splits alone.

    Compares the label set's ``pairs_with`` with the image split's ``filenames`` and ``shard_lengths`` (base
    names), and the key digests where the image split declares them (:func:`image_key_digests`).

    Args:
        label_info_split: the label set's split (``kind: "labels"`` with ``pairs_with``).
        image_info_split: the image shards' split (timm's layout: ``filenames``, ``shard_lengths``).

    Raises:
        ShardError: not a label set, no ``pairs_with``, another shard count, or the first shard whose name,
            sample count or key digest differs (named, with both values).
    """
    section = label_info_split.get("relabel_shards") or {}
    lname = label_info_split.get("name", "?")
    if section.get("kind") != KIND_LABELS:
        raise ShardError(
            f"split {lname!r} is not a label set (its _info.json has no relabel_shards.kind "
            f"{KIND_LABELS!r}); full shards need no image shards"
        )
    pw = section.get("pairs_with")
    if not isinstance(pw, Mapping):
        raise ShardError(
            f"label set split {lname!r} names no image shards to pair with (no pairs_with): it "
            "was built from an image folder; pair it with images by `relabel-shards join`"
        )
    want_names = [str(x) for x in pw.get("filenames") or []]
    want_lengths = [int(x) for x in pw.get("shard_lengths") or []]
    want_digests = [str(x) for x in pw.get("key_digests") or []]
    names = [posixpath.basename(str(x)) for x in image_info_split.get("filenames") or []]
    lengths = [int(x) for x in image_info_split.get("shard_lengths") or []]
    digests = image_key_digests(image_info_split)
    if len(names) != len(want_names):
        raise ShardError(
            f"label set split {lname!r} pairs with {len(want_names)} image shards "
            f"({_few(want_names)}), the image split has {len(names)} ({_few(names)})"
        )
    for i, (name, want) in enumerate(zip(names, want_names, strict=True)):
        where = f"image shard {i} ({name})"
        if name != want:
            raise ShardError(
                f"label set split {lname!r} was made for other image shards: {where}, the label "
                f"set's shard {i} pairs with {want}"
            )
        if i < len(lengths) and i < len(want_lengths) and lengths[i] != want_lengths[i]:
            raise ShardError(
                f"label set split {lname!r} was made for other image shards: {where} holds "
                f"{lengths[i]} samples, the label set's shard {i} was made for {want_lengths[i]}"
            )
        if (
            digests is not None
            and i < len(digests)
            and i < len(want_digests)
            and digests[i] != want_digests[i]
        ):
            raise ShardError(
                f"label set split {lname!r} was made for other image shards: {where} has key "
                f"digest {digests[i][:16]}…, the label set's shard {i} was made for keys with "
                f"digest {want_digests[i][:16]}…"
            )


def _few(names: Sequence[str]) -> str:
    if len(names) <= 2:
        return ", ".join(names) or "none"
    return f"{names[0]} … {names[-1]}"

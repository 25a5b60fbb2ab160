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
    names), and the key digests where the image split declares them (:func:`image_key_digests`). The
    messages are those of helper ``stream``'s version of this function (the loader's tests pin them).

    Args:
        label_info_split: the label set's split (``kind: "labels"`` with ``pairs_with``).
        image_info_split: the image shards' split (timm's layout: ``filenames``, ``shard_lengths``).

    Raises:
        ShardError: not a label set, no ``pairs_with``, another shard count, or the first shard whose name,
            sample count or key digest differs (named, with both values).
    """
    section = label_info_split.get("relabel_shards") or {}
    if section.get("kind") != KIND_LABELS:
        raise ShardError(
            f"not a label set (relabel_shards.kind is {section.get('kind')!r}, expected {KIND_LABELS!r}): "
            "full shards need no image shards"
        )
    pairs = section.get("pairs_with")
    if not isinstance(pairs, Mapping):
        raise ShardError(
            "the label set's _info.json has no relabel_shards.pairs_with: it does not say which image shards "
            "it pairs with (a label set built from an image folder); pair it with images by "
            "`relabel-shards join`"
        )
    names = [str(x) for x in pairs.get("filenames") or []]
    counts = [int(x) for x in pairs.get("shard_lengths") or []]
    digests = [str(x) for x in pairs.get("key_digests") or []]
    img_names = [posixpath.basename(str(x)) for x in image_info_split.get("filenames") or []]
    img_counts = [int(x) for x in image_info_split.get("shard_lengths") or []]
    img_digests = image_key_digests(image_info_split) or []
    own = list(label_info_split.get("filenames") or [])
    if len(names) != len(img_names) or (own and len(own) != len(img_names)):
        raise ShardError(
            f"the label set pairs with {len(names)} image shards ({_few(names)}) and holds {len(own)} label "
            f"shards; these image shards are {len(img_names)} ({_few(img_names)})"
        )
    for i, name in enumerate(img_names):
        if names[i] != name:
            raise ShardError(
                f"label shard {i} ({own[i] if own else '?'}) pairs with image shard {names[i]!r}, "
                f"not {name!r}: the label set was made for other image shards"
            )
        if i < len(counts) and i < len(img_counts) and counts[i] != img_counts[i]:
            raise ShardError(
                f"label shard {i} pairs with {counts[i]} samples of {name!r}; the image shards' "
                f"_info.json lists {img_counts[i]}: the label set was made for other image shards"
            )
        if i < len(digests) and i < len(img_digests) and digests[i] != img_digests[i]:
            raise ShardError(
                f"label shard {i} pairs with other keys than image shard {name!r} (key digest "
                f"{digests[i][:12]}... against {img_digests[i][:12]}...): the label set was made for "
                "other image shards"
            )


def _few(names: Sequence[str]) -> str:
    if len(names) <= 2:
        return ", ".join(names) or "none"
    return f"{names[0]} … {names[-1]}"

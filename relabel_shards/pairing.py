"""Which image shards a label set pairs with: key digests and the check made before the first batch.

Label shard *i* pairs with image shard *i*: the same keys in the same order. The label set's ``_info.json``
split names the image shards it was made for (``relabel_shards.pairs_with``: file names, sample counts and
a digest of each shard's key list), so a label set made for other image shards is refused before a sample
is read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from relabel_shards.shards import ShardError

__all__ = ["key_digest", "check_pairs_with"]


def key_digest(keys: Iterable[str]) -> str:
    """Hex sha256 of a shard's sample keys joined by ``"\\n"`` (in shard order)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def check_pairs_with(label_info_split: dict[str, Any], image_info_split: dict[str, Any]) -> None:
    """Check that a label set was made for these image shards (names, counts, key digests where known).

    Args:
        label_info_split: the label set's ``_info.json`` split; its ``relabel_shards.pairs_with`` holds
            ``filenames``, ``shard_lengths`` and ``key_digests`` of the image shards it pairs with.
        image_info_split: the image shards' ``_info.json`` split (``filenames``, ``shard_lengths``; and
            ``relabel_shards.key_digests`` where the image set records them).

    Raises:
        ShardError: the label set records no pairing, has another shard count, or the first shard whose
            name, count or key digest differs (named in the message).
    """
    section = label_info_split.get("relabel_shards") or {}
    pairs = section.get("pairs_with")
    if not isinstance(pairs, dict):
        raise ShardError(
            "the label set's _info.json has no relabel_shards.pairs_with: it does not say which "
            "image shards it pairs with"
        )
    names = list(pairs.get("filenames") or [])
    counts = list(pairs.get("shard_lengths") or [])
    digests = list(pairs.get("key_digests") or [])
    img_names = list(image_info_split.get("filenames") or [])
    img_counts = list(image_info_split.get("shard_lengths") or [])
    img_digests = list((image_info_split.get("relabel_shards") or {}).get("key_digests") or [])
    own = list(label_info_split.get("filenames") or [])
    if len(names) != len(img_names) or (own and len(own) != len(img_names)):
        raise ShardError(
            f"the label set pairs with {len(names)} image shards and holds {len(own)} label "
            f"shards; these image shards are {len(img_names)}"
        )
    for i, name in enumerate(img_names):
        if names[i] != name:
            raise ShardError(
                f"label shard {i} ({own[i] if own else '?'}) pairs with image shard {names[i]!r}, "
                f"not {name!r}: the label set was made for other image shards"
            )
        if i < len(counts) and i < len(img_counts) and int(counts[i]) != int(img_counts[i]):
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

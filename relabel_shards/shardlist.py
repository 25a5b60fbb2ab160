"""Which shards a dataset URL means and how many samples each holds, from ``_info.json``.

The streaming loader sizes its epochs from these counts (every rank yields the same number of batches), so
every shard it reads must be listed, with its length, in the ``_info.json`` beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from relabel_shards.decode import Geometry
from relabel_shards.shards import INFO_NAME, ShardError, expand_urls, get_split, join, read_info

__all__ = ["resolve_shards", "resolve_labels", "LabelSet"]


def _is_root(url: str) -> bool:
    return not url.rstrip("/").endswith(".tar") and "{" not in url and "::" not in url


def _length(value: object, where: str, name: str) -> int:
    """A shard length from ``_info.json``: a non-negative integer, or an error naming the file and shard."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShardError(f"{where}: shard_lengths gives {value!r} for {name}; expected a non-negative "
                         "integer")
    return value


def resolve_shards(urls: str | Sequence[str], split: str | None = None,
                   storage_options: dict | None = None, splits: list[dict] | None = None
                   ) -> tuple[list[tuple[str, int]], Geometry | None]:
    """The shard URLs with their sample counts, and the label-map geometry, from ``_info.json``.

    Args:
        urls: a directory or URL prefix holding ``_info.json``; or shard URLs (brace patterns, lists,
            ``::``-joined), each listed in the ``_info.json`` of its own directory.
        split: which split of ``_info.json``; may be omitted when it holds only one.
        splits: if given, each dataset directory's ``_info.json`` split is appended to it.

    Returns:
        ``([(url, num_samples), ...], geometry)``; geometry is None where ``_info.json`` does not give
        k, height, width and num_classes.

    Raises:
        FileNotFoundError: no ``_info.json`` where one is needed.
        ShardError: a shard is not listed in its ``_info.json``, or the lists disagree.
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    if not items:
        raise ValueError("urls must name at least one dataset directory or shard, got an empty list")
    shards: list[tuple[str, int]] = []
    sections: list[dict] = []
    infos: dict[str, dict] = {}
    for item in items:
        if _is_root(item):
            sp = get_split(read_info(item, storage_options), split, join(item, INFO_NAME))
            if splits is not None:
                splits.append(sp)
            names, lengths = sp.get("filenames", []), sp.get("shard_lengths", [])
            if len(names) != len(lengths):
                raise ShardError(f"{join(item, INFO_NAME)}: {len(names)} filenames but "
                                 f"{len(lengths)} shard_lengths")
            shards += [(join(item, n), _length(m, join(item, INFO_NAME), n)) for n, m in zip(names, lengths,
                                                                                            strict=True)]
            sections.append(sp.get("relabel_shards", {}))
            continue
        for url in expand_urls(item):
            base, _, name = url.rstrip("/").rpartition("/")
            if base not in infos:
                infos[base] = read_info(base or ".", storage_options)
            splits = infos[base].get("splits", {}).values() if split is None else \
                [get_split(infos[base], split, join(base, INFO_NAME))]
            for sp in splits:
                if name in sp.get("filenames", []):
                    shards.append((url, _length(sp["shard_lengths"][sp["filenames"].index(name)],
                                                join(base, INFO_NAME), name)))
                    sections.append(sp.get("relabel_shards", {}))
                    break
            else:
                raise ShardError(f"{url} is not listed in {join(base, INFO_NAME)}; the loader needs every "
                                 "shard's length from _info.json to give each rank the same number of "
                                 "batches")
    for s in sections:
        if s.get("map_shapes"):
            raise ShardError(
                f"the label maps of this dataset come in {len(s['map_shapes'])} shapes (h, w) "
                f"{[tuple(x) for x in s['map_shapes']]}: it was built with --keep-aspect, which keeps each "
                "image's own map shape for inspection (show, verify); training batches need one shape, so "
                "build without --keep-aspect")
    geos = {Geometry(int(s["k"]), int(s["height"]), int(s["width"]), int(s["num_classes"]))
            for s in sections if all(s.get(f) is not None for f in ("k", "height", "width", "num_classes"))}
    if len(geos) > 1:
        raise ShardError(f"the shards' _info.json sections give different label-map geometries: "
                         f"{sorted(geos)}")
    return shards, (geos.pop() if geos else None)


# Batch keys a label set's name may not take (DESIGN.md "Loader output").
RESERVED_NAMES = frozenset({"images", "labels", "boxes", "values", "indices", "flips", "keys"})


@dataclass(frozen=True)
class LabelSet:
    """One label set joined to the image shards: label shard ``urls[i]`` pairs with image shard ``i``.

    ``name`` is ``""`` for a single set given as ``labels="url"`` (its maps come out as ``values`` /
    ``indices``); otherwise the batch key its maps come out under.
    """

    name: str
    root: str
    urls: tuple[str, ...]
    geometry: Geometry | None


def _geometry(section: dict) -> Geometry | None:
    if all(section.get(f) is not None for f in ("k", "height", "width", "num_classes")):
        return Geometry(int(section["k"]), int(section["height"]), int(section["width"]),
                        int(section["num_classes"]))
    return None


def resolve_labels(labels: str | Mapping[str, str], shards: Sequence[tuple[str, int]],
                   split: str | None = None, storage_options: dict | None = None) -> list[LabelSet]:
    """The label sets to join with ``shards`` (image shards), each checked against them before any read.

    Args:
        labels: a label set's directory or URL prefix (with its ``_info.json``), or ``{name: url}`` for
            several.
        shards: the image shards ``[(url, samples)]`` from :func:`resolve_shards`, in order.

    Raises:
        ValueError: a bad name.
        ShardError: a label set made for other image shards (the first differing shard is named), or
            one whose ``_info.json`` is not a label set.
    """
    from relabel_shards.pairing import check_pairs_with

    named = {"": labels} if isinstance(labels, str) else dict(labels)
    if not named:
        raise ValueError("labels must be a label set's URL or a non-empty {name: url} dict, got {}")
    image_split = {"filenames": [u.rstrip("/").rpartition("/")[2] for u, _ in shards],
                   "shard_lengths": [n for _, n in shards]}
    out = []
    for name, root in named.items():
        if not isinstance(labels, str) and (not isinstance(name, str) or not name.isidentifier()
                                            or name in RESERVED_NAMES):
            raise ValueError(f"label set names must be Python identifiers other than "
                             f"{sorted(RESERVED_NAMES)}, got {name!r}")
        if not isinstance(root, str) or not _is_root(root):
            raise ValueError(f"labels[{name!r}] must be the directory or URL prefix of a label set "
                             f"(holding its _info.json), got {root!r}")
        where = join(root, INFO_NAME)
        sp = get_split(read_info(root, storage_options), split, where)
        section = sp.get("relabel_shards") or {}
        if section.get("kind") != "labels":
            raise ShardError(f"{where}: not a label set (relabel_shards.kind is {section.get('kind')!r}, "
                             "expected 'labels'); full shards go in urls, not labels=")
        try:
            check_pairs_with(sp, image_split)
        except ShardError as e:
            raise ShardError(f"{where}: {e}") from None
        names = sp.get("filenames", [])
        lengths = [_length(m, where, n) for n, m in zip(names, sp.get("shard_lengths", []), strict=False)]
        if lengths and lengths != image_split["shard_lengths"]:
            i = next(j for j, (a, b) in enumerate(zip(lengths, image_split["shard_lengths"], strict=False))
                     if a != b)
            raise ShardError(f"{where}: label shard {names[i]} holds {lengths[i]} samples, its image shard "
                             f"{shards[i][0]} {shards[i][1]}")
        out.append(LabelSet(name, root, tuple(join(root, n) for n in names), _geometry(section)))
    return out

"""Which shards a dataset URL means and how many samples each holds, from ``_info.json``.

The streaming loader sizes its epochs from these counts (every rank yields the same number of batches), so
every shard it reads must be listed, with its length, in the ``_info.json`` beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

from relabel_shards.decode import Geometry
from relabel_shards.shards import INFO_NAME, ShardError, expand_urls, get_split, join, read_info

__all__ = ["resolve_shards"]


def _is_root(url: str) -> bool:
    return not url.rstrip("/").endswith(".tar") and "{" not in url and "::" not in url


def resolve_shards(urls: str | Sequence[str], split: str | None = None,
                   storage_options: dict | None = None) -> tuple[list[tuple[str, int]], Geometry | None]:
    """The shard URLs with their sample counts, and the label-map geometry, from ``_info.json``.

    Args:
        urls: a directory or URL prefix holding ``_info.json``; or shard URLs (brace patterns, lists,
            ``::``-joined), each listed in the ``_info.json`` of its own directory.
        split: which split of ``_info.json``; may be omitted when it holds only one.

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
            names, lengths = sp.get("filenames", []), sp.get("shard_lengths", [])
            if len(names) != len(lengths):
                raise ShardError(f"{join(item, INFO_NAME)}: {len(names)} filenames but "
                                 f"{len(lengths)} shard_lengths")
            shards += [(join(item, n), int(m)) for n, m in zip(names, lengths, strict=True)]
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
                    shards.append((url, int(sp["shard_lengths"][sp["filenames"].index(name)])))
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

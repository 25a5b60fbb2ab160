"""A readable summary of a dataset's ``_info.json`` (what ``relabel-shards info`` prints).

The summary reads the file defensively: timm's fields (``splits.<name>.{num_samples, filenames,
shard_lengths}``) and the project's ``relabel_shards`` section (format version, annotator, k/h/w/C, class
names, per-shard bytes and sha256, failures) are shown when present and skipped quietly when not, so the
command also works on plain timm/webdataset datasets and on older or partial files.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from relabel_shards.shards import INFO_NAME, get_split, join, read_info

# Keys of the project section that the summary lays out itself; any other scalar key is listed as is.
_KNOWN = {"format_version", "shards", "annotator", "k", "height", "width", "num_classes", "class_names",
          "failures", "num_failures", "map_shapes", "encoding", "labelmap_ext", "source", "dataset_classes",
          "order", "shard_classes", "kind", "pairs_with"}


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``: a byte count in binary units with three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)) and len(v) <= 8 and all(isinstance(x, (int, float, str)) for x in v):
        return "(" + ", ".join(_scalar(x) for x in v) + ")"
    if isinstance(v, str) and len(v) >= 40 and all(ch in "0123456789abcdef" for ch in v):
        return v[:12] + "…"  # a digest
    if isinstance(v, str) and len(v) > 80:
        return v[:77] + "…"
    return str(v)


def _failures(section: Mapping[str, Any]) -> tuple[int, list[str]]:
    """(count, first few as text) of the build failures, whether stored as a list, a count or a dict."""
    failures = section.get("failures")
    if failures is None:
        return 0, []
    if isinstance(failures, int):
        return failures, []
    if isinstance(failures, Mapping):  # e.g. {"count": n, "items": [...]} or {path: reason}
        items = failures.get("items", failures.get("list"))
        if isinstance(items, Sequence) and not isinstance(items, str):
            return int(failures.get("count", len(items))), [_failure_text(x) for x in items[:3]]
        return len(failures), [f"{k}: {v}" for k, v in list(failures.items())[:3]]
    if isinstance(failures, Sequence) and not isinstance(failures, str):
        return len(failures), [_failure_text(x) for x in failures[:3]]
    return 0, []


def _failure_text(item: Any) -> str:
    if isinstance(item, Mapping):
        where = item.get("path", item.get("source", item.get("key", "?")))
        why = item.get("reason", item.get("error", ""))
        return f"{where}: {why}" if why else str(where)
    return str(item)


def _order_lines(split: Mapping[str, Any], section: Mapping[str, Any]) -> list[str]:
    """The sample order, the classes per shard, and the class-sorted warning when it applies."""
    from relabel_shards.diversity import class_sorted_warning, recorded_shard_classes

    lines = []
    order = section.get("order")
    if isinstance(order, Mapping):
        how = (f"shuffled (a seeded global permutation, seed {order.get('seed')})" if order.get("shuffled")
               else "source order" + (f" ({order['note']})" if order.get("note") else ""))
        lines.append(f"  order: {how}")
    shards = recorded_shard_classes(split)
    if shards:
        d = sorted(s.distinct for s in shards)
        lines.append(f"  distinct classes per shard: min {d[0]:,}, median {d[len(d) // 2]:,}, max {d[-1]:,}")
    warning = class_sorted_warning(split)
    if warning:
        lines.extend(textwrap.wrap("WARNING: " + warning, width=108, initial_indent="  ",
                                   subsequent_indent="    ", break_on_hyphens=False))
    return lines


def format_split(split: Mapping[str, Any], *, max_shards: int = 4) -> list[str]:
    """Lines describing one split of ``_info.json``.

    Args:
        split: ``splits.<name>`` of ``_info.json``.
        max_shards: how many shards to list by name (the first ones and the last); 0 lists none.
    """
    name = split.get("name", "?")
    section = split.get("relabel_shards") or {}
    filenames = list(split.get("filenames") or [])
    lengths = list(split.get("shard_lengths") or [])
    records = [r for r in section.get("shards") or [] if isinstance(r, Mapping)]
    num_samples = split.get("num_samples", sum(x for x in lengths if isinstance(x, int)))
    sizes = [r["bytes"] for r in records if isinstance(r.get("bytes"), int)]
    nshards = len(filenames) or len(records)
    line = f"split {name}: {num_samples:,} samples in {nshards:,} shard{'s' if nshards != 1 else ''}"
    if sizes:
        line += f", {human_bytes(sum(sizes))}"
        if num_samples:
            line += f" ({human_bytes(sum(sizes) / num_samples)} per sample)"
    lines = [line]
    if not section:
        lines.append("  no relabel_shards section: not written by relabel-shards (no label maps described)")
    else:
        k, h, w, c = (section.get(x) for x in ("k", "height", "width", "num_classes"))
        names = section.get("class_names")
        shapes = [x for x in section.get("map_shapes") or [] if isinstance(x, list) and len(x) == 2]
        if h is None and shapes:
            grid = f"grids of {len(shapes)} shapes ({', '.join(f'{a}x{b}' for a, b in shapes[:4])}" + \
                   (", …" if len(shapes) > 4 else "") + ", rows x columns)"
        else:
            grid = f"a {h}x{w} grid (rows x columns)"
        label = f"  label maps: k={k} top classes on {grid}, C={c} classes"
        if c == 1000:
            label += " (ImageNet-1k)"
        elif isinstance(names, Sequence) and not isinstance(names, str) and names:
            short = [str(n).split(",")[0] for n in names[:3]]  # "tabby, tabby cat" -> "tabby"
            label += f" ({', '.join(short)}{', …' if len(names) > 3 else ''})"
        label += f"; format version {section.get('format_version', '?')}"
        if section.get("encoding"):
            label += f", {section['encoding']} encoding"
        lines.append(label)
        annotator = section.get("annotator")
        if isinstance(annotator, Mapping) and annotator:
            first = [x for x in ("model", "weights") if x in annotator]
            items = [f"{key} {_scalar(annotator[key])}" for key in first]
            items += [f"{key} {_scalar(v)}" for key, v in annotator.items() if key not in first]
            lines.extend(textwrap.wrap("annotator: " + ", ".join(items), width=108, initial_indent="  ",
                                       subsequent_indent="    ", break_on_hyphens=False))
        elif annotator:
            lines.append(f"  annotator: {_scalar(annotator)}")
        if section.get("kind") == "labels":  # label shards (relabel_shards.pairing)
            pw = section.get("pairs_with")
            if isinstance(pw, Mapping) and pw.get("filenames"):
                names = list(pw["filenames"])
                shown = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
                total = sum(int(n) for n in pw.get("shard_lengths") or [])
                lines.append(f"  label shards: pair with {len(names):,} image shards ({shown}, {total:,} "
                             f"samples; key digests in {INFO_NAME})")
            else:
                lines.append("  label shards: pair with no image shards yet (built from an image folder; "
                             "see relabel-shards join)")
        source = section.get("source")
        if isinstance(source, Mapping):
            lines.append("  source: " + ", ".join(f"{key} {v}" for key, v in source.items()))
        elif source:
            lines.append(f"  source: {source}")
        classes = section.get("dataset_classes")
        if isinstance(classes, Sequence) and not isinstance(classes, str) and classes:
            lines.append(f"  source classes (.cls): {len(classes)} ({', '.join(map(str, classes[:5]))}"
                         f"{', …' if len(classes) > 5 else ''})")
        nfail, examples = _failures(section)
        if isinstance(section.get("num_failures"), int):
            nfail = section["num_failures"]
        lines.append(f"  failures: {nfail} source image{'s' if nfail != 1 else ''} skipped"
                     + (f" (e.g. {'; '.join(examples)})" if examples else ""))
        lines.extend(_order_lines(split, section))
        others = {key: v for key, v in section.items() if key not in _KNOWN}
        if others:
            lines.append("  also: " + ", ".join(f"{key}={_scalar(v)}" for key, v in sorted(others.items())))
    if lengths and nshards:
        lines.append(f"  samples per shard: min {min(lengths):,}, max {max(lengths):,}")
    if max_shards and nshards:
        by_name = {r.get("filename"): r for r in records}
        order = filenames or [r.get("filename") for r in records]
        shown = list(range(nshards)) if nshards <= max_shards else [*range(max_shards - 1), nshards - 1]
        for pos, i in enumerate(shown):
            if pos and i != shown[pos - 1] + 1:
                lines.append(f"    … {i - shown[pos - 1] - 1:,} more")
            rec = by_name.get(order[i], {})
            n = lengths[i] if i < len(lengths) else rec.get("num_samples", "?")
            extra = ""
            if isinstance(rec.get("bytes"), int):
                extra += f", {human_bytes(rec['bytes'])}"
            if isinstance(rec.get("sha256"), str):
                extra += f", sha256 {rec['sha256'][:12]}…"
            lines.append(f"    {order[i]}: {n} sample{'' if n == 1 else 's'}{extra}")
    return lines


def format_info(info: Mapping[str, Any], *, url: str = "", split: str | None = None,
                max_shards: int = 4) -> str:
    """The readable summary of a parsed ``_info.json``, one fact per line.

    Args:
        info: the parsed ``_info.json``.
        url: where it was read from (shown in the first line).
        split: only this split (all splits when None).
        max_shards: shards listed by name per split.

    Raises:
        ShardError: ``split`` names a split the file does not hold.
    """
    where = url or INFO_NAME
    header = f"dataset {info.get('name', '?')}" + (f"  ({where})" if url else "")
    lines = [header]
    if split is not None:
        splits = [get_split(dict(info), split, where)]
    else:
        splits = list(info.get("splits", {}).values())
    if not splits:
        lines.append("  no splits")
    for s in splits:
        lines.extend(format_split(s, max_shards=max_shards))
    return "\n".join(lines)


def is_shard_url(url: str) -> bool:
    """Whether ``url`` names one shard (a ``.tar`` file) rather than a dataset directory or prefix."""
    return url.rstrip("/").lower().endswith(".tar")


def shard_split(url: str, split: str | None = None, storage_options: dict | None = None
                ) -> tuple[str, str, dict[str, Any] | None]:
    """(directory, file name, the split of ``_info.json`` narrowed to this one shard) for a shard URL.

    The split is None when there is no ``_info.json`` beside the shard or it does not list the shard.
    The narrowed split keeps the split's name and project section, with only this shard's entries.
    """
    from relabel_shards.shards import ShardError

    base, _, name = url.rstrip("/").rpartition("/")
    base = base or "."
    try:
        info = read_info(base, storage_options)
    except FileNotFoundError:
        return base, name, None
    candidates = [get_split(info, split, join(base, INFO_NAME))] if split is not None else \
        list(info.get("splits", {}).values())
    for sp in candidates:
        names = list(sp.get("filenames") or [])
        if name not in names:
            continue
        i = names.index(name)
        lengths = list(sp.get("shard_lengths") or [])
        section = dict(sp.get("relabel_shards") or {})
        if isinstance(section.get("shards"), list):
            section["shards"] = [r for r in section["shards"] if isinstance(r, Mapping)
                                 and r.get("filename") == name]
        if isinstance(section.get("shard_classes"), list) and len(section["shard_classes"]) == len(names):
            section["shard_classes"] = [section["shard_classes"][i]]
        else:
            section.pop("shard_classes", None)
        one = {**sp, "filenames": [name], "shard_lengths": lengths[i:i + 1],
               "num_samples": lengths[i] if i < len(lengths) else None, "relabel_shards": section}
        if not sp.get("relabel_shards"):
            one.pop("relabel_shards")
        return base, name, one
    if split is not None:
        raise ShardError(f"{join(base, INFO_NAME)}: split {split!r} does not list {name}")
    return base, name, None


def _scan_shard(url: str, storage_options: dict | None) -> list[str]:
    """Lines describing a shard that no ``_info.json`` lists: samples, member extensions, bytes."""
    from collections import Counter

    from relabel_shards.shards import split_member_name, url_to_fs
    from relabel_shards.sources import iter_shard_samples

    fs, path = url_to_fs(url, storage_options)
    n, exts = 0, Counter()
    for _key, members in iter_shard_samples(url, storage_options):
        n += 1
        exts.update(split_member_name(m)[1] for m, _ in members)
    size = fs.size(path)
    members = ", ".join(f".{e} {c:,}" for e, c in sorted(exts.items()))
    return [f"shard {url}: {n:,} sample{'s' if n != 1 else ''}, {human_bytes(size)}",
            f"  members: {members or 'none'}",
            f"  not listed in an {INFO_NAME} beside it (no annotator, k/h/w/C or checksums to show)"]


def describe(url: str, *, split: str | None = None, storage_options: dict | None = None,
             max_shards: int = 4) -> str:
    """Read ``_info.json`` at a directory or URL prefix and summarize it.

    ``url`` may be local, ``s3://``, ``gs://`` or ``http(s)://``; or one shard (``.tar``): then the
    summary is that shard's entry in the ``_info.json`` beside it, or what reading the shard shows.

    Raises:
        FileNotFoundError: no ``_info.json`` there (a dataset URL), or no such shard.
        ShardError: it is not valid JSON, or ``split`` is not in it.
    """
    if is_shard_url(url):
        base, name, one = shard_split(url, split, storage_options)
        if one is None:
            return "\n".join(_scan_shard(url, storage_options))
        info = read_info(base, storage_options)
        header = f"dataset {info.get('name', '?')}  ({join(base, INFO_NAME)}), shard {name} only"
        return "\n".join([header, *format_split(one, max_shards=max_shards)])
    info = read_info(url, storage_options)
    shown = url if url.rstrip("/").endswith(".json") else join(url, INFO_NAME)
    return format_info(info, url=shown, split=split, max_shards=max_shards)

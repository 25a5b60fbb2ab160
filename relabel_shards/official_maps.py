"""Reading and validating the official ReLabel release's label-map files (one ``torch.save`` file per image).

The release (naver-ai/relabel_imagenet, ``relabel_imagenet.tar``) lays out one file per ImageNet training
image like the train folder: ``n04355338/n04355338_22023.pt``. Each holds a float32 tensor ``[2, 5, 15, 15]``:
``[0]`` the top-5 scores (raw logits) and ``[1]`` their class indices stored as floats. The official loader
finds a map as the image's last two path components with the extension replaced by ``.pt``
(``utils/relabel_functions.py``, ``ImageFolderWithCoordsAndLabelMap``); :func:`map_relpath` gives the same
name.

Files are read with ``torch.load(weights_only=True)`` only, which handles both the legacy and the zip
serialization and refuses to unpickle anything but tensors and plain containers. Every problem raises
:class:`OfficialMapError` with a short reason (the caller adds the path).

A hostile file costs little: :func:`read_map_file` refuses a file larger than ``MAX_FILE_BYTES`` from its
size before reading it (and never reads more than that, whatever the size said), and
:func:`load_official_map` checks a zip file's directory (the sizes it declares for its entries) before
``torch.load`` inflates anything, so a small deflated zip cannot declare gigabytes of tensor data.

Orientation (``layout``): the release does not say which of the last two dimensions is the image's rows. The
official code hands roi_align a ``(y1, x1, y2, x2)`` box as if it were ``(x1, y1, x2, y2)``, so:

- ``"hw"`` keeps the tensor's last two dims as (rows, cols). ``label_pooling(..., swap_xy=True)`` on the
  stored map then reproduces the official targets exactly.
- ``"wh"`` transposes them on import. ``label_pooling(..., swap_xy=False)`` (correct boxes) on the stored map
  then reproduces the official targets (for the release's square 15x15 maps, where both axes scale alike).
"""

from __future__ import annotations

import io
import posixpath
import warnings
import zipfile

import numpy as np

OFFICIAL_SHAPE = (2, 5, 15, 15)  # [values | indices, k, h, w]
NUM_CLASSES = 1000
LAYOUTS = ("hw", "wh")
# An official file is 9,353 (legacy) or 10,537 (zip) bytes; a bound well above both keeps torch.load from
# allocating whatever a hostile or broken file declares.
MAX_FILE_BYTES = 64 << 10
# The tensor data a [2, 5, 15, 15] float32 map needs: the most a zip file's data/ entries may declare.
MAX_TENSOR_BYTES = 2 * 5 * 15 * 15 * 4
MAP_EXT = ".pt"


class OfficialMapError(ValueError):
    """An official label-map file that cannot be used; the message is a short reason without the path."""


def map_relpath(image_relpath: str) -> str:
    """The label map's path relative to the release root for an image's path relative to the train folder.

    ``n04355338/n04355338_22023.JPEG`` -> ``n04355338/n04355338_22023.pt``.
    """
    return posixpath.splitext(image_relpath.replace("\\", "/"))[0] + MAP_EXT


def _short(e: BaseException) -> str:
    """The useful line of a ``torch.load`` error (its weights-only errors are paragraphs long)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        text = rest[0] if rest else text
    elif text.startswith("Weights only load failed"):
        # the reason is the paragraph between torch's advice and its pointer to the docs
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
        text = next((p for p in paragraphs[1:] if not p.startswith("Check the documentation")), paragraphs[0])
    else:
        text = " ".join(text.split())
    text = text.split(" Please use ", 1)[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_map_file(url: str, storage_options: dict | None = None) -> bytes:
    """The bytes of one official map file (local path or fsspec URL), refusing an oversized one unread.

    The size is checked before reading (``os.stat`` / fsspec ``size``), and the read stops after
    ``MAX_FILE_BYTES + 1`` bytes whatever the size said (a file that grew, or a store that lied).

    Raises:
        OfficialMapError: the file is larger than ``MAX_FILE_BYTES``; the message names it.
        OSError: the file cannot be read.
    """
    from relabel_shards.shards import url_to_fs

    fs, path = url_to_fs(url, storage_options)
    try:
        size = fs.size(path)
    except (OSError, NotImplementedError, ValueError):  # no size from this store: the bounded read decides
        size = None
    if size is not None and size > MAX_FILE_BYTES:
        raise OfficialMapError(_too_big(url, size))
    with fs.open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OfficialMapError(_too_big(url, None))
    return data


def _too_big(what: str | None, size: int | None) -> str:
    name = f"{what}: " if what else ""
    return (f"{name}file is {'more than ' + str(MAX_FILE_BYTES) if size is None else size} bytes, more than "
            f"the {MAX_FILE_BYTES} an official map can take (about 10 KB)")


def _check_zip_directory(data: bytes) -> None:
    """Refuse a zip (torch's serialization) whose directory declares more than a map needs, before
    ``torch.load`` allocates or inflates anything (a 1 MB deflated entry can declare 1 GiB)."""
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise OfficialMapError(f"not loadable with torch.load(weights_only=True) (bad zip: {e})") from None
    total = sum(i.file_size for i in infos)
    tensors = sum(i.file_size for i in infos if "/data/" in f"/{i.filename}")  # torch's "archive/data/0"
    if tensors > MAX_TENSOR_BYTES or total > MAX_FILE_BYTES:
        raise OfficialMapError(
            f"zip directory declares {tensors} bytes of tensor data and {total} bytes in all, more than a "
            f"{list(OFFICIAL_SHAPE)} float32 map needs ({MAX_TENSOR_BYTES} and {MAX_FILE_BYTES})"
        )


def load_official_map(data: bytes):
    """Load and check one official label-map file.

    Args:
        data: the file's bytes (legacy or zip ``torch.save`` serialization).

    Returns:
        Tensor[2, 5, 15, 15] float32 on the CPU: ``[0]`` logits, ``[1]`` class indices (integral floats in
        ``[0, 1000)``, distinct within each map cell).

    Raises:
        OfficialMapError: empty or oversized file, a zip whose directory declares more data than a map
            needs, not loadable with ``weights_only=True`` (including pickles of arbitrary objects), not a
            tensor, or a tensor of the wrong shape or dtype, with non-finite values, or with indices that
            are not integers in ``[0, 1000)`` or repeat within a cell.
    """
    if not data:
        raise OfficialMapError("empty file")
    if len(data) > MAX_FILE_BYTES:
        raise OfficialMapError(_too_big(None, len(data)))
    if data[:4] == b"PK\x03\x04":  # torch.load's own test for its zip serialization
        _check_zip_directory(data)
    import torch  # after the checks: a file refused above costs no torch

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says enough
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure on untrusted bytes is a bad file, with its reason
        raise OfficialMapError(f"not loadable with torch.load(weights_only=True) ({_short(e)})") from None
    if not isinstance(obj, torch.Tensor):
        raise OfficialMapError(f"holds a {type(obj).__name__}, expected a tensor {list(OFFICIAL_SHAPE)}")
    if tuple(obj.shape) != OFFICIAL_SHAPE:
        raise OfficialMapError(f"shape must be {list(OFFICIAL_SHAPE)}, got {list(obj.shape)}")
    if obj.dtype != torch.float32:
        raise OfficialMapError(f"dtype must be float32, got {str(obj.dtype).replace('torch.', '')}")
    check_official_map(obj.detach().numpy())
    return obj.detach()


def check_official_map(a: np.ndarray) -> None:
    """Check a ``[2, k, h, w]`` float32 map's contents: values finite, indices integral, in range, distinct.

    Raises:
        OfficialMapError: the first problem found, with counts.
    """
    values, indices = a[0], a[1]
    bad = ~np.isfinite(values)
    if bad.any():
        raise OfficialMapError(f"scores must be finite, got {int(bad.sum())} NaN/inf of {values.size}")
    bad = ~np.isfinite(indices)
    if bad.any():
        raise OfficialMapError(f"class indices must be finite, got {int(bad.sum())} NaN/inf of "
                               f"{indices.size}")
    frac = indices != np.floor(indices)
    if frac.any():
        raise OfficialMapError(f"class indices must be integers, got {int(frac.sum())} non-integral values "
                               f"(e.g. {float(indices[frac][0])!r})")
    lo, hi = float(indices.min()), float(indices.max())
    if lo < 0 or hi >= NUM_CLASSES:
        raise OfficialMapError(f"class indices must be in [0, {NUM_CLASSES}), got values in [{lo:g}, {hi:g}]")
    srt = np.sort(indices, axis=0)  # (k, h, w): a repeat shows as equal neighbours along k
    rep = (srt[1:] == srt[:-1]).any(axis=0)
    if rep.any():
        raise OfficialMapError(f"class indices must be distinct within a map cell (top-k), got repeats in "
                               f"{int(rep.sum())} cells")


def split_official_map(t, layout: str = "hw") -> tuple[np.ndarray, np.ndarray]:
    """The record's ``values`` and ``indices`` from a checked official map, in the chosen layout.

    Args:
        t: Tensor or ndarray [2, k, h, w] float32, as :func:`load_official_map` returns it.
        layout: ``"hw"`` (last two dims kept as rows, cols) or ``"wh"`` (transposed); see the module doc.

    Returns:
        (values np.ndarray [k, rows, cols] float32, indices np.ndarray [k, rows, cols] int16), C-contiguous.

    Raises:
        ValueError: an unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    a = np.asarray(t.numpy() if hasattr(t, "numpy") else t, dtype=np.float32)
    if layout == "wh":
        a = a.transpose(0, 1, 3, 2)  # (2, k, w, h) -> rows are the file's last dim
    values = np.ascontiguousarray(a[0])
    indices = np.ascontiguousarray(a[1]).astype(np.int16)  # exact: integral and < 1000, checked
    return values, indices

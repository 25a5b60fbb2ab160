"""Encoding: a label map [k, h, w] -> one record (docs/FORMAT.md), with every input check."""

from __future__ import annotations

import struct
import threading
import zlib
from typing import Any

import numpy as np

from relabel_shards.labelmap._codec import _neighbour_refs, _planes, _pred2d, _width_code, _zigzag
from relabel_shards.labelmap._header import (
    _WIDTH_CODES,
    BINDING,
    DEFAULT_LEVEL,
    ENCODINGS,
    FLAG_IMAGE,
    HEADER,
    MAGIC,
    MAX_ABS_Q,
    MAX_CLASSES,
    MAX_DIM,
    MAX_ELEMENTS,
    MAX_STEP,
    VERSION,
    ImageBinding,
    _ref_width,
    _sizes,
)

_local = threading.local()  # zstd contexts are not thread-safe: one per thread and level


TAR_BLOCK = 512
# The coarsest compact step the writers use to save a tar block (encode_label_map's tar_fit_step): on real
# 5x15x15 maps, label-shard samples cost 2,901 bytes instead of 3,013 and the pooled error stays at 1.5e-3,
# within the record's 2e-3 bound (0.025 exceeds it: 2.3e-3); benchmarks/bench_label_bytes.py.
TAR_FIT_STEP = 0.02


def _compressor(level: int):
    import zstandard

    cache = _local.__dict__.setdefault("c", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return cache[level]


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor [k, h, w], got {type(x).__name__}")
    return x


def encode_label_map(
    values: Any,
    indices: Any,
    num_classes: int,
    *,
    encoding: str = "compact",
    level: int = DEFAULT_LEVEL,
    step: float | None = None,
    image: ImageBinding | None = None,
    tar_fit_step: float | None = None,
) -> bytes:
    """Encode one label map as a record (docs/FORMAT.md).

    Args:
        values: [k, h, w] numpy array or torch tensor, any float dtype: raw logits, finite.
        indices: [k, h, w] numpy array or torch tensor, any integer dtype: class indices in [0, num_classes).
        num_classes: C, in [1, 2**31 - 1]; k must not exceed it.
        encoding: ``"compact"`` (quantized values, the default), ``"float16"`` or ``"lossless"`` (float32,
            bit-exact).
        level: zstandard level, in [1, 22].
        step: ``compact`` only: the quantization step in logits (default 0.01); every value is stored as
            the nearest multiple of it. Finite, in (0, 2**99].
        image: the image the map was made from (:meth:`ImageBinding.of`), stored in the record (format
            version 2). None writes a version-1 record without one, byte-identical to earlier writers.
        tar_fit_step: ``compact`` only: a coarser step, up to this, used where it makes the record take fewer
            512-byte tar blocks (a member is a 512-byte header plus its data padded to 512: a 2,100-byte
            record costs 3,072 bytes in a shard, a 2,048-byte one 2,560). The writers pass
            :data:`TAR_FIT_STEP`; the step stays in the header, so decoding does not change.

    Returns:
        The record's bytes.

    Raises:
        TypeError: values or indices of the wrong type or dtype.
        ValueError: shapes, ranges or options out of bounds (the message names the parameter and the range).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    value_codec, default_step = ENCODINGS[encoding]
    if tar_fit_step is not None:
        if value_codec != 3:
            raise ValueError(f"tar_fit_step applies to encoding='compact' only, got {encoding!r}")
        rec = encode_label_map(values, indices, num_classes, encoding=encoding, level=level, step=step,
                               image=image)
        coarse = float(tar_fit_step)
        blocks = -(-len(rec) // TAR_BLOCK)
        # a step twice as coarse saves ~7 % of a record (bench_label_bytes): try it only where the record
        # spills over a block boundary by less than that could save
        if coarse <= float(default_step if step is None else step) or len(rec) - (blocks - 1) * TAR_BLOCK > (
            len(rec) * 0.15
        ):
            return rec
        alt = encode_label_map(values, indices, num_classes, encoding=encoding, level=level, step=coarse,
                               image=image)
        return alt if -(-len(alt) // TAR_BLOCK) < blocks else rec
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
        raise ValueError(f"level must be an int in [1, 22], got {level!r}")
    if step is not None and value_codec != 3:
        raise ValueError(f"step applies to encoding='compact' only, got step={step!r} with {encoding!r}")
    step = float(default_step if step is None else step)
    if value_codec == 3 and not (np.isfinite(step) and step > 0 and 0 < np.float32(step) <= MAX_STEP):
        raise ValueError(f"step must be a finite float in (0, 2**99], got {step!r}")
    if image is not None and not isinstance(image, ImageBinding):
        raise TypeError(f"image must be an ImageBinding or None, got {type(image).__name__}")
    step = float(np.float32(step))  # the decoder sees the float32 in the header: quantize with that
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or not 1 <= num_classes <= MAX_CLASSES
    ):
        raise ValueError(f"num_classes must be an int in [1, {MAX_CLASSES}], got {num_classes!r}")
    num_classes = int(num_classes)
    v = _to_numpy(values, "values")
    ix = _to_numpy(indices, "indices")
    if v.ndim != 3 or ix.shape != v.shape:
        raise ValueError(
            f"values and indices must have the same shape [k, h, w], got {list(v.shape)} and {list(ix.shape)}"
        )
    k, h, w = (int(s) for s in v.shape)
    if not all(1 <= s <= MAX_DIM for s in (k, h, w)) or k * h * w > MAX_ELEMENTS:
        raise ValueError(
            f"k, h, w must each be in [1, {MAX_DIM}] with k*h*w <= {MAX_ELEMENTS}, got {[k, h, w]}"
        )
    if k > num_classes:
        raise ValueError(f"k must be in [1, num_classes={num_classes}], got {k}")
    if not np.issubdtype(v.dtype, np.floating):
        raise TypeError(f"values must have a floating dtype, got {v.dtype}")
    if not np.issubdtype(ix.dtype, np.integer):
        raise TypeError(f"indices must have an integer dtype, got {ix.dtype}")
    if not np.isfinite(v).all():
        raise ValueError(f"values must be finite, got {int((~np.isfinite(v)).sum())} NaN/inf entries")
    ix = ix.astype(np.int64, copy=False)
    lo, hi = int(ix.min()), int(ix.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"indices must be in [0, num_classes={num_classes}), got values in [{lo}, {hi}]")

    cw = 2 if num_classes <= 65536 else 4
    palette, pos = np.unique(ix, return_inverse=True)  # sorted classes present; positions into it
    m = int(palette.size)
    parts: list[bytes] = []
    if m <= MAX_DIM:
        index_codec = 2
        gaps = palette.copy()  # gaps between consecutive classes: P_0, then P_i - P_(i-1) - 1
        gaps[1:] -= palette[:-1] + 1
        parts.append(_planes(gaps, cw))
        parts.append(_planes(_neighbour_refs(pos.reshape(k, h, w)), _ref_width(k, m)))
    else:
        index_codec, m = 1, 0
        parts.append(_planes(ix, cw))

    flags = 0
    if value_codec == 1:
        parts.append(_planes(np.ascontiguousarray(v, dtype="<f4").view("<u4"), 4))
    elif value_codec == 2:
        with np.errstate(over="ignore"):
            v16 = v.astype("<f2")
        if not np.isfinite(v16).all():
            raise ValueError(
                f"values must be within the float16 range (|v| <= 65504) for encoding='float16', "
                f"got max |v| {float(np.abs(v).max())}; use encoding='lossless'"
            )
        parts.append(_planes(v16.view("<u2"), 2))
    else:
        scaled = v.astype(np.float64) / step
        if float(np.abs(scaled).max()) > MAX_ABS_Q:
            raise ValueError(
                f"values / step must be within +-{MAX_ABS_Q} for encoding='compact', got max |v| "
                f"{float(np.abs(v).max())} with step {step}; use a larger step or 'lossless'"
            )
        q = np.rint(scaled).astype(np.int64)  # (k, h, w)
        top = _zigzag(_pred2d(q[0]))  # (h, w)
        gaps = q[:-1] - q[1:]  # (k-1, h, w); >= 0 when values descend along k
        signed = bool(gaps.size) and int(gaps.min()) < 0
        if signed:
            gaps = _zigzag(gaps)
        tw = _width_code(int(top.max()))
        gw = _width_code(int(gaps.max()) if gaps.size else 0)
        flags = tw | gw << 2 | int(signed) << 4
        parts.append(_planes(top, _WIDTH_CODES[tw]))
        parts.append(_planes(gaps, _WIDTH_CODES[gw]))

    payload = b"".join(parts)
    assert len(payload) == _sizes(k, h, w, num_classes, value_codec, index_codec, m, flags)
    frame = _compressor(level).compress(payload)
    binding = b""
    if image is not None:
        flags |= FLAG_IMAGE
        binding = BINDING.pack(image.size, image.sha256, image.width, image.height)
    head = HEADER.pack(
        MAGIC,
        VERSION if image is not None else 1,
        value_codec,
        index_codec,
        flags,
        k,
        h,
        w,
        m,
        num_classes,
        step if value_codec == 3 else 0.0,
        len(payload),
        0,
    )
    crc = zlib.crc32(frame, zlib.crc32(binding, zlib.crc32(head[:28])))
    return head[:28] + struct.pack("<I", crc) + binding + frame

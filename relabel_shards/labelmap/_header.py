"""The record's header: constants, the types a caller sees, and the checks every reader runs first.

The 32-byte little-endian header (docs/FORMAT.md "Header") fixes k, h, w, C, the codecs and the
decompressed payload size, so a reader checks every size here before it allocates anything
(:func:`_parse_header`, :func:`_sizes`). :class:`LabelMapError` is the one error type of a bad record.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"\x89RLM"
VERSION = 1
HEADER = struct.Struct("<4sBBBBHHHHIfII")  # 32 bytes; docs/FORMAT.md "Header"
HEADER_SIZE = HEADER.size
MAX_CLASSES = 2**31 - 1
MAX_DIM = 65535
MAX_ELEMENTS = 1 << 24  # k*h*w; bounds the decompressed size (<= 112 MiB) before anything is allocated
MAX_ABS_Q = 1 << 28  # |value / step| bound of the quantized codec, so residuals fit 4 bytes

VALUE_CODECS = {1: "float32", 2: "float16", 3: "quantized"}
INDEX_CODECS = {1: "raw", 2: "palette"}
# encoding name -> (value codec, default quantization step); the index codec is chosen per record.
ENCODINGS: dict[str, tuple[int, float]] = {"compact": (3, 0.01), "float16": (2, 0.0), "lossless": (1, 0.0)}
# zstd level of every encoding by default (benchmarks/bench_labelmap.py): on 5x15x15 maps level 12 is within
# 0.5 % of level 19's size at about a sixth of its compression time, and 0.6 % smaller than level 6.
DEFAULT_LEVEL = 12
_WIDTH_CODES = {0: 1, 1: 2, 2: 4}


class LabelMapError(ValueError):
    """A record that is truncated, corrupt, oversized, of an unknown version or otherwise invalid."""


@dataclass(frozen=True)
class LabelMap:
    """One decoded label map.

    Attributes:
        values: np.ndarray [k, h, w] float32 (``compact``, ``lossless``) or float16 (``float16``): raw logits;
            ``values[:, r, q]`` is the cell at row r (top to bottom) and column q (left to right).
        indices: np.ndarray [k, h, w] int16 when ``num_classes <= 32767``, else int32: class indices.
        num_classes: C, the classifier's class count; every index is in [0, C).
    """

    values: np.ndarray
    indices: np.ndarray
    num_classes: int

    @property
    def k(self) -> int:
        return int(self.values.shape[0])

    @property
    def height(self) -> int:
        return int(self.values.shape[1])

    @property
    def width(self) -> int:
        return int(self.values.shape[2])


@dataclass(frozen=True)
class LabelMapHeader:
    """What a record's header says (:func:`read_header`), before its payload is touched."""

    version: int
    value_codec: str
    index_codec: str
    k: int
    height: int
    width: int
    num_classes: int
    palette_size: int
    step: float
    payload_size: int
    flags: int


def _ref_width(k: int, m: int) -> int:
    """Bytes per reference symbol of the palette codec: symbols are < k + m."""
    return 1 if k + m <= 1 << 8 else 2 if k + m <= 1 << 16 else 4


def _sizes(
    k: int, h: int, w: int, num_classes: int, value_codec: int, index_codec: int, m: int, flags: int
) -> int:
    """Decompressed payload size in bytes implied by the header fields (docs/FORMAT.md "Payload")."""
    n = k * h * w
    cw = 2 if num_classes <= 65536 else 4
    size = n * cw if index_codec == 1 else m * cw + n * _ref_width(k, m)
    if value_codec == 1:
        size += 4 * n
    elif value_codec == 2:
        size += 2 * n
    else:
        size += h * w * _WIDTH_CODES[flags & 3] + (k - 1) * h * w * _WIDTH_CODES[(flags >> 2) & 3]
    return size


def _bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat, contiguous byte view of ``data`` (strided or typed memoryviews are copied)."""
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    return memoryview(view.tobytes())


def _parse_header(buf: memoryview) -> tuple[int, int, int, int, int, int, int, int, float, int]:
    """Check a header (docs/FORMAT.md "Reading a record", steps 1-2): (vc, ic, flags, k, h, w, m, C, step,
    payload_size), codecs as their numbers."""
    if len(buf) < HEADER_SIZE:
        raise LabelMapError(
            f"bad label-map record: truncated, {len(buf)} bytes, the header alone needs {HEADER_SIZE}"
        )
    magic, version, vc, ic, flags, k, h, w, m, num_classes, step, size, _crc = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise LabelMapError(f"bad label-map record: wrong magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise LabelMapError(
            f"bad label-map record: unknown format version {version} (this reader knows "
            f"{VERSION}); upgrade relabel-shards"
        )
    if vc not in VALUE_CODECS or ic not in INDEX_CODECS:
        raise LabelMapError(f"bad label-map record: unknown value codec {vc} or index codec {ic}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise LabelMapError(f"bad label-map record: num_classes {num_classes} outside [1, {MAX_CLASSES}]")
    if min(k, h, w) < 1 or k * h * w > MAX_ELEMENTS or k > num_classes:
        raise LabelMapError(
            f"bad label-map record: k, h, w = {k}, {h}, {w} out of range (each >= 1, "
            f"k*h*w <= {MAX_ELEMENTS}, k <= num_classes={num_classes})"
        )
    if ic == 1 and m != 0 or ic == 2 and not 1 <= m <= min(k * h * w, num_classes):
        raise LabelMapError(
            f"bad label-map record: palette size {m} invalid for the {INDEX_CODECS[ic]} index "
            f"codec with k*h*w={k * h * w}, num_classes={num_classes}"
        )
    if vc == 3:
        if flags >> 5 or (flags & 3) == 3 or (flags >> 2 & 3) == 3:
            raise LabelMapError(f"bad label-map record: invalid flags 0x{flags:02x}")
        if not (math.isfinite(step) and step > 0):
            raise LabelMapError(f"bad label-map record: quantization step {step} is not finite and > 0")
    elif flags or step != 0.0:
        raise LabelMapError(
            f"bad label-map record: flags 0x{flags:02x} and step {step} must be 0 for the "
            f"{VALUE_CODECS[vc]} value codec"
        )
    expect = _sizes(k, h, w, num_classes, vc, ic, m, flags)
    if size != expect:
        raise LabelMapError(
            f"bad label-map record: header says the payload is {size} bytes, its fields imply {expect}"
        )
    return vc, ic, flags, k, h, w, m, num_classes, step, size


def read_header(data: bytes | bytearray | memoryview) -> LabelMapHeader:
    """Parse and check a record's 32-byte header (sizes and fields only; no CRC, no payload).

    Raises:
        LabelMapError: truncated, wrong magic, unknown version or codec, fields out of range.
    """
    vc, ic, flags, k, h, w, m, num_classes, step, size = _parse_header(_bytes_view(data))
    return LabelMapHeader(
        VERSION, VALUE_CODECS[vc], INDEX_CODECS[ic], k, h, w, num_classes, m, float(step), size, flags
    )

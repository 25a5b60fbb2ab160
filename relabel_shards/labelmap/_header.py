"""The record's header: constants, the types a caller sees, and the checks every reader runs first.

The 32-byte little-endian header (docs/FORMAT.md "Header") fixes k, h, w, C, the codecs and the
decompressed payload size, so a reader checks every size here before it allocates anything
(:func:`_parse_header`, :func:`_sizes`). A version-2 record may carry an image binding
(:class:`ImageBinding`, 48 bytes right after the header). :class:`LabelMapError` is the one error type of
a bad record.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"\x89RLM"
# The newest format version, written when a record carries an image binding. Version 1 (no binding) is
# still written without one, byte for byte as before, and both are read.
VERSION = 2
VERSIONS = (1, 2)
HEADER = struct.Struct("<4sBBBBHHHHIfII")  # 32 bytes; docs/FORMAT.md "Header"
HEADER_SIZE = HEADER.size
FLAG_IMAGE = 0x80  # version 2, flags bit 7: an image-binding block follows the header
# 48 bytes after the header: image size, sha256, width, height; docs/FORMAT.md "Image binding"
BINDING = struct.Struct("<Q32sII")
BINDING_SIZE = BINDING.size
MAX_CLASSES = 2**31 - 1
MAX_DIM = 65535
# k*h*w. Bounds the decompressed size before anything is allocated: at most 8 * 2**24 + 4 * 65535 bytes
# (134,479,868, 128.3 MiB: raw or palette indices of 4 bytes, with a 4-byte palette, plus float32 values).
MAX_ELEMENTS = 1 << 24
MAX_ABS_Q = 1 << 28  # |value / step| bound of the quantized codec, so residuals fit 4 bytes
# Largest quantization step: |q| <= 2**28 times it stays <= 2**127, so every decoded float32 is finite.
MAX_STEP = 2.0**99

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
class ImageBinding:
    """Ties a record to the exact image it was made from (docs/FORMAT.md "Image binding").

    Attributes:
        size: byte length of the image file as stored in the shard, in [1, 2**63 - 1].
        sha256: the 32-byte sha256 digest of those bytes.
        width: upright (EXIF orientation applied) width in pixels of the image that was annotated, in
            [1, 2**32 - 1].
        height: upright height in pixels, in [1, 2**32 - 1].
    """

    size: int
    sha256: bytes
    width: int
    height: int

    def __post_init__(self) -> None:
        for name, hi in (("size", 2**63 - 1), ("width", 2**32 - 1), ("height", 2**32 - 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not hasattr(v, "__index__") or not 1 <= int(v) <= hi:
                raise ValueError(f"ImageBinding.{name} must be an int in [1, {hi}], got {v!r}")
            object.__setattr__(self, name, int(v))
        digest = self.sha256
        if not isinstance(digest, (bytes, bytearray, memoryview)) or len(bytes(digest)) != 32:
            raise ValueError(f"ImageBinding.sha256 must be 32 bytes (a sha256 digest), got {digest!r}")
        object.__setattr__(self, "sha256", bytes(digest))

    def __repr__(self) -> str:
        digest = f"bytes.fromhex({self.sha256.hex()!r})"
        return f"ImageBinding(size={self.size}, sha256={digest}, width={self.width}, height={self.height})"

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview, width: int, height: int) -> ImageBinding:
        """The binding of the image file ``data`` (its bytes as stored), annotated at ``width x height`` px
        (upright)."""
        return cls(len(memoryview(data).cast("B")), hashlib.sha256(data).digest(), width, height)


@dataclass(frozen=True)
class LabelMap:
    """One decoded label map.

    Attributes:
        values: np.ndarray [k, h, w] float32 (``compact``, ``lossless``) or float16 (``float16``): raw logits;
            ``values[:, r, q]`` is the cell at row r (top to bottom) and column q (left to right).
        indices: np.ndarray [k, h, w] int16 when ``num_classes <= 32767``, else int32: class indices.
        num_classes: C, the classifier's class count; every index is in [0, C).
        image: the image the record was made from (:class:`ImageBinding`), or None for a record without
            one (format version 1).
    """

    values: np.ndarray
    indices: np.ndarray
    num_classes: int
    image: ImageBinding | None = None

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
    """What a record's header says (:func:`read_header`), before its payload is touched.

    ``flags`` is the header's flags byte as stored (bit 7 set when the record carries an image binding);
    ``image`` the binding, or None.
    """

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
    image: ImageBinding | None = None


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


def _parse_header(
    buf: memoryview,
) -> tuple[int, int, int, int, int, int, int, int, float, int, ImageBinding | None, int]:
    """Check a header and its image binding (docs/FORMAT.md "Reading a record", steps 1-2).

    Returns:
        (vc, ic, flags, k, h, w, m, C, step, payload_size, image, frame_start): codecs as their numbers,
        ``flags`` the byte as stored, ``image`` the binding or None, ``frame_start`` the offset of the zstd
        frame (32, or 80 after a binding).
    """
    if len(buf) < HEADER_SIZE:
        raise LabelMapError(
            f"bad label-map record: truncated, {len(buf)} bytes, the header alone needs {HEADER_SIZE}"
        )
    magic, version, vc, ic, flags, k, h, w, m, num_classes, step, size, _crc = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise LabelMapError(f"bad label-map record: wrong magic {magic!r}, expected {MAGIC!r}")
    if version not in VERSIONS:
        raise LabelMapError(
            f"bad label-map record: unknown format version {version} (this reader knows "
            f"{', '.join(map(str, VERSIONS))}); upgrade relabel-shards"
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
    codec_flags = flags & ~FLAG_IMAGE if version >= 2 else flags  # bit 7 is the record's own from version 2
    if vc == 3:
        if codec_flags >> 5 or (flags & 3) == 3 or (flags >> 2 & 3) == 3:
            raise LabelMapError(f"bad label-map record: invalid flags 0x{flags:02x}")
        if not (math.isfinite(step) and 0.0 < step <= MAX_STEP):
            raise LabelMapError(
                f"bad label-map record: quantization step {step} is not finite and in (0, 2**99] "
                "(larger steps could decode to infinite values)"
            )
    elif codec_flags or step != 0.0 or math.copysign(1.0, step) < 0:  # -0.0 too: all four bytes zero
        raise LabelMapError(
            f"bad label-map record: flags 0x{codec_flags:02x} and step {step} must be 0 (step +0.0) for the "
            f"{VALUE_CODECS[vc]} value codec"
        )
    expect = _sizes(k, h, w, num_classes, vc, ic, m, flags)
    if size != expect:
        raise LabelMapError(
            f"bad label-map record: header says the payload is {size} bytes, its fields imply {expect}"
        )
    image, start = None, HEADER_SIZE
    if flags & FLAG_IMAGE and version >= 2:
        start += BINDING_SIZE
        if len(buf) < start:
            raise LabelMapError(
                f"bad label-map record: truncated, {len(buf)} bytes, the header and its image binding "
                f"need {start}"
            )
        isize, digest, iw, ih = BINDING.unpack_from(buf, HEADER_SIZE)
        if not (1 <= isize < 2**63 and iw >= 1 and ih >= 1):
            raise LabelMapError(
                f"bad label-map record: image binding of {isize} bytes at {iw}x{ih} px is invalid (size in "
                "[1, 2**63 - 1], width and height >= 1)"
            )
        image = ImageBinding(isize, digest, iw, ih)
    return vc, ic, flags, k, h, w, m, num_classes, step, size, image, start


def read_header(data: bytes | bytearray | memoryview) -> LabelMapHeader:
    """Parse and check a record's 32-byte header and its image binding (sizes and fields only; no CRC, no
    payload, nothing decompressed).

    Raises:
        LabelMapError: truncated, wrong magic, unknown version or codec, fields out of range.
    """
    buf = _bytes_view(data)
    vc, ic, flags, k, h, w, m, num_classes, step, size, image, _start = _parse_header(buf)
    return LabelMapHeader(
        buf[4], VALUE_CODECS[vc], INDEX_CODECS[ic], k, h, w, num_classes, m, float(step), size, flags, image
    )

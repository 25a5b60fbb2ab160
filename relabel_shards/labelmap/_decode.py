"""Decoding: one record -> :class:`LabelMap`, checking every byte docs/FORMAT.md constrains."""

from __future__ import annotations

import struct
import threading
import zlib
from typing import Any

import numpy as np
import zstandard  # at import, so forked DataLoader workers inherit it instead of importing it each epoch

from relabel_shards.labelmap._codec import _decode_indices, _decode_quantized, _unplanes
from relabel_shards.labelmap._header import LabelMap, LabelMapError, _bytes_view, _parse_header

_local = threading.local()  # zstd contexts are not thread-safe: one per thread


def _decompressor():
    d = _local.__dict__.get("d")
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


_FLOAT = {1: np.dtype("<f4"), 2: np.dtype("<f2")}  # value codec -> stored float type
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_frame_end(buf: memoryview, start: int) -> int:
    """Offset just past the zstd frame at ``start`` (RFC 8878 section 3.1.1), walking its block headers."""
    end = len(buf)
    if end - start < 6 or bytes(buf[start : start + 4]) != _ZSTD_MAGIC:
        raise LabelMapError("bad label-map record: the payload is not a zstd frame")
    fhd = buf[start + 4]
    if fhd & 0x08 or fhd & 0x03:
        raise LabelMapError(
            f"bad label-map record: zstd frame descriptor 0x{fhd:02x} (reserved bit or dictionary)"
        )
    fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
    pos = start + 5 + (0 if single else 1) + (1 if single and fcs_flag == 0 else (0, 2, 4, 8)[fcs_flag])
    while True:
        if pos + 3 > end:
            raise LabelMapError("bad label-map record: truncated zstd frame")
        bh = int.from_bytes(buf[pos : pos + 3], "little")
        btype, bsize = (bh >> 1) & 3, bh >> 3
        if btype == 3:
            raise LabelMapError("bad label-map record: reserved zstd block type")
        pos += 3 + (1 if btype == 1 else bsize)
        if bh & 1:
            break
    return pos + (4 if fhd & 0x04 else 0)


def _expected_geometry(expect: Any) -> tuple[int, int, int, int]:
    """``expect`` as (k, h, w, C): a 4-tuple, or an object with ``k``, ``height``, ``width``, ``num_classes``
    (a :class:`LabelMapHeader` or :class:`LabelMap`)."""
    if all(hasattr(expect, a) for a in ("k", "height", "width", "num_classes")):
        geometry = (expect.k, expect.height, expect.width, expect.num_classes)
    else:
        try:
            geometry = tuple(expect)
        except TypeError:
            geometry = ()
    if len(geometry) != 4 or not all(hasattr(g, "__index__") and not isinstance(g, bool) for g in geometry):
        raise TypeError(
            "expect must be (k, h, w, num_classes) ints or a LabelMapHeader-like object with k, height, "
            f"width and num_classes, got {expect!r}"
        )
    return tuple(int(g) for g in geometry)  # type: ignore[return-value]


def decode_label_map(
    data: bytes | bytearray | memoryview, *, expect: Any = None, max_elements: int | None = None
) -> LabelMap:
    """Decode a record made by :func:`encode_label_map`.

    About 50 us for a real 5x15x15 ``compact`` record on the 2-core test machine, every check of
    docs/FORMAT.md included; half the time of the decoder before it (``benchmarks/bench_labelmap.py``).

    A reader that knows what its records must look like (a dataset's k, h, w and C, from ``_info.json``)
    passes ``expect`` or ``max_elements``: a record that disagrees is then rejected from its header, before
    anything is decompressed or allocated, so a small hostile record that declares a huge map costs
    microseconds, not the hundreds of MB and seconds of decoding it first.

    Args:
        data: the record's bytes (a whole ``.rlm`` member).
        expect: None, or the geometry every record must have: ``(k, h, w, num_classes)``, or an object with
            attributes ``k``, ``height``, ``width``, ``num_classes`` (a :class:`LabelMapHeader`).
        max_elements: None, or the largest ``k * h * w`` accepted (at most ``MAX_ELEMENTS``, the format's
            own bound, which always applies).

    Returns:
        :class:`LabelMap` with ``values`` [k, h, w] (float32; float16 for the float16 encoding),
        ``indices`` [k, h, w] (int16 when num_classes <= 32767, else int32), both fresh writable arrays, and
        ``image``, the record's :class:`ImageBinding` or None.

    Raises:
        LabelMapError: anything wrong with the record, including a geometry other than ``expect`` or more
            than ``max_elements`` elements; the message says what.
        TypeError, ValueError: ``expect`` or ``max_elements`` malformed.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LabelMapError(f"bad label-map record: expected bytes, got {type(data).__name__}")
    geometry = None if expect is None else _expected_geometry(expect)
    if max_elements is not None and (
        isinstance(max_elements, bool) or not hasattr(max_elements, "__index__") or max_elements < 1
    ):
        raise ValueError(f"max_elements must be None or an int >= 1, got {max_elements!r}")
    buf = _bytes_view(data)
    vc, ic, flags, k, h, w, m, c, step, size, image, start = _parse_header(buf)
    crc = struct.unpack_from("<I", buf, 28)[0]
    if zlib.crc32(buf[32:], zlib.crc32(buf[:28])) != crc:
        raise LabelMapError(f"bad label-map record: CRC-32 mismatch ({len(buf)} bytes; corrupt or truncated)")
    # The header is intact (CRC): judge its geometry before decompressing anything.
    if geometry is not None and (k, h, w, c) != geometry:
        raise LabelMapError(
            f"bad label-map record: its geometry k, h, w, num_classes = {k}, {h}, {w}, {c} differs from the "
            f"expected {', '.join(map(str, geometry))}"
        )
    if max_elements is not None and k * h * w > max_elements:
        raise LabelMapError(
            f"bad label-map record: k*h*w = {k}*{h}*{w} = {k * h * w} elements exceeds max_elements="
            f"{int(max_elements)}"
        )
    end = _zstd_frame_end(buf, start)
    if end != len(buf):
        raise LabelMapError(f"bad label-map record: the zstd frame ends at byte {end} of {len(buf)}")
    frame = buf[start:]
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise LabelMapError(f"bad label-map record: unreadable zstd frame header ({e})") from None
    if declared != size:
        raise LabelMapError(
            f"bad label-map record: the zstd frame declares {declared} bytes, the header {size}"
        )
    try:  # the content size is declared and checked: one call, output bounded by the header's size
        payload = _decompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as e:
        raise LabelMapError(f"bad label-map record: corrupt zstd payload ({e})") from None
    if len(payload) != size:
        raise LabelMapError(f"bad label-map record: payload is {len(payload)} bytes, the header says {size}")
    p = np.frombuffer(payload, np.uint8)  # read-only; every array returned is a fresh copy
    n = k * h * w
    indices, off = _decode_indices(p, ic, k, h, w, m, c)
    if vc == 3:
        values = _decode_quantized(p, off, k, h, w, flags, step)
    else:
        values = _unplanes(p, off, n, 4 if vc == 1 else 2).view(_FLOAT[vc]).reshape(k, h, w)
        if not np.isfinite(values).all():
            raise LabelMapError("bad label-map record: NaN or infinite values")
    return LabelMap(values=values, indices=indices, num_classes=c, image=image)

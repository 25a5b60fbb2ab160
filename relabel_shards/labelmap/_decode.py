"""Decoding: one record -> :class:`LabelMap`, checking every byte docs/FORMAT.md constrains."""

from __future__ import annotations

import struct
import threading
import zlib

import numpy as np
import zstandard  # at import, so forked DataLoader workers inherit it instead of importing it each epoch

from relabel_shards.labelmap._codec import _decode_indices, _decode_quantized, _unplanes
from relabel_shards.labelmap._header import HEADER_SIZE, LabelMap, LabelMapError, _bytes_view, _parse_header

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


def decode_label_map(data: bytes | bytearray | memoryview) -> LabelMap:
    """Decode a record made by :func:`encode_label_map`.

    About 50 us for a real 5x15x15 ``compact`` record on the 2-core test machine, every check of
    docs/FORMAT.md included; half the time of the decoder before it (``benchmarks/bench_labelmap.py``).

    Args:
        data: the record's bytes (a whole ``.rlm`` member).

    Returns:
        :class:`LabelMap` with ``values`` [k, h, w] (float32; float16 for the float16 encoding) and
        ``indices`` [k, h, w] (int16 when num_classes <= 32767, else int32), both fresh writable arrays.

    Raises:
        LabelMapError: anything wrong with the record; the message says what.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LabelMapError(f"bad label-map record: expected bytes, got {type(data).__name__}")
    buf = _bytes_view(data)
    vc, ic, flags, k, h, w, m, c, step, size = _parse_header(buf)
    crc = struct.unpack_from("<I", buf, 28)[0]
    frame = buf[HEADER_SIZE:]
    if zlib.crc32(frame, zlib.crc32(buf[:28])) != crc:
        raise LabelMapError(f"bad label-map record: CRC-32 mismatch ({len(buf)} bytes; corrupt or truncated)")
    end = _zstd_frame_end(buf, HEADER_SIZE)
    if end != len(buf):
        raise LabelMapError(f"bad label-map record: the zstd frame ends at byte {end} of {len(buf)}")
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
    return LabelMap(values=values, indices=indices, num_classes=c)

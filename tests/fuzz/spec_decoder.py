"""A second decoder of the label-map record, written from docs/FORMAT.md alone, as literally as it reads.

It is the oracle of the differential tests and the fuzz target (tests/fuzz/fuzz_decoder.py): slow (Python
loops over cells), obvious, and independent of ``relabel_shards.labelmap`` except for the zstd library
(RFC 8878 is not re-implemented here). Each step names the section of FORMAT.md it follows.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard


class SpecError(ValueError):
    """The record breaks a rule of docs/FORMAT.md."""


@dataclass(frozen=True)
class SpecRecord:
    values: np.ndarray  # [k, h, w] float32 (float16 for value codec 2)
    indices: np.ndarray  # [k, h, w] int16 if num_classes <= 32767, else int32
    num_classes: int
    image: tuple[int, bytes, int, int] | None  # (image_size, sha256, width, height) or None


def planes_le(a, width: int) -> bytes:
    """FORMAT.md "Byte planes", written out: byte b of element i at offset b * n + i."""
    a = np.asarray(a, dtype=np.int64).reshape(-1)
    return b"".join(bytes(((a >> (8 * b)) & 255).astype(np.uint8)) for b in range(width))


def unplanes_le(buf: bytes, n: int, width: int) -> list[int]:
    """The inverse: n unsigned ints from ``width`` byte planes."""
    if len(buf) != n * width:
        raise SpecError("section size")
    return [sum(buf[b * n + i] << (8 * b) for b in range(width)) for i in range(n)]


def unzigzag(z: int) -> int:
    return z >> 1 if z % 2 == 0 else -((z + 1) >> 1)


def resolve_palette_refs(sym, palette, k: int, h: int, w: int, m: int) -> np.ndarray:
    """FORMAT.md "Index section", palette codec: symbols [k, h, w] -> classes, cell by cell, raster order."""
    pos = np.empty((k, h, w), np.int64)
    for r in range(h):
        for c in range(w):
            prev = (r, c - 1) if c > 0 else (r - 1, 0)
            for j in range(k):
                s = int(sym[j][r][c])
                if s < k:
                    if (r, c) == (0, 0):
                        raise SpecError("cell (0, 0) refers to a previous cell")
                    pos[j, r, c] = pos[s, prev[0], prev[1]]
                else:
                    if s - k >= m:
                        raise SpecError("palette position >= m")
                    pos[j, r, c] = s - k
    return np.asarray(palette, np.int64)[pos]


def quantized_values(top_res, gaps, step: float):
    """FORMAT.md "Value section", quantized: q from top residuals [h][w] and gaps [k-1][h][w]; float32."""
    q0 = np.cumsum(np.cumsum(np.asarray(top_res, np.int64), axis=0), axis=1)
    q = [q0]
    for g in gaps:
        q.append(q[-1] - np.asarray(g, np.int64))
    q = np.stack(q)
    return q, (q.astype(np.float64) * np.float64(np.float32(step))).astype(np.float32)


def _frame_end(rec: bytes, start: int) -> int:
    """FORMAT.md "zstd frame": RFC 8878 3.1.1, the frame and block headers walked to the frame's end."""
    if rec[start : start + 4] != b"\x28\xb5\x2f\xfd":
        raise SpecError("zstd magic")
    pos = start + 4
    if pos >= len(rec):
        raise SpecError("truncated frame header")
    fhd = rec[pos]
    fcs_flag, single, checksum = fhd >> 6, fhd >> 5 & 1, fhd >> 2 & 1
    reserved, dict_flag = fhd >> 3 & 1, fhd & 3
    if reserved or dict_flag:
        raise SpecError("reserved bit or dictionary")
    pos += 1 + (0 if single else 1) + [1 if single else 0, 2, 4, 8][fcs_flag]
    while True:
        if pos + 3 > len(rec):
            raise SpecError("truncated block header")
        bh = int.from_bytes(rec[pos : pos + 3], "little")
        last, btype, bsize = bh & 1, bh >> 1 & 3, bh >> 3
        if btype == 3:
            raise SpecError("reserved block type")
        pos += 3 + (1 if btype == 1 else bsize)
        if last:
            return pos + (4 if checksum else 0)


def spec_decode(data: bytes) -> SpecRecord:
    """Decode one record following docs/FORMAT.md "Reading a record: the checks, in order".

    Raises:
        SpecError: the record breaks a rule (which one is not meant to match the reference's message).
    """
    rec = bytes(data)
    # 1. header: at least 32 bytes, magic, version, codecs
    if len(rec) < 32:
        raise SpecError("shorter than the header")
    magic, version, vc, ic, flags, k, h, w, m, C, step, payload_size, crc = struct.unpack(
        "<4sBBBBHHHHIfII", rec[:32]
    )
    if magic != b"\x89RLM" or version not in (1, 2) or vc not in (1, 2, 3) or ic not in (1, 2):
        raise SpecError("magic, version or codec")
    # 2. fields
    N = k * h * w
    if not (1 <= C <= 2**31 - 1 and min(k, h, w) >= 1 and N <= 2**24 and k <= C):
        raise SpecError("k, h, w, C")
    if not (ic == 1 and m == 0 or ic == 2 and 1 <= m <= min(N, C)):
        raise SpecError("m")
    has_image = version == 2 and bool(flags & 0x80)
    if flags & 0x60 or (version == 1 and flags & 0x80):  # bits 5-6 zero; bit 7 only in version 2
        raise SpecError("flags")
    if vc == 3:
        tw_code, gw_code = flags & 3, flags >> 2 & 3
        if tw_code == 3 or gw_code == 3:
            raise SpecError("width code 3")
        if not (math.isfinite(step) and 0 < step <= 2.0**99):
            raise SpecError("step")
    else:
        if flags & 0x1F or rec[20:24] != b"\0\0\0\0":
            raise SpecError("flags or step of an unquantized codec")
    CW = 2 if C <= 65536 else 4
    RW = 1 if k + m <= 256 else 2 if k + m <= 65536 else 4
    width = {0: 1, 1: 2, 2: 4}
    index_size = N * CW if ic == 1 else m * CW + N * RW
    if vc == 1:
        value_size = 4 * N
    elif vc == 2:
        value_size = 2 * N
    else:
        value_size = h * w * width[flags & 3] + (k - 1) * h * w * width[flags >> 2 & 3]
    if payload_size != index_size + value_size:
        raise SpecError("payload_size")
    frame_start = 32
    image = None
    if has_image:  # "Image binding"
        if len(rec) < 80:
            raise SpecError("truncated image binding")
        isize, digest, iw, ih = struct.unpack("<Q32sII", rec[32:80])
        if not (1 <= isize <= 2**63 - 1 and iw >= 1 and ih >= 1):
            raise SpecError("image binding fields")
        image, frame_start = (isize, digest, iw, ih), 80
    # 3. CRC-32 over bytes 0-27 and 32-end
    if zlib.crc32(rec[:28] + rec[32:]) != crc:
        raise SpecError("crc")
    # 4. one zstd frame to the end, declared content size == payload_size, decompresses to exactly that
    if _frame_end(rec, frame_start) != len(rec):
        raise SpecError("frame end")
    frame = rec[frame_start:]
    try:
        if zstandard.get_frame_parameters(frame).content_size != payload_size:
            raise SpecError("declared content size")
        payload = zstandard.ZstdDecompressor().decompress(frame, max_output_size=payload_size)
    except zstandard.ZstdError as e:
        raise SpecError(f"zstd: {e}") from None
    if len(payload) != payload_size:
        raise SpecError("payload length")
    # 5. content
    if ic == 1:
        flat = unplanes_le(payload[: N * CW], N, CW)
        if max(flat) >= C:
            raise SpecError("raw index >= C")
        classes = np.asarray(flat, np.int64).reshape(k, h, w)
        off = N * CW
    else:
        gaps = unplanes_le(payload[: m * CW], m, CW)
        palette = [sum(gaps[: i + 1]) + i for i in range(m)]
        if palette[-1] >= C:
            raise SpecError("palette class >= C")
        sym = np.asarray(unplanes_le(payload[m * CW : m * CW + N * RW], N, RW), np.int64).reshape(k, h, w)
        classes = resolve_palette_refs(sym.tolist(), palette, k, h, w, m)
        off = m * CW + N * RW
    body = payload[off:]
    if vc in (1, 2):
        nbytes = 4 if vc == 1 else 2
        bits = np.asarray(unplanes_le(body, N, nbytes), np.uint32 if vc == 1 else np.uint16)
        values = bits.view(np.float32 if vc == 1 else np.float16).reshape(k, h, w)
        if not np.isfinite(values).all():
            raise SpecError("non-finite value")
    else:
        TW, GW = width[flags & 3], width[flags >> 2 & 3]
        z = unplanes_le(body[: h * w * TW], h * w, TW)
        R = [unzigzag(v) for v in z]
        g = unplanes_le(body[h * w * TW :], (k - 1) * h * w, GW)
        G = [unzigzag(v) for v in g] if flags >> 4 & 1 else g
        if any(abs(r) > 2**30 for r in R) or any(abs(x) > 2**29 for x in G):
            raise SpecError("residual bounds")
        top = np.asarray(R, np.int64).reshape(h, w)
        gap = np.asarray(G, np.int64).reshape(k - 1, h, w)
        q, values = quantized_values(top, gap, step)
        if np.abs(q).max() > 2**28:
            raise SpecError("|q| > 2^28")
    indices = classes.astype(np.int16 if C <= 32767 else np.int32)
    return SpecRecord(np.ascontiguousarray(values), indices, C, image)

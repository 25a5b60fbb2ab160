"""The label-map record: encode, decode and validate one image's top-k label map; the only code that knows
the byte layout.

A record holds ``values[k, h, w]`` (raw logits) and ``indices[k, h, w]`` (class indices) of one image and
``num_classes``. It is a 32-byte little-endian header (magic, version, codecs, k, h, w, palette size,
num_classes, quantization step, payload size, CRC-32) followed by one zstandard frame. ``docs/FORMAT.md``
specifies every byte. Encodings (a closed table, :data:`ENCODINGS`):

- ``"compact"`` (default): a palette of the classes present, each element a reference to the previous
  cell's ranks or a palette position; values quantized to a fixed step (0.01 logit) and coded as a 2-D
  prediction residual of the top-1 plane plus the gaps down the ranks. 2,204 bytes per 5x15x15 record on
  real maps (the official ``torch.save`` file: 9,353), pooled targets within 9.9e-4 of the float32 map's
  (``benchmarks/bench_labelmap.py``).
- ``"float16"``: the same indices plus float16 values (2,908 bytes, pooled error 7.4e-4).
- ``"lossless"``: the same indices plus float32 values, bit-exact (4,719 bytes).

Decoding checks every size before it allocates (the decompressed size is fixed by the header and must match
the zstd frame's declared content size), verifies the CRC-32, and never unpickles. Every bad record raises
:class:`LabelMapError`, whose message says what is wrong and reads well after a "shard X key Y: " prefix.
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any

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


# ------------------------------------------------------------------------------------------ helpers

_local = threading.local()  # zstd contexts are not thread-safe: one per thread and level


def _compressor(level: int):
    import zstandard

    cache = _local.__dict__.setdefault("c", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return cache[level]


def _decompressor():
    d = _local.__dict__.get("d")
    if d is None:
        import zstandard

        d = _local.d = zstandard.ZstdDecompressor()
    return d


def _planes(a: np.ndarray, width: int) -> bytes:
    """Unsigned ints as ``width``-byte little-endian byte planes: byte b of element i at offset b*n + i."""
    le = np.ascontiguousarray(a.reshape(-1), dtype=f"<u{width}")
    return le.view(np.uint8).reshape(-1, width).T.tobytes()


_UINT = {1: np.dtype(np.uint8), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
_FLOAT = {1: np.dtype("<f4"), 2: np.dtype("<f2")}  # value codec -> stored float type


def _unplanes(p: np.ndarray, off: int, n: int, width: int) -> np.ndarray:
    """``n`` unsigned ints [n] (uint8, <u2 or <u4) from the ``width``-byte planes at ``p[off:]`` (p: uint8).

    One byte (a read-only view into ``p``) or one copy (wider).
    """
    b = p[off : off + n * width]
    if width == 1:
        return b
    out = np.empty((n, width), np.uint8)  # plane by plane: twice as fast as copying the transpose
    for i in range(width):
        out[:, i] = b[i * n : (i + 1) * n]
    return out.view(_UINT[width]).reshape(n)


def _width_code(max_value: int) -> int:
    return 0 if max_value < 1 << 8 else 1 if max_value < 1 << 16 else 2


def _zigzag(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, 2 * x, -2 * x - 1)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.int64)
    return (z >> 1) ^ -(z & 1)


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a``, read-only: the decoder's cached tables are shared by every call and thread."""
    a.flags.writeable = False
    return a


_MAX_R = {1: 128, 2: 1 << 15, 4: 1 << 31}  # largest |residual| a zigzagged field of this width holds
_UNZIGZAG: dict[int, np.ndarray] = {}
_RANK_MATRICES: dict[int, np.ndarray] = {}
_FLOAT_EXACT = 1 << 53  # float64 sums of integers are exact below this
# k*k*h*w up to which q is one matrix product: OpenBLAS runs gemm on one thread while M*N*K <=
# SMP_THRESHOLD_MIN * GEMM_MULTITHREAD_THRESHOLD (interface/gemm.c; 65536 * 4 by default), so a loader
# worker stays one thread
_BLAS_MAX = 1 << 18


def _unzigzag_table(width: int) -> np.ndarray:
    """float64 [256 ** width]: zigzag code -> value, for 1- and 2-byte fields (one gather instead of four
    arithmetic passes; the 2-byte table, 512 KiB, is built on first use: real maps need 2-byte residuals)."""
    table = _UNZIGZAG.get(width)
    if table is None:
        table = _UNZIGZAG[width] = _frozen(_unzigzag(np.arange(1 << (8 * width))).astype(np.float64))
    return table


def _rank_matrix(k: int) -> np.ndarray:
    """float64 [k, k]: row j sums T - G[0] - ... - G[j-1] from the rows (T, G[0], ..., G[k-2])."""
    a = _RANK_MATRICES.get(k)
    if a is None:
        a = np.tril(np.full((k, k), -1.0))
        a[:, 0] = 1.0
        a[0, 1:] = 0.0
        if len(_RANK_MATRICES) >= 8:
            _RANK_MATRICES.clear()
        _RANK_MATRICES[k] = _frozen(a)
    return a


def _pred2d(t: np.ndarray) -> np.ndarray:
    """Residual of the 2-D (planar) predictor: t[r,c] - t[r-1,c] - t[r,c-1] + t[r-1,c-1], zeros outside."""
    r = t.copy()
    r[1:] -= t[:-1]
    r[:, 1:] -= t[:, :-1]
    r[1:, 1:] += t[:-1, :-1]
    return r


def _ref_width(k: int, m: int) -> int:
    """Bytes per reference symbol of the palette codec: symbols are < k + m."""
    return 1 if k + m <= 1 << 8 else 2 if k + m <= 1 << 16 else 4


_SMALL_K = 8  # up to this k, _neighbour_refs compares whole maps; above it, it sorts (same result)


def _neighbour_refs(pos: np.ndarray) -> np.ndarray:
    """Palette positions (k, h, w) -> reference symbols (docs/FORMAT.md "Index section").

    ``j' < k``: the same class as rank ``j'`` of the previous cell (the left neighbour; in column 0 the cell
    above); ``k + p``: palette position ``p``, written out. Neighbouring cells share most of their classes,
    so most symbols are small and zstd codes them in fewer bits (benchmarks/bench_labelmap.py: -5 %).
    """
    k, h, w = pos.shape
    m = int(pos.max()) + 1
    nb = np.full_like(pos, -1)  # (k', h, w): the previous cell's positions, by the cell that refers to them
    nb[:, :, 1:] = pos[:, :, :-1]
    nb[:, 1:, 0] = pos[:, :-1, 0]
    if k <= _SMALL_K:  # a few whole-map comparisons beat sorting
        sym = k + pos
        for j in range(k - 1, -1, -1):  # descending, so the smallest matching j' is written last
            np.copyto(sym, j, where=pos == nb[j])
        return sym
    cell = np.arange(h * w, dtype=np.int64).reshape(1, h, w)
    # (cell, class) keys; a stable sort keeps the lowest j' first among equal keys of one cell
    nb_keys = np.where(nb >= 0, cell * m + nb, -1).reshape(-1)
    order = np.argsort(nb_keys, kind="stable")
    sorted_keys = nb_keys[order]
    keys = (cell * m + pos).reshape(-1)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    found = sorted_keys[at] == keys
    j_prime = order[at] // (h * w)
    return np.where(found, j_prime, k + pos.reshape(-1)).reshape(k, h, w)


_TABLE_MAX = 1 << 18  # entries of a per-shape table worth keeping (2 MiB); larger maps compute per record
_TABLES: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
_IOTA = _frozen(np.arange(1 << 10, dtype=np.intp))


def _iota(n: int) -> np.ndarray:
    """``arange(n)`` intp: a view of one shared array (never written to) up to _TABLE_MAX."""
    global _IOTA
    if n > _IOTA.size:
        if n > _TABLE_MAX:
            return np.arange(n, dtype=np.intp)
        _IOTA = _frozen(np.arange(max(n, min(2 * _IOTA.size, _TABLE_MAX)), dtype=np.intp))
    return _IOTA[:n]


def _prev_cells(h: int, w: int) -> np.ndarray:
    """intp [h*w]: each cell's previous cell, flat: the left neighbour, in column 0 the cell above. Cell
    (0, 0) has none (0 here): its references are rejected before use."""
    prev = np.arange(-1, h * w - 1, dtype=np.intp).reshape(h, w)
    prev[:, 0] -= w - 1
    prev[0, 0] = 0
    return prev.reshape(-1)


def _pointer_tables(k: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Where each element of a [k, h, w] map first points, by its symbol; None above _TABLE_MAX entries.

    Returns:
        ``(first, byte_rows)``. ``first`` intp [(k + 1) * N], N = k*h*w: at ``min(s, k) * N + n``, where
        element n with symbol s points: for s < k rank s of its previous cell (``s * h * w + prev``), for
        s >= k (written out) n itself. ``byte_rows`` intp [256]: ``min(s, k) * N`` for a one-byte s.
        Cached per shape: a dataset has one, so each loader worker builds them once.
    """
    tables = _TABLES.get((k, h, w))
    if tables is None:
        hw, n = h * w, k * h * w
        if (k + 1) * n > _TABLE_MAX:
            return None
        refs = np.arange(k, dtype=np.intp).reshape(k, 1, 1) * hw + _prev_cells(h, w).reshape(1, 1, hw)
        first = np.concatenate([np.broadcast_to(refs, (k, k, hw)).reshape(-1), np.arange(n)])  # (s, j, cell)
        if len(_TABLES) >= 8:
            _TABLES.clear()
        byte_rows = np.minimum(np.arange(256, dtype=np.intp), k) * n
        tables = _TABLES[(k, h, w)] = (_frozen(first), _frozen(byte_rows))
    return tables


def _ref_pointers(s: np.ndarray, k: int, h: int, w: int, m: int) -> np.ndarray:
    """Reference symbols [k*h*w] (flat order, any unsigned dtype) -> intp [k*h*w]: for every element, the
    flat index of the written-out symbol (``>= k``) its reference chain ends at.

    Pointer jumping (``ptr = ptr[ptr]``) with no loop over cells: parents come earlier in raster order and
    chains are shorter than h + w cells, so ``bit_length(h + w)`` doublings resolve every chain. The arrays
    are small, so each numpy call costs about a microsecond whatever its size: this makes few, through
    per-shape tables, and prefers ndarray methods to np.* wrappers and dtype= casts.
    """
    hw, n = h * w, k * h * w
    if min(s[::hw].tolist()) < k:  # ranks 0..k-1 of cell (0, 0)
        raise LabelMapError("bad label-map record: cell (0, 0) refers to a previous cell, but it has none")
    top = int(s.max())
    if top >= k + m:
        raise LabelMapError(f"bad label-map record: palette position {top - k} >= palette size {m}")
    tables = _pointer_tables(k, h, w)
    if tables is None:  # a large map: compute what the table would hold
        ptr = s.astype(np.intp)
        ptr *= hw
        ptr += np.tile(_prev_cells(h, w), k)
        np.putmask(ptr, s >= k, _iota(n))
    else:
        first, byte_rows = tables
        at = byte_rows.take(s) if s.dtype == np.uint8 else np.minimum(s, k).astype(np.intp) * n
        at += _iota(n)
        ptr = first.take(at, mode="clip")  # every index is in range by construction; clip skips the check
    for _ in range((h + w).bit_length()):
        ptr = ptr.take(ptr, mode="clip")
    return ptr


def _resolve_refs(sym: np.ndarray, m: int) -> np.ndarray:
    """Reference symbols [k, h, w] -> palette positions int64 [k*h*w] (docs/FORMAT.md "Index section")."""
    k, h, w = sym.shape
    s = sym.reshape(-1)
    return (s.astype(np.int64) - k)[_ref_pointers(s, k, h, w, m)]


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


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor [k, h, w], got {type(x).__name__}")
    return x


# ------------------------------------------------------------------------------------------- encode


def encode_label_map(
    values: Any,
    indices: Any,
    num_classes: int,
    *,
    encoding: str = "compact",
    level: int = DEFAULT_LEVEL,
    step: float | None = None,
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
            the nearest multiple of it. Finite, > 0.

    Returns:
        The record's bytes.

    Raises:
        TypeError: values or indices of the wrong type or dtype.
        ValueError: shapes, ranges or options out of bounds (the message names the parameter and the range).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    value_codec, default_step = ENCODINGS[encoding]
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
        raise ValueError(f"level must be an int in [1, 22], got {level!r}")
    if step is not None and value_codec != 3:
        raise ValueError(f"step applies to encoding='compact' only, got step={step!r} with {encoding!r}")
    step = float(default_step if step is None else step)
    if value_codec == 3 and not (np.isfinite(step) and step > 0 and np.float32(step) > 0):
        raise ValueError(f"step must be a finite float > 0, got {step!r}")
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
    head = HEADER.pack(
        MAGIC,
        VERSION,
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
    crc = zlib.crc32(frame, zlib.crc32(head[:28]))
    return head[:28] + struct.pack("<I", crc) + frame


# ------------------------------------------------------------------------------------------- decode

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
    import zstandard

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


def _decode_indices(p: np.ndarray, ic: int, k: int, h: int, w: int, m: int, c: int) -> tuple[np.ndarray, int]:
    """The index section at ``p[0:]`` -> (indices [k, h, w] int16/int32, offset of the value section)."""
    n, cw = k * h * w, 2 if c <= 65536 else 4
    dtype = np.int16 if c <= 32767 else np.int32
    if ic == 1:  # raw
        ix = _unplanes(p, 0, n, cw)
        top = int(ix.max())
        if top >= c:
            raise LabelMapError(f"bad label-map record: class index {top} >= num_classes={c}")
        return ix.astype(dtype).reshape(k, h, w), n * cw
    # palette: P_i = (g_0 + ... + g_i) + i, exact in int64 (m * (2^32 - 1) < 2^63); lut maps a symbol to
    # its class (symbols < k are references, whose entries are never read: ptr resolves them)
    lut = np.empty(k + m, np.int64)
    palette = lut[k:]
    palette[...] = _unplanes(p, 0, m, cw)
    np.add.accumulate(palette, out=palette)
    palette += _iota(m)
    last = int(palette[-1])  # gaps are >= 0, so the last class is the largest
    rw = _ref_width(k, m)
    sym = _unplanes(p, m * cw, n, rw)
    if last >= c:
        raise LabelMapError(f"bad label-map record: palette class {last} >= num_classes={c}")
    ptr = _ref_pointers(sym, k, h, w, m)
    lut = lut.astype(dtype)  # every class is < c, so it fits
    return lut.take(sym, mode="clip").take(ptr, mode="clip").reshape(k, h, w), m * cw + n * rw


def _decode_quantized(p: np.ndarray, off: int, k: int, h: int, w: int, flags: int, step: float) -> np.ndarray:
    """The quantized value section at ``p[off:]`` -> values float32 [k, h, w] (FORMAT.md "Value section").

    ``q`` [k, h*w] receives R in q[0] and G[j-1] in q[j]; the 2-D cumulative sum of q[0] gives T, then one
    small matrix product gives q[j] = T - G[0] - ... - G[j-1]. The sums run in float64, exact whenever no
    partial sum can reach 2**53: always with 1- or 2-byte top residuals, below 2**22 cells with 4-byte ones;
    larger maps with 4-byte residuals sum in int64.
    """
    hw = h * w
    tw, gw, signed = _WIDTH_CODES[flags & 3], _WIDTH_CODES[flags >> 2 & 3], bool(flags >> 4 & 1)
    z = _unplanes(p, off, hw, tw)
    if tw == 4:
        r = _unzigzag(z)
        # residuals the encoder can make are bounded, which also keeps the sums below from overflowing;
        # 1- and 2-byte fields cannot exceed the bounds, so only 4-byte fields are scanned
        if int(np.abs(r).max()) > 4 * MAX_ABS_Q:
            raise LabelMapError("bad label-map record: quantized residuals exceed their bound")
    max_r, max_g = min(_MAX_R[tw], 4 * MAX_ABS_Q), min(_MAX_R[gw] * (1 if signed else 2), 2 * MAX_ABS_Q)
    bound = max_r * hw + max_g * (k - 1)  # of |q| and of every partial sum below
    q = np.empty((k, hw), np.float64 if bound < _FLOAT_EXACT else np.int64)
    if tw == 4:
        q[0] = r
    else:
        _unzigzag_table(tw).take(z, out=q[0], mode="clip")  # every index is < the table's size
    if k > 1:
        g = _unplanes(p, off + hw * tw, (k - 1) * hw, gw)
        if signed:
            g = _unzigzag(g)
        if gw == 4 and int(np.abs(g).max()) > 2 * MAX_ABS_Q:
            raise LabelMapError("bad label-map record: quantized residuals exceed their bound")
        q[1:] = g.reshape(k - 1, hw)
    top = q[0].reshape(h, w)
    np.add.accumulate(top, axis=0, out=top)  # inverse of the 2-D predictor
    np.add.accumulate(top, axis=1, out=top)
    if k > 1:
        if q.dtype == np.float64 and k * k * hw <= _BLAS_MAX:  # one BLAS call; exact on these integers
            q = _rank_matrix(k) @ q
        else:
            gaps = q[1:]
            np.add.accumulate(gaps, axis=0, out=gaps)
            np.subtract(q[0], gaps, out=gaps)
    if bound > MAX_ABS_Q and float(np.abs(q).max()) > MAX_ABS_Q:
        raise LabelMapError(f"bad label-map record: quantized values exceed +-{MAX_ABS_Q}")
    # float64(q) * float64(step), rounded once to float32, as docs/FORMAT.md says
    return (q * float(np.float32(step))).astype(np.float32).reshape(k, h, w)

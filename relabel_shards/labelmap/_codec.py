"""The payload's sections (docs/FORMAT.md "Index section", "Value section"): byte planes, zigzag, the
2-D predictor and the reference symbols, shared by the encoder and the decoder; the two sections' decoders.

The tables and thresholds that pick a code path live here (``_SMALL_K``, ``_TABLE_MAX``, ``_TABLES``,
``_BLAS_MAX``, ``_FLOAT_EXACT``); tests patch them on this module to reach the paths of large maps.
"""

from __future__ import annotations

import numpy as np

from relabel_shards.labelmap._header import _WIDTH_CODES, MAX_ABS_Q, LabelMapError, _ref_width


def _planes(a: np.ndarray, width: int) -> bytes:
    """Unsigned ints as ``width``-byte little-endian byte planes: byte b of element i at offset b*n + i."""
    le = np.ascontiguousarray(a.reshape(-1), dtype=f"<u{width}")
    return le.view(np.uint8).reshape(-1, width).T.tobytes()


_UINT = {1: np.dtype(np.uint8), 2: np.dtype("<u2"), 4: np.dtype("<u4")}


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

"""The fused LabelPooling kernel (Triton): one program per image, no dense map, no atomics, deterministic.

Per image b, the program:

1. reads the box and computes the row weights ``Wy[h]`` and column weights ``Wx[w]`` in registers, with the
   same float32 operations in the same order as ``torch_impl.axis_weights`` (so as torchvision's roi_align);
2. loads the ``[k, h, w]`` values and class indices as stored (any strides; values f16/bf16/f32, indices
   int8..int64) and forms ``contrib = value * (Wy[r] * Wx[q])``;
3. accumulates the contributions by class index without a dense map: it sorts int32 keys
   ``class * N + position`` (a bitonic sort, :func:`_sort`) and gathers the contributions back in key order,
   so each class is one run; run starts come
   from a neighbour compare (``tl.gather``), run ends from a binary search by ``tl.gather`` (log2 N steps),
   and each class's total is the difference of a float64 prefix sum (``tl.cumsum``) across its run: fixed
   order, no atomics;
4. computes the softmax over all C classes (absent classes have logit 0 and still count:
   ``Z = sum_present exp(l - m) + (C - n_present) * exp(-m)``), writes ``exp(-m) / Z`` to the whole output row
   in tiles of ``C_BLOCK`` classes, and after a barrier overwrites the present classes with their own values.

The work per image depends on ``k * h * w`` (padded to powers of two), not on C, except for writing the row,
so C = 21,841 (ImageNet-21k) costs only the larger write. Class indices outside ``[0, C)`` are ignored.

Exactness: division uses ``div_rn`` (IEEE rounding, as on the CPU) and the launch turns off FMA contraction
(``enable_fp_fusion=False``), so sample positions, validity and weights follow torchvision's float32 steps.

Under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` where there is no GPU) the same kernel runs on CPU
tensors; the interpreter has no bfloat16, so bfloat16 values are widened to float32 first (exact) there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreter_active() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _axis_weights(start, end, size, S: tl.constexpr, BLOCK: tl.constexpr):
    """Row (or column) weights [BLOCK] of one box; see torch_impl.axis_weights for the derivation."""
    roi = tl.maximum(end - start, 1.0)
    g_int = roi.to(tl.int32)  # roi >= 1, so truncation is floor
    grid = tl.where(g_int.to(tl.float32) < roi, g_int + 1, g_int).to(tl.float32)  # ceil(roi)
    step = tl.math.div_rn(roi, grid)
    t = tl.math.div_rn(-1.0 - start, step) - 0.5
    t = tl.minimum(tl.maximum(t, 0.0), 16777216.0)
    first = tl.maximum(t.to(tl.int32) - 1, 0).to(tl.float32)  # at or before the first sample >= -1
    i = first + tl.arange(0, S).to(tl.float32)  # [S] candidate sample indices
    y = start + tl.math.div_rn((i + 0.5) * roi, grid)
    valid = (i < grid) & (y >= -1.0) & (y <= size.to(tl.float32))
    y = tl.maximum(y, 0.0)
    low = y.to(tl.int32)  # y >= 0: truncation is floor
    last = low >= size - 1
    frac = tl.where(last, 0.0, y - low.to(tl.float32))
    low = tl.where(last, size - 1, low)
    high = tl.where(last, low, low + 1)
    w_low = tl.where(valid, 1.0 - frac, 0.0)
    w_high = tl.where(valid, frac, 0.0)
    cells = tl.arange(0, BLOCK)
    wts = (tl.where(low[:, None] == cells[None, :], w_low[:, None], 0.0)
           + tl.where(high[:, None] == cells[None, :], w_high[:, None], 0.0))  # [S, BLOCK]
    return tl.math.div_rn(tl.sum(wts, axis=0), tl.zeros([BLOCK], tl.float32) + grid)


@triton.jit
def _finite_box(x1, y1, x2, y2):
    """The box, with a non-finite one replaced by the whole image, and whether it was finite."""
    inf = float("inf")
    finite = (tl.abs(x1) < inf) & (tl.abs(y1) < inf) & (tl.abs(x2) < inf) & (tl.abs(y2) < inf)
    return (tl.where(finite, x1, 0.0), tl.where(finite, y1, 0.0), tl.where(finite, x2, 1.0),
            tl.where(finite, y2, 1.0), finite)


@triton.jit
def _bin_weights(start, end, p, bins, size, S: tl.constexpr, BLOCK: tl.constexpr):
    """Weights [BLOCK] of bin ``p`` of ``bins`` along one axis; see torch_impl.bin_axis_weights."""
    roi = tl.maximum(end - start, 1.0)
    bin_size = tl.math.div_rn(roi, bins.to(tl.float32))
    g_int = bin_size.to(tl.int32)  # bin_size > 0, so truncation is floor
    grid = tl.where(g_int.to(tl.float32) < bin_size, g_int + 1, g_int).to(tl.float32)  # ceil(roi / bins)
    bin_start = start + p.to(tl.float32) * bin_size
    step = tl.math.div_rn(bin_size, grid)
    t = tl.math.div_rn(-1.0 - bin_start, step) - 0.5
    t = tl.minimum(tl.maximum(t, 0.0), 16777216.0)
    first = tl.maximum(t.to(tl.int32) - 1, 0).to(tl.float32)
    i = first + tl.arange(0, S).to(tl.float32)
    y = bin_start + tl.math.div_rn((i + 0.5) * bin_size, grid)
    valid = (i < grid) & (y >= -1.0) & (y <= size.to(tl.float32))
    y = tl.minimum(tl.maximum(y, 0.0), size.to(tl.float32))
    low = y.to(tl.int32)
    last = low >= size - 1
    frac = tl.where(last, 0.0, y - low.to(tl.float32))
    low = tl.where(last, size - 1, low)
    high = tl.where(last, low, low + 1)
    w_low = tl.where(valid, 1.0 - frac, 0.0)
    w_high = tl.where(valid, frac, 0.0)
    cells = tl.arange(0, BLOCK)
    wts = (tl.where(low[:, None] == cells[None, :], w_low[:, None], 0.0)
           + tl.where(high[:, None] == cells[None, :], w_high[:, None], 0.0))  # [S, BLOCK]
    return tl.math.div_rn(tl.sum(wts, axis=0), tl.zeros([BLOCK], tl.float32) + grid)


@triton.jit
def _sort(x, N: tl.constexpr, LOG_N: tl.constexpr):
    """Ascending bitonic sort of an integer tensor [N] (N = 2**LOG_N), viewed as a [2] * LOG_N hypercube.

    Hypercube axis ``LOG_N - 1 - j`` holds bit j of the flat position; an element's partner across that axis
    is ``sum over the axis - itself`` (exact: the keys stay below 2**30, so the pair sum fits an int32).
    Written with ``tl.sum`` rather than the XOR reduction of ``tl.sort`` because Triton's interpreter runs
    ``tl.sum`` in numpy and a custom reduction one element at a time (20 s against 0.2 s per image here).
    """
    shape: tl.constexpr = [2] * LOG_N
    h = tl.reshape(x, shape)
    pos = tl.reshape(tl.arange(0, N), shape)
    for s in tl.static_range(1, LOG_N + 1):  # merge runs of 2**s
        if s < LOG_N:
            desc = (pos >> s) & 1  # alternate directions so that the next stage sees bitonic runs
        else:
            desc = tl.zeros(shape, tl.int32)
        for jj in tl.static_range(s):  # compare elements whose positions differ in bit j = s - 1 - jj
            partner = tl.sum(h, axis=LOG_N - s + jj, keep_dims=True) - h  # axis LOG_N - 1 - j
            is_right = (pos >> (s - 1 - jj)) & 1
            h = tl.where(is_right == desc, tl.minimum(h, partner), tl.maximum(h, partner))
    return tl.reshape(h, [N])


# No specialization on the integer arguments: shapes may be 1 (Triton would turn them into constants), and
# strides divisible by 16 or not would each compile another variant; the loads here are gathers anyway.
@triton.jit(do_not_specialize=["v_sb", "v_sk", "v_sh", "v_sw", "i_sb", "i_sk", "i_sh", "i_sw",
                               "box_sb", "box_sc", "out_sb", "K", "H", "W", "C"])
def _label_pooling_kernel(values_ptr, indices_ptr, boxes_ptr, out_ptr,
                          v_sb, v_sk, v_sh, v_sw, i_sb, i_sk, i_sh, i_sw, box_sb, box_sc, out_sb,
                          K, H, W, C,
                          SWAP_XY: tl.constexpr, K_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr,
                          W_BLOCK: tl.constexpr, LOG_N: tl.constexpr, S_H: tl.constexpr, S_W: tl.constexpr,
                          C_BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    box = boxes_ptr + b * box_sb
    x1 = tl.load(box).to(tl.float32)
    y1 = tl.load(box + box_sc).to(tl.float32)
    x2 = tl.load(box + 2 * box_sc).to(tl.float32)
    y2 = tl.load(box + 3 * box_sc).to(tl.float32)
    x1, y1, x2, y2, finite = _finite_box(x1, y1, x2, y2)
    wf = W.to(tl.float32)
    if SWAP_XY:  # the official (y1, x1, y2, x2) box read as (x1, y1, x2, y2), both scaled by w
        wy = _axis_weights(x1 * wf - 0.5, x2 * wf - 0.5, H, S_H, H_BLOCK)
        wx = _axis_weights(y1 * wf - 0.5, y2 * wf - 0.5, W, S_W, W_BLOCK)
    else:
        hf = H.to(tl.float32)
        wy = _axis_weights(y1 * hf - 0.5, y2 * hf - 0.5, H, S_H, H_BLOCK)
        wx = _axis_weights(x1 * wf - 0.5, x2 * wf - 0.5, W, S_W, W_BLOCK)

    kk = tl.arange(0, K_BLOCK)[:, None, None]
    rr = tl.arange(0, H_BLOCK)[None, :, None]
    qq = tl.arange(0, W_BLOCK)[None, None, :]
    inside = (kk < K) & (rr < H) & (qq < W)  # [K_BLOCK, H_BLOCK, W_BLOCK]
    val = tl.load(values_ptr + b * v_sb + kk * v_sk + rr * v_sh + qq * v_sw, mask=inside, other=0.0)
    idx = tl.load(indices_ptr + b * i_sb + kk * i_sk + rr * i_sh + qq * i_sw, mask=inside, other=-1)
    idx = idx.to(tl.int64)
    wmap = wy[None, :, None] * wx[None, None, :]
    contrib = val.to(tl.float32) * wmap
    ok = inside & (idx >= 0) & (idx < C)
    N: tl.constexpr = K_BLOCK * H_BLOCK * W_BLOCK
    # int32 keys ``class * N + position``: unique, ascending by class, and the position finds the contribution
    # again after the sort; ignored entries get class C. The launcher checks (C + 1) * N <= 2**30.
    flat = kk * (H_BLOCK * W_BLOCK) + rr * W_BLOCK + qq  # row-major position, as tl.reshape orders it
    keys = tl.where(ok, idx.to(tl.int32) * N, C * N) + flat
    keys = _sort(tl.reshape(keys, [N]), N, LOG_N)

    cls = keys >> LOG_N  # [N] ascending; C marks padding and ignored indices
    part = tl.gather(tl.reshape(contrib, [N]), keys & (N - 1), 0)
    pos = tl.arange(0, N)
    prev = tl.gather(cls, tl.maximum(pos - 1, 0), 0)
    is_start = (pos == 0) | (cls != prev)  # first element of each class run
    # the run's last element, by binary lifting: the largest end >= pos with cls[end] == cls[pos]
    end = pos
    for t in tl.static_range(LOG_N):
        cand = tl.minimum(end + (N >> (t + 1)), N - 1)
        end = tl.where(tl.gather(cls, cand, 0) == cls, cand, end)
    # class totals as differences of a float64 prefix sum: exact to ~1e-14, fixed order, no atomics
    part64 = part.to(tl.float64)
    prefix = tl.cumsum(part64, 0)
    total = (tl.gather(prefix, end, 0) - (prefix - part64)).to(tl.float32)

    first = is_start & (cls < C)  # one element per present class
    n_present = tl.sum(first.to(tl.int32), axis=0)
    m = tl.max(tl.where(first, total, float("-inf")), axis=0)
    m = tl.where(n_present < C, tl.maximum(m, 0.0), m)
    e = tl.where(first, tl.exp(total - m), 0.0)
    z = tl.sum(e, axis=0) + (C - n_present).to(tl.float32) * tl.exp(0.0 - m)
    z = tl.where(finite, z, float("nan"))  # a non-finite box: a row of NaN, as the PyTorch path
    base = tl.exp(0.0 - m) / z

    row = out_ptr + b * out_sb
    for c0 in range(0, C, C_BLOCK):
        cc = c0 + tl.arange(0, C_BLOCK)
        tl.store(row + cc, tl.zeros([C_BLOCK], tl.float32) + base, mask=cc < C)
    tl.debug_barrier()  # the row is written before the present classes overwrite their entries
    tl.store(row + cls, e / z, mask=first)


# One program per (image, row of bins): it sorts the image's keys once (as the 1x1 kernel) and then, for each
# bin of its row, weights the sorted contributions with that bin's row x column weights, sums each class run
# and writes the bin's softmax row. The redundant sort per row buys oh times the parallelism of one program
# per image.
@triton.jit(do_not_specialize=["v_sb", "v_sk", "v_sh", "v_sw", "i_sb", "i_sk", "i_sh", "i_sw",
                               "box_sb", "box_sc", "flip_sb", "out_sb", "K", "H", "W", "C", "OH", "OW"])
def _label_pooling_bins_kernel(values_ptr, indices_ptr, boxes_ptr, flips_ptr, out_ptr,
                               v_sb, v_sk, v_sh, v_sw, i_sb, i_sk, i_sh, i_sw, box_sb, box_sc, flip_sb,
                               out_sb,
                               K, H, W, C, OH, OW,
                               SWAP_XY: tl.constexpr, HAS_FLIPS: tl.constexpr, K_BLOCK: tl.constexpr,
                               H_BLOCK: tl.constexpr, W_BLOCK: tl.constexpr, LOG_N: tl.constexpr,
                               S_H: tl.constexpr, S_W: tl.constexpr, C_BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ph = tl.program_id(1)
    box = boxes_ptr + b * box_sb
    x1 = tl.load(box).to(tl.float32)
    y1 = tl.load(box + box_sc).to(tl.float32)
    x2 = tl.load(box + 2 * box_sc).to(tl.float32)
    y2 = tl.load(box + 3 * box_sc).to(tl.float32)
    x1, y1, x2, y2, finite = _finite_box(x1, y1, x2, y2)
    wf = W.to(tl.float32)
    if SWAP_XY:  # the official (y1, x1, y2, x2) box read as (x1, y1, x2, y2), both scaled by w
        rs, re, cs, ce = x1 * wf - 0.5, x2 * wf - 0.5, y1 * wf - 0.5, y2 * wf - 0.5
    else:
        hf = H.to(tl.float32)
        rs, re, cs, ce = y1 * hf - 0.5, y2 * hf - 0.5, x1 * wf - 0.5, x2 * wf - 0.5
    wy = _bin_weights(rs, re, ph, OH, H, S_H, H_BLOCK)

    kk = tl.arange(0, K_BLOCK)[:, None, None]
    rr = tl.arange(0, H_BLOCK)[None, :, None]
    qq = tl.arange(0, W_BLOCK)[None, None, :]
    inside = (kk < K) & (rr < H) & (qq < W)
    val = tl.load(values_ptr + b * v_sb + kk * v_sk + rr * v_sh + qq * v_sw, mask=inside, other=0.0)
    val = val.to(tl.float32)
    idx = tl.load(indices_ptr + b * i_sb + kk * i_sk + rr * i_sh + qq * i_sw, mask=inside, other=-1)
    idx = idx.to(tl.int64)
    ok = inside & (idx >= 0) & (idx < C)
    N: tl.constexpr = K_BLOCK * H_BLOCK * W_BLOCK
    flat = kk * (H_BLOCK * W_BLOCK) + rr * W_BLOCK + qq
    keys = tl.where(ok, idx.to(tl.int32) * N, C * N) + flat
    keys = _sort(tl.reshape(keys, [N]), N, LOG_N)
    cls = keys >> LOG_N
    where = keys & (N - 1)  # each sorted entry's flat position
    pos = tl.arange(0, N)
    prev = tl.gather(cls, tl.maximum(pos - 1, 0), 0)
    is_start = (pos == 0) | (cls != prev)
    end = pos
    for t in tl.static_range(LOG_N):
        cand = tl.minimum(end + (N >> (t + 1)), N - 1)
        end = tl.where(tl.gather(cls, cand, 0) == cls, cand, end)
    first = is_start & (cls < C)
    n_present = tl.sum(first.to(tl.int32), axis=0)
    absent = (C - n_present).to(tl.float32)

    flipped = 0
    if HAS_FLIPS:
        flipped = tl.load(flips_ptr + b * flip_sb).to(tl.int32)
    for pw in range(0, OW):
        src = tl.where(flipped != 0, OW - 1 - pw, pw)  # a mirrored crop: bins right to left
        wx = _bin_weights(cs, ce, src, OW, W, S_W, W_BLOCK)
        contrib = val * (wy[None, :, None] * wx[None, None, :])
        part = tl.gather(tl.reshape(contrib, [N]), where, 0).to(tl.float64)
        prefix = tl.cumsum(part, 0)
        total = (tl.gather(prefix, end, 0) - (prefix - part)).to(tl.float32)
        m = tl.max(tl.where(first, total, float("-inf")), axis=0)
        m = tl.where(n_present < C, tl.maximum(m, 0.0), m)
        e = tl.where(first, tl.exp(total - m), 0.0)
        z = tl.sum(e, axis=0) + absent * tl.exp(0.0 - m)
        z = tl.where(finite, z, float("nan"))
        base = tl.exp(0.0 - m) / z
        row = out_ptr + b * out_sb + (ph * OW + pw).to(tl.int64) * C
        for c0 in range(0, C, C_BLOCK):
            cc = c0 + tl.arange(0, C_BLOCK)
            tl.store(row + cc, tl.zeros([C_BLOCK], tl.float32) + base, mask=cc < C)
        tl.debug_barrier()
        tl.store(row + cls, e / z, mask=first)
        tl.debug_barrier()  # the next bin's row starts after this one is complete


_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def launch_config(k: int, h: int, w: int, num_classes: int, swap_xy: bool,
                  num_warps: int | None = None) -> tuple[dict, int]:
    """The kernel's compile-time constants and warp count for a ``[k, h, w]`` map and C classes.

    Every axis is padded to a power of two (at least 2); the sort works on ``N = K_BLOCK * H_BLOCK * W_BLOCK``
    keys (2048 for 5x15x15). Warps by default: 4 up to N = 512, 8 up to 8192, else 16. Not yet tuned on a GPU
    (``bench_pooling.py --device cuda --sweep-warps`` times the alternatives); what ptxas says for sm_90 and
    5x15x15: 174 registers per thread at 4 warps (2 blocks, 8 warps per SM), 80 at 8 warps (3 blocks, 24
    warps per SM), no spills.
    """
    k_block, h_block, w_block = (max(2, triton.next_power_of_2(x)) for x in (k, h, w))
    n = k_block * h_block * w_block
    if num_warps is None:
        num_warps = 4 if n <= 512 else (8 if n <= 8192 else 16)
    constants = dict(SWAP_XY=bool(swap_xy), K_BLOCK=k_block, H_BLOCK=h_block, W_BLOCK=w_block,
                     LOG_N=n.bit_length() - 1, S_H=triton.next_power_of_2(2 * h + 6),
                     S_W=triton.next_power_of_2(2 * w + 6),
                     C_BLOCK=min(1024, triton.next_power_of_2(num_classes)))
    return constants, num_warps


def supports(k: int, h: int, w: int, num_classes: int) -> bool:
    """Whether the kernel's int32 sort keys hold ``class * N + position``: ``(C + 1) * N <= 2**30``.

    For 5x15x15 maps (N = 2048) that is C <= 524,287; the PyTorch path has no such limit.
    """
    constants, _ = launch_config(k, h, w, num_classes, False)
    return (num_classes + 1) << constants["LOG_N"] <= 2**30


def label_pooling_triton(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, num_classes: int,
                         swap_xy: bool = False, num_warps: int | None = None, *,
                         output_size: tuple[int, int] = (1, 1), flips: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the fused kernel; inputs are assumed checked (``_checks.check_inputs``).

    Args:
        values: Tensor[B, k, h, w] float16 / bfloat16 / float32 (float64 is narrowed to float32), any strides.
        indices: Tensor[B, k, h, w] int8 / uint8 / int16 / int32 / int64 (other integer types: widened).
        boxes: Tensor[B, 4] floating, normalized (x1, y1, x2, y2).
        num_classes: C.
        swap_xy: the official box order.
        num_warps: override the default of :func:`launch_config` (for tuning).
        output_size: ``(oh, ow)`` bins; ``(1, 1)`` runs the one-program-per-image kernel.
        flips: Tensor[B] bool or None: mirror image b's bins left to right (ignored for 1x1).
        out: optional contiguous float32 result tensor to write into.

    Returns:
        Tensor[B, C] float32 probabilities for 1x1, else Tensor[B, oh, ow, C], on the inputs' device; a
        non-finite box gives its image NaN.

    Raises:
        ValueError: the map and class count are too large for the kernel's keys (see :func:`supports`).
    """
    batch, k, h, w = values.shape
    if not supports(k, h, w, num_classes):
        raise ValueError(f"the Triton kernel needs (num_classes + 1) * N <= 2**30 with N = k * h * w padded "
                         f"to powers of two; got num_classes={num_classes} for a [{k}, {h}, {w}] map: "
                         "use backend='torch'")
    oh, ow = output_size
    one = oh == 1 and ow == 1
    shape = (batch, num_classes) if one else (batch, oh, ow, num_classes)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=values.device)
    if batch == 0:
        return out
    if values.dtype == torch.float64 or (values.dtype == torch.bfloat16 and interpreter_active()):
        values = values.to(torch.float32)
    if indices.dtype not in _INDEX_DTYPES:
        indices = indices.to(torch.int64)
    if boxes.dtype != torch.float32:
        boxes = boxes.to(torch.float32)
    constants, warps = launch_config(k, h, w, num_classes, swap_xy, num_warps)
    if not one:
        has_flips = flips is not None
        fl = flips.to(torch.uint8) if has_flips else boxes  # a placeholder pointer when there are no flips
        _label_pooling_bins_kernel[(batch, oh)](
            values, indices, boxes, fl, out,
            *values.stride(), *indices.stride(), *boxes.stride(), fl.stride(0), out.stride(0),
            k, h, w, num_classes, oh, ow,
            HAS_FLIPS=has_flips, **constants, num_warps=warps, enable_fp_fusion=False,
        )
        return out
    _label_pooling_kernel[(batch,)](
        values, indices, boxes, out,
        *values.stride(), *indices.stride(), *boxes.stride(), out.stride(0),
        k, h, w, num_classes,
        **constants, num_warps=warps, enable_fp_fusion=False,
    )
    return out


_TRITON_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int8: "*i8",
                 torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}


def compile_for_gpu(value_dtype: torch.dtype, index_dtype: torch.dtype, k: int, h: int, w: int,
                    num_classes: int, swap_xy: bool = False, arch: int = 90, *, bins: bool = False,
                    flips: bool = True) -> dict:
    """Compile the kernel ahead of time for an NVIDIA GPU (no GPU or driver needed) and describe the result.

    Catches what the interpreter can not: Triton front-end rules, MLIR/LLVM lowering and ptxas errors. Needs
    ``TRITON_INTERPRET`` unset when this module is imported (the interpreter replaces the kernel object).
    ``bins=True`` compiles the kernel for an output grid above 1x1 (``flips``: with the flips pointer).

    Returns:
        ``{"ptx_bytes", "cubin_bytes", "shared_bytes", "num_warps"}``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _label_pooling_bins_kernel if bins else _label_pooling_kernel
    names = kernel.arg_names
    constants, warps = launch_config(k, h, w, num_classes, swap_xy)
    pointers = {"values_ptr": _TRITON_TYPES[value_dtype], "indices_ptr": _TRITON_TYPES[index_dtype],
                "boxes_ptr": "*fp32", "out_ptr": "*fp32", "flips_ptr": "*u8"}
    if bins:
        constants["HAS_FLIPS"] = bool(flips)
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "enable_fp_fusion": False})
    return {"ptx_bytes": len(compiled.asm["ptx"]), "cubin_bytes": len(compiled.asm["cubin"]),
            "shared_bytes": compiled.metadata.shared, "num_warps": warps}

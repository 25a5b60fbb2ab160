"""The sparse, exact PyTorch path of LabelPooling: row weights x column weights, scatter-add, softmax.

For a 1x1 output, torchvision's ``roi_align`` (``aligned=False``, ``sampling_ratio=-1``) is a weighted sum of
map cells whose weight factors into a row weight times a column weight (see :func:`axis_weights`). So the
pooled logit of class c is ``sum over (slot, row r, col q) with index == c of Wy[r] * Wx[q] * value``: the
dense ``[B, C, h, w]`` map is never built. Every step is a fixed-shape tensor op: no ``.item()``, no
host-device synchronization, the same code on the CPU and on CUDA.

Determinism: on the CPU the result is bit-for-bit reproducible. On CUDA, ``scatter_add_`` uses atomics, so the
last bits may vary between runs unless ``torch.use_deterministic_algorithms(True)``; the Triton kernel
(``triton_impl.py``) is deterministic either way.
"""

from __future__ import annotations

import math

import torch


def axis_weights(start: torch.Tensor, end: torch.Tensor, size: int) -> torch.Tensor:
    """RoIAlign's per-axis weights for a 1x1 output, exactly as torchvision's CPU kernel computes them.

    With ``roi = max(end - start, 1)`` and ``grid = ceil(roi)`` samples at
    ``y_i = start + ((i + 0.5) * roi) / grid`` (float32, in this order, like torchvision), a sample with
    ``y < -1`` or ``y > size`` adds nothing; otherwise ``y`` is clamped to ``>= 0``, ``low = floor(y)``, and
    when ``low >= size - 1`` the sample sits wholly on the last cell; else it splits ``(1 - frac, frac)``
    between ``low`` and ``low + 1``. The sum over samples is divided by ``grid``.

    The sample spacing ``roi / grid`` lies in (0.5, 1], so at most ``2 * size + 3`` samples fall in
    ``[-1, size]``: a fixed window of ``2 * size + 6`` candidates starting just before the first sample at
    or above -1 holds all of them, whatever the box size. That keeps the shapes static (no sync).

    Args:
        start: Tensor[B] float32, box start along this axis, in map cells (``x1 * w - 0.5``).
        end: Tensor[B] float32, box end, in map cells.
        size: number of cells along this axis (h or w).

    Returns:
        Tensor[B, size] float32: the weight of each row (or column); a box inside the map sums to 1.
    """
    roi = torch.clamp_min(end - start, 1.0)  # (B,)
    grid = torch.ceil(roi)  # (B,) float, >= 1
    step = roi / grid
    # first candidate: a sample index at or a little before the first sample with y >= -1
    first = torch.floor((-1.0 - start) / step - 0.5) - 1.0
    first = torch.clamp(first, 0.0, float(2**24))  # float32 holds every integer below 2**24 exactly
    num_candidates = 2 * size + 6
    i = first[:, None] + torch.arange(num_candidates, device=start.device, dtype=torch.float32)  # (B, S)
    y = start[:, None] + ((i + 0.5) * roi[:, None]) / grid[:, None]  # (B, S) sample positions
    valid = (i < grid[:, None]) & (y >= -1.0) & (y <= float(size))
    y = torch.clamp_min(y, 0.0)
    low = torch.floor(y)
    last = low >= size - 1
    frac = torch.where(last, torch.zeros_like(y), y - low)
    low = torch.where(last, torch.full_like(low, size - 1), low)
    high = torch.where(last, low, low + 1)
    w_low = torch.where(valid, 1.0 - frac, torch.zeros_like(frac))
    w_high = torch.where(valid, frac, torch.zeros_like(frac))
    cells = torch.arange(size, device=start.device, dtype=torch.float32)  # (size,)
    weights = ((low[..., None] == cells) * w_low[..., None]
               + (high[..., None] == cells) * w_high[..., None]).sum(1)  # (B, size)
    return weights / grid[:, None]


def box_extents(boxes: torch.Tensor, h: int, w: int, swap_xy: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row start/end and column start/end in map cells, float32, each Tensor[B].

    Default: rows ``y * h - 0.5``, columns ``x * w - 0.5``. ``swap_xy=True`` is the official code's geometry:
    it hands roi_align ``(y1, x1, y2, x2) * w - 0.5`` as if it were ``(x1, y1, x2, y2)``, so columns come from
    the y coordinates and rows from the x coordinates, both scaled by the width.
    """
    x1, y1, x2, y2 = boxes.to(torch.float32).unbind(1)
    if swap_xy:
        return x1 * w - 0.5, x2 * w - 0.5, y1 * w - 0.5, y2 * w - 0.5
    return y1 * h - 0.5, y2 * h - 0.5, x1 * w - 0.5, x2 * w - 0.5


def label_pooling_torch(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, num_classes: int,
                        swap_xy: bool = False, indices_checked: bool = False) -> torch.Tensor:
    """LabelPooling without the dense map; inputs are assumed checked (``_checks.check_inputs``).

    Class indices outside ``[0, num_classes)`` add nothing (they are masked, never scattered), so unchecked
    data can not trigger a device-side assert. ``indices_checked=True`` (the caller has verified the range)
    skips the mask, which saves two of the four per-image temporaries (peak memory, bench_pooling.py).

    Args:
        values: Tensor[B, k, h, w] float16 / bfloat16 / float32 logits (top-k scores per cell).
        indices: Tensor[B, k, h, w] integer class indices.
        boxes: Tensor[B, 4] floating, normalized (x1, y1, x2, y2) of the whole image.
        num_classes: C.
        swap_xy: reproduce the official code's box order (see :func:`box_extents`).
        indices_checked: every index is known to lie in ``[0, num_classes)``.

    Returns:
        Tensor[B, C] float32 probabilities (rows sum to 1), on the inputs' device; a row of NaN for a box
        with a non-finite coordinate.
    """
    batch, k, h, w = values.shape
    finite, boxes = finite_boxes(boxes)
    rs, re, cs, ce = box_extents(boxes, h, w, swap_xy)
    wmap = axis_weights(rs, re, h)[:, :, None] * axis_weights(cs, ce, w)[:, None, :]  # (B, h, w)
    contrib = (values.to(torch.float32) * wmap[:, None]).reshape(batch, k * h * w)
    idx = indices.to(torch.int64).reshape(batch, k * h * w)
    if not indices_checked:
        ok = (idx >= 0) & (idx < num_classes)
        contrib = contrib.masked_fill(~ok, 0.0)
        idx = idx.masked_fill(~ok, 0)
    logits = torch.zeros(batch, num_classes, dtype=torch.float32, device=values.device)
    logits.scatter_add_(1, idx, contrib)  # absent classes keep logit 0
    del contrib, idx
    # softmax in place (saves a [B, C] buffer); equals torch.softmax to an ulp
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    logits.div_(logits.sum(dim=1, keepdim=True))
    return logits.masked_fill_(~finite[:, None], float("nan"))  # a non-finite box: a NaN row


# ------------------------------------------------------------------------------ output_size above 1x1


def bin_axis_weights(start: torch.Tensor, end: torch.Tensor, size: int, bins: int) -> torch.Tensor:
    """RoIAlign's per-axis weights for ``bins`` output bins along one axis, as torchvision's CPU kernel.

    torchvision (``roi_align_kernel.cpp``, ``aligned=False``, ``sampling_ratio=-1``): ``roi = max(end -
    start, 1)``, ``bin = roi / bins``, ``grid = ceil(roi / bins)`` samples per bin, sample ``i`` of bin ``p``
    at ``(start + p * bin) + ((i + 0.5) * bin) / grid`` (float32, in this order), then the validity, clamp
    and last-cell rules of :func:`axis_weights`; each bin's sum is divided by ``grid``. With ``bins == 1``
    this is :func:`axis_weights`. The spacing ``bin / grid`` is in (0.5, 1] (or there is one sample), so
    a window of ``2 * size + 6`` candidates per bin holds every sample that lands in ``[-1, size]``.

    Args:
        start, end: Tensor[B] float32, finite, the box along this axis in map cells.
        size: cells along this axis.
        bins: output bins along this axis (oh or ow).

    Returns:
        Tensor[B, bins, size] float32.
    """
    batch = start.shape[0]
    roi = torch.clamp_min(end - start, 1.0)  # (B,)
    step_bin = roi / float(bins)  # (B,) bin size
    grid = torch.ceil(roi / float(bins))  # (B,) samples per bin, >= 1
    p = torch.arange(bins, device=start.device, dtype=torch.float32)
    bin_start = start[:, None] + p[None, :] * step_bin[:, None]  # (B, bins)
    spacing = (step_bin / grid)[:, None]
    first = torch.floor((-1.0 - bin_start) / spacing - 0.5) - 1.0
    first = torch.clamp(first, 0.0, float(2**24))
    num_candidates = 2 * size + 6
    if start.device.type == "cpu" and batch:
        # a window from `first` of grid + 1 candidates holds every sample of the bin that matters: on the
        # CPU (where reading the largest grid costs no sync) use that when it is smaller; typical crops
        # have 1 or 2 samples per bin, so this is 4 candidates instead of 2 * size + 6 (bench_pooling.py
        # --output-size 14). The extra candidates only ever added zero weights.
        num_candidates = min(num_candidates, int(grid.max()) + 2)
    i = first[..., None] + torch.arange(num_candidates, device=start.device, dtype=torch.float32)  # (B, P, S)
    y = bin_start[..., None] + ((i + 0.5) * step_bin[:, None, None]) / grid[:, None, None]
    valid = (i < grid[:, None, None]) & (y >= -1.0) & (y <= float(size))
    y = torch.clamp(y, 0.0, float(size))  # invalid samples beyond the map weigh 0; keep the index in range
    low = torch.floor(y)
    last = low >= size - 1
    frac = torch.where(last, torch.zeros_like(y), y - low)
    low = torch.where(last, torch.full_like(low, size - 1), low).long()
    high = torch.where(last, low, low + 1)
    w_low = torch.where(valid, 1.0 - frac, torch.zeros_like(frac))
    w_high = torch.where(valid, frac, torch.zeros_like(frac))
    weights = torch.zeros(batch, bins, size, dtype=torch.float32, device=start.device)
    weights.scatter_add_(2, low, w_low).scatter_add_(2, high, w_high)
    return weights / grid[:, None, None]


def finite_boxes(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Tensor[B] bool: the box is finite, the boxes with non-finite ones replaced by the whole image).

    Every backend gives a non-finite box a row of NaN (issue 12): the replacement only keeps the
    arithmetic that the NaN later overwrites well defined (integer indices from a NaN are undefined).
    """
    ok = torch.isfinite(boxes).all(1)
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=boxes.dtype, device=boxes.device)
    return ok, torch.where(ok[:, None], boxes, whole)


def _chunk_size(batch: int, n: int, oh: int, ow: int, h: int, w: int) -> int:
    """Images per chunk so that the largest temporary (about ``n * max(h * w, oh * ow, oh * w)`` floats per
    image, n = k * h * w the entries of a map) stays near 2**20 elements: memory independent of B."""
    per_image = n * 8 + max(h * w, oh * ow, oh * w) * min(n, 256) + oh * (2 * h + 6) * 6
    return max(1, min(batch, (1 << 22) // max(1, per_image)))


# Up to this many classes, each image's distinct classes come from a presence map [C] per image (cheaper than
# sorting its k * h * w indices; bench_pooling.py --output-size 14); above it, from a sort.
_PRESENCE_MAX_CLASSES = 4096


def _slots(idx: torch.Tensor, num_classes: int, pad_absent: bool
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each image's distinct classes as slots: (slot of each entry [B, n], classes [B, U], U).

    Unused slots hold ``-1``, or with ``pad_absent`` a class absent from that image (one exists wherever a
    slot is unused, since then the image has fewer than U <= C classes).
    """
    batch, n = idx.shape
    dev = idx.device
    if num_classes <= _PRESENCE_MAX_CLASSES:
        present = torch.zeros(batch, num_classes, dtype=torch.bool, device=dev)
        present.scatter_(1, idx, torch.ones_like(idx, dtype=torch.bool))
        rank = present.cumsum(1)  # (B, C): slot + 1 of each present class
        num_slots = int(rank[:, -1].max()) if batch else 1  # one sync on CUDA
        slot = rank.gather(1, idx) - 1
        fill = (~present).to(torch.uint8).argmax(1) if pad_absent else torch.full((batch,), -1, device=dev)
        classes = fill[:, None].expand(batch, num_slots + 1).clone()
        target = torch.where(present, rank - 1, num_slots)  # absent classes land in the extra column
        classes.scatter_(1, target, torch.arange(num_classes, device=dev).expand(batch, num_classes))
        return slot, classes[:, :num_slots], num_slots
    srt, order = idx.sort(dim=1)  # (B, n)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot_sorted = new.cumsum(1) - 1  # (B, n) slot of each sorted entry
    num_slots = int(slot_sorted[:, -1].max()) + 1 if batch else 1  # one sync on CUDA
    slot = torch.empty_like(slot_sorted).scatter_(1, order, slot_sorted)
    classes = torch.full((batch, num_slots), -1, dtype=torch.int64, device=dev).scatter_(1, slot_sorted, srt)
    if pad_absent:
        used = torch.zeros(batch, num_slots + 1, dtype=torch.bool, device=dev)
        used.scatter_(1, slot_sorted, True)
        # the smallest class absent from the image: the first gap in its sorted distinct classes
        gap = torch.where(used[:, :num_slots], classes, num_classes + 1)
        expect = torch.arange(num_slots, device=dev).expand(batch, num_slots)
        first = torch.where(gap != expect, expect, num_slots).amin(1)  # classes 0..first-1 all present
        classes = torch.where(used[:, :num_slots], classes, first[:, None])
    return slot, classes, num_slots


def bin_weights(boxes: torch.Tensor, h: int, w: int, output_size: tuple[int, int], swap_xy: bool,
                flips: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(finite Tensor[B] bool, row weights Tensor[B, oh, h], column weights Tensor[B, ow, w]) of the boxes,
    the columns mirrored for flipped crops (a mirrored crop's bins left to right are the box's right to
    left); a non-finite box gets the whole image's weights (its result is NaN, see :func:`finite_boxes`)."""
    oh, ow = output_size
    finite, boxes = finite_boxes(boxes)
    rs, re, cs, ce = box_extents(boxes, h, w, swap_xy)
    wy = bin_axis_weights(rs, re, h, oh)  # (B, oh, h)
    wx = bin_axis_weights(cs, ce, w, ow)  # (B, ow, w)
    if flips is not None and ow > 1:
        wx = torch.where(flips.to(wx.device).view(-1, 1, 1), wx.flip(1), wx)
    return finite, wy, wx


def sparse_pool(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, num_classes: int,
                output_size: tuple[int, int], swap_xy: bool = False, flips: torch.Tensor | None = None,
                indices_checked: bool = False, pad_absent: bool = False,
                weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled logits on each image's support, for one chunk of images (inputs checked by the caller).

    ``weights``: these images' :func:`bin_weights`, if the caller has computed them (for the whole batch at
    once, which saves the small operations per chunk); else they are computed from ``boxes``.

    Each image's distinct class indices become slots ``u < U`` (U: the largest count in the chunk); the
    compact map ``D[b, u, r, q]`` (the sum of the values of class u at cell (r, q)) is pooled with the
    separable RoIAlign weights, ``P = Wy @ D @ Wx^T``: ``B * U * h * w`` floats, never ``B * C * h * w``.

    Returns:
        classes Tensor[B, U] int64 (``-1``: an unused slot, or with ``pad_absent`` a class absent from the
        image), logits Tensor[B, oh, ow, U] float32 (0 on unused slots, NaN for a non-finite box).
        Out-of-range indices (unchecked data) add nothing.
    """
    oh, ow = output_size
    batch, k, h, w = values.shape
    n = k * h * w
    dev = values.device
    idx = indices.reshape(batch, n).to(torch.int64)
    val = values.reshape(batch, n).to(torch.float32)
    if not indices_checked:
        ok = (idx >= 0) & (idx < num_classes)
        val = val.masked_fill(~ok, 0.0)  # adds 0 to class 0: the same as absent
        idx = idx.masked_fill(~ok, 0)
    slot, classes, num_slots = _slots(idx, num_classes, pad_absent)
    del idx
    # the compact map in layout (B, h, U, w), so that each image's row pooling is one (oh x h) @ (h x U*w)
    # product rather than U small ones (bench_pooling.py --output-size 14)
    cell = torch.arange(h * w, device=dev)
    where = (cell // w * (num_slots * w) + cell % w).repeat(k)[None, :] + slot * w  # (B, n)
    dense = torch.zeros(batch, h * num_slots * w, dtype=torch.float32, device=dev)
    dense.scatter_add_(1, where, val)  # 0 on unused slots
    del slot, val, where
    finite, wy, wx = bin_weights(boxes, h, w, output_size, swap_xy, flips) if weights is None else weights
    # float64 on CUDA, where TF32 matmul settings would cost 1e-3
    mm = torch.float64 if dev.type == "cuda" else torch.float32
    rows = torch.bmm(wy.to(mm), dense.view(batch, h, num_slots * w).to(mm))  # (B, oh, U * w)
    del dense
    pooled = torch.bmm(rows.view(batch, oh * num_slots, w), wx.to(mm).transpose(1, 2))  # (B, oh * U, ow)
    pooled = pooled.view(batch, oh, num_slots, ow).to(torch.float32)
    if not bool(finite.all()):
        pooled.masked_fill_(~finite[:, None, None, None], float("nan"))
    if pad_absent:  # for _softmax_into: (B, oh, U, ow), where reductions over U are cheap
        return classes, pooled
    return classes, pooled.permute(0, 1, 3, 2).contiguous()  # (B, oh, ow, U)


def _softmax_into(out: torch.Tensor, classes: torch.Tensor, logits: torch.Tensor, num_classes: int) -> None:
    """:func:`densify` for :func:`sparse_pool`'s ``pad_absent`` result: every slot holds a class (unused ones
    a class absent from the image, logit 0, which is that class's own target), distinct except repeats of
    that absent class. ``logits`` Tensor[B, oh, U, ow]; writes Tensor[B, oh, ow, C] ``out``.

    One softmax over U + 1 logits per bin does the reductions: the extra logit ``log(C - U)`` stands for the
    ``C - U`` classes without a slot (logit 0 each), so its probability divided by ``C - U`` is theirs. Each
    bin's row is then that constant with the U support values set on top: the rows are filled from a
    broadcast and the support scattered a few images at a time, while those rows are still in cache, so
    ``out`` is written about once (bench_pooling.py --output-size 14).
    """
    batch, oh, num_slots, ow = logits.shape
    cells = oh * ow
    rest = num_classes - num_slots
    ext = torch.empty(batch, oh, ow, num_slots + 1, dtype=torch.float32, device=out.device)
    ext[..., :num_slots].copy_(logits.permute(0, 1, 3, 2))
    ext[..., num_slots] = math.log(rest) if rest else float("-inf")
    probs = torch.softmax(ext, dim=-1).view(batch, cells, num_slots + 1)
    del ext
    # (B, cells, 1): the probability of each class without a slot
    base = probs[..., num_slots:] / rest if rest else torch.zeros_like(probs[..., num_slots:])
    support = probs[..., :num_slots]  # (B, cells, U)
    where = classes.view(batch, 1, num_slots).expand(batch, cells, num_slots)
    rows = out.view(batch, cells, num_classes)
    # a few images at a time, so that the support's writes land in rows the fill has just brought to cache
    step = max(1, (1 << 20) // (cells * num_classes))
    for b0 in range(0, batch, step):
        part = rows[b0:b0 + step]
        part.copy_(base[b0:b0 + step].expand(-1, cells, num_classes))
        part.scatter_(2, where[b0:b0 + step], support[b0:b0 + step])


def densify(classes: torch.Tensor, logits: torch.Tensor, num_classes: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over all C classes of sparse pooled logits: absent classes have logit 0 and still count.

    Per bin, with support S (slots whose class is >= 0), ``m = max(max_S z, 0)`` and
    ``Z = sum_S exp(z - m) + (C - |S|) exp(-m)``; every class gets ``exp(-m) / Z`` and each support class
    adds ``exp(z - m) / Z - exp(-m) / Z``. A slot with logit 0 therefore adds nothing and counts like an
    absent class, so a class may sit in several slots as long as at most one of them has a non-zero logit
    (what MixToken's concatenated supports give).

    Args:
        classes: Tensor[B, U] int64, ``-1`` = unused.
        logits: Tensor[B, *bins, U] float32.
        num_classes: C.
        out: optional Tensor[B, *bins, C] float32 to write into.

    Returns:
        Tensor[B, *bins, C] float32 probabilities.
    """
    batch, num_slots = classes.shape
    bins = logits.shape[1:-1]
    view = (batch,) + (1,) * len(bins) + (num_slots,)
    valid = (classes >= 0).view(view)
    count = valid.sum(-1).to(torch.float32)  # (B, 1...) support size
    z = logits.masked_fill(~valid, float("-inf"))
    m = z.amax(-1) if num_slots else torch.zeros(logits.shape[:-1], device=logits.device)
    m = torch.where(count < num_classes, torch.clamp_min(m, 0.0), m)
    e = torch.exp(z - m[..., None])  # 0 on unused slots
    base = torch.exp(-m)
    total = e.sum(-1) + (num_classes - count) * base
    base = base / total
    delta = (e / total[..., None] - base[..., None]).masked_fill(~valid, 0.0)
    if out is None:
        out = torch.empty(*logits.shape[:-1], num_classes, dtype=torch.float32, device=logits.device)
    out.copy_(base[..., None].expand(out.shape))
    out.scatter_add_(-1, classes.clamp_min(0).view(view).expand(delta.shape), delta)
    return out


def label_pooling_bins_torch(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor,
                             num_classes: int, output_size: tuple[int, int], swap_xy: bool = False,
                             flips: torch.Tensor | None = None, indices_checked: bool = False,
                             sparse: bool = False, out: torch.Tensor | None = None):
    """LabelPooling to an ``(oh, ow)`` grid of bins without the dense map, in chunks of images.

    Temporaries are bounded per chunk (:func:`_chunk_size`), so the memory beyond the output does not grow
    with B. On CUDA each chunk synchronizes once (the number of distinct classes sizes its slots).

    Returns:
        ``sparse=False``: Tensor[B, oh, ow, C] float32 probabilities (``[B, C]`` for a 1x1 grid).
        ``sparse=True``: ``(classes Tensor[B, U] int64, logits Tensor[B, oh, ow, U] float32)``, or logits
        ``[B, U]`` for a 1x1 grid; U is the largest support in the batch, ``-1`` marks unused slots.
    """
    oh, ow = output_size
    batch, k, h, w = values.shape
    one = oh == 1 and ow == 1
    step = _chunk_size(batch, k * h * w, oh, ow, h, w)
    weights = bin_weights(boxes, h, w, output_size, swap_xy, flips)  # B * (oh * h + ow * w) floats
    if out is not None:
        out = out.view(batch, oh, ow, num_classes)
    parts = []
    for b0 in range(0, batch, step):
        sl = slice(b0, min(batch, b0 + step))
        classes, logits = sparse_pool(values[sl], indices[sl], boxes[sl], num_classes, output_size, swap_xy,
                                      None, indices_checked, pad_absent=not sparse,
                                      weights=tuple(t[sl] for t in weights))
        if sparse:
            parts.append((classes, logits))
            continue
        if out is None:
            out = torch.empty(batch, oh, ow, num_classes, dtype=torch.float32, device=values.device)
        _softmax_into(out[sl], classes, logits, num_classes)
    if not sparse:
        if out is None:
            out = torch.empty(batch, oh, ow, num_classes, dtype=torch.float32, device=values.device)
        return out.view(batch, num_classes) if one else out
    width = max((c.shape[1] for c, _ in parts), default=1)
    classes = torch.full((batch, width), -1, dtype=torch.int64, device=values.device)
    logits = torch.zeros(batch, oh, ow, width, dtype=torch.float32, device=values.device)
    b0 = 0
    for c, lg in parts:
        classes[b0:b0 + len(c), : c.shape[1]] = c
        logits[b0:b0 + len(c), ..., : c.shape[1]] = lg
        b0 += len(c)
    return classes, (logits.view(batch, width) if one else logits)

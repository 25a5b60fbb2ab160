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
        Tensor[B, C] float32 probabilities (rows sum to 1), on the inputs' device.
    """
    batch, k, h, w = values.shape
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
    return logits.div_(logits.sum(dim=1, keepdim=True))

"""The dense oracle: zeros, scatter, torchvision ``roi_align``, softmax. For tests and benchmarks only.

It is the semantics of DESIGN.md "LabelPooling semantics" written out with the very calls the official code
makes, so it is slow and memory-hungry on purpose (``B * C * h * w * 4`` bytes). It always runs on the CPU:
with deterministic algorithms switched on, torchvision's CUDA path falls back to a pure-Python ``roi_align``
that clamps out-of-range samples instead of zeroing them, which changes boxes beyond the map.
"""

from __future__ import annotations

import torch

from relabel_shards.pooling._checks import (
    as_num_classes,
    as_output_size,
    check_data,
    check_flips,
    check_inputs,
)


def reference_label_pooling(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor,
                            num_classes: int, *, output_size: int | tuple[int, int] = 1,
                            flips: torch.Tensor | None = None, swap_xy: bool = False) -> torch.Tensor:
    """Soft targets by building the dense map: the oracle every backend is checked against.

    Args:
        values: Tensor[B, k, h, w] float16 / bfloat16 / float32 logits.
        indices: Tensor[B, k, h, w] integer class indices in ``[0, num_classes)``, distinct within a cell (as
            top-k gives; repeated indices in one cell are summed here, where the official ``scatter_`` keeps
            one).
        boxes: Tensor[B, 4] floating, normalized (x1, y1, x2, y2) of the whole image.
        num_classes: C.
        swap_xy: pass roi_align the official ``(y1, x1, y2, x2) * w - 0.5`` box instead of the correct
            ``(x1 * w, y1 * h, x2 * w, y2 * h) - 0.5``; with it the result equals the official
            ``get_relabel(get_labelmaps(...))`` bit for bit (for B > 1).
        output_size: ``oh`` or ``(oh, ow)``: roi_align's ``output_size``, one softmax per bin.
        flips: Tensor[B] bool or None: mirror image b's bins left to right (its crop was mirrored).

    Returns:
        Tensor[B, C] float32 probabilities for a 1x1 output, else Tensor[B, oh, ow, C], on the inputs'
        device (computed on the CPU).

    Raises:
        ValueError, TypeError: as :func:`relabel_shards.pooling.label_pooling`, and always for class indices
            out of range.
    """
    from torchvision.ops import roi_align

    num_classes = as_num_classes(num_classes)
    oh, ow = as_output_size(output_size)
    check_inputs(values, indices, boxes, num_classes)
    check_flips(flips, values.shape[0], values.device)
    check_data(indices, boxes, num_classes, values)
    device = values.device
    batch, _, h, w = values.shape
    v = values.detach().cpu().to(torch.float32)
    idx = indices.detach().cpu().to(torch.int64)
    b = boxes.detach().cpu().to(torch.float32)
    dense = torch.zeros(batch, num_classes, h, w, dtype=torch.float32)
    dense.scatter_add_(1, idx, v)  # (B, C, h, w)
    if swap_xy:
        coords = b[:, [1, 0, 3, 2]] * w - 0.5
    else:
        coords = b * torch.tensor([w, h, w, h], dtype=torch.float32) - 0.5
    rois = torch.cat([torch.arange(batch).view(batch, 1).float(), coords], 1)  # (B, 5)
    pooled = roi_align(dense, rois, output_size=(oh, ow), spatial_scale=1.0, sampling_ratio=-1, aligned=False)
    if oh == ow == 1:
        return torch.softmax(pooled.reshape(batch, num_classes), dim=1).to(device)
    probs = torch.softmax(pooled.permute(0, 2, 3, 1), dim=3)  # (B, oh, ow, C)
    if flips is not None:
        probs = torch.where(flips.cpu().view(batch, 1, 1, 1), probs.flip(2), probs)
    return probs.contiguous().to(device)

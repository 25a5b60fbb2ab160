"""The official ReLabel pooling, as shipped: for tests and benchmarks that compare against the original.

Behaviour of ``get_labelmaps`` and ``get_relabel`` in ``utils/relabel_functions.py`` of
naver-ai/relabel_imagenet (commit 3e19ffb, https://github.com/naver-ai/relabel_imagenet), Copyright
2021-present NAVER Corp., licensed under the Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0),
which this project also uses. Re-stated here step for step with the same tensor operations in the same order,
so the numbers are the official ones; the only changes are parameters for what the original hard-codes:

- ``num_classes`` (the original: 1000) and ``device`` (the original calls ``.cuda()``; here the default is
  CUDA where present, else the CPU, so tests run anywhere).

Behaviour kept on purpose, including its quirks:

- ``label_maps_topk`` is the per-image ``[2, k, h, w]`` record of the release (``[0]`` values, ``[1]`` class
  indices stored as floats); the dense ``[B, C, h, w]`` float32 map is filled one image at a time with
  ``scatter_`` (a repeated index in one cell keeps one value; top-k never repeats one).
- ``batch_coords`` is what the official loader makes: ``(i / H, j / W, (i + h) / H, (j + w) / W)`` of the
  random-resized crop, i.e. ``(y1, x1, y2, x2)`` normalized. It is handed to roi_align, which reads
  ``(x1, y1, x2, y2)``, and both axes are scaled by the map width ``size(3)``: the crop is pooled mirrored
  across the diagonal. ``label_pooling(..., swap_xy=True)`` with the correct ``(x1, y1, x2, y2)`` box
  reproduces this.
- ``.squeeze()`` before the softmax drops every size-1 dimension: for ``num_batches == 1`` the pooled
  ``[1, C, 1, 1]`` becomes ``[C]`` and ``softmax(dim=1)`` raises ``IndexError``. Kept, not fixed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_labelmaps(label_maps_topk: torch.Tensor | Sequence[torch.Tensor], num_batches: int,
                  num_classes: int = 1000, device: torch.device | str | None = None) -> torch.Tensor:
    """The official dense map: a zero ``[B, C, h, w]`` float32 map, a ``scatter_`` per image, then to device.

    Args:
        label_maps_topk: Tensor[B, 2, k, h, w] (or a sequence of B ``[2, k, h, w]`` tensors) of float32:
            ``[:, 0]`` top-k logits, ``[:, 1]`` their class indices (as floats, like the release files).
        num_batches: B.
        num_classes: C (the original hard-codes 1000).
        device: where the map goes (the original: ``.cuda()``); default CUDA if available, else the CPU.

    Returns:
        Tensor[B, C, h, w] float32 on ``device`` (built on the CPU, then copied, as the original does).
    """
    h, w = label_maps_topk[0].size()[2], label_maps_topk[0].size()[3]
    label_maps = torch.zeros([num_batches, num_classes, h, w])
    for dense, topk in zip(label_maps, label_maps_topk, strict=False):
        dense.scatter_(0, topk[1].long(), topk[0])  # in place on a view of label_maps
    return label_maps.to(_default_device() if device is None else device)


def get_relabel(label_maps: torch.Tensor, batch_coords: torch.Tensor, num_batches: int) -> torch.Tensor:
    """The official LabelPooling: roi_align of the ``(y1, x1, y2, x2) * w - 0.5`` box to 1x1, softmax.

    Args:
        label_maps: Tensor[B, C, h, w] float32 dense map (from :func:`get_labelmaps`).
        batch_coords: Tensor[B, 4], the official ``(y1, x1, y2, x2)`` normalized crop box (see module doc).
        num_batches: B; B == 1 raises ``IndexError`` (the ``.squeeze()`` quirk).

    Returns:
        Tensor[B, C] float32 probabilities on ``label_maps``' device.
    """
    from torchvision.ops import roi_align

    batch_index = torch.arange(num_batches).view(num_batches, 1).float().to(label_maps.device)
    rois = torch.cat([batch_index, batch_coords.float() * label_maps.size(3) - 0.5], 1)
    pooled = roi_align(input=label_maps, boxes=rois, output_size=(1, 1))
    return torch.nn.functional.softmax(pooled.squeeze(), 1)


def official_label_pooling(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor,
                           num_classes: int = 1000, device: torch.device | str | None = None) -> torch.Tensor:
    """Our batch layout through the official pipeline: stack into the release's records, then the two steps.

    Args:
        values: Tensor[B, k, h, w] logits.
        indices: Tensor[B, k, h, w] class indices.
        boxes: Tensor[B, 4] the correct normalized ``(x1, y1, x2, y2)``; reordered to the official
            ``(y1, x1, y2, x2)`` here, so the result equals ``label_pooling(..., swap_xy=True)``.
        num_classes: C.
        device: where the dense map and roi_align run (see :func:`get_labelmaps`).

    Returns:
        Tensor[B, C] float32 probabilities on ``device``.
    """
    records = torch.stack([values.float(), indices.float()], 1)  # (B, 2, k, h, w), as the .pt files hold
    dense = get_labelmaps(records, values.shape[0], num_classes, device)
    coords = boxes.float()[:, [1, 0, 3, 2]].to(dense.device)
    return get_relabel(dense, coords, values.shape[0])

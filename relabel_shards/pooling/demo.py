"""A small, self-contained LabelPooling run for the ``relabel-shards pool`` command (no data, no download)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from relabel_shards.pooling.api import label_pooling


@dataclass(frozen=True)
class PoolDemoResult:
    """What :func:`pool_demo` computed: boxes [B, 4], targets [B, C] float32, and seconds per call."""

    boxes: torch.Tensor
    targets: torch.Tensor
    seconds: float
    backend: str
    device: str


def synthetic_label_maps(batch: int, k: int, h: int, w: int, num_classes: int, seed: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k label maps with structure: each image holds two "objects" (classes), one in its left half and one
    in its right half, plus k - 1 random runner-up classes per cell.

    Returns:
        values Tensor[B, k, h, w] float16 (descending logits), indices Tensor[B, k, h, w] int16 (or int32 when
        num_classes > 32767), distinct within each cell.
    """
    g = torch.Generator().manual_seed(seed)
    objects = torch.stack([torch.randperm(num_classes, generator=g)[:2] for _ in range(batch)])  # (B, 2)
    top = torch.where(torch.arange(w) < w // 2, objects[:, :1, None], objects[:, 1:, None])  # (B, 1, w)
    top = top[:, :, None, :].expand(batch, 1, h, w)
    others = torch.rand(batch, num_classes, h, w, generator=g) if num_classes * h * w * batch <= 5e7 else None
    if others is not None:
        others.scatter_(1, top, -1.0)  # never pick the object class again
        rest = others.topk(k - 1, dim=1).indices if k > 1 else top[:, :0]
    else:  # very many classes: offsets from the object class (distinct, cheap)
        rest = (top + torch.arange(1, k).view(1, -1, 1, 1)) % num_classes
    indices = torch.cat([top, rest], 1)
    runners_up = torch.rand(batch, k - 1, h, w, generator=g) * 4
    values = torch.cat([torch.full((batch, 1, h, w), 8.0), runners_up], 1)
    values = values.sort(dim=1, descending=True).values
    index_dtype = torch.int16 if num_classes <= 32767 else torch.int32
    return values.to(torch.float16), indices.to(index_dtype)


def pool_demo(batch: int = 4, num_classes: int = 1000, k: int = 5, size: int = 15, *, swap_xy: bool = False,
              backend: str = "auto", device: str = "cpu", seed: int = 0, repeats: int = 5) -> PoolDemoResult:
    """Pool synthetic label maps for boxes over the left half, the right half, the whole image, random crops.

    Args:
        batch: number of images and boxes B, at least 1.
        num_classes: C.
        k: top-k classes per cell.
        size: the map is size x size cells.
        swap_xy: the official box order.
        backend: "auto", "torch" or "triton".
        device: "cpu" or "cuda".
        seed: seeds the maps and the random boxes.
        repeats: timed calls after one warm-up; the median is reported.

    Returns:
        A :class:`PoolDemoResult`.
    """
    if batch < 1 or k < 1 or size < 1 or repeats < 1:
        raise ValueError(f"batch, k, size and repeats must be >= 1, got {batch}, {k}, {size}, {repeats}")
    if k > num_classes:
        raise ValueError(f"k must be in [1, num_classes={num_classes}], got {k}")
    values, indices = synthetic_label_maps(batch, k, size, size, num_classes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    fixed = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    corner = torch.rand(batch, 2, generator=g) * 0.6
    boxes = torch.cat([corner, corner + 0.4], 1)
    boxes[: min(batch, 3)] = fixed[: min(batch, 3)]
    values, indices, boxes = values.to(device), indices.to(device), boxes.to(device)
    sync = torch.cuda.synchronize if values.is_cuda else (lambda: None)
    targets = label_pooling(values, indices, boxes, num_classes, swap_xy=swap_xy, backend=backend)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        targets = label_pooling(values, indices, boxes, num_classes, swap_xy=swap_xy, backend=backend)
        sync()
        times.append(time.perf_counter() - t0)
    return PoolDemoResult(boxes.cpu(), targets.cpu(), sorted(times)[len(times) // 2], backend, str(device))

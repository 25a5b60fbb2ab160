"""Argument checks shared by every LabelPooling backend: shapes, dtypes, devices, index range.

Shape, dtype and device checks read only metadata, so they cost nothing on any device. Checking that every
class index lies in ``[0, num_classes)`` and that every box is finite reads the data: free on the CPU, one
host-device synchronization on CUDA. :func:`resolve_validate` turns the user's ``validate`` argument into a
yes/no answer: by default the data checks run where they are free (CPU tensors) and are skipped on CUDA, where
out-of-range indices are then ignored (they add nothing to any class) instead of raising.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_num_classes(num_classes: object) -> int:
    """``num_classes`` as a Python int: any integer type (``int``, ``numpy.int64``, a 0-d integer tensor), not
    bool or float; ``TypeError`` otherwise. Range checks are :func:`check_inputs`'s."""
    if isinstance(num_classes, bool) or (isinstance(num_classes, torch.Tensor)
                                         and num_classes.dtype == torch.bool):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    try:
        return operator.index(num_classes)
    except TypeError:
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}") from None


def as_output_size(output_size: object) -> tuple[int, int]:
    """``output_size`` (an int or a pair ``(oh, ow)``) as ``(oh, ow)`` of positive Python ints."""
    bad = ValueError(f"output_size must be a positive int or a pair (oh, ow) of positive ints, got "
                     f"{output_size!r}")
    try:
        if isinstance(output_size, Sequence) and not isinstance(output_size, str):
            if len(output_size) != 2:
                raise bad
            oh, ow = (operator.index(x) for x in output_size)
        else:
            oh = ow = operator.index(output_size)
    except TypeError:
        raise bad from None
    if isinstance(output_size, bool) or oh < 1 or ow < 1:
        raise bad
    return int(oh), int(ow)


def check_flips(flips: torch.Tensor | None, batch: int, device: torch.device) -> None:
    """``flips`` is None or a bool Tensor[B] on the inputs' device (the loader's ``batch["flips"]``)."""
    if flips is None:
        return
    if not isinstance(flips, torch.Tensor):
        raise TypeError(f"flips must be a torch.Tensor or None, got {type(flips).__name__}")
    if flips.dtype != torch.bool:
        raise TypeError(f"flips must be a bool tensor (the loader's batch['flips']), got {flips.dtype}")
    if flips.shape != (batch,):
        raise ValueError(f"flips must have shape [B] = [{batch}], got shape {tuple(flips.shape)}")
    if flips.device != device:
        raise ValueError(f"flips must be on the values' device {device}, got {flips.device}")


def check_inputs(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, num_classes: int) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the offending argument unless the inputs fit together.

    Args:
        values: Tensor[B, k, h, w], float16 / bfloat16 / float32 (float64 accepted, pooled in float32).
        indices: Tensor[B, k, h, w], any integer dtype.
        boxes: Tensor[B, 4], floating, normalized (x1, y1, x2, y2).
        num_classes: number of classes C, at least 1.
    """
    for name, t in (("values", values), ("indices", indices), ("boxes", boxes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1 or num_classes > 2**31 - 1:
        raise ValueError(f"num_classes must be in [1, 2**31 - 1], got {num_classes}")
    if values.dim() != 4:
        raise ValueError(f"values must have shape [B, k, h, w], got shape {tuple(values.shape)}")
    if indices.shape != values.shape:
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}, "
                         f"got shape {tuple(indices.shape)}")
    batch, k, h, w = values.shape
    if k < 1 or h < 1 or w < 1:
        raise ValueError(f"values must have k, h, w >= 1, got shape {tuple(values.shape)}")
    if boxes.shape != (batch, 4):
        raise ValueError(f"boxes must have shape [B, 4] = [{batch}, 4] (one (x1, y1, x2, y2) per image), "
                         f"got shape {tuple(boxes.shape)}")
    if values.dtype not in VALUE_DTYPES:
        raise TypeError(f"values must be float16, bfloat16, float32 or float64, got {values.dtype}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    if not boxes.dtype.is_floating_point:
        raise TypeError(f"boxes must be floating point (normalized coordinates), got {boxes.dtype}")
    if not (values.device == indices.device == boxes.device):
        raise ValueError(f"values, indices and boxes must be on one device, got {values.device}, "
                         f"{indices.device} and {boxes.device}")


def resolve_validate(validate: bool | None, device: torch.device) -> bool:
    """``validate`` as given, or by default True on the CPU (free) and False elsewhere (it would sync)."""
    if validate is None:
        return device.type == "cpu"
    return bool(validate)


def check_data(indices: torch.Tensor, boxes: torch.Tensor, num_classes: int,
               values: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` if a class index is outside ``[0, num_classes)``, a box or a value is not finite.

    Reads the data: on CUDA this synchronizes with the device once.
    """
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"indices must be in [0, num_classes={num_classes}), got a class index {bad}")
    if boxes.numel() and not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"boxes must be finite, got {boxes[~torch.isfinite(boxes).all(1)][0].tolist()}")
    if values is not None and values.numel() and not bool(torch.isfinite(values).all()):
        bad = (~torch.isfinite(values)).reshape(values.shape[0], -1).any(1).nonzero()[0, 0]
        raise ValueError(f"values must be finite (label-map logits), got a non-finite value in image "
                         f"{int(bad)} of the batch")

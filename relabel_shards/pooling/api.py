"""``label_pooling`` and ``LabelPooling``: checks the arguments and picks a backend.

Backends (all agree with the dense oracle to 1e-5 on probabilities):

- ``"torch"``: the sparse PyTorch path (``torch_impl.py``), any device.
- ``"triton"``: the fused kernel (``triton_impl.py``) on CUDA tensors; on CPU tensors only under Triton's
  interpreter (``TRITON_INTERPRET=1``, for tests). Anywhere else it raises ``RuntimeError``.
- ``"auto"`` (default): the registered op ``relabel_shards::label_pooling``, whose CUDA kernel is Triton and
  whose CPU kernel is the PyTorch path.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from relabel_shards.pooling._checks import check_data, check_inputs, resolve_validate
from relabel_shards.pooling.op import label_pooling_op
from relabel_shards.pooling.torch_impl import label_pooling_torch

BACKENDS = ("auto", "torch", "triton")


def _triton_runner():
    """The Triton launcher, or a ``RuntimeError`` saying why it can not run here."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("backend='triton' needs the 'triton' package: pip install triton "
                           "(it ships with CUDA builds of torch on Linux); use backend='torch' or 'auto'")
    from relabel_shards.pooling.triton_impl import label_pooling_triton

    return label_pooling_triton


def label_pooling(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, num_classes: int, *,
                  swap_xy: bool = False, backend: str = "auto", validate: bool | None = None) -> torch.Tensor:
    """Soft targets of crop boxes from top-k label maps (ReLabel's LabelPooling), without a dense map.

    The result is ``softmax(roi_align(dense, box, output_size=1))`` over the C classes, where ``dense[b]``
    is a zero ``[C, h, w]`` map with the top-k values scattered in at their class indices, and roi_align uses
    ``aligned=False``, ``sampling_ratio=-1`` and the box ``(x1 * w - 0.5, y1 * h - 0.5, x2 * w - 0.5,
    y2 * h - 0.5)`` in map cells. Classes absent from the top-k keep logit 0 and count in the softmax.

    Args:
        values: Tensor[B, k, h, w] float16 / bfloat16 / float32 top-k logits per map cell (row-major, y then
            x).
        indices: Tensor[B, k, h, w] any integer dtype, class indices in ``[0, num_classes)``.
        boxes: Tensor[B, 4] floating, ``(x1, y1, x2, y2)`` normalized to the whole image (0 = left/top edge,
            1 = right/bottom edge); boxes may extend beyond the image.
        num_classes: C.
        swap_xy: reproduce the official ReLabel code, which passes ``(y1, x1, y2, x2)`` and scales both axes
            by w (the crop mirrored across the diagonal); the result then equals the official
            ``get_relabel(get_labelmaps(...))`` for the same crop.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module doc).
        validate: check that class indices lie in ``[0, num_classes)`` and boxes are finite, raising
            ``ValueError``. Default ``None``: check on CPU tensors (free) and not on CUDA, where the check
            would cost a host-device sync; unchecked out-of-range indices are ignored (add nothing).

    Returns:
        Tensor[B, num_classes] float32 probabilities, each row summing to 1, on the inputs' device.
        Not differentiable (soft targets).

    Raises:
        TypeError: a tensor has the wrong dtype, or num_classes is not an int.
        ValueError: shapes that do not fit ``[B, k, h, w]`` / ``[B, 4]``, an unknown backend, and (when
            validating) out-of-range class indices or non-finite boxes.
        RuntimeError: ``backend="triton"`` where the kernel can not run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(values, indices, boxes, num_classes)
    check = resolve_validate(validate, values.device)
    if backend == "auto" or (backend == "torch" and values.device.type == "cpu"):
        return label_pooling_op(values, indices, boxes, num_classes, bool(swap_xy), check)
    if check:
        check_data(indices, boxes, num_classes)
    if backend == "torch":
        return label_pooling_torch(values, indices, boxes, num_classes, bool(swap_xy), indices_checked=check)
    # backend == "triton"
    if values.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(f"backend='triton' needs CUDA tensors (got device {values.device}) or Triton's "
                           "interpreter (TRITON_INTERPRET=1 set before the kernels are imported); "
                           "use backend='torch' or 'auto'")
    return _triton_runner()(values, indices, boxes, num_classes, bool(swap_xy))


class LabelPooling(nn.Module):
    """``nn.Module`` wrapper of :func:`label_pooling`: ``forward(values, indices, boxes) -> Tensor[B, C]``.

    Args:
        num_classes: C.
        swap_xy: the official box order (see :func:`label_pooling`).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """

    def __init__(self, num_classes: int, swap_xy: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_classes = num_classes
        self.swap_xy = swap_xy
        self.backend = backend

    def forward(self, values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Soft targets Tensor[B, C] float32 for values/indices [B, k, h, w] and boxes [B, 4]."""
        return label_pooling(values, indices, boxes, self.num_classes, swap_xy=self.swap_xy,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, swap_xy={self.swap_xy}, backend={self.backend!r}"

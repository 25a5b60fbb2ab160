"""``label_pooling`` and ``LabelPooling``: checks the arguments and picks a backend.

Backends (all agree with the dense oracle to 1e-5 on probabilities):

- ``"torch"``: the sparse PyTorch path (``torch_impl.py``), any device.
- ``"triton"``: the fused kernels (``triton_impl.py``) on CUDA tensors; on CPU tensors only under Triton's
  interpreter (``TRITON_INTERPRET=1``, for tests). Anywhere else it raises ``RuntimeError``.
- ``"auto"`` (default): the registered op ``relabel_shards::label_pooling``, whose CUDA kernel is Triton and
  whose CPU kernel is the PyTorch path.

``return_sparse=True`` always runs the PyTorch path (eagerly, not through the op: its support size depends
on the data).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from relabel_shards.pooling._checks import (
    as_num_classes,
    as_output_size,
    check_data,
    check_flips,
    check_inputs,
    resolve_validate,
)
from relabel_shards.pooling.op import label_pooling_op
from relabel_shards.pooling.sparse import SparseTargets
from relabel_shards.pooling.torch_impl import label_pooling_bins_torch, label_pooling_torch

BACKENDS = ("auto", "torch", "triton")


def _triton_runner():
    """The Triton launcher, or a ``RuntimeError`` saying why it can not run here."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("backend='triton' needs the 'triton' package: pip install triton "
                           "(it ships with CUDA builds of torch on Linux); use backend='torch' or 'auto'")
    from relabel_shards.pooling.triton_impl import label_pooling_triton

    return label_pooling_triton


def label_pooling(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, num_classes: int, *,
                  output_size: int | tuple[int, int] = 1, flips: torch.Tensor | None = None,
                  swap_xy: bool = False, backend: str = "auto", validate: bool | None = None,
                  return_sparse: bool = False, out: torch.Tensor | None = None
                  ) -> torch.Tensor | SparseTargets:
    """Soft targets of crop boxes from top-k label maps (ReLabel's LabelPooling), without a dense map.

    Each output bin is ``softmax(roi_align(dense, box, output_size=(oh, ow)))`` over the C classes, where
    ``dense[b]`` is a zero ``[C, h, w]`` map with the top-k values scattered in at their class indices, and
    roi_align uses ``aligned=False``, ``sampling_ratio=-1`` and the box ``(x1 * w - 0.5, y1 * h - 0.5, x2 * w
    - 0.5, y2 * h - 0.5)`` in map cells. Classes absent from the top-k keep logit 0 and count in the softmax.
    A 1x1 output is ReLabel's target; a grid of bins is Token Labeling's per-patch targets.

    Args:
        values: Tensor[B, k, h, w] float16 / bfloat16 / float32 top-k logits per map cell (row-major, y then
            x).
        indices: Tensor[B, k, h, w] any integer dtype, class indices in ``[0, num_classes)``.
        boxes: Tensor[B, 4] floating, ``(x1, y1, x2, y2)`` normalized to the whole image (0 = left/top edge,
            1 = right/bottom edge); boxes may extend beyond the image.
        num_classes: C (any integer type, e.g. ``numpy.int64``).
        output_size: ``oh`` or ``(oh, ow)`` bins (roi_align's ``output_size``); for a ViT the patch grid.
        flips: Tensor[B] bool (the loader's ``batch["flips"]``) or None: image b's crop was mirrored, so its
            bins are mirrored left to right. A 1x1 output does not change.
        swap_xy: reproduce the official ReLabel code, which passes ``(y1, x1, y2, x2)`` and scales both axes
            by w (the crop mirrored across the diagonal); the result then equals the official
            ``get_relabel(get_labelmaps(...))`` for the same crop.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module doc).
        validate: check that class indices lie in ``[0, num_classes)`` and boxes and values are finite,
            raising ``ValueError``. Default ``None``: check on CPU tensors (free) and not on CUDA, where the
            check would cost a host-device sync. Unchecked, out-of-range indices are ignored (add nothing)
            and a box with a non-finite coordinate gives its image NaN probabilities on every backend.
        return_sparse: return :class:`SparseTargets` (each image's support classes and the pooled logits on
            them) instead of probabilities: memory ``B * bins * U`` instead of ``B * bins * C``, for
            :func:`relabel_shards.losses.soft_target_cross_entropy`. Runs the PyTorch path.
        out: optional contiguous float32 tensor of the result's shape, on the inputs' device, to write into:
            a training loop that reuses one buffer saves the operating system's first-touch cost of a fresh
            ``[B, oh, ow, C]`` result each step (on the CPU about three times the pooling itself,
            bench_pooling.py --output-size 14). Runs the backend directly, not through the registered op.

    Returns:
        float32 probabilities, Tensor[B, C] for a 1x1 output, Tensor[B, oh, ow, C] otherwise (``[b, i, j]``
        is the bin in row i from the top, column j from the left, of the crop as the model sees it), each
        bin summing to 1, on the inputs' device (``B * oh * ow * C * 4`` bytes: 205 MB for B=256, 14x14,
        C=1000). Not differentiable (soft targets). Or :class:`SparseTargets` with ``return_sparse``.

    Raises:
        TypeError: a tensor has the wrong dtype, or num_classes is not an integer.
        ValueError: shapes that do not fit ``[B, k, h, w]`` / ``[B, 4]`` / ``[B]``, a bad output_size, an
            unknown backend, and (when validating) out-of-range class indices, non-finite boxes or values.
        RuntimeError: ``backend="triton"`` where the kernel can not run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    num_classes = as_num_classes(num_classes)
    oh, ow = as_output_size(output_size)
    check_inputs(values, indices, boxes, num_classes)
    check_flips(flips, values.shape[0], values.device)
    check = resolve_validate(validate, values.device)
    swap_xy = bool(swap_xy)
    if return_sparse:
        if out is not None:
            raise ValueError("out= gives dense probabilities; it does not combine with return_sparse=True")
        if check:
            check_data(indices, boxes, num_classes, values)
        classes, logits = label_pooling_bins_torch(values, indices, boxes, num_classes, (oh, ow), swap_xy,
                                                   flips, indices_checked=check, sparse=True)
        return SparseTargets(classes, logits, num_classes)
    if out is not None:
        return _pool_into(out, values, indices, boxes, flips, num_classes, (oh, ow), swap_xy, backend, check)
    if backend == "auto" or (backend == "torch" and values.device.type == "cpu"):
        return label_pooling_op(values, indices, boxes, flips, num_classes, [oh, ow], swap_xy, check)
    if check:
        check_data(indices, boxes, num_classes, values)
    if backend == "torch":
        if oh == ow == 1:
            return label_pooling_torch(values, indices, boxes, num_classes, swap_xy, indices_checked=check)
        return label_pooling_bins_torch(values, indices, boxes, num_classes, (oh, ow), swap_xy, flips,
                                        indices_checked=check)
    # backend == "triton"
    if values.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(f"backend='triton' needs CUDA tensors (got device {values.device}) or Triton's "
                           "interpreter (TRITON_INTERPRET=1 set before the kernels are imported); "
                           "use backend='torch' or 'auto'")
    return _triton_runner()(values, indices, boxes, num_classes, swap_xy, output_size=(oh, ow), flips=flips)


def _pool_into(out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor,
               flips: torch.Tensor | None, num_classes: int, output_size: tuple[int, int], swap_xy: bool,
               backend: str, check: bool) -> torch.Tensor:
    """``label_pooling(..., out=out)``: the chosen backend writes into ``out``."""
    oh, ow = output_size
    batch = values.shape[0]
    shape = (batch, num_classes) if oh == ow == 1 else (batch, oh, ow, num_classes)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != shape \
            or not out.is_contiguous() or out.device != values.device:
        got = (f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape} on {values.device}, "
                         f"got {got}")
    if check:
        check_data(indices, boxes, num_classes, values)
    use_triton = backend == "triton" or (backend == "auto" and values.device.type == "cuda"
                                         and importlib.util.find_spec("triton") is not None)
    if use_triton:
        from relabel_shards.pooling.triton_impl import supports

        if backend == "triton" or supports(*values.shape[1:], num_classes):
            if backend == "triton" and values.device.type != "cuda" \
                    and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
                raise RuntimeError(f"backend='triton' needs CUDA tensors (got device {values.device})")
            return _triton_runner()(values, indices, boxes, num_classes, swap_xy, output_size=output_size,
                                    flips=flips, out=out)
    if oh == ow == 1:
        probs = label_pooling_torch(values, indices, boxes, num_classes, swap_xy, indices_checked=check)
        return out.copy_(probs)
    return label_pooling_bins_torch(values, indices, boxes, num_classes, output_size, swap_xy, flips,
                                    indices_checked=check, out=out)


class LabelPooling(nn.Module):
    """``nn.Module`` wrapper of :func:`label_pooling`: ``forward(values, indices, boxes, flips=None)``.

    Args:
        num_classes: C.
        output_size: ``oh`` or ``(oh, ow)``; the output is Tensor[B, C] for 1x1, else Tensor[B, oh, ow, C].
        swap_xy: the official box order (see :func:`label_pooling`).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """

    def __init__(self, num_classes: int, swap_xy: bool = False, backend: str = "auto", *,
                 output_size: int | tuple[int, int] = 1) -> None:
        super().__init__()
        try:
            num_classes = as_num_classes(num_classes)
        except TypeError:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}") from None
        if num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_classes = num_classes
        self.output_size = as_output_size(output_size)
        self.swap_xy = swap_xy
        self.backend = backend

    def forward(self, values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor,
                flips: torch.Tensor | None = None) -> torch.Tensor:
        """Soft targets float32 Tensor[B, C] (1x1) or Tensor[B, oh, ow, C] for values/indices [B, k, h, w],
        boxes [B, 4] and optional flips [B] bool."""
        return label_pooling(values, indices, boxes, self.num_classes, output_size=self.output_size,
                             flips=flips, swap_xy=self.swap_xy, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, output_size={self.output_size}, swap_xy={self.swap_xy}, "
                f"backend={self.backend!r}")

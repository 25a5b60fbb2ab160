"""The one registered op, ``relabel_shards::label_pooling``: CPU kernel = sparse PyTorch path, CUDA = Triton.

Registered with ``torch.library.custom_op`` (not ``triton_op``: that one always lowers to the Triton kernel
under ``torch.compile``, which fails on a CPU). The op is opaque to ``torch.compile`` and its fake
implementation gives the output's shape (``[B, C]`` for a 1x1 ``output_size``, else ``[B, oh, ow, C]``), so
``torch.compile(fullgraph=True)`` traces through it; the data checks (index range, finite boxes and values)
run inside the kernels, where reading the data breaks no graph.

Schema: ``label_pooling(Tensor values, Tensor indices, Tensor boxes, Tensor? flips, int num_classes,
int[] output_size, bool swap_xy, bool validate) -> Tensor``.

The CUDA kernel launches Triton when it imports and falls back to the PyTorch path otherwise (logged once).
Importing this module does not import triton.
"""

from __future__ import annotations

import logging

import torch

from relabel_shards.pooling._checks import check_data
from relabel_shards.pooling.torch_impl import label_pooling_bins_torch, label_pooling_torch

log = logging.getLogger(__name__)

OP_NAME = "relabel_shards::label_pooling"


def _torch_path(values, indices, boxes, flips, num_classes, output_size, swap_xy, checked):
    oh, ow = output_size
    if oh == 1 and ow == 1:
        return label_pooling_torch(values, indices, boxes, num_classes, swap_xy, indices_checked=checked)
    return label_pooling_bins_torch(values, indices, boxes, num_classes, (oh, ow), swap_xy, flips,
                                    indices_checked=checked)


@torch.library.custom_op(OP_NAME, mutates_args=())
def label_pooling_op(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor,
                     flips: torch.Tensor | None, num_classes: int, output_size: list[int], swap_xy: bool,
                     validate: bool) -> torch.Tensor:
    """CPU (and default) kernel: the sparse PyTorch path. Shapes are checked by the caller.

    Args:
        values: Tensor[B, k, h, w] float16 / bfloat16 / float32.
        indices: Tensor[B, k, h, w] integer.
        boxes: Tensor[B, 4] floating, normalized (x1, y1, x2, y2).
        flips: Tensor[B] bool or None: mirror the bins left to right (ignored for a 1x1 output).
        num_classes: C.
        output_size: ``[oh, ow]``.
        swap_xy: the official box order.
        validate: raise ``ValueError`` on class indices outside ``[0, C)``, non-finite boxes or values.

    Returns:
        Tensor[B, C] float32 probabilities for ``[1, 1]``, else Tensor[B, oh, ow, C].
    """
    if validate:
        check_data(indices, boxes, num_classes, values)
    return _torch_path(values, indices, boxes, flips, num_classes, output_size, swap_xy, validate)


_triton_missing_logged = False


@label_pooling_op.register_kernel("cuda")
def _label_pooling_cuda(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor,
                        flips: torch.Tensor | None, num_classes: int, output_size: list[int], swap_xy: bool,
                        validate: bool) -> torch.Tensor:
    global _triton_missing_logged
    if validate:
        check_data(indices, boxes, num_classes, values)  # one host-device sync
    try:
        from relabel_shards.pooling.triton_impl import label_pooling_triton, supports
    except ImportError as e:
        if not _triton_missing_logged:
            log.warning("triton unavailable (%s): label_pooling uses the PyTorch path on CUDA", e)
            _triton_missing_logged = True
        return _torch_path(values, indices, boxes, flips, num_classes, output_size, swap_xy, validate)
    if not supports(*values.shape[1:], num_classes):  # more classes than the kernel's keys hold
        return _torch_path(values, indices, boxes, flips, num_classes, output_size, swap_xy, validate)
    return label_pooling_triton(values, indices, boxes, num_classes, swap_xy, output_size=tuple(output_size),
                                flips=flips)


@label_pooling_op.register_fake
def _label_pooling_fake(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor,
                        flips: torch.Tensor | None, num_classes: int, output_size: list[int], swap_xy: bool,
                        validate: bool) -> torch.Tensor:
    oh, ow = output_size
    if oh == 1 and ow == 1:
        return values.new_empty(values.shape[0], num_classes, dtype=torch.float32)
    return values.new_empty(values.shape[0], oh, ow, num_classes, dtype=torch.float32)

"""The one registered op, ``relabel_shards::label_pooling``: CPU kernel = sparse PyTorch path, CUDA = Triton.

Registered with ``torch.library.custom_op`` (not ``triton_op``: that one always lowers to the Triton kernel
under ``torch.compile``, which fails on a CPU). The op is opaque to ``torch.compile`` and its fake
implementation gives the output's shape, so ``torch.compile(fullgraph=True)`` traces through it; the data
checks (index range, finite boxes) run inside the kernels, where reading the data breaks no graph.

The CUDA kernel launches Triton when it imports and falls back to the PyTorch path otherwise (logged once).
Importing this module does not import triton.
"""

from __future__ import annotations

import logging

import torch

from relabel_shards.pooling._checks import check_data
from relabel_shards.pooling.torch_impl import label_pooling_torch

log = logging.getLogger(__name__)

OP_NAME = "relabel_shards::label_pooling"


@torch.library.custom_op(OP_NAME, mutates_args=())
def label_pooling_op(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, num_classes: int,
                     swap_xy: bool, validate: bool) -> torch.Tensor:
    """CPU (and default) kernel: the sparse PyTorch path. Shapes are checked by the caller.

    Args:
        values: Tensor[B, k, h, w] float16 / bfloat16 / float32.
        indices: Tensor[B, k, h, w] integer.
        boxes: Tensor[B, 4] floating, normalized (x1, y1, x2, y2).
        num_classes: C.
        swap_xy: the official box order.
        validate: raise ``ValueError`` on class indices outside ``[0, C)`` or non-finite boxes.

    Returns:
        Tensor[B, C] float32 probabilities.
    """
    if validate:
        check_data(indices, boxes, num_classes)
    return label_pooling_torch(values, indices, boxes, num_classes, swap_xy, indices_checked=validate)


_triton_missing_logged = False


@label_pooling_op.register_kernel("cuda")
def _label_pooling_cuda(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, num_classes: int,
                        swap_xy: bool, validate: bool) -> torch.Tensor:
    global _triton_missing_logged
    if validate:
        check_data(indices, boxes, num_classes)  # one host-device sync
    try:
        from relabel_shards.pooling.triton_impl import label_pooling_triton, supports
    except ImportError as e:
        if not _triton_missing_logged:
            log.warning("triton unavailable (%s): label_pooling uses the PyTorch path on CUDA", e)
            _triton_missing_logged = True
        return label_pooling_torch(values, indices, boxes, num_classes, swap_xy)
    if not supports(*values.shape[1:], num_classes):  # more classes than the kernel's keys hold
        return label_pooling_torch(values, indices, boxes, num_classes, swap_xy, indices_checked=validate)
    return label_pooling_triton(values, indices, boxes, num_classes, swap_xy)


@label_pooling_op.register_fake
def _label_pooling_fake(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, num_classes: int,
                        swap_xy: bool, validate: bool) -> torch.Tensor:
    return values.new_empty(values.shape[0], num_classes, dtype=torch.float32)

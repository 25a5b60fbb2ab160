"""``SparseTargets``: pooled soft targets kept on their support, for losses that never build ``[.., C]``.

ReLabel-style targets give every class outside a bin's top-k support the same logit 0, so a bin's target is
fully described by the classes on its support and their pooled logits. ``label_pooling(...,
return_sparse=True)`` returns this form; :func:`relabel_shards.losses.soft_target_cross_entropy` takes it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SparseTargets(NamedTuple):
    """Soft targets on their support: logit ``logits[b, ..., u]`` for class ``classes[b, u]``, 0 elsewhere.

    Attributes:
        classes: Tensor[B, U] int64: each image's support classes (the distinct classes of its label map),
            shared by all its bins; ``-1`` marks an unused slot. U is the largest support in the batch.
        logits: Tensor[B, U] (a 1x1 target) or Tensor[B, oh, ow, U] (a grid of bins) float32: the pooled
            logits (roi_align of the top-k map, before the softmax); 0 on unused slots. A slot with logit 0
            counts exactly like an absent class, so a class may sit in several slots if at most one of them
            has a non-zero logit.
        num_classes: C; the target of a bin is ``softmax`` over all C classes of these logits and zeros.
    """

    classes: torch.Tensor
    logits: torch.Tensor
    num_classes: int

    def probs(self) -> torch.Tensor:
        """The dense targets: Tensor[B, C] or Tensor[B, oh, ow, C] float32 (memory ``B * bins * C * 4``)."""
        from relabel_shards.pooling.torch_impl import densify

        one = self.logits.dim() == 2
        logits = self.logits[:, None, None] if one else self.logits
        out = densify(self.classes, logits, self.num_classes)
        return out.view(out.shape[0], self.num_classes) if one else out

    def index_select(self, order: torch.Tensor) -> SparseTargets:
        """The targets of the images ``order`` (Tensor[B'] int64), e.g. a CutMix permutation."""
        return SparseTargets(self.classes[order], self.logits[order], self.num_classes)

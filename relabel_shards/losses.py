"""Soft-target cross-entropy for ReLabel and Token Labeling targets, without dense targets.

ReLabel-style targets give every class outside a bin's top-k support S the same logit 0. With the pooled
logits z on S, ``m = max(max_S z, 0)``, ``Z = sum_S exp(z - m) + (C - |S|) exp(-m)``, each support class
has target ``p = exp(z - m) / Z`` and every other class ``t0 = exp(-m) / Z``. For model logits y with
log-probabilities ``l = y - logsumexp(y)`` the cross-entropy is

    -sum_c t_c l_c = -t0 * (sum(y) - C * logsumexp(y)) - sum_S (p - t0) * l_S

(DESIGN.md "LabelPooling semantics": the same closed form, regrouped). It needs the model's logsumexp and sum
per bin and the log-probabilities on S only, so the targets stay ``[B, bins, U]`` (U: the support, a few dozen
classes) instead of ``[B, bins, C]``. The gradient is ``softmax(y) - t``, written in chunks of images straight
into the gradient buffer, so forward and backward together hold one tensor of the logits' size.
"""

from __future__ import annotations

import torch

from relabel_shards.pooling.sparse import SparseTargets

REDUCTIONS = ("mean", "sum", "none")

# elements of one chunk's float32 temporaries (about 8 MB); the chunks only bound memory
_CHUNK_ELEMENTS = 1 << 21


def _target_parts(target: SparseTargets, bins: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(classes Tensor[B, 1, U] clamped to >= 0, delta = p - t0 Tensor[B, bins, U] (0 on unused slots),
    t0 Tensor[B, bins]) of sparse targets, in ``dtype``."""
    classes, logits, c = target.classes, target.logits.to(dtype), target.num_classes
    batch, slots = classes.shape
    z = logits.reshape(batch, bins, slots)
    valid = (classes >= 0)[:, None, :]  # (B, 1, U)
    count = valid.sum(-1).to(dtype)  # (B, 1)
    zm = z.masked_fill(~valid, float("-inf"))
    m = zm.amax(-1) if slots else torch.zeros(batch, bins, dtype=dtype, device=z.device)
    m = torch.where(count < c, torch.clamp_min(m, 0.0), m)
    e = torch.exp(zm - m[..., None])
    t0 = torch.exp(-m)
    total = e.sum(-1) + (c - count) * t0
    t0 = t0 / total
    delta = (e / total[..., None] - t0[..., None]).masked_fill(~valid, 0.0)
    return classes.clamp_min(0)[:, None, :], delta, t0


class _SparseSoftCE(torch.autograd.Function):
    """Per-bin losses Tensor[B, bins] of logits [B, bins, C] against (classes, delta, t0)."""

    @staticmethod
    def forward(ctx, y, classes, delta, t0, num_classes):  # noqa: D102
        batch, bins, c = y.shape
        work = torch.float64 if y.dtype == torch.float64 else torch.float32
        lse = torch.empty(batch, bins, dtype=work, device=y.device)
        loss = torch.empty(batch, bins, dtype=work, device=y.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, bins * c))
        for b0 in range(0, batch, step):
            sl = slice(b0, b0 + step)
            yc = y[sl].to(work)  # (n, bins, C): a copy only where y is not already in the working dtype
            lse_c = torch.logsumexp(yc, dim=-1)  # (n, bins)
            sum_all = yc.sum(-1, dtype=torch.float64) - num_classes * lse_c.to(torch.float64)  # sum_c l_c
            l_support = torch.gather(yc, 2, classes[sl].expand(-1, bins, -1)) - lse_c[..., None]  # (n,bins,U)
            loss[sl] = (-t0[sl].to(torch.float64) * sum_all).to(work) - (delta[sl] * l_support).sum(-1)
            lse[sl] = lse_c
        ctx.save_for_backward(y, classes, delta, t0, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        y, classes, delta, t0, lse = ctx.saved_tensors
        batch, bins, c = y.shape
        out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, bins * c))
        for b0 in range(0, batch, step):
            sl = slice(b0, b0 + step)
            g = torch.exp(y[sl].to(lse.dtype) - lse[sl][..., None])  # softmax(y)
            g.sub_(t0[sl][..., None])  # minus the target, absent classes ...
            g.scatter_add_(2, classes[sl].expand(-1, bins, -1), -delta[sl])  # ... and the support's excess
            g.mul_(grad[sl][..., None].to(g.dtype))
            out[sl] = g
        return out, None, None, None, None


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor | SparseTargets, *,
                              reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy ``-sum_c t_c log_softmax(logits)_c`` per bin, against dense or sparse soft targets.

    Args:
        logits: the model's logits, Tensor[B, C] (one target per image) or Tensor[B, oh, ow, C] (one per
            token, channels last), any float dtype (computed in float32; float64 stays float64).
        target: dense probabilities of the same shape (``label_pooling(...)``), or :class:`SparseTargets`
            (``label_pooling(..., return_sparse=True)``) with logits ``[B, U]`` / ``[B, oh, ow, U]``: then no
            ``[.., C]`` target is ever built (the closed form in the module doc).
        reduction: ``"mean"`` over all bins (images, or images x tokens), ``"sum"``, or ``"none"`` (Tensor[B]
            or Tensor[B, oh, ow]).

    Returns:
        The loss, float32 (float64 for float64 logits), differentiable in ``logits`` (not in the targets).

    Raises:
        ValueError: shapes that do not fit, or an unknown reduction.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() not in (2, 4):
        raise ValueError(f"logits must be [B, C] or [B, oh, ow, C], got shape {tuple(logits.shape)}")
    batch, c = logits.shape[0], logits.shape[-1]
    bins_shape = logits.shape[1:-1]
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if isinstance(target, SparseTargets):
        if target.num_classes != c:
            raise ValueError(f"the targets have num_classes={target.num_classes}, the logits {c} classes")
        want = (batch, *bins_shape, target.classes.shape[1])
        if tuple(target.logits.shape) != want or target.classes.shape[0] != batch:
            raise ValueError(f"sparse target logits must have shape {want} for logits of shape "
                             f"{tuple(logits.shape)}, got {tuple(target.logits.shape)}")
        bins = 1
        for n in bins_shape:
            bins *= n
        classes, delta, t0 = _target_parts(target, bins, work)
        per_bin = _SparseSoftCE.apply(logits.reshape(batch, bins, c), classes, delta, t0, c)
        per_bin = per_bin.reshape(batch, *bins_shape)
    else:
        if target.shape != logits.shape:
            raise ValueError(f"dense targets must have the logits' shape {tuple(logits.shape)}, got "
                             f"{tuple(target.shape)}")
        per_bin = torch.sum(-target.to(work) * torch.log_softmax(logits.to(work), dim=-1), dim=-1)
    if reduction == "mean":
        return per_bin.mean()
    if reduction == "sum":
        return per_bin.sum()
    return per_bin


def token_labeling_loss(cls_logits: torch.Tensor, cls_target: torch.Tensor | SparseTargets,
                        token_logits: torch.Tensor, token_target: torch.Tensor | SparseTargets,
                        beta: float = 0.5) -> torch.Tensor:
    """Token Labeling's loss (LV-ViT): the class-token soft CE plus ``beta`` times the mean token soft CE.

    Args:
        cls_logits: Tensor[B, C]; cls_target: its 1x1 targets (dense [B, C] or sparse).
        token_logits: Tensor[B, oh, ow, C]; token_target: the ``output_size=(oh, ow)`` targets.
        beta: the token term's weight (0.5 in LV-ViT).
    """
    return (soft_target_cross_entropy(cls_logits, cls_target)
            + beta * soft_target_cross_entropy(token_logits, token_target))

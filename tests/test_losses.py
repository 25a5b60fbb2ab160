"""relabel_shards.losses: the closed-form soft-target CE against the dense computation, its gradient."""

from __future__ import annotations

import pytest
import torch
from test_pooling import make_inputs

from relabel_shards.losses import soft_target_cross_entropy, token_labeling_loss
from relabel_shards.pooling import SparseTargets, label_pooling


def _dense_ce(logits, target):
    return torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1)


@pytest.mark.parametrize("output_size", [1, 7, (3, 5)])
def test_sparse_equals_dense(output_size):
    values, indices, boxes = make_inputs(24, 5, 15, 15, 200, seed=1)
    flips = torch.arange(24) % 2 == 0
    dense = label_pooling(values, indices, boxes, 200, output_size=output_size, flips=flips)
    sparse = label_pooling(values, indices, boxes, 200, output_size=output_size, flips=flips,
                           return_sparse=True)
    logits = torch.randn(*dense.shape, generator=torch.Generator().manual_seed(2)) * 3
    want = _dense_ce(logits, dense)
    got = soft_target_cross_entropy(logits, sparse, reduction="none")
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(soft_target_cross_entropy(logits, sparse), want.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(soft_target_cross_entropy(logits, dense), want.mean(), atol=1e-6, rtol=0)
    # the gradient in the logits: softmax(y) - t, the same as autograd through the dense computation
    a = logits.clone().requires_grad_(True)
    soft_target_cross_entropy(a, sparse, reduction="sum").backward()
    b = logits.clone().requires_grad_(True)
    _dense_ce(b, dense).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


def test_large_logits_and_all_classes_present():
    # target logits far from 0 (exp overflows float32 without the max shift), and C = |S|: no absent class
    classes = torch.tensor([[0, 1, 2], [2, 0, -1]])
    tl = torch.tensor([[300.0, 290.0, -50.0], [-400.0, -390.0, 0.0]])
    sp = SparseTargets(classes, tl, 3)
    dense = sp.probs()
    torch.testing.assert_close(dense.sum(1), torch.ones(2))
    assert dense[0, 0] > 0.99 and dense[1, 1] > 0.99  # class 1 is absent from image 1: its logit 0 wins
    y = torch.randn(2, 3) * 50
    torch.testing.assert_close(soft_target_cross_entropy(y, sp, reduction="none"), _dense_ce(y, dense),
                               atol=1e-4, rtol=1e-6)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    classes = torch.tensor([[4, 0, 7, -1], [1, 2, 9, 5]])
    tl = torch.randn(2, 3, 2, 4, generator=g, dtype=torch.float64) * 2
    tl[0, ..., 3] = 0.0  # the unused slot holds 0
    sp = SparseTargets(classes, tl, 11)
    y = torch.randn(2, 3, 2, 11, generator=g, dtype=torch.float64, requires_grad=True)
    assert soft_target_cross_entropy(y, sp).dtype == torch.float64
    torch.autograd.gradcheck(lambda y: soft_target_cross_entropy(y, sp, reduction="none"), (y,))
    y1 = torch.randn(2, 11, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda y: soft_target_cross_entropy(y, SparseTargets(classes, tl[:, 0, 0], 11)),
                             (y1,))


def test_zero_logit_duplicates_mix_tokens():
    # MixToken concatenates two images' supports and zeroes the slots of the image a token did not come from:
    # a class in both supports then sits in two slots, one of them 0, which counts as absent.
    a = SparseTargets(torch.tensor([[1, 3, 5]]), torch.tensor([[2.0, 1.0, 0.5]]), 8)
    b = SparseTargets(torch.tensor([[3, 6, -1]]), torch.tensor([[4.0, -1.0, 0.0]]), 8)
    mixed = SparseTargets(torch.cat([a.classes, b.classes], 1),
                          torch.cat([torch.zeros(1, 3), b.logits], 1), 8)  # this token came from b
    torch.testing.assert_close(mixed.probs(), b.probs(), atol=1e-7, rtol=0)
    y = torch.randn(1, 8)
    torch.testing.assert_close(soft_target_cross_entropy(y, mixed), soft_target_cross_entropy(y, b.probs()),
                               atol=1e-6, rtol=0)


def test_bfloat16_logits_and_non_contiguous():
    values, indices, boxes = make_inputs(6, 3, 6, 6, 40, seed=4)
    sp = label_pooling(values, indices, boxes, 40, output_size=4, return_sparse=True)
    y = torch.randn(6, 40, 4, 4).permute(0, 2, 3, 1)  # a CNN head's [B, C, h, w] seen channels last
    assert not y.is_contiguous()
    want = _dense_ce(y, sp.probs()).mean()
    torch.testing.assert_close(soft_target_cross_entropy(y, sp), want, atol=1e-5, rtol=0)
    yb = y.to(torch.bfloat16).requires_grad_(True)
    loss = soft_target_cross_entropy(yb, sp)
    assert loss.dtype == torch.float32
    loss.backward()
    assert yb.grad.dtype == torch.bfloat16 and yb.grad.shape == y.shape


def test_token_labeling_loss():
    values, indices, boxes = make_inputs(4, 3, 6, 6, 30, seed=5)
    cls_t = label_pooling(values, indices, boxes, 30)
    tok_t = label_pooling(values, indices, boxes, 30, output_size=2, return_sparse=True)
    cls_y, tok_y = torch.randn(4, 30), torch.randn(4, 2, 2, 30)
    want = _dense_ce(cls_y, cls_t).mean() + 0.5 * _dense_ce(tok_y, tok_t.probs()).mean()
    torch.testing.assert_close(token_labeling_loss(cls_y, cls_t, tok_y, tok_t), want, atol=1e-5, rtol=0)


def test_errors():
    sp = SparseTargets(torch.tensor([[1, 2]]), torch.zeros(1, 2), 5)
    with pytest.raises(ValueError, match="the targets have num_classes=5, the logits 6 classes"):
        soft_target_cross_entropy(torch.zeros(1, 6), sp)
    with pytest.raises(ValueError, match=r"sparse target logits must have shape \(1, 2, 2, 2\)"):
        soft_target_cross_entropy(torch.zeros(1, 2, 2, 5), sp)
    with pytest.raises(ValueError, match=r"dense targets must have the logits' shape \(1, 5\)"):
        soft_target_cross_entropy(torch.zeros(1, 5), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        soft_target_cross_entropy(torch.zeros(1, 5), sp, reduction="avg")

"""LabelPooling with ``output_size`` above 1x1 (Token Labeling), flips, sparse targets, the hardened checks:
every backend against torchvision's roi_align on the dense map (the oracle) at 1x1, 7x7, 14x14 and
non-square grids, on square and non-square maps, for the edge-case boxes of test_pooling.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pooling import EDGE_BOXES, TOL, make_inputs

from relabel_shards.pooling import LabelPooling, SparseTargets, label_pooling, reference_label_pooling

SHAPES = [(16, 5, 15, 15, 300), (40, 3, 7, 14, 50), (24, 2, 9, 4, 30), (12, 1, 1, 1, 5), (12, 5, 2, 3, 5)]


def _flips(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, generator=torch.Generator().manual_seed(seed)) < 0.5


@pytest.mark.parametrize("output_size", [1, 7, 14, (3, 5), (14, 1)])
@pytest.mark.parametrize("shape", SHAPES)
def test_bins_match_torchvision(shape, output_size):
    batch, k, h, w, c = shape
    values, indices, boxes = make_inputs(batch, k, h, w, c, seed=sum(shape))
    assert torch.equal(boxes[:12], torch.tensor(EDGE_BOXES))  # every edge case of the 1x1 tests
    flips = _flips(batch)
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    for swap_xy in (False, True):
        want = reference_label_pooling(values, indices, boxes, c, output_size=output_size, flips=flips,
                                       swap_xy=swap_xy)
        assert want.shape == ((batch, c) if oh == ow == 1 else (batch, oh, ow, c))
        for backend in ("auto", "torch"):
            got = label_pooling(values, indices, boxes, c, output_size=output_size, flips=flips,
                                swap_xy=swap_xy, backend=backend)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=f"{backend} swap_xy={swap_xy}")
        sparse = label_pooling(values, indices, boxes, c, output_size=output_size, flips=flips,
                               swap_xy=swap_xy, return_sparse=True)
        torch.testing.assert_close(sparse.probs(), want, atol=TOL, rtol=0, msg=f"sparse swap_xy={swap_xy}")


@pytest.mark.parametrize("output_size", [7, 14, (3, 5)])
def test_bins_each_edge_box_alone(output_size):
    # On the CPU the sample window per bin is sized by the batch's largest samples-per-bin count: alone, each
    # edge box gets its own tight window (1 sample per bin for small boxes, many for the huge one).
    values, indices, boxes = make_inputs(12, 5, 15, 15, 300, seed=5)
    for b in range(12):
        sl = slice(b, b + 1)
        want = reference_label_pooling(values[sl], indices[sl], boxes[sl], 300, output_size=output_size)
        got = label_pooling(values[sl], indices[sl], boxes[sl], 300, output_size=output_size, backend="torch")
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=f"box {EDGE_BOXES[b]}")


def test_reference_is_torchvision_roi_align_per_bin():
    # The oracle itself, written out once more: dense map, roi_align(output_size=(oh, ow)), softmax over C.
    from torchvision.ops import roi_align

    values, indices, boxes = make_inputs(12, 3, 7, 14, 50, seed=1)
    dense = torch.zeros(12, 50, 7, 14).scatter_add_(1, indices, values)
    rois = torch.cat([torch.arange(12.0)[:, None], boxes * torch.tensor([14.0, 7, 14, 7]) - 0.5], 1)
    want = torch.softmax(roi_align(dense, rois, (7, 3), 1.0, -1, False), dim=1).permute(0, 2, 3, 1)
    got = reference_label_pooling(values, indices, boxes, 50, output_size=(7, 3))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # softmax along another axis: last-bit rounding


def test_one_by_one_grid_equals_relabel_target_and_ignores_flips():
    values, indices, boxes = make_inputs(24, 5, 15, 15, 100, seed=2)
    plain = label_pooling(values, indices, boxes, 100)
    got = label_pooling(values, indices, boxes, 100, output_size=(1, 1), flips=_flips(24))
    torch.testing.assert_close(got, plain, atol=0, rtol=0)
    sparse = label_pooling(values, indices, boxes, 100, return_sparse=True)
    assert sparse.logits.shape == sparse.classes.shape  # [B, U] for a 1x1 target
    torch.testing.assert_close(sparse.probs(), plain, atol=TOL, rtol=0)


def test_flips_mirror_the_crop():
    # A crop that was mirrored sees the map mirrored: pooling the mirrored map with the mirrored box gives the
    # flipped result, for boxes whose bins are at least one cell wide (narrower ones are stretched to one cell
    # to the right of x1 by roi_align, which mirroring does not preserve).
    values, indices, boxes = make_inputs(150, 5, 15, 15, 100, seed=5)
    wide = (boxes[:, 2] - boxes[:, 0]) * 15 >= 7.01
    values, indices, boxes = values[wide], indices[wide], boxes[wide]
    assert len(boxes) > 10
    mirrored = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
    flips = torch.ones(len(boxes), dtype=torch.bool)
    got = label_pooling(values, indices, boxes, 100, output_size=7, flips=flips)
    want = label_pooling(values.flip(3), indices.flip(3), mirrored, 100, output_size=7)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    unflipped = label_pooling(values, indices, boxes, 100, output_size=7)
    assert (unflipped - want).abs().max() > 1e-2  # the flip matters
    torch.testing.assert_close(got, unflipped.flip(2), atol=1e-6, rtol=0)


def test_sparse_targets_are_small_and_exact():
    values, indices, boxes = make_inputs(16, 5, 15, 15, 1000, seed=6, palette=24)
    sp = label_pooling(values, indices, boxes, 1000, output_size=14, return_sparse=True)
    assert isinstance(sp, SparseTargets) and sp.num_classes == 1000
    assert sp.classes.shape == (16, 24) and sp.logits.shape == (16, 14, 14, 24)
    for b in range(16):  # each image's support: its distinct classes, once each
        assert sorted(sp.classes[b].tolist()) == sorted(set(indices[b].flatten().tolist()))
    dense = torch.zeros(16, 1000, 15, 15).scatter_add_(1, indices, values)
    from torchvision.ops import roi_align

    rois = torch.cat([torch.arange(16.0)[:, None], boxes * 15 - 0.5], 1)
    pooled = roi_align(dense, rois, (14, 14), 1.0, -1, False).permute(0, 2, 3, 1)  # (B, 14, 14, C) logits
    want = torch.gather(pooled, 3, sp.classes[:, None, None, :].expand(-1, 14, 14, -1))
    torch.testing.assert_close(sp.logits, want, atol=TOL, rtol=0)
    perm = torch.tensor([3, 1])
    sub = sp.index_select(perm)
    assert torch.equal(sub.classes, sp.classes[perm]) and torch.equal(sub.logits, sp.logits[perm])


def test_module_output_size():
    values, indices, boxes = make_inputs(8, 5, 15, 15, 100, seed=21)
    mod = LabelPooling(np.int64(100), output_size=(14, 14))
    flips = _flips(8)
    torch.testing.assert_close(mod(values, indices, boxes, flips),
                               label_pooling(values, indices, boxes, 100, output_size=14, flips=flips),
                               atol=0, rtol=0)
    assert "output_size=(14, 14)" in repr(mod)


def test_numpy_integer_num_classes():
    # issue 13: num_classes=np.int64(50) works (and a 0-d integer tensor), everywhere num_classes is taken
    values, indices, boxes = make_inputs(4, 2, 3, 3, 50, seed=8)
    want = label_pooling(values, indices, boxes, 50)
    for c in (np.int64(50), np.int32(50), torch.tensor(50)):
        torch.testing.assert_close(label_pooling(values, indices, boxes, c), want, atol=0, rtol=0)
        torch.testing.assert_close(reference_label_pooling(values, indices, boxes, c), want, atol=TOL, rtol=0)
    with pytest.raises(TypeError, match="num_classes must be an int, got bool"):
        label_pooling(values, indices, boxes, True)
    with pytest.raises(TypeError, match="num_classes must be an int, got float64"):
        label_pooling(values, indices, boxes, np.float64(50))


@pytest.mark.parametrize("bad", [0, -3, (2, 0), (1, 2, 3), "7", 2.5, True])
def test_bad_output_size(bad):
    values, indices, boxes = make_inputs(2, 2, 3, 3, 10)
    with pytest.raises(ValueError, match=r"output_size must be a positive int or a pair \(oh, ow\) of "
                                         r"positive ints, got"):
        label_pooling(values, indices, boxes, 10, output_size=bad)


def test_bad_flips():
    values, indices, boxes = make_inputs(2, 2, 3, 3, 10)
    with pytest.raises(TypeError, match=r"flips must be a bool tensor .*got torch.int64"):
        label_pooling(values, indices, boxes, 10, output_size=2, flips=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"flips must have shape \[B\] = \[2\], got shape \(3,\)"):
        label_pooling(values, indices, boxes, 10, output_size=2, flips=torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------ non-finite inputs (issues 12 and 13)


@pytest.mark.parametrize("output_size", [1, 4])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_non_finite_boxes_give_nan_rows_when_unvalidated(backend, output_size):
    # One behaviour on every backend (Triton: test_pooling_triton.py): a box with a NaN or infinite coordinate
    # gives its image NaN probabilities, loud in any loss; the other images are untouched.
    values, indices, boxes = make_inputs(5, 3, 6, 6, 20, seed=9)
    bad = boxes.clone()
    bad[1, 0] = float("nan")
    bad[2, 3] = float("inf")
    bad[3, 1] = float("-inf")
    got = label_pooling(values, indices, bad, 20, output_size=output_size, validate=False, backend=backend)
    rows = got.reshape(5, -1)
    assert rows[1:4].isnan().all()
    good = [0, 4]
    want = reference_label_pooling(values[good], indices[good], boxes[good], 20, output_size=output_size)
    torch.testing.assert_close(got[good], want, atol=TOL, rtol=0)
    sparse = label_pooling(values, indices, bad, 20, output_size=output_size, validate=False,
                           return_sparse=True)
    assert sparse.probs().reshape(5, -1)[1:4].isnan().all()
    with pytest.raises(ValueError, match=r"boxes must be finite, got \[.*nan"):
        label_pooling(values, indices, bad, 20, output_size=output_size, validate=True, backend=backend)


@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
def test_validation_rejects_non_finite_values(bad_value):
    # issue 13: a record whose values decode to +-inf must not become NaN targets silently
    values, indices, boxes = make_inputs(4, 3, 5, 5, 20, seed=10)
    values[2, 1, 3, 4] = bad_value
    for kwargs in ({}, {"output_size": 3}, {"return_sparse": True}):
        with pytest.raises(ValueError, match=r"values must be finite .*non-finite value in image 2 of the "):
            label_pooling(values, indices, boxes, 20, **kwargs)  # validation is on by default on the CPU
    with pytest.raises(ValueError, match=r"values must be finite"):
        reference_label_pooling(values, indices, boxes, 20)
    want = reference_label_pooling(values[:2], indices[:2], boxes[:2], 20)
    torch.testing.assert_close(label_pooling(values[:2], indices[:2], boxes[:2], 20, validate=True), want,
                               atol=TOL, rtol=0)


def test_unvalidated_out_of_range_indices_add_nothing_in_bins():
    values, indices, boxes = make_inputs(6, 3, 5, 7, 10, seed=11)
    bad = indices.clone()
    bad[:, 0, 1:3] = 10_000
    bad[:, 1, 0] = -5
    gone = bad != indices
    want = reference_label_pooling(values.masked_fill(gone, 0.0), indices, boxes, 10, output_size=(4, 3))
    for backend in ("auto", "torch"):
        got = label_pooling(values, bad, boxes, 10, output_size=(4, 3), validate=False, backend=backend)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_memory_does_not_grow_with_the_batch():
    # The bins path works in chunks of images: its temporaries stay bounded while B grows 8x.
    from relabel_shards.pooling.torch_impl import _chunk_size

    n = 5 * 15 * 15
    assert _chunk_size(2048, n, 14, 14, 15, 15) == _chunk_size(256, n, 14, 14, 15, 15) < 64


@pytest.mark.cuda
@pytest.mark.parametrize("output_size", [7, 14, (3, 5)])
def test_cuda_bins_match_oracle(output_size):
    values, indices, boxes = make_inputs(512, 5, 15, 15, 1000, seed=31, value_dtype=torch.float16,
                                         index_dtype=torch.int16)
    flips = _flips(512)
    v, i, b, f = values.cuda(), indices.cuda(), boxes.cuda(), flips.cuda()
    for swap_xy in (False, True):
        want = reference_label_pooling(values, indices, boxes, 1000, output_size=output_size, flips=flips,
                                       swap_xy=swap_xy)
        for backend in ("auto", "torch", "triton"):
            got = label_pooling(v, i, b, 1000, output_size=output_size, flips=f, swap_xy=swap_xy,
                                backend=backend)
            torch.testing.assert_close(got.cpu(), want, atol=TOL, rtol=0, msg=f"{backend} swap_xy={swap_xy}")
    compiled = torch.compile(lambda v, i, b, f: label_pooling(v, i, b, 1000, output_size=output_size,
                                                              flips=f), fullgraph=True)
    torch.testing.assert_close(compiled(v, i, b, f).cpu(), reference_label_pooling(
        values, indices, boxes, 1000, output_size=output_size, flips=flips), atol=TOL, rtol=0)


def test_out_buffer():
    values, indices, boxes = make_inputs(12, 3, 6, 7, 40, seed=12)
    flips = _flips(12)
    for output_size, shape in ((1, (12, 40)), ((3, 4), (12, 3, 4, 40))):
        want = label_pooling(values, indices, boxes, 40, output_size=output_size, flips=flips)
        for backend in ("auto", "torch"):
            buf = torch.full(shape, -1.0)
            got = label_pooling(values, indices, boxes, 40, output_size=output_size, flips=flips, out=buf,
                                backend=backend)
            assert got.data_ptr() == buf.data_ptr()
            torch.testing.assert_close(buf, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 tensor of shape \(12, 3, 4, 40\) "
                                         r"on cpu, got torch.float32 \(12, 40\)"):
        label_pooling(values, indices, boxes, 40, output_size=(3, 4), out=torch.empty(12, 40))
    with pytest.raises(ValueError, match="does not combine with return_sparse"):
        label_pooling(values, indices, boxes, 40, return_sparse=True, out=torch.empty(12, 40))


@pytest.mark.parametrize("shape", [(12, 5, 2, 3, 5), (16, 3, 7, 14, 50), (12, 2, 5, 6, 9000)])
def test_sort_path_for_many_classes(monkeypatch, shape):
    # Above _PRESENCE_MAX_CLASSES the distinct classes come from a sort; force it on small C too (every class
    # present in some images, unused slots padded with each image's first absent class).
    from relabel_shards.pooling import torch_impl

    batch, k, h, w, c = shape
    values, indices, boxes = make_inputs(batch, k, h, w, c, seed=c)
    flips = _flips(batch)
    want = reference_label_pooling(values, indices, boxes, c, output_size=(3, 4), flips=flips)
    got_presence = label_pooling(values, indices, boxes, c, output_size=(3, 4), flips=flips)
    monkeypatch.setattr(torch_impl, "_PRESENCE_MAX_CLASSES", 0)
    got_sort = label_pooling(values, indices, boxes, c, output_size=(3, 4), flips=flips)
    sparse = label_pooling(values, indices, boxes, c, output_size=(3, 4), flips=flips, return_sparse=True)
    for got in (got_presence, got_sort, sparse.probs()):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)

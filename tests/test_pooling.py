"""LabelPooling (relabel_shards.pooling): the sparse PyTorch path and the op against the dense roi_align
oracle, the official code's box order, argument errors, torch.library.opcheck and torch.compile. CUDA cases
skip themselves without a GPU (benchmarks/gpu_check.sh runs them on one)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relabel_shards.pooling import LabelPooling, label_pooling, official, reference_label_pooling

TOL = 1e-5

# Boxes in normalized (x1, y1, x2, y2) that exercise every branch of roi_align's sampling.
EDGE_BOXES = [
    [0.0, 0.0, 1.0, 1.0],  # the whole image
    [0.0, 0.3, 0.5, 1.0],  # touching the left and bottom borders
    [-0.2, 0.5, 0.4, 1.3],  # crossing two borders
    [1.1, 1.2, 1.5, 1.9],  # wholly beyond the bottom-right corner: samples beyond the map add nothing
    [-0.9, -0.9, -0.1, -0.05],  # wholly beyond the top-left corner
    [-0.03, -0.03, 0.02, 0.02],  # samples in [-1, 0] cells: clamped onto the first cell
    [0.97, 0.96, 1.03, 1.04],  # samples in [h-1, h] cells: the last-cell rule
    [0.5, 0.5, 0.52, 0.51],  # smaller than a cell: one sample per axis
    [0.3, 0.3, 0.3, 0.3],  # zero size
    [0.8, 0.7, 0.2, 0.1],  # inverted: roi clamped to one cell
    [-2.0, -3.0, 4.0, 5.0],  # much larger than the map
    [0.123, 0.456, 0.789, 0.912],
]


def make_inputs(batch: int, k: int, h: int, w: int, num_classes: int, *, seed: int = 0,
                value_dtype: torch.dtype = torch.float32, index_dtype: torch.dtype = torch.int64,
                palette: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k maps like an annotator's: k distinct classes per cell drawn from a per-image palette (so classes
    recur across cells and their contributions add up), descending logits, EDGE_BOXES then random boxes."""
    g = torch.Generator().manual_seed(seed)
    palette = min(palette, num_classes)
    assert palette >= k
    pal = torch.stack([torch.randperm(num_classes, generator=g)[:palette] for _ in range(batch)])  # (B, P)
    slot = torch.rand(batch, palette, h, w, generator=g).topk(k, dim=1).indices  # (B, k, h, w), distinct
    indices = torch.gather(pal[:, :, None, None].expand(-1, -1, h, w), 1, slot)
    values = torch.randn(batch, k, h, w, generator=g).mul(3.0).sort(dim=1, descending=True).values + 2.0
    corner = torch.rand(batch, 2, generator=g) * 1.4 - 0.2
    size = torch.rand(batch, 2, generator=g) ** 2 * 1.2
    boxes = torch.cat([corner, corner + size], 1)
    edge = torch.tensor(EDGE_BOXES)[:batch]
    boxes[: len(edge)] = edge
    return values.to(value_dtype), indices.to(index_dtype), boxes


# ------------------------------------------------------------------------------------- against the oracle


@pytest.mark.parametrize("swap_xy", [False, True])
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("shape", [(64, 5, 15, 15, 1000), (48, 3, 7, 14, 50), (40, 2, 9, 4, 30),
                                   (1, 5, 15, 15, 1000), (20, 1, 1, 1, 5), (16, 5, 2, 3, 5)])
def test_matches_oracle(shape, backend, swap_xy):
    batch, k, h, w, c = shape
    values, indices, boxes = make_inputs(batch, k, h, w, c, seed=sum(shape))
    got = label_pooling(values, indices, boxes, c, swap_xy=swap_xy, backend=backend)
    want = reference_label_pooling(values, indices, boxes, c, swap_xy=swap_xy)
    assert got.shape == (batch, c) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    torch.testing.assert_close(got.sum(1), torch.ones(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64, torch.uint8])
def test_dtypes_match_oracle(value_dtype, index_dtype):
    values, indices, boxes = make_inputs(32, 5, 15, 15, 200, seed=3, value_dtype=value_dtype,
                                         index_dtype=index_dtype)
    got = label_pooling(values, indices, boxes, 200)
    torch.testing.assert_close(got, reference_label_pooling(values, indices, boxes, 200), atol=TOL, rtol=0)


def test_logits_not_just_probabilities_match():
    # With C = 2 the softmax barely hides logit errors: a wrong sample weight shows up at once.
    values, indices, boxes = make_inputs(len(EDGE_BOXES), 2, 15, 15, 2, seed=7)
    got = label_pooling(values * 10, indices, boxes, 2)
    torch.testing.assert_close(got, reference_label_pooling(values * 10, indices, boxes, 2), atol=TOL, rtol=0)


def test_many_random_boxes_and_map_shapes():
    # 600 random boxes on maps from 1x1 to 16x16, square and not: row x column weights equal roi_align.
    for i, (h, w) in enumerate([(1, 1), (2, 7), (5, 5), (16, 3), (15, 15), (11, 16)]):
        values, indices, boxes = make_inputs(100, 3, h, w, 40, seed=100 + i)
        for swap_xy in (False, True):
            got = label_pooling(values, indices, boxes, 40, swap_xy=swap_xy)
            want = reference_label_pooling(values, indices, boxes, 40, swap_xy=swap_xy)
            torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=f"map {h}x{w} swap_xy={swap_xy}")


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), k=st.integers(1, 3), c=st.integers(3, 12),
       coords=st.lists(st.floats(-1.5, 2.5, width=32) | st.sampled_from([0.0, 0.5, 1.0, 1 / 3, 2 / 3, -0.25]),
                       min_size=4, max_size=4),
       swap_xy=st.booleans(), seed=st.integers(0, 2**16))
def test_property_any_box_any_map(h, w, k, c, coords, swap_xy, seed):
    # Boxes anywhere (inverted, degenerate, on cell edges, beyond the map) on any small map.
    values, indices, _ = make_inputs(1, k, h, w, c, seed=seed)
    boxes = torch.tensor([coords], dtype=torch.float32)
    got = label_pooling(values * 4, indices, boxes, c, swap_xy=swap_xy)
    want = reference_label_pooling(values * 4, indices, boxes, c, swap_xy=swap_xy)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_non_contiguous_inputs():
    values, indices, boxes = make_inputs(24, 5, 15, 15, 100, seed=4)
    v = values.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # same values, other strides
    i = indices.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    b = torch.stack([boxes, boxes], 2).reshape(24, 8)[:, ::2]  # the same boxes, column stride 2
    assert not (v.is_contiguous() or i.is_contiguous() or b.is_contiguous())
    want = reference_label_pooling(values, indices, boxes, 100)
    torch.testing.assert_close(label_pooling(v, i, b, 100), want, atol=TOL, rtol=0)


def test_absent_classes_keep_logit_zero():
    # One class at logit log(9) over the whole map, C = 10: p = 9 / (9 + 9 * 1) = 0.5, the others 1/18 each.
    values = torch.full((1, 1, 4, 4), float(torch.tensor(9.0).log()))
    indices = torch.full((1, 1, 4, 4), 3)
    got = label_pooling(values, indices, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 10)
    want = torch.full((1, 10), 1 / 18)
    want[0, 3] = 0.5
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_horizontal_flip_invariance():
    # Mirroring the map and the box (x -> 1 - x) leaves the 1x1 target unchanged (DESIGN.md), for boxes at
    # least one cell wide: roi_align stretches a narrower (or inverted) box to one cell to the right of x1,
    # and the mirrored box stretches to the right too, so those two differ.
    values, indices, boxes = make_inputs(400, 5, 15, 15, 100, seed=5)
    wide = (boxes[:, 2] - boxes[:, 0]) * 15 >= 1.001
    values, indices, boxes = values[wide], indices[wide], boxes[wide]
    assert len(boxes) > 100
    mirrored = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
    got = label_pooling(values.flip(3), indices.flip(3), mirrored, 100)
    torch.testing.assert_close(got, label_pooling(values, indices, boxes, 100), atol=TOL, rtol=0)
    narrow = torch.tensor([[0.5, 0.2, 0.52, 0.8]])
    v, i = values[:1], indices[:1]
    flipped = label_pooling(v.flip(3), i.flip(3), torch.tensor([[0.48, 0.2, 0.5, 0.8]]), 100)
    assert (flipped - label_pooling(v, i, narrow, 100)).abs().max() > 1e-3


def test_empty_batch():
    values, indices, boxes = make_inputs(1, 2, 3, 3, 5)
    out = label_pooling(values[:0], indices[:0], boxes[:0], 5)
    assert out.shape == (0, 5)


# ------------------------------------------------------------------------------------ the official code


def test_swap_xy_equals_official_code():
    values, indices, boxes = make_inputs(64, 5, 15, 15, 1000, seed=11)
    want = official.official_label_pooling(values, indices, boxes, 1000, device="cpu")
    # the oracle makes the same calls as the official code: bit for bit
    assert torch.equal(reference_label_pooling(values, indices, boxes, 1000, swap_xy=True), want)
    ours = label_pooling(values, indices, boxes, 1000, swap_xy=True)
    torch.testing.assert_close(ours, want, atol=TOL, rtol=0)
    # and the default (correct) geometry is a different crop
    assert (label_pooling(values, indices, boxes, 1000) - want).abs().max() > 1e-3


def test_official_functions_on_release_records():
    # The release's per-image records: [2, k, h, w] float32, [0] logits, [1] class indices as floats.
    values, indices, boxes = make_inputs(8, 5, 15, 15, 1000, seed=12)
    records = [torch.stack([v, i.float()]) for v, i in zip(values, indices, strict=True)]
    dense = official.get_labelmaps(records, 8, device="cpu")
    assert dense.shape == (8, 1000, 15, 15)
    coords = boxes[:, [1, 0, 3, 2]]  # the official loader's (y1, x1, y2, x2)
    got = official.get_relabel(dense, coords, 8)
    ours = label_pooling(values, indices, boxes, 1000, swap_xy=True)
    torch.testing.assert_close(ours, got, atol=TOL, rtol=0)


def test_official_squeeze_quirk_breaks_batch_of_one():
    values, indices, boxes = make_inputs(1, 5, 15, 15, 1000)
    with pytest.raises(IndexError):
        official.official_label_pooling(values, indices, boxes, 1000, device="cpu")
    assert label_pooling(values, indices, boxes, 1000, swap_xy=True).shape == (1, 1000)  # ours works


def test_swap_xy_is_the_crop_mirrored_across_the_diagonal():
    # On a square map, the official order pools the transposed map with the box as given.
    values, indices, boxes = make_inputs(40, 5, 15, 15, 100, seed=13)
    got = label_pooling(values, indices, boxes, 100, swap_xy=True)
    want = label_pooling(values.transpose(2, 3), indices.transpose(2, 3), boxes, 100)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------- errors


def _one(batch=2, k=3, h=4, w=5, c=10):
    return make_inputs(batch, k, h, w, c)


@pytest.mark.parametrize("bad, match", [
    (lambda v, i, b: (v[0], i[0], b, 10), r"values must have shape \[B, k, h, w\], got shape \(3, 4, 5\)"),
    (lambda v, i, b: (v, i[:, :2], b, 10), r"indices must have the shape of values \(2, 3, 4, 5\), "
                                          r"got shape \(2, 2, 4, 5\)"),
    (lambda v, i, b: (v, i, b[:1], 10), r"boxes must have shape \[B, 4\] = \[2, 4\].*got shape \(1, 4\)"),
    (lambda v, i, b: (v, i, b[:, :3], 10), r"boxes must have shape .*got shape \(2, 3\)"),
    (lambda v, i, b: (v[:, :0], i[:, :0], b, 10), r"k, h, w >= 1, got shape \(2, 0, 4, 5\)"),
    (lambda v, i, b: (v, i, b, 0), r"num_classes must be in \[1, 2\*\*31 - 1\], got 0"),
    (lambda v, i, b: (v, i + 10, b, 10), r"indices must be in \[0, num_classes=10\), got a class index 1\d"),
    (lambda v, i, b: (v, i - 10, b, 10), r"indices must be in \[0, num_classes=10\), got a class index -\d+"),
    (lambda v, i, b: (v, i, b.index_fill(0, torch.tensor([1]), float("nan")), 10), r"boxes must be finite"),
])
def test_bad_arguments_raise_value_error(bad, match):
    args = bad(*_one())
    with pytest.raises(ValueError, match=match):
        label_pooling(*args)
    with pytest.raises(ValueError, match=match):
        reference_label_pooling(*args)


@pytest.mark.parametrize("bad, match", [
    (lambda v, i, b: (v.long(), i, b, 10),
     r"values must be float16, bfloat16, float32 or float64, got torch.int64"),
    (lambda v, i, b: (v, i.float(), b, 10), r"indices must have an integer dtype, got torch.float32"),
    (lambda v, i, b: (v, i, b.long(), 10), r"boxes must be floating point"),
    (lambda v, i, b: (v, i, b, 10.0), r"num_classes must be an int, got float"),
    (lambda v, i, b: (v.numpy(), i, b, 10), r"values must be a torch.Tensor, got ndarray"),
])
def test_bad_types_raise_type_error(bad, match):
    with pytest.raises(TypeError, match=match):
        label_pooling(*bad(*_one()))


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        label_pooling(*_one(), 10, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        LabelPooling(10, backend="fast")


def test_unvalidated_out_of_range_indices_add_nothing():
    values, indices, boxes = _one()
    bad = indices.clone()
    bad[:, 0, 1:3] = 10_000
    bad[:, 1, 0] = -5
    gone = bad != indices
    want = reference_label_pooling(values.masked_fill(gone, 0.0), indices, boxes, 10)  # a 0 adds nothing
    for backend in ("auto", "torch"):
        got = label_pooling(values, bad, boxes, 10, validate=False, backend=backend)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_triton_backend_without_gpu_or_interpreter_raises(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors \(got device cpu\)"):
        label_pooling(*_one(), 10, backend="triton")


# ----------------------------------------------------------------------------- module, op, compile


def test_module_wrapper():
    values, indices, boxes = make_inputs(8, 5, 15, 15, 100, seed=21)
    mod = LabelPooling(100, swap_xy=True)
    assert "num_classes=100, output_size=(1, 1), swap_xy=True" in repr(mod)
    torch.testing.assert_close(mod(values, indices, boxes),
                               label_pooling(values, indices, boxes, 100, swap_xy=True), atol=0, rtol=0)


def test_opcheck():
    values, indices, boxes = make_inputs(6, 5, 7, 9, 50, seed=22, value_dtype=torch.float16,
                                         index_dtype=torch.int16)
    op = torch.ops.relabel_shards.label_pooling.default
    flips = torch.tensor([True, False] * 3)
    for swap_xy in (False, True):
        torch.library.opcheck(op, (values, indices, boxes, None, 50, [1, 1], swap_xy, True))
        torch.library.opcheck(op, (values, indices, boxes, flips, 50, [3, 4], swap_xy, True))


def test_torch_compile_fullgraph_cpu():
    # The op is opaque to dynamo and has a fake impl: one graph, no breaks, same numbers.
    values, indices, boxes = make_inputs(16, 5, 15, 15, 100, seed=23)
    compiled = torch.compile(LabelPooling(100), fullgraph=True)
    torch.testing.assert_close(compiled(values, indices, boxes),
                               reference_label_pooling(values, indices, boxes, 100), atol=TOL, rtol=0)
    flips = torch.arange(16) % 3 == 0
    tokens = torch.compile(LabelPooling(100, output_size=(7, 5)), fullgraph=True)
    torch.testing.assert_close(tokens(values, indices, boxes, flips),
                               reference_label_pooling(values, indices, boxes, 100, output_size=(7, 5),
                                                       flips=flips), atol=TOL, rtol=0)


# -------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("value_dtype, index_dtype", [(torch.float32, torch.int64),
                                                      (torch.float16, torch.int16),
                                                      (torch.bfloat16, torch.int32)])
def test_cuda_backends_match_oracle_large_batch(value_dtype, index_dtype):
    values, indices, boxes = make_inputs(1024, 5, 15, 15, 1000, seed=31, value_dtype=value_dtype,
                                         index_dtype=index_dtype)
    v, i, b = values.cuda(), indices.cuda(), boxes.cuda()
    for swap_xy in (False, True):
        want = reference_label_pooling(values, indices, boxes, 1000, swap_xy=swap_xy)  # on the CPU
        for backend in ("auto", "torch", "triton"):
            got = label_pooling(v, i, b, 1000, swap_xy=swap_xy, backend=backend)
            assert got.is_cuda and got.shape == (1024, 1000)
            torch.testing.assert_close(got.cpu(), want, atol=TOL, rtol=0, msg=f"{backend} swap_xy={swap_xy}")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(64, 5, 15, 15, 21841), (256, 4, 15, 20, 1000), (512, 3, 7, 14, 1000),
                                   (8, 1, 1, 1, 3)])
def test_cuda_triton_shapes_and_many_classes(shape):
    batch, k, h, w, c = shape
    values, indices, boxes = make_inputs(batch, k, h, w, c, seed=32, palette=max(k, 200))
    want = reference_label_pooling(values, indices, boxes, c)
    got = label_pooling(values.cuda(), indices.cuda(), boxes.cuda(), c, backend="triton")
    torch.testing.assert_close(got.cpu(), want, atol=TOL, rtol=0)


@pytest.mark.cuda
def test_cuda_triton_deterministic_non_contiguous_and_compiled():
    values, indices, boxes = make_inputs(2048, 5, 15, 15, 1000, seed=33, value_dtype=torch.float16)
    v = values.cuda().transpose(2, 3).contiguous().transpose(2, 3)
    i = indices.cuda().transpose(2, 3).contiguous().transpose(2, 3)
    b = boxes.cuda()
    first = label_pooling(v, i, b, 1000, backend="triton")
    assert torch.equal(first, label_pooling(v, i, b, 1000, backend="triton"))
    torch.testing.assert_close(first.cpu(), reference_label_pooling(values, indices, boxes, 1000), atol=TOL,
                               rtol=0)
    compiled = torch.compile(lambda v, i, b: label_pooling(v, i, b, 1000), fullgraph=True)
    assert torch.equal(compiled(v, i, b), first)
    op = torch.ops.relabel_shards.label_pooling.default
    torch.library.opcheck(op, (v[:8], i[:8], b[:8], 1000, False, False))


@pytest.mark.cuda
def test_cuda_validation_choice():
    values, indices, boxes = make_inputs(4, 3, 4, 5, 10)
    bad = indices.clone()
    bad[0, 0, 0, 0] = 10
    args = (values.cuda(), bad.cuda(), boxes.cuda(), 10)
    with pytest.raises(ValueError, match=r"got a class index 10"):
        label_pooling(*args, validate=True)
    want = reference_label_pooling(values.masked_fill(bad != indices, 0.0), indices, boxes, 10)
    for backend in ("auto", "torch", "triton"):  # default on CUDA: no sync, the bad entry is ignored
        torch.testing.assert_close(label_pooling(*args, backend=backend).cpu(), want, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_pool_demo():
    from click.testing import CliRunner

    from relabel_shards.cli import cli
    from relabel_shards.pooling.demo import synthetic_label_maps

    result = CliRunner().invoke(cli, ["pool", "--batch", "3", "--top", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("label_pooling (auto, cpu): ")
    # the left-half box finds image 0's left object, the right-half box image 1's right object
    _, indices = synthetic_label_maps(3, 5, 15, 15, 1000, seed=0)
    assert lines[0].startswith(f"box (0.00, 0.00, 0.50, 1.00): class {int(indices[0, 0, 0, 0])} 0.")
    assert lines[1].startswith(f"box (0.50, 0.00, 1.00, 1.00): class {int(indices[1, 0, 0, 14])} 0.")
    bad = CliRunner().invoke(cli, ["pool", "--k", "2000"])
    assert bad.exit_code == 1 and "k must be in [1, num_classes=1000], got 2000" in bad.output

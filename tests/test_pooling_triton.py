"""The fused Triton kernel against the dense oracle. Without a GPU it runs under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports the kernel), on CPU tensors: slow, so small
batches (B <= 8) and few calls, but every edge case of the foundation issue, including C above one block.
With a GPU the same tests run the compiled kernel on CUDA tensors."""

from __future__ import annotations

import os

import pytest
import torch
from test_pooling import EDGE_BOXES, TOL, make_inputs

from relabel_shards.pooling import label_pooling, reference_label_pooling

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)


def triton_vs_oracle(values, indices, boxes, num_classes, swap_xy=False, **kwargs):
    got = label_pooling(values.to(DEVICE), indices.to(DEVICE), boxes.to(DEVICE), num_classes, swap_xy=swap_xy,
                        backend="triton", **kwargs)
    assert got.shape == (values.shape[0], num_classes) and got.dtype == torch.float32
    return got.cpu(), reference_label_pooling(values, indices, boxes, num_classes, swap_xy=swap_xy)


@pytest.mark.parametrize("first, swap_xy", [(0, False), (4, True)])
def test_edge_boxes(first, swap_xy):
    values, indices, boxes = make_inputs(12, 5, 15, 15, 1000, seed=41)
    sl = slice(first, first + 8)
    got, want = triton_vs_oracle(values[sl], indices[sl], boxes[sl], 1000, swap_xy)
    assert torch.equal(boxes[sl], torch.tensor(EDGE_BOXES[sl]))
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("shape, value_dtype, index_dtype, swap_xy", [
    ((8, 3, 7, 14, 50), torch.float16, torch.int16, True),  # non-square, half, short indices, official order
    ((6, 2, 9, 4, 30), torch.float32, torch.int32, False),  # taller than wide
    ((4, 5, 15, 15, 1000), torch.bfloat16, torch.int64, False),  # bf16 (float32 in the interpreter)
    ((1, 1, 1, 1, 3), torch.float32, torch.uint8, False),  # B = 1, a 1x1 map
    ((5, 5, 2, 3, 5), torch.float16, torch.int64, True),  # every class present: no logit-0 class left
])
def test_shapes_and_dtypes(shape, value_dtype, index_dtype, swap_xy):
    batch, k, h, w, c = shape
    values, indices, boxes = make_inputs(batch, k, h, w, c, seed=sum(shape), value_dtype=value_dtype,
                                         index_dtype=index_dtype)
    got, want = triton_vs_oracle(values, indices, boxes, c, swap_xy)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("num_classes, index_dtype", [(3000, torch.int32), (21841, torch.int16)])
def test_classes_above_one_block(num_classes, index_dtype):
    # the kernel writes rows in tiles of 1024 classes; palette 300 spreads classes over every tile
    values, indices, boxes = make_inputs(3, 5, 15, 15, num_classes, seed=num_classes, index_dtype=index_dtype,
                                         palette=300)
    assert indices.max() > 2048
    got, want = triton_vs_oracle(values, indices, boxes, num_classes)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert got[:, 1024:].sum() > 0.5  # the later tiles were written, not left as garbage


def test_non_contiguous_inputs():
    values, indices, boxes = make_inputs(4, 5, 15, 15, 100, seed=43)
    v = values.to(DEVICE).transpose(2, 3).contiguous().transpose(2, 3)
    i = torch.stack([indices.int(), indices.int()], 3).reshape(4, 5, 30, 15)[:, :, ::2]  # row stride 2
    i = i.to(DEVICE)
    assert torch.equal(i.cpu(), indices.to(torch.int32))
    b = torch.stack([boxes, boxes], 2).reshape(4, 8)[:, ::2].to(DEVICE)
    assert not (v.is_contiguous() or i.is_contiguous() or b.is_contiguous())
    got = label_pooling(v, i, b, 100, backend="triton").cpu()
    torch.testing.assert_close(got, reference_label_pooling(values, indices, boxes, 100), atol=TOL, rtol=0)


def test_repeated_and_out_of_range_indices():
    values, indices, boxes = make_inputs(4, 5, 6, 6, 40, seed=44)
    bad = indices.clone()
    bad[:, 0, 2:4] = 40  # out of range: ignored unless validated
    bad[:, 1, 0] = -3
    dup = bad.clone()
    dup[:, 2] = dup[:, 3]  # a class twice in one cell: both contributions add (as the oracle's scatter_add)
    gone = bad != indices
    clean = indices.clone()
    clean[:, 2] = clean[:, 3]
    want = reference_label_pooling(values.masked_fill(gone, 0.0), clean, boxes, 40)
    got = label_pooling(values.to(DEVICE), dup.to(DEVICE), boxes.to(DEVICE), 40, backend="triton",
                        validate=False).cpu()
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match=r"must be in \[0, num_classes=40\), got a class index (40|-3)"):
        label_pooling(values.to(DEVICE), dup.to(DEVICE), boxes.to(DEVICE), 40, backend="triton",
                      validate=True)


def test_deterministic():
    values, indices, boxes = make_inputs(4, 5, 15, 15, 1000, seed=45)
    args = (values.to(DEVICE), indices.to(DEVICE), boxes.to(DEVICE), 1000)
    assert torch.equal(label_pooling(*args, backend="triton"), label_pooling(*args, backend="triton"))


# -------------------------------------------------------------- output_size above 1x1: the bins kernel


# The interpreter spends about 30 ms per bin: the 7x7 and 14x14 cases are marked slow (they run on a GPU in
# benchmarks/gpu_check.sh with the compiled kernel).
@pytest.mark.parametrize("shape, output_size, swap_xy", [
    ((12, 2, 5, 6, 20), (2, 3), False),  # every edge box, a non-square grid on a non-square map
    ((4, 3, 7, 5, 20), (3, 2), True),  # the official box order
    pytest.param((12, 2, 5, 6, 20), 7, False, marks=pytest.mark.slow),  # every edge box, 7x7 bins
    pytest.param((2, 2, 6, 6, 20), 14, True, marks=pytest.mark.slow),  # 14x14 bins (ViT-S/16 at 224 px)
])
def test_bins_edge_boxes(shape, output_size, swap_xy):
    batch, k, h, w, c = shape
    values, indices, boxes = make_inputs(batch, k, h, w, c, seed=sum(shape), value_dtype=torch.float16,
                                         index_dtype=torch.int16)
    flips = torch.arange(batch) % 2 == 1
    got = label_pooling(values.to(DEVICE), indices.to(DEVICE), boxes.to(DEVICE), c, output_size=output_size,
                        flips=flips.to(DEVICE), swap_xy=swap_xy, backend="triton").cpu()
    want = reference_label_pooling(values, indices, boxes, c, output_size=output_size, flips=flips,
                                   swap_xy=swap_xy)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_bins_5x15x15_and_classes_above_one_block():
    values, indices, boxes = make_inputs(1, 5, 15, 15, 3000, seed=47, palette=300)
    boxes = torch.tensor([[0.1, 0.05, 0.8, 0.9]])
    buf = torch.full((1, 2, 3, 3000), -1.0, device=DEVICE)
    got = label_pooling(values.to(DEVICE), indices.to(DEVICE), boxes.to(DEVICE), 3000, output_size=(2, 3),
                        backend="triton", out=buf).cpu()
    want = reference_label_pooling(values, indices, boxes, 3000, output_size=(2, 3))
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("output_size", [1, 3])
def test_non_finite_boxes_give_nan_rows(output_size):
    # issue 12: the same behaviour as the PyTorch path (test_pooling_bins.py) when validation is off
    values, indices, boxes = make_inputs(4, 2, 4, 4, 10, seed=48)
    bad = boxes.clone()
    bad[1, 0] = float("nan")
    bad[2, 3] = float("inf")
    got = label_pooling(values.to(DEVICE), indices.to(DEVICE), bad.to(DEVICE), 10, output_size=output_size,
                        backend="triton", validate=False).cpu().reshape(4, -1)
    assert got[1:3].isnan().all() and not got[[0, 3]].isnan().any()
    torch.testing.assert_close(got, label_pooling(values, indices, bad, 10, output_size=output_size,
                                                  backend="torch", validate=False).reshape(4, -1),
                               atol=TOL, rtol=0, equal_nan=True)


_AOT_SCRIPT = """
import json, sys, torch
from relabel_shards.pooling.triton_impl import compile_for_gpu
out = [compile_for_gpu(torch.float16, torch.int16, 5, 15, 15, 1000, swap_xy=True),
       compile_for_gpu(torch.bfloat16, torch.int64, 1, 1, 1, 3),
       compile_for_gpu(torch.float16, torch.int16, 5, 15, 15, 1000, bins=True),
       compile_for_gpu(torch.bfloat16, torch.int32, 5, 15, 15, 1000, swap_xy=True, bins=True, flips=False)]
print(json.dumps(out))
"""


def test_kernel_compiles_for_h100_without_a_gpu():
    # The interpreter skips Triton's compiler; compiling ahead of time for sm_90 (no GPU or driver needed)
    # catches front-end, lowering and ptxas errors. In a subprocess: the kernel must be imported without
    # TRITON_INTERPRET.
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        assert r["cubin_bytes"] > 0
        assert r["shared_bytes"] <= 227 * 1024  # an H100's shared memory per block


def test_too_many_classes_for_the_kernel_keys():
    values, indices, boxes = make_inputs(2, 5, 15, 15, 1000, seed=46)
    match = r"needs \(num_classes \+ 1\) \* N <= 2\*\*30 .*got num_classes=600000 for a \[5, 15, 15\] map"
    with pytest.raises(ValueError, match=match + ": use backend='torch'"):
        label_pooling(values.to(DEVICE), indices.to(DEVICE), boxes.to(DEVICE), 600_000, backend="triton")

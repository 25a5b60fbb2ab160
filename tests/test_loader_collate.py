"""loader.collate: the batch against plain stacking, in the main process and from a DataLoader worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from relabel_shards.loader import collate


def _samples(n: int, values_dtype, indices_dtype, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8),
            "label": int(rng.integers(0, 1000)),
            "box": rng.random(4).astype(np.float32),
            "values": rng.normal(size=(2, 3, 5)).astype(values_dtype),
            "indices": rng.integers(0, 1000, size=(2, 3, 5)).astype(indices_dtype),
            "flip": bool(i % 2),
            "key": f"k{i}",
            "_state": (0, i, i, {}),
        }
        for i in range(n)
    ]


def _check(batch: dict, samples: list[dict]) -> None:
    want = {
        "images": np.stack([s["image"] for s in samples]).transpose(0, 3, 1, 2),
        "labels": np.array([s["label"] for s in samples], np.int64),
        "boxes": np.stack([s["box"] for s in samples]),
        "values": np.stack([s["values"] for s in samples]),
        "indices": np.stack([s["indices"] for s in samples]),
        "flips": np.array([s["flip"] for s in samples]),
    }
    for name, ref in want.items():
        t = batch[name]
        assert t.is_contiguous() and t.dtype == torch.from_numpy(ref).dtype, name
        np.testing.assert_array_equal(t.numpy(), ref, err_msg=name)
    assert batch["keys"] == [s["key"] for s in samples] and batch["_state"] == samples[-1]["_state"]


@pytest.mark.parametrize("values_dtype, indices_dtype", [(np.float32, np.int16), (np.float16, np.int32)])
def test_collate_matches_plain_stacking(values_dtype, indices_dtype):
    samples = _samples(5, values_dtype, indices_dtype)
    _check(collate(samples), samples)


class _Fixed(IterableDataset):
    def __init__(self, samples):
        self.samples = samples

    def __iter__(self):
        return iter(self.samples)


def test_collate_in_a_worker_hands_over_one_shared_buffer():
    samples = _samples(6, np.float32, np.int16, seed=1)
    loader = DataLoader(_Fixed(samples), batch_size=3, num_workers=1, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2
    for batch, part in zip(batches, (samples[:3], samples[3:]), strict=True):
        _check(batch, part)
        tensors = [batch[k] for k in ("images", "labels", "boxes", "values", "indices", "flips")]
        # one shared-memory segment per batch, not one per tensor
        assert all(t.is_shared() for t in tensors)
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1

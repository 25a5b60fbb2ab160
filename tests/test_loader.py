"""The streaming loader on local shards: batch contract, boxes vs pixels, order, epochs, resume, errors."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from test_loader_factory import NUM_CLASSES, image_size_of, key_of, make_shards, truncate_tar

from relabel_shards.loader import ReLabelDataset, make_loader

S = 32  # output side: small, fast, still >= 2x downscale for most crops (draft mode on)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 shards x 5 samples: divides evenly over 2 ranks x 2 workers."""
    out = tmp_path_factory.mktemp("shards")
    make_shards(out, [5] * 8)
    return str(out)


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


def test_batch_contract(data):
    loader = make_loader(data, batch_size=4, num_workers=0, image_size=S, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 10
    b = batches[0]
    assert b["images"].dtype == torch.uint8 and b["images"].shape == (4, 3, S, S)
    assert b["labels"].dtype == torch.int64 and b["labels"].shape == (4,)
    assert b["boxes"].dtype == torch.float32 and b["boxes"].shape == (4, 4)
    assert b["values"].shape == (4, 2, 3, 4) and b["values"].dtype in (torch.float16, torch.float32)
    assert b["indices"].shape == (4, 2, 3, 4) and not b["indices"].dtype.is_floating_point
    keys = [k for batch in batches for k in batch["keys"]]
    assert sorted(keys) == [key_of(i) for i in range(40)]
    for batch in batches:
        ids = [int(k[1:]) for k in batch["keys"]]
        # the map and the class travel with their own image
        assert batch["values"][:, 0, 0, 0].float().tolist() == [float(i) for i in ids]
        assert batch["labels"].tolist() == [i % NUM_CLASSES for i in ids]
        x1, y1, x2, y2 = batch["boxes"].unbind(1)
        assert bool(((0 <= x1) & (x1 < x2) & (x2 <= 1) & (0 <= y1) & (y1 < y2) & (y2 <= 1)).all())


@pytest.mark.parametrize("draft", [True, False])
@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_boxes_match_the_pixels_cropped(data, draft, hflip):
    """Each crop shows its box to a fraction of an output pixel, drafted or not.

    Oracle: a full decode of the sample's JPEG and torchvision's resized_crop at the box (flipped when the
    sample says so). Red encodes x and green y, so the mean colour difference over the crop divided by the
    ramp's slope is the crop's shift in source pixels; divided by (window / S) it is in output pixels.
    """
    from PIL import Image
    from test_loader_factory import coord_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    ds = ReLabelDataset(data, image_size=S, hflip=hflip, seed=3, draft=draft, shuffle_buffer=0)
    n, worst = 0, 0.0
    for s in ds:
        i = int(s["key"][1:])
        w, h = image_size_of(i)
        img = s["image"].astype(np.float64)  # (S, S, 3)
        x1, y1, x2, y2 = s["box"].tolist()
        left, top = round(x1 * w), round(y1 * h)
        cw, ch = round(x2 * w) - left, round(y2 * h) - top
        assert abs(left + cw - x2 * w) < 1e-3 and abs(top + ch - y2 * h) < 1e-3  # whole pixels
        full = Image.open(io.BytesIO(coord_jpeg(i, (w, h))))
        want = np.asarray(TF.resized_crop(full, top, left, ch, cw, [S, S], InterpolationMode.BILINEAR,
                                          antialias=True), dtype=np.float64)
        assert s["flip"] == bool(hflip)
        if hflip:
            assert img[:, 0, 0].mean() > img[:, -1, 0].mean()  # mirrored: red falls left to right
            img = img[:, ::-1]
        dx = (img[:, 1:-1, 0] - want[:, 1:-1, 0]).mean() / (255 / (w - 1)) / (cw / S)
        dy = (img[1:-1, :, 1] - want[1:-1, :, 1]).mean() / (255 / (h - 1)) / (ch / S)
        worst = max(worst, abs(dx), abs(dy))
        n += 1
    assert n == 40
    assert worst < 0.1, f"a crop is off its box by {worst:.2f} output pixels"  # was 0.28 (draft scale bug)


def test_exactly_once_over_ranks_and_workers_in_process(data):
    """2 ranks x 2 workers on 8 equal shards: every sample once per epoch, equal batches per rank."""
    seen, counts = [], []
    for rank in range(2):
        loader = make_loader(data, batch_size=3, num_workers=2, image_size=16, rank=rank, world_size=2,
                             seed=5)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == len(loader)
        seen += [k for b in batches for k in b["keys"]]
    assert counts[0] == counts[1] == 8  # 2 workers x ceil(10 / 3)
    assert sorted(seen) == [key_of(i) for i in range(40)]


def test_same_seed_and_epoch_same_order_and_pixels(data):
    def run(seed, epoch):
        loader = make_loader(data, batch_size=8, num_workers=2, image_size=16, seed=seed, shuffle_buffer=6)
        loader.set_epoch(epoch)
        batches = list(loader)
        return [k for b in batches for k in b["keys"]], torch.cat([b["images"] for b in batches])

    k1, im1 = run(0, 0)
    k2, im2 = run(0, 0)
    assert k1 == k2 and torch.equal(im1, im2)
    k3, _ = run(0, 1)
    k4, _ = run(1, 0)
    assert k3 != k1 and k4 != k1
    assert sorted(k1) == sorted(k3) == sorted(k4) == [key_of(i) for i in range(40)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_no_repeats_no_skips(data, num_workers):
    opts = dict(batch_size=3, num_workers=num_workers, image_size=16, seed=7, shuffle_buffer=4)
    full = list(make_loader(data, **opts))
    full_keys = [k for b in full for k in b["keys"]]
    first = make_loader(data, **opts)
    head = []
    for i, batch in enumerate(first):
        head.append(batch)
        if i == 4:
            break
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON checkpoint
    second = make_loader(data, **opts)
    second.load_state_dict(state)
    tail = list(second)
    keys = [k for b in head + tail for k in b["keys"]]
    assert sorted(keys) == sorted(full_keys) == [key_of(i) for i in range(40)]
    assert len(head) + len(tail) == len(full)
    # every resumed sample is the very sample (same crop) the uninterrupted run gave
    by_key = {k: img for b in full for k, img in zip(b["keys"], b["images"], strict=True)}
    for b in tail:
        for k, img in zip(b["keys"], b["images"], strict=True):
            assert torch.equal(img, by_key[k])


def test_the_usual_epoch_loop_resumes_mid_epoch(data):
    """set_epoch(e) right after load_state_dict keeps the loaded position; the next epoch starts afresh."""
    opts = dict(batch_size=4, num_workers=0, image_size=16, seed=3)
    first = make_loader(data, **opts)
    first.set_epoch(1)
    head = []
    for i, batch in enumerate(first):
        head += batch["keys"]
        if i == 2:
            break
    second = make_loader(data, **opts)
    second.load_state_dict(first.state_dict())
    seen = {}
    for epoch in (1, 2):
        second.set_epoch(epoch)
        seen[epoch] = [k for b in second for k in b["keys"]]
    assert sorted(head + seen[1]) == [key_of(i) for i in range(40)]  # no sample twice, none left out
    assert sorted(seen[2]) == [key_of(i) for i in range(40)]  # epoch 2 whole


def test_resume_under_another_worker_count_is_elastic(data):
    a = make_loader(data, batch_size=4, num_workers=0, image_size=16, seed=2)
    head = []
    for i, batch in enumerate(a):
        head += batch["keys"]
        if i == 3:
            break
    b = make_loader(data, batch_size=4, num_workers=2, image_size=16, seed=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    tail = _keys(b)
    assert sorted(head + tail) == [key_of(i) for i in range(40)]  # none twice, none left out
    assert len(b) == 6  # 24 samples left over 2 workers: 3 + 3 batches of <= 4


def test_uneven_shards_equal_batches_per_rank(tmp_path):
    make_shards(tmp_path, [9, 2, 5, 1, 7])  # 24 samples, very uneven
    counts = []
    for rank in range(2):
        loader = make_loader(str(tmp_path), batch_size=4, num_workers=0, image_size=16, rank=rank,
                             world_size=2)
        counts.append(sum(1 for _ in loader))
        assert counts[-1] == len(loader)
    assert counts == [3, 3]  # ceil(24 / 2) = 12 samples each


def test_too_few_shards_says_how_many(tmp_path):
    make_shards(tmp_path, [4, 4, 4])
    with pytest.raises(ValueError, match="3 shards cannot feed 4 readers .* need at least 4 shards"):
        make_loader(str(tmp_path), batch_size=2, num_workers=2, rank=1, world_size=2)


def test_brace_pattern_and_list_urls(data):
    urls = f"{data}/train-{{000000..000003}}.tar"
    a = make_loader(urls, batch_size=5, num_workers=0, image_size=16)
    assert sorted(_keys(a)) == [key_of(i) for i in range(20)]
    b = make_loader([f"{data}/train-000000.tar", f"{data}/train-000007.tar"], batch_size=5, num_workers=0,
                    image_size=16)
    assert sorted(_keys(b)) == [key_of(i) for i in [*range(5), *range(35, 40)]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(on_error="ignore"), "on_error must be 'raise' or 'skip', got 'ignore'"),
    (dict(hflip=1.5), r"hflip must be in \[0, 1\], got 1.5"),
    (dict(image_size=0), "image_size must be an integer >= 1, got 0"),
    (dict(rank=2, world_size=2), r"rank must be in \[0, world_size=2\), got rank=2"),
    (dict(rank=0), "give both rank and world_size or neither"),
])
def test_invalid_options(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReLabelDataset(data, **kwargs)


# ---------------------------------------------------------------------------------------- bad shards


def _corrupt_jpeg(i, members):
    return [(n, d[: len(d) // 3]) if n.endswith(".jpg") and i == 6 else (n, d) for n, d in members]


def _corrupt_map(i, members):
    return [(n, d[:10] + bytes(b ^ 0x5A for b in d[10:40]) + d[40:]) if n.endswith(".rlm") and i == 6
            else (n, d) for n, d in members]


def _missing_member(i, members):
    return [(n, d) for n, d in members if not (i == 6 and n.endswith(".rlm"))]


@pytest.mark.parametrize("damage,reason,match", [
    (_corrupt_jpeg, "corrupt_image", r"train-000001\.tar: sample 's00006': cannot decode \.jpg"),
    (_corrupt_map, "corrupt_labelmap", r"train-000001\.tar: sample 's00006': corrupt label map \.rlm"),
    (_missing_member, "missing_member", r"train-000001\.tar: sample 's00006': missing member\(s\) rlm"),
])
def test_bad_sample_raise_or_skip(tmp_path, damage, reason, match):
    make_shards(tmp_path, [5, 5, 5, 5], transform=damage)
    with pytest.raises(ValueError, match=match):
        list(make_loader(str(tmp_path), batch_size=4, num_workers=0, image_size=16, shuffle_buffer=0))
    loader = make_loader(str(tmp_path), batch_size=4, num_workers=2, image_size=16, on_error="skip")
    keys = _keys(loader)
    assert "s00006" not in keys
    assert len(keys) == 20  # the reader fills its quota by reading its shards again
    assert loader.skipped == {reason: 1}


def test_truncated_tar_raise_or_skip(tmp_path, caplog):
    make_shards(tmp_path, [5, 5, 5, 5])
    truncate_tar(tmp_path / "train-000002.tar", keep_samples=2)
    with pytest.raises(ValueError, match=r"train-000002\.tar: truncated or corrupt tar after key 's00011' "
                                         r"\(key 's00012' incomplete\)"):
        list(make_loader(str(tmp_path), batch_size=4, num_workers=0, image_size=16))
    loader = make_loader(str(tmp_path), batch_size=4, num_workers=0, image_size=16, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="relabel_shards.loader"):
        keys = _keys(loader)
    assert len(keys) == 20 and not {"s00012", "s00013", "s00014"} & set(keys)
    assert loader.skipped["truncated_tar"] >= 1
    assert any("skipped" in r.getMessage() and "truncated_tar" in r.getMessage() for r in caplog.records)


def test_tar_cut_at_a_header_or_short_of_its_length_is_an_error(tmp_path):
    make_shards(tmp_path, [5, 5])
    truncate_tar(tmp_path / "train-000001.tar", keep_samples=3, cut_into_member=-512)  # cut at a header
    with pytest.raises(ValueError, match=r"train-000001\.tar: truncated or corrupt tar after key 's00006' "
                                         r"\(key 's00007' incomplete\): truncated: data ends at byte"):
        list(make_loader(str(tmp_path), batch_size=4, num_workers=0, image_size=16))
    # a whole tar, end-of-archive marker included, with fewer samples than _info.json lists
    make_shards(tmp_path / "short", [5, 3])
    (tmp_path / "train-000001.tar").write_bytes((tmp_path / "short" / "train-000001.tar").read_bytes())
    with pytest.raises(ValueError, match=r"train-000001\.tar: _info.json says 5 samples, the shard holds 3"):
        list(make_loader(str(tmp_path), batch_size=4, num_workers=0, image_size=16))


def test_center_crop_for_evaluation(data):
    ds = ReLabelDataset(data, image_size=S, center_crop=0.5, hflip=1.0, shuffle_buffer=0)
    for s in ds:
        w, h = image_size_of(int(s["key"][1:]))
        side = round(min(w, h) * 0.5)
        left, top = (w - side) // 2, (h - side) // 2
        want = [left / w, top / h, (left + side) / w, (top + side) / h]
        np.testing.assert_allclose(s["box"], want, rtol=0, atol=1e-6)
        assert not s["flip"]
    with pytest.raises(ValueError, match=r"center_crop must be in \(0, 1\] or None, got 1.5"):
        ReLabelDataset(data, center_crop=1.5)


def _other_geometry(i, members):
    from relabel_shards.labelmap import encode_label_map

    if i != 3:
        return members
    record = encode_label_map(np.ones((3, 3, 4), np.float32), np.zeros((3, 3, 4), np.int64), NUM_CLASSES)
    return [(n, record if n.endswith(".rlm") else d) for n, d in members]


def test_label_map_geometry_must_match_the_dataset(tmp_path):
    make_shards(tmp_path, [4, 4], transform=_other_geometry)
    with pytest.raises(ValueError, match=r"train-000000\.tar: sample 's00003': label map has k=3, 3x4, "
                                         r"num_classes=7; the dataset's maps have k=2, 3x4, num_classes=7"):
        list(make_loader(str(tmp_path), batch_size=4, num_workers=0, image_size=16))
    loader = make_loader(str(tmp_path), batch_size=4, num_workers=0, image_size=16, on_error="skip")
    assert "s00003" not in _keys(loader) and loader.skipped == {"labelmap_mismatch": 1}


def test_keep_aspect_dataset_is_refused_with_the_reason(tmp_path):
    """A --keep-aspect build has one map shape per image aspect: the loader says so up front."""
    make_shards(tmp_path, [2])
    info_path = tmp_path / "_info.json"
    info = json.loads(info_path.read_text())
    section = info["splits"]["train"]["relabel_shards"]
    section.update(height=None, width=None, map_shapes=[[10, 15], [15, 10]])
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"2 shapes \(h, w\) \[\(10, 15\), \(15, 10\)\]: it was built with "
                                         r"--keep-aspect"):
        make_loader(str(tmp_path), batch_size=2, num_workers=0, image_size=16)


def test_resume_with_skipped_samples(tmp_path):
    make_shards(tmp_path, [5, 5, 5, 5], transform=_corrupt_jpeg)
    opts = dict(batch_size=2, num_workers=2, image_size=16, seed=3, on_error="skip", shuffle_buffer=3)
    full = _keys(make_loader(str(tmp_path), **opts))
    first = make_loader(str(tmp_path), **opts)
    head = []
    for i, batch in enumerate(first):
        head += batch["keys"]
        if i == 5:
            break
    second = make_loader(str(tmp_path), **opts)
    second.load_state_dict(first.state_dict())
    tail = _keys(second)
    assert sorted(head + tail) == sorted(full) and len(full) == 20
    assert second.skipped == {"corrupt_image": 1}  # counted once, whether before or after the break


def test_evaluation_reads_every_sample_with_uneven_shards(tmp_path):
    """center_crop (evaluation): every sample at least once over the ranks, equal batches per rank."""
    make_shards(tmp_path, [4, 4, 2])
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(str(tmp_path), batch_size=2, num_workers=0, image_size=16, center_crop=0.875,
                             shuffle_buffer=0, rank=rank, world_size=2)
        per_rank.append(_keys(loader))
    assert len(per_rank[0]) == len(per_rank[1]) == 6  # the larger reader's load (4 + 2), the other repeats
    assert sorted(set(per_rank[0]) | set(per_rank[1])) == [key_of(i) for i in range(10)]
    # training keeps ceil(total / readers) per reader
    train = make_loader(str(tmp_path), batch_size=2, num_workers=0, image_size=16, rank=0, world_size=2)
    assert len(train.dataset) == 5

"""The loader's shard stream end to end: class diversity, interleaving, elastic resume, bytes, API errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from test_loader_factory import NUM_CLASSES, class_sorted, key_of, make_shards

from relabel_shards.loader import ReLabelDataset, make_loader, merge_state_dicts

ALL40 = [key_of(i) for i in range(40)]


def _keys(loader) -> list[str]:
    return [k for b in loader for k in b["keys"]]


@pytest.fixture(scope="module")
def sorted_data(tmp_path_factory):
    """24 shards x 7 samples, class-sorted (a sorted image folder built in order): 1-2 classes per shard."""
    out = tmp_path_factory.mktemp("sorted")
    make_shards(out, [7] * 24, label_of=class_sorted(168))
    return str(out)


def _distinct_per_batch(loader) -> float:
    return float(np.mean([len(set(b["labels"].tolist())) for b in loader]))


def test_interleaving_mixes_classes_from_class_sorted_shards(sorted_data):
    """Shards hold 1-2 of 7 classes: one shard at a time gives ~2 classes per batch of 8, more shards more.

    No shuffle buffer, so the classes come from interleaving alone (measured over seeds 0-2: 2.1, 3.5, 4.1
    for 1, 4, 8 shards in flight; an i.i.d. batch of 8 holds 4.9 of 7 on average).
    """
    opts = dict(batch_size=8, num_workers=0, image_size=8, seed=0, shuffle_buffer=0)
    diversity = {
        k: _distinct_per_batch(make_loader(sorted_data, shards_in_flight=k, **opts)) for k in (1, 4, 8)
    }
    iid = NUM_CLASSES * (1 - (1 - 1 / NUM_CLASSES) ** 8)
    assert diversity[1] < 2.3
    assert 2.9 < diversity[4] < diversity[8] <= iid
    assert diversity[8] > 3.7


@pytest.mark.parametrize("shards_in_flight", [1, 3])
def test_exactly_once_over_two_ranks_two_workers_interleaved(tmp_path, shards_in_flight):
    make_shards(tmp_path, [5] * 12)  # 60 samples, 3 shards per reader
    seen, counts = [], []
    for rank in range(2):
        loader = make_loader(
            str(tmp_path),
            batch_size=4,
            num_workers=2,
            image_size=8,
            rank=rank,
            world_size=2,
            seed=5,
            shards_in_flight=shards_in_flight,
            shuffle_buffer=4,
        )
        keys = _keys(loader)
        counts.append(len(keys))
        seen += keys
    assert counts == [30, 30]
    assert sorted(seen) == [key_of(i) for i in range(60)]


def _head(loader, batches: int) -> list[str]:
    keys = []
    for i, b in enumerate(loader):
        keys += b["keys"]
        if i + 1 == batches:
            break
    return keys


@pytest.mark.parametrize("new", [(3, 2), (1, 1), (1, 3), (2, 2)])
def test_elastic_resume_every_remaining_sample_once_equal_batches(tmp_path, new):
    make_shards(tmp_path, [5] * 8)
    old_world, old_workers = 2, 2
    opts = dict(batch_size=3, image_size=8, seed=4, shards_in_flight=2, shuffle_buffer=4)
    head, states = [], []
    for rank in range(old_world):
        loader = make_loader(str(tmp_path), num_workers=old_workers, rank=rank, world_size=old_world, **opts)
        head += _head(loader, 3)  # ranks step together, as under DDP
        states.append(json.loads(json.dumps(loader.state_dict())))
    state = merge_state_dicts(states)
    world, workers = new
    tails, lens = [], []
    for rank in range(world):
        loader = make_loader(str(tmp_path), num_workers=workers, rank=rank, world_size=world, **opts)
        loader.load_state_dict(state)
        batches = list(loader)
        lens.append((len(batches), len(loader)))
        tails += [k for b in batches for k in b["keys"]]
    assert sorted(head + tails) == ALL40  # none repeated, none lost
    assert len({n for n, _ in lens}) == 1  # equal batches per rank
    if new == (old_world, old_workers):  # exact resume: the rest of the saved run's epoch
        assert all(n == m - 3 for n, m in lens)
    else:  # elastic: len() is the rest of the epoch
        assert all(n == m for n, m in lens)


def test_elastic_state_needs_every_rank(tmp_path):
    make_shards(tmp_path, [5] * 8)
    a = make_loader(str(tmp_path), batch_size=2, num_workers=0, rank=0, world_size=2, image_size=8)
    _head(a, 1)
    b = make_loader(str(tmp_path), batch_size=2, num_workers=0, image_size=8)
    with pytest.raises(
        ValueError, match=r"from the state of ranks \[0\] of 2: save it under torch.distributed"
    ):
        b.load_state_dict(a.state_dict())


def test_state_is_compact_and_json(tmp_path):
    make_shards(tmp_path, [5] * 8)
    loader = make_loader(str(tmp_path), batch_size=2, num_workers=0, image_size=8)
    _head(loader, 2)
    state = loader.state_dict()
    assert len(json.dumps(state)) < 2000
    mine = state["readers"]["0"]
    assert (mine["pos"], mine["good"], mine["skipped"]) == (4, 4, {})
    assert set(mine["where"]) == {"pass", "buffered", "open"}  # byte spans a resume reads again


# ------------------------------------------------------------------------------------ API and _info.json


@pytest.mark.parametrize(
    "state,match",
    [
        ({"world_size": 1}, r"not a ReLabelDataset state_dict \(missing \['base', 'batch_size'"),
        ([1, 2], r"not a ReLabelDataset state_dict \(missing all\)"),
    ],
)
def test_foreign_state_is_a_clear_error(tmp_path, state, match):
    make_shards(tmp_path, [4])
    loader = make_loader(str(tmp_path), batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=match):
        loader.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size="4"), "batch_size must be an integer >= 1, got '4'"),
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(num_workers=1.5), "num_workers must be an integer >= 0, got 1.5"),
        (dict(shards_in_flight=0), "shards_in_flight must be an integer >= 1, got 0"),
    ],
)
def test_bad_loader_options(tmp_path, kwargs, match):
    make_shards(tmp_path, [4, 4])
    opts = dict(batch_size=2, num_workers=0) | kwargs
    with pytest.raises(ValueError, match=match):
        make_loader(str(tmp_path), **opts)


def _set_lengths(path, lengths):
    info = json.loads((path / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"] = lengths
    (path / "_info.json").write_text(json.dumps(info))


def test_non_integer_shard_length_names_info_json(tmp_path):
    make_shards(tmp_path, [4, 4])
    _set_lengths(tmp_path, [4, 4.5])
    with pytest.raises(
        ValueError,
        match=r"_info.json: shard_lengths gives 4.5 for train-000001.tar; expected a "
        r"non-negative integer",
    ):
        ReLabelDataset(str(tmp_path))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_longer_than_info_json_says_is_an_error_or_a_count(tmp_path, num_workers):
    make_shards(tmp_path, [5, 5, 5, 5])
    _set_lengths(tmp_path, [5, 3, 5, 5])  # shard 1 holds 5
    opts = dict(batch_size=2, num_workers=num_workers, image_size=8)
    with pytest.raises(
        ValueError,
        match=r"train-000001\.tar: _info.json says 3 samples, the shard holds more "
        r"\(key 's00008' is sample 4\)",
    ):
        list(make_loader(str(tmp_path), **opts))
    loader = make_loader(str(tmp_path), on_error="skip", **opts)
    keys = _keys(loader)
    assert len(keys) == 18 and loader.skipped == {"length_mismatch": 1}


def test_class_sorted_warning_is_logged_once(sorted_data, monkeypatch, caplog):
    import relabel_shards.loader as loader_mod

    calls = []

    def fake(split_info, *, batch_size, shards_in_flight):
        calls.append((split_info["num_samples"], batch_size, shards_in_flight))
        return "class-sorted shards: ~2 classes per batch"

    monkeypatch.setattr(loader_mod, "class_sorted_warning", fake)
    with caplog.at_level(logging.WARNING, logger="relabel_shards.loader"):
        make_loader(sorted_data, batch_size=16, num_workers=0, shards_in_flight=3)
    assert calls == [(168, 16, 3)]
    assert [r.getMessage() for r in caplog.records].count("class-sorted shards: ~2 classes per batch") == 1


# ------------------------------------------------------------------------------------ bytes on resume


@pytest.mark.network
@pytest.mark.slow
def test_resume_at_90_percent_reads_again_at_most_5_percent_of_the_bytes(s3_bucket, monkeypatch):
    """Bytes fetched from the S3 server on loopback (s3fs's range GETs, ``_cat_file``: every read of the
    loader's bounded openers and of its resume fetches), per object."""
    import s3fs

    url = f"{s3_bucket}/resume"
    make_shards(url, [6] * 100)
    fetched: dict[str, int] = {}
    real = s3fs.S3FileSystem._cat_file

    async def counting(self, path, *args, **kwargs):
        data = await real(self, path, *args, **kwargs)
        fetched[path] = fetched.get(path, 0) + len(data)
        return data

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counting)
    fs = s3fs.S3FileSystem()
    epoch_bytes = sum(fs.size(p) for p in fs.glob(f"{url}/*.tar"))
    opts = dict(batch_size=10, num_workers=0, image_size=8, seed=1, shards_in_flight=2, shuffle_buffer=4)
    first = make_loader(url, **opts)
    head = _head(first, 54)  # 540 of 600 samples: 90 %
    state = json.loads(json.dumps(first.state_dict()))
    before = {k: v for k, v in fetched.items() if k.endswith(".tar")}
    assert sum(before.values()) >= 0.85 * epoch_bytes
    fetched.clear()
    second = make_loader(url, **opts)
    second.load_state_dict(state)
    tail = _keys(second)
    assert sorted(head + tail) == [key_of(i) for i in range(600)]
    after = {k: v for k, v in fetched.items() if k.endswith(".tar")}
    again = sum(v for k, v in after.items() if k in before)  # shards read before the checkpoint, read again
    assert again <= 0.05 * epoch_bytes, (again, epoch_bytes)
    assert sum(after.values()) <= 0.2 * epoch_bytes  # the 10 % still to read, plus the shards read again
    # elastic: the same state resumed by 2 ranks (the rest of the epoch dealt afresh)
    fetched.clear()
    tails = []
    for rank in range(2):
        loader = make_loader(url, rank=rank, world_size=2, **opts)
        loader.load_state_dict(state)
        tails += _keys(loader)
    assert sorted(head + tails) == [key_of(i) for i in range(600)]
    after = {k: v for k, v in fetched.items() if k.endswith(".tar")}
    again = sum(v for k, v in after.items() if k in before)
    assert again <= 0.05 * epoch_bytes, (again, epoch_bytes)


def test_record_header_checked_against_the_dataset_before_decoding(tmp_path, monkeypatch):
    """A record whose header disagrees with _info.json's geometry is refused before its payload is touched
    (a valid record of the largest declared size would cost seconds and hundreds of MB to decode)."""
    import relabel_shards.decode as decode_mod
    from relabel_shards.labelmap import encode_label_map

    big = encode_label_map(np.ones((5, 30, 30), np.float32), np.zeros((5, 30, 30), np.int64), NUM_CLASSES)

    def other(i, members):
        return [(n, big if n.endswith(".rlm") and i == 2 else d) for n, d in members]

    make_shards(tmp_path, [4, 4], transform=other)
    decoded = []
    real = decode_mod.decode_label_map
    monkeypatch.setattr(decode_mod, "decode_label_map", lambda data: decoded.append(len(data)) or real(data))
    loader = make_loader(str(tmp_path), batch_size=4, num_workers=0, image_size=8, on_error="skip")
    assert len(_keys(loader)) == 8 and loader.skipped == {"labelmap_mismatch": 1}
    assert len(decoded) == 8 and len(big) not in decoded  # the refused record was never decoded

"""Streaming a join: image shards + label shards read in lockstep, against the same data as full shards."""

from __future__ import annotations

import json

import pytest
import torch
from test_loader_factory import key_of, make_shards, split_into_columns

from relabel_shards.loader import make_loader
from relabel_shards.shards import write_shard


@pytest.fixture(scope="module")
def columns(tmp_path_factory):
    root = tmp_path_factory.mktemp("join")
    make_shards(root / "full", [5] * 8)
    split_into_columns(root / "full", root / "images", root / "labels")
    return root


def _keys(loader) -> list[str]:
    return [k for b in loader for k in b["keys"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_join_streams_what_full_shards_stream(columns, num_workers):
    opts = dict(batch_size=4, num_workers=num_workers, image_size=16, seed=3, shards_in_flight=2)
    full = list(make_loader(str(columns / "full"), **opts))
    join = list(make_loader(str(columns / "images"), labels=str(columns / "labels"), **opts))
    assert len(full) == len(join) == 10
    for a, b in zip(full, join, strict=True):
        assert a["keys"] == b["keys"]
        for name in ("images", "labels", "boxes", "values", "indices", "flips"):
            assert torch.equal(a[name], b[name]), name
    assert sorted(k for b in join for k in b["keys"]) == [key_of(i) for i in range(40)]


def test_several_label_sets_each_under_its_name(columns, tmp_path):
    split_into_columns(columns / "full", tmp_path / "images", tmp_path / "second")
    opts = dict(batch_size=8, num_workers=0, image_size=16, seed=1)
    full = list(make_loader(str(columns / "full"), **opts))
    join = list(
        make_loader(
            str(columns / "images"),
            labels={"teacher": str(columns / "labels"), "other": str(tmp_path / "second")},
            **opts,
        )
    )
    for a, b in zip(full, join, strict=True):
        assert "values" not in b and "indices" not in b
        for name in ("teacher", "other"):
            assert set(b[name]) == {"values", "indices"}
            assert torch.equal(a["values"], b[name]["values"]) and torch.equal(
                a["indices"], b[name]["indices"]
            )


def test_join_resumes_mid_epoch(columns):
    opts = dict(batch_size=3, num_workers=2, image_size=16, seed=7, labels=str(columns / "labels"))
    first = make_loader(str(columns / "images"), **opts)
    head = []
    for i, batch in enumerate(first):
        head += batch["keys"]
        if i == 4:
            break
    second = make_loader(str(columns / "images"), **opts)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert sorted(head + _keys(second)) == [key_of(i) for i in range(40)]


def _edit_info(path, fn):
    info = json.loads(path.read_text())
    fn(info["splits"]["train"])
    path.write_text(json.dumps(info))


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda sp: sp["relabel_shards"]["pairs_with"]["filenames"].__setitem__(3, "other-000003.tar"),
            r"label shard 3 \(train-000003.tar\) pairs with image shard 'other-000003.tar', "
            r"not 'train-000003.tar'",
        ),
        (
            lambda sp: sp["relabel_shards"]["pairs_with"]["shard_lengths"].__setitem__(2, 6),
            r"label shard 2 pairs with 6 samples of 'train-000002.tar'; the image shards' _info.json lists 5",
        ),
        (
            lambda sp: sp["relabel_shards"].__setitem__("kind", "full"),
            r"not a label set \(relabel_shards.kind is 'full', expected 'labels'\)",
        ),
        (lambda sp: sp["relabel_shards"].pop("pairs_with"), r"has no relabel_shards.pairs_with"),
    ],
)
def test_label_set_for_other_images_is_refused_before_reading(columns, tmp_path, edit, match):
    split_into_columns(columns / "full", tmp_path / "images", tmp_path / "labels")
    _edit_info(tmp_path / "labels" / "_info.json", edit)
    with pytest.raises(ValueError, match=match):
        make_loader(str(tmp_path / "images"), labels=str(tmp_path / "labels"), batch_size=2, num_workers=0)


def test_label_set_names_must_be_batch_keys_of_their_own(columns):
    with pytest.raises(ValueError, match="label set names must be Python identifiers other than"):
        make_loader(
            str(columns / "images"), labels={"images": str(columns / "labels")}, batch_size=2, num_workers=0
        )


def _rewrite_label_shard(labels_dir, name, fn):
    from relabel_shards.tarstream import iter_tar_samples

    with open(labels_dir / name, "rb") as f:
        samples = list(iter_tar_samples(f, name))
    samples = fn(samples)
    (labels_dir / name).unlink()
    write_shard(str(labels_dir), name, [[(f"{k}.{e}", d) for e, d in m.items()] for k, m in samples])


def test_key_mismatch_names_both_urls_and_keys_or_is_counted(columns, tmp_path):
    split_into_columns(columns / "full", tmp_path / "images", tmp_path / "labels")
    # swap the records of samples 6 and 7 (keys and all): two samples whose keys disagree
    _rewrite_label_shard(tmp_path / "labels", "train-000001.tar", lambda s: [s[0], s[2], s[1], *s[3:]])
    opts = dict(batch_size=4, image_size=16, labels=str(tmp_path / "labels"), shuffle_buffer=0)
    with pytest.raises(
        ValueError,
        match=r"images/train-000001\.tar: sample 's00006': label shard \S+labels/"
        r"train-000001\.tar has key 's00007' where the image shard has 's00006'",
    ):
        list(make_loader(str(tmp_path / "images"), num_workers=0, **opts))
    loader = make_loader(str(tmp_path / "images"), num_workers=2, on_error="skip", **opts)
    keys = _keys(loader)
    assert not {"s00006", "s00007"} & set(keys) and len(keys) == 40
    assert loader.skipped == {"key_mismatch": 2}


def test_label_shard_shorter_than_its_image_shard(columns, tmp_path):
    split_into_columns(columns / "full", tmp_path / "images", tmp_path / "labels")
    _rewrite_label_shard(tmp_path / "labels", "train-000004.tar", lambda s: s[:3])
    with pytest.raises(
        ValueError,
        match=r"labels/train-000004\.tar: label shard ends after 3 samples, before "
        r"image shard \S+images/train-000004\.tar's key 's00023'",
    ):
        list(
            make_loader(
                str(tmp_path / "images"),
                labels=str(tmp_path / "labels"),
                batch_size=4,
                num_workers=0,
                image_size=16,
            )
        )


@pytest.mark.network
def test_join_from_s3(s3_bucket, tmp_path):
    make_shards(tmp_path / "full", [3, 3, 3, 3])
    split_into_columns(tmp_path / "full", f"{s3_bucket}/images", f"{s3_bucket}/labels")
    opts = dict(batch_size=4, num_workers=2, image_size=16, seed=2)
    local = list(make_loader(str(tmp_path / "full"), **opts))
    remote = list(make_loader(f"{s3_bucket}/images", labels=f"{s3_bucket}/labels", **opts))
    for a, b in zip(local, remote, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["values"], b["values"])


# ------------------------------------------------------------------- records bound to their images


def _needs_binding():
    from relabel_shards import labelmap

    if not hasattr(labelmap, "ImageBinding"):
        pytest.skip("labelmap.ImageBinding (records bound to their image) has not landed")


def _swap_records(a: int, b: int):
    """Swap the .rlm of samples a and b (same shape): each image meets the other's label map."""
    cache: dict = {}

    def transform(i, members):
        if i in (a, b):
            from test_loader_factory import sample

            other = sample(b if i == a else a, bind=True)
            rec = next(d for n, d in other if n.endswith(".rlm"))
            cache[i] = rec
            return [(n, rec if n.endswith(".rlm") else d) for n, d in members]
        return members

    return transform


def test_swapped_records_of_the_same_shape_are_caught(tmp_path):
    _needs_binding()
    make_shards(tmp_path, [5, 5], bind=True, transform=_swap_records(2, 3))
    opts = dict(batch_size=2, image_size=16, shuffle_buffer=0)
    with pytest.raises(
        ValueError,
        match=r"train-000000\.tar: sample 's00002': the label record \(\S+ key "
        r"'s00002'\) was made for an image of \d+ bytes; the image \(\S+ key "
        r"'s00002'\) has \d+",
    ):
        list(make_loader(str(tmp_path), num_workers=0, **opts))
    loader = make_loader(str(tmp_path), num_workers=0, on_error="skip", **opts)
    keys = _keys(loader)
    assert not {"s00002", "s00003"} & set(keys) and loader.skipped == {"image_mismatch": 2}


def test_join_checks_the_record_binding_against_the_image(tmp_path):
    _needs_binding()
    make_shards(tmp_path / "full", [5, 5], bind=True, transform=_swap_records(6, 7))
    split_into_columns(tmp_path / "full", tmp_path / "images", tmp_path / "labels")
    with pytest.raises(
        ValueError,
        match=r"images/train-000001\.tar: sample 's00006': the label record "
        r"\(\S+labels/train-000001\.tar key 's00006'\) was made for an image",
    ):
        list(
            make_loader(
                str(tmp_path / "images"),
                labels=str(tmp_path / "labels"),
                batch_size=2,
                num_workers=0,
                image_size=16,
                shuffle_buffer=0,
            )
        )


@pytest.mark.slow  # two small builds with the annotator
def test_join_of_built_label_shards_streams_the_full_builds_maps(tmp_path):
    """The loader half of issue 9's oracle: `build --labels-only` joined to its image shards gives, key for
    key, the label maps a full build of the same image shards gives; an image the build could not annotate
    (an empty record keeps its place) is skipped and counted, also with on_error="raise"."""
    from labels_factory import make_image_shards

    from relabel_shards.build import build_shards

    keys = [["n01_a", "n01_b", "n02_c"], ["n02_d", "n03_e"], ["n03_f", "n04_g", "n04_h", "n05_i"]]
    imgs = make_image_shards(tmp_path / "imgs", keys, broken={"n03_e"})
    small = {"model": "test_efficientnet", "input_size": 64, "batch_size": 4, "num_workers": 0}
    build_shards(imgs, tmp_path / "labels", labels_only=True, **small)
    build_shards(imgs, tmp_path / "full", **small)
    opts = dict(batch_size=3, num_workers=0, image_size=16, shuffle_buffer=0)
    full = {
        k: (v, i)
        for b in make_loader(str(tmp_path / "full"), **opts)
        for k, v, i in zip(b["keys"], b["values"], b["indices"], strict=True)
    }
    loader = make_loader(str(tmp_path / "imgs"), labels=str(tmp_path / "labels"), **opts)
    seen = set()
    for b in loader:
        for k, v, i in zip(b["keys"], b["values"], b["indices"], strict=True):
            assert torch.equal(v, full[k][0]) and torch.equal(i, full[k][1]), k
            seen.add(k)
    assert seen == set(full) == {k for shard in keys for k in shard} - {"n03_e"}
    assert loader.skipped == {"unlabeled": 1}

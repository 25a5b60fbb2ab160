"""Label shards (``build --labels-only``): one ``key.rlm`` per image, aligned one to one with image shards.

The oracle for the records is a full-shard build of the same image shards with the same settings: its records
carry the same image binding, so they must be the same bytes, key for key (the build-side half of "a join
streams the same label map for every key as full shards"; the loader half needs the stream join).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from labels_factory import make_image_shards, shard_records, tar_members

from relabel_shards.build import build_shards
from relabel_shards.cli import cli
from relabel_shards.labelmap import decode_label_map, read_header
from relabel_shards.pairing import check_pairs_with, key_digest
from relabel_shards.shards import ShardError, get_split, read_info

SMALL = {"model": "test_efficientnet", "input_size": 64, "batch_size": 2, "num_workers": 0}
KEYS = [["n01_a", "n01_b", "n02_c"], ["n02_d", "n03_e"], ["n03_f", "n04_g", "n04_h", "n05_i"]]


@pytest.fixture
def images(tmp_path) -> list[str]:
    return make_image_shards(tmp_path / "imgs", KEYS, broken={"n03_e"})


def test_label_shards_pair_with_the_image_shards_and_hold_the_full_builds_records(images, tmp_path):
    labels, full = tmp_path / "labels", tmp_path / "full"
    summary = build_shards(images, labels, labels_only=True, **SMALL)
    build_shards(images, full, **SMALL)
    split = get_split(read_info(str(labels)), "train")
    section = split["relabel_shards"]
    assert section["kind"] == "labels"
    assert split["shard_lengths"] == [3, 2, 4]  # every key, the broken image's too
    assert section["pairs_with"] == {
        "filenames": ["imgs-train-0000.tar", "imgs-train-0001.tar", "imgs-train-0002.tar"],
        "shard_lengths": [3, 2, 4],
        "key_digests": [key_digest(k) for k in KEYS],
    }
    assert [f["key"] for f in section["failures"]] == ["n03_e"] and len(summary.failures) == 1
    full_split = get_split(read_info(str(full)), "train")
    for i, (img, name, full_name) in enumerate(
        zip(images, split["filenames"], full_split["filenames"], strict=True)
    ):
        members = tar_members(labels / name)
        assert [n for n, _ in members] == [f"{k}.rlm" for k in KEYS[i]]  # one member each, same order
        image_bytes = {n.split(".")[0]: d for n, d in tar_members(img) if n.endswith(".jpg")}
        full_records = shard_records(full / full_name)
        for name_, record in members:
            key = name_.split(".")[0]
            if key == "n03_e":
                assert record == b"" and key not in full_records  # no label: an empty record keeps the place
                continue
            assert record == full_records[key]  # same map, same binding, same bytes
            bound = read_header(record).image
            data = image_bytes[key]
            assert (bound.size, bound.sha256) == (len(data), hashlib.sha256(data).digest())
            import io

            from PIL import Image

            assert (bound.width, bound.height) == Image.open(io.BytesIO(data)).size
            assert decode_label_map(record).values.shape == (5, 2, 2)
    check_pairs_with(split, get_split(read_info(str(tmp_path / "imgs")), "train"))


def test_pairing_errors_name_the_first_differing_shard(images, tmp_path):
    build_shards(images, tmp_path / "labels", labels_only=True, **SMALL)
    labels = get_split(read_info(str(tmp_path / "labels")), "train")
    imgs = get_split(read_info(str(tmp_path / "imgs")), "train")
    other = copy.deepcopy(imgs)
    other["filenames"][1] = "other-0001.tar"
    with pytest.raises(
        ShardError,
        match=r"label shard 1 \(train-000001.tar\) pairs with image shard 'imgs-train-0001.tar', "
        r"not 'other-0001.tar'",
    ):
        check_pairs_with(labels, other)
    other = copy.deepcopy(imgs)
    other["shard_lengths"][2] = 5
    with pytest.raises(
        ShardError, match=r"label shard 2 pairs with 4 samples of 'imgs-train-0002.tar'; .* lists 5"
    ):
        check_pairs_with(labels, other)
    other = copy.deepcopy(imgs)
    other["key_digests"] = [key_digest(k) for k in KEYS]
    other["key_digests"][0] = key_digest(["n01_a", "n02_c", "n01_b"])  # same keys, another order
    with pytest.raises(ShardError, match=r"label shard 0 pairs with other keys than image shard 'imgs-train"):
        check_pairs_with(labels, other)
    other["key_digests"] = [key_digest(k) for k in KEYS]
    check_pairs_with(labels, other)  # digests at the split's top level or in relabel_shards: both read
    other = copy.deepcopy(imgs)
    other["filenames"].pop()
    with pytest.raises(ShardError, match="pairs with 3 image shards .* these image shards are 2"):
        check_pairs_with(labels, other)
    with pytest.raises(ShardError, match=r"not a label set \(relabel_shards.kind is None"):
        check_pairs_with(imgs, imgs)
    no_pairs = copy.deepcopy(labels)
    no_pairs["relabel_shards"]["pairs_with"] = None
    with pytest.raises(ShardError, match="has no relabel_shards.pairs_with.*relabel-shards join"):
        check_pairs_with(no_pairs, imgs)


def test_key_digest_is_sha256_of_keys_joined_by_newlines():
    assert key_digest(["a", "b"]) == hashlib.sha256(b"a\nb").hexdigest()
    assert key_digest([]) == hashlib.sha256(b"").hexdigest()
    assert key_digest(iter(["n01440764_10026"])) == hashlib.sha256(b"n01440764_10026").hexdigest()


def test_strict_stops_at_the_broken_image_and_leaves_no_shard_of_it(images, tmp_path):
    with pytest.raises(ValueError, match=r"imgs-train-0001.tar#n03_e: .*strict"):
        build_shards(images, tmp_path / "labels", labels_only=True, strict=True, **SMALL)
    assert not (tmp_path / "labels" / "train-000001.tar").exists()


def test_two_ranks_write_the_same_label_shards_as_one(images, tmp_path):
    build_shards(images, tmp_path / "one", labels_only=True, name="x", **SMALL)
    for rank in (1, 0):
        build_shards(images, tmp_path / "two", labels_only=True, rank=rank, world_size=2, name="x", **SMALL)
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for p in one.iterdir():
        assert p.read_bytes() == (two / p.name).read_bytes(), p.name


def test_a_full_build_into_a_label_set_is_refused(images, tmp_path):
    build_shards(images, tmp_path / "labels", labels_only=True, **SMALL)
    with pytest.raises(ValueError, match="different build"):
        build_shards(images, tmp_path / "labels", **SMALL)


def test_cli_labels_only(images, tmp_path):
    out = tmp_path / "labels"
    r = CliRunner().invoke(
        cli,
        [
            "build",
            *images,
            str(out),
            "--labels-only",
            "--model",
            "test_efficientnet",
            "--input-size",
            "64",
            "--num-workers",
            "0",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["relabel_shards"]["kind"] == "labels"


def test_labels_only_from_an_image_folder_pairs_with_nothing_yet(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        Image.new("RGB", (40, 30), c == "a" and "red" or "blue").save(tmp_path / "f" / c / f"{c}1.jpg")
    build_shards(str(tmp_path / "f"), tmp_path / "labels", labels_only=True, **SMALL)
    split = get_split(read_info(str(tmp_path / "labels")), "train")
    assert split["relabel_shards"]["kind"] == "labels" and split["relabel_shards"]["pairs_with"] is None
    names = [n for n, _ in tar_members(Path(tmp_path / "labels" / split["filenames"][0]))]
    assert sorted(names) == ["a1.rlm", "b1.rlm"]  # in build's seeded permutation of the folder

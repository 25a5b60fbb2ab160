"""convert --labels-only: the official release as label shards aligned to image shards (timm-style keys).

Oracle: ``split_official_map`` of the saved tensor (lossless encoding: exact) and the image shards' own keys.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from labels_factory import tar_members
from PIL import Image
from test_convert import _make_release

from relabel_shards.cli import cli
from relabel_shards.convert import convert_official_labels
from relabel_shards.labelmap import decode_label_map
from relabel_shards.official_maps import split_official_map
from relabel_shards.pairing import check_pairs_with
from relabel_shards.shards import get_split, read_info, write_info, write_shard


def _image_shards(out, images, saved, order, *, keyed_by_stem=True, extra=None):
    """Image shards whose shard i holds ``order[i]`` (image relpaths), timm's members; keys are the stems or
    opaque ``s0000`` keys with the file name in .json."""
    out.mkdir(parents=True, exist_ok=True)
    recs, n = [], 0
    for i, rels in enumerate(order):
        samples = []
        for rel in rels:
            data = (images / rel).read_bytes() if rel in saved else (extra or {})[rel]
            stem = rel.rsplit("/", 1)[-1].split(".")[0]
            key = stem if keyed_by_stem else f"s{n:04d}"
            n += 1
            meta = {"filename": rel.rsplit("/", 1)[-1], "label": 0}
            samples.append(
                [(f"{key}.jpg", data), (f"{key}.cls", b"0"), (f"{key}.json", json.dumps(meta).encode())]
            )
        recs.append(write_shard(str(out), f"imagenet1k-train-{i:04d}.tar", samples))
    write_info(
        str(out),
        {
            "name": "train",
            "num_samples": n,
            "filenames": [r.filename for r in recs],
            "shard_lengths": [r.num_samples for r in recs],
        },
    )
    return [str(out / r.filename) for r in recs]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return _make_release(tmp_path_factory.mktemp("release"))


def test_official_maps_become_label_shards_aligned_to_image_shards(release, tmp_path):
    images, maps, saved = release
    rels = sorted(saved)
    stray = "n09999999/n09999999_1.JPEG"
    buf = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buf, format="JPEG")
    order = [[rels[5], rels[0], stray], [rels[3], rels[1], rels[6], rels[2], rels[7]]]  # rels[4]: no image
    shards = _image_shards(tmp_path / "imgs", images, saved, order, extra={stray: buf.getvalue()})
    s = convert_official_labels(shards, maps, tmp_path / "labels", encoding="lossless", num_workers=0)
    split = get_split(read_info(str(tmp_path / "labels")), "train")
    check_pairs_with(split, get_split(read_info(str(tmp_path / "imgs")), "train"))
    proj = split["relabel_shards"]
    assert proj["kind"] == "labels" and proj["layout"] == "hw" and proj["num_classes"] == 1000
    assert [f["key"] for f in proj["failures"]] == ["n09999999_1"]
    missing = rels[4].rsplit("/", 1)[-1].split(".")[0]
    assert proj["labels_without_image"] == {"count": 1, "keys": [missing]} and s.labels_without_image == 1
    for i, rels_i in enumerate(order):
        members = tar_members(tmp_path / "labels" / split["filenames"][i])
        assert [n for n, _ in members] == [f"{r.rsplit('/', 1)[-1].split('.')[0]}.rlm" for r in rels_i]
        for (_, record), rel in zip(members, rels_i, strict=True):
            if rel == stray:
                assert record == b""
                continue
            lm = decode_label_map(record)
            values, indices = split_official_map(saved[rel], "hw")
            np.testing.assert_array_equal(lm.values, values)
            np.testing.assert_array_equal(lm.indices, indices)
            data = (images / rel).read_bytes()
            assert lm.image.sha256 == hashlib.sha256(data).digest()
            assert (lm.image.width, lm.image.height) == Image.open(io.BytesIO(data)).size


def test_keys_that_are_not_file_stems_match_by_a_json_field(release, tmp_path):
    images, maps, saved = release
    rels = sorted(saved)
    shards = _image_shards(tmp_path / "imgs", images, saved, [rels[:3], rels[3:]], keyed_by_stem=False)
    s = convert_official_labels(shards, maps, tmp_path / "by_key", num_workers=0)
    assert len(s.failures) == 8  # the keys s0000... name no map
    convert_official_labels(shards, maps, tmp_path / "labels", match_by="json:filename", num_workers=0)
    split = get_split(read_info(str(tmp_path / "labels")), "train")
    assert (
        split["relabel_shards"]["failures"] == []
        and split["relabel_shards"]["labels_without_image"]["count"] == 0
    )
    got = tar_members(tmp_path / "labels" / split["filenames"][1])
    assert [n for n, _ in got] == ["s0003.rlm", "s0004.rlm", "s0005.rlm", "s0006.rlm", "s0007.rlm"]
    lm = decode_label_map(got[0][1])
    np.testing.assert_allclose(lm.values, split_official_map(saved[rels[3]], "hw")[0], atol=0.006)
    with pytest.raises(ValueError, match="match_by must be 'key' or 'json:FIELD'"):
        convert_official_labels(shards, maps, tmp_path / "x", match_by="filename")


def test_strict_and_an_image_folder_are_refused_clearly(release, tmp_path):
    images, maps, saved = release
    rels = sorted(saved)
    shards = _image_shards(tmp_path / "imgs", images, saved, [rels[:4]])
    with pytest.raises(ValueError, match=r"n01443537/: 4 label maps without an image .*\(strict: 4 labels"):
        convert_official_labels(shards, maps, tmp_path / "labels", strict=True, num_workers=0)
    with pytest.raises(ValueError, match="needs image shards as IMAGES"):
        convert_official_labels(str(images), maps, tmp_path / "l2")


def test_cli_convert_labels_only(release, tmp_path):
    images, maps, saved = release
    rels = sorted(saved)
    shards = _image_shards(tmp_path / "imgs", images, saved, [rels])
    r = CliRunner().invoke(
        cli,
        [
            "convert",
            shards[0],
            str(maps),
            str(tmp_path / "labels"),
            "--labels-only",
            "--num-workers",
            "0",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert read_info(str(tmp_path / "labels"))["splits"]["train"]["relabel_shards"]["kind"] == "labels"

"""verify on label shards, and ``verify --images``: every record's image binding against its image."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner
from labels_factory import make_image_shards, make_label_set, tar_members
from PIL import Image

from relabel_shards.cli import cli
from relabel_shards.shards import write_shard
from relabel_shards.verify import verify_shards

KEYS = [["a0", "a1", "a2"], ["b0", "b1"]]


@pytest.fixture
def pair(tmp_path):
    imgs = make_image_shards(tmp_path / "imgs", KEYS)
    make_label_set(tmp_path / "labels", imgs, drop={"b0"})
    return tmp_path / "imgs", tmp_path / "labels"


def test_a_sound_label_set_verifies_alone_and_against_its_images(pair):
    imgs, labels = pair
    report = verify_shards(str(labels))
    assert report.ok, report.problems
    report = verify_shards(str(labels), images=str(imgs))
    assert report.ok, report.problems
    assert report.samples == 5 and report.geometry == (3, 4, 4, 10)


def _regroup(path):
    groups: dict[str, list] = {}
    for n, d in tar_members(path):
        groups.setdefault(n.split(".")[0], []).append((n, d))
    return list(groups.values())


def test_every_image_digest_is_checked(pair):
    imgs, labels = pair
    shard = imgs / "imgs-train-0000.tar"
    samples = _regroup(shard)
    buf = io.BytesIO()
    Image.open(io.BytesIO(samples[1][0][1])).save(buf, format="JPEG", quality=60)  # another copy of a1
    samples[1][0] = ("a1.jpg", buf.getvalue())
    write_shard(str(imgs), shard.name, samples)
    report = verify_shards(str(labels), images=str(imgs))
    assert not report.ok
    assert any(
        "train-000000.tar: key 'a1': the record was made from another image" in p
        and "imgs-train-0000.tar's a1.jpg" in p
        for p in report.problems
    ), report.problems
    assert report.num_problems == 1
    assert verify_shards(str(labels)).ok  # without images only the label shards are read


def test_misaligned_image_shards_and_wrong_pairing_are_named(pair):
    imgs, labels = pair
    shard = imgs / "imgs-train-0001.tar"
    samples = _regroup(shard)
    write_shard(str(imgs), shard.name, samples[::-1])  # b1 before b0
    report = verify_shards(str(labels), images=str(imgs))
    assert any(
        "train-000001.tar: key 'b0': the image shard" in p and "has key 'b1' here" in p
        for p in report.problems
    ), report.problems
    info = json.loads((imgs / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"] = [3, 3]
    (imgs / "_info.json").write_text(json.dumps(info))
    report = verify_shards(str(labels), images=str(imgs))
    assert any("label shard 1 pairs with 2 samples of 'imgs-train-0001.tar'" in p for p in report.problems)


def test_an_empty_record_must_be_a_listed_failure(pair):
    imgs, labels = pair
    info = json.loads((labels / "_info.json").read_text())
    info["splits"]["train"]["relabel_shards"]["failures"] = []
    (labels / "_info.json").write_text(json.dumps(info))
    report = verify_shards(str(labels))
    assert report.problems == [
        "train-000001.tar: key 'b0': empty .rlm (no label) but the key is not listed in failures"
    ]


def test_cli_verify_images(pair):
    imgs, labels = pair
    r = CliRunner().invoke(cli, ["verify", str(labels), "--images", str(imgs), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("OK:")

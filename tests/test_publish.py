"""publish: a release in a folder, on S3 (moto on loopback) and read back over HTTP; the card, SHA256SUMS.

Oracles: GNU ``sha256sum -c`` itself, huggingface_hub's DatasetCard loader, the ``datasets`` library's
``webdataset`` builder reading the published folder offline, and verify/info/show reading the release back.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from labels_factory import make_image_shards, make_label_set

from relabel_shards.cli import cli
from relabel_shards.describe import describe
from relabel_shards.publish import parse_hf_dest, publish
from relabel_shards.shards import ShardError
from relabel_shards.verify import verify_shards

KEYS = [["n01_a", "n01_b", "n02_c"], ["n02_d", "n03_e"]]


@pytest.fixture
def release(tmp_path):
    imgs = make_image_shards(tmp_path / "imgs", KEYS)
    make_label_set(tmp_path / "labels", imgs, drop={"n02_d"}, num_classes=1000)
    return tmp_path / "imgs", tmp_path / "labels"


def _sha256sum_c(folder):
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum on this machine")
    return subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True)


def test_publish_to_a_folder_checks_with_sha256sum_and_resumes(release, tmp_path):
    imgs, labels = release
    dest = tmp_path / "dest"
    s = publish(labels, dest, images=str(imgs))
    names = sorted(p.name for p in dest.iterdir())
    assert names == [
        "README.md",
        "SHA256SUMS",
        "_info.json",
        "preview.png",
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert sorted(s.uploaded) == names
    done = _sha256sum_c(dest)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": OK") == 5  # everything but SHA256SUMS itself
    assert (dest / "_info.json").read_bytes() == (labels / "_info.json").read_bytes()
    again = publish(labels, dest, images=str(imgs))
    assert again.uploaded == [] and sorted(again.kept) == names
    (dest / "train-000001.tar").write_bytes(b"damaged")  # a partial upload, say
    third = publish(labels, dest, images=str(imgs))
    assert third.uploaded == ["train-000001.tar"]
    assert _sha256sum_c(dest).returncode == 0
    (dest / "train-000000.tar").write_bytes(b"x")
    assert _sha256sum_c(dest).returncode != 0  # the oracle can fail


def test_a_damaged_dataset_is_not_published(release, tmp_path):
    _, labels = release
    data = bytearray((labels / "train-000000.tar").read_bytes())
    data[600] ^= 1
    (labels / "train-000000.tar").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000000.tar: .* the dataset is damaged"):
        publish(labels, tmp_path / "dest")


def test_card_metadata_parses_with_huggingface_hub(release, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    imgs, labels = release
    s = publish(labels, tmp_path / "dest", images=str(imgs))
    card = hub.DatasetCard.load(tmp_path / "dest" / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "other" and data["license_name"] == "imagenet"
    assert data["license_link"] == "https://www.image-net.org/download.php"
    assert data["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "train-*.tar"}]}
    ]
    assert "imagenet" in data["tags"] and "webdataset" in data["tags"]
    text = card.text
    assert "imgs-train-0000.tar" in text and "swap_xy" in text and "bytes per sample" in text
    assert "1 image without a label: `n02_d`" in text and "![" in text
    assert "weights license" in text and s.card.startswith("---\n")
    assert "label-map record, format version 2" in text  # read from a record: the binding's version


def test_label_shards_and_full_shards_load_with_the_datasets_webdataset_builder(
    release, tmp_path, monkeypatch
):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    imgs, labels = release
    publish(labels, tmp_path / "dest", images=str(imgs))
    ds = datasets.load_dataset(str(tmp_path / "dest"), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 5 and sorted(ds.column_names) == ["__key__", "__url__", "rlm"]
    by_key = {r["__key__"]: r["rlm"] for r in ds}
    assert by_key["n02_d"] == b"" and by_key["n01_a"][:4] == b"\x89RLM"

    from relabel_shards.join import join_labels

    join_labels(labels, [str(p) for p in sorted(imgs.glob("*.tar"))], tmp_path / "full", num_workers=0)
    files = sorted(str(p) for p in (tmp_path / "full").glob("*.tar"))
    full = datasets.load_dataset(
        "webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "cache2")
    )
    assert full.num_rows == 4 and {"jpg", "cls", "rlm", "__key__"} <= set(full.column_names)
    assert full[0]["rlm"][:4] == b"\x89RLM" and full[0]["jpg"].size[0] > 0


def test_publish_to_s3_and_read_back(release, tmp_path, s3_bucket):
    imgs, labels = release
    dest = f"{s3_bucket}/rel"
    s = publish(labels, dest, images=str(imgs))
    assert len(s.uploaded) == 6
    assert publish(labels, dest).uploaded == ["README.md", "SHA256SUMS"]  # no preview now: a new card
    report = verify_shards(dest)
    assert report.ok, report.problems
    assert verify_shards(dest, images=str(imgs)).ok
    assert "label shards: pair with 2 image shards (imgs-train-0000.tar … imgs-train-0001.tar, 5 samples" in (
        describe(dest)
    )
    from relabel_shards.show import show_sample

    shown = show_sample(dest, "n01_b", tmp_path / "s3.png", images=str(imgs), topk=2)
    assert shown.shard == "train-000000.tar" and (tmp_path / "s3.png").stat().st_size > 1000
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.get(dest.removeprefix("s3://") + "/", str(tmp_path / "down") + "/", recursive=True)
    assert _sha256sum_c(tmp_path / "down").returncode == 0


def test_a_release_read_over_http(release, tmp_path, http_dir):
    imgs, labels = release
    root, url = http_dir
    join_labels_dir = tmp_path / "full"
    from relabel_shards.join import join_labels

    join_labels(labels, [str(p) for p in sorted(imgs.glob("*.tar"))], join_labels_dir, num_workers=0)
    publish(labels, root / "labels")
    publish(join_labels_dir, root / "full")
    report = verify_shards(f"{url}/labels")
    assert report.ok and report.samples == 5, report.problems
    assert verify_shards(f"{url}/full").ok
    r = CliRunner().invoke(cli, ["info", f"{url}/labels"])
    assert r.exit_code == 0 and "5 samples" in r.output, r.output
    r = CliRunner().invoke(cli, ["show", f"{url}/full", "--key", "n01_b", "-o", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.png").stat().st_size > 1000
    r = CliRunner().invoke(
        cli, ["show", f"{url}/labels", "--key", "n03_e", "-o", str(tmp_path / "l.png"), "--images", str(imgs)]
    )
    assert r.exit_code == 0, r.output
    assert "n03_e from train-000001.tar" in r.output
    r = CliRunner().invoke(cli, ["show", f"{url}/labels", "--key", "n03_e", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and "show needs an image" in r.output
    assert json.loads((root / "full" / "_info.json").read_text())["splits"]["train"]["num_samples"] == 4


def test_hf_destinations_are_parsed_and_fail_clearly_offline(release, tmp_path, monkeypatch):
    assert parse_hf_dest("hf://datasets/org/name") == ("org/name", "")
    assert parse_hf_dest("hf://datasets/org/name/labels/v1/") == ("org/name", "labels/v1")
    for bad in ("hf://org/name", "hf://models/org/name", "hf://datasets/org", "hf://datasets/o/n@main"):
        with pytest.raises(ValueError, match="needs hf://datasets/ORG/NAME"):
            parse_hf_dest(bad)
    _, labels = release
    with pytest.raises(ValueError, match="needs hf://datasets/ORG/NAME"):
        publish(labels, "hf://org/name")
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="cannot reach the Hugging Face Hub repository org/name"):
        publish(labels, "hf://datasets/org/name", token="hf_test_not_a_token")


def test_cli_publish(release, tmp_path):
    imgs, labels = release
    r = CliRunner().invoke(
        cli, ["publish", str(labels), str(tmp_path / "d"), "--images", str(imgs), "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert "6 files" in r.output and "sha256sum -c SHA256SUMS" in r.output
    r = CliRunner().invoke(cli, ["publish", str(labels), "hf://nope/x", "--no-progress"])
    assert r.exit_code == 1 and "needs hf://datasets/ORG/NAME" in r.output


def test_publish_to_gcs(release, tmp_path, gcs_endpoint):
    import gcsfs

    imgs, labels = release
    opts = {"token": "anon", "project": "test"}
    fs = gcsfs.GCSFileSystem(**opts)
    fs.mkdir("relabel-publish-test")
    dest = "gs://relabel-publish-test/rel"
    s = publish(labels, dest, images=str(imgs), dest_storage_options=opts)
    assert len(s.uploaded) == 6
    assert sorted(publish(labels, dest, images=str(imgs), dest_storage_options=opts).kept) == sorted(
        s.uploaded
    )
    assert verify_shards(dest, storage_options=opts).ok
    sums = fs.cat_file("relabel-publish-test/rel/SHA256SUMS").decode()
    assert f"{s.files['train-000000.tar'][1]}  train-000000.tar" in sums.splitlines()


def test_the_readme_release_flow_on_the_command_line(tmp_path):
    """GPU owner: build --labels-only, verify --images, publish; user: sha256sum -c, info, verify --images."""
    imgs = make_image_shards(tmp_path / "imgs", KEYS)
    run = CliRunner().invoke
    pattern = str(tmp_path / "imgs" / "imgs-train-{0000..0001}.tar")
    r = run(
        cli,
        [
            "build",
            pattern,
            str(tmp_path / "labels"),
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
    r = run(cli, ["verify", str(tmp_path / "labels"), "--images", str(tmp_path / "imgs"), "--no-progress"])
    assert r.exit_code == 0 and r.output.startswith("OK:"), r.output
    r = run(
        cli,
        [
            "publish",
            str(tmp_path / "labels"),
            str(tmp_path / "release"),
            "--images",
            str(tmp_path / "imgs"),
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert _sha256sum_c(tmp_path / "release").returncode == 0
    r = run(cli, ["info", str(tmp_path / "release")])
    assert "label shards: pair with 2 image shards" in r.output, r.output
    r = run(cli, ["verify", str(tmp_path / "release"), "--images", str(tmp_path / "imgs"), "--no-progress"])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "release" / "README.md").read_text()
    assert "test_efficientnet with random weights" in card and len(imgs) == 2

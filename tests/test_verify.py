"""verify_shards: passes sound datasets; names shard, key and fault for every kind of damage."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from shard_factory import make_dataset

from relabel_shards.shards import INFO_NAME, split_member_name, write_shard
from relabel_shards.verify import verify_shards


def read_samples(path: Path) -> list[list[tuple[str, bytes]]]:
    """The samples of a tar, each a list of (member name, bytes) in tar order."""
    samples: list[list[tuple[str, bytes]]] = []
    last = None
    with tarfile.open(path) as tar:
        for m in tar:
            key, _ = split_member_name(m.name)
            if key != last:
                samples.append([])
                last = key
            samples[-1].append((m.name, tar.extractfile(m).read()))
    return samples


def rewrite_shard(out: Path, filename: str, mutate) -> None:
    """Rewrite one shard with ``mutate(samples)`` applied and update _info.json to match it exactly,
    so that the only fault left is the one the test put in."""
    samples = mutate(read_samples(out / filename))
    rec = write_shard(str(out), filename, samples)
    info = json.loads((out / INFO_NAME).read_text())
    split = info["splits"]["train"]
    i = split["filenames"].index(filename)
    split["shard_lengths"][i] = rec.num_samples
    split["num_samples"] = sum(split["shard_lengths"])
    split["relabel_shards"]["shards"][i] = {"filename": filename, "num_samples": rec.num_samples,
                                            "bytes": rec.bytes, "sha256": rec.sha256}
    (out / INFO_NAME).write_text(json.dumps(info))


@pytest.fixture
def dataset(tmp_path) -> Path:
    # train-000000 (img000..003), train-000001 (img004, 005)
    make_dataset(tmp_path, num_samples=6, shard_size=4)
    return tmp_path


def test_sound_dataset_passes(dataset):
    progress: list[int] = []
    report = verify_shards(str(dataset), progress=progress.append)
    assert report.ok, report.problems
    assert (report.shards, report.samples, report.geometry) == (2, 6, (3, 4, 6, 10))
    sizes = [(dataset / f"train-00000{i}.tar").stat().st_size for i in range(2)]
    assert report.bytes == sum(progress) == sum(sizes)
    assert report.summary().startswith("OK: split 'train' of ")
    assert "6 samples in 2 shards" in report.summary()


def test_corrupt_label_map_names_shard_and_key(dataset):
    def corrupt(samples):
        name, data = samples[2][3]
        assert name == "img002.rlm"
        samples[2][3] = (name, data[: len(data) // 2] + bytes(8))
        return samples

    rewrite_shard(dataset, "train-000000.tar", corrupt)
    report = verify_shards(str(dataset))
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith("train-000000.tar: key 'img002': label map: ")


def test_missing_member(dataset):
    def drop_rlm(samples):
        samples[1] = [m for m in samples[1] if not m[0].endswith(".rlm")]
        return samples

    rewrite_shard(dataset, "train-000001.tar", drop_rlm)
    report = verify_shards(str(dataset))
    assert report.problems == [
        "train-000001.tar: key 'img005': missing .rlm member (members: cls, json, png)"]


def test_truncated_tar(dataset):
    path = dataset / "train-000000.tar"
    data = path.read_bytes()
    members = tarfile.open(path).getmembers()
    starts = [m.offset for m in members]
    # cut inside a member's data, and exactly at a member boundary (where tarfile itself stops quietly)
    for cut, fault in [(members[7].offset_data + 100, "unreadable tar after key 'img001'"),
                       (starts[5], f"unreadable tar after key 'img001' (ReadError: truncated: data ends at "
                                   f"byte {starts[5]} without the end-of-archive marker)")]:
        path.write_bytes(data[:cut])
        report = verify_shards(str(dataset))
        text = "\n".join(report.problems)
        assert f"train-000000.tar: {fault}" in text
        assert "truncated" in text
        assert f"train-000000.tar: {cut:,} bytes, _info.json says {len(data):,} (truncated?)" in text
        assert "train-000001.tar" not in text  # the sound shard is still read and passes


def test_sha_mismatch_same_size(dataset):
    path = dataset / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside img004.png's bytes (the first member's data starts after two 512-byte headers)
    path.write_bytes(bytes(data))
    report = verify_shards(str(dataset))
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith("train-000001.tar: sha256 ")
    assert "differs from _info.json's" in report.problems[0]


def test_count_mismatch(dataset):
    info = json.loads((dataset / INFO_NAME).read_text())
    split = info["splits"]["train"]
    split["shard_lengths"][1] += 1
    split["num_samples"] += 1
    (dataset / INFO_NAME).write_text(json.dumps(info))
    report = verify_shards(str(dataset))
    assert report.problems == ["train-000001.tar: 2 samples read, _info.json says 3"]
    assert report.summary().startswith("FAILED: split 'train' of ")


def test_missing_shard(dataset):
    (dataset / "train-000001.tar").unlink()
    report = verify_shards(str(dataset))
    assert len(report.problems) == 1
    assert report.problems[0].startswith("train-000001.tar: missing (listed in _info.json")


def test_layout_faults_not_adjacent_duplicate_dotted(dataset):
    def scramble(samples):
        s0, s1 = samples[0], samples[1]
        # img001's members split around img000's; img003 renamed to a duplicate of a key in shard 1
        samples[0] = s1[:2]
        samples[1] = s0
        samples.insert(2, s1[2:])
        samples[4] = [(n.replace("img003", "img004"), d) for n, d in samples[4]]
        return samples

    rewrite_shard(dataset, "train-000000.tar", scramble)
    report = verify_shards(str(dataset))
    text = "\n".join(report.problems)
    assert "train-000000.tar: key 'img001': members not adjacent" in text
    assert "train-000001.tar: key 'img004': duplicate key, already in train-000000.tar" in text

    def dotted(samples):
        samples[1] = [(n.replace("img005", "img.005"), d) for n, d in samples[1]]
        return samples

    rewrite_shard(dataset, "train-000001.tar", dotted)
    text = "\n".join(verify_shards(str(dataset)).problems)
    assert "member 'img.005.png': its name holds more than one dot" in text


def test_label_map_shape_disagrees_with_info(dataset):
    info = json.loads((dataset / INFO_NAME).read_text())
    info["splits"]["train"]["relabel_shards"]["height"] = 5
    (dataset / INFO_NAME).write_text(json.dumps(info))
    report = verify_shards(str(dataset))
    assert report.problems == ["train-000000.tar: key 'img000': label map has k=3 h=4 w=6 C=10, "
                               "_info.json says k=3 h=5 w=6 C=10"]


def test_mixed_label_map_shapes(tmp_path):
    make_dataset(tmp_path / "a", num_samples=2, shard_size=2, k=3)
    make_dataset(tmp_path / "b", num_samples=2, shard_size=2, k=2)
    odd = read_samples(tmp_path / "b" / "train-000000.tar")[1]
    rewrite_shard(tmp_path / "a", "train-000000.tar", lambda s: [s[0], [(n.replace("001", "009"), d)
                                                                        for n, d in odd]])
    report = verify_shards(str(tmp_path / "a"))
    text = "\n".join(report.problems)
    assert "train-000000.tar: key 'img009': label map has k=2 h=4 w=6 C=10, _info.json says k=3" in text
    assert "label maps differ in shape across the split (k=3 4x6 C=10: 1, k=2 4x6 C=10: 1)" in text


def test_problem_list_is_bounded(tmp_path):
    make_dataset(tmp_path, num_samples=12, shard_size=12)
    rewrite_shard(tmp_path, "train-000000.tar",
                  lambda s: [[m for m in x if m[0].endswith(".png")] for x in s])
    report = verify_shards(str(tmp_path), max_problems=5)
    assert report.num_problems == 36  # 12 samples x (cls, json, rlm)
    assert len(report.problems) == 5
    assert "(31 not listed)" in report.summary()
    with pytest.raises(ValueError, match=r"max_problems must be >= 1, got 0"):
        verify_shards(str(tmp_path), max_problems=0)


def test_errors_before_reading(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no _info.json at .*_info.json"):
        verify_shards(str(tmp_path))
    make_dataset(tmp_path, num_samples=1)
    with pytest.raises(ValueError, match=r"has no split 'val'; it holds \['train'\]"):
        verify_shards(str(tmp_path), split="val")


@pytest.mark.network
def test_verify_over_http_and_s3(http_dir, s3_bucket):
    local, url = http_dir
    make_dataset(local, num_samples=5, shard_size=2)
    report = verify_shards(url)
    assert report.ok and (report.shards, report.samples) == (3, 5), report.problems
    (local / "train-000002.tar").write_bytes(np.zeros(1024, np.uint8).tobytes())
    report = verify_shards(url)
    assert any(p.startswith("train-000002.tar: 0 samples read, _info.json says 1") for p in report.problems)

    make_dataset(f"{s3_bucket}/ds", num_samples=3, shard_size=2)
    report = verify_shards(f"{s3_bucket}/ds")
    assert report.ok and report.samples == 3, report.problems


def test_declared_map_shapes_are_accepted(tmp_path):
    # a keep-aspect build: maps of several (h, w), declared in _info.json's map_shapes, height/width None
    make_dataset(tmp_path / "a", num_samples=2, shard_size=2, h=4, w=6)
    make_dataset(tmp_path / "b", num_samples=2, shard_size=2, h=4, w=5)
    odd = read_samples(tmp_path / "b" / "train-000000.tar")[1]
    rewrite_shard(tmp_path / "a", "train-000000.tar", lambda s: [s[0], [(n.replace("001", "009"), d)
                                                                        for n, d in odd]])
    info = json.loads((tmp_path / "a" / INFO_NAME).read_text())
    section = info["splits"]["train"]["relabel_shards"]
    section.update(height=None, width=None, map_shapes=[[4, 5], [4, 6]])
    (tmp_path / "a" / INFO_NAME).write_text(json.dumps(info))
    report = verify_shards(str(tmp_path / "a"))
    assert report.ok and report.map_shapes == {(4, 5), (4, 6)}
    assert report.summary().endswith("label maps k=3 C=10 in 2 shapes (h x w)")
    section["map_shapes"] = [[4, 6]]
    (tmp_path / "a" / INFO_NAME).write_text(json.dumps(info))
    text = "\n".join(verify_shards(str(tmp_path / "a")).problems)
    assert "label maps differ in shape across the split (k=3 4x6 C=10: 1, k=3 4x5 C=10: 1)" in text


def test_duplicates_across_many_shards_are_each_named_with_the_first_shard(tmp_path):
    # keys are tracked as 64-bit hashes (bounded memory at 13M keys); a duplicate is still named by key
    make_dataset(tmp_path, num_samples=8, shard_size=2)  # img000..img007 in 4 shards

    def rename(old, new):
        return lambda samples: [[(n.replace(old, new), d) for n, d in s] for s in samples]

    rewrite_shard(tmp_path, "train-000002.tar", rename("img004", "img001"))
    rewrite_shard(tmp_path, "train-000003.tar", rename("img007", "img001"))
    problems = verify_shards(str(tmp_path)).problems
    assert sorted(p for p in problems if "duplicate" in p) == [
        "train-000002.tar: key 'img001': duplicate key, already in train-000000.tar",
        "train-000003.tar: key 'img001': duplicate key, already in train-000000.tar",
    ]


def test_build_from_input_shards_without_json_passes_verify(tmp_path):
    """build passes input shards' members through as they are: with no .json in the input there is none in
    the output, and verify checks what build promises for that kind of source (it used to say "missing .json
    member" on every sample of such a healthy build)."""
    import io

    from PIL import Image

    from relabel_shards.build import build_shards

    def jpeg(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    src = tmp_path / "in"
    for si in range(2):
        write_shard(str(src), f"in-{si:06d}.tar", [[(f"k{si}{j}.jpg", jpeg(j)), (f"k{si}{j}.cls", b"1")]
                                                    for j in range(2)])
    out = tmp_path / "ds"
    build_shards(str(src / "in-{000000..000001}.tar"), str(out), model="test_efficientnet", input_size=64,
                 num_workers=0)
    info = json.loads((out / INFO_NAME).read_text())
    assert info["splits"]["train"]["relabel_shards"]["source"]["kind"] == "shards"
    report = verify_shards(str(out))
    assert report.ok and report.samples == 4, report.problems
    # the rule follows the source kind: where build writes .json itself (folder, list), it is required
    info["splits"]["train"]["relabel_shards"]["source"]["kind"] = "folder"
    (out / INFO_NAME).write_text(json.dumps(info))
    report = verify_shards(str(out))
    assert report.problems[0] == "train-000000.tar: key 'k00': missing .json member (members: cls, jpg, rlm)"

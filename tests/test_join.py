"""join_labels: a label set paired with images sharded another way, by key.

Oracle: the label set's own record of each key (read straight from its tar), and the image shards' own
members; a record moves unchanged when its image binding names the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from labels_factory import jpeg, make_image_shards, make_label_set, shard_records, tar_members
from PIL import Image

from relabel_shards.cli import cli
from relabel_shards.join import build_index, join_labels
from relabel_shards.labelmap import decode_label_map, read_header
from relabel_shards.pairing import KIND_LABELS, check_pairs_with
from relabel_shards.shards import ShardError, get_split, make_split_info, read_info, write_info, write_shard

KEYS = [["a0", "a1", "a2"], ["b0", "b1"], ["c0", "c1", "c2"]]


def _images_of(paths) -> dict[str, bytes]:
    return {n.split(".")[0]: d for p in paths for n, d in tar_members(p) if n.endswith(".jpg")}


@pytest.fixture
def setup(tmp_path):
    """A: image shards with a label set L; B: the same images resharded and shuffled, minus a2, plus x9."""
    a = make_image_shards(tmp_path / "A", KEYS)
    labels = make_label_set(tmp_path / "L", a)
    imgs = _images_of(a)
    b_keys = [["c1", "a0", "x9"], ["b1", "c0", "a1", "b0"], ["c2"]]
    b_dir = tmp_path / "B"
    b_dir.mkdir()
    recs = []
    for i, keys in enumerate(b_keys):
        samples = [[(f"{k}.jpg", imgs.get(k) or jpeg(99)), (f"{k}.cls", b"3")] for k in keys]
        recs.append(write_shard(str(b_dir), f"other-{i:03d}.tar", samples))
    write_info(
        str(b_dir),
        {
            "name": "train",
            "num_samples": 8,
            "filenames": [r.filename for r in recs],
            "shard_lengths": [r.num_samples for r in recs],
        },
    )
    return tmp_path, labels, [str(b_dir / r.filename) for r in recs], b_keys


def test_join_to_full_shards_moves_each_keys_record_and_lists_the_unpaired(setup):
    tmp, labels, b, b_keys = setup
    s = join_labels(tmp / "L", b, tmp / "out", num_workers=0)
    info = get_split(read_info(str(tmp / "out")), "train")
    proj = info["relabel_shards"]
    assert info["shard_lengths"] == [2, 4, 1]  # x9 has no label
    assert [f["key"] for f in proj["failures"]] == ["x9"] and proj["images_without_label"] == 1
    assert proj["labels_without_image"] == {"count": 1, "keys": ["a2"]} and s.labels_without_image == 1
    assert proj["k"] == 3 and proj["num_classes"] == 10 and proj.get("kind") != KIND_LABELS
    for i, keys in enumerate(b_keys):
        members = tar_members(tmp / "out" / info["filenames"][i])
        want = [k for k in keys if k != "x9"]
        assert [n for n, _ in members] == [f"{k}.{e}" for k in want for e in ("jpg", "cls", "rlm")]
        got = dict(members)
        for k in want:
            assert got[f"{k}.rlm"] == labels[k]  # the same bytes: bound to the same image
            assert got[f"{k}.jpg"] == dict(tar_members(b[i]))[f"{k}.jpg"]


def test_join_labels_only_aligns_to_the_image_shards(setup):
    tmp, labels, b, b_keys = setup
    join_labels(tmp / "L", b, tmp / "out", labels_only=True, num_workers=0)
    info = get_split(read_info(str(tmp / "out")), "train")
    assert info["relabel_shards"]["kind"] == KIND_LABELS
    for i, keys in enumerate(b_keys):
        members = tar_members(tmp / "out" / info["filenames"][i])
        assert [n for n, _ in members] == [f"{k}.rlm" for k in keys]
        for n, d in members:
            assert d == (b"" if n == "x9.rlm" else labels[n.split(".")[0]])
    check_pairs_with(info, get_split(read_info(str(tmp / "B")), "train"))


def test_join_with_an_image_folder(setup):
    tmp, labels, _, _ = setup
    imgs = _images_of(make_image_shards(tmp / "A2", KEYS))  # the same bytes as A's
    for k, d in imgs.items():
        (tmp / "F" / f"cls{k[0]}").mkdir(parents=True, exist_ok=True)
        (tmp / "F" / f"cls{k[0]}" / f"{k}.jpg").write_bytes(d)
    join_labels(tmp / "L", str(tmp / "F"), tmp / "out", shard_size=5, num_workers=0)
    info = get_split(read_info(str(tmp / "out")), "train")
    assert info["shard_lengths"] == [5, 3]
    got = {}
    for f in info["filenames"]:
        got.update(dict(tar_members(tmp / "out" / f)))
    assert sorted(n for n in got if n.endswith(".rlm")) == sorted(f"{k}.rlm" for k in labels)
    for k in labels:
        assert got[f"{k}.rlm"] == labels[k] and got[f"{k}.jpg"] == imgs[k]
        assert json.loads(got[f"{k}.json"])["width"] == Image.open(io.BytesIO(imgs[k])).size[0]
    with pytest.raises(ValueError, match="labels_only needs image shards"):
        join_labels(tmp / "L", str(tmp / "F"), tmp / "out2", labels_only=True)


def test_another_copy_of_the_image_is_rebound_another_picture_is_a_failure(tmp_path):
    a = make_image_shards(tmp_path / "A", [["k0", "k1", "k2"]])
    labels = make_label_set(tmp_path / "L", a)
    imgs = _images_of(a)
    half = Image.open(io.BytesIO(imgs["k0"])).resize((32, 24))  # same aspect, other bytes (a resized copy)
    buf = io.BytesIO()
    half.save(buf, format="JPEG", quality=70)
    other = Image.new("RGB", (20, 60))  # another picture altogether
    buf2 = io.BytesIO()
    other.save(buf2, format="JPEG")
    samples = [
        [("k0.jpg", buf.getvalue()), ("k0.cls", b"1")],
        [("k1.jpg", buf2.getvalue()), ("k1.cls", b"1")],
        [("k2.jpg", imgs["k2"]), ("k2.cls", b"1")],
    ]
    rec = write_shard(str(tmp_path / "B"), "b-0.tar", samples)
    s = join_labels(tmp_path / "L", [str(tmp_path / "B" / rec.filename)], tmp_path / "out", num_workers=0)
    out = shard_records(tmp_path / "out" / "train-000000.tar")
    assert sorted(out) == ["k0", "k2"] and out["k2"] == labels["k2"]
    bound = read_header(out["k0"]).image
    assert (bound.size, bound.sha256, bound.width, bound.height) == (
        len(buf.getvalue()),
        hashlib.sha256(buf.getvalue()).digest(),
        32,
        24,
    )
    old, new = decode_label_map(labels["k0"]), decode_label_map(out["k0"])
    np.testing.assert_array_equal(old.values, new.values)  # the same map, re-encoded losslessly
    np.testing.assert_array_equal(old.indices, new.indices)
    assert s.rebound == 1
    proj = get_split(read_info(str(tmp_path / "out")), "train")["relabel_shards"]
    assert proj["rebound"] == 1
    assert [f["key"] for f in proj["failures"]] == ["k1"]
    assert "made for another picture (72x48 px" in proj["failures"][0]["reason"]


def test_strict_join_stops_at_the_first_unpaired(setup):
    tmp, _, b, _ = setup
    with pytest.raises(ValueError, match=r"other-000.tar#x9: image without a label \(strict"):
        join_labels(tmp / "L", b, tmp / "out", strict=True, num_workers=0)
    b2 = [p for p in b]  # all images labelled, a2's label left over
    tars = tar_members(b[0])
    write_shard(str(tmp / "B"), "other-000.tar", [[tars[0], tars[1]], [tars[2], tars[3]]])
    with pytest.raises(ValueError, match=r"train-000000.tar#a2: label without an image \(strict"):
        join_labels(tmp / "L", b2, tmp / "out3", strict=True, num_workers=0)
    assert not (tmp / "out3" / "_info.json").exists()


def test_full_shards_as_the_label_set_and_workers(setup):
    tmp, labels, b, _ = setup
    join_labels(tmp / "L", b, tmp / "full", num_workers=0)  # full shards, in B's sharding
    join_labels(
        tmp / "full",
        [str(p) for p in make_image_shards(tmp / "A3", KEYS)],
        tmp / "back",
        labels_only=True,
        num_workers=2,
    )
    info = get_split(read_info(str(tmp / "back")), "train")
    got = {}
    for f in info["filenames"]:
        got.update(shard_records(tmp / "back" / f))
    assert got == {**labels, "a2": b""}  # A's labels again, in A's sharding; a2's never reached "full"
    assert info["relabel_shards"]["images_without_label"] == 1


def test_index_finds_every_key_and_refuses_duplicates(setup, tmp_path):
    tmp, labels, _, _ = setup
    index = build_index(str(tmp / "L"))
    assert len(index) == 8
    rows = index.find(["c2", "zz", "a0"])
    assert rows[1] == -1 and index.key(int(rows[0])) == "c2" and index.key(int(rows[2])) == "a0"
    d = tmp_path / "dup"
    r1 = write_shard(str(d), "train-000000.tar", [[("k.rlm", b"x")]])
    r2 = write_shard(str(d), "train-000001.tar", [[("k.rlm", b"y")]])
    write_info(str(d), make_split_info("train", [r1, r2], {}))
    with pytest.raises(ShardError, match=r"key 'k' has two records \(in .*train-000000.tar and"):
        build_index(str(d))


def test_cli_join(setup):
    tmp, _, b, _ = setup
    r = CliRunner().invoke(
        cli, ["join", str(tmp / "L"), *b, str(tmp / "out"), "--num-workers", "0", "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    assert "1 images without a label, 1 labels without an image" in r.output


def test_fast_header_scan_agrees_with_tarfile_and_falls_back_on_pax(tmp_path):
    import tarfile

    from relabel_shards.labelindex import _scan_records, _scan_ustar

    samples = [[(f"k{i}.jpg", b"j" * (i * 300)), (f"k{i}.rlm", bytes([i]) * (i * 700 + 1))] for i in range(6)]
    samples.append([("k6.rlm", b"")])  # a placeholder: no label
    samples.append([("dir/k7.rlm", b"r" * 10), ("k7.rlm.bak", b"x")])
    rec = write_shard(str(tmp_path), "a.tar", samples)
    path = tmp_path / rec.filename
    with tarfile.open(path) as tar:
        want = [
            (
                m.name.rsplit("/", 1)[-1].split(".")[0] if "/" not in m.name else m.name.split(".")[0],
                m.offset_data,
                m.size,
            )
            for m in tar.getmembers()
            if m.name.endswith(".rlm") and m.size
        ]
    with open(path, "rb") as f:
        fast = _scan_ustar(f, str(path))
    assert fast is not None and list(zip(*fast, strict=True)) == want
    write_shard(str(tmp_path), "b.tar", [[("ké.rlm", b"x" * 5)], [("k2.rlm", b"y" * 3)]])  # a PAX header
    with open(tmp_path / "b.tar", "rb") as f:
        assert _scan_ustar(f, "b.tar") is None
    keys, offsets, sizes = _scan_records(str(tmp_path / "b.tar"), None)
    assert keys == ["ké", "k2"] and sizes == [5, 3]
    (tmp_path / "c.tar").write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ShardError, match="c.tar: truncated or corrupt tar"):
        _scan_records(str(tmp_path / "c.tar"), None)
    data = bytearray(path.read_bytes())
    data[10] ^= 0x20
    (tmp_path / "d.tar").write_bytes(bytes(data))
    with pytest.raises(ShardError, match="d.tar: truncated or corrupt tar .bad header checksum at byte 0"):
        _scan_records(str(tmp_path / "d.tar"), None)


def test_rerun_resumes_and_ranks_split_the_shards(setup):
    tmp, _, b, _ = setup
    join_labels(tmp / "L", b, tmp / "one", labels_only=True, num_workers=0, name="x")
    again = join_labels(tmp / "L", b, tmp / "one", labels_only=True, num_workers=0, name="x")
    assert again.written == [] and again.skipped == [0, 1, 2]
    for rank in (1, 0):
        s = join_labels(
            tmp / "L", b, tmp / "two", labels_only=True, num_workers=0, name="x", rank=rank, world_size=2
        )
        assert s.written == ([1] if rank == 1 else [0, 2])
    assert {p.name: p.read_bytes() for p in (tmp / "one").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp / "two").iterdir()
    }
    with pytest.raises(ValueError, match="different build"):
        join_labels(tmp / "L", b, tmp / "one", num_workers=0)  # full shards into a label set's folder

"""Shard primitives: keys, deterministic tar bytes, incremental shards equal to write_tar, atomic writes."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest

from relabel_shards.shards import (
    PartialShard,
    key_from_path,
    sample_members,
    shard_name,
    split_member_name,
    write_bytes_atomic,
    write_shard,
    write_tar,
)

SAMPLES = [
    [("a.jpg", b"x" * 1000), ("a.cls", b"1")],
    [("b.png", b"y" * 513), ("b.cls", b"2"), ("b.rlm", b"z")],
]


def test_keys_and_names():
    assert key_from_path("n01440764/n01440764_10026.JPEG") == "n01440764_10026"
    assert key_from_path("a b/c.d.e.jpg") == "c_d_e"
    with pytest.raises(ValueError, match="cannot derive a sample key"):
        key_from_path("dir/.jpg")
    assert shard_name("train", 12) == "train-000012.tar"
    assert split_member_name("dir/k.seg.png") == ("dir/k", "seg.png")
    with pytest.raises(ValueError, match=r"sample key must hold no '\.' or '/', got 'a\.b'"):
        sample_members("a.b", image=b"", image_ext="jpg", label=0, meta={}, labelmap=b"")


def test_tar_is_deterministic_and_standard():
    buf = io.BytesIO()
    assert write_tar(buf, SAMPLES) == 2
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        infos = tar.getmembers()
        assert [(t.name, t.size, t.mtime, t.mode, t.uid, t.gid, t.uname, t.gname) for t in infos] == [
            (n, len(d), 0, 0o444, 0, 0, "", "") for s in SAMPLES for n, d in s
        ]
        assert tar.extractfile("b.rlm").read() == b"z"
    buf2 = io.BytesIO()
    write_tar(buf2, SAMPLES)
    assert buf.getvalue() == buf2.getvalue()


def test_partial_shard_gives_write_tar_bytes_and_record(tmp_path):
    ref = io.BytesIO()
    write_tar(ref, SAMPLES)
    shard = PartialShard(str(tmp_path), "s-000000.tar")
    assert not (tmp_path / "s-000000.tar").exists()
    temps = [p for p in os.listdir(tmp_path) if p.startswith(".s-000000.tar.") and p.endswith(".tmp")]
    assert len(temps) == 1  # written under a temporary name in the destination directory
    for s in SAMPLES:
        shard.add(s)
    rec = shard.commit()
    data = (tmp_path / "s-000000.tar").read_bytes()
    assert data == ref.getvalue()
    assert (rec.filename, rec.num_samples, rec.bytes, rec.sha256) == (
        "s-000000.tar",
        2,
        len(data),
        hashlib.sha256(data).hexdigest(),
    )
    assert os.listdir(tmp_path) == ["s-000000.tar"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "s-000000.tar").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


def test_aborted_shard_leaves_nothing(tmp_path):
    shard = PartialShard(str(tmp_path), "s-000001.tar")
    shard.add(SAMPLES[0])
    shard.abort()
    assert os.listdir(tmp_path) == []

    def boom():
        yield SAMPLES[0]
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_shard(str(tmp_path), "s-000002.tar", boom())
    assert os.listdir(tmp_path) == []


def test_write_bytes_atomic_replaces_whole(tmp_path):
    p = tmp_path / "sub" / "f.json"
    write_bytes_atomic(str(p), b"one")
    write_bytes_atomic(str(p), b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(p.parent) == ["f.json"]

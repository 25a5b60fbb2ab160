"""The loader's tar reader: one sample per key, never one member silently replacing another."""

from __future__ import annotations

import io
import tarfile

import pytest
from test_loader_factory import key_of, make_shards

from relabel_shards.loader import make_loader
from relabel_shards.shards import ShardError
from relabel_shards.tarstream import iter_tar_samples


def _tar(names_and_data: list[tuple[str, bytes]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in names_and_data:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def test_groups_adjacent_members_by_key():
    got = list(iter_tar_samples(_tar([("a.jpg", b"1"), ("a.cls", b"0"), ("b.jpg", b"2")]), "mem://x.tar"))
    assert got == [("a", {"jpg": b"1", "cls": b"0"}), ("b", {"jpg": b"2"})]


@pytest.mark.parametrize(
    "members, member",
    [
        # a member written twice, with different bytes: which one is the image?
        ([("a.jpg", b"1"), ("a.cls", b"0"), ("a.jpg", b"other")], "a.jpg"),
        # two samples with the same key next to each other: one image with the other's label map
        ([("a.jpg", b"1"), ("a.rlm", b"r1"), ("a.jpg", b"2"), ("a.rlm", b"r2")], "a.jpg"),
        ([("d/a.rlm", b"1"), ("d/a.rlm", b"1")], "d/a.rlm"),  # even identical copies
    ],
)
def test_repeated_extension_in_a_sample_is_an_error_naming_url_key_and_member(members, member):
    key = member.rsplit(".", 1)[0]
    stream = _tar([*members, ("z.jpg", b"9")])
    with pytest.raises(
        ShardError, match=rf"mem://x\.tar: key '{key}': member '{member}' repeats an extension"
    ):
        list(iter_tar_samples(stream, "mem://x.tar"))


def _same_key_as_previous(i, members):
    """Sample 2 gets sample 1's key: two adjacent samples with one key."""
    if i != 2:
        return members
    return [(n.replace(key_of(2), key_of(1)), d) for n, d in members]


def test_loader_never_pairs_one_samples_image_with_anothers_label_map(tmp_path):
    make_shards(tmp_path, [4], transform=_same_key_as_previous)
    with pytest.raises(
        ShardError, match=rf"key '{key_of(1)}': member '{key_of(1)}\.\w+' repeats an extension"
    ):
        list(make_loader(str(tmp_path), batch_size=1, num_workers=0, image_size=16))
    loader = make_loader(str(tmp_path), batch_size=1, num_workers=0, image_size=16, on_error="skip")
    keys = [k for batch in loader for k in batch["keys"]]
    assert key_of(0) in keys and key_of(1) not in keys  # neither copy: the reader cannot tell them apart
    assert sum(loader.skipped.values()) >= 1

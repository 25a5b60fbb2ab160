"""Enumerating build inputs: ImageFolder order and classes (against torchvision), list files, input shards."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from relabel_shards.shards import ShardError, write_shard
from relabel_shards.sources import (
    DuplicateMemberError,
    decode_image,
    image_member,
    iter_shard_samples,
    open_source,
    sample_key,
)


def _jpeg(seed: int, size=(24, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _folder(root: Path, layout: dict[str, list[str]]) -> Path:
    for i, (cls, names) in enumerate(layout.items()):
        for j, n in enumerate(names):
            p = root / cls / n
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_jpeg(i * 100 + j))
    return root


def test_folder_matches_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    root = _folder(
        tmp_path / "data",
        {"zebra": ["z2.jpg", "z1.JPEG", "sub/z0.png"], "ant": ["a1.jpg", "a0.jpg"], "Bee": ["b.jpeg"]},
    )
    src = open_source(str(root))
    tv = ImageFolder(str(root))
    assert src.kind == "folder"
    assert list(src.classes) == tv.classes == ["Bee", "ant", "zebra"]
    assert [(os.path.join(str(root), it.source), it.label) for it in src.items] == tv.samples
    assert [it.key for it in src.items] == ["b", "a0", "a1", "z1", "z2", "z0"]  # sub-folders after files
    assert [it.image_ext for it in src.items] == ["jpg", "jpg", "jpg", "jpg", "jpg", "png"]
    assert src.items[0].class_name == "Bee" and src.items[0].source == "Bee/b.jpeg"


def test_folder_non_image_extension_is_a_listed_failure_hidden_files_ignored(tmp_path):
    root = _folder(tmp_path / "d", {"c": ["x.jpg"]})
    (root / "c" / "notes.txt").write_text("hello")
    (root / "c" / ".DS_Store").write_bytes(b"\0")
    src = open_source(str(root))
    assert [(it.key, it.error) for it in src.items] == [
        ("notes", "not an image file (extension 'txt')"),
        ("x", None),
    ]


def test_list_file_relative_paths_int_and_named_labels(tmp_path):
    (tmp_path / "imgs").mkdir()
    for n in ("a.jpg", "b.png"):
        (tmp_path / "imgs" / n).write_bytes(_jpeg(len(n)))
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nimgs/b.png\t7\n\nimgs/a.jpg\t3\n")
    src = open_source(str(lst))
    assert src.kind == "list" and src.classes is None
    assert [(it.key, it.label, it.source, it.path) for it in src.items] == [
        ("b", 7, "imgs/b.png", str(tmp_path / "imgs" / "b.png")),
        ("a", 3, "imgs/a.jpg", str(tmp_path / "imgs" / "a.jpg")),
    ]
    lst.write_text(f"imgs/b.png\tdog\n{tmp_path / 'imgs' / 'a.jpg'}\tcat\n")
    src = open_source(str(lst))
    assert list(src.classes) == ["cat", "dog"]
    assert [(it.label, it.class_name) for it in src.items] == [(1, "dog"), (0, "cat")]


@pytest.mark.parametrize(
    "text, match",
    [
        ("a.jpg 3\n", r"list\.txt:1: expected 'path<TAB>label'"),
        ("a.jpg\t-1\n", r"list\.txt:1: label must be >= 0, got -1"),
        ("# only a comment\n", "holds no images"),
    ],
)
def test_list_file_errors(tmp_path, text, match):
    (tmp_path / "a.jpg").write_bytes(_jpeg(0))
    (tmp_path / "list.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
        open_source(str(tmp_path / "list.txt"))


def test_list_file_missing_image_names_it(tmp_path):
    (tmp_path / "list.txt").write_text("gone.jpg\t1\n")
    with pytest.raises(FileNotFoundError, match=r"listed file 'gone\.jpg' does not exist"):
        open_source(str(tmp_path / "list.txt"))


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"source '.*nowhere' does not exist"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        open_source(str(tmp_path / "empty"))


def test_duplicate_keys_name_both_paths(tmp_path):
    root = _folder(tmp_path / "d", {"a": ["same.jpg"], "b": ["same.png"]})
    with pytest.raises(ValueError, match=r"duplicate sample key 'same': 'a/same\.jpg' and 'b/same\.png' "
                                         r"\(.*use key_from='path' \(--key-from path\)"):
        open_source(str(root))


@pytest.mark.parametrize("path, stem, whole", [
    ("accordion/image_0001.jpg", "image_0001", "accordion_image_0001"),
    ("n01440764/n01440764_10026.JPEG", "n01440764_10026", "n01440764_n01440764_10026"),
    ("a/b/c.d.png", "c_d", "a_b_c_d"),
    ("./v1.2/x y.jpg", "x_y", "v1_2_x_y"),
    ("img.jpg", "img", "img"),
    ("s3://bucket/cls/img.jpg", "img", "bucket_cls_img"),
    ("c:\\data\\cls\\img.jpg", "img", "c__data_cls_img"),
])
def test_sample_key_rules(path, stem, whole):
    """The documented mapping (sources.py): stem = file name; path = relative path, '/' -> '_'."""
    assert sample_key(path) == sample_key(path, "stem") == stem
    assert sample_key(path, "path") == whole
    assert "." not in whole
    with pytest.raises(ValueError, match=r"key_from must be one of \['stem', 'path'\], got 'name'"):
        sample_key(path, "name")


def test_repeated_file_names_across_classes_with_key_from_path(tmp_path):
    """Caltech-101 style: every class has image_0001.jpg. Fatal by stem; unique keys by path."""
    root = _folder(tmp_path / "caltech", {"accordion": ["image_0001.jpg", "image_0002.jpg"],
                                          "airplanes": ["image_0001.jpg"], "anchor": ["image_0001.jpg"]})
    with pytest.raises(ValueError, match="duplicate sample key 'image_0001'"):
        open_source(str(root))
    src = open_source(str(root), key_from="path")
    assert [(it.key, it.source, it.label) for it in src.items] == [
        ("accordion_image_0001", "accordion/image_0001.jpg", 0),
        ("accordion_image_0002", "accordion/image_0002.jpg", 0),
        ("airplanes_image_0001", "airplanes/image_0001.jpg", 1),
        ("anchor_image_0001", "anchor/image_0001.jpg", 2),
    ]
    listed = tmp_path / "list.txt"
    listed.write_text("caltech/accordion/image_0001.jpg\t0\ncaltech/anchor/image_0001.jpg\t2\n")
    assert [it.key for it in open_source(str(listed), key_from="path").items] == [
        "caltech_accordion_image_0001", "caltech_anchor_image_0001"]
    # a path rule collision (a_b/c vs a/b_c) is still an error naming both, never a silent merge
    clash = _folder(tmp_path / "clash", {"a_b": ["c.jpg"], "a": ["b_c.jpg"]})
    with pytest.raises(ValueError, match=r"duplicate sample key 'a_b_c': 'a/b_c\.jpg' and 'a_b/c\.jpg'"):
        open_source(str(clash), key_from="path")


def test_shard_sources_brace_list_and_missing(tmp_path):
    for i in range(3):
        write_shard(str(tmp_path), f"in-{i:06d}.tar", [[(f"k{i}.jpg", _jpeg(i)), (f"k{i}.cls", b"1")]])
    src = open_source(str(tmp_path / "in-{000000..000002}.tar"))
    assert src.kind == "shards"
    assert list(src.shard_urls) == [str(tmp_path / f"in-{i:06d}.tar") for i in range(3)]
    src2 = open_source([str(tmp_path / "in-000002.tar"), str(tmp_path / "in-000000.tar")])
    assert [Path(u).name for u in src2.shard_urls] == ["in-000002.tar", "in-000000.tar"]
    with pytest.raises(FileNotFoundError, match=r"source shard '.*in-000008\.tar' does not exist"):
        open_source(str(tmp_path / "in-{000008..000009}.tar"))


def test_iter_shard_samples_groups_members_and_rejects_split_keys(tmp_path):
    good = [[("a.jpg", b"1"), ("a.cls", b"0"), ("a.json", b"{}")], [("dir/b.png", b"2"), ("dir/b.cls", b"1")]]
    write_shard(str(tmp_path), "good.tar", good)
    got = list(iter_shard_samples(str(tmp_path / "good.tar")))
    assert got == [("a", good[0]), ("dir/b", good[1])]
    assert image_member(got[1][1]) == ("dir/b.png", b"2")
    assert image_member([("x.cls", b"1")]) is None
    write_shard(str(tmp_path), "bad.tar", [[("a.jpg", b"1")], [("b.jpg", b"2")], [("a.cls", b"0")]])
    with pytest.raises(ShardError, match=r"bad\.tar: key 'a' appears twice"):
        list(iter_shard_samples(str(tmp_path / "bad.tar")))
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "trunc.tar").write_bytes(data[:700])
    with pytest.raises(ShardError, match=r"trunc\.tar: truncated or corrupt tar before its first whole "
                                         r"sample \(key 'a' incomplete\)"):
        list(iter_shard_samples(str(tmp_path / "trunc.tar")))


def test_iter_shard_samples_never_stops_quietly(tmp_path):
    """tarfile alone reads a tar cut at a member boundary, or with a damaged header, as a shorter shard."""
    samples = [[(f"k{i}.jpg", bytes(700)), (f"k{i}.cls", b"1")] for i in range(4)]
    write_shard(str(tmp_path), "a.tar", samples)
    data = (tmp_path / "a.tar").read_bytes()
    boundary = 2 * (512 + 1024 + 512 + 512)  # two samples: header + padded data for .jpg and .cls each
    (tmp_path / "cut.tar").write_bytes(data[:boundary])
    flipped = bytearray(data)
    flipped[boundary + 100] ^= 0xFF  # inside k2.jpg's header
    (tmp_path / "flip.tar").write_bytes(bytes(flipped))
    assert [k for k, _ in iter_shard_samples(str(tmp_path / "a.tar"))] == ["k0", "k1", "k2", "k3"]
    with pytest.raises(ShardError, match=r"cut\.tar: truncated or corrupt tar after key 'k0' \(key 'k1' "
                                         r"incomplete\) \(truncated: data ends at byte 5120 without the "
                                         r"end-of-archive marker\)"):
        list(iter_shard_samples(str(tmp_path / "cut.tar")))
    with pytest.raises(ShardError, match=r"flip\.tar: .* after key 'k0' \(key 'k1' incomplete\) \(damaged "
                                         r"tar header at byte 5120"):
        list(iter_shard_samples(str(tmp_path / "flip.tar")))


def test_image_member_is_the_exact_image_extension_every_reader_uses():
    """A mask or segmentation member (k.seg.png) is never taken for the image the label map describes."""
    from relabel_shards.decode import CropConfig, decode_sample  # noqa: F401 - same rule: shards.image_ext
    from relabel_shards.shards import image_ext

    members = [("k.seg.png", b"mask"), ("k.jpg", b"photo"), ("k.cls", b"3")]
    assert image_member(members) == ("k.jpg", b"photo")
    assert image_ext(["seg.png", "jpg", "cls"]) == "jpg"
    assert image_ext(["cls", "JPEG"]) == "JPEG" and image_ext(["cls", "json"]) is None


def test_decode_image_applies_exif_orientation():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the upright image is this one turned 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", exif=exif.tobytes())
    img = decode_image(buf.getvalue())
    assert img.size == (20, 40)  # upright width x height
    up = np.asarray(img)
    assert up[:15].mean() > 200 and up[25:].mean() < 50  # the white half is now on top


def test_decode_image_reasons():
    img = decode_image(_jpeg(1, size=(5, 7)))
    assert img.mode == "RGB" and img.size == (7, 5)
    with pytest.raises(ValueError, match="empty file"):
        decode_image(b"")
    with pytest.raises(ValueError, match="PIL cannot identify it"):
        decode_image(b"definitely not an image")
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(_jpeg(2, size=(64, 64))[:300])


def test_iter_shard_samples_repeated_member_is_an_error_or_reported(tmp_path):
    samples = [
        [("a.jpg", b"1"), ("a.cls", b"0")],
        [("b.jpg", b"2"), ("b.cls", b"1"), ("b.jpg", b"other")],  # b.jpg twice
        [("c.jpg", b"3"), ("c.cls", b"2")],
        [("c.jpg", b"4"), ("c.cls", b"3")],  # a second sample with c's key, next to it
        [("d.jpg", b"5")],
    ]
    write_shard(str(tmp_path), "rep.tar", samples)
    url = str(tmp_path / "rep.tar")
    with pytest.raises(DuplicateMemberError, match=r"rep\.tar: key 'b': member 'b\.jpg' repeats an exten"):
        list(iter_shard_samples(url))
    seen: list[DuplicateMemberError] = []
    got = list(iter_shard_samples(url, on_duplicate=seen.append))
    assert [k for k, _ in got] == ["a", "d"]  # the ambiguous samples are left out whole
    assert [(e.url, e.key, e.member) for e in seen] == [(url, "b", "b.jpg"), (url, "c", "c.jpg")]


def _reference_digest(kind: str, base: str, key_from: str, rows: list[tuple[str, int]], classes) -> str:
    """ItemTable.digest's definition on whole sources: uint64 offsets of the NUL-terminated UTF-8 sources,
    the sources, the int32 labels, the class names (what fingerprints of earlier builds were made of)."""
    import hashlib

    blob = b"".join(s.encode() + b"\0" for s, _ in rows)
    ends = np.cumsum([0] + [len(s.encode()) + 1 for s, _ in rows]).astype("<u8")
    h = hashlib.sha256(f"{kind}\n{base}\n{key_from}\n".encode())
    h.update(ends.tobytes())
    h.update(blob)
    h.update(np.asarray([lab for _, lab in rows], dtype="<i4").tobytes())
    h.update("\n".join(classes or ()).encode())
    return h.hexdigest()


def test_item_table_segments_give_back_every_row():
    """Rows stored as segments (common prefix and suffix once, the middles in one buffer) come back exactly:
    sources, keys, labels, items, ranges and the digest, whatever the rows share (oracle: the rows given)."""
    from relabel_shards.sources import _TableBuilder

    rng = np.random.default_rng(0)
    alphabet = list("ab/._-é中X0\\")
    rows: list[tuple[str, int]] = []
    builder = _TableBuilder()
    batches = [
        (["c0/n0_1.JPEG", "c0/n0_12.JPEG", "c0/n0_2.JPEG"], 0),  # prefix c0/n0_, suffix .JPEG
        (["same.jpg", "same.jpg"], 1),  # the whole string in common: empty middles
        (["ab.jpg", "abab.jpg", "ab"], 2),  # the suffix may not overlap the prefix
        (["x/é1.png", "x/é22.png"], 3),  # non-ASCII around and in the middle
        (["a.jpg", "b.jpg"], [4, 5]),  # a label per row
        (["single/one.jpg"], 6),
        (["w\\x\\k1.png", "w\\x\\k22.png"], 6),  # backslashes in the prefix: keys from the file names
        (["a/x/f.jpg", "b/x/f.jpg"], 6),  # the suffix holds the directory and the whole name
        ([], 7),
    ]
    for _ in range(60):  # and random rows sharing random prefixes
        stem = "".join(rng.choice(alphabet, rng.integers(0, 5)))
        names = [
            stem + "".join(rng.choice(alphabet, rng.integers(0, 6))) + ".jpg"
            for _ in range(rng.integers(1, 9))
        ]
        batches.append((names, int(rng.integers(0, 50))))
    for sources, label in batches:
        if len(sources) == 1 and rng.random() < 0.5:
            builder.add(sources[0], label)
        else:
            builder.add_many(sources, label)
        labels = [label] * len(sources) if isinstance(label, int) else label
        rows += list(zip(sources, labels, strict=True))
    builder.add("tail/k1.jpg", 8)  # add after add_many, then again into the same raw segment
    builder.add("tail/k2.jpg", 8)
    rows += [("tail/k1.jpg", 8), ("tail/k2.jpg", 8)]
    table = builder.table("list", "l", None, "/", None)
    srcs = [s for s, _ in rows]
    assert len(table) == len(rows)
    assert list(table.iter_sources()) == srcs
    assert [table.source(i) for i in range(len(rows))] == srcs
    assert table.sources(3, 17) == srcs[3:17]
    assert table.labels.tolist() == [lab for _, lab in rows]
    keys = []
    for s in srcs:
        try:
            keys.append(sample_key(s))
        except ValueError:
            keys.append("")
    assert list(table.iter_keys()) == keys
    assert [(it.key, it.source, it.label) for it in table.take([2, 0, 5])] == [
        ("n0_2", "c0/n0_2.JPEG", 0),
        ("n0_1", "c0/n0_1.JPEG", 0),
        ("ab", "ab.jpg", 2),
    ]
    assert table.digest() == _reference_digest("list", "/", "stem", rows, None)
    assert table.nbytes < len(b"".join(s.encode() + b"\0" for s in srcs)) + 12 * len(rows)


def test_item_table_memory_per_image():
    """Building a folder's items holds about 14 bytes an ImageNet-style image (columns of whole paths held
    48), and the key check adds its 8-byte hashes and one chunk of keys (goal: a few hundred MB at
    ImageNet-21k's 13M images; tracemalloc counts numpy's buffers too)."""
    import tracemalloc

    from relabel_shards.sources import _check_unique, _TableBuilder

    n, per = 200_000, 1300
    names = [f"n{c:08d}" for c in range(-(-n // per))]
    listings = [
        [f"{d}/{d}_{i}.JPEG" for i in range(c * per, min(n, (c + 1) * per))] for c, d in enumerate(names)
    ]
    tracemalloc.start()
    try:
        builder = _TableBuilder()
        for c, files in enumerate(listings):
            builder.add_many(files, c)
        table = builder.table("folder", "/r", None, "/r", names)
        held, build_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        _check_unique(table)
        _, check_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(table) == n and table.source(n - 1) == listings[-1][-1]
    assert held / n < 16 and table.nbytes / n < 16, (held / n, table.nbytes / n)
    assert build_peak / n < 18, build_peak / n
    # the key check: 8 bytes a key for the hashes, plus a chunk of 65,536 keys in flight (~8 MB)
    assert check_peak - held < 8 * n + 10 * 2**20, (check_peak - held) / n

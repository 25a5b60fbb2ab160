"""The plan shared by build and convert: the seeded order, the column store of source items, key checks."""

from __future__ import annotations

import pytest

from relabel_shards.plan import cut, describe_difference, ordered, permutation, plan_items, summarize_failures
from relabel_shards.sources import FileItem, _check_unique, _TableBuilder, open_source


def test_permutation_is_pinned():
    # shards are byte-reproducible, so the order may never change with a numpy upgrade: PCG64's raw stream
    assert permutation(10, 0).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert permutation(10, 7).tolist() == [6, 3, 4, 9, 0, 2, 8, 7, 5, 1]
    assert sorted(permutation(1000, 3).tolist()) == list(range(1000))
    with pytest.raises(ValueError, match=r"shuffle_seed must be integers >= 0, got n=5, shuffle_seed=-1"):
        permutation(5, -1)


def test_folder_items_from_the_column_store(tmp_path):
    root = tmp_path / "imgs"
    for rel in ("b/x/deep.png", "b/top.jpg", "a/é1.JPEG", "a/.DS_Store", "a/notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    src = open_source(str(root))
    assert list(src.items) == [
        FileItem(
            "notes", f"{root}/a/notes.txt", "a/notes.txt", 0, "a", "not an image file (extension 'txt')"
        ),
        FileItem("_1", f"{root}/a/é1.JPEG", "a/é1.JPEG", 0, "a"),  # unsafe characters become _
        FileItem("top", f"{root}/b/top.jpg", "b/top.jpg", 1, "b"),
        FileItem("deep", f"{root}/b/x/deep.png", "b/x/deep.png", 1, "b"),
    ]
    assert src.items[-1] == src.items[3] and src.items[1:3] == list(src.items)[1:3]
    shards = plan_items(src.items, 3, True, 0)
    assert [list(s) for s in shards] == cut(ordered(list(src.items), True, 0), 3)
    assert [list(s) for s in plan_items(src.items, 3, False, 0)] == cut(list(src.items), 3)


def test_duplicate_keys_are_named_in_source_order():
    rows = _TableBuilder()
    rows.add_many(["c0/k1.jpg", "c0/k2.jpg", "c0/k3.jpg"], 0)
    rows.add_many(["c1/k3.png", "c1/k1.png"], 1)
    # the first key met twice in source order (k3 at row 3), naming its first file
    with pytest.raises(ValueError, match=r"duplicate sample key 'k3': 'c0/k3\.jpg' and 'c1/k3\.png'"):
        _check_unique(rows.table("folder", "/r", None, "/r", ["c0", "c1"]))
    ok = _TableBuilder()
    ok.add_many([f"c/k{i}.jpg" for i in range(1000)], 0)
    _check_unique(ok.table("folder", "/r", None, "/r", ["c"]))


def test_difference_and_failure_summaries():
    old = {"settings": {"shard_size": 1000, "order": {"seed": 0}}, "items": "a", "source": {"num_files": 5}}
    new = {"settings": {"shard_size": 500, "order": {"seed": 0}}, "items": "b", "source": {"num_files": 4}}
    assert describe_difference(old, new) == (
        "the input list differs; settings.shard_size: 1000 there, 500 now; source.num_files: 5 there, 4 now"
    )
    failures = [{"source": f"f{i}", "reason": f"cannot decode image: bad {i}"} for i in range(5)]
    failures.append({"source": "g", "reason": "empty file"})
    assert summarize_failures(failures) == [
        "5 x cannot decode image (e.g. f0, f1, f2)",
        "1 x empty file (e.g. g)",
    ]


def test_bulk_keys_equal_key_from_path():
    from relabel_shards.shards import key_from_path

    names = [
        "a/b.c.d",
        "x/abc",
        "y/abc.",
        "z/é 1.JPEG",
        "q\\w\\e.png",
        "n0/n0_1.JPEG",
        "dir.x/file",
        "a/..b",
        "k",
        "a/b/c.tar.gz",
        "sp ace/f-g_h.jpg",
        "a.b/c",
        "x/y.z/w.v",
        "/abs/p.jpg",
        "http://h/x/y.jpeg",
    ]
    rows = _TableBuilder()
    for i, n in enumerate(names):
        rows.add(n, i)
    table = rows.table("list", "l", None, "/", None)
    assert list(table.iter_keys()) == [key_from_path(n) for n in names]
    assert list(table.iter_sources()) == names
    bad = _TableBuilder()
    bad.add_many(["ok.jpg", "dir/.hidden"], 0)
    with pytest.raises(ValueError, match=r"cannot derive a sample key from path 'dir/\.hidden'"):
        _check_unique(bad.table("list", "l", None, "/", None))

"""build_shards end to end on tiny inputs with a tiny random-weight timm model (test_efficientnet).

Label maps read back are compared with the annotator run directly on the same batches (a build's batches are
the shard's images in order, ``batch_size`` at a time), so a map paired with the wrong image fails.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from relabel_shards.build import build_shards
from relabel_shards.labelmap import decode_label_map
from relabel_shards.plan import permutation
from relabel_shards.shards import read_info, write_shard

MODEL = "test_efficientnet"
SMALL = {"model": MODEL, "input_size": 64}  # 2x2 maps: faster where the map size does not matter


def _image(seed: int, size=(40, 56)) -> Image.Image:
    """A distinct picture per seed: a colour gradient with a bright square at a seed-dependent place."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a = np.stack(
        [(x * rng.uniform(1, 6)) % 255, (y * rng.uniform(1, 6)) % 255, np.full_like(x, seed * 37 % 255)], -1
    ).astype(np.uint8)
    r, c = rng.integers(0, h - 10), rng.integers(0, w - 10)
    a[r : r + 10, c : c + 10] = 255
    return Image.fromarray(a)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _make_folder(root: Path, per_class: int = 3, classes=("cat", "dog")) -> Path:
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            fmt, ext = ("PNG", "png") if j == 1 else ("JPEG", "JPEG")
            (root / cls / f"{cls}_{j}.{ext}").write_bytes(_encode(_image(ci * 10 + j), fmt))
    return root


def _annotator():
    from relabel_shards.annotator import create_annotator

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # build_shards' default seed: the same random weights
        return create_annotator(MODEL)


def _read_samples(out: Path, info: dict) -> list[dict]:
    import webdataset as wds

    urls = [str(out / f) for f in info["filenames"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def _check_maps_match_annotator(
    samples: list[dict], shard_lengths: list[int], batch_size: int, image_key="jpg"
):
    from relabel_shards.labelmap import decode_label_map

    ann = _annotator()
    start = 0
    for n in shard_lengths:
        shard = samples[start : start + n]
        start += n
        for b in range(0, n, batch_size):
            batch = shard[b : b + batch_size]
            imgs = [
                Image.open(io.BytesIO(next(s[k] for k in (image_key, "png", "jpg") if k in s))).convert("RGB")
                for s in batch
            ]
            values, indices = ann(torch.stack([ann.preprocess(im) for im in imgs]))
            for s, v, i in zip(batch, values, indices, strict=True):
                lm = decode_label_map(s["rlm"])
                assert lm.num_classes == ann.num_classes
                np.testing.assert_array_equal(
                    np.asarray(lm.indices, dtype=np.int64), i.numpy().astype(np.int64)
                )
                np.testing.assert_array_equal(np.asarray(lm.values, dtype=np.float32), v.float().numpy())


def _tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("src") / "imgs")


def test_folder_end_to_end_read_by_webdataset_and_timm(folder, tmp_path):
    out = tmp_path / "ds"
    seen = []
    summary = build_shards(
        str(folder),
        str(out),
        model=MODEL,
        shard_size=4,
        batch_size=3,
        num_workers=2,
        encoding="lossless",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)
    assert summary.written == [0, 1] and summary.images == 6 and summary.failures == []
    info = read_info(str(out))
    split = info["splits"]["train"]
    assert split == summary.info
    assert split["filenames"] == ["train-000000.tar", "train-000001.tar"]
    assert split["shard_lengths"] == [4, 2] and split["num_samples"] == 6
    rs = split["relabel_shards"]
    assert (rs["k"], rs["height"], rs["width"], rs["num_classes"]) == (5, 5, 5, 1000)
    assert rs["annotator"]["model"] == MODEL and rs["encoding"] == "lossless"
    assert rs["dataset_classes"] == ["cat", "dog"] and rs["failures"] == []
    assert rs["source"] == {"kind": "folder", "url": str(folder), "num_files": 6}
    assert len(rs["class_names"]) == 1000 and rs["format_version"] == 1
    assert [s["bytes"] for s in rs["shards"]] == [os.path.getsize(out / f) for f in split["filenames"]]

    source_order = ["cat_0", "cat_1", "cat_2", "dog_0", "dog_1", "dog_2"]
    written = [source_order[i] for i in permutation(6, 0)]  # the default: a seeded global permutation
    assert written != source_order and sorted(written) == source_order
    assert rs["order"] == {"shuffled": True, "seed": 0}
    hists = [Counter(int(k.startswith("dog")) for k in written[:4]), Counter(int(k.startswith("dog"))
                                                                         for k in written[4:])]
    assert rs["shard_classes"] == [
        {"distinct": len(h), "top": {str(c): n for c, n in sorted(h.items(), key=lambda cn: (-cn[1], cn[0]))}}
        for h in hists
    ]
    samples = _read_samples(out, split)
    assert [s["__key__"] for s in samples] == written
    for s in samples:
        cls, j = s["__key__"].split("_")
        ext = "png" if j == "1" else "jpg"
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {ext, "cls", "json", "rlm"}
        src_name = f"{cls}_{j}.{'png' if j == '1' else 'JPEG'}"
        assert s[ext] == (folder / cls / src_name).read_bytes()  # original bytes, untouched
        assert int(s["cls"]) == ["cat", "dog"].index(cls)
        meta = json.loads(s["json"])
        assert meta == {"source": f"{cls}/{src_name}", "width": 56, "height": 40, "class_name": cls}
    _check_maps_match_annotator(samples, split["shard_lengths"], batch_size=3)

    from timm.data import create_dataset

    ds = create_dataset("wds/relabel", root=str(out), split="train", is_training=False, batch_size=1)
    got = [(img.size, int(t)) for img, t in ds]
    assert sorted(t for _, t in got) == [0, 0, 0, 1, 1, 1] and all(size == (56, 40) for size, _ in got)


def test_list_file_source(tmp_path):
    (tmp_path / "pics").mkdir()
    for j in range(3):
        (tmp_path / "pics" / f"p{j}.jpg").write_bytes(_encode(_image(50 + j), "JPEG"))
    lst = tmp_path / "files.tsv"
    lst.write_text("pics/p2.jpg\t9\npics/p0.jpg\t4\npics/p1.jpg\t9\n")
    out = tmp_path / "ds"
    build_shards(
        str(lst),
        str(out),
        model=MODEL,
        shard_size=2,
        batch_size=8,
        num_workers=0,
        encoding="lossless",
        split="val",
        shuffle=False,
    )
    split = read_info(str(out))["splits"]["val"]
    assert split["filenames"] == ["val-000000.tar", "val-000001.tar"]
    samples = _read_samples(out, split)
    assert [(s["__key__"], int(s["cls"])) for s in samples] == [("p2", 9), ("p0", 4), ("p1", 9)]
    assert json.loads(samples[0]["json"])["source"] == "pics/p2.jpg"
    _check_maps_match_annotator(samples, split["shard_lengths"], batch_size=8)


def test_input_shards_pass_through_imagenet_layout(tmp_path):
    src = tmp_path / "in"
    keys = [["n01440764_10026", "n01440764_10027"], ["n01443537_1"]]
    originals = {}
    for si, ks in enumerate(keys):
        samples = []
        for j, k in enumerate(ks):
            members = [
                (f"{k}.cls", str(si).encode()),
                (f"{k}.jpg", _encode(_image(70 + si * 5 + j), "JPEG")),
                (f"{k}.json", json.dumps({"filename": f"{k}.JPEG"}).encode()),
            ]
            originals[k] = members
            samples.append(members)
        write_shard(str(src), f"imagenet-train-{si:06d}.tar", samples)
    out = tmp_path / "ds"
    build_shards(
        str(src / "imagenet-train-{000000..000001}.tar"),
        str(out),
        model=MODEL,
        batch_size=4,
        num_workers=0,
        encoding="lossless",
        shard_size=1,
    )  # shard_size does not apply to shard inputs
    split = read_info(str(out))["splits"]["train"]
    assert split["shard_lengths"] == [2, 1] and split["relabel_shards"]["shard_size"] is None
    import tarfile

    for si, ks in enumerate(keys):
        with tarfile.open(out / split["filenames"][si]) as tar:
            names = tar.getnames()
            expect = [n for k in ks for n in [*[m for m, _ in originals[k]], f"{k}.rlm"]]
            assert names == expect  # input order kept, the label map last
            for k in ks:
                for name, data in originals[k]:
                    assert tar.extractfile(name).read() == data
    _check_maps_match_annotator(_read_samples(out, split), split["shard_lengths"], batch_size=4)


def test_bad_inputs_are_skipped_and_listed_or_fatal_with_strict(tmp_path):
    root = _make_folder(tmp_path / "imgs", per_class=2)
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "garbage.png").write_bytes(b"this is not a png")
    (root / "dog" / "cut.jpg").write_bytes(_encode(_image(3, (64, 64)), "JPEG")[:200])
    (root / "dog" / "notes.txt").write_text("hi")
    out = tmp_path / "ds"
    summary = build_shards(str(root), str(out), **SMALL, shard_size=3, num_workers=0, shuffle=False)
    split = read_info(str(out))["splits"]["train"]
    rs = split["relabel_shards"]
    assert split["num_samples"] == 4 and rs["num_failures"] == 4
    reasons = {f["source"]: f["reason"] for f in rs["failures"]}
    assert reasons["cat/empty.jpg"] == "empty file"
    assert reasons["dog/garbage.png"] == "not a decodable image (PIL cannot identify it)"
    assert reasons["dog/cut.jpg"].startswith("cannot decode image")
    assert reasons["dog/notes.txt"] == "not an image file (extension 'txt')"
    assert sorted(f["source"] for f in summary.failures) == sorted(reasons)
    keys = [s["__key__"] for s in _read_samples(out, split)]
    assert keys == ["cat_0", "cat_1", "dog_0", "dog_1"]

    with pytest.raises(ValueError, match=r"cat/empty\.jpg: empty file \(strict"):
        build_shards(
            str(root),
            str(tmp_path / "strict"),
            **SMALL,
            shard_size=2,
            batch_size=1,
            num_workers=0,
            strict=True,
            shuffle=False,
        )
    # shard 0 (cat_0, cat_1) was complete; shard 1 starts with the empty file: no partial shard, no _info.json
    assert sorted(os.listdir(tmp_path / "strict")) == ["train-000000.tar", "train-000000_stats.json"]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"source": "missing"}, FileNotFoundError, r"source '.*missing' does not exist"),
        ({"source": "empty"}, ValueError, r"source '.*empty' holds no images"),
        ({"model": "no_such_model_xyz"}, ValueError, r"unknown timm model name 'no_such_model_xyz'"),
        ({"shard_size": 0}, ValueError, r"shard_size must be an integer >= 1, got 0"),
        ({"encoding": "gzip"}, ValueError, r"encoding must be one of \['compact', 'lossless'\], got 'gzip'"),
        ({"rank": 2, "world_size": 2}, ValueError, r"rank must be in \[0, world_size-1=1\], got 2"),
    ],
)
def test_clear_errors(folder, tmp_path, kwargs, exc, match):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    args = {"source": str(folder), "model": MODEL, "num_workers": 0, **kwargs}
    if args["source"] in ("missing", "empty"):
        args["source"] = str(tmp_path / args["source"])
    with pytest.raises(exc, match=match):
        build_shards(args.pop("source"), str(tmp_path / "out"), **args)


def test_cli_errors_are_one_line_nonzero(folder, tmp_path):
    from click.testing import CliRunner

    from relabel_shards.cli import cli

    runner = CliRunner()
    for args, match in [
        ([str(tmp_path / "nope"), str(tmp_path / "o")], "does not exist"),
        ([str(folder), str(tmp_path / "o"), "--model", "no_such_model_xyz"], "unknown timm model"),
    ]:
        res = runner.invoke(cli, ["build", *args, "--num-workers", "0"])
        assert res.exit_code == 1
        assert res.output.strip().splitlines()[-1].startswith("Error: ") and match in res.output
        assert "Traceback" not in res.output


def test_two_ranks_give_the_same_shards_as_one(folder, tmp_path, monkeypatch):
    one = tmp_path / "one" / "ds"
    build_shards(str(folder), str(one), **SMALL, shard_size=2, batch_size=2, num_workers=0)
    two = tmp_path / "two" / "ds"
    s0 = build_shards(
        str(folder), str(two), **SMALL, shard_size=2, batch_size=2, num_workers=0, rank=0, world_size=2
    )
    assert s0.written == [0, 2] and s0.info is None and not (two / "_info.json").exists()
    monkeypatch.setenv("RANK", "1")  # rank 1 from torchrun's environment variables
    monkeypatch.setenv("WORLD_SIZE", "2")
    s1 = build_shards(str(folder), str(two), **SMALL, shard_size=2, batch_size=2, num_workers=0)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert s1.written == [1] and s1.info is not None
    assert _tree(two) == _tree(one)
    # a rerun finds every shard complete and rewrites nothing but the identical _info.json
    again = build_shards(str(folder), str(two), **SMALL, shard_size=2, batch_size=2, num_workers=0)
    assert again.written == [] and again.skipped == [0, 1, 2] and again.images == 0
    assert _tree(two) == _tree(one)


def test_other_settings_into_the_same_out_is_an_error(folder, tmp_path):
    out = tmp_path / "ds"
    build_shards(str(folder), str(out), **SMALL, shard_size=3, num_workers=0)
    with pytest.raises(ValueError, match=r"of a different build .*annotator\.topk: 5 there, 3 now"):
        build_shards(str(folder), str(out), **SMALL, shard_size=3, num_workers=0, topk=3)
    with pytest.raises(ValueError, match=r"order\.seed: 0 there, 7 now.*\.shard_size: 3 there, 2 now"):
        build_shards(str(folder), str(out), **SMALL, shard_size=2, num_workers=0, shuffle_seed=7)
    fewer = tmp_path / "fewer"
    for p in folder.rglob("*"):
        if p.is_file() and p.name != "dog_2.JPEG":
            (fewer / p.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (fewer / p.relative_to(folder)).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match=r"the input list differs.*source\.num_files: 6 there, 5 now"):
        build_shards(str(fewer), str(out), **SMALL, shard_size=3, num_workers=0)


def test_out_that_is_a_file_is_an_error(folder, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"OUT '.*file' is a file; give a directory"):
        build_shards(str(folder), str(tmp_path / "file"), **SMALL, num_workers=0)


def test_keep_aspect_batches_by_size(tmp_path):
    root = tmp_path / "imgs" / "c"
    root.mkdir(parents=True)
    sizes = [(40, 56), (56, 40), (40, 56), (48, 48)]
    for j, size in enumerate(sizes):
        (root / f"i{j}.png").write_bytes(_encode(_image(90 + j, size), "PNG"))
    out = tmp_path / "ds"
    build_shards(
        str(tmp_path / "imgs"),
        str(out),
        model=MODEL,
        keep_aspect=True,
        input_size=64,
        batch_size=4,
        num_workers=0,
        encoding="lossless",
    )
    split = read_info(str(out))["splits"]["train"]
    rs = split["relabel_shards"]
    assert rs["height"] is None and rs["width"] is None
    assert rs["map_shapes"] == [[2, 2], [2, 3], [3, 2]]
    from relabel_shards.annotator import create_annotator
    from relabel_shards.labelmap import decode_label_map

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ann = create_annotator(MODEL, keep_aspect=True, input_size=64)
    samples = _read_samples(out, split)
    groups = {}
    for s in samples:
        t = ann.preprocess(Image.open(io.BytesIO(s["png"])))
        groups.setdefault(tuple(t.shape), []).append((s, t))
    for members in groups.values():  # the build ran one batch per image size
        values, indices = ann(torch.stack([t for _, t in members]))
        for (s, _), v, i in zip(members, values, indices, strict=True):
            lm = decode_label_map(s["rlm"])
            assert lm.values.shape == tuple(v.shape)
            np.testing.assert_array_equal(np.asarray(lm.values, dtype=np.float32), v.float().numpy())
            np.testing.assert_array_equal(np.asarray(lm.indices, dtype=np.int64), i.numpy().astype(np.int64))


def test_s3_output_equals_local(folder, tmp_path, s3_bucket):
    import fsspec

    local = tmp_path / "ds"
    build_shards(str(folder), str(local), **SMALL, shard_size=4, num_workers=0)
    remote = f"{s3_bucket}/ds"
    summary = build_shards(str(folder), remote, **SMALL, shard_size=4, num_workers=0)
    assert summary.info == read_info(str(local))["splits"]["train"]
    fs, _ = fsspec.core.url_to_fs(remote)
    for name, data in _tree(local).items():
        assert fs.cat_file(f"{remote}/{name}") == data, name
    again = build_shards(str(folder), remote, **SMALL, shard_size=4, num_workers=0)
    assert again.written == [] and again.skipped == [0, 1]


_GLOO_RANK = """
import json, sys
import torch.distributed as dist
from relabel_shards.build import build_shards
from relabel_shards.labelmap import decode_label_map
rank, port, src, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
s = build_shards(src, out, model="test_efficientnet", input_size=64, shard_size=2, batch_size=2,
                 num_workers=0)
print(json.dumps({"rank": s.rank, "world_size": s.world_size, "written": s.written,
                  "info": s.info is not None}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_processes_give_the_same_shards_as_one(folder, tmp_path):
    import socket
    import subprocess
    import sys

    one = tmp_path / "one" / "ds"
    build_shards(str(folder), str(one), **SMALL, shard_size=2, batch_size=2, num_workers=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two" / "ds"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    # rank 1 in a subprocess, rank 0 here
    proc = subprocess.Popen(
        [sys.executable, "-c", _GLOO_RANK, "1", str(port), str(folder), str(two)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=2,
        timeout=datetime.timedelta(seconds=180),
    )
    try:
        s0 = build_shards(str(folder), str(two), **SMALL, shard_size=2, batch_size=2, num_workers=0)
    finally:
        dist.destroy_process_group()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert (s0.rank, s0.world_size, s0.written, s0.info is not None) == (
        0,
        2,
        [0, 2],
        True,
    )  # after the barrier
    assert json.loads(stdout.strip().splitlines()[-1]) == {
        "rank": 1,
        "world_size": 2,
        "written": [1],
        "info": False,
    }
    assert _tree(two) == _tree(one)


@pytest.mark.slow
def test_real_annotator_collage_localizes_each_half(real_photos, tmp_path):
    """chelsea | coffee side by side, built with the embedded Lite0 annotator, read back, pooled per half."""
    import webdataset as wds
    from timm.data import ImageNetInfo

    from relabel_shards.labelmap import decode_label_map
    from relabel_shards.pooling import label_pooling

    cat, coffee = (
        Image.fromarray(real_photos[k]).resize((300, 300), Image.BICUBIC) for k in ("chelsea", "coffee")
    )
    collage = Image.new("RGB", (600, 300))
    collage.paste(cat, (0, 0))
    collage.paste(coffee, (300, 0))
    (tmp_path / "src" / "photos").mkdir(parents=True)
    collage.save(tmp_path / "src" / "photos" / "chelsea_coffee.jpg", quality=95)
    out = tmp_path / "ds"
    build_shards(str(tmp_path / "src"), str(out), keep_aspect=True, input_size=224, num_workers=0)
    split = read_info(str(out))["splits"]["train"]
    assert split["relabel_shards"]["annotator"]["weights"] == "embedded"
    (sample,) = list(wds.WebDataset(str(out / split["filenames"][0]), shardshuffle=False))
    lm = decode_label_map(sample["rlm"])
    assert lm.values.shape == (5, 7, 14)  # 224 x 448 input: the map keeps the collage's 1:2 aspect
    values = torch.as_tensor(np.asarray(lm.values, dtype=np.float32))[None].expand(2, -1, -1, -1)
    indices = torch.as_tensor(np.asarray(lm.indices, dtype=np.int64))[None].expand(2, -1, -1, -1)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]])
    probs = label_pooling(values, indices, boxes, lm.num_classes)
    info = ImageNetInfo()
    assert [info.index_to_description(int(i)) for i in probs.argmax(1)] == ["Egyptian cat", "espresso"]


def test_input_shards_over_http_with_their_info_for_progress(tmp_path, http_dir):
    root, url = http_dir
    samples = [[(f"k{j}.jpg", _encode(_image(200 + j), "JPEG")), (f"k{j}.cls", b"3")] for j in range(3)]
    rec = write_shard(str(root), "in-000000.tar", samples)
    (root / "_info.json").write_text(
        json.dumps(
            {
                "splits": {
                    "train": {
                        "name": "train",
                        "num_samples": 3,
                        "filenames": [rec.filename],
                        "shard_lengths": [3],
                    }
                }
            }
        )
    )
    seen = []
    out = tmp_path / "ds"
    build_shards(
        f"{url}/in-000000.tar", str(out), **SMALL, num_workers=0, progress=lambda d, t: seen.append((d, t))
    )
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)  # the total comes from the inputs' _info.json
    split = read_info(str(out))["splits"]["train"]
    assert [s["__key__"] for s in _read_samples(out, split)] == ["k0", "k1", "k2"]
    assert split["relabel_shards"]["source"] == {
        "kind": "shards",
        "url": f"{url}/in-000000.tar",
        "num_shards": 1,
    }


def test_duplicate_key_in_input_shard_is_fatal_even_without_strict(tmp_path):
    jpg = _encode(_image(1), "JPEG")
    write_shard(str(tmp_path / "in"), "in-000000.tar",
                [[("a.jpg", jpg), ("a.cls", b"0")], [("b.jpg", jpg), ("b.cls", b"0")], [("a.jpg", jpg)]])
    with pytest.raises(ValueError, match=r"in-000000\.tar: key 'a' appears twice"):
        build_shards(str(tmp_path / "in" / "in-000000.tar"), str(tmp_path / "ds"), **SMALL, num_workers=0)
    write_shard(str(tmp_path / "in2"), "x-000000.tar", [[("a.jpg", jpg), ("a.cls", b"0")]])
    write_shard(str(tmp_path / "in2"), "x-000001.tar", [[("a.png", jpg), ("a.cls", b"0")]])
    with pytest.raises(ValueError, match=r"duplicate sample key 'a': in x-000000\.tar and in x-000001\.tar"):
        build_shards(
            str(tmp_path / "in2" / "x-{000000..000001}.tar"),
            str(tmp_path / "ds2"),
            **SMALL,
            prefix="x",
            num_workers=0,
        )


def test_gcs_output_equals_local(folder, tmp_path, gcs_endpoint):
    import gcsfs

    opts = {"token": "anon", "project": "test"}
    fs = gcsfs.GCSFileSystem(**opts)
    fs.mkdir("relabel-build-test")
    local = tmp_path / "ds"
    build_shards(str(folder), str(local), **SMALL, shard_size=4, num_workers=0)
    remote = "gs://relabel-build-test/ds"
    summary = build_shards(str(folder), remote, **SMALL, shard_size=4, num_workers=0, storage_options=opts)
    assert summary.info == read_info(str(local))["splits"]["train"]
    for name, data in _tree(local).items():
        assert fs.cat_file(f"relabel-build-test/ds/{name}") == data, name


def test_cli_build_with_progress_bar(folder, tmp_path):
    from click.testing import CliRunner

    from relabel_shards.cli import cli

    out = tmp_path / "ds"
    res = CliRunner().invoke(
        cli,
        [
            "build",
            str(folder),
            str(out),
            "--model",
            MODEL,
            "--input-size",
            "64",
            "--shard-size",
            "4",
            "--num-workers",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "random weights" in res.output  # the CLI warns that a bare --model has random weights
    assert "6/6" in res.output and "img/s" in res.output  # tqdm: count, rate (and ETA)
    assert f"{out}: 2 shards, 6 samples, 0 failures listed in _info.json" in res.output
    assert read_info(str(out))["splits"]["train"]["shard_lengths"] == [4, 2]


@pytest.mark.cuda
def test_cuda_build_matches_direct_annotator_calls(folder, tmp_path):
    out = tmp_path / "ds"
    build_shards(
        str(folder),
        str(out),
        model=MODEL,
        device="cuda",
        shard_size=4,
        batch_size=4,
        num_workers=2,
        encoding="lossless",
    )
    split = read_info(str(out))["splits"]["train"]
    assert split["relabel_shards"]["annotator"]["trunk_dtype"] == "bfloat16"
    from relabel_shards.annotator import create_annotator
    from relabel_shards.labelmap import decode_label_map

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ann = create_annotator(MODEL, device="cuda")
    samples = _read_samples(out, split)
    for start, n in ((0, 4), (4, 2)):
        batch = samples[start : start + n]
        imgs = [Image.open(io.BytesIO(s.get("jpg", s.get("png")))).convert("RGB") for s in batch]
        values, indices = ann(torch.stack([ann.preprocess(im) for im in imgs]))
        for s, v, i in zip(batch, values, indices, strict=True):
            lm = decode_label_map(s["rlm"])
            # same batches on the same GPU; allow for bf16 kernels that are not bitwise reproducible
            top1 = np.asarray(lm.indices, dtype=np.int64)[0] == i.numpy().astype(np.int64)[0]
            assert top1.mean() >= 0.9
            np.testing.assert_allclose(
                np.asarray(lm.values, dtype=np.float32)[0], v.float().numpy()[0], atol=5e-2
            )


def test_imagefolder_and_list_on_s3_equal_local(folder, tmp_path, s3_bucket):
    import fsspec

    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    fs.put(str(folder), f"{s3_bucket}/imgs", recursive=True)
    local = tmp_path / "local"
    build_shards(str(folder), str(local), **SMALL, shard_size=4, num_workers=0)
    remote = tmp_path / "remote"
    build_shards(f"{s3_bucket}/imgs", str(remote), **SMALL, shard_size=4, num_workers=0)
    assert [p for p in _tree(remote) if p != "_info.json"] == [p for p in _tree(local) if p != "_info.json"]
    for name in _tree(local):
        if name.endswith(".tar"):  # same members and bytes: relative sources, same keys, same maps
            assert _tree(remote)[name] == _tree(local)[name], name
    info = read_info(str(remote))["splits"]["train"]["relabel_shards"]
    assert info["source"] == {"kind": "folder", "url": f"{s3_bucket}/imgs", "num_files": 6}
    fs.pipe_file(f"{s3_bucket}/list.txt", b"imgs/cat/cat_0.JPEG\t1\nimgs/dog/dog_1.png\t0\n")
    build_shards(f"{s3_bucket}/list.txt", str(tmp_path / "fromlist"), **SMALL, num_workers=0, shuffle=False)
    split = read_info(str(tmp_path / "fromlist"))["splits"]["train"]
    samples = _read_samples(tmp_path / "fromlist", split)
    assert [(s["__key__"], int(s["cls"])) for s in samples] == [("cat_0", 1), ("dog_1", 0)]
    assert samples[0]["jpg"] == (folder / "cat" / "cat_0.JPEG").read_bytes()


def test_unencodable_map_names_shard_and_key_and_leaves_no_partial_shard(folder, tmp_path, monkeypatch):
    from relabel_shards.annotator import Annotator

    real_call = Annotator.__call__

    def nan_call(self, images):  # a broken checkpoint: non-finite logits
        values, indices = real_call(self, images)
        return torch.full_like(values, float("nan")), indices

    monkeypatch.setattr(Annotator, "__call__", nan_call)
    first = ["cat_0", "cat_1", "cat_2", "dog_0", "dog_1", "dog_2"][int(permutation(6, 0)[0])]
    with pytest.raises(ValueError, match=rf"train-000000\.tar key {first}: cannot encode its label map"):
        build_shards(str(folder), str(tmp_path / "ds"), **SMALL, shard_size=4, num_workers=0)
    assert os.listdir(tmp_path / "ds") == []


def test_rebuilding_labelled_shards_replaces_the_label_map(folder, tmp_path):
    import tarfile

    from relabel_shards.labelmap import decode_label_map

    first = tmp_path / "first"
    build_shards(str(folder), str(first), **SMALL, shard_size=6, num_workers=0)
    again = tmp_path / "again"
    build_shards(str(first / "train-000000.tar"), str(again), **SMALL, topk=3, num_workers=0)
    with tarfile.open(first / "train-000000.tar") as a, tarfile.open(again / "train-000000.tar") as b:
        assert a.getnames() == b.getnames()  # same members, same order: one .rlm per sample, still last
        for name in a.getnames():
            if name.endswith(".rlm"):
                assert decode_label_map(a.extractfile(name).read()).values.shape[0] == 5
                assert decode_label_map(b.extractfile(name).read()).values.shape[0] == 3
            else:
                assert a.extractfile(name).read() == b.extractfile(name).read()


def test_damaged_input_shards_and_samples_are_listed_not_lost(tmp_path):
    """A truncated input tar, a sample without .cls and a mask member: each is listed, none goes silently."""
    import tarfile

    src = tmp_path / "in"
    jpg = _encode(_image(5), "JPEG")
    write_shard(str(src), "in-000000.tar", [
        [("a.jpg", jpg), ("a.cls", b"1")],
        [("nocls.jpg", jpg), ("nocls.json", b"{}")],
        [("m.seg.png", _encode(_image(6), "PNG")), ("m.jpg", jpg), ("m.cls", b"0")],
    ])
    write_shard(str(src), "in-000001.tar", [[(f"b{i}.jpg", jpg), (f"b{i}.cls", b"0")] for i in range(3)])
    cut = tarfile.open(src / "in-000001.tar").getmembers()[4].offset  # at the header of b2.jpg
    (src / "in-000001.tar").write_bytes((src / "in-000001.tar").read_bytes()[:cut])
    out = tmp_path / "ds"
    build_shards(str(src / "in-{000000..000001}.tar"), str(out), model=MODEL, batch_size=4, num_workers=0,
                 encoding="lossless")
    split = read_info(str(out))["splits"]["train"]
    assert split["shard_lengths"] == [2, 1]  # b1's members after the cut are unknown: b1 is not written
    reasons = {f["source"].rsplit("/", 1)[-1]: f["reason"] for f in split["relabel_shards"]["failures"]}
    assert reasons["in-000000.tar#nocls"].startswith("no .cls member (the class index)")
    assert reasons["in-000001.tar"].startswith("input shard unreadable from here on:")
    assert "after key 'b0' (key 'b1' incomplete) (truncated: data ends at byte" in reasons["in-000001.tar"]
    with tarfile.open(out / "train-000000.tar") as tar:  # the mask passes through; the map is the photo's
        assert tar.getnames()[3:] == ["m.seg.png", "m.jpg", "m.cls", "m.rlm"]
    ann = _annotator()
    with tarfile.open(out / "train-000000.tar") as tar:
        rec = decode_label_map(tar.extractfile("m.rlm").read())
    # lossless is float32 end to end: the annotator's own top-k of the same batch (a, m), bit for bit
    x = ann.preprocess(Image.open(io.BytesIO(jpg)))
    values, indices = ann(torch.stack([x, x]))
    assert rec.values.dtype == np.float32 and values.dtype == torch.float32
    assert np.array_equal(rec.values, values[1].numpy()) and np.array_equal(rec.indices, indices[1].numpy())


def test_every_input_failing_exits_nonzero_with_one_summary(tmp_path, caplog):
    from click.testing import CliRunner

    from relabel_shards.cli import cli
    from relabel_shards.plan import AllInputsFailedError

    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for j in range(4):
            (root / c / f"{c}_{j}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "ds"
    caplog.set_level("WARNING")
    with pytest.raises(AllInputsFailedError, match=r"build failed: every one of its 8 inputs failed and "
                                                   r"no sample was written .*8 x not a decodable image \("):
        build_shards(str(root), str(out), **SMALL, shard_size=3, num_workers=0)
    assert len([r for r in caplog.records if r.getMessage().startswith("skipping ")]) == 3
    # the rerun finds the shards complete, and still does not report success
    with pytest.raises(AllInputsFailedError, match=r"every one of its 8 inputs failed"):
        build_shards(str(root), str(out), **SMALL, shard_size=3, num_workers=0)
    res = CliRunner().invoke(cli, ["build", str(root), str(tmp_path / "o2"), "--model", MODEL, "--input-size",
                                   "64", "--num-workers", "0", "--no-progress"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith("Error: build failed: every one of its 8 inputs")


def test_class_mismatch_between_source_and_annotator_warns(folder, tmp_path, caplog):
    from types import SimpleNamespace

    from relabel_shards.build import _class_mismatch
    from relabel_shards.sources import FileItem, Source

    caplog.set_level("WARNING")
    build_shards(str(folder), str(tmp_path / "ds"), **SMALL, num_workers=0)
    assert any("the source has 2 classes, the annotator 1000: .cls holds the source's class index" in
               r.getMessage() for r in caplog.records)
    ann = SimpleNamespace(num_classes=3, class_names=["ant", "bee", "cat"])
    assert _class_mismatch(Source("folder", "x", classes=("ant", "bee", "cat")), ann) is None
    assert _class_mismatch(Source("folder", "x", classes=("ant", "bug", "cat")), ann) == (
        "class 1 is 'bug' in the source and 'bee' for the annotator (the names differ)")
    items = (FileItem("a", "a.jpg", "a.jpg", 0), FileItem("b", "b.jpg", "b.jpg", 3))
    assert _class_mismatch(Source("list", "l", items=items), ann) == (
        "the source's labels go up to 3, the annotator has 3 classes")
    assert _class_mismatch(Source("list", "l", items=items[:1]), ann) is None


def test_cli_prints_skipped_inputs_by_kind(tmp_path):
    from click.testing import CliRunner

    from relabel_shards.cli import cli

    root = _make_folder(tmp_path / "imgs", per_class=1)
    for j in range(4):
        (root / "cat" / f"bad{j}.jpg").write_bytes(b"not a jpeg")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    args = ["--model", MODEL, "--input-size", "64", "--num-workers", "0", "--no-progress"]
    res = CliRunner().invoke(cli, ["build", str(root), str(tmp_path / "out"), *args])
    assert res.exit_code == 0, res.output
    assert "skipped inputs by kind (all are listed in _info.json's failures):" in res.output
    assert "  4 x not a decodable image (e.g. cat/bad" in res.output
    assert "  1 x empty file (e.g. dog/empty.jpg)" in res.output


def test_repeated_member_in_an_input_shard_is_a_listed_failure_or_fatal_with_strict(tmp_path):
    """k.jpg twice with different bytes: build used to annotate the first copy and pass both through, while
    the loader trained on the last. Now the sample is listed as a failure (both copies left out)."""
    import tarfile

    jpg, other = _encode(_image(1), "JPEG"), _encode(_image(2), "JPEG")
    src = tmp_path / "in"
    write_shard(str(src), "in-000000.tar", [
        [("a.jpg", jpg), ("a.cls", b"0")],
        [("k.jpg", jpg), ("k.cls", b"1"), ("k.jpg", other)],
        [("b.jpg", other), ("b.cls", b"1")],
    ])
    out = tmp_path / "ds"
    summary = build_shards(str(src / "in-000000.tar"), str(out), **SMALL, num_workers=0)
    split = read_info(str(out))["splits"]["train"]
    assert split["shard_lengths"] == [2]
    with tarfile.open(out / split["filenames"][0]) as tar:
        assert tar.getnames() == ["a.jpg", "a.cls", "a.rlm", "b.jpg", "b.cls", "b.rlm"]
    [failure] = split["relabel_shards"]["failures"]
    assert failure["key"] == "k" and failure["source"].endswith("in-000000.tar#k")
    assert "key 'k': member 'k.jpg' repeats an extension of the same sample" in failure["reason"]
    assert [f["key"] for f in summary.failures] == ["k"]
    strict = r"in-000000\.tar#k: .*member 'k\.jpg' repeats an extension.*\(strict"
    with pytest.raises(ValueError, match=strict):
        build_shards(str(src / "in-000000.tar"), str(tmp_path / "s"), **SMALL, num_workers=0, strict=True)


def test_key_from_path_and_the_pixel_limit(tmp_path, monkeypatch):
    """Caltech-style repeated names build with key_from='path'; an image over max_image_pixels is a listed
    failure naming the file, with no PIL warning printed (into the progress bar)."""
    import warnings

    root = tmp_path / "caltech"
    for ci, cls in enumerate(("accordion", "anchor")):
        (root / cls).mkdir(parents=True)
        for j in range(2):
            (root / cls / f"image_000{j + 1}.jpg").write_bytes(_encode(_image(ci * 10 + j), "JPEG"))
    (root / "anchor" / "image_0009.png").write_bytes(_encode(_image(9, size=(60, 60)), "PNG"))  # 3,600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # PIL alone would warn about every image here
    out = tmp_path / "ds"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = build_shards(str(root), str(out), **SMALL, num_workers=0, key_from="path",
                               max_image_pixels=3000)
    assert summary.images == 4
    split = read_info(str(out))["splits"]["train"]
    assert [f["source"] for f in split["relabel_shards"]["failures"]] == ["anchor/image_0009.png"]
    assert split["relabel_shards"]["failures"][0]["reason"].startswith(
        "60x60 image has 3,600 pixels, over the limit of 3,000 (max_image_pixels")
    keys = [s["__key__"] for s in _read_samples(out, split)]  # written in the seeded permutation
    assert sorted(keys) == ["accordion_image_0001", "accordion_image_0002", "anchor_image_0001",
                            "anchor_image_0002"]
    with pytest.raises(ValueError, match=r"duplicate sample key 'image_0001'.*--key-from path"):
        build_shards(str(root), str(tmp_path / "stem"), **SMALL, num_workers=0)
    with pytest.raises(ValueError, match=r"max_image_pixels must be an int >= 0 \(0 or None: no limit\)"):
        build_shards(str(root), str(tmp_path / "neg"), **SMALL, num_workers=0, max_image_pixels=-5)


def test_input_shard_json_must_record_the_upright_size(tmp_path):
    """The loader checks .json's size exactly, so build lists a mismatch instead of passing it through."""
    jpg = _encode(_image(1), "JPEG")  # 56 x 40
    write_shard(str(tmp_path / "in"), "in-000000.tar", [
        [("ok.jpg", jpg), ("ok.cls", b"0"), ("ok.json", b'{"width": 56, "height": 40}')],
        [("swapped.jpg", jpg), ("swapped.cls", b"0"), ("swapped.json", b'{"width": 40, "height": 56}')],
    ])
    build_shards(str(tmp_path / "in" / "in-000000.tar"), str(tmp_path / "ds2"), **SMALL, num_workers=0)
    split = read_info(str(tmp_path / "ds2"))["splits"]["train"]
    assert split["shard_lengths"] == [1]
    (fail,) = split["relabel_shards"]["failures"]
    assert fail["source"].endswith("in-000000.tar#swapped")
    assert fail["reason"] == ".json says 40x56 but the image is 56x40 (upright, after its EXIF orientation)"

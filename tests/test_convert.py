"""convert_official: synthetic official-format .pt files (legacy and zip torch.save) beside synthetic JPEGs.

The oracle is the official pipeline itself (``relabel_shards.pooling.official``: get_labelmaps + get_relabel,
restated from naver-ai/relabel_imagenet) run on the original files for the same crops.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from relabel_shards.convert import OFFICIAL_MODEL, convert_official
from relabel_shards.official_maps import OfficialMapError, load_official_map, map_relpath, split_official_map
from relabel_shards.plan import AllInputsFailedError, permutation
from relabel_shards.shards import read_info

SIZES = [(64, 48), (40, 72), (50, 50), (96, 30)]  # (width, height): landscape, portrait, square, wide


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    w, h = size
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _official_map(seed: int) -> torch.Tensor:
    """A [2, 5, 15, 15] float32 map like the release's: 5 distinct classes per cell, descending logits.

    Like a real map it has objects: the top class is one of three per image, by region, and the regions are
    not symmetric across the diagonal (so pooling the transposed map gives other targets).
    """
    rng = np.random.default_rng(seed)
    scores = rng.random((1000, 15, 15))
    a, b, c = rng.choice(1000, 3, replace=False)
    r, q = np.mgrid[0:15, 0:15]
    region = np.where(q < 5, a, np.where(r < 9, b, c))  # (15, 15): a left strip, b top right, c bottom right
    scores[region, r, q] = 2.0  # above every random score: ranks first
    classes = np.argsort(-scores, axis=0)[:5]  # (5, 15, 15), distinct per cell
    top = rng.uniform(1.0, 14.0, (1, 15, 15))
    gaps = np.cumsum(rng.uniform(0.0, 2.5, (4, 15, 15)), axis=0)
    values = np.concatenate([top, top - gaps])  # (5, 15, 15)
    return torch.from_numpy(np.stack([values, classes]).astype(np.float32))


def _save(t, path: Path, legacy: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(t, path, _use_new_zipfile_serialization=not legacy)


def _make_release(root: Path, classes=("n01440764", "n01443537"), per_class: int = 4
                  ) -> tuple[Path, Path, dict]:
    """(images, maps, {image relpath: the saved tensor}); maps alternate between legacy and zip files."""
    images, maps = root / "train", root / "relabel"
    saved = {}
    n = 0
    for c in classes:
        (images / c).mkdir(parents=True)
        for j in range(per_class):
            rel = f"{c}/{c}_{j}.JPEG"
            (images / rel).write_bytes(_jpeg(n, SIZES[n % len(SIZES)]))
            t = _official_map(n)
            _save(t, maps / map_relpath(rel), legacy=n % 2 == 0)
            saved[rel] = t
            n += 1
    return images, maps, saved


def _tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _samples(out: Path) -> list[dict]:
    import webdataset as wds

    split = read_info(str(out))["splits"]["train"]
    return list(wds.WebDataset([str(out / f) for f in split["filenames"]], shardshuffle=False))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return _make_release(tmp_path_factory.mktemp("release"))


# ---------------------------------------------------------------------------------------- reading files


@pytest.mark.parametrize("legacy", [True, False])
def test_load_both_serializations(tmp_path, legacy):
    t = _official_map(3)
    _save(t, tmp_path / "m.pt", legacy)
    data = (tmp_path / "m.pt").read_bytes()
    assert data[:2] == (b"\x80\x02" if legacy else b"PK")  # pickle protocol 2 / zip archive
    got = load_official_map(data)
    assert got.dtype == torch.float32 and torch.equal(got, t)


def test_split_layouts():
    t = _official_map(5)
    v, i = split_official_map(t, "hw")
    np.testing.assert_array_equal(v, t[0].numpy())
    np.testing.assert_array_equal(i, t[1].numpy().astype(np.int16))
    vt, it = split_official_map(t, "wh")
    np.testing.assert_array_equal(vt, t[0].numpy().transpose(0, 2, 1))
    np.testing.assert_array_equal(it, t[1].numpy().transpose(0, 2, 1).astype(np.int16))
    assert vt.flags.c_contiguous and it.dtype == np.int16
    with pytest.raises(ValueError, match=r"layout must be one of \['hw', 'wh'\], got 'xy'"):
        split_official_map(t, "xy")
    assert map_relpath("n0/n0_22023.JPEG") == "n0/n0_22023.pt"


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_files(tmp: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the reason load_official_map gives, as a regex)."""
    good = _official_map(1)

    def saved(obj, legacy=False) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
        return buf.getvalue()

    def edit(fn) -> torch.Tensor:
        t = good.clone()
        fn(t)
        return t

    zip_bytes = saved(good)
    return {
        "shape": (saved(good[:, :, :14]), r"shape must be \[2, 5, 15, 15\], got \[2, 5, 14, 15\]"),
        "dtype": (saved(good.double(), legacy=True), r"dtype must be float32, got float64"),
        "half": (saved(good.half()), r"dtype must be float32, got float16"),
        "nan": (saved(edit(lambda t: t[0, 2, 3, 4].fill_(float("nan")))),
                r"scores must be finite, got 1 NaN/inf of 1125"),
        "nanidx": (saved(edit(lambda t: t[1, 0, 0, 0].fill_(float("inf")))),
                   r"class indices must be finite, got 1 NaN/inf"),
        "fraction": (saved(edit(lambda t: t[1, 1, 2, 3].fill_(3.5))),
                     r"class indices must be integers, got 1 non-integral values \(e\.g\. 3\.5\)"),
        "high": (saved(edit(lambda t: t[1, 4, 14, 14].fill_(1000.0))),
                 r"class indices must be in \[0, 1000\), got values in \[\d+, 1000\]"),
        "negative": (saved(edit(lambda t: t[1, 0, 7, 7].fill_(-1.0)), legacy=True),
                     r"class indices must be in \[0, 1000\), got values in \[-1, \d+\]"),
        "repeat": (saved(edit(lambda t: t[1, 1, 5, 5].copy_(t[1, 0, 5, 5]))),
                   r"class indices must be distinct within a map cell \(top-k\), got repeats in 1 cells"),
        "dict": (saved({"maps": good}), r"holds a dict, expected a tensor \[2, 5, 15, 15\]"),
        "evil": (saved(_Evil(tmp / "pwned")),
                 r"not loadable with torch.load\(weights_only=True\) \(UnpicklingError: .*(system|GLOBAL)"),
        "pickle": (__import__("pickle").dumps(good), r"not loadable with torch.load\(weights_only=True\)"),
        "cut": (zip_bytes[:-100], r"not loadable with torch.load\(weights_only=True\)"),
        "empty": (b"", r"^empty file$"),
        "huge": (b"\0" * ((64 << 10) + 1), r"file is 65537 bytes, more than the 65536"),
        "inflates": (
            _deflated_torch_zip(1_000_000),
            r"zip directory declares 4000000 bytes of tensor data and 40002\d\d bytes in all, more than a "
            r"\[2, 5, 15, 15\] float32 map needs \(9000 and 65536\)",
        ),
    }


def _deflated_torch_zip(numel: int) -> bytes:
    """torch.save of ``numel`` zero floats, re-zipped with deflate: about 60 KB that torch.load would inflate
    to 4 * numel bytes (torch writes its entries stored; nothing stops a hostile file from deflating them)."""
    import zipfile

    buf = io.BytesIO()
    torch.save(torch.zeros(numel), buf)
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return out.getvalue()


def _deflate_bomb_zip(declared: int) -> bytes:
    """A zip whose one entry ``archive/data/0`` deflates ``declared`` zero bytes (a multiple of 1 MiB) into
    about declared / 1000 bytes; the stream is one fully flushed 1 MiB block repeated: cheap to make."""
    import struct
    import zlib

    mib = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)  # the state is reset: every block codes alike
    body = block * (declared >> 20) + c.flush()
    name = b"archive/data/0"
    sizes = (0, len(body), declared, len(name))  # CRC-32 left 0: a reader must refuse long before checking it
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 33, *sizes, 0)
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 33, *sizes, 0, 0, 0, 0, 0, 0)
    central += name
    offset = len(local) + len(name) + len(body)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central), offset, 0)
    return local + name + body + central + end


_RSS_PROBE = """
import json, sys
from relabel_shards.official_maps import OfficialMapError, load_official_map, read_map_file
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
base, out = hwm(), {}
for path in sys.argv[1:]:
    try:
        load_official_map(read_map_file(path))
        out[path] = "loaded"
    except OfficialMapError as e:
        out[path] = str(e)
print(json.dumps({"grew": hwm() - base, "errors": out, "torch": "torch" in sys.modules}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures VmHWM in /proc")
def test_hostile_map_files_cost_little_memory(tmp_path):
    """A 1.5 GB sparse file used to be read whole (+1.5 GB per worker), a 1 MB deflated zip declaring 1 GiB
    of storage cost 1.5 GB before it was rejected. Each is refused from its size or its zip directory."""
    sparse, bomb, small = tmp_path / "sparse.pt", tmp_path / "bomb.pt", tmp_path / "small.pt"
    with open(sparse, "wb") as f:
        f.truncate(1_500_000_000)  # no data blocks: costs no disk
    bomb.write_bytes(_deflate_bomb_zip(1 << 30))
    small.write_bytes(_deflated_torch_zip(15_000_000))
    assert len(bomb.read_bytes()) < 1_200_000 and len(small.read_bytes()) < 64 << 10
    with pytest.raises(OfficialMapError, match=r"zip directory declares 1073741824 bytes of tensor data"):
        import relabel_shards.official_maps as om

        om._check_zip_directory(bomb.read_bytes())  # what load_official_map would say below the size bound
    probe = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(sparse), str(bomb), str(small)],
                           capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(probe.stdout)
    errors = got["errors"]
    assert errors[str(sparse)] == (f"{sparse}: file is 1500000000 bytes, more than the 65536 an official map "
                                   "can take (about 10 KB)")
    assert errors[str(bomb)].startswith(f"{bomb}: file is {bomb.stat().st_size} bytes, more than the 65536")
    assert errors[str(small)].startswith("zip directory declares 60000000 bytes of tensor data")
    assert got["grew"] < 100 << 20, got  # peak RSS growth over all three
    assert not got["torch"]  # refused before torch was even imported


def test_read_map_file_stops_at_the_bound_whatever_the_size_says(tmp_path, monkeypatch):
    from relabel_shards import official_maps

    path = tmp_path / "grows.pt"
    path.write_bytes(bytes(200_000))
    monkeypatch.setattr("fsspec.implementations.local.LocalFileSystem.size", lambda self, p: 10)
    with pytest.raises(OfficialMapError, match=r"grows\.pt: file is more than 65536 bytes, more than the"):
        official_maps.read_map_file(str(path))
    path.write_bytes(bytes(100))
    assert official_maps.read_map_file(str(path)) == bytes(100)


def test_bad_files_rejected_with_reasons(tmp_path):
    for data, reason in _bad_files(tmp_path).values():
        with pytest.raises(OfficialMapError, match=reason):
            load_official_map(data)
    assert not (tmp_path / "pwned").exists()  # weights_only refused to call os.system


# ------------------------------------------------------------------------------------- end to end


def _official_and_ours(samples: list[dict], saved: dict, swap_xy: bool, n_crops: int = 6):
    """Targets of the same crops: the official pipeline on the original tensors, ours on the records."""
    from relabel_shards.crops import crop_box, random_resized_crop_params
    from relabel_shards.labelmap import decode_label_map
    from relabel_shards.pooling import label_pooling
    from relabel_shards.pooling.official import get_labelmaps, get_relabel

    rng = random.Random(0)
    records, coords, values, indices, boxes = [], [], [], [], []
    for s in samples:
        meta = json.loads(s["json"])
        w, h = meta["width"], meta["height"]
        assert Image.open(io.BytesIO(s["jpg"])).size == (w, h)
        lm = decode_label_map(s["rlm"])
        windows = [random_resized_crop_params(w, h, rng=rng) for _ in range(n_crops)]
        windows += [(0, 0, w, h), (0, 0, 1, 1), (w - 3, 0, 3, h), (0, h // 2, w, h - h // 2)]
        for left, top, cw, ch in windows:
            records.append(saved[meta["source"]])
            # the official loader: (i/H, j/W, h/H, w/W), then [2:] += [:2] -> (y1, x1, y2, x2)
            coords.append([top / h, left / w, (top + ch) / h, (left + cw) / w])
            values.append(torch.from_numpy(np.asarray(lm.values, dtype=np.float32)))
            indices.append(torch.from_numpy(np.asarray(lm.indices)))
            boxes.append(crop_box(left, top, cw, ch, w, h))
    b = len(records)
    official = get_relabel(get_labelmaps(torch.stack(records), b, device="cpu"), torch.tensor(coords), b)
    ours = label_pooling(torch.stack(values), torch.stack(indices), torch.tensor(boxes), 1000,
                         swap_xy=swap_xy)
    return official, ours


@pytest.mark.parametrize("layout, encoding, tol", [
    ("hw", "lossless", 1e-5),
    ("hw", "compact", 2e-3),
    ("wh", "lossless", 1e-5),
    ("wh", "compact", 2e-3),
])
def test_pooled_targets_equal_the_official_pipeline(release, tmp_path, layout, encoding, tol):
    images, maps, saved = release
    out = tmp_path / "ds"
    summary = convert_official(str(images), str(maps), str(out), layout=layout, encoding=encoding,
                               shard_size=3, num_workers=0)
    assert summary.failures == [] and summary.images == 8 and summary.written == [0, 1, 2]
    samples = _samples(out)
    in_path_order = [(Path(r).stem, c) for r, c in zip(saved, [0] * 4 + [1] * 4, strict=True)]
    written = [in_path_order[i] for i in permutation(8, 0)]  # the default: a seeded global permutation
    assert [(s["__key__"], int(s["cls"])) for s in samples] == written
    # hw is pooled with the official's swapped box; wh (transposed on import) with the correct one
    official, ours = _official_and_ours(samples, saved, swap_xy=layout == "hw")
    err = (official - ours).abs().max().item()
    assert err <= tol, err
    if encoding == "lossless":
        # the other pooling convention gives other targets: the layout is not a no-op
        _, wrong = _official_and_ours(samples, saved, swap_xy=layout != "hw")
        assert (official - wrong).abs().max().item() > 0.1
    rs = read_info(str(out))["splits"]["train"]["relabel_shards"]
    assert rs["layout"] == layout and rs["annotator"]["layout"] == layout
    assert rs["annotator"]["model"] == OFFICIAL_MODEL == "relabel_imagenet (official release)"
    assert rs["annotator"]["swap_xy_reproduces_official"] is (layout == "hw")
    assert (rs["k"], rs["height"], rs["width"], rs["num_classes"]) == (5, 15, 15, 1000)
    assert rs["encoding"] == encoding
    assert rs["num_failures"] == 0 and rs["dataset_classes"] == ["n01440764", "n01443537"]
    assert rs["class_names"][0].startswith("tench")


def test_bad_inputs_listed_and_skipped_or_fatal_with_strict(tmp_path):
    images, maps, _ = _make_release(tmp_path, classes=("a", "b"), per_class=2)
    bad = _bad_files(tmp_path)
    for name, (data, _) in bad.items():
        (images / "b" / f"{name}.JPEG").write_bytes(_jpeg(7, (32, 32)))
        (maps / "b" / f"{name}.pt").write_bytes(data)
    (images / "a" / "nomap.JPEG").write_bytes(_jpeg(8, (32, 32)))  # image without a map
    _save(_official_map(9), maps / "a" / "orphan.pt", legacy=False)  # map without an image
    for j in range(3):  # a class folder without images: one failure for the folder
        _save(_official_map(9), maps / "c" / f"lost{j}.pt", legacy=True)
    (images / "a" / "broken.JPEG").write_bytes(b"not a jpeg")
    _save(_official_map(10), maps / "a" / "broken.pt", legacy=False)
    (images / "a" / "truncated.JPEG").write_bytes(_jpeg(11, (64, 64))[:300])
    _save(_official_map(11), maps / "a" / "truncated.pt", legacy=False)
    (maps / "README.txt").write_text("not a map: ignored")

    out = tmp_path / "ds"
    summary = convert_official(str(images), str(maps), str(out), shard_size=4, num_workers=2,
                               encoding="lossless", shuffle=False)
    split = read_info(str(out))["splits"]["train"]
    rs = split["relabel_shards"]
    failures = {f["source"]: f for f in rs["failures"]}
    assert split["num_samples"] == 4 and rs["num_failures"] == len(bad) + 5 == len(failures)
    assert sorted(f["source"] for f in summary.failures) == sorted(failures)
    for name, (_, reason) in bad.items():
        f = failures[f"b/{name}.pt"]
        assert f["key"] == name and f["image"] == f"b/{name}.JPEG"
        assert f["reason"].startswith("bad label map: "), f
        import re

        assert re.search(reason, f["reason"][len("bad label map: "):]), (name, f["reason"])
    assert failures["a/nomap.JPEG"]["reason"] == "image without a label map (no a/nomap.pt in the release)"
    assert failures["a/orphan.pt"]["reason"].startswith("label map without an image (no image a/orphan.*")
    assert failures["c/"] == {
        "key": "c", "source": "c/",
        "reason": "3 label maps without an image (the image folder has no class folder c)"}
    assert failures["a/broken.JPEG"]["reason"] == "not a decodable image (PIL cannot identify it)"
    assert failures["a/truncated.JPEG"]["reason"].startswith("cannot decode image")
    assert [s["__key__"] for s in _samples(out)] == ["a_0", "a_1", "b_0", "b_1"]
    assert not (tmp_path / "pwned").exists()

    # strict: pairing problems stop the job before anything is written
    with pytest.raises(ValueError, match=r"a/nomap\.JPEG: image without a label map .* "
                                         r"\(strict: 1 images without a map, 4 maps without an image\)"):
        convert_official(str(images), str(maps), str(tmp_path / "s1"), num_workers=0, strict=True)
    assert not (tmp_path / "s1").exists()
    (images / "a" / "nomap.JPEG").unlink()
    with pytest.raises(ValueError, match=r"a/orphan\.pt: label map without an image \(no image a/orphan\.\* "
                                         r"in the image folder\) \(strict: 0 images without a map, 4 maps"):
        convert_official(str(images), str(maps), str(tmp_path / "s2"), num_workers=0, strict=True)
    (maps / "a" / "orphan.pt").unlink()
    shutil.rmtree(maps / "c")
    # a bad file stops it where it is met: complete shards before it stay, no partial shard, no _info.json
    with pytest.raises(ValueError, match=r"a/broken\.JPEG: not a decodable image .*\(strict: a bad input"):
        convert_official(str(images), str(maps), str(tmp_path / "s3"), num_workers=0, strict=True,
                         shard_size=2, shuffle=False)
    assert sorted(os.listdir(tmp_path / "s3")) == ["train-000000.tar", "train-000000_stats.json"]
    for p in ("broken", "truncated"):
        (images / "a" / f"{p}.JPEG").unlink()
        (maps / "a" / f"{p}.pt").unlink()
    with pytest.raises(ValueError, match=r"b/cut\.pt: bad label map: not loadable"):
        convert_official(str(images), str(maps), str(tmp_path / "s4"), num_workers=0, strict=True,
                         shuffle=False)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"layout": "xy"}, ValueError, r"layout must be one of \['hw', 'wh'\], got 'xy'"),
    ({"shard_size": 0}, ValueError, r"shard_size must be an integer >= 1, got 0"),
    ({"encoding": "gzip"}, ValueError, r"encoding must be one of \['compact', 'lossless'\], got 'gzip'"),
    ({"rank": 2, "world_size": 2}, ValueError, r"rank must be in \[0, world_size-1=1\], got 2"),
    ({"relabel_root": "missing"}, FileNotFoundError, r"relabel_root '.*missing' is not a directory"),
    ({"relabel_root": "empty"}, ValueError, r"relabel_root '.*empty' holds no \.pt label maps"),
    ({"images": "list"}, ValueError, r"images must be an ImageFolder directory \(class/image files\), got a "
                                     r"list"),
])
def test_clear_errors(release, tmp_path, kwargs, exc, match):
    images, maps, _ = release
    (tmp_path / "empty").mkdir()
    (tmp_path / "list").write_text(f"{images}/n01440764/n01440764_0.JPEG\t0\n")
    args = {"images": str(images), "relabel_root": str(maps), "num_workers": 0, **kwargs}
    for k in ("images", "relabel_root"):
        if args[k] in ("missing", "empty", "list"):
            args[k] = str(tmp_path / args[k])
    with pytest.raises(exc, match=match):
        convert_official(args.pop("images"), args.pop("relabel_root"), str(tmp_path / "out"), **args)


def test_two_ranks_give_the_same_shards_as_one_and_rerun_keeps_them(release, tmp_path):
    images, maps, _ = release
    one = tmp_path / "one" / "ds"
    convert_official(str(images), str(maps), str(one), shard_size=3, num_workers=0)
    two = tmp_path / "two" / "ds"
    s0 = convert_official(str(images), str(maps), str(two), shard_size=3, num_workers=0, rank=0, world_size=2)
    assert s0.written == [0, 2] and s0.info is None and not (two / "_info.json").exists()
    s1 = convert_official(str(images), str(maps), str(two), shard_size=3, num_workers=1, rank=1, world_size=2)
    assert s1.written == [1] and s1.info is not None
    assert _tree(two) == _tree(one)
    again = convert_official(str(images), str(maps), str(two), shard_size=3, num_workers=0)
    assert again.written == [] and again.skipped == [0, 1, 2] and again.images == 0
    assert _tree(two) == _tree(one)
    with pytest.raises(ValueError, match=r"of a different build .*settings\.layout: 'hw' there, 'wh' now"):
        convert_official(str(images), str(maps), str(two), shard_size=3, num_workers=0, layout="wh")


def _cmd(images: Path, maps: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "relabel_shards.cli", "convert", str(images), str(maps), str(out),
            "--shard-size", "1", "--num-workers", "0", "--no-progress"]


@pytest.mark.slow
def test_kill_dash_nine_then_rerun_is_byte_identical(tmp_path):
    """A light test_build_resume: kill the CLI mid-way once, rerun, compare every file's bytes."""
    images, maps, _ = _make_release(tmp_path / "src", classes=("a", "b", "c"), per_class=8)
    args = dict(shard_size=1, num_workers=0)  # the CLI call's options below
    ref = tmp_path / "ref" / "ds"
    convert_official(str(images), str(maps), str(ref), **args)
    reference = _tree(ref)
    assert sum(n.endswith(".tar") for n in reference) == 24

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "killed" / "ds"
    for target in (4, 1):  # kill once this many shards are complete; fewer if the first run outran us
        proc = subprocess.Popen(_cmd(images, maps, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and sum(n.endswith("_stats.json") for n in os.listdir(out)) >= target:
                break
            time.sleep(0.002)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if not (out / "_info.json").exists():
            break
        shutil.rmtree(out)
    assert proc.returncode == -signal.SIGKILL and not (out / "_info.json").exists(), "never killed mid-way"
    left = os.listdir(out)
    assert 0 < sum(n.endswith("_stats.json") for n in left) < 24
    again = convert_official(str(images), str(maps), str(out), **args)
    assert again.skipped and again.written
    assert _tree(out) == reference


def test_cli_convert_info_and_show(release, tmp_path):
    from click.testing import CliRunner

    from relabel_shards.cli import cli

    images, maps, _ = release
    out = tmp_path / "ds"
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(images), str(maps), str(out), "--layout", "wh",
                              "--shard-size", "5", "--num-workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "rank 0/1: wrote 2 shards (8 images, 0 skipped)" in res.output
    assert "layout wh" in res.output and "swap_xy=False" in res.output
    assert read_info(str(out))["splits"]["train"]["relabel_shards"]["layout"] == "wh"
    png = tmp_path / "s.png"
    res = runner.invoke(cli, ["show", str(out), "--key", "n01443537_2", "-o", str(png), "--topk", "2"])
    assert res.exit_code == 0, res.output
    assert Image.open(png).size[0] > 0
    res = runner.invoke(cli, ["convert", str(images), str(maps), str(tmp_path / "o2"), "--layout", "xy"])
    assert res.exit_code == 2 and "Invalid value for '--layout'" in res.output
    res = runner.invoke(cli, ["convert", str(images), str(tmp_path / "nope"), str(tmp_path / "o3"),
                              "--num-workers", "0"])
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1].startswith("Error: relabel_root")
    assert "Traceback" not in res.output


def test_show_makes_the_orientation_visible(tmp_path):
    """The README's check: the top class's heat lies on the object in one layout and mirrored in the other."""
    from relabel_shards.labelmap import decode_label_map
    from relabel_shards.show import cell_probabilities, show_sample

    images, maps = tmp_path / "train", tmp_path / "relabel"
    (images / "n0").mkdir(parents=True)
    photo = np.zeros((90, 120, 3), np.uint8)
    photo[0:36, 80:120] = 255  # the object: top right
    Image.fromarray(photo).save(images / "n0" / "obj.JPEG", quality=95)
    cls = 7
    rng = np.random.default_rng(4)
    scores = rng.random((1000, 15, 15))
    scores[cls] = -1.0  # class 7 nowhere ...
    scores[cls, 0:6, 10:15] = 2.0  # ... but first in the file's rows 0-5, cols 10-14
    classes = np.argsort(-scores, axis=0)[:5]
    values = np.concatenate([np.full((1, 15, 15), 4.0), rng.uniform(0, 2, (4, 15, 15))])
    values[0, 0:6, 10:15] = 30.0
    t = torch.from_numpy(np.stack([values, classes]).astype(np.float32))
    _save(t, maps / "n0" / "obj.pt", legacy=True)
    assert load_official_map((maps / "n0" / "obj.pt").read_bytes()) is not None  # still a valid map

    def heat_center(layout: str) -> tuple[float, float]:
        out = tmp_path / layout
        convert_official(str(images), str(maps), str(out), layout=layout, num_workers=0)
        res = show_sample(str(out), "obj", tmp_path / f"{layout}.png", topk=2)
        assert res.classes[0][0] == cls  # the top class of the whole image
        lm = decode_label_map(_samples(out)[0]["rlm"])
        p = cell_probabilities(lm.values, lm.indices, 1000)[cls]  # (rows, cols) as show draws them
        r, q = np.mgrid[0:15, 0:15]
        return float((p * (r + 0.5)).sum() / p.sum() / 15), float((p * (q + 0.5)).sum() / p.sum() / 15)

    ys, xs = np.nonzero(np.asarray(Image.open(images / "n0" / "obj.JPEG").convert("L")) > 128)
    obj = (ys.mean() / 90, xs.mean() / 120)  # (y, x) normalized: about (0.2, 0.83)
    hw, wh = heat_center("hw"), heat_center("wh")
    assert abs(hw[0] - obj[0]) < 0.1 and abs(hw[1] - obj[1]) < 0.1  # on the object
    assert abs(wh[0] - obj[1]) < 0.1 and abs(wh[1] - obj[0]) < 0.1  # mirrored across the diagonal: off it


def test_training_loader_on_converted_shards_reproduces_the_official_targets(release, tmp_path):
    """The training path: the streaming loader's batches, pooled with swap_xy=True, against the official code
    on the original files for the loader's own crop boxes (flips do not change a 1x1 target)."""
    from relabel_shards.loader import make_loader
    from relabel_shards.pooling import label_pooling
    from relabel_shards.pooling.official import get_labelmaps, get_relabel

    images, maps, saved = release
    out = tmp_path / "ds"
    convert_official(str(images), str(maps), str(out), encoding="lossless", shard_size=4, num_workers=0)
    by_key = {Path(rel).stem: t for rel, t in saved.items()}
    seen = []
    for batch in make_loader(str(out), batch_size=4, num_workers=0, image_size=32, seed=3):
        b = len(batch["keys"])
        ours = label_pooling(batch["values"], batch["indices"], batch["boxes"], 1000, swap_xy=True)
        records = torch.stack([by_key[k] for k in batch["keys"]])
        coords = batch["boxes"][:, [1, 0, 3, 2]]  # the official (y1, x1, y2, x2)
        official = get_relabel(get_labelmaps(records, b, device="cpu"), coords, b)
        assert (ours - official).abs().max().item() <= 1e-5
        seen += batch["keys"]
    assert sorted(seen) == sorted(by_key)


@pytest.mark.network
def test_release_and_output_on_s3_equal_local(release, tmp_path, s3_bucket):
    import s3fs

    images, maps, _ = release
    fs = s3fs.S3FileSystem()
    fs.put(str(maps), f"{s3_bucket}/relabel", recursive=True)
    local = tmp_path / "ds"
    convert_official(str(images), str(maps), str(local), shard_size=3, num_workers=0)
    remote = f"{s3_bucket}/ds"
    s = convert_official(str(images), f"{s3_bucket}/relabel", remote, shard_size=3, num_workers=2)
    assert s.failures == [] and s.info["num_samples"] == 8
    for name in s.info["filenames"]:
        assert fs.cat_file(f"{remote}/{name}") == (local / name).read_bytes()
    rs = read_info(remote)["splits"]["train"]["relabel_shards"]
    assert rs["annotator"]["release_root"] == f"{s3_bucket}/relabel"


def test_release_root_one_level_too_high_fails_at_once_with_the_fix(release, tmp_path, caplog):
    images, maps, _ = release
    out = tmp_path / "ds"
    with pytest.raises(AllInputsFailedError, match=r"no image of .* has a label map .* 8 images, 8 maps.* "
                                                   r"RELABEL_ROOT looks one level too high: the maps sit "
                                                   rf"under {maps.parent}/{maps.name}/"):
        convert_official(str(images), str(maps.parent), str(out), num_workers=0)
    assert not out.exists()  # nothing written, nothing to clean up
    with pytest.raises(AllInputsFailedError, match=r"RELABEL_ROOT looks one level too low"):
        convert_official(str(images), str(maps / "n01440764"), str(out), num_workers=0)
    from click.testing import CliRunner

    from relabel_shards.cli import cli

    res = CliRunner().invoke(cli, ["convert", str(images), str(maps.parent), str(out), "--num-workers", "0",
                                   "--no-progress"])
    assert res.exit_code == 1 and res.output.startswith("Error: no image of")
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_every_image_failing_exits_nonzero_with_one_summary(tmp_path, caplog):
    images, maps, _ = _make_release(tmp_path, classes=("a", "b"), per_class=4)
    for p in images.rglob("*.JPEG"):
        p.write_bytes(b"not a jpeg")  # every image broken, every map present
    out = tmp_path / "ds"
    caplog.set_level("WARNING")
    with pytest.raises(AllInputsFailedError, match=r"every one of its 8 inputs failed .*8 x not a decodable "
                                                   r"image \(e\.g\. "):
        convert_official(str(images), str(maps), str(out), num_workers=0, shard_size=2)
    per_file = [r for r in caplog.records if r.getMessage().startswith("skipping ")]
    assert len(per_file) == 3  # a few examples, then counted: not one line per file

"""Classes per batch: the estimate from per-shard histograms, the warning, and the shard layout build writes.

Oracles: the expected distinct classes of a batch drawn without replacement is checked against a brute-force
enumeration of every batch; the simulated layouts use the loader's own order code (benchmarks/bench_order.py,
the ImageNet layout shrunk); the end-to-end check counts classes in batches that ``make_loader`` yields from
shards that ``build_shards`` wrote from a class-sorted folder.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from relabel_shards.diversity import (
    TOP_CLASSES,
    ShardClasses,
    assess,
    class_sorted_warning,
    expected_distinct,
    iid_distinct,
    observed_shard_classes,
    recorded_shard_classes,
    shard_classes,
    shard_classes_entry,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _brute(labels: list[int], batch: int) -> float:
    combos = list(itertools.combinations(range(len(labels)), batch))
    return sum(len({labels[i] for i in c}) for c in combos) / len(combos)


@pytest.mark.parametrize(
    "labels, batch",
    [
        ([0] * 5 + [1] * 3, 4),
        ([0, 1, 2, 3, 4, 5, 6, 7], 3),
        ([3] * 6 + [1, 2, 2], 5),
        ([9] * 4, 4),
    ],
)
def test_expected_distinct_equals_enumeration(labels, batch):
    sc = shard_classes(labels)
    assert sc.complete and sc.distinct == len(set(labels)) and sc.num_samples == len(labels)
    assert expected_distinct([sc], batch) == pytest.approx(_brute(labels, batch), rel=1e-9)
    # two shards in flight pool their samples (same classes add up)
    half = len(labels) // 2
    pooled = expected_distinct([shard_classes(labels[:half]), shard_classes(labels[half:])], batch, 2)
    assert pooled == pytest.approx(_brute(labels, batch), rel=1e-9)


def test_iid_distinct_is_the_with_replacement_expectation():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    got = iid_distinct([shard_classes(labels[:40]), shard_classes(labels[40:])], 8)
    want = sum(1 - (1 - n / 100) ** 8 for n in (50, 30, 20))
    assert got == pytest.approx(want, rel=1e-12)


def test_info_entry_keeps_the_top_classes_and_round_trips():
    hist = Counter({c: (40 - c) for c in range(30)})  # 30 classes, counts 40..11
    entry = shard_classes_entry(hist)
    assert entry["distinct"] == 30 and len(entry["top"]) == TOP_CLASSES
    assert entry["top"] == {str(c): 40 - c for c in range(TOP_CLASSES)}
    assert shard_classes_entry({5: 2, 3: 2, 7: 1}) == {"distinct": 3, "top": {"3": 2, "5": 2, "7": 1}}
    split = {
        "shard_lengths": [sum(hist.values()), 3],
        "relabel_shards": {"shard_classes": [entry, shard_classes_entry({5: 2, 3: 1})]},
    }
    got = recorded_shard_classes(split)
    assert got == [
        ShardClasses(sum(hist.values()), 30, {c: 40 - c for c in range(TOP_CLASSES)}),
        ShardClasses(3, 2, {5: 2, 3: 1}),
    ]
    assert got[0].rest == (30 - TOP_CLASSES, sum(range(11, 40 - TOP_CLASSES + 1)))
    assert recorded_shard_classes({"shard_lengths": [1], "relabel_shards": {}}) is None
    assert (
        recorded_shard_classes({"shard_lengths": [1, 2], "relabel_shards": {"shard_classes": [entry]}})
        is None
    )


def _split(shards: list[list[int]], classes: int) -> dict:
    return {
        "name": "train",
        "shard_lengths": [len(s) for s in shards],
        "relabel_shards": {
            "shard_classes": [shard_classes_entry(Counter(s)) for s in shards],
            "dataset_classes": [f"c{i}" for i in range(classes)],
        },
    }


def test_warning_for_class_sorted_shards_only():
    from bench_order import class_sorted_labels, write_layout

    labels = class_sorted_labels(40_000, 100)
    sorted_split = _split(write_layout(labels, 500, shuffle=False), 100)
    msg = class_sorted_warning(sorted_split, batch_size=128)
    assert msg is not None
    assert "split 'train' looks class-sorted: its shards hold 2.0 distinct classes on average" in msg
    d = assess(observed_shard_classes(write_layout(labels, 500, shuffle=False)), batch_size=128)
    assert 1.0 < d.expected < 2.0 and d.iid == pytest.approx(100 * (1 - 0.99**128))
    assert (
        f"so a batch of 128 (1 shard in flight per reader) holds about {d.expected:.1f} distinct classes, "
        f"against {d.iid:.1f} for an i.i.d. draw ({d.ratio:.0%}; from the per-shard class histograms in "
        "_info.json)"
    ) in msg
    assert (
        "rebuild with shuffling" in msg and "--shuffle-seed" in msg and "relabel-shards build LIST OUT" in msg
    )
    assert class_sorted_warning(_split(write_layout(labels, 500, shuffle=True), 100)) is None
    assert class_sorted_warning({"name": "train", "shard_lengths": [3]}) is None  # nothing known
    # datasets without histograms: the labels a reader saw in its first shards
    first = write_layout(labels, 500, shuffle=False)[:4]
    msg = class_sorted_warning({"name": "x"}, observed=first, shards_in_flight=2)
    assert msg is not None and "from the labels of the first 4 shards read" in msg
    assert "2 shards in flight per reader" in msg
    assert class_sorted_warning({"name": "x"}, observed=write_layout(labels, 500, shuffle=True)[:4]) is None


def test_simulated_imagenet_layout_small_scale():
    """The bench_order simulation, shrunk 20x: the loader's order on shuffled shards is near i.i.d."""
    from bench_order import diversity_rows, scaled

    rows = {r["layout"].split()[0]: r for r in diversity_rows(scaled(0.05), epochs=1)}
    assert rows["shuffled"]["ratio"] >= 0.97  # the goal of issue 10
    assert rows["class-sorted"]["ratio"] < 0.2  # what a sorted build gave
    assert rows["shuffled"]["estimate"] == pytest.approx(rows["shuffled"]["iid"], rel=0.05)
    assert assess(observed_shard_classes([[c] * 10 for c in range(8)]), batch_size=4).class_sorted


def _sorted_folder(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
                root / f"class{c}" / f"c{c}_{j:02d}.png"
            )
    return root


@pytest.mark.slow  # two builds with the annotator: about 10 s on a loaded 2-core CPU
def test_make_loader_batches_on_built_shards_sorted_vs_shuffled(tmp_path):
    """End to end: a class-sorted folder, built with and without shuffling, read by make_loader."""
    from relabel_shards.build import build_shards
    from relabel_shards.loader import make_loader
    from relabel_shards.shards import read_info

    classes, per_class, batch = 6, 8, 4
    src = _sorted_folder(tmp_path / "imgs", classes, per_class)
    iid = classes * (1 - (1 - 1 / classes) ** batch)  # 3.11
    got = {}
    for name, shuffle in (("sorted", False), ("shuffled", True)):
        out = tmp_path / name
        build_shards(
            str(src),
            str(out),
            model="test_efficientnet",
            input_size=64,
            shard_size=8,
            batch_size=48,
            num_workers=0,
            shuffle=shuffle,
        )
        loader = make_loader(
            str(out), batch_size=batch, num_workers=0, image_size=16, shuffle_buffer=1, seed=0,
            shards_in_flight=1,  # one shard at a time (the loader's default interleaves 4)
        )
        counts = [len(set(b["labels"].tolist())) for b in loader]
        assert len(counts) == 12
        got[name] = sum(counts) / len(counts)
        split = read_info(str(out))["splits"]["train"]
        assert split["relabel_shards"]["order"] == {"shuffled": shuffle, "seed": 0 if shuffle else None}
        warning = class_sorted_warning(split, batch_size=batch)
        assert (warning is not None) == (not shuffle), warning
    assert got["sorted"] == 1.0, got  # shards of one class each, read without a buffer: 1 class per batch
    assert got["shuffled"] >= 0.85 * iid, got
    assert math.isclose(iid, 3.11, abs_tol=0.01)


# ------------------------------------------------------------ info and verify say it (and read one shard)


def _labelled_dataset(out: Path, labels: list[int], shard_size: int, *, histograms: bool) -> dict:
    """Shards whose samples carry the given class labels (tiny PNGs, 1x1 maps), plus _info.json."""
    import io

    from relabel_shards.labelmap import encode_label_map
    from relabel_shards.shards import make_split_info, sample_members, shard_name, write_info, write_shard

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    png = buf.getvalue()
    record = encode_label_map(np.ones((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.int64), 20)
    samples = [
        sample_members(
            f"k{i:04d}",
            image=png,
            image_ext="png",
            label=c,
            meta={"source": f"k{i:04d}.png", "width": 8, "height": 8},
            labelmap=record,
        )
        for i, c in enumerate(labels)
    ]
    records = [
        write_shard(str(out), shard_name("train", j), samples[s : s + shard_size])
        for j, s in enumerate(range(0, len(samples), shard_size))
    ]
    project = {"k": 1, "height": 1, "width": 1, "num_classes": 20}
    if histograms:
        project["shard_classes"] = [
            shard_classes_entry(Counter(labels[s : s + shard_size]))
            for s in range(0, len(labels), shard_size)
        ]
    return write_info(str(out), make_split_info("train", records, project), name="labelled")


def _run(*args: str):
    from click.testing import CliRunner

    from relabel_shards.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_info_and_verify_warn_about_class_sorted_shards(tmp_path):
    sorted_labels = [c for c in range(12) for _ in range(40)]
    _labelled_dataset(tmp_path / "hist", sorted_labels, 40, histograms=True)
    res = _run("info", str(tmp_path / "hist"))
    assert res.exit_code == 0, res.output
    assert "  distinct classes per shard: min 1, median 1, max 1" in res.output
    assert (
        "  WARNING: split 'train' looks class-sorted: its shards hold 1.0 distinct classes on average"
        in res.output
    )
    # no histograms in _info.json: verify judges from the .cls it reads, and still says OK
    _labelled_dataset(tmp_path / "plain", sorted_labels, 40, histograms=False)
    res = _run("info", str(tmp_path / "plain"))
    assert res.exit_code == 0 and "class-sorted" not in res.output
    res = _run("verify", str(tmp_path / "plain"), "--no-progress")
    assert res.exit_code == 0, res.output
    assert "warning: split 'train' looks class-sorted" in res.output
    assert "from the labels of the first 12 shards read" in res.output and "\nOK: split 'train'" in res.output
    shuffled = [sorted_labels[i] for i in np.random.default_rng(0).permutation(len(sorted_labels))]
    _labelled_dataset(tmp_path / "shuf", shuffled, 40, histograms=True)
    for cmd in ("info", "verify"):
        res = _run(cmd, str(tmp_path / "shuf"), *(["--no-progress"] if cmd == "verify" else []))
        assert res.exit_code == 0 and "class-sorted" not in res.output, res.output


def test_info_and_verify_take_one_shard(tmp_path):
    import shutil

    _labelled_dataset(tmp_path / "ds", list(range(12)) * 3, 12, histograms=True)
    one = str(tmp_path / "ds" / "train-000001.tar")
    res = _run("info", one)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"dataset labelled  ({tmp_path / 'ds' / '_info.json'}), shard train-000001.tar only"
    assert lines[1].startswith("split train: 12 samples in 1 shard, ")
    assert "    train-000001.tar: 12 samples" in res.output and "train-000000" not in res.output
    (tmp_path / "ds" / "train-000002.tar").write_bytes(b"damaged")  # another shard's damage does not matter
    res = _run("verify", one, "--no-progress")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1].startswith(
        f"OK: split 'train' of {tmp_path / 'ds'}: 12 samples in 1 shard"
    )
    assert _run("verify", str(tmp_path / "ds" / "train-000002.tar"), "--no-progress").exit_code == 1
    # a shard no _info.json lists: info reads it, verify checks its layout and says what it cannot check
    (tmp_path / "lone").mkdir()
    shutil.copy(one, tmp_path / "lone" / "x.tar")
    res = _run("info", str(tmp_path / "lone" / "x.tar"))
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[:2] == [
        f"shard {tmp_path / 'lone' / 'x.tar'}: 12 samples, "
        f"{(tmp_path / 'lone' / 'x.tar').stat().st_size / 1024:.3g} KiB",
        "  members: .cls 12, .json 12, .png 12, .rlm 12",
    ]
    res = _run("verify", str(tmp_path / "lone" / "x.tar"), "--no-progress")
    assert res.exit_code == 0, res.output
    assert "warning: x.tar is not listed in an _info.json beside it" in res.output


def test_verify_of_a_split_without_samples_fails(tmp_path):
    from relabel_shards.shards import make_split_info, write_info, write_shard

    write_info(
        str(tmp_path),
        make_split_info(
            "train", [write_shard(str(tmp_path), "train-000000.tar", [])], {"k": 1, "num_failures": 3}
        ),
    )
    res = _run("verify", str(tmp_path), "--no-progress")
    assert res.exit_code == 1
    assert "the split holds no samples: nothing to train on" in res.output
    assert "Error: FAILED: split 'train'" in res.output

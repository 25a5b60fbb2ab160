"""`relabel-shards info` and `relabel-shards verify` on the command line."""

from __future__ import annotations

import json
import tarfile

import pytest
from click.testing import CliRunner
from shard_factory import make_dataset

from relabel_shards.cli import cli
from relabel_shards.describe import format_info, human_bytes


@pytest.fixture
def dataset(tmp_path):
    make_dataset(tmp_path, num_samples=9, shard_size=2)  # 5 shards: 2, 2, 2, 2, 1
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_info_summary(dataset):
    res = run("info", str(dataset), "--shards", "3")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    info = json.loads((dataset / "_info.json").read_text())
    total = sum(r["bytes"] for r in info["splits"]["train"]["relabel_shards"]["shards"])
    assert lines[0] == f"dataset tiny  ({dataset}/_info.json)"
    assert lines[1] == (f"split train: 9 samples in 5 shards, {human_bytes(total)} "
                        f"({human_bytes(total / 9)} per sample)")
    assert lines[2] == ("  label maps: k=3 top classes on a 4x6 grid (rows x columns), C=10 classes "
                        "(class0, class1, class2, …); format version 1")
    assert lines[3] == "  annotator: model test_model, input_size (3, 32, 48), interpolation bicubic"
    assert lines[4] == "  failures: 1 source image skipped (e.g. src/broken.jpg: cannot identify image file)"
    assert lines[5] == "  samples per shard: min 1, max 2"
    sha4 = info["splits"]["train"]["relabel_shards"]["shards"][4]["sha256"]
    assert lines[6].startswith("    train-000000.tar: 2 samples, ")
    assert lines[8] == "    … 2 more"
    assert lines[9].startswith("    train-000004.tar: 1 sample, ")
    assert lines[9].endswith(f"sha256 {sha4[:12]}…")
    assert len(lines) == 10


def test_info_json_split_and_errors(dataset, tmp_path):
    res = run("info", str(dataset), "--json")
    assert res.exit_code == 0 and json.loads(res.output) == json.loads((dataset / "_info.json").read_text())
    res = run("info", str(dataset), "--split", "val")
    assert res.exit_code == 1 and "has no split 'val'; it holds ['train']" in res.output
    res = run("info", str(tmp_path / "nowhere"))
    assert res.exit_code == 1 and "Error: no _info.json at" in res.output


def test_info_tolerates_plain_timm_info():
    text = format_info({"name": "in1k", "splits": {"train": {"name": "train", "num_samples": 5,
                                                            "filenames": ["a.tar"], "shard_lengths": [5]}}})
    assert text.splitlines() == ["dataset in1k", "split train: 5 samples in 1 shard",
                                 "  no relabel_shards section: not written by relabel-shards (no label maps "
                                 "described)", "  samples per shard: min 5, max 5", "    a.tar: 5 samples"]


def test_verify_cli_ok_and_failed(dataset):
    res = run("verify", str(dataset), "--no-progress")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [f"OK: split 'train' of {dataset}: 9 samples in 5 shards "
                                       f"({sum(p.stat().st_size for p in dataset.glob('*.tar')):,} bytes), "
                                       "label maps k=3 4x6 C=10"]
    (dataset / "train-000003.tar").unlink()
    path = dataset / "train-000001.tar"
    last = tarfile.open(path).getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    path.write_bytes(path.read_bytes()[:end])  # whole members, but no end-of-archive marker
    res = run("verify", str(dataset), "--no-progress")
    assert res.exit_code == 1
    assert ("train-000001.tar: unreadable tar after key 'img003' (ReadError: truncated: data ends at byte "
            f"{end} without the end-of-archive marker)") in res.output
    assert "train-000003.tar: missing (listed in _info.json" in res.output
    assert "Error: FAILED: split 'train' of " in res.output

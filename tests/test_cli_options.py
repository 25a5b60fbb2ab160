"""Command-line conveniences: show's output format and default sample, -v after the subcommand."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner
from PIL import Image
from shard_factory import make_dataset

from relabel_shards.cli import cli
from relabel_shards.show import show_sample


@pytest.fixture
def dataset(tmp_path):
    make_dataset(tmp_path / "ds", num_samples=3, shard_size=2)
    return tmp_path / "ds"


def test_show_writes_the_format_of_the_suffix(dataset, tmp_path):
    for name, fmt in (
        ("x.jpg", "JPEG"),
        ("x.JPEG", "JPEG"),
        ("x.webp", "WEBP"),
        ("x.png", "PNG"),
        ("x", "PNG"),
    ):
        show_sample(str(dataset), "img001", tmp_path / name, topk=1, panel_size=32)
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt, name
    with pytest.raises(ValueError, match=r"cannot write a '\.xyz' image; use \.png, \.jpg or \.webp"):
        show_sample(str(dataset), "img001", tmp_path / "x.xyz", topk=1)


def test_show_without_key_draws_the_first_sample(dataset, tmp_path):
    r = show_sample(str(dataset), None, tmp_path / "a.png", topk=1, panel_size=32)
    assert (r.key, r.shard) == ("img000", "train-000000.tar")
    r = show_sample(str(dataset), None, tmp_path / "b.png", topk=1, panel_size=32, shard="train-000001.tar")
    assert (r.key, r.shard) == ("img002", "train-000001.tar")
    res = CliRunner().invoke(
        cli, ["show", str(dataset / "train-000001.tar"), "-o", str(tmp_path / "c.jpg"), "--topk", "1"]
    )
    assert res.exit_code == 0, res.output
    assert (
        res.output.startswith(f"wrote {tmp_path / 'c.jpg'} (")
        and ": img002 from train-000001.tar" in res.output
    )
    assert Image.open(tmp_path / "c.jpg").format == "JPEG"


@pytest.mark.parametrize("args", [["verify", "-v"], ["-v", "verify"], ["verify", "--verbose"]])
def test_verbose_before_or_after_the_subcommand(dataset, args, caplog):
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.WARNING)
        argv = [a if a != "verify" else "verify" for a in args]
        argv.insert(argv.index("verify") + 1, str(dataset))
        res = CliRunner().invoke(cli, [*argv, "--no-progress"])
        assert res.exit_code == 0, res.output
        assert any(r.name == "relabel_shards.verify" and r.levelno == logging.INFO for r in caplog.records)
    finally:
        root.setLevel(level)

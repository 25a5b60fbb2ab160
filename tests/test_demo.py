"""`relabel-shards demo`: real photos, the embedded annotator, shards that verify, pictures that localize."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from relabel_shards.cli import cli
from relabel_shards.demo import COLLAGE, PHOTOS, _clear_previous_demo, demo_photos, write_source
from relabel_shards.shards import make_split_info, write_info

CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}
COFFEE_CLASSES = {"espresso", "cup", "coffee mug"}


def test_demo_photos_and_source(tmp_path):
    pytest.importorskip("skimage")
    photos = demo_photos()
    assert list(photos) == [COLLAGE, *PHOTOS]
    assert photos["chelsea"].size == (451, 300) and photos["coffee"].size == (600, 400)
    assert photos["motorcycle"].mode == "RGB"
    collage = photos[COLLAGE]
    assert collage.size == (451 + 450, 300)
    assert collage.info["split_x"] == 451 / 901
    # the left part is chelsea itself, pixel for pixel (same height: no resize)
    assert collage.crop((0, 0, 451, 300)).tobytes() == photos["chelsea"].tobytes()
    listing = write_source(photos, str(tmp_path / "photos"))
    lines = open(listing).read().splitlines()
    assert lines[0] == "collage.jpg\tcat|coffee" and lines[1] == "chelsea.jpg\tcat" and len(lines) == 6
    assert Image.open(tmp_path / "photos" / "rocket.jpg").format == "JPEG"


def test_demo_without_scikit_image_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # import of skimage.data now fails
    with pytest.raises(ImportError, match=r"relabel-shards demo .* needs the 'skimage.data' package: "
                                          r"pip install scikit-image"):
        demo_photos()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, caplog):
    pytest.importorskip("skimage")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["demo", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    # the README's first command prints no warning (its .cls describe the photos: no class check)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    text = res.output
    assert "OK: split 'train' of " in text and "6 samples in 1 shard " in text
    for key in [COLLAGE, *PHOTOS]:
        with Image.open(out / "show" / f"{key}.png") as im:
            assert im.format == "PNG" and im.width > 900
    info = json.loads((out / "shards" / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 6
    assert info["splits"]["train"]["relabel_shards"]["annotator"]["model"] == "tf_efficientnet_lite0"
    # The point of the demo: a crop of each half of the collage gets that photo's classes first.
    left = next(line for line in text.splitlines() if line.strip().startswith("left (cat)"))
    right = next(line for line in text.splitlines() if line.strip().startswith("right (coffee)"))
    assert any(left.split(": ", 1)[1].startswith(c) for c in CAT_CLASSES), left
    assert any(right.split(": ", 1)[1].startswith(c) for c in COFFEE_CLASSES), right
    chelsea = next(line for line in text.splitlines() if "chelsea.png" in line)
    assert chelsea.split(".png", 1)[1].strip().startswith("Egyptian cat"), chelsea


def test_demo_clears_only_its_own_earlier_shards(tmp_path):
    pytest.importorskip("skimage")
    old = tmp_path / "old" / "shards"
    write_info(str(old), make_split_info("train", [], {}), name="demo")
    (old / "train-000000_stats.json").write_text("{}")
    _clear_previous_demo(str(old))  # an earlier demo's output: removed, so a rerun rebuilds
    assert not old.exists()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "precious.tar").write_bytes(b"x")
    res = CliRunner().invoke(cli, ["demo", str(tmp_path)])
    assert res.exit_code == 1
    assert "shards exists and does not hold an earlier demo's shards" in res.output
    assert (tmp_path / "shards" / "precious.tar").read_bytes() == b"x"

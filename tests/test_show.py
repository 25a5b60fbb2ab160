"""show: the figure's size and titles, heatmaps where the class is, numbers against roi_align, the CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from shard_factory import make_dataset
from torchvision.ops import roi_align

from relabel_shards.cli import cli
from relabel_shards.show import (
    LEGEND_H,
    MARGIN,
    TITLE_H,
    SampleNotFoundError,
    cell_probabilities,
    class_names,
    image_probabilities,
    show_sample,
)

K, H, W, C = 2, 4, 6, 10


def left_right_map(i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class 3 fills the left half (logit 9), class 7 the right (logit 8), class 1 everywhere (logit 2)."""
    values = np.empty((K, H, W), np.float32)
    indices = np.empty((K, H, W), np.int64)
    values[0, :, : W // 2], indices[0, :, : W // 2] = 9.0, 3
    values[0, :, W // 2:], indices[0, :, W // 2:] = 8.0, 7
    values[1], indices[1] = 2.0, 1
    return values, indices


@pytest.fixture
def lr_dataset(tmp_path):
    names = [f"thing {c}" for c in range(C)]
    make_dataset(tmp_path / "ds", num_samples=3, shard_size=2, k=K, h=H, w=W, num_classes=C,
                 class_names=names, image_size=(60, 40), map_fn=left_right_map)
    return tmp_path / "ds"


def roi_align_oracle(values: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """DESIGN.md's LabelPooling for the whole-image box, straight from torchvision's roi_align."""
    k, h, w = values.shape
    dense = torch.zeros(num_classes, h, w, dtype=torch.float64)
    dense.scatter_add_(0, torch.from_numpy(indices), torch.from_numpy(values.astype(np.float64)))
    box = torch.tensor([[0, 0 * w - 0.5, 0 * h - 0.5, 1 * w - 0.5, 1 * h - 0.5]], dtype=torch.float64)
    pooled = roi_align(dense[None], box, output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=False)
    return torch.softmax(pooled.flatten(), 0).numpy()


def test_probabilities_against_oracles():
    rng = np.random.default_rng(1)
    for h, w in [(4, 6), (15, 15), (7, 14), (1, 1)]:
        values = rng.normal(2, 2, size=(5, h, w)).astype(np.float32)
        indices = np.argsort(rng.random((50, h, w)), axis=0)[:5]
        np.testing.assert_allclose(image_probabilities(values, indices, 50),
                                   roi_align_oracle(values, indices, 50), atol=1e-6)
        cells = cell_probabilities(values, indices, 50)
        r, q = h // 2, w // 2  # one cell by hand: softmax over C with zeros for absent classes
        logits = np.zeros(50)
        logits[indices[:, r, q]] = values[:, r, q]
        np.testing.assert_allclose(cells[:, r, q], np.exp(logits) / np.exp(logits).sum(), atol=1e-6)


def test_show_png_size_titles_and_where_the_heat_is(lr_dataset, tmp_path):
    out = tmp_path / "fig" / "img002.png"
    result = show_sample(str(lr_dataset), "img002", out, topk=3, panel_size=120)
    # 60x40 image at panel 120 -> 120x80 panels; 4 panels -> 3 columns, 2 rows
    expected = (MARGIN + 3 * (120 + MARGIN), MARGIN + 2 * (TITLE_H + 80 + MARGIN) + LEGEND_H)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == expected == result.size
        fig = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert [name for _, name, _ in result.classes] == ["thing 3", "thing 7", "thing 1"]
    assert result.shard == "train-000001.tar" and result.key == "img002"
    probs = roi_align_oracle(*left_right_map(0, None), C)
    np.testing.assert_allclose([p for *_, p in result.classes], np.sort(probs)[::-1][:3], atol=1e-6)

    def panel(i):  # the heatmap pixels of panel i
        x, y = MARGIN + (i % 3) * (120 + MARGIN), MARGIN + (i // 3) * (TITLE_H + 80 + MARGIN) + TITLE_H
        return fig[y:y + 80, x:x + 120].sum(axis=2)

    class3, class7 = panel(1), panel(2)
    assert class3[:, :40].mean() > 2 * class3[:, 80:].mean()  # class 3 lives on the left
    assert class7[:, 80:].mean() > 2 * class7[:, :40].mean()  # class 7 on the right
    assert np.ptp(fig[:MARGIN].sum(axis=2)) == 0  # the top margin is blank


def test_show_errors(lr_dataset, tmp_path):
    with pytest.raises(SampleNotFoundError, match=r"no sample with key 'nope' in .* \(2 shards searched\)"):
        show_sample(str(lr_dataset), "nope", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"topk must be in \[1, num_classes=10\], got 11"):
        show_sample(str(lr_dataset), "img000", tmp_path / "x.png", topk=11)
    with pytest.raises(ValueError, match=r"panel_size must be >= 16 pixels, got 8"):
        show_sample(str(lr_dataset), "img000", tmp_path / "x.png", panel_size=8)


def test_show_a_single_tar_and_jpeg_exif_upright(tmp_path):
    # a JPEG stored rotated with EXIF orientation 6 (rotate 90 CW to view): the figure uses the upright image
    arr = np.zeros((30, 50, 3), np.uint8)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(buf, format="JPEG", exif=exif)
    make_dataset(tmp_path, num_samples=2, shard_size=2, images={1: (buf.getvalue(), "jpg")})
    result = show_sample(str(tmp_path / "train-000000.tar"), "img001", tmp_path / "o.png", topk=1,
                         panel_size=100)
    # upright is 30 wide, 50 high -> 60x100 panels, 2 panels in one row
    assert result.size == (MARGIN + 2 * (60 + MARGIN), MARGIN + TITLE_H + 100 + MARGIN + LEGEND_H)
    assert result.classes[0][1] == f"class{result.classes[0][0]}"  # names from _info.json


def test_class_names_sources():
    imagenet = class_names(1000, {"class_names": ["x"] * 1000})
    assert imagenet[285] == "Egyptian cat" and imagenet[281] == "tabby"
    assert class_names(3, {"class_names": ["a", "b", "c"]}) == ["a", "b", "c"]
    assert class_names(3, {"class_names": ["a"]}) == ["0", "1", "2"]
    assert class_names(2) == ["0", "1"]


def test_cli_show(lr_dataset, tmp_path):
    out = tmp_path / "cli.png"
    res = CliRunner().invoke(cli, ["show", str(lr_dataset), "--key", "img001", "-o", str(out), "--topk", "2"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith(f"wrote {out} (")
    assert "thing 3 (#3)" in res.output and "thing 7 (#7)" in res.output
    assert Image.open(out).size[0] == MARGIN + 3 * (320 + MARGIN)
    res = CliRunner().invoke(cli, ["show", str(lr_dataset), "--key", "zzz", "-o", str(out)])
    assert res.exit_code == 1 and "Error: no sample with key 'zzz'" in res.output


def test_show_real_annotator_names_the_cat(tmp_path, real_photos):
    from relabel_shards.build import build_shards

    src = tmp_path / "src" / "cats"
    src.mkdir(parents=True)
    Image.fromarray(real_photos["chelsea"]).save(src / "chelsea.jpg", quality=90)
    build_shards(str(tmp_path / "src"), str(tmp_path / "out"), device="cpu", num_workers=0, batch_size=1)
    result = show_sample(str(tmp_path / "out"), "chelsea", tmp_path / "chelsea.png", topk=5)
    names = [name for _, name, _ in result.classes]
    assert "Egyptian cat" in names, names
    probs = [p for *_, p in result.classes]
    assert probs == sorted(probs, reverse=True)
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 1


def test_wide_images_get_two_columns(tmp_path):
    make_dataset(tmp_path, num_samples=1, image_size=(90, 30))
    result = show_sample(str(tmp_path), "img000", tmp_path / "w.png", topk=3, panel_size=100)
    # 3:1 -> two a row, longer side 150 -> 150x50 panels; 4 panels -> 2 rows
    assert result.size == (MARGIN + 2 * (150 + MARGIN), MARGIN + 2 * (TITLE_H + 50 + MARGIN) + LEGEND_H)


@pytest.mark.network
def test_show_over_http(http_dir, tmp_path):
    local, url = http_dir
    make_dataset(local, num_samples=3, shard_size=2, k=K, h=H, w=W, num_classes=C, map_fn=left_right_map)
    result = show_sample(url, "img002", tmp_path / "h.png", topk=2, panel_size=64)
    assert result.shard == "train-000001.tar"
    assert [name for _, name, _ in result.classes] == ["class3", "class7"]

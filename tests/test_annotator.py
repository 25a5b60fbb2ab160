"""The annotator: dense logits against the model's own head, top-k, weights, preprocessing, real photos."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from relabel_shards.annotator import EMBEDDED_SHA256, IMAGENET_MEAN, IMAGENET_STD, create_annotator

EGYPTIAN_CAT, ESPRESSO = 285, 967


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def embedded():
    return create_annotator(device="cpu")


# ------------------------------------------------------------------------------- dense heads (tiny models)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("test_efficientnet", None),
        ("test_resnet", None),
        ("test_vit", {"global_pool": "avg", "fc_norm": False}),
    ],
)
def test_plain_head_spatial_mean_equals_model_logits(name, kwargs):
    torch.manual_seed(0)
    ann = create_annotator(name, model_kwargs=kwargs, device="cpu", topk=5)
    x = torch.randn(2, 3, 160, 160)
    dense = ann.dense_logits(x)
    with torch.inference_mode():
        ref = ann.model(x)
    assert dense.dtype == torch.float32 and dense.shape[:2] == (2, 1000)
    assert _rel_err(dense.mean((2, 3)), ref) < 1e-4
    assert ann.plain_head and ann.config()["spatial_mean_is_logits"]

    values, indices = ann(x)
    assert values.dtype == torch.float32 and indices.dtype == torch.int16
    assert values.device.type == "cpu" and values.shape == (2, 5, *dense.shape[2:])
    top_v, top_i = dense.topk(5, dim=1)
    assert torch.equal(values, top_v)  # float32 end to end: the record's encoding decides any rounding
    assert torch.equal(indices.long(), top_i)
    assert (values[:, :-1] >= values[:, 1:]).all()


def test_vit_token_grid_is_row_major_patches():
    torch.manual_seed(0)
    ann = create_annotator("test_vit", device="cpu")  # class-token pooling: the mean is not the logits
    assert not ann.plain_head
    x = torch.randn(1, 3, 160, 160)
    dense = ann.dense_logits(x)
    assert dense.shape == (1, 1000, 10, 10)
    with torch.inference_mode():
        tokens = ann.model.forward_features(x)  # (1, 1 + 100, 64), LayerNorm already applied
        for r, q in [(0, 0), (0, 9), (9, 0), (4, 7)]:
            ref = ann.model.head(tokens[:, 1 + r * 10 + q])
            assert _rel_err(dense[:, :, r, q], ref) < 1e-5


def test_vit_other_input_sizes_and_keep_aspect(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("test_vit", global_pool="avg", fc_norm=False)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)  # made at 160 px: position embeddings for a 10x10 grid
    ann = create_annotator(
        "test_vit",
        checkpoint=path,
        input_size=(96, 128),
        device="cpu",
        model_kwargs={"global_pool": "avg", "fc_norm": False},
    )
    x = torch.randn(1, 3, 96, 128)
    dense = ann.dense_logits(x)
    assert dense.shape == (1, 1000, 6, 8)  # patch 16: the grid follows the input
    with torch.inference_mode():
        assert _rel_err(dense.mean((2, 3)), ann.model(x)) < 1e-4
    wide = create_annotator("test_vit", keep_aspect=True, device="cpu")
    img = wide.preprocess(np.zeros((100, 300, 3), np.uint8))
    assert img.shape == (3, 160, 480) and wide(img[None])[0].shape == (1, 5, 10, 30)


def test_convnext_norm_applied_at_each_position():
    torch.manual_seed(0)
    ann = create_annotator("test_convnext", device="cpu")
    assert not ann.plain_head and not ann.config()["spatial_mean_is_logits"]
    x = torch.randn(1, 3, 160, 160)
    dense = ann.dense_logits(x)
    head = ann.model.head
    with torch.inference_mode():
        f = ann.model.forward_features(x)  # (1, 64, 5, 5)
        cell = F.layer_norm(f[:, :, 2, 3], (f.shape[1],), head.norm.weight, head.norm.bias, head.norm.eps)
        ref = head.fc(cell)
        logits = ann.model(x)
    assert _rel_err(dense[:, :, 2, 3], ref) < 1e-5
    assert _rel_err(dense.mean((2, 3)), logits) > 1e-3  # documented: the norm after pooling breaks the mean


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("test_resnet", {"global_pool": "max"}, r"test_resnet.*SelectAdaptivePool2d\(pool_type='max'\)"),
        ("test_vit", {"global_pool": "map"}, r"test_vit.*AttentionPoolLatent"),
        ("mobilenetv3_small_050", None, r"mobilenetv3_small_050.*forward_head does not take"),
    ],
)
def test_unconvertible_head_names_its_type(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_annotator(name, model_kwargs=kwargs, device="cpu")


def test_int32_indices_above_int16_range():
    ann = create_annotator("test_resnet", model_kwargs={"num_classes": 40000}, device="cpu", topk=3)
    values, indices = ann(torch.randn(1, 3, 64, 64))
    assert indices.dtype == torch.int32 and values.shape == (1, 3, 2, 2)
    assert ann.class_names is None


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown timm model name 'no_such_net'"):
        create_annotator("no_such_net")
    with pytest.raises(ValueError, match=r"topk must be in \[1, num_classes=1000\], got 1001"):
        create_annotator("test_resnet", topk=1001, device="cpu")
    with pytest.raises(ValueError, match="topk must be an int >= 1, got 0"):
        create_annotator("test_resnet", topk=0)
    with pytest.raises(ValueError, match=r"input_size must be .*got 8"):
        create_annotator("test_resnet", input_size=8)
    with pytest.raises(ValueError, match="need a model name"):
        create_annotator(checkpoint="x.pth")
    ann = create_annotator("test_resnet", device="cpu")
    with pytest.raises(ValueError, match=r"images must have shape \[B>=1, 3, H, W\], got \[3, 64, 64\]"):
        ann(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match=r"uint8 \(preprocess\) or float \(normalized\), got torch.int64"):
        ann(torch.zeros(1, 3, 64, 64, dtype=torch.int64))


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_loads_and_records_its_sha256(tmp_path):
    import timm

    src = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    ann = create_annotator("test_resnet", checkpoint=path, device="cpu", topk=3)
    assert ann.num_classes == 10 and ann.weights_source == "checkpoint"
    assert ann.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(ann.model(x), src.eval()(x))


def test_checkpoint_that_does_not_fit(tmp_path):
    import timm

    path = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    with pytest.raises(
        ValueError, match=r"checkpoint .*other.pth does not fit model 'test_resnet': \d+ missing keys"
    ):
        create_annotator("test_resnet", checkpoint=path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read a state dict"):
        create_annotator("test_resnet", checkpoint=bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_annotator("test_resnet", checkpoint=tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------------ preprocessing


def test_preprocess_squash_and_keep_aspect():
    from PIL import Image

    img = np.full((300, 600, 3), 128, np.uint8)
    ann = create_annotator("test_resnet", input_size=224, device="cpu")
    x = ann.preprocess(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8  # normalized on the device, not in workers
    assert int(x[0, 100, 100]) == 128
    mean, std = ann.data_config["mean"], ann.data_config["std"]
    expect = torch.tensor([(128 / 255 - m) / s for m, s in zip(mean, std, strict=True)])
    torch.testing.assert_close(ann.normalize(x[None])[0, :, 100, 100], expect)
    ann2 = create_annotator("test_resnet", input_size=224, device="cpu", keep_aspect=True)
    assert ann2.preprocess(Image.fromarray(img)).shape == (3, 224, 448)
    assert ann2.preprocess(Image.fromarray(img.transpose(1, 0, 2).copy())).shape == (3, 448, 224)
    with pytest.raises(TypeError, match="PIL image or a uint8 numpy array, got str"):
        ann.preprocess("x.jpg")


def _old_float_preprocess(ann, img: np.ndarray) -> torch.Tensor:
    """The annotator's preprocess before uint8: resize, then (x / 255 - mean) / std on the CPU in float32."""
    from PIL import Image
    from timm.data.transforms import str_to_pil_interp

    h, w = ann.input_size
    im = Image.fromarray(img).resize((w, h), resample=str_to_pil_interp(ann.data_config["interpolation"]))
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(ann.data_config["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(ann.data_config["std"], dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def test_uint8_preprocess_gives_the_logits_of_the_old_float_path(real_photos):
    """Workers send uint8 (a quarter of the shared memory) and the device normalizes: same logits."""
    ann = create_annotator("test_efficientnet", input_size=96, device="cpu")
    imgs = [np.asarray(real_photos[p]) for p in ("chelsea", "coffee")]
    u8 = torch.stack([ann.preprocess(i) for i in imgs])
    old = torch.stack([_old_float_preprocess(ann, i) for i in imgs])
    assert u8.dtype == torch.uint8 and u8.element_size() * 4 == old.element_size()
    torch.testing.assert_close(ann.normalize(u8), old, rtol=0, atol=1e-6)
    torch.testing.assert_close(ann.dense_logits(u8), ann.dense_logits(old), rtol=1e-5, atol=1e-5)
    v8, i8 = ann(u8)
    vf, if_ = ann(old)
    assert torch.equal(i8, if_) and torch.allclose(v8, vf, rtol=1e-5, atol=1e-5)


def test_preprocess_turns_exif_rotated_jpegs_upright():
    import io

    from PIL import Image

    upright = np.zeros((80, 40, 3), np.uint8)
    upright[:20] = 255  # white top quarter
    stored = np.rot90(upright, k=1).copy()  # stored rotated; EXIF orientation 6 says: turn 90 deg clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    ann = create_annotator("test_resnet", input_size=64, device="cpu", keep_aspect=True)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        im.load()
        x = ann.preprocess(im.convert("RGB"))  # what a decoder that only converts hands over
    ref = ann.preprocess(upright)
    assert x.shape == ref.shape == (3, 128, 64)
    assert float((x.float() - ref.float()).abs().mean()) < 0.05 * 255 * 0.229


def test_config_is_json_and_complete():
    ann = create_annotator("test_resnet", input_size=(128, 96), topk=4, device="cpu", keep_aspect=True)
    cfg = json.loads(json.dumps(ann.config()))
    assert cfg["model"] == "test_resnet" and cfg["weights_sha256"] is None and cfg["weights"] == "random"
    assert cfg["input_size"] == [128, 96] and cfg["topk"] == 4 and cfg["keep_aspect"] is True
    assert cfg["interpolation"] == "bilinear" and cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5] * 3
    assert cfg["values_dtype"] == "float32"


# ---------------------------------------------------------------------------------- the real annotator


def test_embedded_weights_and_config(embedded):
    assert embedded.model_name == "tf_efficientnet_lite0" and embedded.weights_source == "embedded"
    assert embedded.weights_sha256 == EMBEDDED_SHA256
    assert (
        tuple(embedded.data_config["mean"]) == IMAGENET_MEAN
        and tuple(embedded.data_config["std"]) == IMAGENET_STD
    )
    assert embedded.input_size == (224, 224) and embedded.data_config["interpolation"] == "bicubic"
    assert (
        embedded.class_names[EGYPTIAN_CAT] == "Egyptian cat" and embedded.class_names[ESPRESSO] == "espresso"
    )
    assert embedded.plain_head


@pytest.mark.parametrize("photo, cls", [("chelsea", EGYPTIAN_CAT), ("coffee", ESPRESSO)])
def test_embedded_classifies_real_photos(embedded, real_photos, photo, cls):
    x = embedded.preprocess(real_photos[photo])[None]  # uint8
    dense = embedded.dense_logits(x)  # (1, 1000, 7, 7), normalized inside
    with torch.inference_mode():
        logits = embedded.model(embedded.normalize(x))
    assert int(logits.argmax()) == cls
    assert int(dense.mean((2, 3)).argmax()) == cls
    assert _rel_err(dense.mean((2, 3)), logits) < 1e-4


def _pool_half(values, indices, box, num_classes):
    """Dense oracle of LabelPooling (DESIGN.md): scatter the top-k, roi_align to 1x1, softmax."""
    from torchvision.ops import roi_align

    k, h, w = values.shape
    dense = torch.zeros(num_classes, h, w).scatter_(0, indices.long(), values.float())
    x1, y1, x2, y2 = box
    rois = torch.tensor([[0, x1 * w - 0.5, y1 * h - 0.5, x2 * w - 0.5, y2 * h - 0.5]])
    return roi_align(dense[None], rois, 1, 1.0, -1, False).flatten().softmax(0)


def test_collage_keep_aspect_localizes_each_half(real_photos):
    from PIL import Image

    left = np.asarray(Image.fromarray(real_photos["chelsea"]).resize((300, 300), Image.BICUBIC))
    right = np.asarray(Image.fromarray(real_photos["coffee"]).resize((300, 300), Image.BICUBIC))
    collage = np.concatenate([left, right], axis=1)  # (300, 600, 3): chelsea | coffee
    ann = create_annotator(device="cpu", keep_aspect=True)
    x = ann.preprocess(collage)
    assert x.shape == (3, 224, 448)
    values, indices = ann(x[None])
    assert values.shape == (1, 5, 7, 14)
    p_left = _pool_half(values[0], indices[0], (0.0, 0.0, 0.5, 1.0), ann.num_classes)
    p_right = _pool_half(values[0], indices[0], (0.5, 0.0, 1.0, 1.0), ann.num_classes)
    assert int(p_left.argmax()) == EGYPTIAN_CAT
    assert int(p_right.argmax()) == ESPRESSO


@pytest.mark.cuda
def test_embedded_on_cuda_matches_cpu(embedded, real_photos):
    gpu = create_annotator(device="cuda")
    assert gpu.config()["trunk_dtype"] == "bfloat16"
    x = torch.stack([embedded.preprocess(real_photos[p]) for p in ("chelsea", "coffee")])
    d_cpu, d_gpu = embedded.dense_logits(x), gpu.dense_logits(x).cpu()
    assert d_gpu.dtype == torch.float32
    assert _rel_err(d_gpu, d_cpu) < 0.1  # bfloat16 trunk
    assert d_gpu.mean((2, 3)).argmax(1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    values, indices = gpu(x)
    assert values.device.type == "cpu" and indices.dtype == torch.int16

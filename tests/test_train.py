"""tools/train.py on the CPU: a tiny timm model learns synthetic shards; CutMix, checkpoints, resume, ReaL."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from relabel_shards.shards import make_split_info, sample_members, shard_name, write_info, write_shard

C = 5
_TRAIN_PY = Path(__file__).parents[1] / "tools" / "train.py"
_spec = importlib.util.spec_from_file_location("relabel_train", _TRAIN_PY)
train_mod = importlib.util.module_from_spec(_spec)
sys.modules["relabel_train"] = train_mod
_spec.loader.exec_module(train_mod)

COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230], [230, 220, 40], [200, 40, 210]])


def _dataset(out: Path, n: int, per_shard: int, *, prefix: str, key: str = "img{:05d}",
             seed: int = 0, shift: int = 0, num_classes: int = C) -> None:
    """Class c: an image in colour c with noise; its label map says c + shift (logit 6) then c + shift + 1
    (logit 2). ``shift=1``: label maps that contradict the ``.cls`` labels (they must move top-1 away)."""
    from relabel_shards.labelmap import encode_label_map

    rng = np.random.default_rng(seed)
    shards, batch = [], []
    for i in range(n):
        c = i % C
        arr = np.clip(COLOURS[c] + rng.normal(0, 25, size=(40, 48, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        values = np.stack([np.full((2, 2), 6.0), np.full((2, 2), 2.0)]).astype(np.float32)
        top = (c + shift) % C
        indices = np.stack([np.full((2, 2), top), np.full((2, 2), (top + 1) % C)]).astype(np.int64)
        batch.append(sample_members(key.format(i + 1), image=buf.getvalue(), image_ext="jpg", label=c,
                                    meta={"width": 48, "height": 40},
                                    labelmap=encode_label_map(values, indices, num_classes)))
        if len(batch) == per_shard:
            shards.append(write_shard(str(out), shard_name(prefix, len(shards)), batch))
            batch = []
    write_info(str(out), make_split_info(prefix, shards, {"k": 2, "height": 2, "width": 2,
                                                          "num_classes": num_classes}))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU two threads ran these tiny models 8x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    _dataset(root / "train", 64, 16, prefix="train")
    _dataset(root / "val", 20, 10, prefix="val", key="ILSVRC2012_val_{:08d}", seed=1)
    return root


def _cfg(data, out, **kw):
    base = dict(train=str(data / "train"), val=str(data / "val"), model="test_efficientnet", out=str(out),
                epochs=1, batch_size=16, lr=0.4, warmup_epochs=0.0, image_size=32, workers=0, amp=False)
    base.update(kw)
    return train_mod.TrainConfig(**base)


def test_loss_falls_and_validation_reports_top1_and_real(data, tmp_path, caplog):
    caplog.set_level("INFO", logger="train")
    hist = train_mod.train(_cfg(data, tmp_path, epochs=5, log_every=3))
    progress = [r.getMessage() for r in caplog.records if " loss " in r.getMessage()]
    assert len(progress) == 20 // 3 and progress[0].startswith("epoch 0 step 3/20 loss ")  # every 3 steps
    loss = hist["loss"]
    assert len(loss) == 5 * 4  # 64 samples / batch 16, 5 epochs (read from the device every 3 steps)
    assert np.mean(loss[-4:]) < 0.5 * np.mean(loss[:4]), loss
    val = hist["val"][-1]
    assert val["n"] == 20 and val["top1"] >= 50  # the label maps taught the colours' classes (chance: 20)
    # keys are ImageNet val names 1..20: ReaL scores those with a non-empty label list
    real = train_mod.real_labels()
    assert val["real_n"] == sum(1 for i in range(20) if real[i])


def test_targets_move_the_model_the_right_way(tmp_path):
    # The same images with label maps that name the next class: the model follows the maps, not the .cls
    # labels, so top-1 against .cls collapses. (With the maps ignored or misread, both runs would agree.)
    _dataset(tmp_path / "train", 64, 16, prefix="train", shift=1)
    _dataset(tmp_path / "val", 20, 10, prefix="val", seed=1)
    hist = train_mod.train(_cfg(tmp_path, tmp_path / "run", epochs=5))
    assert hist["val"][-1]["top1"] <= 20


def test_training_on_image_shards_with_a_label_set_equals_full_shards(data, tmp_path):
    """--labels: the same samples, crops and targets as the full shards they were split from, so the same
    losses (a published label set trains like shards that hold the maps)."""
    from test_loader_factory import split_into_columns

    split_into_columns(data / "train", tmp_path / "images", tmp_path / "labels")
    full = train_mod.train(_cfg(data, tmp_path / "a", epochs=2, val=None))
    joined = train_mod.train(_cfg(data, tmp_path / "b", epochs=2, val=None, train=str(tmp_path / "images"),
                                  labels=str(tmp_path / "labels")))
    np.testing.assert_allclose(joined["loss"], full["loss"], rtol=1e-5, atol=1e-6)
    assert len(full["loss"]) == 8


def test_resume_continues_where_the_checkpoint_left(data, tmp_path):
    """With CutMix on every step: its draws after a resume are those of the uninterrupted run."""
    full = train_mod.train(_cfg(data, tmp_path / "a", epochs=2, ckpt_every=3, val=None, cutmix=1.0))
    part = train_mod.train(_cfg(data, tmp_path / "b", epochs=2, max_steps=3, val=None, cutmix=1.0))
    assert len(part["loss"]) == 3
    ck = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert ck["step"] == 3 and ck["loaders"][0]["readers"]["0"]["good"] == 48
    again = train_mod.train(_cfg(data, tmp_path / "b", epochs=2, max_steps=3, val=None, cutmix=1.0))
    assert len(again["loss"]) == 3  # a rerun of a finished --max-steps run trains no extra step
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    rest = train_mod.train(_cfg(data, tmp_path / "b", epochs=2, val=None, cutmix=1.0))
    assert len(rest["loss"]) == len(full["loss"]) == 8
    # same seed, same data order: the resumed run reproduces the uninterrupted one
    np.testing.assert_allclose(rest["loss"], full["loss"], rtol=1e-4, atol=1e-5)


def test_soft_target_cross_entropy_and_cutmix():
    logits = torch.randn(4, C)
    target = torch.softmax(torch.randn(4, C), 1)
    want = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(train_mod.soft_target_cross_entropy(logits, target), want)
    onehot = torch.nn.functional.one_hot(torch.arange(4), C).float()
    assert torch.allclose(train_mod.soft_target_cross_entropy(logits, onehot),
                          torch.nn.functional.cross_entropy(logits, torch.arange(4)))
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 20, 30).clone()
    gen = np.random.default_rng(3)
    mixed, t, lam = train_mod.cutmix(images.clone(), onehot, 1.0, gen)
    assert 0 < lam < 1
    for b in range(4):
        # image b's pixels come from images v in exactly the proportions its target gives class v
        share = torch.tensor([(mixed[b, 0] == v).float().mean().item() for v in range(C)])
        torch.testing.assert_close(share, t[b], atol=1e-6, rtol=0)

def test_resume_refuses_other_settings(data, tmp_path):
    train_mod.train(_cfg(data, tmp_path, epochs=2, max_steps=1, val=None))
    with pytest.raises(ValueError, match=r"cannot resume from .*last.pt: it was written by a run with other "
                                         r"settings \(lr=0.4 there, 0.2 here\); pass --no-resume"):
        train_mod.train(_cfg(data, tmp_path, epochs=2, max_steps=2, val=None, lr=0.2))
    hist = train_mod.train(_cfg(data, tmp_path, epochs=2, max_steps=2, val=None, lr=0.2, resume=False))
    assert len(hist["loss"]) == 2  # started over


def test_help_describes_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train_mod.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = text.split("options:")[1]
    flags = ["--" + f.replace("_", "-") for f in train_mod.TrainConfig.__dataclass_fields__]
    def where(flag: str) -> int:
        return re.search(rf" {flag}[ ,]", options).start()

    starts = sorted(where(flag) for flag in flags)  # each option's entry, in order
    for flag, field_name in zip(flags, train_mod.TrainConfig.__dataclass_fields__, strict=True):
        at = where(flag)
        end = next((x for x in starts if x > at), len(options))
        entry = options[at:end]  # the option's own entry: its flag, its help text, then its default
        assert train_mod.HELP[field_name] in entry and "(default: " in entry, (flag, entry)
    assert "--token-beta TOKEN_BETA weight of the mean token loss (LV-ViT: 0.5) (default: 0.5)" in text


def test_validation_with_other_classes_is_refused_unless_mapped(data, tmp_path):
    _dataset(tmp_path / "val7", 20, 10, prefix="val", seed=1, num_classes=7)
    with pytest.raises(ValueError, match=r"validation set .*val7 has 7 classes, the model 5 than the "
                                         r"training set .*pass --val-class-map FILE"):
        train_mod.train(_cfg(data, tmp_path / "a", val=str(tmp_path / "val7")))
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps([0, 1, 2, 3, 4, 0, 0]))
    hist = train_mod.train(_cfg(data, tmp_path / "b", epochs=5, val=str(tmp_path / "val7"),
                                val_class_map=str(mapping)))
    assert hist["val"][-1]["n"] == 20 and hist["val"][-1]["top1"] >= 50


def test_photometric_jitter_keeps_geometry():
    gen = np.random.default_rng(0)
    x = torch.rand(4, 3, 8, 8)
    x[:, :, :, 4:] = 0.0  # a dark right half
    y = train_mod.photometric(x.clone(), 0.4, 0.1, gen)
    assert not torch.equal(x, y) and y.min() >= -0.5 and y.max() <= 1.5
    # photometric: the bright left half stays brighter than the dark right half in every image
    assert (y[:, :, :, :4].mean((1, 2, 3)) > y[:, :, :, 4:].mean((1, 2, 3))).all()
    assert torch.equal(train_mod.photometric(x.clone(), 0.0, 0.0, gen), x)


def test_command_line_runs(data, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="train")
    train_mod.main(["--train", str(data / "train"), "--val", str(data / "val"),
                    "--model", "test_efficientnet",
                    "--out", str(tmp_path), "--epochs", "1", "--batch-size", "32", "--image-size", "32",
                    "--workers", "0", "--no-amp", "--cutmix", "1.0", "--swap-xy", "--color-jitter", "0.4",
                    "--lighting", "0.1"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 20 and "top1" in res
    ckpt = str(tmp_path / "last.pt")
    lines = [r.getMessage() for r in caplog.records if r.name == "train"]
    assert lines[0].startswith("start: test_efficientnet") and lines[0].endswith(f"checkpoint {ckpt}")
    assert lines[-1] == f"done: 1 epochs, step 2; checkpoint {ckpt}"


@pytest.mark.slow
def test_ddp_under_torchrun_two_cpu_ranks(data, tmp_path):
    import os
    import signal
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # one validation shard for two ranks (issue 12: more ranks than validation shards)
    _dataset(tmp_path / "val1", 20, 20, prefix="val", key="ILSVRC2012_val_{:08d}", seed=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(_TRAIN_PY), "--train", str(data / "train"), "--val", str(tmp_path / "val1"), "--model",
           "test_efficientnet", "--out", str(tmp_path), "--epochs", "1", "--batch-size", "8", "--image-size",
           "32", "--workers", "1", "--no-amp"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a hang is killed whole
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert len(lines) == 1 and lines[0]["n"] == 20  # rank 0 reports; every val sample counted once
    # 64 samples over 2 ranks, batch 8: 4 steps on each rank
    ck = torch.load(tmp_path / "last.pt", weights_only=True)  # one checkpoint, from rank 0
    assert ck["step"] == 4
    for rank in (0, 1):
        # the loader's state_dict() gathers the ranks: each rank's entry holds the whole job's state
        assert ck["loaders"][rank]["ranks"] == [0, 1] and ck["loaders"][rank]["world_size"] == 2
    assert not list(tmp_path.glob("last-rank*.pt"))


# ------------------------------------------------------------------------------------ token labeling


def _quadrant_dataset(out: Path, n: int, per_shard: int, *, prefix: str, seed: int) -> dict[str, list[int]]:
    """Images of four coloured quadrants (a random choice of 4 of the C colours each), 48 x 40 px, and label
    maps 4 x 6 (not square, not the image's aspect) that name each quadrant's class: class maps that vary in
    space, so a token's target is right only with the right box, flip and axis order.

    Returns:
        key -> the quadrants' classes [top-left, top-right, bottom-left, bottom-right].
    """
    from relabel_shards.labelmap import encode_label_map

    rng = np.random.default_rng(seed)
    shards, batch, truth = [], [], {}
    for i in range(n):
        first = int(rng.integers(C))
        quad = [(first + j) % C for j in range(4)]  # neighbours in a fixed order: a misplaced target is a
        # systematic error (the colour of one quadrant taught the class of another), not noise
        grid = np.array(quad).reshape(2, 2)
        arr = COLOURS[np.repeat(np.repeat(grid, 20, 0), 24, 1)]  # (40, 48, 3)
        arr = np.clip(arr + rng.normal(0, 15, size=arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        top = np.repeat(np.repeat(grid, 2, 0), 3, 1)  # (4, 6) the quadrant's class at each cell
        values = np.stack([np.full((4, 6), 6.0), np.full((4, 6), 1.0)]).astype(np.float32)
        indices = np.stack([top, (top + 1) % C]).astype(np.int64)
        key = f"q{i:05d}"
        truth[key] = quad
        batch.append(sample_members(key, image=buf.getvalue(), image_ext="png", label=quad[0],
                                    meta={"width": 48, "height": 40},
                                    labelmap=encode_label_map(values, indices, C)))
        if len(batch) == per_shard:
            shards.append(write_shard(str(out), shard_name(prefix, len(shards)), batch))
            batch = []
    write_info(str(out), make_split_info(prefix, shards, {"k": 2, "height": 4, "width": 6, "num_classes": C}))
    return truth


@pytest.fixture(scope="module")
def quadrants(tmp_path_factory):
    root = tmp_path_factory.mktemp("quadrants")
    _quadrant_dataset(root / "train", 64, 16, prefix="train", seed=0)
    truth = _quadrant_dataset(root / "val", 24, 24, prefix="val", seed=1)
    return root, truth


def _token_accuracy(cfg, truth) -> float:
    """Mean probability the model gives each validation token (2 x 2 grid over the centred square crop, one
    per quadrant) for the class of the quadrant under it (the targets give it 0.98)."""
    import timm

    from relabel_shards.loader import make_loader

    model = train_mod._make_model(cfg, C)
    model.load_state_dict(torch.load(Path(cfg.out) / "last.pt", weights_only=True)["model"])
    model.eval()
    data_cfg = timm.data.resolve_model_data_config(model)
    mean, std = (torch.tensor(data_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    loader = make_loader(str(Path(cfg.train).parent / "val"), batch_size=24, num_workers=0,
                         image_size=cfg.image_size, center_crop=1.0, shuffle_buffer=0)
    probs = []
    with torch.no_grad():
        for batch in loader:
            _, tokens = train_mod.TokenModel(model)(train_mod._normalize(batch["images"], mean, std,
                                                                         torch.device("cpu")))
            assert tokens.shape[1:] == (2, 2, C)
            want = torch.tensor([truth[k] for k in batch["keys"]]).view(-1, 2, 2, 1)
            probs.append(torch.softmax(tokens, -1).gather(3, want).flatten())
    return float(torch.cat(probs).mean())


def _token_cfg(root, out, model, image_size, **kw):
    base = dict(train=str(root / "train"), val=None, model=model, out=str(out), epochs=6, batch_size=16,
                lr=0.8, warmup_epochs=0.0, image_size=image_size, workers=0, amp=False, token_label=True,
                log_every=6, cutmix=0.5)
    base.update(kw)
    return train_mod.TrainConfig(**base)


# Measured on these data (6 epochs): correct targets give 0.94 (ViT) and 0.95-0.97 (CNN); token targets
# from ignored flips 0.57 / 0.70, the wrong axis order (swap_xy) 0.54 / 0.68, another image's box 0.70 / 0.73.
GOOD = 0.85


@pytest.mark.parametrize("model, image_size", [("test_vit", 32), ("test_resnet", 64)])
def test_token_labeling_learns_each_token(quadrants, tmp_path, model, image_size):
    # ViT: the head on each of the 2 x 2 patch tokens; CNN: the classifier at each of the 2 x 2 positions of
    # the last feature map. Random crops, flips and MixToken: each token learns its quadrant's class only if
    # its targets follow the crop box, the flip and the map's axes (test_token_labeling_detects_... below).
    root, truth = quadrants
    cfg = _token_cfg(root, tmp_path, model, image_size)
    hist = train_mod.train(cfg)
    loss = hist["loss"]
    assert np.mean(loss[-6:]) < 0.8 * np.mean(loss[:6]), loss
    assert _token_accuracy(cfg, truth) >= GOOD


def _sabotage(kind):
    def patch(args, kwargs):
        if kind == "flip ignored":
            kwargs["flips"] = None
        elif kind == "axes swapped":
            kwargs["swap_xy"] = not kwargs.get("swap_xy")
        else:  # "another image's box"
            args[2] = args[2].roll(1, 0)
        return args, kwargs

    return patch


@pytest.mark.parametrize("model, image_size", [("test_vit", 32),
                                               pytest.param("test_resnet", 64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["flip ignored", "axes swapped", "another image's box"])
def test_token_labeling_detects_wrong_geometry(quadrants, tmp_path, monkeypatch, model, image_size, kind):
    # The test above has power: token targets pooled with a wrong flip, axis order or box fail it.
    import relabel_shards.pooling as pooling

    real = pooling.label_pooling
    patch = _sabotage(kind)

    def wrong(*args, **kwargs):
        if kwargs.get("output_size", 1) != 1:
            args, kwargs = patch(list(args), dict(kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(pooling, "label_pooling", wrong)
    root, truth = quadrants
    cfg = _token_cfg(root, tmp_path, model, image_size)
    train_mod.train(cfg)
    assert _token_accuracy(cfg, truth) < GOOD


def test_mix_token_mixes_images_and_targets_alike():
    from relabel_shards.pooling import SparseTargets

    b, g, c = 6, (4, 4), 7
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 32, 32).clone()
    cls_t = torch.nn.functional.one_hot(torch.arange(b) % c, c).float()
    tok = torch.nn.functional.one_hot(torch.arange(b) % c, c).float()[:, None, None].expand(b, 4, 4, c)
    sparse = SparseTargets((torch.arange(b) % c)[:, None], torch.full((b, 4, 4, 1), 5.0), c)
    gen = np.random.default_rng(4)
    mixed, cls_m, tok_m, lam = train_mod.mix_token(images.clone(), cls_t, tok.clone(), g, 1.0, gen)
    gen = np.random.default_rng(4)
    _, _, tok_s, _ = train_mod.mix_token(images.clone(), cls_t, sparse, g, 1.0, gen)
    assert 0 < lam < 1
    for i in range(b):
        src = mixed[i, 0, ::8, ::8].long()  # the image each token shows (tokens are 8 x 8 pixels)
        # each token's target is that of the image it shows; the class target mixes by token share
        assert torch.equal(tok_m[i].argmax(-1), src % c)
        assert torch.equal(tok_s.probs()[i].argmax(-1), src % c)
        share = torch.tensor([(src == v).float().mean() for v in range(b)])
        torch.testing.assert_close(cls_m[i], (share[:, None] * cls_t).sum(0), atol=1e-6, rtol=0)

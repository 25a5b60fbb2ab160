"""tools/train.py on the CPU: a tiny timm model learns synthetic shards; CutMix, checkpoints, resume, ReaL."""

from __future__ import annotations

import importlib.util
import io
import json
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
             seed: int = 0) -> None:
    """Class c: an image in colour c with noise; its label map says c (logit 6) then c+1 (logit 2)."""
    from relabel_shards.labelmap import encode_label_map

    rng = np.random.default_rng(seed)
    shards, batch = [], []
    for i in range(n):
        c = i % C
        arr = np.clip(COLOURS[c] + rng.normal(0, 25, size=(40, 48, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        values = np.stack([np.full((2, 2), 6.0), np.full((2, 2), 2.0)]).astype(np.float32)
        indices = np.stack([np.full((2, 2), c), np.full((2, 2), (c + 1) % C)]).astype(np.int64)
        batch.append(sample_members(key.format(i + 1), image=buf.getvalue(), image_ext="jpg", label=c,
                                    meta={"width": 48, "height": 40},
                                    labelmap=encode_label_map(values, indices, C)))
        if len(batch) == per_shard:
            shards.append(write_shard(str(out), shard_name(prefix, len(shards)), batch))
            batch = []
    write_info(str(out), make_split_info(prefix, shards, {"k": 2, "height": 2, "width": 2, "num_classes": C}))


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


def test_loss_falls_and_validation_reports_top1_and_real(data, tmp_path):
    hist = train_mod.train(_cfg(data, tmp_path, epochs=5))
    loss = hist["loss"]
    assert len(loss) == 5 * 4  # 64 samples / batch 16, 5 epochs
    assert np.mean(loss[-4:]) < 0.5 * np.mean(loss[:4]), loss
    val = hist["val"][-1]
    assert val["n"] == 20 and 0 <= val["top1"] <= 100
    # keys are ImageNet val names 1..20: ReaL scores those with a non-empty label list
    real = train_mod.real_labels()
    assert val["real_n"] == sum(1 for i in range(20) if real[i])


def test_resume_continues_where_the_checkpoint_left(data, tmp_path):
    """With CutMix on every step: its draws after a resume are those of the uninterrupted run."""
    full = train_mod.train(_cfg(data, tmp_path / "a", epochs=2, ckpt_every=3, val=None, cutmix=1.0))
    part = train_mod.train(_cfg(data, tmp_path / "b", epochs=2, max_steps=3, val=None, cutmix=1.0))
    assert len(part["loss"]) == 3
    ck = torch.load(tmp_path / "b" / "last-rank0.pt", weights_only=True)
    assert ck["step"] == 3 and ck["loader"]["readers"]["0"]["good"] == 48
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

def test_command_line_runs(data, tmp_path, capsys):
    train_mod.main(["--train", str(data / "train"), "--val", str(data / "val"),
                    "--model", "test_efficientnet",
                    "--out", str(tmp_path), "--epochs", "1", "--batch-size", "32", "--image-size", "32",
                    "--workers", "0", "--no-amp", "--cutmix", "1.0", "--swap-xy"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 20 and "top1" in res


@pytest.mark.slow
def test_ddp_under_torchrun_two_cpu_ranks(data, tmp_path):
    import os
    import signal
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(_TRAIN_PY), "--train", str(data / "train"), "--val", str(data / "val"), "--model",
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
    for rank in (0, 1):
        ck = torch.load(tmp_path / f"last-rank{rank}.pt", weights_only=True)
        # state_dict() gathers the ranks: each rank's checkpoint holds the whole job's loader state
        assert ck["step"] == 4 and ck["loader"]["ranks"] == [0, 1] and ck["loader"]["world_size"] == 2

#!/usr/bin/env python
"""Reference ReLabel training on label-map shards: a timm model, LabelPooling soft targets, soft-target CE.

    python tools/train.py --train DATA/train --val DATA/val --model resnet50 --epochs 90 --batch-size 256
    torchrun --nproc-per-node 8 tools/train.py ...            # DDP; ranks come from torchrun's environment

Per step: ``make_loader`` hands uint8 crops, their boxes and the top-k label maps; the GPU normalizes the
images, ``label_pooling`` turns (maps, boxes) into soft targets ``[B, C]``, optional CutMix mixes images and
targets as the official recipe does (``lam * a + (1 - lam) * b``, lam from the clipped box area), and the
loss is the soft-target cross-entropy. bf16 autocast on CUDA, cosine schedule with linear warm-up per step,
checkpoints (model, optimizer, schedule, loader position) that resume mid-epoch. Validation: top-1 from
shards (center crop) and ImageNet-ReaL top-1 when the validation keys are ImageNet file names
(``ILSVRC2012_val_00000001``; the ReaL labels ship with timm).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger("train")
_VAL_KEY = re.compile(r"ILSVRC2012_val_(\d{8})$")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in each checkpoint."""

    train: str
    model: str = "resnet50"
    val: str | None = None
    out: str = "runs/relabel"
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1  # SGD, for batch 256 (scaled linearly with the global batch)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0
    image_size: int = 224
    workers: int = 8
    cutmix: float = 0.0  # probability per batch (official recipe: 1.0)
    cutmix_beta: float = 1.0
    swap_xy: bool = False  # True: the official code's box order (shards from `convert --layout hw`)
    amp: bool | None = None  # bf16 autocast; default on for CUDA
    seed: int = 0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    ckpt_every: int = 0  # steps between mid-epoch checkpoints (0: at epoch ends only)
    resume: bool = True
    num_classes: int | None = None  # default: the label maps' C
    storage_options: dict[str, Any] = field(default_factory=dict)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c target[b, c] * log_softmax(logits)[b, c]``.

    Args:
        logits: Tensor[B, C] any float dtype (computed in float32).
        target: Tensor[B, C] float32 probabilities.
    """
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cutmix(images: torch.Tensor, target: torch.Tensor, beta: float, gen: np.random.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix on images and ReLabel soft targets, as the official recipe (utils/data_augment.py) does.

    A box of area ``(1 - lam)`` (lam ~ Beta(beta, beta)) centred uniformly, clipped to the image; its content
    comes from a permuted batch; ``lam`` is recomputed from the clipped area; targets mix as
    ``lam * target + (1 - lam) * target[perm]``.

    Args:
        images: Tensor[B, 3, H, W] (modified in place).
        target: Tensor[B, C] soft targets.

    Returns:
        (images, mixed targets, lam).
    """
    b, _, h, w = images.shape
    lam = float(gen.beta(beta, beta))
    cut = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(w * cut), int(h * cut)
    cx, cy = int(gen.integers(w)), int(gen.integers(h))
    x1, x2 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
    y1, y2 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
    perm = torch.from_numpy(gen.permutation(b)).to(images.device)
    images[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]
    lam = 1.0 - float((x2 - x1) * (y2 - y1)) / (w * h)
    return images, lam * target + (1.0 - lam) * target[perm], lam


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def real_labels() -> list[list[int]]:
    """ImageNet-ReaL labels, in sorted validation-file order (timm/data/_info/imagenet_real_labels.json)."""
    import timm.data

    path = os.path.join(os.path.dirname(timm.data.__file__), "_info", "imagenet_real_labels.json")
    with open(path) as f:
        return json.load(f)


def _world() -> tuple[int, int, torch.device]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device
               ) -> torch.Tensor:
    x = images.to(device, non_blocking=True).float().div_(255.0)  # (B, 3, S, S)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: TrainConfig, mean: torch.Tensor, std: torch.Tensor,
             device: torch.device, crop_pct: float) -> dict[str, float]:
    """Top-1 on the validation shards (center crop), and ReaL top-1 where keys are ImageNet val names.

    Every rank predicts its share; results are merged by key, so the padding that equalizes ranks counts once.
    """
    from relabel_shards.loader import make_loader

    assert cfg.val is not None
    world = dist.get_world_size() if dist.is_initialized() else 1
    probe = make_loader(cfg.val, batch_size=cfg.batch_size, num_workers=0, image_size=cfg.image_size,
                        storage_options=cfg.storage_options or None)
    workers = max(0, min(cfg.workers, len(probe.dataset.shards) // world))
    loader = make_loader(cfg.val, batch_size=cfg.batch_size, num_workers=workers, image_size=cfg.image_size,
                         center_crop=crop_pct, shuffle_buffer=0, storage_options=cfg.storage_options or None)
    model.eval()
    preds: dict[str, tuple[int, int]] = {}
    for batch in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.amp)):
            out = model(_normalize(batch["images"], mean, std, device))
        top = out.argmax(1).cpu().tolist()
        for key, p, y in zip(batch["keys"], top, batch["labels"].tolist(), strict=True):
            preds[key] = (p, y)
    if dist.is_initialized():
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, preds)
        preds = {k: v for part in parts for k, v in part.items()}
    model.train()
    result = {"top1": 100.0 * sum(p == y for p, y in preds.values()) / max(1, len(preds)), "n": len(preds)}
    ids = {k: int(m.group(1)) - 1 for k in preds if (m := _VAL_KEY.search(k))}
    if ids and len(ids) == len(preds):
        real = real_labels()
        scored = [(preds[k][0] in real[i]) for k, i in ids.items() if 0 <= i < len(real) and real[i]]
        result["real_top1"] = 100.0 * sum(scored) / max(1, len(scored))
        result["real_n"] = len(scored)
    return result


def _save(path: str, payload: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a killed run leaves the previous checkpoint intact


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) per ``cfg``; return the history: per-step losses and per-epoch validation."""
    import timm

    from relabel_shards.loader import make_loader
    from relabel_shards.pooling import label_pooling

    rank, world, device = _world()
    if cfg.amp is None:
        cfg.amp = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    loader = make_loader(cfg.train, batch_size=cfg.batch_size, num_workers=cfg.workers,
                         image_size=cfg.image_size, seed=cfg.seed, pin_memory=device.type == "cuda",
                         storage_options=cfg.storage_options or None)
    geo = loader.dataset.geometry
    num_classes = cfg.num_classes or (geo.num_classes if geo else None)
    if num_classes is None:
        raise ValueError("num_classes: _info.json gives no label-map geometry; pass --num-classes")
    model = timm.create_model(cfg.model, pretrained=False, num_classes=num_classes).to(device)
    data_cfg = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(data_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg["std"], device=device).view(1, 3, 1, 1)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    lr = cfg.lr * cfg.batch_size * world / 256
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_lr(s, total, int(cfg.warmup_epochs * steps_per_epoch)))
    ddp = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, f"last-rank{rank}.pt")
    history: dict[str, Any] = {"loss": [], "val": [], "config": asdict(cfg)}
    step, epoch = 0, 0
    if cfg.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        step, epoch, history = state["step"], state["loader"]["epoch"], state["history"]
        log.info("resumed from %s at epoch %d step %d", ckpt_path, epoch, step)

    def checkpoint() -> None:
        _save(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "loader": loader.state_dict(), "step": step,
                          "history": history})

    crop_pct = float(data_cfg.get("crop_pct", 0.875))
    ddp.train()
    while epoch < cfg.epochs:
        if loader.dataset.epoch != epoch or loader.dataset.epoch_complete():
            loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in loader:
            images = _normalize(batch["images"], mean, std, device)
            with torch.no_grad():
                target = label_pooling(batch["values"].to(device, non_blocking=True),
                                       batch["indices"].to(device, non_blocking=True),
                                       batch["boxes"].to(device, non_blocking=True), num_classes,
                                       swap_xy=cfg.swap_xy)
            # CutMix draws from (seed, rank, step): a resumed run makes the same draws as an uninterrupted one
            gen = np.random.default_rng([cfg.seed, rank, step])
            if cfg.cutmix > 0 and gen.random() < cfg.cutmix:
                images, target, _ = cutmix(images, target, cfg.cutmix_beta, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.amp)):
                logits = ddp(images)
            loss = soft_target_cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            history["loss"].append(float(loss.detach()))
            if rank == 0 and step % 50 == 0:
                log.info("epoch %d step %d loss %.4f lr %.4g %.1f img/s", epoch, step, history["loss"][-1],
                         sched.get_last_lr()[0], 50 * cfg.batch_size / (time.perf_counter() - t0))
                t0 = time.perf_counter()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                checkpoint()
            if cfg.max_steps is not None and step >= cfg.max_steps:
                checkpoint()
                return history
        if cfg.val:
            res = evaluate(model, cfg, mean, std, device, crop_pct)
            res["epoch"] = epoch
            history["val"].append(res)
            if rank == 0:
                log.info("epoch %d validation %s", epoch, res)
        epoch += 1
        loader.set_epoch(epoch)
        checkpoint()
    return history


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command-line options -> :class:`TrainConfig` (same names, dashes for underscores)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig(train="")
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name == "storage_options":
            p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = {"int": int, "int | None": int, "float": float, "str": str, "str | None": str}[f.type]
            p.add_argument(flag, type=kind, default=default, required=f.name == "train")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    history = train(parse_args(argv))
    if history["val"] and (not dist.is_initialized() or dist.get_rank() == 0):
        print(json.dumps(history["val"][-1]))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

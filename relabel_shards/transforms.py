"""The sample transform: the upright image in, the crop with its box and flip out, photometric ops after.

A sample transform is any callable ``transform(image, rng) -> Crop``:

- ``image``: a :class:`relabel_shards.images.UprightImage`, opened but not decoded, so a transform can ask
  for a reduced-size JPEG decode (``image.resized_crop(..., draft=True)``); ``image.size`` is the upright
  ``(width, height)`` that the label map describes.
- ``rng``: the sample's own ``random.Random`` (derived from seed, epoch and key by the loader); a transform
  draws everything from it, so crops are reproducible and resumable.
- returns :class:`Crop` ``(image, box, flipped)``: uint8 ``[S, S, 3]`` RGB, the normalized
  ``(x1, y1, x2, y2)`` window of the upright original image that the crop shows (``label_pooling``'s box),
  and whether the crop was mirrored left to right (the box is not).

:class:`RandomResizedCropFlip` is the default for training (torchvision's RandomResizedCrop distribution and a
flip, bit-identical to the loader's crops before transforms were pluggable, with the same draws from ``rng``);
:class:`CenterCrop` is timm's evaluation crop. :class:`Compose` runs photometric ops after either one.

Which ops are safe after the crop. The box says which window of the original the crop shows, so an op that
moves pixels (crops, resizes, flips, rotates, shears, translates, warps) makes the box wrong and must be the
geometric transform itself, reporting its box. Ops that only change pixel values keep the box right:

- torchvision (``transforms`` and ``transforms.v2``): safe: ``ColorJitter``, ``Grayscale``,
  ``RandomGrayscale``, ``GaussianBlur``, ``RandomAdjustSharpness``, ``RandomAutocontrast``,
  ``RandomEqualize``, ``RandomPosterize``, ``RandomSolarize``, ``RandomInvert``, ``RandomChannelPermutation``,
  ``RandomPhotometricDistort``. Not safe: ``RandomResizedCrop``, ``RandomCrop``, ``CenterCrop``, ``Resize``,
  ``Pad``, ``RandomHorizontalFlip`` (use ``hflip``, which the batch reports), ``RandomVerticalFlip``,
  ``RandomRotation``, ``RandomAffine``, ``RandomPerspective``, ``ElasticTransform``, and the policies
  ``AutoAugment``, ``RandAugment``, ``TrivialAugmentWide``, ``AugMix`` (they include geometric ops).
  ``RandomErasing`` moves nothing but erases content; it works on tensors, after the loader.
- timm: RandAugment/AutoAugment's colour ops are safe: ``AutoContrast``, ``Equalize``, ``Invert``,
  ``Posterize``, ``Solarize``, ``SolarizeAdd``, ``Color``, ``Contrast``, ``Brightness``, ``Sharpness``
  (:data:`TIMM_COLOR_OPS`; ``timm.data.auto_augment.rand_augment_transform("rand-m9-mstd0.5",
  transforms=list(TIMM_COLOR_OPS))``). Its ``Rotate``, ``ShearX``/``ShearY`` and ``TranslateX*``/``Y*``
  are not; timm's default RandAugment includes them.

:class:`Compose` refuses the unsafe ones it recognizes (by class name, and timm RandAugment's op names) and
any op that changes the crop's size. Photometric ops draw from Python's, NumPy's and torch's global random
generators, as torchvision and timm ops do; :class:`Compose` seeds those from the sample's ``rng`` for the
call and restores them after, so the ops are reproducible per sample too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from relabel_shards.crops import check_scale_ratio, crop_box, random_resized_crop_params
from relabel_shards.images import UprightImage

__all__ = [
    "TIMM_COLOR_OPS",
    "CenterCrop",
    "Compose",
    "Crop",
    "Lighting",
    "RandomResizedCropFlip",
    "SampleTransform",
]

TIMM_COLOR_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
)
_TIMM_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
_MOVES_PIXELS = frozenset(
    {
        "RandomResizedCrop",
        "RandomCrop",
        "CenterCrop",
        "Resize",
        "Pad",
        "RandomHorizontalFlip",
        "RandomVerticalFlip",
        "RandomRotation",
        "RandomAffine",
        "RandomPerspective",
        "ElasticTransform",
        "FiveCrop",
        "TenCrop",
        "RandomZoomOut",
        "RandomIoUCrop",
        "RandomShortestSize",
        "ScaleJitter",
        "RandomResize",
        "AutoAugment",
        "RandAugment",
        "TrivialAugmentWide",
        "AugMix",
    }
)


class Crop(NamedTuple):
    """What a sample transform returns.

    Attributes:
        image: uint8 ``[S, S, 3]`` RGB (any ``[H, W, 3]``; a batch needs one size).
        box: normalized ``(x1, y1, x2, y2)`` of the window in the upright original image.
        flipped: the crop was mirrored left to right (the box was not).
    """

    image: np.ndarray
    box: tuple[float, float, float, float]
    flipped: bool


class SampleTransform(Protocol):
    """``transform(image, rng) -> Crop`` (see the module docstring)."""

    def __call__(self, image: UprightImage, rng: random.Random) -> Crop: ...


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop (drawn on the upright original) and a horizontal flip: the default.

    Draws from ``rng``: the window (:func:`relabel_shards.crops.random_resized_crop_params`), then one
    ``rng.random()`` for the flip (also when ``hflip`` is 0).

    Args:
        size: output side S, pixels.
        scale, ratio: RandomResizedCrop's area-fraction and aspect (width / height) ranges.
        hflip: probability of a flip, in [0, 1].
        draft: decode JPEG/MPO at reduced size when the window is downscaled 2x or more.
    """

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    draft: bool = True

    def __post_init__(self) -> None:
        _check_size(self.size)
        check_scale_ratio(self.scale, self.ratio)
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip must be in [0, 1], got {self.hflip!r}")

    def __call__(self, image: UprightImage, rng: random.Random) -> Crop:
        """The crop of ``image`` (see the class docstring)."""
        width, height = image.size
        left, top, cw, ch = random_resized_crop_params(width, height, self.scale, self.ratio, rng)
        flipped = rng.random() < self.hflip  # drawn after the window, as before; decoding draws nothing
        out = image.resized_crop(left, top, cw, ch, self.size, draft=self.draft, flip=flipped)
        return Crop(out, crop_box(left, top, cw, ch, width, height), flipped)


@dataclass(frozen=True)
class CenterCrop:
    """timm's evaluation crop: the centered square of side ``crop_pct`` x the short side, resized to S.

    (The same as resizing the short side to ``S / crop_pct`` and taking the central S x S.) Never flipped;
    draws nothing from ``rng``.
    """

    size: int = 224
    crop_pct: float = 0.875
    draft: bool = True

    def __post_init__(self) -> None:
        _check_size(self.size)
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")

    def __call__(self, image: UprightImage, rng: random.Random) -> Crop:
        """The central crop of ``image``."""
        width, height = image.size
        side = max(1, min(width, height, round(min(width, height) * self.crop_pct)))
        left, top = (width - side) // 2, (height - side) // 2
        out = image.resized_crop(left, top, side, side, self.size, draft=self.draft)
        return Crop(out, crop_box(left, top, side, side, width, height), False)


def _op_name(op: Any) -> str:
    return type(op).__name__


def _check_photometric(op: Any) -> None:
    if not callable(op):
        raise TypeError(f"photometric ops must be callables on a PIL image, got {op!r}")
    if _op_name(op) in _MOVES_PIXELS and type(op).__module__.startswith("torchvision"):
        raise ValueError(
            f"photometric op {_op_name(op)} moves pixels, so the crop's box would be wrong; "
            "make it the geometric transform (which reports its box) or drop it"
        )
    ops = getattr(op, "ops", None)  # timm's RandAugment / AutoAugment hold AugmentOp(name=...)
    if isinstance(ops, (list, tuple)):
        bad = sorted({getattr(o, "name", "") for o in ops} & set(_TIMM_GEOMETRIC))
        if bad:
            raise ValueError(
                f"photometric op {_op_name(op)} includes ops that move pixels {bad}; build it "
                f"with transforms=list(TIMM_COLOR_OPS)"
            )


@contextmanager
def _seeded_globals(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's global generators seeded from ``seed``, restored on exit."""
    import torch

    py, npy, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)


def _to_uint8_hwc(x: Any) -> np.ndarray:
    """A photometric op's output as uint8 ``[H, W, 3]``: a PIL image, an HWC uint8 array, a CHW tensor."""
    import torch
    from PIL import Image

    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB") if x.mode != "RGB" else x)
    if isinstance(x, torch.Tensor):  # [3, H, W], uint8 or float in [0, 1]
        t = x.detach().cpu()
        if t.is_floating_point():
            t = (t * 255).round().clamp(0, 255)
        return np.ascontiguousarray(t.to(torch.uint8).permute(1, 2, 0).numpy())
    arr = np.asarray(x)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(
            f"a photometric op returned {type(x).__name__} {arr.dtype} {list(arr.shape)}; "
            "expected a PIL image, a uint8 [H, W, 3] array or a [3, H, W] tensor"
        )
    return arr


@dataclass(frozen=True)
class Compose:
    """A geometric sample transform, then photometric ops on its crop (which keep its box and flip).

    Args:
        geometric: the sample transform that crops and reports the box (default: the loader's default).
        photometric: ops applied in order to the crop as a PIL image (torchvision / timm style callables);
            each must leave the size alone and move no pixels (see the module docstring).

    Example::

        from torchvision.transforms import ColorJitter
        t = Compose(RandomResizedCropFlip(224), photometric=[ColorJitter(0.4, 0.4, 0.4), Lighting(0.1)])
        ReLabelDataset(url, transform=t)
    """

    geometric: Callable[[UprightImage, random.Random], Crop] = field(default_factory=RandomResizedCropFlip)
    photometric: Sequence[Callable[[Any], Any]] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "photometric", tuple(self.photometric))
        for op in self.photometric:
            _check_photometric(op)

    def __call__(self, image: UprightImage, rng: random.Random) -> Crop:
        """The geometric crop, then the photometric ops (seeded from ``rng``)."""
        from PIL import Image

        crop = self.geometric(image, rng)
        if not self.photometric:
            return crop
        x: Any = Image.fromarray(np.asarray(crop.image))
        with _seeded_globals(rng.getrandbits(63)):
            for op in self.photometric:
                x = op(x)
        out = _to_uint8_hwc(x)
        if out.shape != crop.image.shape:
            raise ValueError(
                f"photometric op changed the crop from {list(crop.image.shape)} to "
                f"{list(out.shape)}; ops that resize or move pixels must be the geometric "
                "transform"
            )
        return Crop(out, crop.box, crop.flipped)


# ImageNet's RGB PCA (AlexNet; fb.resnet.torch's and ReLabel's train transforms): eigenvalues, eigenvectors.
_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


@dataclass(frozen=True)
class Lighting:
    """AlexNet-style PCA lighting noise, as in ReLabel's official train transform (``alphastd=0.1``).

    Adds ``eigvec @ (alpha * eigval)`` to every pixel (values in [0, 1]), ``alpha ~ N(0, alphastd)`` per
    channel from torch's global generator (seeded per sample by :class:`Compose`). A PIL image in, a PIL
    image out (rounded and clipped to uint8). Photometric: moves no pixels.
    """

    alphastd: float = 0.1

    def __call__(self, img: Any) -> Any:
        """``img`` with the lighting noise added."""
        import torch
        from PIL import Image

        if self.alphastd == 0:
            return img
        alpha = torch.empty(3).normal_(0, self.alphastd).double().numpy()
        rgb = (np.asarray(_PCA_EIGVEC) * alpha[None, :] * np.asarray(_PCA_EIGVAL)[None, :]).sum(1)  # (3,)
        arr = np.asarray(img.convert("RGB"), dtype=np.float64) / 255 + rgb
        return Image.fromarray((arr * 255).round().clip(0, 255).astype(np.uint8))

"""The one rule for opening an image: used by build, the loader, the annotator and ``show`` alike.

Label maps describe the *upright* image: the stored pixels turned by the EXIF orientation, for every format
PIL reads EXIF from (JPEG, MPO, PNG's ``eXIf``, WebP, TIFF, ...), exactly as ``PIL.ImageOps.exif_transpose``
does. So the size that counts everywhere, the one build writes to ``.json`` as ``width``/``height``, is the
upright size, and a sample's ``.json`` must record exactly that (:func:`check_size`; width and height
swapped is a mismatch, not a pass).

:func:`open_image` reads the header only (format, stored size, orientation) and checks the pixel limit
before anything is decoded; the returned :class:`UprightImage` then decodes once, either whole
(:meth:`UprightImage.to_pil`) or straight into a resized crop (:meth:`UprightImage.resized_crop`), which for
JPEG/MPO may decode at 1/2, 1/4 or 1/8 scale in the DCT (PIL draft mode). A crop box is always given in
pixels of the upright, full-size image; the draft scale is PIL's own (its draft box), and a turned image's
partial edge block is accounted for, so a drafted crop covers the same window as a full decode.

The pixel limit replaces PIL's ``DecompressionBombWarning`` (a warning printed into progress bars, naming no
file) and ``DecompressionBombError`` (at twice PIL's global limit): an image over ``max_pixels`` raises
:class:`ImageTooLargeError`, and the caller names the file. PIL's own check is off while this module opens and
decodes (``PIL.Image.MAX_IMAGE_PIXELS`` is set to None meanwhile and restored after), so one limit holds.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageError",
    "ImageSizeError",
    "ImageTooLargeError",
    "UprightImage",
    "check_max_pixels",
    "check_size",
    "open_image",
    "upright",
]

log = logging.getLogger(__name__)

# PIL's own warning threshold (``PIL.Image.MAX_IMAGE_PIXELS``: 1024**3 // 4 // 3, about 9459 x 9459 px).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
EXIF_ORIENTATION = 0x0112
DRAFT_FORMATS = ("JPEG", "MPO")  # PIL decodes these at 1/2, 1/4, 1/8 in the DCT (draft mode)
# PIL's TIFF plugin applies the orientation itself: upright size at open, pixels turned (tag dropped) at load.
_TURNED_BY_PIL = ("TIFF",)


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` says which kind (the loader's skip counters use it)."""

    reason = "corrupt_image"


class ImageTooLargeError(ImageError):
    """The image has more pixels than the limit (``max_image_pixels``)."""

    reason = "image_too_large"


class ImageSizeError(ImageError):
    """The decoded (upright) size differs from the one recorded with the image."""

    reason = "size_mismatch"


def _transpose_methods() -> dict[int, Any]:
    from PIL import Image

    t = Image.Transpose  # the table of PIL.ImageOps.exif_transpose
    return {
        2: t.FLIP_LEFT_RIGHT,
        3: t.ROTATE_180,
        4: t.FLIP_TOP_BOTTOM,
        5: t.TRANSPOSE,
        6: t.ROTATE_270,
        7: t.TRANSVERSE,
        8: t.ROTATE_90,
    }


# For each orientation: (upright x comes from a mirrored stored axis: which one, or None; same for y).
# A drafted JPEG holds whole 1/s blocks, so its stored frame covers ceil(n/s)*s px; where an upright axis
# runs backwards along a stored axis, that partial block lands at the start of the upright axis.
_MIRRORED = {
    1: (None, None),
    2: (0, None),
    3: (0, 1),
    4: (None, 1),
    5: (None, None),
    6: (1, None),
    7: (1, 0),
    8: (None, 0),
}

_guard_lock = threading.Lock()
_guard_depth = 0
_guard_saved: int | None = None


@contextmanager
def _pil_limit_off() -> Iterator[None]:
    """PIL's global decompression-bomb check off (this module applies its own limit), restored on exit."""
    global _guard_depth, _guard_saved
    from PIL import Image

    with _guard_lock:
        if _guard_depth == 0:
            _guard_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _guard_depth += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_depth -= 1
            if _guard_depth == 0:
                Image.MAX_IMAGE_PIXELS = _guard_saved


def check_max_pixels(max_pixels: int | None, name: str = "max_pixels") -> int | None:
    """Validate a pixel limit: the limit, or None for no limit (0 or None).

    Raises:
        ValueError: not an int >= 0 (the message names the parameter ``name``).
    """
    if max_pixels is None or (max_pixels == 0 and not isinstance(max_pixels, bool)):
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise ValueError(f"{name} must be an int >= 0 (0 or None: no limit), got {max_pixels!r}")
    return max_pixels


def check_size(size: tuple[int, int], expected: tuple[Any, Any] | None) -> None:
    """Check an upright ``(width, height)`` against the one recorded with the image (``.json``).

    Args:
        size: the upright size of the decoded image, pixels.
        expected: ``(width, height)`` as recorded (build writes the upright size); None, or a None inside,
            means nothing was recorded and nothing is checked.

    Raises:
        ImageSizeError: the sizes differ (width and height swapped is a difference).
    """
    if expected is None or None in expected:
        return
    if (expected[0], expected[1]) != (size[0], size[1]):
        raise ImageSizeError(
            f".json says {expected[0]}x{expected[1]} but the image is {size[0]}x{size[1]} "
            "(upright, after its EXIF orientation)"
        )


class UprightImage:
    """An opened image (header read, pixels not yet decoded) and its upright geometry.

    Attributes:
        format: PIL's format name (``"JPEG"``, ``"MPO"``, ``"PNG"``, ...).
        orientation: the EXIF orientation applied, 1..8 (1: none; values outside 2..8 count as 1).
        stored_size: ``(width, height)`` of the pixels as stored in the file.
        size: ``(width, height)`` of the upright image: the frame label maps and crop boxes refer to.

    Decode once: call either :meth:`to_pil` or :meth:`resized_crop`, one time.
    """

    def __init__(self, im: Any, orientation: int):
        self._im = im
        self.format: str | None = im.format
        self.orientation = orientation
        w, h = int(im.size[0]), int(im.size[1])
        turned = orientation in (5, 6, 7, 8)
        if self.format in _TURNED_BY_PIL:  # PIL reports the upright size and turns the pixels at load
            self.size: tuple[int, int] = (w, h)
            self.stored_size: tuple[int, int] = (h, w) if turned else (w, h)
        else:
            self.stored_size = (w, h)
            self.size = (h, w) if turned else (w, h)
        self._used = False

    @property
    def width(self) -> int:
        """Upright width in pixels."""
        return self.size[0]

    @property
    def height(self) -> int:
        """Upright height in pixels."""
        return self.size[1]

    def __repr__(self) -> str:
        return (
            f"UprightImage(format={self.format!r}, size={self.size}, orientation={self.orientation}, "
            f"mode={self._im.mode!r})"
        )

    def _take(self) -> Any:
        if self._used:
            raise RuntimeError("UprightImage decodes once: call to_pil() or resized_crop() one time")
        self._used = True
        return self._im

    def _decode(self, reduce: float) -> tuple[Any, int, tuple[int, int]]:
        """(upright PIL image, draft factor s, (pad_x, pad_y)): upright pixel x sits at (x + pad_x) / s."""
        from PIL import ImageOps

        im = self._take()
        s = 1
        with _pil_limit_off():
            try:
                if reduce >= 2 and self.format in DRAFT_FORMATS:
                    sw, sh = self.stored_size
                    # The largest 1/2^n scale that still leaves the window >= the output on both sides.
                    got = im.draft("RGB", (math.ceil(sw / reduce), math.ceil(sh / reduce)))
                    if got is not None:
                        s = round(sw / got[1][2])  # PIL's draft box is (0, 0, width / scale, height / scale)
                im.load()
                if self.orientation != 1:
                    im = ImageOps.exif_transpose(im)
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageError(f"cannot decode image: {e}") from None
        pad = [0, 0]
        for axis, stored_axis in enumerate(_MIRRORED[self.orientation]):
            if stored_axis is not None:
                n = self.stored_size[stored_axis]
                pad[axis] = -(-n // s) * s - n
        want = (-(-self.size[0] // s), -(-self.size[1] // s))
        if im.size != want:  # PIL decoded another size than its header (and draft) said
            raise ImageError(
                f"decoded {im.size[0]}x{im.size[1]} px, the header says {self.size[0]}x"
                f"{self.size[1]} (upright) at scale 1/{s}"
            )
        return im, s, (pad[0], pad[1])

    def to_pil(self) -> Any:
        """The whole image, decoded at full size, upright, mode RGB (a ``PIL.Image.Image``)."""
        im, _, _ = self._decode(1.0)
        return im if im.mode == "RGB" else im.convert("RGB")

    def resized_crop(
        self,
        left: float,
        top: float,
        width: float,
        height: float,
        size: int | tuple[int, int],
        *,
        draft: bool = True,
        flip: bool = False,
    ) -> np.ndarray:
        """Crop a window of the upright image and resize it: torchvision's ``F.resized_crop`` on the image.

        The window is in pixels of the upright, full-size image. Bilinear with antialias (PIL's
        ``resize(box=...)``), as ``torchvision.transforms.functional.resized_crop`` does on a PIL image.

        Args:
            left, top, width, height: the window (``width, height > 0``).
            size: output side S, or ``(width, height)``.
            draft: decode JPEG/MPO at 1/2, 1/4 or 1/8 scale when the window is downscaled 2x or more (the
                window still gets >= the output's pixels on both sides).
            flip: mirror the result left to right.

        Returns:
            uint8 array ``[H, W, 3]`` RGB.
        """
        import numpy as np
        from PIL import Image

        out_w, out_h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        reduce = min(width / out_w, height / out_h) if draft else 1.0
        im, s, (px, py) = self._decode(reduce)
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        if s == 1:
            box = (left, top, left + width, top + height)
        else:
            box = ((left + px) / s, (top + py) / s, (left + width + px) / s, (top + height + py) / s)
        out = im.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
        if out.mode != "RGB":
            out = out.convert("RGB")
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out)


def open_image(
    data: bytes,
    *,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    expect_size: tuple[Any, Any] | None = None,
) -> UprightImage:
    """Open image bytes: format, EXIF orientation, size checks; no pixels decoded yet.

    Args:
        data: the image file's bytes, any format PIL reads (the first frame of multi-frame files).
        max_pixels: the most pixels (width x height) allowed; 0 or None: no limit.
        expect_size: the upright ``(width, height)`` recorded with the image (``.json``), checked
            exactly (:func:`check_size`); None: not checked.

    Returns:
        An :class:`UprightImage`; decode it with :meth:`~UprightImage.to_pil` or
        :meth:`~UprightImage.resized_crop`.

    Raises:
        ImageError: empty bytes, or not an image PIL can identify or read.
        ImageTooLargeError: more pixels than ``max_pixels``.
        ImageSizeError: the upright size differs from ``expect_size``.
    """
    from PIL import Image, UnidentifiedImageError

    limit = check_max_pixels(max_pixels)
    if not data:
        raise ImageError("empty file")
    with _pil_limit_off():
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError("not a decodable image (PIL cannot identify it)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"cannot decode image: {e}") from None
        w, h = im.size
        if limit is not None and w * h > limit:
            raise ImageTooLargeError(
                f"{w}x{h} image has {w * h:,} pixels, over the limit of {limit:,} (max_image_pixels, a "
                f"decompression-bomb guard; raise it, e.g. --max-image-pixels {w * h}, or 0 for no limit)"
            )
        try:  # PNG may keep its eXIf chunk after the pixels: PIL then reads the file to find it
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        except Exception as e:  # noqa: BLE001 - a damaged EXIF block: the image is still an image
            log.debug("unreadable EXIF (%s): orientation 1", e)
            orientation = 1
    orientation = orientation if orientation in _MIRRORED else 1
    img = UprightImage(im, int(orientation))
    check_size(img.size, expect_size)
    return img


def upright(image: Any) -> Any:
    """An already opened ``PIL.Image`` turned upright by its EXIF orientation, in mode RGB.

    The same rule as :func:`open_image` (every format with EXIF); a no-op for an image that is already
    upright (turning removes the orientation tag).
    """
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - see open_image
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        image = ImageOps.exif_transpose(image)
    return image if image.mode == "RGB" else image.convert("RGB")

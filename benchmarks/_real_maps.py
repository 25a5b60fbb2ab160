"""Real label maps for the label-map benchmark: the embedded annotator over scikit-image's real photos.

The embedded EfficientNet-Lite0 runs fully convolutionally at 480x480 (the whole photo squashed, as the
paper does) and keeps the top-5 raw logits at each of its 15x15 positions, in float32 (the map the encodings
are measured against). Eight bundled photos, each whole, mirrored and cropped twice, give 32 maps.
"""

from __future__ import annotations

import numpy as np
import torch

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "camera", "clock", "coins")


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def _views(img: np.ndarray) -> list[np.ndarray]:
    """The photo whole, mirrored, and two crops (top-left 75 %, bottom-right 70 %)."""
    h, w = img.shape[:2]
    return [
        img,
        img[:, ::-1].copy(),
        img[: int(h * 0.75), : int(w * 0.75)].copy(),
        img[int(h * 0.3) :, int(w * 0.3) :].copy(),
    ]


def real_label_maps(
    photos: tuple[str, ...] = PHOTOS, *, size: int = 480, topk: int = 5, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32 [N, k, h, w], indices int64 [N, k, h, w]): top-k raw logits of the embedded annotator.

    N = 4 * len(photos); h = w = size / 32 (15 at 480).
    """
    from relabel_shards.annotator import create_annotator

    ann = create_annotator(input_size=size, topk=topk, device=device)
    vals, idxs = [], []
    for name in photos:
        x = torch.stack([ann.preprocess(v) for v in _views(_photo(name))])
        dense = ann.dense_logits(x).float().cpu()  # (4, 1000, h, w)
        v, i = dense.topk(topk, dim=1)
        vals.append(v)
        idxs.append(i)
    return torch.cat(vals), torch.cat(idxs)

"""``relabel-shards demo``: real photos -> label-map shards -> pictures, on the CPU in well under a minute.

The demo writes scikit-image's bundled photos (chelsea, coffee, astronaut, rocket, stereo_motorcycle) and a
chelsea | coffee side-by-side collage as JPEGs with a ``path<TAB>label`` list, builds shards from them with
the embedded EfficientNet-Lite0 annotator (:func:`relabel_shards.build.build_shards`, aspect ratio kept so
the collage's halves stay apart), verifies the shards, and draws every sample with
:func:`relabel_shards.show.show_sample`. The collage is the picture to look at: the cat's classes light up
its left half, the espresso's its right half; that is what a localized label map adds to a single label.

Layout of ``out``::

    photos/   the JPEGs and list.txt (the build's source)
    shards/   train-000000.tar + _info.json
    show/     one PNG per photo (collage.png first)
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relabel_shards.shards import ShardError, read_info

logger = logging.getLogger(__name__)

# key -> (scikit-image function, the label written to the list file)
PHOTOS: dict[str, tuple[str, str]] = {
    "chelsea": ("chelsea", "cat"),
    "coffee": ("coffee", "coffee"),
    "astronaut": ("astronaut", "astronaut"),
    "rocket": ("rocket", "rocket"),
    "motorcycle": ("stereo_motorcycle", "motorcycle"),
}
COLLAGE = "collage"
COLLAGE_HEIGHT = 300  # chelsea's own height; coffee is scaled to it


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` wrote.

    Attributes:
        out: the demo directory.
        shards: the shard directory (``out/shards``), with ``_info.json``.
        pictures: one :class:`relabel_shards.show.ShowResult` per sample, the collage first.
        verify_summary: the one-line summary of :func:`relabel_shards.verify.verify_shards` on the shards.
        collage_crops: for the collage's left (cat) and right (coffee) photo taken as crop boxes: (which,
            box (x1, y1, x2, y2) normalized, the LabelPooling target's top 3 as (index, name, probability)).
        seconds: wall time of the build (model creation included) and of the whole demo.
    """

    out: str
    shards: str
    pictures: list[Any]
    verify_summary: str
    collage_crops: list[tuple[str, tuple[float, float, float, float], list[tuple[int, str, float]]]]
    build_seconds: float
    seconds: float


def demo_photos() -> dict[str, Any]:
    """The demo's images, RGB ``PIL.Image``: the chelsea | coffee collage first, then the five photos.

    The collage's ``info["split_x"]`` is where the cat photo ends, as a fraction of the collage's width.

    Raises:
        ImportError: scikit-image is not installed (the message gives the install command).
    """
    from PIL import Image

    from relabel_shards._optional import require

    data = require("skimage.data", "relabel-shards demo (its photos are scikit-image's)")
    photos = {}
    for key, (fn, _) in PHOTOS.items():
        arr = getattr(data, fn)()
        if fn == "stereo_motorcycle":
            arr = arr[0]  # (left, right, disparity): the left view
        photos[key] = Image.fromarray(arr[..., :3]).convert("RGB")
    cat, cup = photos["chelsea"], photos["coffee"]
    cup = cup.resize((round(cup.width * COLLAGE_HEIGHT / cup.height), COLLAGE_HEIGHT), Image.BICUBIC)
    cat = cat.resize((round(cat.width * COLLAGE_HEIGHT / cat.height), COLLAGE_HEIGHT), Image.BICUBIC)
    collage = Image.new("RGB", (cat.width + cup.width, COLLAGE_HEIGHT))
    collage.paste(cat, (0, 0))
    collage.paste(cup, (cat.width, 0))
    collage.info["split_x"] = cat.width / collage.width  # where the cat ends, as a fraction of the width
    return {COLLAGE: collage, **photos}


def collage_crops(shards: str, split_x: float) -> list[tuple[str, tuple[float, float, float, float],
                                                             list[tuple[int, str, float]]]]:
    """The soft targets ``label_pooling`` gives the collage's two halves (what a crop of each would get).

    Args:
        shards: the demo's shard directory.
        split_x: where the left photo ends, as a fraction of the collage's width.
    """
    import torch

    from relabel_shards.labelmap import decode_label_map
    from relabel_shards.pooling import label_pooling
    from relabel_shards.show import class_names, find_sample

    _, members, section = find_sample(shards, COLLAGE)
    lm = decode_label_map(members["rlm"])
    boxes = {"left (cat)": (0.0, 0.0, split_x, 1.0), "right (coffee)": (split_x, 0.0, 1.0, 1.0)}
    values = torch.as_tensor(lm.values)[None].expand(len(boxes), -1, -1, -1)  # (2, k, h, w)
    indices = torch.as_tensor(lm.indices)[None].expand(len(boxes), -1, -1, -1)
    probs = label_pooling(values, indices, torch.tensor(list(boxes.values())), int(lm.num_classes))  # (2, C)
    names = class_names(int(lm.num_classes), section)
    result = []
    for (which, box), p in zip(boxes.items(), probs, strict=True):
        top = torch.topk(p, 3)
        result.append((which, box, [(int(c), names[int(c)], float(v)) for v, c in zip(*top, strict=True)]))
    return result


def write_source(photos: dict[str, Any], directory: str) -> str:
    """Write the photos as JPEGs (quality 92) and a ``path<TAB>label`` list; return the list file's path."""
    os.makedirs(directory, exist_ok=True)
    labels = {COLLAGE: "cat|coffee", **{k: v[1] for k, v in PHOTOS.items()}}
    lines = []
    for key, image in photos.items():
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=92)
        with open(os.path.join(directory, f"{key}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        lines.append(f"{key}.jpg\t{labels[key]}\n")
    path = os.path.join(directory, "list.txt")
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def _clear_previous_demo(shards: str) -> None:
    """Remove an earlier demo's shards so that a rerun rebuilds (with its own options) instead of resuming.

    Only a folder whose ``_info.json`` names the dataset "demo" is removed; anything else is an error.
    """
    if not os.path.exists(shards):
        return
    try:
        name = read_info(shards).get("name")
    except (FileNotFoundError, ShardError):
        name = None
    if name != "demo" and os.listdir(shards):
        raise ValueError(f"{shards} exists and does not hold an earlier demo's shards; give the demo an "
                         f"empty or new output directory")
    shutil.rmtree(shards)


def run_demo(out: str | os.PathLike, *, device: str | None = "cpu", input_size: int = 320, topk: int = 5,
             progress: Callable[[int, int | None], None] | None = None) -> DemoResult:
    """Build label-map shards from real photos with the embedded annotator and draw each sample.

    Args:
        out: a local directory (created; ``photos/``, ``shards/`` and ``show/`` inside are rewritten; an
            existing ``shards/`` that is not an earlier demo's is an error, never removed).
        device: where the annotator runs; the default "cpu" keeps the demo the same everywhere.
        input_size: the annotator's short side in pixels (aspect kept); 320 gives maps of about 10 x 15.
        topk: classes kept per map cell, and heatmaps drawn per picture.
        progress: passed to ``build_shards`` (``progress(done, total)`` after each batch).

    Returns:
        DemoResult; ``pictures[0]`` is the collage.

    Raises:
        ImportError: scikit-image is missing.
        ValueError: ``out/shards`` holds something other than an earlier demo's shards.
    """
    from relabel_shards.build import build_shards
    from relabel_shards.show import show_sample
    from relabel_shards.verify import verify_shards

    t0 = time.perf_counter()
    out = os.fspath(out)
    photos = demo_photos()
    source = write_source(photos, os.path.join(out, "photos"))
    shards = os.path.join(out, "shards")
    _clear_previous_demo(shards)
    build_shards(source, shards, device=device, input_size=input_size, keep_aspect=True, topk=topk,
                 shard_size=len(photos), num_workers=0, batch_size=len(photos), progress=progress,
                 name="demo", check_classes=False)  # .cls names a photo ("cat|coffee"), not a class
    build_seconds = time.perf_counter() - t0
    report = verify_shards(shards)
    if not report.ok:  # the demo's own output must be sound; say so loudly if it is not
        raise RuntimeError("the demo's shards failed verification:\n" + "\n".join(report.problems))
    pictures = [show_sample(shards, key, os.path.join(out, "show", f"{key}.png"), topk=topk)
                for key in photos]
    seconds = time.perf_counter() - t0
    logger.info("demo: built %d samples in %.1f s, wrote %d pictures, %.1f s in all", len(photos),
                build_seconds, len(pictures), seconds)
    crops = collage_crops(shards, photos[COLLAGE].info["split_x"])
    return DemoResult(out=out, shards=shards, pictures=pictures, verify_summary=report.summary(),
                      collage_crops=crops,
                      build_seconds=build_seconds, seconds=seconds)

"""The ``relabel-shards`` command line: a click group whose commands map options onto library calls.

Each command parses its options, calls one library function with the same argument names, and turns the
library's errors (``ValueError``, ``FileNotFoundError``, ...) into a one-line ``click.ClickException``.
Library modules are imported inside the commands so that ``relabel-shards --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps

import click

from relabel_shards import __version__
from relabel_shards.images import DEFAULT_MAX_IMAGE_PIXELS

# Library errors a user can act on: shown as one line, exit code 1, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, ImportError,
                                                 RuntimeError, OSError)


def user_errors(fn: Callable) -> Callable:
    """Run a command body, turning the library's user-facing errors into ``click.ClickException``."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from e

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="relabel-shards")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """ReLabel-style localized soft targets, stored beside the JPEGs in WebDataset shards.

    New here? `relabel-shards demo out/` builds shards from real photos on the CPU and draws their label
    maps. Every command's options: `relabel-shards COMMAND --help`, or docs/CLI.md.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if verbose:  # also where logging was configured before (basicConfig then does nothing)
        logging.getLogger().setLevel(max(level, logging.DEBUG))


class _ProgressBar:
    """A tqdm bar (images/s, ETA) fed by a library ``progress(done, total)`` callback; closed on exit.

    The bar closes as soon as ``done`` reaches ``total``, so its rate is that of the images, not of the
    ``_info.json`` written after them. ``callback`` is None when the bar is off (``--no-progress``).
    """

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.bar = desc, None
        self.callback = self._update if enabled else None

    def _update(self, done: int, total: int | None) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=self.desc, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if total is not None and done >= total:
            self.bar.close()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _echo_summary(summary, out: str) -> None:
    """What a build or convert rank did, and what ``_info.json`` now says (if this rank wrote it)."""
    click.echo(f"rank {summary.rank}/{summary.world_size}: wrote {len(summary.written)} shards "
               f"({summary.images} images, {len(summary.failures)} skipped), kept {len(summary.skipped)} "
               "complete shards")
    if summary.info is not None:
        info = summary.info
        click.echo(f"{out}: {len(info['filenames'])} shards, {info['num_samples']} samples, "
                   f"{info['relabel_shards']['num_failures']} failures listed in _info.json")
    else:
        click.echo("_info.json is left to the rank that finishes last")
    if summary.failures:
        from relabel_shards.plan import summarize_failures

        click.echo("skipped inputs by kind (all are listed in _info.json's failures):")
        for line in summarize_failures(summary.failures):
            click.echo(f"  {line}")


# ---- build / demo (issue 3) -------------------------------------------------------------------------


@cli.command()
@click.argument("source", nargs=-1, required=True)
@click.argument("out")
@click.option("--model", default=None, help="timm model name [default: the embedded EfficientNet-Lite0].")
@click.option("--pretrained", is_flag=True, help="Load timm's pretrained weights for --model (hub or cache).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="State-dict file for --model.")
@click.option("--topk", type=int, default=5, help="Classes kept per map position (k).")
@click.option("--input-size", type=int, default=None, help="Input pixels [default: the model's own].")
@click.option("--keep-aspect", is_flag=True,
              help="Keep each image's aspect ratio (short side to --input-size).")
@click.option("--encoding", type=click.Choice(["compact", "lossless"]), default="compact",
              help="Label-map record encoding.")
@click.option("--shard-size", type=int, default=1000, help="Samples per shard (input shards keep theirs).")
@click.option("--prefix", default=None, help="Shard name prefix [default: the split name].")
@click.option("--split", default="train", help="Split name in _info.json.")
@click.option("--batch-size", type=int, default=64, help="Images per annotator call.")
@click.option("--num-workers", type=int, default=4, help="DataLoader workers that decode and resize.")
@click.option("--device", default=None, help="cuda, cuda:1, cpu [default: cuda:$LOCAL_RANK, cuda, else cpu].")
@click.option("--rank", type=int, default=None, help="This rank [default: $RANK, else 0].")
@click.option("--world-size", type=int, default=None, help="Number of ranks [default: $WORLD_SIZE, else 1].")
@click.option("--strict", is_flag=True,
              help="Stop at the first bad input instead of skipping and listing it.")
@click.option("--seed", type=int, default=0, help="Seed for random-weight models (tests).")
@click.option("--name", default=None, help="Dataset name in _info.json [default: OUT's last component].")
@click.option("--resume-check", type=click.Choice(["sha256", "size"]), default="sha256",
              help="How complete shards are checked before a rerun skips them.")
@click.option("--labels-only", is_flag=True,
              help="Write label shards (key.rlm only, no image) that pair with SOURCE's image shards "
                   "one to one, instead of full shards.")
@click.option("--shuffle-seed", type=click.IntRange(min=0), default=0,
              help="Seed of the global permutation a folder's or list's images are written in (every shard "
                   "then holds a fair sample of the classes).")
@click.option("--no-shuffle", "no_shuffle", is_flag=True,
              help="Write a folder or list in source order (class-sorted shards: batches of few classes). "
                   "Input shards always keep their order.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar (images/s, ETA).")
@click.option("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
              help="Images with more pixels are failures naming the file (0: no limit).")
@click.option("--key-from", type=click.Choice(["stem", "path"]), default="stem",
              help="Sample keys from the file name, or from the relative path ('cls/image_0001.jpg' -> "
                   "'cls_image_0001') where names repeat across classes.")
@user_errors
def build(source: tuple[str, ...], out: str, progress: bool, **kwargs) -> None:
    """Annotate SOURCE's images with a timm classifier and write label-map shards to OUT.

    SOURCE is an ImageFolder directory, a 'path<TAB>label' list file, or WebDataset shards (paths, brace
    patterns such as 'in-{000000..000009}.tar', or URLs). OUT is a directory or an s3:// / gs:// prefix.
    Rerunning the same command resumes: complete shards are kept. Under torchrun each rank writes its shards.
    """
    from relabel_shards.build import build_shards

    if kwargs["model"] is not None and not kwargs["pretrained"] and kwargs["checkpoint"] is None:
        click.echo(f"warning: --model {kwargs['model']} without --pretrained or --checkpoint has random "
                   "weights: its label maps mean nothing (tests only)", err=True)
    src: str | list[str] = source[0] if len(source) == 1 else list(source)
    kwargs["shuffle"] = not kwargs.pop("no_shuffle")
    with _ProgressBar("build", progress) as bar:
        summary = build_shards(src, out, progress=bar.callback, **kwargs)
    _echo_summary(summary, out)


@cli.command("demo")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--input-size", default=320, type=click.IntRange(min=32),
              help="Annotator short side in pixels (aspect kept).")
@click.option("--topk", default=5, type=click.IntRange(min=1), help="Classes per map cell and per picture.")
@click.option("--device", default="cpu", help="Where the annotator runs.")
@user_errors
def demo_command(out: str, input_size: int, topk: int, device: str) -> None:
    """Build label-map shards from real photos on the CPU and draw them into OUT (under a minute).

    Uses scikit-image's bundled photos and a chelsea | coffee collage, the embedded EfficientNet-Lite0
    annotator, and writes OUT/photos, OUT/shards and OUT/show/*.png.
    """
    import os

    from relabel_shards.demo import run_demo

    click.echo("relabel-shards demo: real photos -> label-map shards -> pictures "
               f"(embedded EfficientNet-Lite0 on {device}, input {input_size} px, top-{topk})")
    r = run_demo(out, device=device, input_size=input_size, topk=topk)
    click.echo(f"built {len(r.pictures)} samples in {r.build_seconds:.1f} s (model load included): "
               f"{r.shards}{os.sep}train-000000.tar + _info.json")
    click.echo(r.verify_summary)
    click.echo("pictures (top classes over the whole image; the heat shows where each class is):")
    width = max(len(p.path) for p in r.pictures)
    for p in r.pictures:
        top = ", ".join(f"{name} {prob:.1%}" for _, name, prob in p.classes[:3])
        click.echo(f"  {p.path:{width}s}  {top}")
    collage = r.pictures[0].path
    click.echo(f"\nLook at {collage} first: one image, two photos. The soft targets LabelPooling "
               "gives a crop")
    click.echo("of each half (what a training crop there would learn), instead of one label for the whole:")
    for which, box, top in r.collage_crops:
        click.echo(f"  {which:15s} box ({', '.join(f'{v:.2f}' for v in box)}): "
                   + ", ".join(f"{name} {prob:.1%}" for _, name, prob in top))
    click.echo(f"\nNext: relabel-shards info {r.shards}   |   relabel-shards show {r.shards} --key rocket "
               f"-o rocket.png   (done in {r.seconds:.0f} s)")


# ---- info / verify / show (issue 3) -----------------------------------------------------------------


@cli.command("info")
@click.argument("url")
@click.option("--split", default=None, help="Only this split (default: all).")
@click.option("--shards", "max_shards", default=4, type=click.IntRange(min=0),
              help="Shards listed by name per split.")
@click.option("--json", "as_json", is_flag=True, help="Print _info.json itself instead of the summary.")
@user_errors
def info_command(url: str, split: str | None, max_shards: int, as_json: bool) -> None:
    """What a dataset's _info.json says: splits, samples, shards, annotator, k/h/w/C, failures, sizes.

    URL is the dataset directory or URL prefix (local, s3://, gs://, http(s)://), or one shard (.tar).
    Warns when the shards are class-sorted (batches of few classes).
    """
    if as_json:
        import json

        from relabel_shards.shards import read_info

        click.echo(json.dumps(read_info(url), indent=1, sort_keys=True))
        return
    from relabel_shards.describe import describe

    click.echo(describe(url, split=split, max_shards=max_shards))


@cli.command("verify")
@click.argument("url")
@click.option("--split", default=None, help="The split to check (default: the only one).")
@click.option("--max-problems", default=50, type=click.IntRange(min=1),
              help="Problems listed (all are counted).")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
@click.option("--images", default=None,
              help="For label shards: the image shards they pair with (folder or URL prefix); each record's "
                   "image binding is checked against its image (length, sha256, width and height).")
@user_errors
def verify_command(url: str, split: str | None, max_problems: int, progress: bool,
                   images: str | None) -> None:
    """Read every shard and check it against _info.json; exit 1 and list what is wrong.

    Checks each sample's members (image, .cls, .json, .rlm; adjacent; unique keys without dots), that every
    label map decodes with one k/h/w/C, and the sample counts, byte sizes and sha256 in _info.json. URL is the
    dataset directory or URL prefix, or one shard (.tar). A split without samples fails; class-sorted shards
    get a warning.
    """
    from tqdm import tqdm

    from relabel_shards.describe import is_shard_url, shard_split
    from relabel_shards.shards import get_split, read_info
    from relabel_shards.verify import verify_shards

    s = (shard_split(url, split)[2] or {}) if is_shard_url(url) else get_split(read_info(url), split, url)
    total = sum(r.get("bytes", 0) for r in (s.get("relabel_shards") or {}).get("shards", []))
    with tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
              disable=not progress, file=sys.stderr) as bar:
        report = verify_shards(url, split=split, max_problems=max_problems, progress=bar.update,
                               images=images)
    for problem in report.problems:
        click.echo(problem)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not report.ok:
        raise click.ClickException(report.summary())
    click.echo(report.summary())


@cli.command("show")
@click.argument("url")
@click.option("--key", default=None, help="The sample's key (e.g. n01440764_10026) [default: the first one].")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="The image to write; its suffix picks the format (.png, .jpg, .webp).")
@click.option("--topk", default=5, type=click.IntRange(min=1), help="Classes drawn.")
@click.option("--split", default=None, help="The split to search (default: the only one).")
@click.option("--shard", default=None, help="Search only this shard file (faster on large datasets).")
@click.option("--panel-size", default=320, type=click.IntRange(min=16), help="Panel image size in pixels.")
@click.option("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
              help="A larger image is an error (0: no limit).")
@click.option("--images", default=None,
              help="For label shards: the image shards they pair with (folder or URL prefix).")
@user_errors
def show_command(url: str, key: str | None, out: str, topk: int, split: str | None, shard: str | None,
                 panel_size: int, max_image_pixels: int, images: str | None) -> None:
    """Draw a sample: the image, then a heatmap of each of its top classes over it, each named."""
    from relabel_shards.show import SampleNotFoundError, show_sample

    try:
        result = show_sample(url, key, out, topk=topk, split=split, shard=shard, panel_size=panel_size,
                             max_image_pixels=max_image_pixels, images=images)
    except SampleNotFoundError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {result.path} ({result.size[0]}x{result.size[1]}): {result.key} from {result.shard}")
    for c, name, p in result.classes:
        click.echo(f"  {p:7.2%}  {name} (#{c})")

# ---- convert (issue 6) ------------------------------------------------------------------------------


@cli.command("convert")
@click.argument("images")
@click.argument("relabel_root")
@click.argument("out")
@click.option("--layout", type=click.Choice(["hw", "wh"]), default="hw",
              help="hw: keep each map's last two dims as (rows, cols), pool with swap_xy=True to reproduce "
                   "the official targets; wh: transpose them, pool with swap_xy=False.")
@click.option("--encoding", type=click.Choice(["compact", "lossless"]), default="compact",
              help="Label-map record encoding.")
@click.option("--shard-size", type=int, default=1000, help="Samples per shard.")
@click.option("--prefix", default=None, help="Shard name prefix [default: the split name].")
@click.option("--split", default="train", help="Split name in _info.json.")
@click.option("--num-workers", type=int, default=4, help="Worker processes that read, check and encode.")
@click.option("--rank", type=int, default=None, help="This rank [default: $RANK, else 0].")
@click.option("--world-size", type=int, default=None, help="Number of ranks [default: $WORLD_SIZE, else 1].")
@click.option("--strict", is_flag=True, help="Stop at the first bad or unpaired file instead of skipping and "
                                             "listing it.")
@click.option("--check-images/--no-check-images", default=True,
              help="Decode every image (JPEGs at 1/8 scale) to catch broken files; off: read headers only.")
@click.option("--labels-only", is_flag=True,
              help="IMAGES are image shards: write label shards aligned to them (key.rlm only), not full "
                   "shards (--shard-size, --check-images and shuffling do not apply).")
@click.option("--match-by", default="key",
              help="With --labels-only: find a sample's map by its key ('key', the ImageNet file stem) or by "
                   "the file name in a .json field ('json:FIELD', e.g. json:filename).")
@click.option("--name", default=None, help="Dataset name in _info.json [default: OUT's last component].")
@click.option("--shuffle-seed", type=click.IntRange(min=0), default=0,
              help="Seed of the global permutation the images are written in (every shard then holds a fair "
                   "sample of the classes).")
@click.option("--no-shuffle", "no_shuffle", is_flag=True,
              help="Write the images in path order (class-sorted shards: batches of few classes).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar (images/s, ETA).")
@user_errors
def convert(images: str, relabel_root: str, out: str, progress: bool, **kwargs) -> None:
    """Import the official ReLabel release: IMAGES' JPEGs with RELABEL_ROOT's .pt maps, as shards in OUT.

    IMAGES is the ImageNet train folder (class/image.JPEG), RELABEL_ROOT the extracted relabel_imagenet.tar
    (class/image.pt), paired by relative path. OUT is a directory or an s3:// / gs:// prefix. Bad or unpaired
    files are listed in _info.json. Rerunning the same command resumes; --rank/--world-size split the work
    over CPU processes. Check the orientation with 'relabel-shards show OUT --key KEY -o x.png'.
    """
    from relabel_shards.convert import convert_official, convert_official_labels

    labels_only, match_by = kwargs.pop("labels_only"), kwargs.pop("match_by")
    kwargs["shuffle"] = not kwargs.pop("no_shuffle")
    with _ProgressBar("convert", progress) as bar:
        if labels_only:
            for unused in ("shard_size", "check_images", "shuffle", "shuffle_seed"):  # image shards' order
                kwargs.pop(unused)
            summary = convert_official_labels(images, relabel_root, out, match_by=match_by,
                                              progress=bar.callback, **kwargs)
        else:
            summary = convert_official(images, relabel_root, out, progress=bar.callback, **kwargs)
    _echo_summary(summary, out)
    layout = kwargs["layout"]
    click.echo(f"layout {layout}: label_pooling(..., swap_xy={layout == 'hw'}) reproduces the official "
               "targets")


# ---- join / publish: label shards beside image shards (issue 9) --------------------------------------


@cli.command("join")
@click.argument("labels")
@click.argument("images", nargs=-1, required=True)
@click.argument("out")
@click.option("--labels-only", is_flag=True,
              help="Write label shards aligned one to one with IMAGES (image shards) instead of full shards.")
@click.option("--shard-size", type=int, default=1000, help="Samples per shard for an image folder.")
@click.option("--prefix", default=None, help="Shard name prefix [default: the split name].")
@click.option("--split", default="train", help="Split name in OUT's _info.json.")
@click.option("--labels-split", default=None, help="The label set's split [default: its only one].")
@click.option("--num-workers", type=int, default=4, help="Worker processes that read images and records.")
@click.option("--rank", type=int, default=None, help="This rank [default: $RANK, else 0].")
@click.option("--world-size", type=int, default=None, help="Number of ranks [default: $WORLD_SIZE, else 1].")
@click.option("--strict", is_flag=True,
              help="An image without a label or a label without an image is an error, not a listed failure.")
@click.option("--name", default=None, help="Dataset name in _info.json [default: OUT's last component].")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar (images/s, ETA).")
@user_errors
def join_command(labels: str, images: tuple[str, ...], out: str, progress: bool, **kwargs) -> None:
    """Pair the label set LABELS with IMAGES by sample key and write shards to OUT.

    LABELS is label shards or full shards with _info.json. IMAGES is image shards (paths, brace patterns,
    URLs) or an ImageFolder directory. OUT gets full shards, or with --labels-only label shards aligned to
    IMAGES. Images without a label and labels without an image are listed in _info.json.
    """
    from relabel_shards.join import join_labels

    src: str | list[str] = images[0] if len(images) == 1 else list(images)
    with _ProgressBar("join", progress) as bar:
        summary = join_labels(labels, src, out, progress=bar.callback, **kwargs)
    _echo_summary(summary, out)
    if summary.info is not None:
        proj = summary.info["relabel_shards"]
        click.echo(f"{proj['images_without_label']} images without a label, "
                   f"{proj['labels_without_image']['count']} labels without an image, "
                   f"{proj['rebound']} records bound to another copy of their image")


@cli.command("publish")
@click.argument("dataset")
@click.argument("dest")
@click.option("--images", default=None,
              help="The image shards a label set pairs with (folder or URL prefix), for the preview picture.")
@click.option("--preview/--no-preview", default=True, help="Draw preview.png when images are at hand.")
@click.option("--license", "license", default=None,
              help="The card's license id [default: ImageNet's terms for 1000-class maps, else 'other'].")
@click.option("--title", default=None, help="The card's title [default: the dataset name in _info.json].")
@click.option("--progress/--no-progress", default=True, help="A progress bar (bytes read) on stderr.")
@user_errors
def publish_command(dataset: str, dest: str, progress: bool, **kwargs) -> None:
    """Copy DATASET's shards to DEST as a release: _info.json, a dataset card README.md, SHA256SUMS.

    DEST is a folder, an s3:// or gs:// prefix, or hf://datasets/ORG/NAME (needs the 'hf' extra and a Hub
    login). Files already at DEST with the same size and sha256 are kept, so a rerun resumes.
    """
    from tqdm import tqdm

    from relabel_shards.publish import publish

    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="publish", disable=not progress,
              file=sys.stderr) as bar:
        summary = publish(dataset, dest, progress=lambda name, n: bar.update(n), **kwargs)
    total = sum(b for b, _ in summary.files.values())
    click.echo(f"{dest}: {len(summary.files) + 1} files ({total:,} bytes); wrote {len(summary.uploaded)}, "
               f"kept {len(summary.kept)} already there. Check a download with: sha256sum -c SHA256SUMS")


# ---- pool: a short LabelPooling demo (issue 2) ------------------------------------------------------


@cli.command("pool")
@click.option("--batch", default=4, help="Images (and crop boxes) in the batch.")
@click.option("--num-classes", default=1000, help="Classes C.")
@click.option("--k", "k", default=5, help="Top-k classes per map cell.")
@click.option("--size", default=15, help="The label map is size x size cells.")
@click.option("--swap-xy", is_flag=True,
              help="The official code's box order (the crop mirrored across the diagonal).")
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto",
              help="LabelPooling implementation: auto takes Triton for CUDA tensors, the PyTorch "
                   "path otherwise.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Where the pooling runs.")
@click.option("--seed", default=0, help="Seeds the synthetic maps and the random boxes.")
@click.option("--top", default=3, help="Classes printed per box.")
@user_errors
def pool(batch: int, num_classes: int, k: int, size: int, swap_xy: bool, backend: str, device: str, seed: int,
         top: int) -> None:
    """Pool synthetic label maps (two objects per image: left half, right half) for a few crop boxes.

    Prints each box's top classes and the time of one label_pooling call. The first three boxes are the left
    half, the right half and the whole image; with --swap-xy the halves come out as top and bottom halves.
    """
    from relabel_shards.pooling.demo import pool_demo

    r = pool_demo(batch, num_classes, k, size, swap_xy=swap_xy, backend=backend, device=device, seed=seed)
    probs, classes = r.targets.topk(min(top, num_classes), dim=1)
    for box, p, c in zip(r.boxes.tolist(), probs.tolist(), classes.tolist(), strict=True):
        shown = ", ".join(f"class {ci} {pi:.3f}" for ci, pi in zip(c, p, strict=True))
        click.echo(f"box ({box[0]:.2f}, {box[1]:.2f}, {box[2]:.2f}, {box[3]:.2f}): {shown}")
    dense_mib = batch * num_classes * size * size * 4 / 2**20
    click.echo(f"label_pooling ({r.backend}, {r.device}): {r.seconds * 1e3:.3f} ms for {batch} boxes, "
               f"k={k}, {size}x{size}, C={num_classes}; no dense map "
               f"(the official path builds {dense_mib:.1f} MiB)")


# ---- -v after the subcommand (issue 12) ------------------------------------------------------------------


def _verbosity(ctx: click.Context, _param: click.Parameter, count: int) -> None:
    """``relabel-shards build -v ...`` counts like ``relabel-shards -v build ...`` (the two add up)."""
    if count:
        group = ctx.find_root().params.get("verbose") or 0
        logging.getLogger().setLevel(max(logging.WARNING - 10 * (group + count), logging.DEBUG))


for _command in cli.commands.values():  # every command registered above takes -v too
    _command.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False, is_eager=True,
                                        callback=_verbosity, help="More log output (-v info, -vv debug)."))


def main() -> None:
    cli(prog_name="relabel-shards")


if __name__ == "__main__":
    main()

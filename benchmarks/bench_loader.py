"""Input pipeline throughput: ReLabel shards + label_pooling against a plain pipeline and the official one.

On the same images (crops of scikit-image's real photos, ImageNet-like sizes, JPEG q90) at the same number of
DataLoader workers, batch size and output size, in one run:

(a) plain: the same shards without label maps, read the same way (sequential tar streaming), the same
    decode + RandomResizedCrop (draft mode) + flip, labels only;
(b) ``make_loader`` + ``label_pooling`` targets for every batch (k=5, 15x15, C=1000 maps in the shards);
(b') (b) without draft mode: what PIL's reduced-size JPEG decoding gains;
(c) the official pipeline (naver-ai/relabel_imagenet): ``ImageFolder`` + one float32 ``[2, 5, 15, 15]``
    ``torch.save`` file per image loaded in ``__getitem__`` (here with ``weights_only=True``), torchvision's
    RandomResizedCrop on the full decode, then per batch the dense ``[B, 1000, 15, 15]`` scatter,
    ``roi_align`` and softmax (``relabel_shards/pooling/official.py``);
(b-s3) (b) reading the shards from an S3 API server (moto) on loopback;
(j) a join: (a)'s image shards + label shards holding the same records (``make_loader(images, labels=...)``,
    each image shard read with its label shard in lockstep), against (b) full shards (goal >= 0.97x);
(j-s3) (j) from the S3 API server, against (b-s3).

Images/s is the steady rate of one full pass after its first batch (worker start-up and the shuffle-buffer
fill excluded; the pass time with them is shown too), median over repeats; the configurations run
interleaved, in an order rotated every round, so drifting machine load hits all alike. Goals (issue 4): (b) >=
97 % of (a); (b) >= 1.3x (c). Also a per-image decode micro-benchmark of draft mode on larger JPEGs.

    python benchmarks/bench_loader.py                        # about 2 minutes on 2 busy cores
    python benchmarks/bench_loader.py --images 2048 --workers 8 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_header, print_table, write_json  # noqa: E402

from relabel_shards.decode import CropConfig, decode_image  # noqa: E402
from relabel_shards.labelmap import encode_label_map  # noqa: E402
from relabel_shards.loader import make_loader  # noqa: E402
from relabel_shards.order import derive_seed  # noqa: E402
from relabel_shards.pairing import key_digest  # noqa: E402
from relabel_shards.pooling import label_pooling  # noqa: E402
from relabel_shards.pooling.official import get_labelmaps, get_relabel  # noqa: E402
from relabel_shards.shards import make_split_info, sample_members, shard_name, write_info, write_shard  # noqa: E402
from relabel_shards.tarstream import RetryingReader, fsspec_opener, iter_tar_samples  # noqa: E402

K, H, W, C = 5, 15, 15, 1000


# ----------------------------------------------------------------------------------------------- data


def _photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "cat"):
        img = getattr(data, name)()
        out.append(np.ascontiguousarray(img[..., :3]))
    return out


def make_images(n: int, seed: int, sizes: tuple[int, int]) -> list[tuple[str, int, bytes]]:
    """n JPEGs (key, class, bytes): random crops of real photos, resized to a short side in ``sizes``."""
    rng = random.Random(seed)
    photos = _photos()
    out = []
    for i in range(n):
        src = Image.fromarray(photos[i % len(photos)])
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        short = rng.randint(*sizes)
        aspect = rng.choice([4 / 3, 3 / 4, 1.0, 3 / 2])
        size = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append((f"n{i % 10:08d}_{i}", i % 10, buf.getvalue()))
    return out


def make_map(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-5 of a 24-class palette per image (like real annotator maps), logits sorted per cell."""
    rng = np.random.default_rng(i)
    palette = rng.choice(C, size=24, replace=False)
    idx = np.stack([rng.permutation(palette)[:K] for _ in range(H * W)], axis=1).reshape(K, H, W)
    values = -np.sort(-rng.normal(2.0, 2.0, size=(K, H, W)), axis=0).astype(np.float32)
    return values, idx.astype(np.int64)


def write_datasets(root: Path, images, per_shard: int) -> dict[str, str]:
    """The same images as (a) plain shards, (b) label-map shards, (c) an ImageFolder + .pt files."""
    paths = {"plain": str(root / "plain"), "relabel": str(root / "relabel"), "folder": str(root / "folder"),
             "pt": str(root / "pt"), "labels": str(root / "labels")}
    plain, relabel, labels, digests = [], [], [], []
    for j in range(0, len(images), per_shard):
        chunk = images[j:j + per_shard]
        p_samples, r_samples = [], []
        for key, label, jpeg in chunk:
            i = int(key.rsplit("_", 1)[1])
            values, indices = make_map(i)
            w, h = Image.open(io.BytesIO(jpeg)).size
            members = sample_members(key, image=jpeg, image_ext="jpg", label=label,
                                     meta={"width": w, "height": h},
                                     labelmap=encode_label_map(values, indices, C))
            r_samples.append(members)
            p_samples.append([m for m in members if not m[0].endswith(".rlm")])
            cls_dir = Path(paths["folder"]) / f"n{label:08d}"
            pt_dir = Path(paths["pt"]) / f"n{label:08d}"
            cls_dir.mkdir(parents=True, exist_ok=True)
            pt_dir.mkdir(parents=True, exist_ok=True)
            (cls_dir / f"{key}.JPEG").write_bytes(jpeg)
            # the release's record: [2, 5, 15, 15] float32, class indices as floats
            record = torch.stack([torch.from_numpy(values), torch.from_numpy(indices).float()])
            torch.save(record, pt_dir / f"{key}.pt")
        name = shard_name("train", j // per_shard)
        plain.append(write_shard(paths["plain"], name, p_samples))
        relabel.append(write_shard(paths["relabel"], name, r_samples))
        labels.append(write_shard(paths["labels"], name, [[m for m in s if m[0].endswith(".rlm")]
                                                            for s in r_samples]))
        digests.append(key_digest(key for key, _, _ in chunk))
    write_info(paths["plain"], make_split_info("train", plain, {}))
    write_info(paths["relabel"], make_split_info("train", relabel, {"k": K, "height": H, "width": W,
                                                                     "num_classes": C}))
    pairs = {"filenames": [r.filename for r in plain], "shard_lengths": [r.num_samples for r in plain],
             "key_digests": digests}
    write_info(paths["labels"], make_split_info("train", labels, {"kind": "labels", "k": K, "height": H,
                                                                  "width": W, "num_classes": C,
                                                                  "pairs_with": pairs}))
    return paths


# ------------------------------------------------------------------------------------------ pipelines


class PlainShards(IterableDataset):
    """(a): shards split over workers, streamed, decoded and cropped as the loader does; labels only."""

    def __init__(self, root: str, image_size: int, seed: int):
        from relabel_shards.shardlist import resolve_shards

        self.shards = [u for u, _ in resolve_shards(root)[0]]
        self.crop = CropConfig(image_size=image_size)
        self.seed = seed

    def __iter__(self):
        info = get_worker_info()
        wid, n = (0, 1) if info is None else (info.id, info.num_workers)
        for url in self.shards[wid::n]:
            reader = RetryingReader(fsspec_opener(url), url)
            for key, members in iter_tar_samples(reader, url):
                rng = random.Random(derive_seed("crop", self.seed, key))
                img, _, _, _ = decode_image(members["jpg"], self.crop, rng)
                yield img, int(members["cls"])


# PIL hands decode_image read-only arrays; default_collate only reads them (stacks into a new batch).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _plain_collate(items):
    # torch's default_collate: in a worker it stacks straight into shared memory, one copy per batch, as the
    # loader's own collate does; a baseline with avoidable copies would flatter (b).
    return default_collate([(torch.from_numpy(img).permute(2, 0, 1), y) for img, y in items])


class OfficialFolder:
    """(c): the official ``ImageFolderWithCoordsAndLabelMap`` + ``RandomResizedCropWithCoords`` + flip."""

    def __init__(self, folder: str, pt_root: str, image_size: int):
        import torchvision

        self.inner = torchvision.datasets.ImageFolder(folder)
        self.pt_root = pt_root
        self.rrc = torchvision.transforms.RandomResizedCrop(image_size)
        self.flip = torchvision.transforms.RandomHorizontalFlip()
        self.to_tensor = torchvision.transforms.PILToTensor()  # uint8, like (a) and (b); normalize on the GPU

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        from torchvision.transforms import functional as tf

        path, target = self.inner.samples[index]
        score_path = os.path.join(self.pt_root, "/".join(path.split("/")[-2:]).split(".")[0] + ".pt")
        img = self.inner.loader(path)
        i, j, h, w = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
        coords = (i / img.size[1], j / img.size[0], h / img.size[1], w / img.size[0])
        img = tf.resized_crop(img, i, j, h, w, self.rrc.size, self.rrc.interpolation)
        img = self.to_tensor(self.flip(img))
        score_maps = torch.load(score_path, weights_only=True)  # the original: torch.load(score_path)
        return img, target, coords, score_maps


# Each pipeline is a generator of batch sizes: the timer sees every batch as the training loop would.


def run_plain(root, args):
    loader = DataLoader(PlainShards(root, args.image_size, args.seed), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=_plain_collate)
    for images, _ in loader:
        yield images.shape[0]


def run_relabel(root, args, draft=True, storage_options=None, labels=None):
    loader = make_loader(root, args.batch_size, args.workers, image_size=args.image_size, seed=args.seed,
                         draft=draft, storage_options=storage_options, labels=labels)
    for batch in loader:
        target = label_pooling(batch["values"], batch["indices"], batch["boxes"], C)
        assert target.shape == (batch["images"].shape[0], C)
        yield batch["images"].shape[0]


def run_official(paths, args):
    ds = OfficialFolder(paths["folder"], paths["pt"], args.image_size)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    for images, _, coords, maps in loader:
        b = images.shape[0]
        # the official relabel_batch_fn: coords -> (y1, x1, y2, x2), dense map, roi_align, softmax
        coords = torch.cat(coords, 0).view(4, -1).transpose(1, 0)
        coords[:, 2:] += coords[:, :2]
        dense = get_labelmaps(maps, b, C, device="cpu")
        target = get_relabel(dense, coords.float(), b)
        assert target.shape == (b, C)
        yield b


def _cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (the DataLoader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(batches) -> dict[str, float]:
    """One pass: wall seconds (start-up included), steady images/s after the first batch, CPU ms per image.

    CPU time (main process + workers) is what the pipeline costs whatever else runs on the machine; on a
    shared machine it is the steadier figure: W saturated free cores give about ``W * 1000 / cpu_ms``
    images/s.
    """
    c0, t0 = _cpu_s(), time.perf_counter()
    n = n_first = 0
    t_first = None
    for b in batches:
        n += b
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
    t1 = time.perf_counter()
    return {"images": n, "total_s": t1 - t0, "steady_ips": (n - n_first) / (t1 - t_first),
            "cpu_ms": 1e3 * (_cpu_s() - c0) / n}


# ------------------------------------------------------------------------------------------------- S3


def start_s3(paths: dict[str, str]) -> tuple[subprocess.Popen, dict[str, str], dict]:
    """A moto S3 server in its own process (not sharing this process's GIL); upload the shard sets."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"client_kwargs": {"endpoint_url": endpoint}}
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("bench")
    urls = {}
    for name in ("relabel", "plain", "labels"):
        fs.put(paths[name].rstrip("/") + "/", f"bench/{name}/", recursive=True)
        urls[name] = f"s3://bench/{name}"
    return proc, urls, opts


def draft_micro(args) -> list[dict]:
    """Per-image decode + crop CPU time with and without draft mode (best of 5 per image, median over images).

    At a 384 px short side a 224 px crop is never downscaled 2x, so draft mode cannot engage there: that row
    shows the noise floor of the measurement.
    """
    rows = []
    for short in (384, 768):
        imgs = make_images(24, args.seed + short, (short, short))
        for draft in (False, True):
            cfg = CropConfig(image_size=args.image_size, draft=draft)
            times = []
            for key, _, jpeg in imgs:
                best = float("inf")
                for _ in range(5):  # the same crop 5 times; the fastest is the least disturbed by neighbours
                    t0 = time.process_time()  # CPU time: steadier on a shared machine
                    decode_image(jpeg, cfg, random.Random(derive_seed("crop", key)))
                    best = min(best, time.process_time() - t0)
                times.append(best)
            rows.append({"short_side": short, "draft": draft, "ms_per_image": 1e3 * float(np.median(times))})
    for r in rows:
        base = next(x for x in rows if x["short_side"] == r["short_side"] and not x["draft"])
        r["speedup"] = base["ms_per_image"] / r["ms_per_image"]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--short-side", type=int, nargs=2, default=(330, 500),
                   help="range of the images' short side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--main-threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_loader.json"))
    args = p.parse_args(argv)

    # The main process only collates and pools (on the GPU in training); the cores belong to the workers.
    # Two intra-op threads in the main process fight the workers for the cores (label_pooling at B=32 went
    # from 2.5 ms to 50 ms per batch here), for every pipeline alike.
    torch.set_num_threads(args.main_threads)
    info = machine_info()
    print_header("bench_loader: (a) plain shards, (b) ReLabel shards + label_pooling, (c) official pipeline",
                 info)
    print(f"# {args.images} images, short side {args.short_side[0]}-{args.short_side[1]} px, JPEG q90, "
          f"{args.per_shard}/shard, {args.workers} workers, batch {args.batch_size}, "
          f"output {args.image_size} px, "
          f"maps k={K} {H}x{W} C={C}, {args.repeats} repeats (interleaved)")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        images = make_images(args.images, args.seed, tuple(args.short_side))
        paths = write_datasets(Path(tmp), images, args.per_shard)
        sizes = {"jpeg": float(np.mean([len(j) for _, _, j in images])),
                 "pt": float(np.mean([f.stat().st_size for f in Path(paths["pt"]).rglob("*.pt")])),
                 "shard_plain": sum(f.stat().st_size for f in Path(paths["plain"]).glob("*.tar")),
                 "shard_relabel": sum(f.stat().st_size for f in Path(paths["relabel"]).glob("*.tar"))}
        configs = {
            "(a) plain shards, labels only": lambda: run_plain(paths["plain"], args),
            "(b) ReLabel shards + label_pooling": lambda: run_relabel(paths["relabel"], args),
            "(b') (b) without draft mode": lambda: run_relabel(paths["relabel"], args, draft=False),
            "(j) image shards + label shards (join)": lambda: run_relabel(paths["plain"], args,
                                                                          labels=paths["labels"]),
            "(c) official ImageFolder + .pt + dense": lambda: run_official(paths, args),
        }
        proc = None
        if not args.no_s3:
            proc, s3_urls, s3_opts = start_s3(paths)
            configs["(b-s3) (b) from S3 on loopback"] = lambda: run_relabel(s3_urls["relabel"], args,
                                                                            storage_options=s3_opts)
            configs["(j-s3) (j) from S3 on loopback"] = lambda: run_relabel(s3_urls["plain"], args,
                                                                            storage_options=s3_opts,
                                                                            labels=s3_urls["labels"])
        runs: dict[str, list[dict]] = {k: [] for k in configs}
        try:
            names = list(configs)
            for rep in range(args.repeats + 1):  # the first round warms caches and is not counted
                # rotate the order every round, so no pipeline always runs right after the same other one
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    m = measure(configs[name]())
                    if rep:
                        runs[name].append(m)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    rows = []
    for name, ms in runs.items():
        ips = [m["steady_ips"] for m in ms]
        rows.append({"pipeline": name, "images": ms[0]["images"],
                     "pass_s": float(np.median([m["total_s"] for m in ms])),
                     "images_per_s": float(np.median(ips)), "min_ips": min(ips), "max_ips": max(ips),
                     "cpu_ms_per_image": float(np.median([m["cpu_ms"] for m in ms]))})
    tag = {r["pipeline"]: r["pipeline"][:r["pipeline"].index(")") + 1] for r in rows}
    ips = {tag[r["pipeline"]]: r["images_per_s"] for r in rows}
    cpu = {tag[r["pipeline"]]: r["cpu_ms_per_image"] for r in rows}
    for r in rows:
        r["vs_a"] = r["images_per_s"] / ips["(a)"]
        r["vs_c"] = r["images_per_s"] / ips["(c)"]
        r["cpu_vs_a"] = cpu["(a)"] / r["cpu_ms_per_image"]  # > 1: cheaper than (a)
        r["cpu_vs_c"] = cpu["(c)"] / r["cpu_ms_per_image"]
    print_table(rows, ["pipeline", "images", "pass_s", "images_per_s", "min_ips", "max_ips", "vs_a", "vs_c",
                       "cpu_ms_per_image", "cpu_vs_a", "cpu_vs_c"])
    goals = {"b_vs_a": ips["(b)"] / ips["(a)"], "b_vs_c": ips["(b)"] / ips["(c)"],
             "draft_gain": ips["(b)"] / ips["(b')"], "cpu_b_vs_a": cpu["(a)"] / cpu["(b)"],
             "cpu_b_vs_c": cpu["(c)"] / cpu["(b)"], "cpu_draft_gain": cpu["(b')"] / cpu["(b)"]}
    if "(b-s3)" in ips:
        goals["s3_vs_local"] = ips["(b-s3)"] / ips["(b)"]
    goals["join_vs_full"] = ips["(j)"] / ips["(b)"]
    goals["cpu_join_vs_full"] = cpu["(b)"] / cpu["(j)"]
    if "(j-s3)" in ips:
        goals["join_vs_full_s3"] = ips["(j-s3)"] / ips["(b-s3)"]
    print(f"# images/s: (b)/(a) = {goals['b_vs_a']:.3f} (goal >= 0.97); "
          f"(b)/(c) = {goals['b_vs_c']:.2f}x (goal >= 1.3); "
          f"draft mode gain in (b): {goals['draft_gain']:.2f}x"
          + (f"; S3/local = {goals['s3_vs_local']:.3f}" if "s3_vs_local" in goals else ""))
    s3 = f"; from S3 (j-s3)/(b-s3) = {goals['join_vs_full_s3']:.3f}" if "join_vs_full_s3" in goals else ""
    print(f"# join: (j)/(b) = {goals['join_vs_full']:.3f} (goal >= 0.97), CPU {goals['cpu_join_vs_full']:.3f}"
          + s3)
    print(f"# CPU per image: (b)/(a) = {goals['cpu_b_vs_a']:.3f}; (b)/(c) = {goals['cpu_b_vs_c']:.2f}x; "
          f"draft mode gain: {goals['cpu_draft_gain']:.2f}x")
    print(f"# bytes per image: JPEG {sizes['jpeg']:.0f}, official .pt {sizes['pt']:.0f}, "
          f"label-map shard overhead "
          f"{(sizes['shard_relabel'] - sizes['shard_plain']) / args.images:.0f}")
    micro = draft_micro(args)
    print("# draft mode, per-image decode + crop CPU time (best of 5, median over 24 images; at 384 px draft "
          "cannot engage):")
    print_table(micro, ["short_side", "draft", "ms_per_image", "speedup"])
    write_json(args.out, {"machine": info, "args": vars(args), "rows": rows, "goals": goals, "sizes": sizes,
                          "draft_micro": micro})


if __name__ == "__main__":
    main()

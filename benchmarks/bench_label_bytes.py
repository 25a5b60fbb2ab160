"""Bytes per sample of label shards on disk, tar overhead included, on real 5x15x15 maps.

In one run:

- image shards of real photos (scikit-image's, each whole, mirrored and cropped twice: the views of
  ``_real_maps.py``, as JPEG quality 90) with ImageNet-length keys;
- ``build --labels-only`` with the embedded EfficientNet-Lite0 at 480 px (15x15 maps, top-5, ``compact``);
- the label shard read back: each record's size, its cost in the tar (a 512-byte header plus the record
  padded to 512), the shard's own end (end-of-archive blocks, tarfile's padding to 10,240 bytes) spread over
  a 1,250-sample shard (timm/imagenet-1k-wds' shard size);
- baselines measured on the same maps: the same records without the image binding (48 bytes), and the
  official release's legacy ``torch.save`` of the float32 ``[2, 5, 15, 15]`` map;
- the same maps (their float32 originals) encoded with coarser ``compact`` steps, and as the writers encode
  them (step 0.01, or ``labelmap.TAR_FIT_STEP`` where that saves a 512-byte tar block), with the pooled-target
  error against the float32 map (``bench_labelmap.py``'s oracle and boxes; the record's bound is 2e-3).

    python benchmarks/bench_label_bytes.py           # ~1 min on 2 cores (annotator at 480 px on the CPU)
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine_info, print_header, print_table, write_json  # noqa: E402
from _real_maps import PHOTOS, _photo, _views  # noqa: E402

IMAGENET_TRAIN = 1_281_167
SHARD = 1250  # samples per shard in timm/imagenet-1k-wds
OFFICIAL_GB = 12.0  # the official release as distributed (relabel_imagenet.tar), DESIGN.md


def _pad(n: int) -> int:
    return -(-n // 512) * 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=480, help="annotator input size (15x15 maps at 480)")
    ap.add_argument("--json", default="benchmarks/results/bench_label_bytes.json")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from relabel_shards.build import build_shards
    from relabel_shards.labelmap import decode_label_map, encode_label_map, read_header
    from relabel_shards.shards import write_shard

    info = machine_info()
    print_header("label shards: bytes per sample on disk (real 5x15x15 maps)", info)
    with tempfile.TemporaryDirectory() as tmp:
        samples = []
        n = 0
        for name in PHOTOS:
            for view in _views(_photo(name)):
                buf = io.BytesIO()
                Image.fromarray(view).save(buf, format="JPEG", quality=90)
                key = f"n{n:08d}_{10000 + n}"  # ImageNet's key length (n01440764_10026)
                samples.append([(f"{key}.jpg", buf.getvalue()), (f"{key}.cls", b"0")])
                n += 1
        write_shard(tmp, "imgs-000000.tar", samples)
        build_shards(
            [f"{tmp}/imgs-000000.tar"],
            f"{tmp}/labels",
            labels_only=True,
            input_size=args.size,
            batch_size=8,
            num_workers=0,
        )
        path = Path(tmp) / "labels" / "train-000000.tar"
        total = path.stat().st_size
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        sizes = [len(d) for _, d in members]
        data_end = max(m.offset_data + _pad(m.size) for m, _ in members)
        shard_overhead = total - data_end  # end-of-archive blocks + padding to the record size
        no_binding, official = [], []
        for _, d in members:
            lm = decode_label_map(d)
            step = read_header(d).step  # the record's own (0.01, or TAR_FIT_STEP where that saved a block)
            no_binding.append(len(encode_label_map(lm.values, lm.indices, lm.num_classes, step=step)))
            t = torch.from_numpy(np.stack([lm.values.astype(np.float32), lm.indices.astype(np.float32)]))
            b = io.BytesIO()
            torch.save(t, b, _use_new_zipfile_serialization=False)
            official.append(len(b.getvalue()))
        geometry = tuple(decode_label_map(members[0][1]).values.shape)
        sweep = _step_sweep(args.size, members[0][1], shard_overhead)
    in_tar = [512 + _pad(s) for s in sizes]
    per_sample = statistics.mean(in_tar) + shard_overhead / SHARD
    within = sum(s <= 2048 for s in sizes)
    over = [s - 2048 for s in sizes if s > 2048]
    rows = [
        {
            "what": "record (compact + image binding)",
            "mean B": statistics.mean(sizes),
            "median B": statistics.median(sizes),
            "min B": min(sizes),
            "max B": max(sizes),
        },
        {
            "what": "record without the binding (same maps)",
            "mean B": statistics.mean(no_binding),
            "median B": statistics.median(no_binding),
            "min B": min(no_binding),
            "max B": max(no_binding),
        },
        {
            "what": "official .pt (legacy torch.save, float32)",
            "mean B": statistics.mean(official),
            "median B": statistics.median(official),
            "min B": min(official),
            "max B": max(official),
        },
        {
            "what": "on disk per label-shard sample (header + padded record)",
            "mean B": statistics.mean(in_tar),
            "median B": statistics.median(in_tar),
            "min B": min(in_tar),
            "max B": max(in_tar),
        },
    ]
    print(
        f"# {len(sizes)} real maps {geometry} (k, h, w) at {args.size} px; shard overhead {shard_overhead} B"
    )
    print_table(rows, ["what", "mean B", "median B", "min B", "max B"])
    hist = {f"{lo}-{lo + 255}": sum(lo <= s < lo + 256 for s in sizes) for lo in range(1536, 3072, 256)}
    print(f"# record sizes by 256-byte bin: {hist}")
    print(
        f"# records <= 2,048 B (one 2,560-byte tar slot instead of 3,072): {within} of {len(sizes)}; "
        f"those above exceed it by {statistics.mean(over) if over else 0:.0f} B on average"
    )
    print(
        f"# bytes per sample on disk with {SHARD}-sample shards: {per_sample:,.0f} (goal 3,000); "
        f"ImageNet-1k train: {per_sample * IMAGENET_TRAIN / 1e9:.2f} GB against {OFFICIAL_GB:.0f} GB official"
    )
    print(
        "# the same photos' float32 maps at coarser compact steps (pooled error: max abs over 256 boxes/map):"
    )
    print_table(sweep, ["step", "mean record B", "records <= 2,048", "bytes per sample", "pooled error"])
    write_json(
        args.json,
        {
            "step_sweep": sweep,
            "machine": info,
            "maps": len(sizes),
            "geometry": geometry,
            "input_size": args.size,
            "record_sizes": sizes,
            "record_sizes_without_binding": no_binding,
            "official_pt_sizes": official,
            "tar_bytes_per_sample": in_tar,
            "shard_overhead_bytes": shard_overhead,
            "bytes_per_sample_1250": per_sample,
            "records_within_2048": within,
            "imagenet_gb": per_sample * IMAGENET_TRAIN / 1e9,
            "histogram": hist,
        },
    )


def _step_sweep(size: int, bound_record: bytes, shard_overhead: int) -> list[dict]:
    """Record and on-disk sizes of the float32 maps at several quantization steps, with the pooled error."""
    import torch
    from _real_maps import real_label_maps
    from bench_labelmap import _boxes, _pool

    from relabel_shards.labelmap import TAR_FIT_STEP, decode_label_map, encode_label_map

    binding = decode_label_map(bound_record).image  # a binding of the right size (the bytes do not matter)
    V, IX = (t.numpy() for t in real_label_maps(size=size))
    boxes = _boxes(256)
    refs = [_pool(torch.from_numpy(V[n]), torch.from_numpy(IX[n]), boxes, 1000) for n in range(len(V))]
    rows = []
    for step in (0.01, 0.015, 0.02, 0.025, "0.01, tar_fit_step 0.02 (as written)"):
        sizes, err = [], 0.0
        for n in range(len(V)):
            if isinstance(step, str):  # what build/convert write: 0.02 only where it saves a tar block
                rec = encode_label_map(V[n], IX[n], 1000, image=binding, tar_fit_step=TAR_FIT_STEP)
            else:
                rec = encode_label_map(V[n], IX[n], 1000, step=step, image=binding)
            sizes.append(len(rec))
            lm = decode_label_map(rec)
            got = _pool(
                torch.from_numpy(lm.values.astype(np.float32)),
                torch.from_numpy(lm.indices.astype(np.int64)),
                boxes,
                1000,
            )
            err = max(err, float((got - refs[n]).abs().max()))
        rows.append(
            {
                "step": step,
                "mean record B": statistics.mean(sizes),
                "records <= 2,048": f"{sum(s <= 2048 for s in sizes)}/{len(sizes)}",
                "bytes per sample": statistics.mean(512 + _pad(s) for s in sizes) + shard_overhead / SHARD,
                "pooled error": err,
            }
        )
    return rows


if __name__ == "__main__":
    main()

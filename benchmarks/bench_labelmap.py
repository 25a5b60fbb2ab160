"""Label-map record size, speed and accuracy on real label maps, against the official release's format.

Real maps: the embedded EfficientNet-Lite0 run fully convolutionally over scikit-image's real photos at
480x480 (the whole photo, mirrored, and two crops), top-5 raw logits at each of 15x15 cells, in float32
(``_real_maps.py``). For each encoding: bytes per record (mean, max), encode and decode microseconds per
record (median over repeats of the whole set, one thread), and the pooled-target error: the max abs
difference over the C probabilities between LabelPooling of the decoded map and of the float32 map, over
random boxes (the dense oracle of DESIGN.md, in float64).

The baseline, measured in the same run: the official release's ``torch.save`` of a float32
``[2, 5, 15, 15]`` tensor (values and indices stacked), legacy and zip serialization, decoded with
``torch.load(weights_only=True)``.

Decode speed against an earlier decoder, in the same run: ``decode_label_map`` as it was at git revision
``--baseline-rev`` (loaded from ``git show``; the format is unchanged, so both decode the same records to the
same bytes, which is checked), timed interleaved with the current one over the same records: median and
minimum microseconds per record over the repeats.

    python benchmarks/bench_labelmap.py [--photos chelsea coffee ...] [--boxes 256] [--out FILE]
    python benchmarks/bench_labelmap.py --decode-only [--baseline-rev REV]   # the decode comparison alone
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import machine_info, print_header, print_table, timeit, write_json
from _real_maps import PHOTOS, real_label_maps

from relabel_shards.labelmap import DEFAULT_LEVEL, decode_label_map, encode_label_map


def _boxes(n: int, seed: int = 0) -> torch.Tensor:
    """Random-resized-crop-like boxes: area 0.3 %-100 % of the image, aspect 3/4-4/3, anywhere inside it."""
    g = torch.Generator().manual_seed(seed)
    area = torch.empty(n).uniform_(0.003, 1.0, generator=g)
    ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g).exp()
    bw, bh = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    x1, y1 = torch.rand(n, generator=g) * (1 - bw), torch.rand(n, generator=g) * (1 - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], 1)


def _pool(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets of one map for every box, (nboxes, C) float64: DESIGN.md's dense oracle written out.

    The same calls as ``reference_label_pooling`` (zeros, scatter-add, roi_align 1x1 with
    ``aligned=False``, ``sampling_ratio=-1``, boxes scaled ``x * w - 0.5``, ``y * h - 0.5``, softmax), but one
    dense map shared by all the boxes instead of one copy per box, and in float64 so that float32 rounding
    does not blur errors.
    """
    from torchvision.ops import roi_align

    k, h, w = values.shape
    dense = torch.zeros(1, num_classes, h, w, dtype=torch.float64)
    dense[0].scatter_add_(0, indices.long(), values.double())
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    rois = torch.cat([torch.zeros(len(boxes), 1, dtype=torch.float64), boxes.double() * scale - 0.5], 1)
    return (
        roi_align(dense, rois, output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=False)
        .flatten(1)
        .softmax(1)
    )


def _official_save(legacy: bool) -> tuple[Callable, Callable]:
    def enc(v: np.ndarray, i: np.ndarray, c: int) -> bytes:
        buf = io.BytesIO()
        t = torch.stack([torch.from_numpy(v), torch.from_numpy(i).float()])  # [2, k, h, w] float32
        torch.save(t, buf, _use_new_zipfile_serialization=not legacy)
        return buf.getvalue()

    def dec(b: bytes) -> tuple[np.ndarray, np.ndarray]:
        t = torch.load(io.BytesIO(b), weights_only=True)
        return t[0].numpy(), t[1].long().numpy()

    return enc, dec


def _sketch_f16_u16(level: int = 19) -> tuple[Callable, Callable]:
    """The issue's plain reference point: float16 values + uint16 indices, one zstd frame, no header."""
    import zstandard

    cz, dz = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()

    def enc(v: np.ndarray, i: np.ndarray, c: int) -> bytes:
        return cz.compress(v.astype("<f2").tobytes() + i.astype("<u2").tobytes())

    def dec(b: bytes, shape=None) -> tuple[np.ndarray, np.ndarray]:
        raw = dz.decompress(b)
        n = len(raw) // 4
        return np.frombuffer(raw[: 2 * n], "<f2").astype(np.float32), np.frombuffer(raw[2 * n :], "<u2")

    return enc, dec


def _ours(**kw) -> tuple[Callable, Callable]:
    def enc(v: np.ndarray, i: np.ndarray, c: int) -> bytes:
        return encode_label_map(v, i, c, **kw)

    def dec(b: bytes) -> tuple[np.ndarray, np.ndarray]:
        lm = decode_label_map(b)
        return lm.values, lm.indices

    return enc, dec


# The decoder before the vectorized reference resolution (commit a1e58ca): the "before" of its measurements.
BASELINE_REV = "061dff3"


def _decoder_at(rev: str) -> Callable | None:
    """``decode_label_map`` of relabel_shards/labelmap.py at git revision ``rev``, or None without git."""
    root = Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(
            ["git", "show", f"{rev}:relabel_shards/labelmap.py"],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"# no baseline decoder at {rev}: {e}")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"labelmap_{rev}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"labelmap_{rev}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module.decode_label_map


def decode_speed(V: np.ndarray, IX: np.ndarray, c: int, rev: str, rounds: int) -> list[dict]:
    """Microseconds per record decoding every map, current decoder against the one at ``rev``, per encoding.

    Rounds alternate the two decoders (in alternating order), each round decoding every record 5 times.
    """
    old = _decoder_at(rev)
    decoders = {"current": decode_label_map} | ({f"at {rev}": old} if old else {})
    rows = []
    for encoding in ("compact", "float16", "lossless"):
        recs = [encode_label_map(V[j], IX[j], c, encoding=encoding) for j in range(len(V))]
        for r in recs:  # the same bytes decode to the same arrays
            outs = [dec(r) for dec in decoders.values()]
            for o in outs[1:]:
                if (
                    o.values.tobytes() != outs[0].values.tobytes()
                    or o.indices.tobytes() != outs[0].indices.tobytes()
                ):
                    raise AssertionError(f"{encoding}: the decoders disagree")
        times: dict[str, list[float]] = {name: [] for name in decoders}
        for rnd in range(rounds + 1):  # round 0 warms up
            for name in list(decoders)[:: 1 if rnd % 2 else -1]:
                dec = decoders[name]
                t0 = time.perf_counter()
                for _ in range(5):
                    for r in recs:
                        dec(r)
                if rnd:
                    times[name].append((time.perf_counter() - t0) / (5 * len(recs)) * 1e6)
        row = {"encoding": encoding, "bytes_mean": float(np.mean([len(r) for r in recs]))}
        for name, ts in times.items():
            row[f"{name} median_us"] = statistics.median(ts)
            row[f"{name} min_us"] = min(ts)
        if old:
            row["speedup_median"] = row[f"at {rev} median_us"] / row["current median_us"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", nargs="+", default=list(PHOTOS), help="scikit-image photo names")
    ap.add_argument("--boxes", type=int, default=256, help="random boxes per map for the pooled error")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/bench_labelmap.json")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline decoder")
    ap.add_argument("--decode-rounds", type=int, default=20, help="rounds of the decode-speed comparison")
    ap.add_argument("--decode-only", action="store_true", help="only the decode-speed comparison")
    args = ap.parse_args()
    torch.set_num_threads(1)

    info = machine_info()
    print_header("label-map record: bytes, encode/decode time, pooled-target error on real maps", info)
    values, indices = real_label_maps(tuple(args.photos))
    V, IX = values.numpy(), indices.numpy()  # (N, 5, 15, 15) float32 / int64
    n, c = len(V), 1000
    speed = decode_speed(V, IX, c, args.baseline_rev, args.decode_rounds)
    print(
        f"# decode microseconds per record, {n} real maps {list(V.shape[1:])}, current decoder against the "
        f"one at {args.baseline_rev}, {args.decode_rounds} interleaved rounds of 5 passes:"
    )
    print_table(speed, list(speed[0]))
    if args.decode_only:
        write_json(
            args.out,
            {
                "machine": info,
                "maps": n,
                "map_shape": list(V.shape[1:]),
                "decode_speed": speed,
                "baseline_rev": args.baseline_rev,
            },
        )
        return
    boxes = _boxes(args.boxes)
    refs = [_pool(values[j], indices[j], boxes, c) for j in range(n)]
    print(
        f"# {n} maps {list(V.shape[1:])} from {len(args.photos)} photos at 480 px; {args.boxes} boxes per map"
    )

    candidates: dict[str, tuple[Callable, Callable]] = {
        "official torch.save f32 [2,5,15,15] (legacy)": _official_save(legacy=True),
        "official torch.save f32 [2,5,15,15] (zip)": _official_save(legacy=False),
        "sketch: f16 + u16 + zstd19": _sketch_f16_u16(),
        "lossless (f32 + palette)": _ours(encoding="lossless"),
        "float16 (f16 + palette)": _ours(encoding="float16"),
        "compact step 0.005": _ours(step=0.005),
        f"compact (default: step 0.01, zstd {DEFAULT_LEVEL})": _ours(),
        **{
            f"compact step 0.01, zstd {lv}": _ours(level=lv)
            for lv in (1, 3, 6, 12, 19)
            if lv != DEFAULT_LEVEL
        },
        "compact step 0.0125": _ours(step=0.0125),
        "compact step 1/64": _ours(step=1 / 64),
        "compact step 0.02": _ours(step=0.02),
    }
    rows = []
    baseline = None
    for name, (enc, dec) in candidates.items():
        recs = [enc(V[j], IX[j], c) for j in range(n)]
        sizes = np.array([len(r) for r in recs])
        t_enc = timeit(lambda e=enc: [e(V[j], IX[j], c) for j in range(n)], repeats=args.repeats, warmup=1)
        t_dec = timeit(lambda d=dec, rs=recs: [d(r) for r in rs], repeats=args.repeats, warmup=1)
        err = 0.0
        for j, r in enumerate(recs):
            v, i = dec(r)
            v = torch.as_tensor(np.asarray(v, np.float32)).reshape(V.shape[1:])
            i = torch.as_tensor(np.asarray(i).astype(np.int64)).reshape(V.shape[1:])
            if not torch.equal(i, indices[j]):
                raise AssertionError(f"{name}: indices did not round-trip")
            err = max(err, float((_pool(v, i, boxes, c) - refs[j]).abs().max()))
        row = {
            "encoding": name,
            "bytes_mean": float(sizes.mean()),
            "bytes_max": int(sizes.max()),
            "encode_us": t_enc["median_s"] / n * 1e6,
            "decode_us": t_dec["median_s"] / n * 1e6,
            "pooled_err_max": err,
        }
        if baseline is None:
            baseline = row["bytes_mean"]
        row["x_smaller_than_official"] = baseline / row["bytes_mean"]
        rows.append(row)
        print(f"#   {name}: {row['bytes_mean']:.0f} B, err {err:.2e}", flush=True)
    print()
    print_table(
        rows,
        [
            "encoding",
            "bytes_mean",
            "bytes_max",
            "x_smaller_than_official",
            "encode_us",
            "decode_us",
            "pooled_err_max",
        ],
    )
    write_json(
        args.out,
        {
            "machine": info,
            "maps": n,
            "map_shape": list(V.shape[1:]),
            "photos": args.photos,
            "boxes_per_map": args.boxes,
            "rows": rows,
            "decode_speed": speed,
            "baseline_rev": args.baseline_rev,
        },
    )


if __name__ == "__main__":
    main()

"""LabelPooling: ``label_pooling`` against the official dense path, on the CPU or on one GPU.

CPU (default): the official path as shipped (per-image ``scatter_`` into a zero ``[B, 1000, 15, 15]`` float32
map, ``roi_align`` to 1x1, softmax; ``official.py``) against ``label_pooling`` (the op's CPU kernel: the
sparse PyTorch path), B in {64, 256, 1024}, k=5, 15x15, C=1000, on one thread and on all threads: median time,
ratio, and peak tensor memory (bytes of tensors alive at once, tracked per op; tracemalloc does not see
torch). Goal (issue 2): >= 50x faster at B=256 on one thread, >= 50x less peak memory.

``--device cuda``: the official path as shipped (dense CPU build, host-to-device copy, roi_align and softmax
on the GPU) against the PyTorch path on the GPU and the fused Triton kernel, B in {256, 1024, 4096}:
microseconds per batch (wall clock with a sync per call; back-to-back calls timed by CUDA events; the kernel
alone replayed from a CUDA graph), GB/s of the bytes the kernel must read (values + indices + boxes, as
stored), and the peak GPU memory. Goals (issue 5, H100): <= 20 us for B=1024, >= 100x faster than the official
path end to end.

Every path runs the official box order (``swap_xy=True``), so each result is also checked against the official
output (``max_abs_diff``). Inputs: top-5 classes per cell from a 24-class palette per image, float16 values
and int16 indices on the GPU by default (``--value-dtype``, ``--index-dtype``).

``--output-size N`` (Token Labeling, issue 11): the TokenLabeling route (dense ``[B, 1000, 15, 15]`` scatter,
roi_align to N x N, softmax over C) against ``label_pooling(..., output_size=N)`` at B=256 (CPU) or B in
{256, 1024} (CUDA, where the PyTorch path and the Triton bins kernel run): time, and peak tensor memory beyond
the ``[B, N, N, C]`` result both routes return. Goals on the CPU: >= 20x faster, >= 20x less memory beyond
the output. The routes, ``out=`` a reused buffer, and the floor of writing the output once (a fresh
``torch.empty(...).fill_`` and a fill of the reused buffer) are timed in interleaved rounds (median of each),
so that the load of a shared machine hits them alike.

    python benchmarks/bench_pooling.py                 # CPU, about a minute on 2 cores
    python benchmarks/bench_pooling.py --output-size 14                  # Token Labeling targets, CPU
    python benchmarks/bench_pooling.py --device cuda   # one GPU
    python benchmarks/bench_pooling.py --device cuda --output-size 14
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_header, print_table, timeit, write_json  # noqa: E402

from relabel_shards.pooling import (  # noqa: E402
    label_pooling,
    official,
    reference_label_pooling,
)

K, H, W, C = 5, 15, 15, 1000


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and alive at once (inputs excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, tensors referring to it]
        self.external: set[int] = set()  # storages made outside the mode (inputs), and their views
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.live:
                    self.external.add(ptr)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                ptr = t.untyped_storage().data_ptr()
                if not ptr or ptr in self.external:
                    continue
                if ptr not in self.live:
                    self.live[ptr] = [t.untyped_storage().nbytes(), 0]
                    self.current += self.live[ptr][0]
                    self.peak = max(self.peak, self.current)
                self.live[ptr][1] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def peak_cpu_bytes(fn) -> int:
    with PeakTensorBytes() as mode:
        out = fn()
        del out
    return mode.peak


def make_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values float32 [B,5,15,15] (descending logits), indices int64 (5 distinct of a 24-class palette per
    image), boxes float32 [B,4] normalized (x1, y1, x2, y2) like random-resized crops."""
    g = torch.Generator().manual_seed(seed)
    pal = torch.rand(batch, C, generator=g).topk(24, dim=1).indices  # (B, 24)
    slot = torch.rand(batch, 24, H, W, generator=g).topk(K, dim=1).indices  # (B, 5, 15, 15)
    indices = torch.gather(pal[:, :, None, None].expand(-1, -1, H, W), 1, slot)
    values = (torch.randn(batch, K, H, W, generator=g) * 3).sort(dim=1, descending=True).values + 2
    scale = torch.rand(batch, 1, generator=g) * 0.92 + 0.08
    side = scale.sqrt()
    corner = torch.rand(batch, 2, generator=g) * (1 - side)
    boxes = torch.cat([corner, corner + side], 1)
    return values, indices, boxes


def official_records(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The release's per-image [2, 5, 15, 15] float32 records, stacked as the DataLoader's collate does."""
    return torch.stack([values.float(), indices.float()], 1)


def bench_cpu(args) -> dict:
    from relabel_shards.pooling.torch_impl import label_pooling_torch

    rows = []
    all_threads = os.cpu_count() or 1
    thread_counts = sorted({1, all_threads})
    saved = torch.get_num_threads()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for batch in args.batches or (64, 256, 1024):
            values, indices, boxes = make_batch(batch)
            records, coords = official_records(values, indices), boxes[:, [1, 0, 3, 2]]

            def run_official(records=records, coords=coords, batch=batch):
                return official.get_relabel(official.get_labelmaps(records, batch, C, "cpu"), coords, batch)

            def run_ours(values=values, indices=indices, boxes=boxes):
                return label_pooling(values, indices, boxes, C, swap_xy=True)

            diff = (run_ours() - run_official()).abs().max().item()
            reps = max(3, args.repeats // (4 if batch >= 1024 else 1))
            t_off = timeit(run_official, repeats=reps, warmup=1)["median_s"]
            t_our = timeit(run_ours, repeats=args.repeats, warmup=2)["median_s"]
            # the op's CPU kernel is opaque to a dispatch mode: track the same PyTorch path called directly
            m_off, m_our = peak_cpu_bytes(run_official), peak_cpu_bytes(
                lambda: label_pooling_torch(values, indices, boxes, C, True, indices_checked=True))  # noqa: B023
            rows.append({"threads": threads, "B": batch, "official_ms": t_off * 1e3, "ours_ms": t_our * 1e3,
                         "speedup": t_off / t_our, "official_peak_MiB": m_off / 2**20,
                         "ours_peak_MiB": m_our / 2**20, "memory_ratio": m_off / max(m_our, 1),
                         "max_abs_diff": diff})
    torch.set_num_threads(saved)
    print_table(rows, ["threads", "B", "official_ms", "ours_ms", "speedup", "official_peak_MiB",
                       "ours_peak_MiB",                        "memory_ratio", "max_abs_diff"])
    goal = [r for r in rows if r["threads"] == 1 and r["B"] == 256]
    if goal:
        g = goal[0]
        print(f"# goal B=256, one thread: speedup {g['speedup']:.1f}x (>= 50), "
              f"memory {g['memory_ratio']:.1f}x less (>= 50)")
    return {"rows": rows}


def tokenlabeling_route(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, size: int,
                        device: str = "cpu") -> torch.Tensor:
    """Token Labeling's (LV-ViT) route: a dense ``[B, C, h, w]`` map scattered from the top-k, roi_align to
    ``size x size``, softmax over C: Tensor[B, C, size, size] float32 (its layout)."""
    from torchvision.ops import roi_align

    batch = values.shape[0]
    dense = torch.zeros(batch, C, H, W, device=device)
    dense.scatter_(1, indices.to(device).long(), values.to(device).float())
    rois = torch.cat([torch.arange(batch, device=device, dtype=torch.float32)[:, None],
                      boxes.to(device) * torch.tensor([W, H, W, H], device=device) - 0.5], 1)
    pooled = roi_align(dense, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                       aligned=False)
    del dense
    return torch.softmax(pooled, dim=1)


def timeit_rounds(fns, rounds: int) -> list[float]:
    """Median seconds of each of ``fns``, timed in ``rounds`` rounds that call each once in turn (after one
    uncounted call each), so that a change of the machine's load during the run hits every route alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
            del out  # freed before the next call, as with timeit
    return [statistics.median(ts) for ts in times]


def _thp_setting() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def bench_cpu_tokens(args) -> dict:
    """--output-size N: the TokenLabeling route against label_pooling(output_size=N), same inputs and run."""
    from relabel_shards.pooling.torch_impl import label_pooling_bins_torch

    size = args.output_size
    rows = []
    saved = torch.get_num_threads()
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for batch in args.batches or (256,):
            values, indices, boxes = make_batch(batch)
            flips = torch.zeros(batch, dtype=torch.bool)

            def run_tl(values=values, indices=indices, boxes=boxes):
                return tokenlabeling_route(values, indices, boxes, size)

            def run_ours(values=values, indices=indices, boxes=boxes, flips=flips):
                return label_pooling(values, indices, boxes, C, output_size=size, flips=flips)

            buf = torch.empty(batch, size, size, C)

            def run_ours_out(values=values, indices=indices, boxes=boxes, flips=flips, buf=buf):
                return label_pooling(values, indices, boxes, C, output_size=size, flips=flips, out=buf)

            def run_ours_sparse(values=values, indices=indices, boxes=boxes, flips=flips):
                # what training consumes (relabel_shards.losses): the same targets, sparse, no [B,N,N,C]
                return label_pooling(values, indices, boxes, C, output_size=size, flips=flips,
                                     return_sparse=True)

            def run_ours_direct(values=values, indices=indices, boxes=boxes, flips=flips):
                # the op's CPU kernel is opaque to the dispatch mode: the same PyTorch path called directly
                return label_pooling_bins_torch(values, indices, boxes, C, (size, size), False, flips,
                                                indices_checked=True)

            # against the oracle on the first 32 images (the TokenLabeling route's own softmax along C of a
            # [B, C, oh, ow] tensor rounds differently, up to about 3e-5)
            n = min(batch, 32)
            oracle = reference_label_pooling(values[:n], indices[:n], boxes[:n], C, output_size=size)
            diff = (run_ours()[:n] - oracle).abs().max().item()
            diff_tl = (run_tl()[:n].permute(0, 2, 3, 1) - oracle).abs().max().item()
            # the floor of any route that returns this output: writing [B, N, N, C] float32 once, into a fresh
            # tensor (the operating system first-touches its pages) and into the reused buffer
            shape = (batch, size, size, C)
            t_tl, t_our, t_out, t_sparse, t_fresh, t_fill = timeit_rounds(
                [run_tl, run_ours, run_ours_out, run_ours_sparse,
                 lambda shape=shape: torch.empty(shape).fill_(0.5), lambda buf=buf: buf.fill_(0.5)],
                rounds=args.repeats)
            out_bytes = batch * size * size * C * 4
            m_tl = peak_cpu_bytes(run_tl) - out_bytes
            m_our = peak_cpu_bytes(run_ours_direct) - out_bytes
            rows.append({"threads": threads, "B": batch, "tokens": f"{size}x{size}",
                         "tokenlabeling_ms": t_tl * 1e3, "ours_ms": t_our * 1e3, "speedup": t_tl / t_our,
                         "ours_out_ms": t_out * 1e3, "speedup_out": t_tl / t_out,
                         "ours_sparse_ms": t_sparse * 1e3, "speedup_sparse": t_tl / t_sparse,
                         "fill_fresh_ms": t_fresh * 1e3, "fill_reused_ms": t_fill * 1e3,
                         "bound_fresh": t_tl / t_fresh, "bound_out": t_tl / t_fill,
                         "tokenlabeling_extra_MiB": m_tl / 2**20, "ours_extra_MiB": m_our / 2**20,
                         "memory_ratio": m_tl / max(m_our, 1), "output_MiB_f32": out_bytes / 2**20,
                         "output_MiB_bf16": out_bytes / 2 / 2**20, "max_abs_diff": diff,
                         "tokenlabeling_max_abs_diff": diff_tl})
    torch.set_num_threads(saved)
    print_table(rows, ["threads", "B", "tokens", "tokenlabeling_ms", "ours_ms", "speedup", "ours_out_ms",
                       "speedup_out", "ours_sparse_ms", "speedup_sparse", "fill_fresh_ms", "fill_reused_ms",
                       "bound_fresh", "bound_out",
                       "tokenlabeling_extra_MiB", "ours_extra_MiB", "memory_ratio",
                       "output_MiB_f32", "output_MiB_bf16", "max_abs_diff", "tokenlabeling_max_abs_diff"])
    print("# ours_out: label_pooling(..., out=buffer) reusing one result buffer (no first touch of pages)")
    print("# ours_sparse: label_pooling(..., return_sparse=True), the same targets as each image's classes "
          "and their pooled logits, what relabel_shards.losses and train.py --token-label consume on the CPU")
    print("# fill_fresh / fill_reused: torch.empty(B, N, N, C).fill_(0.5), and .fill_(0.5) of the reused "
          "buffer: the floor of writing the output once; bound_*: tokenlabeling_ms over that floor, the "
          "largest speedup any route returning this output could show")
    print(f"# transparent huge pages: {_thp_setting()}, THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')} (torch's 2 MiB pages for its allocations)")
    print("# extra MiB: peak tensor memory beyond the [B, oh, ow, C] float32 output both routes return")
    print("# max_abs_diff: against the dense oracle (roi_align on the dense map, softmax), first 32 images")
    goal = [r for r in rows if r["threads"] == 1 and r["B"] == 256]
    if goal:
        g = goal[0]
        print(f"# goal B=256, {size}x{size}, one thread: speedup {g['speedup']:.1f}x with a fresh result, "
              f"{g['speedup_out']:.1f}x into a reused buffer, {g['speedup_sparse']:.1f}x as sparse targets "
              f"(goal >= 20), memory beyond the output "
              f"{g['memory_ratio']:.1f}x less (>= 20); writing the output alone bounds the speedup at "
              f"{g['bound_fresh']:.1f}x (fresh) and {g['bound_out']:.1f}x (reused)")
    return {"rows": rows, "output_size": size, "transparent_hugepage": _thp_setting(),
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}


def _events_us(fn, iters: int, repeats: int) -> float:
    """Median microseconds per call of ``iters`` back-to-back calls, timed by CUDA events."""
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / iters)
    return sorted(times)[len(times) // 2]


def _graph_us(fn, iters: int, repeats: int) -> float | None:
    """Median microseconds per call with ``iters`` calls captured in one CUDA graph (no CPU overhead)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm up (compiles) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        return _events_us(graph.replay, 1, repeats) / iters
    except Exception as e:  # capture is best effort: report, do not abort the run
        print(f"# CUDA graph capture failed: {type(e).__name__}: {e}")
        return None


def _cuda_paths(run_official, v, i, b) -> dict:
    """name -> (callable, whether to also time it from a CUDA graph)."""
    from relabel_shards.pooling.torch_impl import label_pooling_torch
    from relabel_shards.pooling.triton_impl import label_pooling_triton

    def pool(backend: str):
        return lambda: label_pooling(v, i, b, C, swap_xy=True, backend=backend)

    return {
        "official (CPU dense + H2D + roi_align)": (run_official, False),
        "label_pooling backend=torch": (pool("torch"), False),
        "label_pooling backend=triton": (pool("triton"), False),
        "auto (op dispatch)": (pool("auto"), False),
        "torch path, kernel only": (lambda: label_pooling_torch(v, i, b, C, True), True),
        "triton kernel only": (lambda: label_pooling_triton(v, i, b, C, True), True),
    }


def bench_cuda(args) -> dict:
    dev = torch.device("cuda")
    vdt, idt = getattr(torch, args.value_dtype), getattr(torch, args.index_dtype)
    rows = []
    for batch in args.batches or (256, 1024, 4096):
        values, indices, boxes = make_batch(batch)
        records, coords = official_records(values, indices), boxes[:, [1, 0, 3, 2]]
        v, i, b = values.to(dev, vdt), indices.to(dev, idt), boxes.to(dev)
        read_bytes = sum(t.numel() * t.element_size() for t in (v, i, b))

        # as shipped: dense map on the CPU, copy, roi_align + softmax on the GPU
        def run_official(records=records, coords=coords, batch=batch):
            return official.get_relabel(official.get_labelmaps(records, batch, C, dev), coords.to(dev), batch)

        want = run_official().float()
        paths = _cuda_paths(run_official, v, i, b)
        base_us = None
        for name, (fn, kernel_only) in paths.items():
            is_official = base_us is None  # the first path
            diff = (fn().float() - want).abs().max().item()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            wall = timeit(fn, repeats=3 if is_official else args.repeats, warmup=1 if is_official else 3,
                          sync_cuda=True)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            us_wall = wall["median_s"] * 1e6
            us_loop = us_wall if is_official else _events_us(fn, 50, 5)  # seconds per official call: no loop
            us_graph = _graph_us(fn, 20, 5) if kernel_only else None
            base_us = us_wall if is_official else base_us
            best = us_graph if us_graph is not None else us_loop
            rows.append({"path": name, "B": batch, "us_wall": us_wall, "us_loop": us_loop,
                         "us_graph": us_graph, "GB/s_read": read_bytes / (best * 1e-6) / 1e9,
                         "speedup_vs_official": base_us / best,
                         "gpu_peak_MiB": peak, "max_abs_diff": diff})
            print(f"# {rows[-1]}", flush=True)  # partial results survive a timeout
    sweep = _sweep_warps(vdt, idt) if args.sweep_warps else []
    print_table(rows, ["path", "B", "us_wall", "us_loop", "us_graph", "GB/s_read", "speedup_vs_official",
                       "gpu_peak_MiB", "max_abs_diff"])
    print(f"# values {args.value_dtype}, indices {args.index_dtype}; us_wall: one call + sync (median); "
          "us_loop: 50 back-to-back calls / 50 (CUDA events); "
          "us_graph: 20 calls replayed from a CUDA graph / 20; "
          "speedup and GB/s use us_graph where measured, else us_loop")
    for r in rows:
        if r["path"] == "triton kernel only" and r["B"] == 1024:
            print(f"# goal B=1024: Triton kernel {r['us_graph'] or r['us_loop']:.1f} us (<= 20 on an H100)")
        if r["path"] == "auto (op dispatch)":
            print(f"# goal B={r['B']}: label_pooling (auto) {r['speedup_vs_official']:.0f}x faster than the "
                  "official path end to end (>= 100)")
    if sweep:
        print("# Triton kernel alone at B=1024 by num_warps (CUDA graph replay):")
        print_table(sweep, ["num_warps", "us_graph", "GB/s_read"])
    return {"rows": rows, "warps_sweep": sweep, "value_dtype": args.value_dtype,
            "index_dtype": args.index_dtype}


def _token_paths(v, i, b, flips, size: int) -> dict:
    """name -> callable, for bench_cuda_tokens (the first is the baseline)."""
    from relabel_shards.pooling.triton_impl import label_pooling_triton

    def pool(backend: str):
        return lambda: label_pooling(v, i, b, C, output_size=size, flips=flips, backend=backend)

    return {
        "TokenLabeling route (dense + roi_align + softmax)":
            lambda: tokenlabeling_route(v, i, b, size, "cuda"),
        "label_pooling backend=torch": pool("torch"),
        "label_pooling backend=triton": pool("triton"),
        "triton kernel only": lambda: label_pooling_triton(v, i, b, C, False, output_size=(size, size),
                                                           flips=flips),
    }


def bench_cuda_tokens(args) -> dict:
    """--device cuda --output-size N: the TokenLabeling route on the GPU against the PyTorch path and the
    Triton bins kernel: microseconds per batch (CUDA events over back-to-back calls), peak GPU memory."""
    dev = torch.device("cuda")
    size = args.output_size
    vdt, idt = getattr(torch, args.value_dtype), getattr(torch, args.index_dtype)
    rows = []
    for batch in args.batches or (256, 1024):
        values, indices, boxes = make_batch(batch)
        v, i, b = values.to(dev, vdt), indices.to(dev, idt), boxes.to(dev)
        flips = torch.zeros(batch, dtype=torch.bool, device=dev)
        paths = _token_paths(v, i, b, flips, size)
        want = paths["TokenLabeling route (dense + roi_align + softmax)"]().permute(0, 2, 3, 1).float()
        base_us = None
        for name, fn in paths.items():
            out = fn()
            diff = ((out.permute(0, 2, 3, 1) if out.shape[1] == C else out).float() - want).abs().max().item()
            del out
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            us = _events_us(fn, 10, 5)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            base_us = us if base_us is None else base_us
            rows.append({"path": name, "B": batch, "tokens": f"{size}x{size}", "us": us,
                         "speedup": base_us / us, "gpu_peak_MiB": peak,
                         "output_MiB_f32": batch * size * size * C * 4 / 2**20, "max_abs_diff": diff})
            print(f"# {rows[-1]}", flush=True)
    print_table(rows, ["path", "B", "tokens", "us", "speedup", "gpu_peak_MiB", "output_MiB_f32",
                       "max_abs_diff"])
    return {"rows": rows, "output_size": size, "value_dtype": args.value_dtype,
            "index_dtype": args.index_dtype}


def _sweep_warps(vdt: torch.dtype, idt: torch.dtype, batch: int = 1024) -> list[dict]:
    """Time the kernel alone with each num_warps (one compile each), to tune launch_config's default."""
    from relabel_shards.pooling.triton_impl import label_pooling_triton

    values, indices, boxes = make_batch(batch)
    dev = torch.device("cuda")
    v, i, b = values.to(dev, vdt), indices.to(dev, idt), boxes.to(dev)
    read_bytes = sum(t.numel() * t.element_size() for t in (v, i, b))
    rows = []
    for warps in (2, 4, 8, 16):
        try:
            def run(warps=warps):
                return label_pooling_triton(v, i, b, C, True, num_warps=warps)

            us = _graph_us(run, 20, 5) or _events_us(run, 50, 5)  # events if graph capture failed
        except Exception as e:  # a variant that does not compile or run is reported, not fatal
            print(f"# num_warps={warps}: {type(e).__name__}: {e}")
            us = None
        rows.append({"num_warps": warps, "us_graph": us,
                     "GB/s_read": read_bytes / (us * 1e-6) / 1e9 if us else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batches", type=int, nargs="*", help="batch sizes (default: 64 256 1024 on cpu, "
                                                             "256 1024 4096 on cuda)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--value-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="values as stored (cuda only)")
    p.add_argument("--index-dtype", default="int16", choices=["int16", "int32", "int64"],
                   help="indices as stored (cuda only)")
    p.add_argument("--sweep-warps", action="store_true",
                   help="cuda only: also time the Triton kernel at B=1024 with num_warps 2, 4, 8, 16")
    p.add_argument("--output-size", type=int, default=1,
                   help="bins per side: above 1, Token Labeling targets (the TokenLabeling route against "
                        "label_pooling(output_size=N), B=256 by default)")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/bench_pooling_<device>.json, "
                                 "bench_pooling_<device>_tokens<N>.json with --output-size N)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device")
    info = machine_info()
    tokens = args.output_size > 1
    what = (f"the TokenLabeling route, {args.output_size}x{args.output_size} bins" if tokens
            else "the official dense path")
    print_header(f"bench_pooling --device {args.device}: label_pooling vs {what} (k={K}, {H}x{W}, C={C})",
                 info)
    if tokens:
        result = bench_cuda_tokens(args) if args.device == "cuda" else bench_cpu_tokens(args)
    else:
        result = bench_cuda(args) if args.device == "cuda" else bench_cpu(args)
    suffix = f"_tokens{args.output_size}" if tokens else ""
    name = f"bench_pooling_{args.device}{suffix}.json"
    out = args.out or Path(__file__).resolve().parent / "results" / name
    write_json(out, {"benchmark": "bench_pooling", "device": args.device, "k": K, "h": H, "w": W,
                     "num_classes": C, "repeats": args.repeats, **result, "machine": info})


if __name__ == "__main__":
    main()

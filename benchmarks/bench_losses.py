"""Soft-target cross-entropy for token targets: dense targets + ``sum(-t * log_softmax)`` against
``relabel_shards.losses`` on sparse targets, on the CPU: peak memory and time of targets + loss + backward.

Each route runs in its own fresh subprocess (one thread): it builds the inputs (label maps, boxes, the model's
token logits ``[B, 14, 14, C]`` with ``requires_grad``), runs the route once at B=2 to load everything, reads
its resident set size (``/proc/self/statm``), runs the route at full size, and reports the process's peak
RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) minus that baseline: the memory the route needed, gradient
included, as the operating system saw it (tracemalloc does not see torch's allocations). Then it times
further calls (median).

- dense: ``t = label_pooling(..., output_size=14)`` ([B, 14, 14, C] float32), then
  ``torch.sum(-t * torch.log_softmax(y, -1), -1).mean()`` and ``backward()``.
- sparse: ``label_pooling(..., output_size=14, return_sparse=True)`` then
  ``losses.soft_target_cross_entropy(y, sparse)`` and ``backward()``.

Each route is measured twice: targets + loss (the goal's "dense targets + sum(-t * log_softmax)"), and with
the backward as well, where both routes must hold the gradient, a tensor of the logits' size.

Goal (issue 11): B=256, 14x14 tokens, C=1000: sparse >= 4x less peak memory than dense.

    python benchmarks/bench_losses.py              # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_header, print_table, write_json  # noqa: E402

C = 1000


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(route: str, batch: int, size: int, repeats: int, backward: bool) -> dict:
    import torch
    from bench_pooling import make_batch

    from relabel_shards.losses import soft_target_cross_entropy
    from relabel_shards.pooling import label_pooling

    torch.set_num_threads(1)

    def run(values, indices, boxes, y):
        y.grad = None
        if route == "dense":
            t = label_pooling(values, indices, boxes, C, output_size=size)
            loss = torch.sum(-t * torch.log_softmax(y, dim=-1), dim=-1).mean()
        else:
            t = label_pooling(values, indices, boxes, C, output_size=size, return_sparse=True)
            loss = soft_target_cross_entropy(y, t)
        if backward:
            loss.backward()
        return float(loss)

    small = make_batch(2, seed=1)
    run(*small, torch.randn(2, size, size, C, requires_grad=True))
    values, indices, boxes = make_batch(batch)
    y = torch.randn(batch, size, size, C, generator=torch.Generator().manual_seed(0)).mul_(2).requires_grad_()
    base = _rss()
    loss = run(values, indices, boxes, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(values, indices, boxes, y)
        times.append(time.perf_counter() - t0)
    return {"route": route, "phase": "forward+backward" if backward else "forward", "B": batch,
            "tokens": f"{size}x{size}", "peak_extra_MiB": peak / 2**20, "logits_MiB": y.numel() * 4 / 2**20,
            "median_ms": sorted(times)[len(times) // 2] * 1e3, "loss": loss}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=14, help="token grid side (output_size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=["dense", "sparse"], help=argparse.SUPPRESS)
    p.add_argument("--backward", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help="JSON path (default benchmarks/results/bench_losses.json)")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.size, args.repeats, args.backward)))
        return
    info = machine_info()
    print_header(f"bench_losses: token soft-target CE, dense targets vs sparse (B={args.batch}, "
                 f"{args.size}x{args.size} tokens, C={C}, k=5, 15x15 maps, one thread)", info)
    rows = []
    for backward in (False, True):
        for route in ("dense", "sparse"):
            cmd = [sys.executable, __file__, "--child", route, "--batch", str(args.batch), "--size",
                   str(args.size), "--repeats", str(args.repeats)] + (["--backward"] if backward else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print_table(rows, ["route", "phase", "B", "tokens", "peak_extra_MiB", "logits_MiB", "median_ms", "loss"])
    ratio = rows[0]["peak_extra_MiB"] / rows[1]["peak_extra_MiB"]
    ratio_bw = rows[2]["peak_extra_MiB"] / rows[3]["peak_extra_MiB"]
    print(f"# peak RSS beyond the inputs, targets + loss: sparse {ratio:.1f}x less than dense (goal >= 4); "
          "with "
          f"the backward {ratio_bw:.1f}x (both hold the gradient, logits_MiB); losses agree to "
          f"{abs(rows[0]['loss'] - rows[1]['loss']):.1e}")
    out = args.out or Path(__file__).resolve().parent / "results" / "bench_losses.json"
    write_json(out, {"benchmark": "bench_losses", "rows": rows, "memory_ratio": ratio,
                     "memory_ratio_with_backward": ratio_bw, "machine": info,
                     "method": "peak RSS (ru_maxrss) minus RSS before the call, fresh subprocess per route"})


if __name__ == "__main__":
    main()

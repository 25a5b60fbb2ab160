"""What every benchmark script shares: the machine and versions it ran on, timing, a table, JSON out.

Usage in a script next to this file::

    from _common import machine_info, print_header, timeit, print_table, write_json

Timing is synchronized wall-clock ``perf_counter`` around each call (CUDA synchronized before and after when
``sync_cuda``); the reported figure is the median over repeats, after warm-up calls that are not counted.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU, core count, memory, GPU (if any) and the versions of the libraries the numbers depend on."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("relabel-shards", "torch", "torchvision", "timm", "triton",
                                               "webdataset", "numpy", "zstandard", "pillow")},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def print_header(title: str, info: dict[str, Any]) -> None:
    print(f"# {title}")
    print(f"# cpu: {info['cpu']} ({info['cores']} cores, torch threads {info['torch_threads']})"
          + (f", memory {info['memory_gib']} GiB" if "memory_gib" in info else ""))
    print(f"# gpu: {info['gpu'] or 'none'}")
    print("# " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))


def timeit(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2,
           sync_cuda: bool = False) -> dict[str, float]:
    """Median, min and max seconds of ``fn()`` over ``repeats`` calls after ``warmup`` uncounted calls."""
    sync = (lambda: __import__("torch").cuda.synchronize()) if sync_cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats}


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A Markdown table of ``rows`` with the given columns (floats shown with 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(" --- " for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (with the machine info under ``machine``) as indented JSON, creating folders."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n")
    print(f"# wrote {p}")

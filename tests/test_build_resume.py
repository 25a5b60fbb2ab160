"""kill -9 a build at known points, rerun it: shards, sidecars, _info.json byte-identical to a clean run.

The kill points come from the writer's test hook (tests/killpoint.py), not from the wall clock, so the test
means the same on a fast machine and a slow one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from killpoint import kill_at
from PIL import Image

from relabel_shards.build import build_shards


def _folder(root: Path, n: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for j in range(n):
        d = root / f"c{j % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(d / f"img{j:02d}.jpg")
    (root / "c1" / "broken.jpg").write_bytes(b"not a jpeg")  # a failure must survive resumes too
    return root


def _cmd(src: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "relabel_shards.cli",
        "build",
        str(src),
        str(out),
        "--model",
        "test_efficientnet",
        "--input-size",
        "64",
        "--shard-size",
        "2",
        "--batch-size",
        "1",
        "--num-workers",
        "0",
        "--no-progress",
    ]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


@pytest.mark.slow
def test_kill_dash_nine_then_rerun_is_byte_identical(tmp_path):
    src = _folder(tmp_path / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    ref = tmp_path / "ref" / "ds"  # the uninterrupted run, in this process with the CLI's settings
    build_shards(
        str(src),
        str(ref),
        model="test_efficientnet",
        input_size=64,
        shard_size=2,
        batch_size=1,
        num_workers=0,
    )
    reference = _tree(ref)
    assert "_info.json" in reference and sum(n.endswith(".tar") for n in reference) == 6

    out = tmp_path / "killed" / "ds"
    flag = tmp_path / "paused"
    # mid-shard: shard 0 complete, shard 1 holds one sample in its temporary file
    kill_at(_cmd(src, out), env, "add:3", flag)
    names = set(os.listdir(out))
    assert {"train-000000.tar", "train-000000_stats.json"} <= names and "train-000001.tar" not in names
    assert any(n.startswith(".train-000001.tar.") and n.endswith(".tmp") for n in names), names
    # between publishing shard 1 and writing its sidecar (the rerun keeps shard 0, writes shard 1 again)
    kill_at(_cmd(src, out), env, "publish:1", flag)
    names = set(os.listdir(out))
    assert "train-000001.tar" in names and "train-000001_stats.json" not in names, names
    done = subprocess.run(_cmd(src, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _tree(out) == reference  # no stray temporary file, same bytes everywhere

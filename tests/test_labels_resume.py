"""kill -9 a ``build --labels-only`` at random moments, rerun it: byte-identical to a clean run (the approach
of tests/test_build_resume.py, on image shards)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labels_factory import make_image_shards

from relabel_shards.build import build_shards

ARGS = ["--model", "test_efficientnet", "--input-size", "64", "--batch-size", "1", "--num-workers", "0"]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


@pytest.mark.slow
def test_kill_dash_nine_then_rerun_labels_only_is_byte_identical(tmp_path):
    keys = [[f"k{s}_{j}" for j in range(3)] for s in range(5)]
    images = make_image_shards(tmp_path / "imgs", keys, broken={"k2_1"})
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    ref = tmp_path / "ref" / "ds"
    build_shards(
        images,
        str(ref),
        labels_only=True,
        model="test_efficientnet",
        input_size=64,
        batch_size=1,
        num_workers=0,
    )
    reference = _tree(ref)
    assert sum(n.endswith(".tar") for n in reference) == 5

    out = tmp_path / "killed" / "ds"
    cmd = [
        sys.executable,
        "-m",
        "relabel_shards.cli",
        "build",
        *images,
        str(out),
        "--labels-only",
        *ARGS,
        "--no-progress",
    ]
    rng = random.Random(99)
    kills = 0
    for _ in range(2):
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        before = set(os.listdir(out)) if out.exists() else set()
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (set(os.listdir(out)) if out.exists() else set()) - before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if (out / "_info.json").exists():
            break
    assert kills >= 1
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _tree(out) == reference

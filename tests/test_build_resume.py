"""kill -9 a build at random moments, rerun it: shards, sidecars, _info.json byte-identical to a clean run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
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
    rng = random.Random(1234)
    kills = 0
    for _ in range(2):
        proc = subprocess.Popen(
            _cmd(src, out),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # wait until this run starts writing (a temporary or new file appears), then kill at a random moment
        before = set(os.listdir(out)) if out.exists() else set()
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            now = set(os.listdir(out)) if out.exists() else set()
            if now - before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if (out / "_info.json").exists():
            break  # this run finished before the kill: the rerun below still must match
    assert kills >= 1
    done = subprocess.run(_cmd(src, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _tree(out) == reference  # no stray temporary file, same bytes everywhere

"""Kill a job at a known point: the writer's test hook (``RELABEL_SHARDS_TEST_PAUSE_AFTER``, writer.py).

``kill_at(cmd, env, point, flag)`` starts ``cmd`` with the hook set to ``point`` (``"add:N"``: after the
writer's N-th sample; ``"publish:N"``: after its N-th shard is published, before the sidecar), waits until
the writer has paused there (it creates ``flag``), and kills the process group with SIGKILL. The kill
therefore lands at the same place on a slow machine and on a fast one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_at(cmd: list[str], env: dict[str, str], point: str, flag: Path, timeout: float = 180) -> None:
    env = {**env, "RELABEL_SHARDS_TEST_PAUSE_AFTER": point, "RELABEL_SHARDS_TEST_PAUSE_FILE": str(flag)}
    flag.unlink(missing_ok=True)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"the job ended (exit {proc.returncode}) before pausing at {point}: "
                f"{proc.stderr.read().decode()[-2000:]}"
            )
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"the job did not reach {point} within {timeout} s")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

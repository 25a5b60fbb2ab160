"""The package's surface: a light import, an explicit public API (lint runs in .ci/run, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import relabel_shards

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light():
    """`import relabel_shards` loads no torch; `relabel_shards.loader` loads neither timm nor triton."""
    code = ("import sys, relabel_shards; assert 'torch' not in sys.modules, 'torch'; "
            "import relabel_shards.loader; bad = [m for m in ('timm', 'triton') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", [n for n in relabel_shards.__all__ if n != "__version__"])
def test_every_public_name_resolves_and_is_documented(name):
    obj = getattr(relabel_shards, name)
    assert obj.__doc__ and obj.__doc__.strip(), f"relabel_shards.{name} has no docstring"
    assert name in dir(relabel_shards)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        relabel_shards.nope  # noqa: B018


def test_readme_test_command_is_what_ci_runs():
    """The README's test command and the one .ci/run executes are the same line, so neither drifts."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:]]
    test_cmds = [b for b in blocks if "pytest" in b and "\n" not in b]
    assert len(test_cmds) == 1, test_cmds
    assert test_cmds[0] in ci.splitlines(), f"{test_cmds[0]!r} is not a line of .ci/run"
    demo = [b for b in blocks if b.endswith("relabel-shards demo out/")]
    assert len(demo) == 1 and "\n" not in demo[0]

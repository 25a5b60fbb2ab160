"""Errors of create_annotator a user can act on: a misspelled model name, --pretrained without the hub."""

from __future__ import annotations

import socket
import time

import pytest
from click.testing import CliRunner

from relabel_shards.annotator import create_annotator
from relabel_shards.cli import cli


def test_misspelled_model_gets_did_you_mean():
    with pytest.raises(ValueError, match=r"unknown timm model name 'resnet5o'; did you mean 'resnet50'"):
        create_annotator("resnet5o")
    with pytest.raises(
        ValueError,
        match=r"unknown timm model name 'efficientnet_b0x\.ra_in1k'; did you mean "
        r"'efficientnet_b0'",
    ):
        create_annotator("efficientnet_b0x.ra_in1k")
    with pytest.raises(ValueError, match=r"unknown timm model name 'qqqqzzzz' \(timm\.list_models\(\)"):
        create_annotator("qqqqzzzz")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return port


def test_pretrained_offline_fails_fast_with_the_flags(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(
        ValueError,
        match=r"--pretrained: the weights of 'resnet18' \(timm/resnet18\.a1_in1k on "
        r"the Hugging Face Hub\) are not in the local cache and HF_HUB_OFFLINE "
        r"is set\..*--checkpoint FILE",
    ):
        create_annotator("resnet18", pretrained=True, device="cpu")
    assert time.monotonic() - t0 < 5


def test_pretrained_with_an_unreachable_hub_fails_fast(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # loopback only: refused
    t0 = time.monotonic()
    with pytest.raises(
        ValueError,
        match=r"are not in the local cache and http://127\.0\.0\.1:\d+ is not "
        r"reachable \(ConnectionRefusedError",
    ):
        create_annotator("resnet18", pretrained=True, device="cpu")
    assert time.monotonic() - t0 < 5


def test_cli_pretrained_offline_is_one_line(empty_hub_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "imgs" / "c").mkdir(parents=True)
    (tmp_path / "imgs" / "c" / "a.jpg").write_bytes(b"x")
    res = CliRunner().invoke(
        cli,
        [
            "build",
            str(tmp_path / "imgs"),
            str(tmp_path / "out"),
            "--model",
            "resnet18",
            "--pretrained",
            "--num-workers",
            "0",
            "--no-progress",
        ],
    )
    assert res.exit_code == 1 and "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: --pretrained: the weights of 'resnet18'") and "--checkpoint FILE" in last

"""Object storage that stalls, resets, refuses or forbids: every command ends within its deadline, with a
one-line error that names the URL and the fix (relabel_shards.storage; issue 12 items 2-3, issue 13 item 3).

The faults come from tests/faultproxy.py, a TCP proxy in front of the real loopback servers (moto's S3 API,
an HTTP server). Deadlines are seconds here; each test asserts the time it took against its deadline.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from click.testing import CliRunner
from faultproxy import FaultProxy, closed_port
from test_loader_factory import make_shards

from relabel_shards.cli import cli
from relabel_shards.describe import describe
from relabel_shards.shards import read_info
from relabel_shards.storage import (
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageTimeoutError,
    is_transient,
)
from relabel_shards.verify import verify_shards

pytestmark = pytest.mark.network
DEADLINE = 2.0
SLACK = 4.0  # worker start, thread scheduling on a busy 2-core machine


@pytest.fixture
def clean_s3_cache():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def http_dataset(http_dir):
    local, url = http_dir
    make_shards(local, [3, 3])
    return local, url


@pytest.fixture
def proxy(http_root):
    """A fault proxy in front of the HTTP server. fsspec keeps one HTTPFileSystem (and its aiohttp connection
    pool) per process: a pooled keep-alive connection from an earlier test, to an earlier proxy on a port
    the OS hands out again, must not stand in for this proxy's connections, so the cache starts empty."""
    from fsspec.implementations.http import HTTPFileSystem

    HTTPFileSystem.clear_instance_cache()
    _, base = http_root
    with FaultProxy(int(base.rsplit(":", 1)[1])) as p:
        yield p
    HTTPFileSystem.clear_instance_cache()


def _timed(fn, exc, match):
    start = time.monotonic()
    with pytest.raises(exc, match=match) as info:
        fn()
    return time.monotonic() - start, info.value


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


# ----------------------------------------------------------------------------------- stalled HTTP server


def test_info_against_a_stalled_http_server_ends_within_the_deadline(http_dataset, proxy):
    _, url = http_dataset
    proxy.mode = "stall"
    stalled = proxy.url + _path(url)
    took, err = _timed(
        lambda: describe(stalled, storage_options={"read_deadline": DEADLINE}),
        StorageTimeoutError,
        "no answer within the 2 s deadline",
    )
    assert took < DEADLINE + SLACK
    assert f"{stalled}/_info.json" in str(err) and "--read-deadline" in str(err)
    # the command line: one line, exit 1, no traceback
    start = time.monotonic()
    result = CliRunner().invoke(cli, ["info", stalled, "--read-deadline", "2"])
    assert time.monotonic() - start < DEADLINE + SLACK
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {stalled}/_info.json: read got no answer"), lines


def test_a_timeout_is_not_file_not_found(http_dataset, proxy):
    """fsspec's HTTP filesystem turns a failed HEAD into FileNotFoundError; it must not read as 'missing'."""
    _, url = http_dataset
    proxy.mode = "stall"
    took, err = _timed(
        lambda: read_info(proxy.url + _path(url), {"read_deadline": DEADLINE}),
        StorageTimeoutError,
        "no answer",
    )
    assert not isinstance(err, FileNotFoundError)
    import fsspec

    fs = fsspec.filesystem(
        "http",
        skip_instance_cache=True,
        client_kwargs={"timeout": __import__("aiohttp").ClientTimeout(sock_read=0.5)},
    )
    with pytest.raises(FileNotFoundError) as fnf:  # what fsspec itself says of a stalled server
        fs.info(proxy.url + _path(url) + "/_info.json")
    assert is_transient(fnf.value)  # ... and we see through it
    real_404 = pytest.raises(FileNotFoundError, match="no _info.json at")
    with real_404:
        read_info(url + "/nowhere", {"read_deadline": DEADLINE})


def test_verify_against_a_server_that_stalls_mid_shard(http_dataset, proxy):
    _, url = http_dataset
    proxy.stall_after = 6000  # _info.json passes, the first shard stops after a few KB
    took, err = _timed(
        lambda: verify_shards(proxy.url + _path(url), storage_options={"read_deadline": DEADLINE}),
        StorageTimeoutError,
        r"train-000000\.tar: read at byte \d+ got no answer within the 2 s",
    )
    assert took < DEADLINE + SLACK


# with workers, torch's DataLoader takes 2 x 5 s to shut its workers down after one of them raised
@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_loader_over_http_stalled_mid_shard(http_dataset, proxy, num_workers):
    from relabel_shards.loader import make_loader

    _, url = http_dataset
    loader = make_loader(
        proxy.url + _path(url),
        batch_size=2,
        num_workers=num_workers,
        image_size=16,
        storage_options={"read_deadline": DEADLINE},
        on_error="skip",
    )
    proxy.stall_after = 6000
    took, err = _timed(
        lambda: list(loader), StorageTimeoutError, r"train-00000[01]\.tar: read at byte \d+ got no"
    )
    assert took < DEADLINE + SLACK + (3 if num_workers else 0)  # + worker start


_RESET_PROBE = """
import json, logging, sys
from relabel_shards.storage import StorageError
from relabel_shards.tarstream import RetryingReader, fsspec_opener, iter_tar_samples
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("relabel_shards").addHandler(handler)
logging.getLogger("relabel_shards").setLevel(logging.WARNING)
shard, retries = sys.argv[1], int(sys.argv[2])
reader = RetryingReader(fsspec_opener(shard, {"read_deadline": 10}), shard, retries=retries, backoff=0.05)
try:
    out = {"samples": len(list(iter_tar_samples(reader, shard)))}
except StorageError as e:
    out = {"error": str(e)}
out["retried"] = reader.retried
out["retry_lines"] = sum("retry" in r.getMessage() and shard in r.getMessage() for r in records)
print(json.dumps(out))
"""


def _read_in_a_fresh_process(shard: str, retries: int) -> dict:
    """Read the shard through RetryingReader in a new interpreter: its own fsspec event loop and aiohttp
    pool, so nothing an earlier test left in this process (sessions, pooled connections, the shared loop)
    takes part (in long full-suite runs this read once hung on such state, never when run alone)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _RESET_PROBE, shard, str(retries)], capture_output=True,
                          text=True, timeout=60, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_resets_are_retried_counted_and_logged(http_dataset, proxy):
    local, url = http_dataset
    proxy.reset_first = 3
    shard = proxy.url + _path(url) + "/train-000000.tar"
    # retries to spare: under load a reset during the handshake can cost aiohttp a second connection
    got = _read_in_a_fresh_process(shard, retries=6)
    assert got.get("samples") == 3, got
    assert 1 <= got["retried"] <= 6  # aiohttp may retry a reset connection once by itself
    assert got["retry_lines"] == got["retried"]  # each retry logged, naming the URL
    proxy.mode = "reset"  # every connection: an error naming the URL after the last retry
    got = _read_in_a_fresh_process(shard, retries=2)
    # a reset during the handshake reads as a failed connect on some kernels: either message names the URL
    assert re.match(rf"{re.escape(shard)}: (read at byte 0 failed after 2 retries: .*reset|cannot connect)",
                    got.get("error", "")), got


# ------------------------------------------------------------------------------------------ stalled S3


@pytest.fixture
def s3_dataset(s3_bucket, s3_endpoint, clean_s3_cache):
    url = f"{s3_bucket}/ds"
    make_shards(url, [3, 3])
    with FaultProxy(int(s3_endpoint.rsplit(":", 1)[1])) as p:
        yield url, p, {"client_kwargs": {"endpoint_url": p.url}, "read_deadline": DEADLINE}


def test_loader_over_s3_that_stalls(s3_dataset):
    from relabel_shards.loader import make_loader

    url, proxy, opts = s3_dataset
    loader = make_loader(url, batch_size=2, num_workers=0, image_size=16, storage_options=opts)
    proxy.mode = "stall"  # also silences the kept-alive connection that read _info.json
    took, err = _timed(lambda: list(loader), StorageTimeoutError, rf"{url}/train-00000[01]\.tar: .*no answer")
    assert took < DEADLINE + SLACK


def test_info_and_verify_over_s3_that_stalls(s3_dataset):
    url, proxy, opts = s3_dataset
    proxy.mode = "stall"
    took, _ = _timed(lambda: describe(url, storage_options=opts), StorageTimeoutError, rf"{url}/_info.json")
    assert took < DEADLINE + SLACK
    took, _ = _timed(lambda: verify_shards(url, storage_options=opts), StorageTimeoutError, url)
    assert took < DEADLINE + SLACK


def _folder(root):
    import numpy as np
    from PIL import Image

    for j in range(3):
        d = root / f"c{j % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 40, 3), 40 * j, np.uint8)).save(d / f"img{j}.jpg")
    return root


def _maps(root):
    import torch

    (root / "c0").mkdir(parents=True)
    torch.save(torch.zeros(2, 5, 15, 15), root / "c0" / "img0.pt")
    return root


def test_build_to_s3_that_stalls_fails_before_the_first_batch(s3_dataset, tmp_path, monkeypatch):
    from relabel_shards.annotator import Annotator
    from relabel_shards.build import build_shards

    url, proxy, opts = s3_dataset
    calls = []
    real = Annotator.__call__
    monkeypatch.setattr(Annotator, "__call__", lambda self, x: calls.append(1) or real(self, x))
    proxy.mode = "stall"
    took, _ = _timed(
        lambda: build_shards(
            str(_folder(tmp_path / "src")),
            url + "-out",
            model="test_efficientnet",
            input_size=64,
            num_workers=0,
            storage_options=opts,
        ),
        StorageTimeoutError,
        rf"{url}-out: test write got no answer within the 2 s deadline",
    )
    assert calls == []
    assert took < 30  # includes creating the model


def test_convert_to_s3_that_stalls(s3_dataset, tmp_path):
    from relabel_shards.convert import convert_official

    url, proxy, opts = s3_dataset
    images = _folder(tmp_path / "images")
    _maps(tmp_path / "maps")
    proxy.mode = "stall"
    start = time.monotonic()
    with pytest.raises(StorageTimeoutError, match=rf"{url}-conv"):
        convert_official(
            str(images), str(tmp_path / "maps"), url + "-conv", num_workers=0, storage_options=opts
        )
    assert time.monotonic() - start < DEADLINE + SLACK


# ---------------------------------------------------------------------------- errors a user can act on


def test_missing_bucket_is_named_by_every_command(s3_endpoint, clean_s3_cache, tmp_path):
    from relabel_shards.loader import make_loader

    url = "s3://no-such-bucket-relabel/ds"
    for fn in (
        lambda: read_info(url),
        lambda: describe(url),
        lambda: verify_shards(url),
        lambda: make_loader(url, batch_size=2, num_workers=0),
    ):
        with pytest.raises(
            StorageNotFoundError,
            match=rf"{url}/_info.json: the bucket does not exist: check its "
            "name",
        ):
            fn()
    for args in (["info", url], ["verify", url]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            f"Error: {url}/_info.json: the bucket does not exist: check its name (and the endpoint / "
            "region), or create it first"
        ], result.output


def test_build_and_convert_to_a_missing_bucket_fail_before_the_first_batch(
    s3_endpoint, clean_s3_cache, tmp_path, monkeypatch
):
    from relabel_shards.annotator import Annotator
    from relabel_shards.build import build_shards
    from relabel_shards.convert import convert_official

    calls = []
    real = Annotator.__call__
    monkeypatch.setattr(Annotator, "__call__", lambda self, x: calls.append(1) or real(self, x))
    src = _folder(tmp_path / "src")
    out = "s3://no-such-bucket-relabel/out"
    with pytest.raises(
        StorageNotFoundError, match=r"s3://no-such-bucket-relabel/out: the bucket does not exist"
    ):
        build_shards(str(src), out, model="test_efficientnet", input_size=64, num_workers=0)
    assert calls == []
    _maps(tmp_path / "maps")
    with pytest.raises(StorageNotFoundError, match="the bucket does not exist"):
        convert_official(str(src), str(tmp_path / "maps"), out, num_workers=0)
    result = CliRunner().invoke(
        cli,
        [
            "build",
            str(src),
            out,
            "--model",
            "test_efficientnet",
            "--input-size",
            "64",
            "--num-workers",
            "0",
            "--no-progress",
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: s3://no-such-bucket-relabel/out: the bucket does not exist: check its name (and the "
        "endpoint / region), or create it first"
    ), result.output


def test_no_credentials(s3_bucket, monkeypatch, clean_s3_cache, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    url = f"{s3_bucket}/ds"
    with pytest.raises(
        StoragePermissionError, match=rf"{url}/_info.json: no credentials .*AWS_ACCESS_KEY_ID"
    ):
        read_info(url)
    result = CliRunner().invoke(cli, ["verify", url])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "no credentials" in result.output and "storage_options={'anon': True}" in result.output


def test_access_denied(s3_endpoint, clean_s3_cache):
    """moto's server does not enforce IAM policies by default, so a real S3 403 AccessDenied answer comes from
    the proxy ("forbidden" mode): the same bytes on the wire as AWS sends."""
    with FaultProxy(mode="forbidden") as p:
        opts = {"client_kwargs": {"endpoint_url": p.url}}
        with pytest.raises(
            StoragePermissionError, match=r"s3://bkt/ds/_info.json: access denied .*bucket policy"
        ):
            read_info("s3://bkt/ds", opts)
        took, _ = _timed(
            lambda: verify_shards("s3://bkt/ds", storage_options=opts),
            StoragePermissionError,
            "access denied",
        )
        assert took < SLACK  # not retried


@pytest.mark.parametrize("scheme", ["s3", "http"])
def test_connection_refused_is_not_a_missing_info_json(scheme, s3_endpoint, clean_s3_cache):
    port = closed_port()
    if scheme == "s3":
        url, opts = "s3://bkt/ds", {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    else:
        url, opts = f"http://127.0.0.1:{port}/ds", {}
    opts.update(read_deadline=10, retries=1)
    took, err = _timed(
        lambda: read_info(url, opts),
        StorageError,
        rf"{url}/_info.json: cannot connect .*is the "
        "server up",
    )
    assert not isinstance(err, FileNotFoundError) and took < 10
    result = CliRunner().invoke(
        cli,
        ["info", url, "--read-deadline", "3" if scheme == "http" else "10"],
        env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"},
    )
    assert (
        result.exit_code == 1 and "cannot connect" in result.output and "_info.json at" not in result.output
    )


def test_read_deadline_option_is_checked():
    with pytest.raises(ValueError, match="read_deadline must be a number of seconds > 0, got 0"):
        read_info("s3://bkt/ds", {"read_deadline": 0})
    with pytest.raises(ValueError, match="retries must be an integer >= 0, got -1"):
        read_info("s3://bkt/ds", {"retries": -1})


def test_make_loader_passes_timeout_and_worker_init_fn(tmp_path):
    from relabel_shards.loader import make_loader

    make_shards(tmp_path, [3, 3])
    loader = make_loader(
        str(tmp_path), batch_size=2, num_workers=2, image_size=16, timeout=1, worker_init_fn=_slow_init
    )
    with pytest.raises(RuntimeError, match=r"DataLoader timed out after 1 seconds"):
        list(loader)
    with pytest.raises(ValueError, match="persistent_workers=True is not supported"):
        make_loader(str(tmp_path), batch_size=2, num_workers=2, persistent_workers=True)
    with pytest.raises(ValueError, match="timeout applies to DataLoader workers"):
        make_loader(str(tmp_path), batch_size=2, num_workers=0, timeout=5)


def _slow_init(worker_id: int) -> None:
    time.sleep(3)


def test_deadline_from_the_environment(monkeypatch, http_dataset, proxy):
    _, url = http_dataset
    proxy.mode = "stall"
    monkeypatch.setenv("RELABEL_SHARDS_READ_DEADLINE", "1.5")
    took, _ = _timed(
        lambda: read_info(proxy.url + _path(url)), StorageTimeoutError, "within the 1.5 s deadline"
    )
    assert took < 1.5 + SLACK
    assert os.environ["RELABEL_SHARDS_READ_DEADLINE"] == "1.5"


def test_build_from_input_shards_on_s3_that_stalls(s3_dataset, tmp_path):
    """The input side of build (sources.iter_shard_samples) has the same deadline."""
    from relabel_shards.build import build_shards

    url, proxy, opts = s3_dataset
    proxy.stall_after = 4000  # listing and _info.json pass; the first input shard stops early
    took, _ = _timed(
        lambda: build_shards(
            f"{url}/train-{{000000..000001}}.tar",
            str(tmp_path / "out"),
            model="test_efficientnet",
            input_size=64,
            num_workers=0,
            storage_options=opts,
        ),
        StorageTimeoutError,
        rf"{url}/train-00000[01]\.tar: (open|read at byte \d+) got no answer",
    )
    assert took < 30  # includes creating the model


def test_gcs_that_stalls(gcs_endpoint, monkeypatch):
    import gcsfs

    with FaultProxy(int(gcs_endpoint.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        gcsfs.GCSFileSystem.clear_instance_cache()
        opts = {"token": "anon", "project": "test"}
        gcsfs.GCSFileSystem(**opts).mkdir("relabel-stall")
        make_shards("gs://relabel-stall/ds", [3], storage_options=opts)
        proxy.mode = "stall"
        took, _ = _timed(
            lambda: read_info("gs://relabel-stall/ds", {**opts, "read_deadline": DEADLINE}),
            StorageTimeoutError,
            r"gs://relabel-stall/ds/_info.json: read got no answer",
        )
        assert took < DEADLINE + SLACK
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.mark.slow
def test_build_and_convert_from_a_folder_on_s3_that_stalls(s3_dataset, tmp_path):
    """Listing a source folder goes through s3fs directly: bounded by the per-request timeouts and the
    cut-down retries (about twice the deadline), and raised as a StorageError naming the source."""
    from relabel_shards.build import build_shards
    from relabel_shards.convert import convert_official

    url, proxy, opts = s3_dataset
    proxy.mode = "stall"
    took, _ = _timed(
        lambda: build_shards(
            f"{url}-src",
            str(tmp_path / "out"),
            model="test_efficientnet",
            input_size=64,
            num_workers=0,
            storage_options=opts,
        ),
        StorageTimeoutError,
        rf"{url}-src: no answer",
    )
    assert took < 2 * DEADLINE + SLACK + 10  # + creating the model
    took, _ = _timed(
        lambda: convert_official(
            f"{url}-src", str(tmp_path / "maps"), str(tmp_path / "c"), num_workers=0, storage_options=opts
        ),
        StorageTimeoutError,
        rf"{url}-src: no answer",
    )
    assert took < 2 * DEADLINE + SLACK

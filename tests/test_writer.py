"""The generic shard job: rank ownership, resume checks, sidecars, _info.json assembly, background thread."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from relabel_shards.plan import FailureTally
from relabel_shards.shards import read_info
from relabel_shards.writer import ChunkSink, SerialExecutor, ShardJob, resolve_rank


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


_RANK_ENV = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((None, None), {}, (0, 1)),
        ((None, None), {"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
        ((1, 2), {"RANK": "3", "WORLD_SIZE": "4"}, (1, 2)),  # explicit beats the environment
        ((None, None), {"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, (0, 1)),  # Slurm's variables are not read
        ((np.int64(1), np.int64(2)), {}, (1, 2)),
        ((None, None), {"RANK": "2", "WORLD_SIZE": "2"}, r"rank must be in \[0, world_size=2\), got rank=2 "
                                                         r"\(from RANK/WORLD_SIZE\)"),
        ((None, None), {"RANK": "1"}, r"RANK='1' and WORLD_SIZE=None: set both"),
        ((None, None), {"WORLD_SIZE": "2"}, r"RANK=None and WORLD_SIZE='2': set both"),
        ((None, None), {"RANK": "a", "WORLD_SIZE": "2"}, "RANK/WORLD_SIZE must be integers"),
        ((2, 2), {}, r"rank must be in \[0, world_size=2\), got rank=2"),
        ((1, None), {}, "give both rank and world_size or neither"),
        ((0, 0), {}, "world_size must be an integer >= 1, got 0"),
        ((0.5, 2), {}, "rank must be an integer, got 0.5"),
    ],
)
def test_one_rank_rule_for_writer_and_loader(monkeypatch, args, env, expected):
    """writer.resolve_rank and order.resolve_world are one function: same answers, same errors."""
    from relabel_shards.order import resolve_world

    for k in _RANK_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for fn in (resolve_rank, resolve_world):
        if isinstance(expected, tuple):
            assert fn(*args) == expected
        else:
            with pytest.raises(ValueError, match=expected):
                fn(*args)


def test_rank_rule_prefers_initialized_torch_distributed(monkeypatch, tmp_path):
    import torch.distributed as dist

    from relabel_shards.order import resolve_world

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert resolve_rank() == resolve_world(None, None) == (0, 1)
        assert resolve_rank(1, 2) == (1, 2)
    finally:
        dist.destroy_process_group()


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


def test_failure_tally_logs_or_raises(caplog):
    chunk = _chunk(0, False, [{"key": "a"}, {"key": "b", "source": "dir/b.jpg", "reason": "not an image"}])
    with caplog.at_level("WARNING"):
        assert [f["key"] for f in FailureTally("build").take(chunk, strict=False)] == ["b"]
    assert "dir/b.jpg" in caplog.text and "not an image" in caplog.text
    with pytest.raises(ValueError, match=r"^dir/b\.jpg: not an image \(strict: a bad input stops the build"):
        FailureTally("build").take(chunk, strict=True)
    fatal = _chunk(0, False, [{"key": "c", "source": "s", "reason": "shard s is truncated", "fatal": True}])
    with pytest.raises(ValueError, match="^shard s is truncated$"):
        FailureTally("build").take(fatal, strict=False)


# ------------------------------------------------------------------------- nothing lost, nothing overwritten


def _foreign_dataset(root):
    """WebDataset shards and a timm-style _info.json that relabel-shards did not write."""
    import io
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        with tarfile.open(root / f"p-{i:06d}.tar", "w") as tar:
            data = b"foreign %d" % i
            ti = tarfile.TarInfo(f"k{i}.txt")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    info = {"name": "someone-elses", "splits": {"train": {"name": "train", "num_samples": 6,
                                                          "filenames": [f"p-{i:06d}.tar" for i in range(6)],
                                                          "shard_lengths": [1] * 6}}}
    (root / "_info.json").write_text(json.dumps(info))
    return {p.name: p.read_bytes() for p in root.iterdir()}


def test_a_folder_holding_another_dataset_is_refused_unless_overwrite(tmp_path):
    before = _foreign_dataset(tmp_path / "ds")
    job = ShardJob(str(tmp_path / "ds"), prefix="p", num_shards=2, fingerprint="f")
    refused = r"ds holds another dataset: _info.json with splits \['train'\] not written by relabel-shards"
    with pytest.raises(FileExistsError, match=refused + r".*overwrite=True \(--overwrite\)"):
        job.pending()
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before  # nothing touched
    job = ShardJob(str(tmp_path / "ds"), prefix="p", num_shards=2, fingerprint="f", overwrite=True)
    for i in job.pending():
        _write(job, i)
    info = job.finalize("train", {})
    assert info["filenames"] == ["p-000000.tar", "p-000001.tar"]
    written = read_info(str(tmp_path / "ds"))
    assert written["name"] == "ds" and list(written["splits"]) == ["train"]  # the foreign name is gone
    assert (tmp_path / "ds" / "p-000005.tar").read_bytes() == before["p-000005.tar"]  # left, not deleted


def test_tars_under_our_prefix_without_our_sidecars_are_another_dataset(tmp_path):
    (tmp_path / "p-000007.tar").write_bytes(b"\0" * 1024)  # a longer foreign dataset with our names
    with pytest.raises(FileExistsError, match=r"1 \.tar file without relabel-shards sidecars \(p-000007"):
        ShardJob(str(tmp_path), prefix="p", num_shards=1, fingerprint="f").pending()
    # our own shard name without its sidecar is what a killed run leaves: not foreign; other names are not
    # written over, so they do not count either
    (tmp_path / "p-000007.tar").unlink()
    (tmp_path / "p-000000.tar").write_bytes(b"\0" * 1024)
    (tmp_path / "imagenet1k-train-0000.tar").write_bytes(b"\0" * 1024)
    assert ShardJob(str(tmp_path), prefix="p", num_shards=1, fingerprint="f").pending() == [0]


def test_cli_build_refuses_a_foreign_folder(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from relabel_shards.cli import cli

    (tmp_path / "src" / "c").mkdir(parents=True)
    Image.new("RGB", (32, 24)).save(tmp_path / "src" / "c" / "a.jpg")
    _foreign_dataset(tmp_path / "ds")
    result = CliRunner().invoke(cli, ["build", str(tmp_path / "src"), str(tmp_path / "ds"), "--model",
                                      "test_efficientnet", "--input-size", "64", "--num-workers", "0",
                                      "--no-progress"])
    assert result.exit_code == 1
    assert "holds another dataset" in result.output and "--overwrite" in result.output


_HOLDER = """
import sys
from relabel_shards.writer import ShardJob
job = ShardJob(sys.argv[1], prefix="p", num_shards=1, fingerprint="f")
todo = job.pending()
out = job.open(todo[0])
out.add("k", [("k.txt", b"x")])
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_second_build_of_the_same_rank_is_refused_and_keeps_the_first_ones_temporary(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout.readline().strip() == "holding"
        temps = [n for n in os.listdir(tmp_path) if n.startswith(".p-000000.tar.")]
        assert len(temps) == 1
        second = ShardJob(str(tmp_path), prefix="p", num_shards=1, fingerprint="f")
        with pytest.raises(RuntimeError, match=rf"another build is writing here \(rank 0, pid {holder.pid} "):
            second.pending()
        assert [n for n in os.listdir(tmp_path) if n.startswith(".p-000000.tar.")] == temps  # not deleted
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the first one is gone: its lock goes with it, and its temporary is now stale
    job = ShardJob(str(tmp_path), prefix="p", num_shards=1, fingerprint="f")
    assert job.pending() == [0]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".p-000000.tar.")]
    _write(job, 0)
    job.finalize("train", {})
    assert sorted(os.listdir(tmp_path)) == ["_info.json", "p-000000.tar", "p-000000_stats.json"]


def _env() -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


class _FullDisk:
    """A file whose buffered bytes can no longer be written: flush (and so close) raise ENOSPC."""

    def __init__(self, f):
        self._f = f
        self.closed = False

    def flush(self):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        try:
            self.flush()
        finally:
            self._f.close()
            self.closed = True

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_abort_removes_the_temporary_even_when_flush_fails_with_enospc(tmp_path):
    from relabel_shards.shards import PartialShard

    shard = PartialShard(str(tmp_path), "p-000000.tar")
    shard.add([("a.txt", b"x" * 4096)])
    shard._file = _FullDisk(shard._file)
    shard.abort()
    assert os.listdir(tmp_path) == []
    shard = PartialShard(str(tmp_path), "p-000000.tar")
    shard.add([("a.txt", b"x" * 4096)])
    shard._file = _FullDisk(shard._file)
    shard._tar.fileobj = shard._file
    with pytest.raises(OSError, match="No space left on device"):
        shard.commit()
    assert os.listdir(tmp_path) == []


def test_enospc_on_a_small_tmpfs_leaves_no_temporary(tmp_path):
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
                      ).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        job = ShardJob(str(mnt / "ds"), prefix="p", num_shards=1, fingerprint="f")
        assert job.pending() == [0]
        out = job.open(0)
        with pytest.raises(OSError, match="No space left on device"):
            for j in range(100):
                out.add(f"k{j}", [(f"k{j}.bin", os.urandom(16384))])
            out.commit()
        out.abort()
        job.fail("disk full")
        assert os.listdir(mnt / "ds") == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ----------------------------------------------------------------------------------- one rank fails


_RANK = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from relabel_shards.writer import ChunkSink, ShardJob
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=120))
job = ShardJob(out, prefix="p", num_shards=2, fingerprint="f")
todo = job.pending()

def fill(shard, chunk):
    if rank == 1:
        time.sleep(1)  # rank 0 is waiting in finalize by now
        raise ValueError("rank 1 broke on purpose")
    shard.add("k0", [("k0.txt", b"x")])

start = time.monotonic()
try:
    with ChunkSink(job, fill) as sink:
        for i in todo:
            sink.submit({"task": i, "end": True, "entries": []})
    job.finalize("train", {})
    print("finished")
except Exception as e:
    print(f"{type(e).__name__}: {e} after {time.monotonic() - start:.1f} s", flush=True)
if rank == 1:  # a failed rank that stays alive (a caller that catches the error, a slow teardown)
    import os
    while not os.path.exists(sys.argv[4]) and time.monotonic() - start < 45:
        time.sleep(0.1)
"""


@pytest.mark.slow
def test_finalize_does_not_hang_the_other_ranks_when_one_fails(tmp_path):
    import subprocess
    import sys

    from faultproxy import closed_port

    port = str(closed_port())
    env = _env()
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    release = tmp_path / "release"
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(r), port, str(tmp_path / "ds"), str(release)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [procs[0].communicate(timeout=100)[0].strip()]
    release.touch()
    outs.append(procs[1].communicate(timeout=100)[0].strip())
    assert outs[1].startswith("ValueError: rank 1 broke on purpose"), outs
    assert outs[0].startswith("RankFailedError: rank 1 failed: rank 1 broke on purpose; _info.json of "), outs
    assert float(outs[0].rsplit(" after ", 1)[1].split()[0]) < 30  # the process group's timeout is 120 s
    assert not (tmp_path / "ds" / "_info.json").exists()
    assert (tmp_path / "ds" / "p-000000.tar").exists()  # rank 0's complete shard is kept for the rerun


def test_a_storage_failure_stops_the_job_with_its_own_type():
    """build/convert workers send a StorageError as a fatal failure: it comes back as that type, no skip."""
    from relabel_shards.storage import StorageTimeoutError

    reason = "s3://b/x.tar: read got no answer"
    chunk = _chunk(0, True, [{"key": "k", "source": "s3://b/x.tar", "reason": reason, "fatal": True,
                              "storage": "StorageTimeoutError"}])
    with pytest.raises(StorageTimeoutError, match="s3://b/x.tar: read got no answer"):
        FailureTally("build").take(chunk, strict=False)


def test_duplicate_key_check_names_the_first_repeat_in_shard_order(monkeypatch):
    """The key check hashes keys (no dict of every key) and names the first key met twice, in shard order,
    with both shards (oracle: a dict walk over the keys in order)."""
    import tracemalloc

    from relabel_shards.shards import ShardRecord
    from relabel_shards.writer import ShardStats, _check_unique_keys

    def stats(name, keys):
        rec = ShardRecord(filename=name, num_samples=len(keys), bytes=0, sha256="0" * 64)
        return ShardStats(record=rec, keys=tuple(keys), failures=(), fingerprint="f")

    shards = [stats("a.tar", ["k1", "k2", "k3"]), stats("b.tar", ["k4", "k3", "k2"]), stats("c.tar", ["k1"])]
    with pytest.raises(ValueError, match=r"^duplicate sample key 'k3': in a\.tar and in b\.tar$"):
        _check_unique_keys(shards)
    big = [stats(f"s{i}.tar", [f"n{i:04d}_{j}" for j in range(1000)]) for i in range(200)]
    tracemalloc.start()
    try:
        _check_unique_keys(big)  # 200k unique keys
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * 200_000, peak / 200_000  # the hashes (8 bytes a key); a dict took ~60


def test_finalize_holds_every_sidecar_compactly(tmp_path):
    """finalize gathers every shard's sidecar before the project sees them; it holds the keys and ``extra``
    compactly (13k sidecars of 1,000 keys and a class histogram at ImageNet-21k scale), and the project
    reads exactly what the sidecars hold (oracle: the written keys and extra)."""
    import tracemalloc

    from relabel_shards.shards import ShardRecord
    from relabel_shards.writer import ShardStats

    shards, per = 60, 1000
    written = []
    for i in range(shards):
        keys = tuple(f"n{i:08d}_{i * per + j}" for j in range(per))
        extra = {"classes": {"distinct": per, "top": {str(c): 1 + c % 3 for c in range(per)}}, "i": i}
        rec = ShardRecord(filename=f"p-{i:06d}.tar", num_samples=per, bytes=0, sha256="0" * 64)
        (tmp_path / rec.filename).write_bytes(b"")
        (tmp_path / f"p-{i:06d}_stats.json").write_bytes(
            ShardStats(record=rec, keys=keys, failures=(), fingerprint="f", extra=extra).to_json()
        )
        written.append((keys, extra))
    job = ShardJob(str(tmp_path), prefix="p", num_shards=shards, fingerprint="f", rank=0, world_size=1)
    seen: dict = {}

    def project(stats):
        seen["held"] = tracemalloc.get_traced_memory()[0]  # every sidecar is in memory here
        seen["read"] = [(tuple(s.keys), s.extra) for s in stats]
        seen["eq"] = stats[3].keys == written[3][0] and len(stats[3].keys) == per and stats[3].keys[-1]
        return {"n": len(stats)}

    tracemalloc.start()
    try:
        info = job.finalize("train", project)
    finally:
        tracemalloc.stop()
    assert info["relabel_shards"]["n"] == shards
    assert seen["read"] == written and seen["eq"] == written[3][0][-1]
    # ShardStats as parsed held ~150 bytes a key here; now ~24 (keys and histogram entries as Python objects)
    assert seen["held"] / (shards * per) < 50, seen["held"] / (shards * per)

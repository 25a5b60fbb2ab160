"""Two real ranks (gloo, separate processes) x two DataLoader workers: exactly once, and no DDP hang."""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_loader_factory import key_of, make_shards

from relabel_shards.loader import make_loader

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, even: str, uneven: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = {}
        # rank and world size come from torch.distributed: nothing passed explicitly
        # fork: this process was spawned, and spawned DataLoader workers would re-import torch (slow)
        loader = make_loader(even, batch_size=3, num_workers=2, image_size=16, seed=11,
                             multiprocessing_context="fork")
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            result[f"keys{epoch}"] = [k for b in loader for k in b["keys"]]
        # uneven shards: one collective per batch, as DDP does; unequal batch counts would hang here
        loader = make_loader(uneven, batch_size=4, num_workers=2, image_size=16, seed=11,
                             multiprocessing_context="fork")
        steps = 0
        for _ in loader:
            t = torch.ones(1)
            dist.all_reduce(t)
            assert t.item() == 2
            steps += 1
        result["uneven_steps"] = steps
        result["uneven_len"] = len(loader)
        gathered = [None, None]
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_two_workers_each(tmp_path):
    even, uneven = tmp_path / "even", tmp_path / "uneven"
    make_shards(even, [4] * 8)  # 32 samples over 2 ranks x 2 workers: 2 shards per reader
    make_shards(uneven, [9, 2, 5, 1, 7, 3])  # 27 samples, uneven
    out = tmp_path / "result.json"
    mp.start_processes(_rank_main, args=(_free_port(), str(even), str(uneven), str(out)), nprocs=2,
                       start_method="spawn", join=True)
    r0, r1 = json.loads(out.read_text())
    for epoch in (0, 1):
        a, b = r0[f"keys{epoch}"], r1[f"keys{epoch}"]
        assert len(a) == len(b) == 16
        assert sorted(a + b) == [key_of(i) for i in range(32)]  # every sample exactly once per epoch
    assert r0["keys0"] != r0["keys1"]  # shards reshuffled across ranks/workers per epoch
    # ceil(27 / 4 readers) = 7 samples per worker -> 2 batches of <= 4 each, 2 workers -> 4 steps per rank
    assert r0["uneven_steps"] == r1["uneven_steps"] == r0["uneven_len"] == 4

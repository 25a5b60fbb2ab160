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


# ------------------------------------------------------------------------- elastic resume under gloo


def _resume_main(rank: int, world: int, port: int, data: str, workers: int, state_in: str | None,
                 out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        loader = make_loader(data, batch_size=4, num_workers=workers, image_size=16, seed=3,
                             shards_in_flight=2, shuffle_buffer=3, multiprocessing_context="fork")
        result: dict = {}
        if state_in is None:  # phase 1: two steps, then a checkpoint that rank 0 alone saves
            keys = []
            for i, b in enumerate(loader):
                keys += b["keys"]
                if i == 1:
                    break
            state = loader.state_dict()  # a collective: every rank gets the whole job's state
            result = {"keys": keys, "state_ranks": state["ranks"]}
            if rank == 0:
                Path(out + ".state").write_text(json.dumps(state))
        else:
            loader.load_state_dict(json.loads(Path(state_in).read_text()))
            keys, steps = [], 0
            for b in loader:
                t = torch.ones(1)
                dist.all_reduce(t)  # one collective per step, as DDP; unequal batch counts would hang
                keys += b["keys"]
                steps += 1
            result = {"keys": keys, "steps": steps}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, *args) -> list:
    out = args[-1]
    mp.start_processes(_resume_main, args=(world, _free_port(), *args), nprocs=world, start_method="spawn",
                       join=True)
    return json.loads(Path(out).read_text())


def test_gloo_state_gathered_on_every_rank_and_resumed_elastically(tmp_path):
    data = tmp_path / "data"
    make_shards(data, [4] * 8)  # 32 samples
    first = _spawn(2, str(data), 2, None, str(tmp_path / "a.json"))  # 2 ranks x 2 workers, 2 steps each
    assert all(r["state_ranks"] == [0, 1] for r in first)
    head = [k for r in first for k in r["keys"]]
    assert len(head) == 16
    state = str(tmp_path / "a.json.state")
    # elastic: 3 ranks x 1 worker take the 16 samples left (6 + 5 + 5: two steps each)
    rest = _spawn(3, str(data), 1, state, str(tmp_path / "b.json"))
    assert sorted(head + [k for r in rest for k in r["keys"]]) == [key_of(i) for i in range(32)]
    assert [r["steps"] for r in rest] == [2, 2, 2]
    # (the exact resume of the same 2 x 2 job from this state: test_loader_stream.py, in one process)

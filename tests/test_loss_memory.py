"""RCAR's loss memory (issue 20 part 5, issue 24 item 9): bounded to memory_size samples, merged by the rule of the
former dict memory, and across ranks gathered incrementally as tensors (only the rows added since the last refit)."""
import os
import random
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlmm.losses.loss_memory import LossMemory, key_hashes
from mlmm.losses.noisy import RCARLoss, RCARLossConfig


def dict_merge(rounds):
    """The former memory: per rank {key: (loss, step)} by assignment, merged over ranks, latest step (then rank) wins.
    `rounds`: per refit, per rank, a list of (key, loss, step) in recording order."""
    merged = {}
    for per_rank in rounds:
        parts = [dict(merged) for _ in per_rank]  # every rank starts from the merged memory of the last refit
        for part, rows in zip(parts, per_rank):
            for k, v, s in rows:
                part[k] = (v, s)
        merged = {}
        for part in parts:
            for k, (v, s) in part.items():
                if k not in merged or s >= merged[k][1]:
                    merged[k] = (v, s)
    return merged


def as_dict(memory, keys):
    """{key: (loss, step)} of `keys` found in `memory`."""
    pos = torch.searchsorted(memory.hashes, key_hashes(keys)).clamp(max=max(len(memory) - 1, 0))
    return {k: (float(memory.losses[p]), int(memory.steps[p])) for k, p in zip(keys, pos.tolist())
            if len(memory) and int(memory.hashes[p]) == int(key_hashes([k])[0])}


def random_rounds(world, seed, n_rounds=3, steps_per_round=4, rows=5):
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(30)]
    rounds, step = [], 0
    for _ in range(n_rounds):
        per_rank = [[] for _ in range(world)]
        for _ in range(steps_per_round):
            step += 1
            for r in range(world):
                per_rank[r] += [(rng.choice(keys), float(torch.tensor(rng.random()).float()), step)
                                for _ in range(rows)]
        rounds.append(per_rank)
    return rounds, keys


def test_merge_equals_the_dict_memory_and_capacity_drops_the_oldest():
    rounds, keys = random_rounds(1, seed=0)
    memory = LossMemory(capacity=100)
    for per_rank in rounds:
        for k, v, s in per_rank[0]:
            memory.record([k], torch.tensor([v]), s)
        memory.merge()
    assert as_dict(memory, keys) == dict_merge(rounds)
    # bounded: 8 samples into a memory of 5 -> the 3 recorded longest ago are gone (no posterior any more)
    small = LossMemory(capacity=5)
    for step in range(8):
        small.record([f"s{step}"], torch.tensor([float(step)]), step)
    small.merge()
    small.set_posterior(torch.full((5,), 0.25, dtype=torch.float64))
    assert len(small) == 5 and sorted(as_dict(small, [f"s{i}" for i in range(8)])) == [f"s{i}" for i in range(3, 8)]
    assert small.dropped == 3
    assert torch.isnan(small.posterior(["s0", "s2"])).all() and small.posterior(["s7"]).tolist() == [0.25]
    small.record(["s0"], torch.tensor([9.0]), 8)  # recorded again: back in, the oldest (s3) out
    small.merge()
    assert sorted(as_dict(small, [f"s{i}" for i in range(8)])) == ["s0", "s4", "s5", "s6", "s7"]
    assert torch.isnan(small.posterior(["s0"])).all() and small.posterior(["s5"]).tolist() == [0.25]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, rounds, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gathered, real_gather = [], dist.all_gather
    dist.all_gather = lambda parts, t, *a, **k: (gathered.append(tuple(t.shape)), real_gather(parts, t, *a, **k))[1]
    dist.all_gather_object = None  # the former merge: every rank's whole dictionary, pickled
    loss = RCARLoss(RCARLossConfig(min_memory=4, memory_size=100), ["image", "text"])
    for per_rank in rounds:
        for k, v, s in per_rank[rank]:
            loss.steps = s
            loss.record([k], torch.tensor([v]))
        loss.refit()
    m = loss.memory
    out_q.put((rank, m.hashes.tolist(), m.losses.tolist(), m.steps.tolist(), m.w.tolist(), gathered, loss.fits))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_gather_only_the_new_rows_as_tensors_and_fit_the_same_memory():
    world = 2
    rounds, keys = random_rounds(world, seed=1)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, rounds, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    (_, *table0, gathered0, fits0), (_, *table1, _, fits1) = results
    assert table0 == table1 and fits0 == fits1 == len(rounds)  # identical memory and posteriors on every rank
    ref = dict_merge(rounds)
    memory = LossMemory(100)
    memory.hashes, memory.losses, memory.steps = (torch.tensor(table0[0]), torch.tensor(table0[1]),
                                                  torch.tensor(table0[2]))
    assert as_dict(memory, keys) == ref
    # per refit: the row counts, then the new rows (padded to the longest rank), never the table
    new_rows = len(rounds[0][0])
    assert gathered0 == [(1,), (new_rows, 3)] * len(rounds)

"""A bounded per-sample loss memory for losses that refit a model of the loss distribution (RCAR's beta mixture).

    memory = LossMemory(capacity=1 << 20)
    memory.record(batch_keys, per_sample_loss, step)      # every training step: kept on the device, no host sync
    memory.merge()                                        # at a refit: gather what every rank added, as tensors
    x = memory.losses                                     # Float32[M]: the latest loss of every remembered sample
    memory.set_posterior(w)                               # Float64[M], aligned with `losses`
    memory.posterior(keys)                                # Float64[n]: NaN for samples without a posterior

Samples are known by a 64-bit hash of their key (blake2b), so the table is four flat tensors:
``hashes`` Long[M] (sorted), ``losses`` Float32[M], ``steps`` Long[M], ``w`` Float64[M] — 28 bytes per sample, at
most ``capacity`` samples (1 << 20 = 28 MiB). When a merge brings it past the capacity, the samples recorded longest
ago are dropped (ties: smaller hash first); a dropped sample has no posterior until it is recorded again.

Between merges each rank appends its ``(hash, loss, step)`` rows to a pending list (at most ``refit_every`` steps of
its own rows). A merge all-gathers only those rows — two collectives: the row counts, then the rows padded to the
longest — and every rank folds them into its table in rank order, so the tables stay identical. For a sample recorded
several times, the row with the latest step wins, then the later rank, then the later row: the rule of the previous
dict-based memory. A sample whose loss is updated keeps its posterior until the next fit.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def key_hashes(keys: Sequence[str]) -> torch.Tensor:
    """Stable 64-bit hashes of sample keys (the same in every process and run): Long[n] on the CPU."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(str(k).encode("utf-8"), digest_size=8).digest(), "little",
                                        signed=True) for k in keys], dtype=torch.long)


def _last_per_hash(hashes: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Index of the winning row of every distinct hash (latest step, then the later row), sorted by hash."""
    order = torch.arange(len(hashes))
    order = order[torch.sort(steps[order], stable=True).indices]  # by step, arrival order kept within a step
    order = order[torch.sort(hashes[order], stable=True).indices]  # grouped by hash, ascending (step, arrival)
    _, counts = torch.unique_consecutive(hashes[order], return_counts=True)
    return order[torch.cumsum(counts, 0) - 1]


class LossMemory:
    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.hashes = torch.empty(0, dtype=torch.long)  # [M], sorted
        self.losses = torch.empty(0, dtype=torch.float32)  # [M]
        self.steps = torch.empty(0, dtype=torch.long)  # [M]
        self.w = torch.empty(0, dtype=torch.float64)  # [M], NaN = no posterior yet
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (hashes [n] CPU, losses [n] device, step)
        self.dropped = 0  # samples dropped to stay within the capacity (by this process, since it started)

    def __len__(self) -> int:
        return len(self.hashes)

    def record(self, keys: Sequence[str], losses: torch.Tensor, step: int) -> None:
        """Remember ``losses`` [n] (detached, left on their device) of the samples ``keys`` at training ``step``."""
        self.pending.append((key_hashes(keys), losses.detach().float().reshape(-1), int(step)))

    def _pending_rows(self) -> torch.Tensor:
        """This rank's pending rows packed as Long[n, 3] (hash, step, float64 bits of the loss), on their device."""
        if not self.pending:
            return torch.empty(0, 3, dtype=torch.long)
        device = self.pending[0][1].device
        h = torch.cat([p[0] for p in self.pending]).to(device)
        loss = torch.cat([p[1] for p in self.pending]).double().view(torch.long)
        s = torch.cat([torch.full((len(p[0]),), p[2], dtype=torch.long) for p in self.pending]).to(device)
        return torch.stack([h, s, loss], dim=1)  # [n, 3]

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's pending rows, in rank order: Long[sum n, 3] on the CPU."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return rows.cpu()
        world = dist.get_world_size()
        n = torch.tensor([len(rows)], dtype=torch.long, device=rows.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        sizes = [int(x) for x in sizes]
        padded = torch.zeros(max(sizes), 3, dtype=torch.long, device=rows.device)  # [max n, 3]
        padded[: len(rows)] = rows
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:k].cpu() for p, k in zip(parts, sizes)])

    def merge(self) -> None:
        """Fold every rank's pending rows into the table (a collective call when several ranks run)."""
        rows = self._gather(self._pending_rows())
        self.pending = []
        if not len(rows):
            return
        hashes = torch.cat([self.hashes, rows[:, 0]])
        steps = torch.cat([self.steps, rows[:, 1]])
        losses = torch.cat([self.losses, rows[:, 2].view(torch.float64).float()])
        keep = _last_per_hash(hashes, steps)  # sorted by hash
        if len(keep) > self.capacity:  # drop the oldest: smallest step, then smallest hash (`keep` is hash-sorted)
            self.dropped += len(keep) - self.capacity
            newest = keep[torch.sort(steps[keep], stable=True).indices[len(keep) - self.capacity:]]
            keep = newest[torch.argsort(hashes[newest])]
        old_w = self.posterior_of(hashes[keep])  # a sample keeps its posterior until the next fit
        self.hashes, self.steps, self.losses, self.w = hashes[keep], steps[keep], losses[keep], old_w

    def set_posterior(self, w: torch.Tensor) -> None:
        if w.shape != self.hashes.shape:
            raise ValueError(f"posterior of shape {tuple(w.shape)} for a memory of {len(self)} samples")
        self.w = w.detach().double().cpu()

    def posterior_of(self, hashes: torch.Tensor) -> torch.Tensor:
        """Posterior per hash: Float64[n], NaN where the table has none."""
        out = torch.full((len(hashes),), float("nan"), dtype=torch.float64)
        if len(self.hashes) and len(hashes):
            pos = torch.searchsorted(self.hashes, hashes).clamp(max=len(self.hashes) - 1)
            hit = self.hashes[pos] == hashes
            out[hit] = self.w[pos[hit]]
        return out

    def posterior(self, keys: Sequence[str]) -> torch.Tensor:
        """Posterior of each sample key: Float64[n], NaN for samples without one."""
        return self.posterior_of(key_hashes(keys))

    def state(self) -> dict[str, torch.Tensor]:
        """The table and this rank's pending rows, as CPU tensors (for checkpoints)."""
        return {"hashes": self.hashes, "losses": self.losses, "steps": self.steps, "w": self.w,
                "pending": self._pending_rows().cpu(), "capacity": torch.tensor(self.capacity)}

    def load(self, state: dict, device: Optional[torch.device] = None) -> None:
        self.hashes, self.losses = state["hashes"].long(), state["losses"].float()
        self.steps, self.w = state["steps"].long(), state["w"].double()
        rows = state["pending"].long()  # [n, 3], in step order
        _, counts = torch.unique_consecutive(rows[:, 1], return_counts=True)
        self.pending = [(part[:, 0], part[:, 2].view(torch.float64).float().to(device or "cpu"), int(part[0, 1]))
                        for part in torch.split(rows, counts.tolist())]

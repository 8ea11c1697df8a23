"""Feeding the device: the next batch's host-to-device copy overlaps the current step.

:class:`DevicePrefetcher` hands out ``(host_batch, device_batch, error)``. Right after batch k is handed out, batch
k+1 is fetched from the loader, checked and copied to the device on a side CUDA stream (from pinned memory, so the
copy is asynchronous); the training stream waits for that copy only when it takes batch k+1. On CPU it is a plain
pipeline. An exception while fetching or preparing a batch is handed out in place of that batch, so the trainer
can take the decision to stop together with the other ranks (:meth:`mlmm.training.Trainer.train_step`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from mlmm.data.batch import Batch


def _tensors(batch: Batch):
    for v in vars(batch).values():
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dict):
            yield from (t for t in v.values() if isinstance(t, torch.Tensor))


class DevicePrefetcher:
    """Iterate ``(host batch, device batch, error)`` over `loader`; ``prepare(host) -> device batch``."""

    def __init__(self, loader: Iterable[Batch], prepare: Callable[[Batch], Batch], device: torch.device):
        self.it = iter(loader)
        self.prepare = prepare
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: Optional[tuple] = None

    def _fetch(self) -> tuple[Optional[Batch], Optional[Batch], Optional[BaseException]]:
        try:
            host = next(self.it)
        except Exception as e:  # the loader failed (a worker error, a slot without usable samples ...)
            return None, None, e
        try:
            if self.stream is None:
                return host, self.prepare(host), None
            with torch.cuda.stream(self.stream):
                return host, self.prepare(host), None
        except Exception as e:  # a check on the batch failed (e.g. an unsupported language)
            return host, None, e

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> tuple[Optional[Batch], Optional[Batch], Optional[BaseException]]:
        host, dev, error = self.pending if self.pending is not None else self._fetch()
        if self.stream is not None and dev is not None:
            current = torch.cuda.current_stream()
            current.wait_stream(self.stream)
            for t in _tensors(dev):  # memory made on the side stream, used on this one
                t.record_stream(current)
        self.pending = self._fetch()  # queue the next copy now: it runs while this batch's step does
        return host, dev, error

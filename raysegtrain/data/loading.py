"""Batches out of a dataset: the samplers that decide which items each rank loads and how each is seeded, the loader
workers' seeding, and starting a DataLoader's iteration."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler


class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks (rank r takes r, r+W, ...): no padding, so distributed validation
    statistics equal single-process ones."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSampler(Sampler):
    """Yields (index, seed) with seed = f(run seed, epoch, index): a dataset that accepts such keys seeds its
    augmentation per sample, so what an image gets depends on nothing else (not on the loader worker that draws it,
    nor on how long the workers have lived): persistent workers and an exact resume both hold."""

    def __init__(self, sampler: DistributedSampler, seed: int):
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for i in self.sampler:
            yield i, int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])

    def __len__(self) -> int:
        return len(self.sampler)


def seed_loader_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: numpy's and Python's generators follow the worker's own torch seed."""
    info = torch.utils.data.get_worker_info()
    np.random.seed(info.seed % 2**32)
    random.seed(info.seed)


def iterate(loader: DataLoader):
    """iter(LOADER), with any worker processes it starts forked while OpenCV is single-threaded. OpenCV sizes its
    thread pool to the whole machine in every worker (16 workers x 64 threads on a 64-core host fight over the
    cores), and a forked worker must not resize the pool itself (it hangs), so the parent sets it around the fork.
    One loader worker is then one core, as torch's own threads already are in a worker."""
    if loader.num_workers == 0:
        return iter(loader)
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return iter(loader)
    finally:
        cv2.setNumThreads(threads)

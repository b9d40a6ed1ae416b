"""Glue between the video datasets and the training loop: batches that carry each clip's index (for
per-sample seeds) and drop clips which fail to decode (counted by ``stadapter.video.datasets.SkipCounter``).

Threads: each decode worker runs one torch thread (:func:`decode_worker_init`); the training process takes the
cores that are left (:func:`main_threads`: the cores it may run on, shared among the local DDP processes, less
one per decode worker, at least 1) unless ``OMP_NUM_THREADS`` sets the count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from stadapter.config import TaskSpec
from stadapter.video.datasets import Sample, Skipped, VideoClipDataset

ClipItem = tuple[Tensor, int] | Skipped  # what VideoClipDataset gives for one index
IndexedItem = tuple[int, ClipItem, str]  # (sample index, item, the clip's path)
IndexedBatch = tuple[Tensor, Tensor, Tensor, list[Skipped]]  # see collate_indexed


@dataclass
class ClipSource:
    """Labelled clips plus everything needed to turn them into model input."""

    samples: list[Sample]
    spec: TaskSpec
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    seed: int = 0
    cache: dict[int, np.ndarray] | None = None  # decoded clips kept across epochs (None: decode every time)

    def __len__(self) -> int:
        return len(self.samples)

    def dataset(self, train: bool, epoch: int = 0) -> VideoClipDataset:
        ds = VideoClipDataset(self.samples, self.spec, self.size[0], self.mean, self.std, train=train,
                              seed=self.seed, frame_cache=self.cache)
        ds.set_epoch(epoch)
        return ds


class _Indexed(Dataset[IndexedItem]):
    def __init__(self, ds: VideoClipDataset, samples: Sequence[Sample]) -> None:
        self.ds, self.samples = ds, samples

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> IndexedItem:
        return i, self.ds[i], str(self.samples[i].path)


def collate_indexed(batch: list[IndexedItem]) -> IndexedBatch:
    """-> (sample ids (B,), clips (B, ...), labels (B,), Skipped items of clips that failed to decode)."""
    ok = [(i, item) for i, item, _ in batch if item and not isinstance(item, Skipped)]
    skipped = [item if isinstance(item, Skipped) else Skipped(Path(path), "no item") for _, item, path in batch
               if not item]
    if not ok:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.long), skipped
    ids = torch.tensor([i for i, _ in ok])
    clips = torch.stack([item[0] for _, item in ok])
    labels = torch.tensor([int(item[1]) for _, item in ok])
    return ids, clips, labels, skipped


def decode_worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one torch thread per decode worker, so workers do not oversubscribe."""
    torch.set_num_threads(1)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def main_threads(workers: int, local_processes: int = 1, cores: int | None = None) -> int:
    """torch threads for a training process: its share of the cores, less one per decode worker, at least 1."""
    share = (cores if cores is not None else available_cores()) // max(1, local_processes)
    return max(1, share - workers)


def set_main_threads(workers: int, local_processes: int = 1) -> int:
    """Apply :func:`main_threads` (unless ``OMP_NUM_THREADS`` is set: then that count stays); returns the count."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(main_threads(workers, local_processes))
    return torch.get_num_threads()


def loader_workers(source: ClipSource, workers: int) -> int:
    """The decode workers a loader of ``source`` uses: none when its clips are cached (the cache lives in this
    process; worker processes would fill and drop copies of it), else ``workers``."""
    return 0 if source.cache is not None else workers


def make_loader(source: ClipSource, plan: Sequence[Sequence[int]], epoch: int, train: bool, seed: int,
                workers: int) -> DataLoader[IndexedItem]:
    ds = source.dataset(train=train, epoch=epoch)
    workers = loader_workers(source, workers)
    return DataLoader(_Indexed(ds, source.samples), batch_sampler=[list(b) for b in plan],
                      collate_fn=collate_indexed, num_workers=workers, persistent_workers=False,
                      worker_init_fn=decode_worker_init if workers else None)

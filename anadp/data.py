"""Data loading for DP training: Poisson-sampled logical batches, optionally
split into physical batches that fit in memory (one noisy step per logical batch).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate
from torch.utils._pytree import tree_map


class PoissonBatchSampler(Sampler):
    """Each of ``steps`` batches takes every index independently with probability q."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        self.num_samples, self.sample_rate, self.steps, self.generator = num_samples, sample_rate, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()


def _empty_batch_collate(dataset, collate_fn):
    """Poisson sampling can draw an empty batch: give it the right structure, batch size 0."""

    def collate(samples):
        if samples:
            return collate_fn(samples)
        return tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, collate_fn([dataset[0]]))

    return collate


def batch_size_of(batch) -> int:
    sizes = []
    tree_map(lambda t: sizes.append(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() else None, batch)
    if not sizes:
        raise ValueError("cannot find a batched tensor in the batch")
    return sizes[0]


class DPDataLoader:
    """Iterates logical batches (Poisson by default); with ``max_physical_batch_size``
    it yields each one in physical chunks and tells the engine which chunk ends it,
    so the optimizer adds noise and steps once per logical batch."""

    def __init__(self, loader: DataLoader, *, poisson_sampling: bool, max_physical_batch_size: int | None,
                 generator: torch.Generator, engine=None):
        self.original = loader
        self.sample_rate = 1 / len(loader)
        self.expected_batch_size = int(len(loader.dataset) * self.sample_rate)  # as Opacus
        self.generator, self.engine = generator, engine
        self.max_physical_batch_size = max_physical_batch_size
        self.last_batch_empty = False
        if poisson_sampling:
            sampler = PoissonBatchSampler(len(loader.dataset), self.sample_rate, len(loader), generator)
            self.loader = DataLoader(loader.dataset, batch_sampler=sampler, num_workers=loader.num_workers,
                                     collate_fn=_empty_batch_collate(loader.dataset, loader.collate_fn or default_collate),
                                     pin_memory=loader.pin_memory)
        else:
            self.loader = loader
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def _mark(self, ends_logical: bool, empty: bool) -> None:
        self.last_batch_empty = empty
        if self.engine is not None:
            self.engine.chunk_ends_logical = ends_logical

    def __iter__(self):
        M = self.max_physical_batch_size
        for batch in self.loader:
            B = batch_size_of(batch)
            if M is None or B <= M:
                self._mark(True, B == 0)
                yield batch
                continue
            starts = list(range(0, B, M))
            for k, s in enumerate(starts):
                self._mark(k == len(starts) - 1, False)
                yield tree_map(lambda t: t[s:s + M] if isinstance(t, torch.Tensor) and t.dim() else t, batch)
        self._mark(True, False)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

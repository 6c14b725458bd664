"""Data loading for DP training: Poisson-sampled logical batches, optionally
split into physical batches that fit in memory (one noisy step per logical batch).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate
from torch.utils._pytree import tree_map

from .chunks import hand_out


class PoissonBatchSampler(Sampler):
    """Each of ``steps`` batches takes every index independently with probability q.

    Distributed: every rank draws the same mask (same generator seed) and keeps
    every ``world_size``-th selected index from ``rank`` on, so the ranks' batches
    together are exactly the single-process Poisson batch.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples, self.sample_rate, self.steps, self.generator = num_samples, sample_rate, steps, generator
        self.rank, self.world_size = rank, world_size
        self.start = 0  # batches of this epoch already consumed before a resume
        self._state_after: dict[int, torch.Tensor] = {}
        self._largest_share: dict[int, int] = {}  # batch j -> the largest rank share of it

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        start, self.start = self.start, 0
        self._state_after.clear()
        self._largest_share.clear()
        for j in range(start, self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            self._state_after[j] = self.generator.get_state()
            chosen = mask.nonzero().flatten()
            self._largest_share[j] = -(-len(chosen) // self.world_size)  # rank 0's
            yield chosen[self.rank::self.world_size].tolist()

    def state_after(self, j: int) -> tuple[torch.Tensor, int]:
        """(generator state right after batch j was drawn (workers may have drawn further), the
        largest rank share of batch j)."""
        for k in [k for k in self._state_after if k < j]:
            del self._state_after[k], self._largest_share[k]
        return self._state_after[j], self._largest_share[j]


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


def split_evenly(batch, n: int) -> list:
    """``n`` physical chunks of a collated batch, their sizes differing by at most one."""
    B = batch_size_of(batch)
    bounds = [B * k // n for k in range(n + 1)]
    return [tree_map(lambda t: t[a:b] if isinstance(t, torch.Tensor) and t.dim() else t, batch)
            for a, b in zip(bounds, bounds[1:])]


def pad_rows(batch, size: int, filler) -> tuple:
    """(the batch with ``size`` rows, its real row count): rows past the batch's own are copies of its first
    row (of ``filler``, a collated batch of one, where the batch is empty). Copies of a real row keep the
    forward finite; their gradients are zeroed by the engine (GradSampleEngine.record)."""
    B = batch_size_of(batch)
    if B == size:
        return batch, B
    if B > size:
        raise ValueError(f"a chunk of {B} samples cannot be padded to {size}")
    source = batch if B else filler()

    def pad(t):
        if not isinstance(t, torch.Tensor) or not t.dim():
            return t
        copies = t[:1].expand(size - B, *t.shape[1:])
        return torch.cat([t, copies]) if B else copies.clone()

    return tree_map(pad, source), B


def split_batch(batch, size: int) -> list:
    """Physical chunks of at most ``size`` samples of a collated batch (tensors sliced on dim 0)."""
    B = batch_size_of(batch)
    return [tree_map(lambda t: t[s:s + size] if isinstance(t, torch.Tensor) and t.dim() else t, batch)
            for s in range(0, B, size)]


class DPDataLoader:
    """Iterates logical batches (Poisson by default); with ``max_physical_batch_size``
    it yields each one in physical chunks and tells the engine which chunk ends it,
    so the optimizer adds noise and steps once per logical batch.

    ``state_dict()`` holds the sampler's RNG and the position in the epoch: a run
    resumed from it draws the same batches as the uninterrupted run (Poisson only).
    """

    def __init__(self, loader: DataLoader, *, poisson_sampling: bool, max_physical_batch_size: int | None,
                 generator: torch.Generator, engine=None, rank: int = 0, world_size: int = 1,
                 static_shapes: bool = False):
        self.original = loader
        self.static_shapes = static_shapes
        self.real_rows: int | None = None  # static shapes: the samples of the chunk just yielded (its first rows)
        self.sample_rate = 1 / len(loader)
        self.expected_batch_size = int(len(loader.dataset) * self.sample_rate)  # as Opacus (global)
        self.generator, self.engine = generator, engine
        self.max_physical_batch_size = max_physical_batch_size
        self.last_batch_empty = False
        self.sampler = None
        self._position, self._state = 0, generator.get_state()
        if poisson_sampling:
            self.sampler = PoissonBatchSampler(len(loader.dataset), self.sample_rate, len(loader), generator,
                                               rank, world_size)
            self.loader = DataLoader(loader.dataset, batch_sampler=self.sampler, num_workers=loader.num_workers,
                                     collate_fn=_empty_batch_collate(loader.dataset, loader.collate_fn or default_collate),
                                     pin_memory=loader.pin_memory,
                                     # its own generator for the workers' base seed: iterating must not draw from
                                     # torch's global RNG (dropout's), or a resumed run would diverge
                                     generator=torch.Generator().manual_seed(int(generator.initial_seed()) ^ 0xD1))
        else:
            if world_size > 1:
                raise ValueError("distributed training needs poisson_sampling=True (the sampler shards the batch)")
            self.loader = loader
        self.dataset = loader.dataset
        self.world_size = world_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        M = self.max_physical_batch_size
        j = self.sampler.start if self.sampler is not None else 0
        for batch in self.loader:
            self._position = j + 1
            largest = None
            if self.sampler is not None:
                self._state, largest = self.sampler.state_after(j)
            j += 1
            B = batch_size_of(batch)
            # distributed: every rank runs as many chunks as the rank with the largest share (FSDP's
            # collectives in each forward and backward need all ranks), its share split evenly over them:
            # the shares differ by at most one sample, so no chunk is empty unless a share has fewer
            # samples than there are chunks (some models, Hugging Face GPT-2, cannot take a batch of 0)
            n = max(1, -(-(largest if self.world_size > 1 else B) // M)) if M is not None else 1
            chunks = [batch] if n == 1 else split_batch(batch, M) if self.world_size == 1 else split_evenly(batch, n)
            rows = None
            if self.static_shapes:  # every chunk M rows: its samples first, then copies (zeroed in the engine)
                chunks, rows = map(list, zip(*(pad_rows(c, M, self._filler) for c in chunks)))
            for k, chunk in enumerate(hand_out(None if self.engine is None else self.engine.chunks, chunks, rows)):
                self.real_rows = None if rows is None else rows[k]
                self.last_batch_empty = (batch_size_of(chunk) if rows is None else rows[k]) == 0
                yield chunk
        self.last_batch_empty = False
        self._position, self._state = 0, self.generator.get_state()

    def _filler(self):
        """A collated batch of one sample (the dataset's first), the rows of a padded empty chunk."""
        collate = self.original.collate_fn or default_collate
        return collate([self.dataset[0]])

    def state_dict(self) -> dict:
        return {"generator": self._state.clone(), "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self._state = state["generator"].clone()
        self.generator.set_state(self._state)
        self._position = state["position"]
        if self.sampler is not None:
            self.sampler.start = self._position

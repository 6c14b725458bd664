"""The chunk protocol: one backward pass per chunk of distinct private samples.

The accountant charges each Poisson-sampled sample once per step at sensitivity C. A logical
batch may be split into physical chunks (memory); each chunk's samples must then reach exactly
one backward, and only samples the private loader drew may reach one. The protocol, in one place:

- whoever hands out private data (DPDataLoader, DPTrainer's split of a logical batch) passes its
  chunks through ``hand_out``: each is numbered and marked as ending its logical batch or not;
- the engine stamps each forward with the chunk it runs on (``current``, ``ends_logical``);
- the optimizer ``accept``s one backward per chunk, from the private loader only, and steps once
  per logical batch (its last chunk).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional


class ChunkProtocol:
    def __init__(self):
        self.begun = 0  # chunks handed out so far
        self.current: Optional[int] = None  # the chunk of private data being used (None: none handed out)
        self.ends_logical = True  # whether it is the last chunk of its logical batch
        self.accepted = 0  # the last chunk a backward was accepted for
        self.real_rows: Optional[int] = None  # padded chunk (static shapes): its first rows are its samples

    def begin(self, ends_logical: bool = True, real_rows: Optional[int] = None) -> int:
        """A new chunk of distinct samples: the forward passes that follow run on it. ``real_rows``: a chunk
        padded to a fixed size holds its samples in its first ``real_rows`` rows, copies after them."""
        self.begun += 1
        self.current, self.ends_logical, self.real_rows = self.begun, ends_logical, real_rows
        return self.current

    def hand_out(self, chunks: list, real_rows: Optional[list] = None) -> Iterator:
        """Yield the chunks of one logical batch, each begun first, the last marked as ending it;
        a consumer that stops early leaves no logical batch open."""
        try:
            for k, chunk in enumerate(chunks):
                self.begin(ends_logical=k == len(chunks) - 1, real_rows=None if real_rows is None else real_rows[k])
                yield chunk
        finally:
            self.ends_logical, self.real_rows = True, None

    def accept(self, chunk_id: Optional[int]) -> None:
        """A backward on chunk ``chunk_id`` (the stamp of its forward): raise unless it is a chunk
        the private loader handed out that had no backward yet."""
        if chunk_id is None:
            raise RuntimeError(
                "backward pass on data that did not come from the private data loader returned by make_private "
                "(is the training loop still iterating the original DataLoader?): those batches are not "
                "Poisson-sampled by anadp, so the epsilon it reports would not hold. Iterate the returned loader.")
        if chunk_id <= self.accepted:
            raise RuntimeError(
                f"a second backward pass on the same batch (chunk {chunk_id} of the private data loader): its "
                "samples would count twice in one step (sensitivity 2C) while the accountant charges them once. "
                "Use one backward per batch (sum the losses first), or draw a new batch from the loader.")
        self.accepted = chunk_id


def hand_out(protocol: Optional[ChunkProtocol], chunks: Iterable, real_rows: Optional[list] = None) -> Iterator:
    """``protocol.hand_out(chunks)``, or the chunks as they are where there is no protocol (a loader
    made without an engine)."""
    chunks = list(chunks)
    return iter(chunks) if protocol is None else protocol.hand_out(chunks, real_rows)

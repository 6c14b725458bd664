"""The trainable tensors a DP optimizer updates, in its order, and what each step needs of them."""
from __future__ import annotations

import warnings

import torch

from . import sharding
from .records import HALF

# noise streams besides the tensors' own (a tensor's stream is its position in the model): the
# allocation's share release and the clipping's own release
SHARE_STREAM, CLIPPING_STREAM = 2**32 - 1, 2**32 - 2


def sum_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype a parameter's clipped sum and noisy gradient are kept in: float32 for 16-bit parameters."""
    return torch.float32 if p.dtype in HALF else p.dtype


class TensorTable:
    """The wrapped optimizer's trainable tensors (``params``, its order) with their names, sum dtypes,
    noise streams and FSDP2 shards."""

    def __init__(self, optimizer: torch.optim.Optimizer, engine):
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.names = engine.names
        owned = set(engine.params)
        foreign = [i for i, p in enumerate(self.params) if p not in owned]
        if foreign:
            raise ValueError(f"the optimizer holds {len(foreign)} trainable parameter(s) (positions {foreign[:5]}) "
                             "that the wrapped model does not own")
        mine = set(self.params)
        missing = [engine.names[p] for p in engine.params if p not in mine]
        if missing:
            warnings.warn(f"{len(missing)} trainable model parameters are not in the optimizer and will not be "
                          f"updated (first: {missing[0]}); they still count in the clipping norm")
        self.index = {p: i for i, p in enumerate(self.params)}
        sharding.check_layout(self.params)
        self.sharded = {p: sharding.is_sharded(p) for p in self.params}  # FSDP2 (fully_shard) DTensor parameters
        self.shard_mask = (torch.tensor([self.sharded[p] for p in self.params])
                           if any(self.sharded.values()) else None)
        self.shard_rows = sharding.row_ranges(self.params) if self.shard_mask is not None else {}
        self.sum_dtypes = [sum_dtype(p) for p in self.params]
        # noise stream of a tensor: keyed by its position in the model, so that how an optimizer
        # orders its param groups does not change the noise
        position = {p: k for k, p in enumerate(engine.params)}
        self.noise_ids = [position[p] for p in self.params]

    def __len__(self) -> int:
        return len(self.params)

    def tensor_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per-tensor sums formed on this rank's parts, summed over the shards of FSDP2-sharded
        tensors (the replicated ones counted once)."""
        return sharding.summed(values, self.shard_mask)

    def check_no_shard_grads(self) -> None:
        """FSDP2 reduce-scatters what autograd gives the unsharded parameters into the shards' .grad; the
        hooked layers give none, so a gradient there comes from a use outside them (which the engine's
        gradient hooks, on the sharded parameters, do not see) and would be dropped by the step."""
        used = [self.names[p] for p in self.params if self.sharded[p] and p.grad is not None]
        if used:
            raise RuntimeError(
                f"FSDP2-sharded parameter(s) {used[:3]} got a gradient from autograd: from a use outside their "
                "module's forward (for example F.linear(h, emb.weight) as a tied head), or from a backward outside "
                "make_private's model. anadp forms per-sample gradients only through the hooked modules, so this "
                "gradient would be dropped: call the module (a tied head as an nn.Linear sharing the Parameter).")

"""Checkpoints that a crash cannot corrupt: written to a temporary file in the
same folder, flushed to disk, then renamed over the previous one (atomic on POSIX);
distributed runs through torch.distributed.checkpoint (DCP)."""
from __future__ import annotations

import os
import tempfile

import torch


def save_checkpoint(path: str, model: torch.nn.Module, optimizer, **extra) -> None:
    """Model, DP optimizer (accountant, allocation, noise counter, sampler RNG) and ``extra``."""
    save_checkpoint_file(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": extra})


def save_checkpoint_file(path: str, state: dict) -> None:
    """torch.save ``state`` to ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str, model: torch.nn.Module, optimizer) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns its ``extra``."""
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["extra"]


def save_distributed_checkpoint(path: str, model: torch.nn.Module, optimizer, **extra) -> None:
    """Distributed runs (FSDP2, DDP, or the model itself on every rank), called on every rank:
    the model and the wrapped optimizer through ``torch.distributed.checkpoint`` into the folder
    ``path`` (each rank writes its own shards; DCP can load them at another world size), and anadp's
    state (accountant, allocation, noise counter, sampler RNG, equal on every rank; torch's RNG, each
    rank's own) with ``extra`` as ``path/anadp-rank<r>.pt``, each written atomically."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer.original_optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)
    state = optimizer.state_dict()
    state.pop("optimizer")
    save_checkpoint_file(os.path.join(path, f"anadp-rank{dist.get_rank()}.pt"), {"anadp": state, "extra": extra})
    dist.barrier()  # the checkpoint is whole on every rank once this returns


def load_distributed_checkpoint(path: str, model: torch.nn.Module, optimizer) -> dict:
    """Restore what :func:`save_distributed_checkpoint` wrote, on every rank; returns its ``extra``.
    At another world size the model and optimizer reshard; the noise and the batches continue
    exactly (they do not depend on the world size); a rank the saving run did not have keeps its
    torch RNG (dropout)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer.original_optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    mine = os.path.join(path, f"anadp-rank{dist.get_rank()}.pt")
    saved = torch.load(mine if os.path.exists(mine) else os.path.join(path, "anadp-rank0.pt"), weights_only=True)
    if not os.path.exists(mine):  # a rank the saving run did not have: its RNG as it is
        saved["anadp"].pop("rng", None)
    optimizer._check_privacy_settings(saved["anadp"])  # before anything is overwritten
    set_state_dict(model, optimizer.original_optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    dp_state = dict(saved["anadp"], optimizer=optimizer.original_optimizer.state_dict())
    optimizer.load_state_dict(dp_state)
    return saved["extra"]

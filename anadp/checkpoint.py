"""Checkpoints that a crash cannot corrupt: written to a temporary file in the
same folder, flushed to disk, then renamed over the previous one (atomic on POSIX)."""
from __future__ import annotations

import os
import tempfile

import torch


def save_checkpoint(path: str, model: torch.nn.Module, optimizer, **extra) -> None:
    """Model, DP optimizer (accountant, allocation, noise counter, sampler RNG) and ``extra``."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": extra}
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

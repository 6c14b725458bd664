"""Checkpoints that a crash cannot corrupt: written to a temporary file in the
same folder, flushed to disk, then renamed over the previous one (atomic on POSIX);
distributed runs through torch.distributed.checkpoint (DCP)."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict

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
    check_privacy_settings(optimizer, saved["anadp"])  # before anything is overwritten
    set_state_dict(model, optimizer.original_optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    dp_state = dict(saved["anadp"], optimizer=optimizer.original_optimizer.state_dict())
    optimizer.load_state_dict(dp_state)
    return saved["extra"]


# --- the DP optimizer's own state (DPOptimizer.state_dict / load_state_dict) ------------------------
def optimizer_state(opt) -> dict:
    """Everything a resumed run needs to continue exactly: the wrapped optimizer, accountant,
    allocation, noise seed and step, the Poisson sampler's RNG, and torch's global RNG states
    (CPU and every CUDA device: dropout draws from them)."""
    if opt.sums.chunks:
        raise RuntimeError("state_dict() in the middle of a logical batch: save after optimizer.step()")
    state = {"optimizer": opt.original_optimizer.state_dict(), "allocator": opt.allocator.state_dict(),
             "accountant": opt.accountant.state_dict(), "step_count": opt.step_count, "seed": opt.seed,
             "privacy": privacy_settings(opt), "skipped_samples": opt.skipped_samples,
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    if hasattr(opt.data_loader, "state_dict"):
        state["data_loader"] = opt.data_loader.state_dict()
    if opt.noise_variance is not None:
        state["noise_variance"] = opt.noise_variance.state_dict()
    clipping = opt.clip.state_dict()
    if clipping:
        state["clipping"] = clipping
    return state


def privacy_settings(opt) -> dict:
    """What the privacy guarantee of a run depends on; a checkpoint holds them and loads only into an
    optimizer made with the same ones."""
    ledger = opt.ledger
    return {"noise_multiplier": opt.noise_multiplier, "max_grad_norm": opt.max_grad_norm,
            "allocation": opt.allocator.mode, "allocation_config": asdict(opt.allocator.config),
            "clipping": opt.clipping, "accountant": opt.accountant.name, "sample_rate": opt.sample_rate,
            "expected_batch_size": opt.expected_batch_size, "loss_reduction": opt.loss_reduction,
            "secure_mode": opt.secure_mode, "target_epsilon": ledger.target_epsilon,
            "target_delta": ledger.target_delta, "budget_steps": ledger.budget_steps,
            **opt.clip.privacy_settings()}


def check_privacy_settings(opt, state: dict) -> None:
    saved = state.get("privacy") or {k: state[k] for k in ("noise_multiplier", "max_grad_norm") if k in state}
    if "privacy" not in state and "allocator" in state:
        saved["allocation"] = state["allocator"].get("mode")
    mine = privacy_settings(opt)

    def same(a, b):
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-12)
        return a == b
    differ = [f"{k}: checkpoint {saved[k]!r}, this optimizer {mine[k]!r}" for k in mine
              if k in saved and not same(saved[k], mine[k])]
    if differ:
        raise ValueError("the checkpoint was saved by a run with other privacy settings (" + "; ".join(differ)
                         + "): continuing it here would change the noise or the accounting mid-run. Make the "
                         "optimizer with the checkpoint's settings, or start a new run from the model alone.")


def load_optimizer_state(opt, state: dict) -> None:
    """Restore what optimizer_state wrote (the settings checked first)."""
    check_privacy_settings(opt, state)
    if opt.noise_variance is not None:
        if "noise_variance" not in state:
            raise ValueError("the checkpoint was saved without adam_noise_correction: this optimizer corrects "
                             "Adam's second moment by a running average it does not hold. Make the optimizer "
                             "as the checkpoint's run was made: make_private(..., adam_noise_correction=False), "
                             "the default")
        opt.noise_variance.load_state_dict(state["noise_variance"])
    elif "noise_variance" in state:
        raise ValueError("the checkpoint was saved with adam_noise_correction: make the optimizer with it too")
    opt.release.forget_states()
    opt.original_optimizer.load_state_dict(state["optimizer"])
    opt.allocator.load_state_dict(state["allocator"])
    opt.accountant.load_state_dict(state["accountant"])
    if opt.clip.state_dict():
        if "clipping" not in state:
            raise ValueError("the checkpoint holds no per-layer thresholds: it was saved by a run with other "
                             "clipping; make the optimizer with that run's clipping")
        opt.clip.load_state_dict(state["clipping"])
    opt.step_count, opt.skipped_samples = state["step_count"], state["skipped_samples"]
    opt.seed = None if opt.secure_mode else state["seed"]
    if "data_loader" in state and hasattr(opt.data_loader, "load_state_dict"):
        opt.data_loader.load_state_dict(state["data_loader"])
    if "rng" in state:
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

"""make_private: turn (model, optimizer, data loader) into their DP versions."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .accounting import calibrated_steps, noise_multiplier_for
from .allocation import AllocationConfig
from .data import DPDataLoader
from .engine import GradSampleEngine
from .clipping import AdaptiveClipping
from .optimizer import DPOptimizer, random_seed
from .reducer import broadcast_seed
from .sharding import is_sharded


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, *,
                 max_grad_norm: float | list | dict, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 epochs: float | None = None, allocation: str = "anadp", accountant: str = "prv",
                 clipping: str = "whitened", poisson_sampling: bool = True, loss_reduction: str = "mean",
                 seed: int | None = None, secure_mode: bool = False,
                 allocation_config: AllocationConfig | None = None,
                 max_physical_batch_size: int | None = None, batch_first: bool = True,
                 nonfinite: str = "raise", distributed: bool | None = None, backend: str = "auto",
                 adaptive_clipping: AdaptiveClipping | bool | None = None,
                 adam_noise_correction: bool | float | None = False, static_shapes: bool = False):
    """Wrap for DP training; returns ``(model, dp_optimizer, dp_data_loader)``.

    The model is hooked in place (same object, same state_dict keys). Give
    either ``noise_multiplier`` or ``target_epsilon`` + ``target_delta`` + ``epochs``.
    ``allocation="anadp"`` spreads the noise by importance, ``"uniform"`` is
    DP-SGD/DP-Adam; with ``clipping="whitened"`` (default) both are charged
    exactly ``noise_multiplier``. With ``target_epsilon``, the noise is calibrated for
    ``epochs / sample_rate`` steps and no step past them is taken (``BudgetExhaustedError``).

    ``clipping="per_layer"``: each noise group (a weight matrix with its biases; the norm weights and
    lone biases together) is clipped to its own threshold inside the backward, where at the last chunk
    its noise and update follow (the step still needs ``optimizer.step()``). ``max_grad_norm``: a float C
    (equal thresholds C / sqrt(G)), a list (one per group, ``optimizer.group_names`` order, the rest
    group last) or a dict {group name or "<rest>": C_g}; the noise std is sigma * sqrt(sum_g C_g^2), as
    Opacus's per-layer clipping. ``adaptive_clipping=True`` (or an AdaptiveClipping) moves the
    thresholds' shares of the total C by noisy counts of the samples under them (paid out of the same
    sigma) until every group clips the same fraction of its samples; ``AdaptiveClipping(fixed_total=False)``
    moves each C_g towards a quantile of its norms instead (Andrew et al.; the total then floats).

    ``adam_noise_correction`` (Adam / AdamW): the noise's known variance per coordinate is taken out of
    Adam's second moment, floored at that variance (a float: that fraction of it), so that Adam no longer
    normalizes the noise away (after Tang et al., DP-AdamBC); post-processing, the same epsilon. False
    (default): off, DP-Adam as Opacus has it; True: on, or an error; None: on where the wrapped optimizer
    is an Adam or AdamW that anadp's update implements, off for the others.

    ``static_shapes=True`` (with ``max_physical_batch_size`` M): every chunk the loader yields has exactly M
    rows, the Poisson batch's samples first and copies of its first sample after them (``loader.real_rows``
    says how many are real), for torch.compile and CUDA graphs, which need fixed shapes. The padded rows'
    per-sample gradients are zeroed before any norm or sum, so the step and epsilon are those of the
    unpadded batch; a batch larger than M is split into chunks, never truncated. Losses and metrics the
    training loop reports should weight the padded rows out.

    ``backend``: "auto" (triton for CUDA tensors; cpu, the compiled CPU kernels, for CPU tensors where a
    C++ compiler is, else torch), "torch", "cpu", "triton" or "cuda"; the environment variable
    ANADP_BACKEND overrides it.

    Distributed (``torch.distributed`` initialized, or ``distributed=True``): call on
    every rank with the same arguments and a loader over the whole dataset whose
    batch size is the global one. The model may be wrapped in DistributedDataParallel (anadp
    switches DDP's own all-reduce off) or sharded with FSDP2's fully_shard before this call, or
    left as it is. Each rank takes its share of every Poisson batch and clips it; the ranks'
    clipped sums are summed (reduce-scattered for FSDP2 shards) and every rank adds the same
    noise, so the result equals the single-process run over the same logical batch.
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give either noise_multiplier or target_epsilon (with target_delta and epochs)")
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    if isinstance(data_loader.dataset, torch.utils.data.IterableDataset):
        raise TypeError("the data loader reads an IterableDataset: Poisson sampling needs a map-style dataset with "
                        "a length (each sample is drawn independently with probability q); wrap the data in a "
                        "Dataset with __len__ and __getitem__")
    if data_loader.batch_size is None and data_loader.batch_sampler is None:
        raise ValueError("DataLoader(batch_size=None) yields single samples without a batch dimension: give the "
                         "expected logical batch size as batch_size (the sample rate is batch_size / len(dataset))")
    if len(data_loader) == 0:
        raise ValueError("the data loader yields no batch")
    if isinstance(data_loader.sampler, torch.utils.data.DistributedSampler):
        raise ValueError("the data loader uses a DistributedSampler: anadp samples each logical batch itself "
                         "(Poisson, the same mask on every rank, each rank taking its share), so give every rank "
                         "a plain DataLoader over the whole dataset whose batch_size is the global (logical) batch")
    if adaptive_clipping is True:
        adaptive_clipping = AdaptiveClipping()
    elif adaptive_clipping is False:
        adaptive_clipping = None
    if adaptive_clipping is not None and clipping != "per_layer":
        raise ValueError("adaptive_clipping adapts the per-layer thresholds: use it with clipping='per_layer'")
    if isinstance(max_grad_norm, (list, tuple, dict)) and clipping != "per_layer":
        raise ValueError("a list or dict of max_grad_norm gives per-layer thresholds: use clipping='per_layer' "
                         "(whitened clipping takes one float)")
    if max_physical_batch_size is not None and max_physical_batch_size < 1:
        raise ValueError("max_physical_batch_size must be >= 1")
    if static_shapes and max_physical_batch_size is None:
        raise ValueError("static_shapes=True pads every chunk to a fixed size: give max_physical_batch_size")
    if static_shapes and adaptive_clipping is not None:
        raise ValueError("static_shapes=True with adaptive_clipping: the noisy counts of samples under each "
                         "threshold would count the padded rows (zero gradients, under every threshold) and their "
                         "sensitivity would no longer hold; use fixed thresholds with static shapes")
    sample_rate = 1 / len(data_loader)
    budget_steps = None
    if target_epsilon is not None:
        if target_delta is None or epochs is None:
            raise ValueError("target_epsilon needs target_delta and epochs")
        if not epochs > 0:
            raise ValueError(f"epochs must be > 0 to calibrate the noise to target_epsilon, got {epochs}")
        budget_steps = calibrated_steps(epochs, sample_rate)
        noise_multiplier = noise_multiplier_for(target_epsilon, target_delta, sample_rate, steps=budget_steps,
                                                accountant=accountant)
        if clipping == "global" and allocation == "anadp":
            warnings.warn("clipping='global' charges sigma * min_g w_g per step: once the allocation leaves "
                          "w = 1, epsilon grows past target_epsilon. Use clipping='whitened' to keep the budget.")
    if not poisson_sampling:
        warnings.warn("poisson_sampling=False: batches are not Poisson-sampled but epsilon is computed as if "
                      "they were; the reported guarantee does not strictly hold")
    rank, world_size = 0, 1
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and any(
            is_sharded(p) for p in model.parameters()):
        raise ValueError("distributed=False with FSDP2-sharded parameters: each rank holds only its shard, so the "
                         "ranks' clipped sums must be reduced; leave distributed unset (or True)")
    hooked = model
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # anadp all-reduces the clipped sums itself (one all-reduce per step, the noise added once on the
        # sum): DDP's own gradient all-reduce is switched off (the hooked layers leave .grad empty anyway)
        hooked = model.module
        model.require_backward_grad_sync = False
    elif isinstance(model, nn.DataParallel):
        raise TypeError("nn.DataParallel splits each batch over the GPUs of one process and sums the replicas' "
                        "gradients: anadp cannot hook the replicas. Use one process per GPU (torchrun) with the "
                        "model itself or wrapped in DistributedDataParallel, or fully_shard (FSDP2).")
    engine = GradSampleEngine(hooked, batch_first=batch_first, loss_reduction=loss_reduction)
    sampler_seed = random_seed() if (seed is None or secure_mode) else seed
    if distributed:
        with torch.no_grad():  # every rank starts from rank 0's parameters (an FSDP2 shard exists once)
            for p in model.parameters():
                if not is_sharded(p):
                    dist.broadcast(p.data, src=0)
        if seed is None or secure_mode:  # drawn here: rank 0's draw for all, masks and noise must agree
            sampler_seed = broadcast_seed(sampler_seed, next(model.parameters()).device)
            if not secure_mode:
                seed = sampler_seed ^ 0x5EED
    generator = torch.Generator().manual_seed(sampler_seed)
    loader = DPDataLoader(data_loader, poisson_sampling=poisson_sampling, generator=generator, engine=engine,
                          max_physical_batch_size=max_physical_batch_size, rank=rank, world_size=world_size,
                          static_shapes=static_shapes)
    dp_optimizer = DPOptimizer(optimizer, engine, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                               expected_batch_size=loader.expected_batch_size, sample_rate=sample_rate,
                               allocation=allocation, allocation_config=allocation_config, clipping=clipping,
                               accountant=accountant, loss_reduction=loss_reduction, seed=seed,
                               secure_mode=secure_mode, nonfinite=nonfinite, data_loader=loader,
                               distributed=distributed, backend=backend, target_epsilon=target_epsilon,
                               target_delta=target_delta if target_epsilon is not None else None,
                               budget_steps=budget_steps, adam_noise_correction=adam_noise_correction,
                               adaptive_clipping=adaptive_clipping)
    if distributed:
        _check_same_on_every_rank(dp_optimizer, data_loader, max_physical_batch_size)
    return model, dp_optimizer, loader


def _check_same_on_every_rank(optimizer: DPOptimizer, data_loader: DataLoader, max_physical_batch_size) -> None:
    """Every rank must wrap the same model with the same privacy settings and data: a rank that differs
    would add other noise, or sample other batches, than the epsilon reported on rank 0 assumes."""
    engine = optimizer.engine
    mine = optimizer.privacy_settings() | {
        "seed": optimizer.seed, "dataset size": len(data_loader.dataset),
        "max_physical_batch_size": max_physical_batch_size, "noise groups": optimizer.group_names,
        "trainable parameters": [(engine.names[p], tuple(p.shape)) for p in optimizer.params]}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differ = sorted({k for other in everyone for k in mine if other[k] != everyone[0][k]})
    if differ:
        raise ValueError(f"make_private was called with other settings on some ranks ({', '.join(differ)} differ "
                         f"from rank 0's; this is rank {dist.get_rank()}): the ranks would add noise or sample "
                         "batches that the reported epsilon does not describe. Call it with the same arguments, "
                         "seed, model and dataset on every rank.")

"""Host side of the fused update, shared by the triton and cuda backends:
which optimizers the kernels implement, one row of float32 hyperparameters per
tensor, the optimizer state in torch's own format, and apex-style tile tables
(one row per tile of at most ``tile`` elements of one tensor).

Kept free of triton and CUDA so that it is tested on any machine.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

SGD, ADAM = 0, 1
# columns of the hyperparameter table; differences such as 1 - beta2 are formed here in
# float64 as torch forms them, not in float32 in the kernel (1 - fp32(0.999) is off by 1.3e-5)
# NOISE_VAR, VAR_FLOOR: Adam's noise correction (anadp.adam_correction): the bias-corrected variance of
# the noise in the gradient, subtracted from v_hat, and the floor of the difference (0, 0: torch's Adam)
(LR, WD, BETA1, BETA2, EPS, STEP_SIZE, BC2_SQRT, FLAG, FIRST, NOISE_STD, INV_DENOM,
 ONE_MINUS_BETA1, ONE_MINUS_BETA2, DECAY, NOISE_VAR, VAR_FLOOR) = range(16)
N_COLS = 16
DEFAULT_TILE = 1 << 16
# what the kernels sum over the privatized gradient for the allocation, per tile or tile
STATS = ("abs_p_grad", "grad_sq")  # sum |p * grad| (p before the update), sum grad^2


def stat_code(stat: str) -> int:
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    return STATS.index(stat)


def optimizer_kind(optimizer: torch.optim.Optimizer) -> int | None:
    """SGD or ADAM for the optimizers the kernels implement, None otherwise."""
    if type(optimizer) is torch.optim.SGD:
        return SGD
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return ADAM
    return None


def unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the fused update cannot run this optimizer (None: it can)."""
    if optimizer_kind(optimizer) is None:
        return f"{type(optimizer).__name__} (the fused update implements SGD, Adam and AdamW)"
    for g in optimizer.param_groups:
        for flag in ("maximize", "amsgrad", "differentiable", "capturable"):
            if g.get(flag):
                return f"{type(optimizer).__name__}({flag}=True)"
        if torch.is_tensor(g["lr"]):
            return "a tensor learning rate"
    return None


def decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return type(optimizer) is torch.optim.AdamW or bool(group.get("decoupled_weight_decay", False))


def group_of(optimizer: torch.optim.Optimizer) -> dict:
    """id(parameter) -> its param group."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def ensure_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, group: dict | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """(first moment / momentum buffer, second moment, first step) of ``p``, created as torch
    would create them, except that state is float32 for half-precision parameters."""
    kind = optimizer_kind(optimizer)
    group = group or group_of(optimizer)[id(p)]
    state = optimizer.state[p]
    if kind == SGD:
        if group["momentum"] == 0:
            return None, None, False
        first = state.get("momentum_buffer") is None
        if first:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        elif state["momentum_buffer"].dtype != torch.float32:
            state["momentum_buffer"] = state["momentum_buffer"].float()
        return state["momentum_buffer"], None, first
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for k in ("exp_avg", "exp_avg_sq"):
            state[k] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
    for k in ("exp_avg", "exp_avg_sq"):
        if state[k].dtype != torch.float32:
            state[k] = state[k].float()
    return state["exp_avg"], state["exp_avg_sq"], False


def hyper_row(optimizer: torch.optim.Optimizer, p: torch.Tensor, first: bool, noise_std: float,
              inv_denom: float, group: dict | None = None) -> list[float]:
    """One row of the table for parameter ``p`` at the coming step."""
    group = group or group_of(optimizer)[id(p)]
    row = [0.0] * N_COLS
    row[LR], row[WD] = float(group["lr"]), float(group["weight_decay"])
    row[NOISE_STD], row[INV_DENOM] = noise_std, inv_denom
    if optimizer_kind(optimizer) == SGD:
        row[BETA1], row[BETA2] = float(group["momentum"]), float(group["dampening"])
        row[ONE_MINUS_BETA1] = 1 - row[BETA2]  # SGD: 1 - dampening
        row[FLAG], row[FIRST] = float(bool(group["nesterov"])), float(first)
        return row
    beta1, beta2 = (float(b) for b in group["betas"])
    step = float(optimizer.state[p]["step"]) + 1  # torch increments before the update
    row[BETA1], row[BETA2], row[EPS] = beta1, beta2, float(group["eps"])
    row[ONE_MINUS_BETA1], row[ONE_MINUS_BETA2] = 1 - beta1, 1 - beta2
    row[DECAY] = 1 - row[LR] * row[WD]
    row[STEP_SIZE] = row[LR] / (1 - beta1 ** step)
    row[BC2_SQRT] = math.sqrt(1 - beta2 ** step)
    row[FLAG] = float(decoupled(optimizer, group))
    return row


def finish_step(optimizer: torch.optim.Optimizer, params, steps: list | None = None) -> None:
    """What torch's step does besides the arithmetic: advance Adam's step counters (``steps``: the
    parameters' step tensors, where the caller has them)."""
    if optimizer_kind(optimizer) == ADAM and params:
        torch._foreach_add_(steps or [optimizer.state[p]["step"] for p in params], 1.0)


DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # parameter dtypes of the kernels


def check_update_args(params: list, grads: list, ms: list, vs: list, kind: int) -> int:
    """Validate a multi-tensor update (one parameter dtype and device, float32 contiguous grads
    and state shaped as the parameters); returns the parameters' dtype code."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_CODES:
        raise TypeError(f"multi_tensor_update: one parameter dtype among float32/bfloat16/float16 per launch, got {dtypes}")
    if kind not in (SGD, ADAM):
        raise ValueError(f"multi_tensor_update: kind must be SGD ({SGD}) or ADAM ({ADAM}), got {kind}")
    if not len(params) == len(grads) == len(ms) == len(vs):
        raise ValueError("multi_tensor_update: params, grads, ms and vs must have the same length")
    device = params[0].device
    for name, ts in (("grads", grads), ("ms", ms), ("vs", vs)):
        for p, t in zip(params, ts):
            if t is not None and (t.shape != p.shape or t.dtype != torch.float32 or not t.is_contiguous()
                                  or t.device != device):
                raise ValueError(f"multi_tensor_update: {name} must be contiguous float32 tensors shaped as the params")
    if any(not p.is_contiguous() or p.device != device for p in params):
        raise ValueError("multi_tensor_update: parameters must be contiguous and on one device")
    if any(g is None for g in grads):
        raise ValueError("multi_tensor_update: every tensor needs its clipped sum")
    if kind == ADAM and any(m is None or v is None for m, v in zip(ms, vs)):
        raise ValueError("multi_tensor_update: Adam needs both moments of every tensor")
    return DTYPE_CODES[params[0].dtype]


class Tables(NamedTuple):
    """Everything a multi-tensor launch reads besides the hyperparameter rows, on the device."""
    tile_tensor: torch.Tensor  # (tiles,) int32
    tile_start: torch.Tensor   # (tiles,) int64
    p_addr: torch.Tensor        # (tensors,) int64 data pointers
    g_addr: torch.Tensor
    m_addr: torch.Tensor        # a parameter's own pointer where it has no state (never read)
    v_addr: torch.Tensor
    numel: torch.Tensor         # (tensors,) int64
    keys: torch.Tensor          # (tensors,) int64, the 64-bit Philox keys' bits


def tables(params: list, grads: list, ms: list, vs: list, keys: list[int], tile: int) -> Tables:
    device = params[0].device

    def addresses(ts):
        return [(t if t is not None else p).data_ptr() for p, t in zip(params, ts)]

    tensor, start = tile_table([p.numel() for p in params], tile)
    ints = torch.tensor([addresses(params), addresses(grads), addresses(ms), addresses(vs),
                         [p.numel() for p in params], [as_signed64(k) for k in keys]], dtype=torch.int64).to(device)
    return Tables(tensor.to(device), start.to(device), *ints.unbind(0))


def tile_table(sizes: list[int], tile: int = DEFAULT_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor index (int32), start element (int64)) of every tile, tensors in order."""
    if tile <= 0 or tile % 4:
        raise ValueError(f"tile must be a positive multiple of 4 (four elements share one Philox call), got {tile}")
    if any(n < 0 for n in sizes):
        raise ValueError("tensor sizes must be >= 0")
    counts = [math.ceil(n / tile) for n in sizes]
    tensor = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), torch.tensor(counts, dtype=torch.int64))
    start = torch.cat([torch.arange(c, dtype=torch.int64) * tile for c in counts]) if counts else torch.zeros(0, dtype=torch.int64)
    return tensor, start


def as_signed64(key: int) -> int:
    """A 64-bit key as the int64 with the same bits (for int64 key tables)."""
    return key - (1 << 64) if key >= 1 << 63 else key

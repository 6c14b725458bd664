"""Noise-aware Adam: the noise's variance taken out of Adam's second moment.

After Tang, Shpilevskiy and Lécuyer (AAAI 2024, "DP-AdamBC"). Under DP, Adam gets g + z per step,
z Gaussian with a per-coordinate variance phi that the mechanism fixes and publishes (sigma, the
clipping norm, the group's noise scale w_g, the expected batch); its second moment then estimates
g^2 + phi, and dividing by its root normalizes the noise away (DP-Adam is DP-SGD with a rescaled
learning rate, whatever the allocation does). The correction:

    denom = sqrt(max(v_hat - phi_hat, floor * phi_hat)) + eps

phi_hat is phi averaged as v averages g^2 (the same beta2, bias-corrected): a phi that changes over
the steps (the allocation's scales, adaptive per-layer thresholds) is subtracted as v saw it, and a
constant phi is subtracted exactly. The floor is relative to phi_hat (Tang et al.'s gamma' is an
absolute constant): a coordinate whose estimated signal is below the noise moves at most
lr * m_hat / sqrt(floor * phi_hat), whatever the gradients' scale; at the default floor 1 no
coordinate's step exceeds sqrt(2) times DP-Adam's. It reads the released gradient
and public constants only: post-processing, the privacy guarantee is unchanged.

``adam_step_`` is the torch reference (and the torch path's update); the fused kernels read phi_hat
and floor * phi_hat from the NOISE_VAR and VAR_FLOOR columns of anadp.update_table.
"""
from __future__ import annotations

import torch

from . import sharding
from . import update_table as U

# f = 1: the corrected step is at most sqrt(2) times DP-Adam's in every coordinate (max(v - phi, phi) >= v / 2),
# so a learning rate tuned for DP-Adam stays valid; f = 0.1 collapsed the LoRA benchmark at its lr (results)
DEFAULT_FLOOR = 1.0


class NoiseVariance:
    """Per tensor, the exponential average of its gradient's noise variance, bias-corrected."""

    def __init__(self, n: int, floor: float = DEFAULT_FLOOR):
        if not floor > 0:
            raise ValueError(f"the noise correction's floor must be > 0 (a fraction of the noise variance), got {floor}")
        self.floor = float(floor)
        self.average = torch.zeros(n, dtype=torch.float64)
        self.updates = 0

    def advance(self, phi: torch.Tensor, beta2: torch.Tensor) -> torch.Tensor:
        """Average in this step's variances ``phi`` (per tensor, float64); returns phi_hat."""
        self.average = beta2 * self.average + (1 - beta2) * phi
        self.updates += 1
        return self.average / (1 - beta2 ** self.updates)

    def state_dict(self) -> dict:
        return {"average": self.average.clone(), "updates": self.updates, "floor": self.floor}

    def load_state_dict(self, state: dict) -> None:
        if state["floor"] != self.floor:
            raise ValueError(f"the checkpoint's noise correction has floor {state['floor']}, this optimizer "
                             f"{self.floor}: make it with the checkpoint's adam_noise_correction")
        self.average, self.updates = state["average"].clone(), int(state["updates"])


def unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the correction cannot run with this optimizer (None: it can): Adam / AdamW as the fused
    update implements them."""
    if U.optimizer_kind(optimizer) != U.ADAM:
        return f"the wrapped optimizer is {type(optimizer).__name__}"
    return U.unsupported_reason(optimizer)


@torch.no_grad()
def adam_step_(optimizer: torch.optim.Optimizer, params: list, noise_var: torch.Tensor, floor: torch.Tensor) -> None:
    """torch's Adam / AdamW step on ``params`` (their .grad, in the optimizer's state format) with
    v_hat - noise_var[k] floored at floor[k] under the root, per tensor k of ``params``."""
    index = {p: k for k, p in enumerate(params)}
    decoupled = type(optimizer) is torch.optim.AdamW
    for group in optimizer.param_groups:
        ps = [p for p in group["params"] if p in index and p.grad is not None]
        if not ps:
            continue
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        decoupled_here = decoupled or bool(group.get("decoupled_weight_decay", False))
        for p in ps:
            state = optimizer.state[p]
            if "step" not in state:  # as torch creates it
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # elementwise: on FSDP2's DTensors, each rank's shards (DTensor has no foreach maximum)
        grads = [sharding.local(p.grad) for p in ps]
        ms = [sharding.local(optimizer.state[p]["exp_avg"]) for p in ps]
        vs = [sharding.local(optimizer.state[p]["exp_avg_sq"]) for p in ps]
        steps = [optimizer.state[p]["step"] for p in ps]
        k = [index[p] for p in ps]
        ps = [sharding.local(p) for p in ps]
        torch._foreach_add_(steps, 1.0)
        if wd != 0:
            if decoupled_here:
                torch._foreach_mul_(ps, 1 - lr * wd)
            else:
                grads = torch._foreach_add(grads, ps, alpha=wd)
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
        t = [float(s) for s in steps]
        vhat = torch._foreach_div(vs, [1 - beta2 ** s for s in t])
        torch._foreach_sub_(vhat, [float(noise_var[i]) for i in k])
        torch._foreach_maximum_(vhat, [float(floor[i]) for i in k])
        torch._foreach_sqrt_(vhat)
        torch._foreach_add_(vhat, eps)
        torch._foreach_addcdiv_(ps, ms, vhat, [-lr / (1 - beta1 ** s) for s in t])

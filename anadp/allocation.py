"""ANADP noise allocation: one noise scale w_g per group (trainable tensor).

Importance comes from the privatized gradient only, so it is post-processing
and costs no privacy (AdaLoRA / PLATON score):

    I_g   = mean_j |p_j * grad_j|
    Ibar  = b1 Ibar + (1 - b1) I
    Ubar  = b2 Ubar + (1 - b2) |I - Ibar|
    s_g   = Ibar * Ubar

w_g decreases with s_g (w ~ s^-power), is bounded to [w_min, w_max] and
normalized so that sum_g d_g w_g^2 = sum_g d_g (d_g = numel): the noise energy
of the whole model equals uniform DP's. During warm-up w = 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class AllocationConfig:
    beta1: float = 0.85
    beta2: float = 0.85
    power: float = 0.5
    w_min: float = 0.3
    w_max: float = 3.0
    warmup_steps: int = 10

    def __post_init__(self):
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if not (0 < self.w_min <= 1 <= self.w_max):
            raise ValueError(f"need 0 < w_min <= 1 <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        if self.power < 0 or self.warmup_steps < 0:
            raise ValueError("power and warmup_steps must be >= 0")


def normalize_scales(u: torch.Tensor, sizes: torch.Tensor, w_min: float, w_max: float) -> torch.Tensor:
    """w = clamp(lam * u, w_min, w_max) with lam such that sum d w^2 = sum d, exactly.

    f(lam) = sum d clamp(lam u)^2 is nondecreasing: bisection on log lam finds
    which groups sit at a bound, then the free groups are rescaled in closed form.
    """
    u, d = u.double(), sizes.double()
    D = d.sum()

    def energy(log_lam):
        return (d * (torch.exp(log_lam) * u).clamp(w_min, w_max).pow(2)).sum()

    lo, hi = torch.tensor(-60.0, dtype=torch.float64), torch.tensor(60.0, dtype=torch.float64)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if energy(mid) < D else (lo, mid)
    w = (torch.exp((lo + hi) / 2) * u).clamp(w_min, w_max)
    free = (w > w_min) & (w < w_max)
    if free.any():
        fixed = (d * w.pow(2))[~free].sum()
        w[free] = w[free] * torch.sqrt((D - fixed) / (d * w.pow(2))[free].sum())
    return w


class NoiseAllocator:
    """Keeps the importance EMAs and the current noise scales of every group."""

    def __init__(self, sizes: list[int], mode: str = "anadp", config: AllocationConfig | None = None):
        if mode not in ("anadp", "uniform"):
            raise ValueError(f"allocation must be 'anadp' or 'uniform', got {mode!r}")
        self.mode, self.config = mode, config or AllocationConfig()
        self.sizes = torch.tensor(sizes, dtype=torch.float64)
        n = len(sizes)
        self.scales = torch.ones(n, dtype=torch.float64)
        self.ipt_bar = torch.zeros(n, dtype=torch.float64)
        self.unc_bar = torch.zeros(n, dtype=torch.float64)
        self.updates = 0

    @torch.no_grad()
    def update(self, params, privatized_grads) -> None:
        """One EMA step from the privatized gradients, then new scales for the next step."""
        if self.mode == "uniform":
            self.updates += 1
            return
        self.update_importance(torch.stack([(p.detach().float() * g.float()).abs().mean().double().cpu()
                                            for p, g in zip(params, privatized_grads)]))

    @torch.no_grad()
    def update_importance(self, ipt: torch.Tensor) -> None:
        """The same from the sensitivities I_g = mean_j |p_j * grad_j| (the fused kernels' output,
        on their device: copied to the host only when the allocation uses it)."""
        if self.mode == "uniform":
            self.updates += 1
            return
        c = self.config
        ipt = ipt.double().cpu()
        self.ipt_bar = c.beta1 * self.ipt_bar + (1 - c.beta1) * ipt
        self.unc_bar = c.beta2 * self.unc_bar + (1 - c.beta2) * (ipt - self.ipt_bar).abs()
        self.updates += 1
        if self.updates < c.warmup_steps:
            return
        s = self.ipt_bar * self.unc_bar
        if not torch.isfinite(s).all():
            raise FloatingPointError("non-finite importance score: a privatized gradient or parameter is not finite")
        if s.max() <= 0:
            return  # nothing to rank yet
        # a zero score (e.g. LoRA B at its zero init) gets the most noise: w_max
        s = s.clamp_min(1e-12 * float(s.max()))
        self.scales = normalize_scales(s.pow(-c.power), self.sizes, c.w_min, c.w_max)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "config": asdict(self.config), "scales": self.scales.clone(),
                "ipt_bar": self.ipt_bar.clone(), "unc_bar": self.unc_bar.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if state["scales"].shape != self.scales.shape:
            raise ValueError(f"allocation state has {state['scales'].numel()} groups, this model {self.scales.numel()}")
        self.mode, self.config = state["mode"], AllocationConfig(**state["config"])
        self.scales, self.ipt_bar, self.unc_bar = state["scales"].clone(), state["ipt_bar"].clone(), state["unc_bar"].clone()
        self.updates = state["updates"]

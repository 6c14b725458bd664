"""Noise allocation: one noise scale w_g per noise group, from privatized quantities only.

The mechanism (``clipping="whitened"``, the default): sample i is clipped on its
whitened norm sqrt(sum_g ||g_ig||^2 / w_g^2) and group g gets noise sigma * C * w_g.
That is DP-SGD on the whitened gradient followed by a data-independent rescaling,
so it is charged exactly sigma, whatever w is, as long as w depends only on
earlier released outputs.

Groups, as in the paper: one per weight matrix (a Linear, Conv1D or Embedding
weight, each LoRA A or B factor, the classifier); a module's biases ride with its
matrix; parameters of modules without a matrix (LayerNorm, RMSNorm) form one
"rest" group held at w = 1, so that no small tensor steers every sample's clip.

Allocations (``allocation=``), w = 1 everywhere during the first ``warmup_steps``:

``uniform``  w = 1: DP-SGD / DP-Adam.

``paper``    the paper's AdaLoRA/PLATON importance on the noisy gradient,
             I_g = mean_{j in g} |p_j grad_j|, Ibar = b1 Ibar + (1-b1) I,
             Ubar = b2 Ubar + (1-b2) |I - Ibar|, s_g = Ibar Ubar; w_g ~ s_g^-power
             (power 0.5), sum_g d_g w_g^2 = sum_g d_g. The optimizer gets the noisy
             gradient as is. Blind to what the clipping pays: a group with large
             per-sample gradients (a random classifier head) scores high, gets a small
             w, and then dominates every sample's clipping norm.

``clip``     the first-order SGD model of one noisy step, all samples clipped:
             the loss decrease goes as 1 / F(w), F = (sum_g G_g^2 / w_g^2)(sum_g d_g w_g^2),
             G_g^2 the per-sample gradient energy of group g; minimum at
             w_g^2 ~ G_g / sqrt(d_g) (<= uniform's F by Cauchy-Schwarz).
             w_g = (G_g / sqrt(d_g))^(power/2), power 1; sum_g d_g w_g^2 = sum_g d_g.

``anadp``    (default) the same model for what the optimizer sees, with the
             optimizer fed the *whitened* noisy gradient (grad_g / w_g: noise of
             std sigma C / B in every group, so Adam's second moment does not lag
             when w moves, and SGD's noise cost does not depend on w). A step then
             gains sum_g x_g a_g / N(x), x_g = 1/w_g, a_g = ||E grad_g||^2 the group's
             coherent gradient energy and N(x)^2 = sum_g x_g^2 G_g^2 the clipping
             norm; by Cauchy-Schwarz the maximum is at x_g ~ a_g / G_g^2, the
             group's gradient coherence:
             w_g = (G_g^2 / a_g)^power, power 1; normalized so that the typical
             whitened per-sample norm equals the raw one (sum_g e_g / w_g^2 =
             sum_g e_g, e_g the raw per-sample energy), so C keeps its meaning.

Where the statistics come from (``clip`` and ``anadp``):

* G_g^2 from a released, charged statistic: each sample's clipped whitened energy
  split over the groups, r_ig = c_i^2 ||g_ig||^2 / (w_g^2 C^2) (sum_g r_ig <= 1, so
  the L2 sensitivity is 1), summed over the batch, plus Gaussian noise of std
  sigma_b = share_noise * sigma. The gradient then gets sigma_g with
  sigma_g^-2 + sigma_b^-2 = sigma^-2 (as Opacus's adaptive clipping splits its
  budget), so the step is charged exactly sigma.
* a_g from the privatized (whitened) gradient with the known noise energy and the
  per-sample diagonal subtracted: ||u_g||^2 - d_g (sigma_g C / B)^2 - C^2 R_g / B^2;
  where the optimizer keeps a first moment m (Adam, SGD with momentum), from ||m_g||^2
  the same way, with the noise and diagonal terms scaled by sum_k a_k^2 and the result
  divided by (sum_k a_k)^2 (m = sum_k a_k u_(t-k)): its noise is ~19x smaller at beta 0.9.
* both as EMAs (``stats_beta``) over steps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

ALLOCATIONS = ("anadp", "uniform", "paper", "clip")
DEFAULT_POWER = {"paper": 0.5, "clip": 1.0, "anadp": 1.0, "uniform": 0.0}


@dataclass
class AllocationConfig:
    beta1: float = 0.85         # paper: EMA of the importance
    beta2: float = 0.85         # paper: EMA of its uncertainty
    power: float | None = None  # exponent of the formula; None: the allocation's own (DEFAULT_POWER)
    w_min: float = 0.3
    w_max: float = 3.0
    warmup_steps: int = 10
    stats_beta: float = 0.9     # clip, anadp: EMA of the released statistics
    share_noise: float = 5.0    # clip, anadp: noise of the share release, in units of sigma

    def __post_init__(self):
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.stats_beta < 1):
            raise ValueError("beta1, beta2 and stats_beta must be in [0, 1)")
        if not (0 < self.w_min <= 1 <= self.w_max):
            raise ValueError(f"need 0 < w_min <= 1 <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        if (self.power is not None and self.power < 0) or self.warmup_steps < 0:
            raise ValueError("power and warmup_steps must be >= 0")
        if not self.share_noise > 1:
            raise ValueError(f"share_noise must be > 1 (the share release takes 1/share_noise^2 of the budget), "
                             f"got {self.share_noise}")


def noise_groups(names: list[str], shapes: list[torch.Size]) -> tuple[list[int], list[str]]:
    """(group index per tensor, -1 for the rest group; group names) from parameter names:
    one group per module holding a matrix (>= 2 dims); its other tensors join it."""
    modules = [n.rsplit(".", 1)[0] if "." in n else "" for n in names]
    group_names: list[str] = []
    index: dict[str, int] = {}
    for m, s in zip(modules, shapes):
        if len(s) >= 2 and m not in index:
            index[m] = len(group_names)
            group_names.append(m or "<top>")
    return [index.get(m, -1) for m in modules], group_names


def _normalize(u: torch.Tensor, weights: torch.Tensor, exponent: float, w_min: float, w_max: float) -> torch.Tensor:
    """w = clamp(lam * u, w_min, w_max) with lam such that sum weights * w^exponent equals
    sum weights (exactly, where some w are free). The sum is monotone in lam: bisection on
    log lam finds which groups sit at a bound, then the free ones are rescaled in closed form."""
    u, wt = u.double(), weights.double()
    target = wt.sum()
    sign = 1.0 if exponent > 0 else -1.0

    def excess(log_lam):
        return sign * ((wt * (torch.exp(log_lam) * u).clamp(w_min, w_max).pow(exponent)).sum() - target)

    lo, hi = torch.tensor(-60.0, dtype=torch.float64), torch.tensor(60.0, dtype=torch.float64)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    w = (torch.exp((lo + hi) / 2) * u).clamp(w_min, w_max)
    free = (w > w_min) & (w < w_max)
    if free.any() and (wt[free] > 0).any():
        fixed = (wt * w.pow(exponent))[~free].sum()
        w[free] = w[free] * ((target - fixed) / (wt * w.pow(exponent))[free].sum()).pow(1 / exponent)
    return w


def normalize_scales(u: torch.Tensor, sizes: torch.Tensor, w_min: float, w_max: float) -> torch.Tensor:
    """w = clamp(lam * u, w_min, w_max) with sum d w^2 = sum d: the noise energy of uniform DP."""
    return _normalize(u, sizes, 2.0, w_min, w_max)


class NoiseAllocator:
    """The noise scales of every group and the statistics they come from.

    ``sizes``: numel per tensor; ``groups``: group index per tensor (-1: rest, w = 1),
    default one group per tensor. ``scales`` is per tensor."""

    def __init__(self, sizes: list[int], mode: str = "anadp", config: AllocationConfig | None = None,
                 groups: list[int] | None = None):
        if mode not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {mode!r}")
        self.mode, self.config = mode, config or AllocationConfig()
        self.sizes = torch.tensor(sizes, dtype=torch.float64)
        groups = list(range(len(sizes))) if groups is None else list(groups)
        if len(groups) != len(sizes):
            raise ValueError(f"{len(groups)} group indices for {len(sizes)} tensors")
        self.group_of = torch.tensor(groups, dtype=torch.long)
        self.n_groups = max(groups, default=-1) + 1
        # column n_groups of the group tables is the rest group
        self._col = torch.where(self.group_of >= 0, self.group_of, torch.full_like(self.group_of, self.n_groups))
        self.group_sizes = self.per_group(self.sizes)[:self.n_groups]
        self.group_scales = torch.ones(self.n_groups, dtype=torch.float64)
        n = self.n_groups
        self.ipt_bar, self.unc_bar = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.energy_bar, self.share_bar = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.updates = 0

    # --- what the optimizer asks -------------------------------------------------------
    @property
    def power(self) -> float:
        return DEFAULT_POWER[self.mode] if self.config.power is None else self.config.power

    @property
    def scales(self) -> torch.Tensor:
        """w per tensor (1 in the rest group)."""
        return torch.cat([self.group_scales, torch.ones(1, dtype=torch.float64)])[self._col]

    @property
    def releases_shares(self) -> bool:
        """Whether each step also releases the per-group clipped energy (charged out of sigma)."""
        return self.mode in ("clip", "anadp")

    @property
    def whitened_feed(self) -> bool:
        """Whether the optimizer gets grad_g / w_g instead of grad_g."""
        return self.mode == "anadp"

    @property
    def statistic(self) -> str | None:
        """Per-tensor sum the allocation reads from the privatized gradient: "abs_p_grad"
        (sum |p * grad|, p before the update), "grad_sq" (sum grad^2) or None."""
        return {"paper": "abs_p_grad", "clip": None, "anadp": "grad_sq"}.get(self.mode)

    def noise_multipliers(self, sigma: float) -> tuple[float, float]:
        """(gradient noise multiplier, share-release noise multiplier) that together cost sigma."""
        if not self.releases_shares or sigma == 0:
            return sigma, 0.0
        k = self.config.share_noise
        return sigma / (1 - 1 / k ** 2) ** 0.5, k * sigma

    def per_group(self, per_tensor: torch.Tensor) -> torch.Tensor:
        """Sum a per-tensor vector into (n_groups + 1,): the groups, then the rest."""
        out = torch.zeros(self.n_groups + 1, dtype=torch.float64)
        return out.index_add_(0, self._col, per_tensor.double().cpu())

    # --- one step ------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, stat: torch.Tensor | None = None, shares: torch.Tensor | None = None, *,
               noise_std: float = 0.0, clip: float = 1.0, denom: float = 1.0, stat_noise: float = 1.0,
               stat_signal: float = 1.0) -> None:
        """One step of the statistics, then the scales of the next step.

        ``stat``: per-tensor sums of ``self.statistic`` over the privatized gradient the
        optimizer got, or for "grad_sq" over an average m = sum_k a_k grad_(t-k) of them, whose
        noise and per-sample energies are ``stat_noise`` = sum a_k^2 times one step's and whose
        coherent energy is ``stat_signal`` = (sum a_k)^2 times one step's; ``shares``: the
        released (noisy) per-group clipped energies, (n_groups + 1,); ``noise_std``: the std of
        the gradient's noise per coordinate in whitened units (sigma_g C / denom); ``clip``: C;
        ``denom``: what the clipped sum was divided by. Nothing else reaches the allocation."""
        self.updates += 1
        if self.mode == "uniform" or self.n_groups == 0:
            return
        c = self.config
        if self.mode == "paper":
            ipt = self.per_group(stat)[:self.n_groups] / self.group_sizes
            self.ipt_bar = c.beta1 * self.ipt_bar + (1 - c.beta1) * ipt
            self.unc_bar = c.beta2 * self.unc_bar + (1 - c.beta2) * (ipt - self.ipt_bar).abs()
            score = self.ipt_bar * self.unc_bar
        else:
            share = shares.double().cpu()[:self.n_groups]
            self.share_bar = c.stats_beta * self.share_bar + (1 - c.stats_beta) * share
            if self.mode == "anadp":
                energy = (self.per_group(stat)[:self.n_groups] - stat_noise * (
                    self.group_sizes * noise_std ** 2 + clip ** 2 * share / denom ** 2)) / stat_signal
                self.energy_bar = c.stats_beta * self.energy_bar + (1 - c.stats_beta) * energy
            score = self.share_bar
        if not torch.isfinite(score).all() or not torch.isfinite(self.energy_bar).all():
            raise FloatingPointError("non-finite allocation statistic: a privatized gradient or parameter is "
                                     "not finite")
        if self.updates < c.warmup_steps:
            return
        self.group_scales = self._scales()

    def _scales(self) -> torch.Tensor:
        c, k = self.config, self.power
        w_old = self.group_scales
        if self.mode == "paper":
            s = self.ipt_bar * self.unc_bar
            if s.max() <= 0:
                return w_old  # nothing to rank yet
            s = s.clamp_min(1e-12 * float(s.max()))  # a zero score (LoRA B at its zero init) gets w_max
            return normalize_scales(s.pow(-k), self.group_sizes, c.w_min, c.w_max)
        share = self.share_bar
        if share.max() <= 0:
            return w_old
        share = share.clamp_min(1e-3 * float(share.max()))  # noise can make a small share negative
        raw = w_old ** 2 * share  # per-sample energy of the raw gradient, up to one common factor
        if self.mode == "clip":
            return normalize_scales((raw.sqrt() / self.group_sizes.sqrt()).pow(k / 2), self.group_sizes,
                                    c.w_min, c.w_max)
        a = self.energy_bar
        if a.max() <= 0:
            return w_old
        a = a.clamp_min(1e-3 * float(a.max()))
        # G^2 / a in raw units: (w^2 share) / (w^2 a_white) = share / a_white
        return _normalize((share / a).pow(k), raw, -2.0, c.w_min, c.w_max)

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"mode": self.mode, "config": asdict(self.config), "group_of": self.group_of.clone(),
                "group_scales": self.group_scales.clone(), "ipt_bar": self.ipt_bar.clone(),
                "unc_bar": self.unc_bar.clone(), "energy_bar": self.energy_bar.clone(),
                "share_bar": self.share_bar.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if "group_of" not in state or not torch.equal(state["group_of"], self.group_of):
            raise ValueError("the allocation state was saved for other noise groups than this model's")
        self.mode, self.config = state["mode"], AllocationConfig(**state["config"])
        for k in ("group_scales", "ipt_bar", "unc_bar", "energy_bar", "share_bar"):
            setattr(self, k, state[k].clone())
        self.updates = state["updates"]

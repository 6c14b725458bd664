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

``anadp``    (default) the gain of the next step as the optimizer sees it, with the
             optimizer fed the *whitened* noisy gradient (grad_g / w_g: noise of
             std n = sigma C / B per coordinate in every group, so Adam's second
             moment does not lag when w moves, and SGD's noise cost does not
             depend on w). With x_g = 1/w_g, a_g = ||E grad_g||^2 the group's
             coherent gradient energy and N(x)^2 = sum_g x_g^2 G_g^2 the clipping
             norm, group g's signal per coordinate is s_g = x_g sqrt(a_g / d_g) / N(x)
             and the step gains sum_g sqrt(a_g d_g) phi(s_g / n): phi(r) = r for SGD
             (maximum at x_g ~ a_g / G_g^2 by Cauchy-Schwarz: the group's gradient
             coherence), phi(r) = r / sqrt(1 + r^2) for Adam, whose step saturates once
             a group's signal dominates its noise (a classifier head, early on): such
             a group can take more noise, and its share of every sample's clipping
             norm goes to the groups that are still noise-bound. With Adam's noise
             correction at floor f (anadp.adam_correction) the step is m / max(|g|, sqrt(f) n)
             per coordinate, so phi(r) = min(r / sqrt(f), 1), taken smooth as
             phi(r / sqrt(f)): Adam's phi is the case f = 1, the default floor. Maximized
             numerically over the groups (see ``_best_for_step``).

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
* both as EMAs (``stats_beta``) over steps; G_g^2 pooled with its kind (the same matrix in
  every layer, weight ``pooling``), a_g / G_g^2 shrunk toward the common coherence by how well
  it is measured (empirical Bayes, ``_coherence``), and the maximizer tempered,
  w = (w* / geometric mean)^power (power 0.5): at DP batch sizes most single-matrix statistics
  are noise, and maximizing noise picks bounds at random.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

ALLOCATIONS = ("anadp", "uniform", "paper", "clip")
DEFAULT_POWER = {"paper": 0.5, "clip": 1.0, "anadp": 0.5, "uniform": 0.0}


@dataclass
class AllocationConfig:
    beta1: float = 0.85         # paper: EMA of the importance
    beta2: float = 0.85         # paper: EMA of its uncertainty
    power: float | None = None  # exponent of the formula; None: the allocation's own (DEFAULT_POWER)
    w_min: float = 0.3
    w_max: float = 3.0
    warmup_steps: int = 10
    stats_beta: float = 0.9     # clip, anadp: EMA of the released statistics
    pooling: float = 0.75       # clip, anadp: weight of the mean over a group's kind (its matrix in every layer)
    share_noise: float = 10.0   # clip, anadp: noise of the share release, in units of sigma (gradient: +0.5%)
    # the first step's w of the named groups (optimizer.group_names; the others 1), chosen before any data is
    # seen: e.g. {"classifier": 0.1} clips a new head in its own budget (the full fine-tuning recipe). Uniform
    # keeps them, the adaptive allocations start from them. Whitened clipping: exact for any w > 0
    scales: dict | None = None

    def __post_init__(self):
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.stats_beta < 1):
            raise ValueError("beta1, beta2 and stats_beta must be in [0, 1)")
        if not (0 < self.w_min <= 1 <= self.w_max):
            raise ValueError(f"need 0 < w_min <= 1 <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        if (self.power is not None and self.power < 0) or self.warmup_steps < 0:
            raise ValueError("power and warmup_steps must be >= 0")
        if not 0 <= self.pooling <= 1:
            raise ValueError(f"pooling must be in [0, 1], got {self.pooling}")
        if self.scales is not None and not all(float(w) > 0 for w in self.scales.values()):
            raise ValueError(f"scales must be > 0, got {self.scales}")
        if not self.share_noise > 1:
            raise ValueError(f"share_noise must be > 1 (the share release takes 1/share_noise^2 of the budget), "
                             f"got {self.share_noise}")


def kind_of(group_name: str) -> str:
    """A group's kind: its name with the layer index masked (``layer.3.attention.self.query`` ->
    ``layer.*.attention.self.query``): the same matrix in every layer."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", group_name)


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


def named_scales(scales: dict, names: list[str]) -> torch.Tensor:
    """Group scales from {group name: w} (the groups not named: 1)."""
    unknown = sorted(set(scales) - set(names))
    if unknown:
        raise ValueError(f"AllocationConfig.scales names groups this model does not have: {unknown}; its groups "
                         f"(optimizer.group_names): {names[:8]}{' ...' if len(names) > 8 else ''}")
    return torch.tensor([float(scales.get(n, 1.0)) for n in names], dtype=torch.float64)


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
    """The noise scales of every group and the statistics they come from; one subclass per
    allocation (``NoiseAllocator(sizes, mode)`` makes the one of ``mode``).

    ``sizes``: numel per tensor; ``groups``: group index per tensor (-1: rest, w = 1),
    default one group per tensor. ``scales`` is per tensor."""

    mode = "uniform"
    statistic: str | None = None  # the per-tensor sum it reads from the privatized gradient (see below)
    whitened_feed = False         # whether the optimizer gets grad_g / w_g instead of grad_g
    _releases = False             # whether it needs the per-group share release (whitened clipping)

    def __new__(cls, sizes=None, mode: str = "anadp", *args, **kwargs):
        if cls is NoiseAllocator:
            if mode not in ALLOCATIONS:
                raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {mode!r}")
            cls = _BY_MODE[mode]
        return super().__new__(cls)

    def __init__(self, sizes: list[int], mode: str | None = None, config: AllocationConfig | None = None,
                 groups: list[int] | None = None, adaptive: bool = True, kinds: list[str] | None = None,
                 saturation: float = 1.0):
        if mode is not None and mode != self.mode:
            raise ValueError(f"{type(self).__name__} is allocation {self.mode!r}, not {mode!r}")
        self.config = config or AllocationConfig()
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
        self.energy_bar, self.share_bar = torch.zeros(n, dtype=torch.float64), torch.zeros(n + 1, dtype=torch.float64)
        self.energy_var = torch.zeros(n, dtype=torch.float64)  # variance of energy_bar from the noise alone
        self.adaptive = adaptive  # the optimizer normalizes each coordinate (Adam): anadp's gain saturates
        # where it saturates, in (signal / noise)^2 per coordinate: 1 for Adam, the floor f for Adam with
        # the noise correction (its step m / max(|g|, sqrt(f) n)): anadp's gain is then phi(r / sqrt(f))
        if not saturation > 0:
            raise ValueError(f"saturation must be > 0, got {saturation}")
        self.saturation = float(saturation)
        self.compiled = True  # anadp's maximizer in the compiled CPU kernel where it is built (else numpy)
        # kind of each group (the same matrix in every layer): statistics are pooled over a kind
        names = list(kinds) if kinds is not None else [str(g) for g in range(n)]
        if len(names) != n:
            raise ValueError(f"{len(names)} kinds for {n} groups")
        index = {k: i for i, k in enumerate(dict.fromkeys(names))}
        self.kind = torch.tensor([index[k] for k in names], dtype=torch.long)
        self._kind_counts = None  # see _pooled
        self.noise_var = 0.0
        self.updates = 0
        # per-layer clipping: no share release; the optimizer passes the thresholds' public bound instead
        self.per_layer = False

    # --- what the optimizer asks -------------------------------------------------------
    @property
    def power(self) -> float:
        return DEFAULT_POWER[self.mode] if self.config.power is None else self.config.power

    @property
    def group_scales(self) -> torch.Tensor:
        """w per group; assign, do not write in place (the per-column and per-tensor views are
        formed once per assignment: the step reads them several times, each a host op on the GPU)."""
        return self._group_scales

    @group_scales.setter
    def group_scales(self, value: torch.Tensor) -> None:
        self._group_scales = value
        self._column_scales = torch.cat([value, torch.ones(1, dtype=torch.float64)])
        self._scales_per_tensor = self._column_scales[self._col]

    @property
    def column_scales(self) -> torch.Tensor:
        """w per group column, the rest group (w = 1) last (read only)."""
        return self._column_scales

    @property
    def scales(self) -> torch.Tensor:
        """w per tensor, 1 in the rest group (read only)."""
        return self._scales_per_tensor

    @property
    def releases_shares(self) -> bool:
        """Whether each step also releases the per-group clipped energy (charged out of sigma)."""
        return self._releases and not self.per_layer

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
               noise_std: float = 0.0, clip: float = 1.0, denom: float = 1.0, samples: float = 1.0,
               stat_noise: float = 1.0, stat_signal: float = 1.0) -> None:
        """One step of the statistics, then the scales of the next step.

        ``stat``: per-tensor sums of ``self.statistic`` ("abs_p_grad": sum |p * grad|, p before the
        update; "grad_sq": sum grad^2) over the privatized gradient the optimizer got, or for
        "grad_sq" over an average m = sum_k a_k grad_(t-k) of them, whose noise and per-sample
        energies are ``stat_noise`` = sum a_k^2 times one step's and whose coherent energy is
        ``stat_signal`` = (sum a_k)^2 times one step's; ``shares``: the released (noisy) per-group
        clipped energies, (n_groups + 1,); ``noise_std``: the std of the gradient's noise per
        coordinate in whitened units (sigma_g C / denom); ``clip``: C; ``denom``: what the clipped
        sum was divided by; ``samples``: the expected number of samples in it (public: q N times the
        logical batches). Nothing else reaches the allocation."""
        self.updates += 1
        if self.n_groups == 0:
            return
        score = self._observe(stat, shares, noise_std=noise_std, clip=clip, denom=denom, samples=samples,
                              stat_noise=stat_noise, stat_signal=stat_signal)
        if score is None:
            return
        if not bool(torch.isfinite(score).all() & torch.isfinite(self.energy_bar).all()):  # one read back
            raise FloatingPointError("non-finite allocation statistic: a privatized gradient or parameter is "
                                     "not finite")
        if self.updates < self.config.warmup_steps:
            return
        self.group_scales = self._scales()

    def _observe(self, stat, shares, **public) -> torch.Tensor | None:
        """Fold one step's released statistics into the EMAs; returns what must be finite (None: nothing kept)."""
        return None

    def _scales(self) -> torch.Tensor:
        """The next step's group scales, from the EMAs."""
        return self.group_scales

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"mode": self.mode, "config": asdict(self.config), "group_of": self.group_of.clone(),
                "group_scales": self.group_scales.clone(), "ipt_bar": self.ipt_bar.clone(),
                "unc_bar": self.unc_bar.clone(), "energy_bar": self.energy_bar.clone(),
                "energy_var": self.energy_var.clone(),
                "share_bar": self.share_bar.clone(), "noise_var": self.noise_var, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if "group_of" not in state or not torch.equal(state["group_of"], self.group_of):
            raise ValueError("the allocation state was saved for other noise groups than this model's")
        tensors = ("group_scales", "ipt_bar", "unc_bar", "energy_bar", "energy_var", "share_bar")
        missing = [k for k in ("mode", "config", "noise_var", "updates") + tensors if k not in state]
        unknown = sorted(set(state.get("config", {})) - {f.name for f in fields(AllocationConfig)})
        if missing or unknown:
            raise ValueError(
                f"the allocation state has {'no ' + ', '.join(missing) if missing else 'unknown settings ' + str(unknown)}: "
                "it was saved by another version of anadp, whose allocation this one cannot continue exactly. Resume "
                "with that version, or load only the model and the wrapped optimizer's state to restart the allocation")
        if state["mode"] != self.mode:
            raise ValueError(f"the allocation state was saved by allocation {state['mode']!r}, not {self.mode!r}")
        self.config = AllocationConfig(**state["config"])
        for k in tensors:
            setattr(self, k, state[k].clone())
        self.noise_var, self.updates = state["noise_var"], state["updates"]


class UniformAllocation(NoiseAllocator):
    """w = 1: DP-SGD / DP-Adam."""
    mode = "uniform"


class PaperAllocation(NoiseAllocator):
    """The paper's AdaLoRA/PLATON importance of the noisy gradient (see the module docstring)."""
    mode = "paper"
    statistic = "abs_p_grad"

    def _observe(self, stat, shares, **public):
        c = self.config
        ipt = self.per_group(stat)[:self.n_groups] / self.group_sizes
        self.ipt_bar = c.beta1 * self.ipt_bar + (1 - c.beta1) * ipt
        self.unc_bar = c.beta2 * self.unc_bar + (1 - c.beta2) * (ipt - self.ipt_bar).abs()
        return self.ipt_bar * self.unc_bar

    def _scales(self):
        c, k = self.config, self.power
        s = self.ipt_bar * self.unc_bar
        if s.max() <= 0:
            return self.group_scales  # nothing to rank yet
        s = s.clamp_min(1e-12 * float(s.max()))  # a zero score (LoRA B at its zero init) gets w_max
        return normalize_scales(s.pow(-k), self.group_sizes, c.w_min, c.w_max)


class ClipAllocation(NoiseAllocator):
    """The first-order SGD model of one noisy step, all samples clipped, from the share release."""
    mode = "clip"
    _releases = True

    def _observe(self, stat, shares, *, noise_std, samples, **public):
        # EMAs in raw units (whitened ones times w^2 of their step), so that steps measured
        # under different w average to one quantity
        c = self.config
        self._w2 = self.column_scales ** 2
        shares = shares.double().cpu()
        self.share_bar = c.stats_beta * self.share_bar + (1 - c.stats_beta) * shares * self._w2 / samples
        self.noise_var = noise_std ** 2
        return self.share_bar

    def _raw_shares(self) -> torch.Tensor | None:
        """The pooled per-sample energy of the raw gradient per group (up to one factor), or None."""
        raw = self._pooled(self.share_bar[:self.n_groups])
        if raw.max() <= 0:
            return None
        return raw.clamp_min(1e-3 * float(raw.max()))  # noise can make a small share negative

    def _scales(self):
        c, k = self.config, self.power
        raw = self._raw_shares()
        if raw is None:
            return self.group_scales
        return normalize_scales((raw.sqrt() / self.group_sizes.sqrt()).pow(k / 2), self.group_sizes, c.w_min, c.w_max)

    def _pooled(self, per_group: torch.Tensor) -> torch.Tensor:
        """(1 - pooling) * the group's own statistic + pooling * the mean over its kind: a single
        matrix's statistic is mostly noise at DP batch sizes, its kind's mean over the layers less so."""
        if self._kind_counts is None:  # the kinds are fixed: their sizes once
            n_kinds = int(self.kind.max()) + 1 if self.n_groups else 0
            self._kind_counts = torch.zeros(n_kinds, dtype=torch.float64).index_add_(
                0, self.kind, torch.ones(len(self.kind), dtype=torch.float64))
        sums = torch.zeros_like(self._kind_counts).index_add_(0, self.kind, per_group.double())
        p = self.config.pooling
        return (1 - p) * per_group + p * (sums / self._kind_counts)[self.kind]


class AnadpAllocation(ClipAllocation):
    """The gain of the next step as the optimizer sees it, fed the whitened noisy gradient (see the
    module docstring); the default."""
    mode = "anadp"
    statistic = "grad_sq"
    whitened_feed = True

    def _observe(self, stat, shares, *, noise_std, clip, denom, samples, stat_noise, stat_signal):
        score = super()._observe(stat, shares, noise_std=noise_std, samples=samples)
        c, w2 = self.config, self._w2
        shares = shares.double().cpu()
        energy = (self.per_group(stat)[:self.n_groups] - stat_noise * (
            self.group_sizes * noise_std ** 2 + clip ** 2 * shares[:self.n_groups] / denom ** 2)) / stat_signal
        self.energy_bar = c.stats_beta * self.energy_bar + (1 - c.stats_beta) * energy * w2[:-1]
        # the noise's share of one estimate: chi-square, var = 2 d (n^2 sum a_k^2)^2 / (sum a_k)^4; an
        # EMA of estimates whose averages overlap (a first moment) shrinks it less than independent ones
        one = 2 * self.group_sizes * (noise_std ** 2 * stat_noise / stat_signal) ** 2 * w2[:-1] ** 2
        shrink = min(1.0, (1 - c.stats_beta) / (1 + c.stats_beta) / stat_noise)
        self.energy_var = c.stats_beta * self.energy_var + (1 - c.stats_beta) * one * shrink
        return score

    def _scales(self):
        c, k = self.config, self.power
        if self._raw_shares() is None or self.energy_bar.max() <= 0 or self.noise_var <= 0:
            return self.group_scales
        best = self._best_for_step()
        if not torch.isfinite(best).all():
            return self.group_scales
        # tempered: w = (w* / its geometric mean)^power, so that noisy statistics move w only part-way
        shape = best.log() - best.log().mean()
        return torch.exp(k * shape).clamp(c.w_min, c.w_max)

    def _best_for_step(self, iterations: int = 300) -> torch.Tensor:
        """anadp: the x = 1/w that maximizes the expected first-order gain of the next step,

            gain(x) = sum_g sqrt(alpha_g d_g) phi(s_g(x) / n),
            s_g(x)^2 = x_g^2 alpha_g / (d_g sum_h x_h^2 G_h^2)   (all samples clipped; C cancels),

        alpha_g the group's raw coherent gradient energy, G_h^2 its raw per-sample energy (the
        rest group at x = 1 included), n the noise per coordinate that the optimizer sees (times
        sqrt(saturation): where its step saturates), s_g the
        signal per coordinate. phi(r) = r for SGD (then the maximum is x_g ~ alpha_g / G_g^2,
        Cauchy-Schwarz), r / sqrt(1 + r^2) for Adam-type optimizers: a group whose signal already
        dominates its noise gains nothing from more, so its clipping budget is better spent on
        the groups that are still noise-bound. The statistics are kept raw (measured whitened at
        the w of their step: A_g = alpha_g / w_g^2 and shares r_h = G_h^2 / w_h^2, both up to that
        step's common 1 / N^2, which cancels in s_g). Projected gradient ascent on log x,
        warm-started at the current w, within [1/w_max, 1/w_min]."""
        c = self.config
        lo, hi = -math.log(c.w_max), -math.log(c.w_min)
        log_x = np.clip(-np.log(self.group_scales.numpy()), lo, hi)
        if self.compiled:
            from .backends import cpu
            G2, alpha, d, n = self._gain_terms()
            out = cpu.maximize_gain(torch.from_numpy(log_x), G2[:-1].contiguous(), float(G2[-1]), alpha.contiguous(),
                                    d.double().contiguous(), n, self.adaptive, lo, hi, iterations)
            if out is not None:  # the same loop compiled (csrc/cpu/gain.cpp); None: no kernel here
                return torch.exp(-out).clamp(c.w_min, c.w_max)
        grad_of = self.step_gain_grad()
        m, v, (b1, b2, eps) = np.zeros_like(log_x), np.zeros_like(log_x), (0.9, 0.999, 1e-8)
        for i in range(iterations):  # torch.optim.Adam's update, in numpy: ~10x faster than autograd here
            lr = 0.1 * (1 - i / iterations) + 1e-3  # decays: settles at the maximum
            g = -grad_of(log_x)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            t = i + 1
            log_x = log_x - lr / (1 - b1 ** t) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
            np.clip(log_x, lo, hi, out=log_x)
        return torch.from_numpy(np.exp(-log_x)).clamp(c.w_min, c.w_max)

    def _coherence(self, G2: torch.Tensor) -> torch.Tensor:
        """Each group's gradient coherence rho_g = a_g / G_g^2, shrunk toward the groups' common
        value by how well it is measured (empirical Bayes): rho_hat = rho_bar + t^2 / (t^2 + se_g^2)
        (rho_g - rho_bar), se_g the noise of the estimate, t^2 the spread of the true values that the
        estimates show beyond their noise. A group whose signal is buried in noise gets rho_bar, so
        it is treated as uniform DP treats it; only a measured difference moves its w."""
        rho = self.energy_bar / G2
        se2 = self.energy_var / G2 ** 2
        if len(rho) < 2 or not (se2 > 0).all():
            return rho.clamp_min(0)  # one group, or no noise to shrink by (sigma = 0)
        weights = 1 / se2
        weights = weights / weights.max()  # relative precisions (the scale cancels below)
        rho_bar = (weights * rho).sum() / weights.sum()
        # DerSimonian-Laird: the spread beyond what the noise explains (weights rescaled back)
        q = (weights * (rho - rho_bar) ** 2).sum() / float(se2.min())
        denom = (weights.sum() - (weights ** 2).sum() / weights.sum()) / float(se2.min())
        tau2 = (q - (len(rho) - 1)) / denom if denom > 0 else torch.tensor(0.0, dtype=torch.float64)
        if tau2 <= 0:
            return rho_bar.clamp_min(0).expand_as(rho).clone()
        return (rho_bar + tau2 / (tau2 + se2) * (rho - rho_bar)).clamp_min(0)

    def _gain_terms(self):
        """(G2 with the rest group last, alpha, d, n) of ``_best_for_step``'s gain."""
        G2 = torch.cat([self._pooled(self.share_bar[:-1]), self.share_bar[-1:]])
        G2 = G2.clamp_min(1e-3 * float(G2.max()))  # noise can make one negative
        alpha = self._coherence(G2[:-1]) * G2[:-1]
        return G2, alpha, self.group_sizes.clamp_min(1), float(self.noise_var * self.saturation) ** 0.5

    def step_gain_grad(self):
        """d gain / d log x, in closed form on numpy arrays. With r_g the signal-to-noise ratio of
        ``step_gain``, dr_g / dlog x_k = r_g (delta_gk - x_k^2 G_k^2 / N^2), so with
        c_g = sqrt(alpha_g d_g) phi'(r_g) r_g the gradient is c_k - x_k^2 G_k^2 / N^2 sum_g c_g."""
        G2, alpha, d, n = (t.numpy() if torch.is_tensor(t) else t for t in self._gain_terms())
        G2, G2_rest, root = G2[:-1], G2[-1], np.sqrt(alpha * d)

        def grad(log_x: np.ndarray) -> np.ndarray:
            x2 = np.exp(2 * log_x)
            N2 = (x2 * G2).sum() + G2_rest
            u = x2 * alpha / (d * N2)
            s = np.sqrt(u + 1e-300)
            r = s / n
            q = 1 + r * r
            dphi = 1 / (q * np.sqrt(q)) if self.adaptive else 1.0  # q^-1.5 (pow: most of the loop's time)
            c = root * dphi * (u / (n * s))  # = root phi'(r) r, exact at u = 0
            return c - x2 * G2 / N2 * c.sum()

        return grad

    def step_gain(self):
        """gain(log x) of ``_best_for_step``, from the statistics as they stand."""
        G2, alpha, d, n = self._gain_terms()

        def gain(log_x: torch.Tensor) -> torch.Tensor:
            x2 = torch.exp(2 * log_x)
            N2 = (x2 * G2[:-1]).sum() + G2[-1]
            r = torch.sqrt(x2 * alpha / (d * N2) + 1e-300) / n
            phi = r / torch.sqrt(1 + r * r) if self.adaptive else r
            return (torch.sqrt(alpha * d) * phi).sum()

        return gain


_BY_MODE = {cls.mode: cls for cls in (UniformAllocation, PaperAllocation, ClipAllocation, AnadpAllocation)}

"""Clipping: what bounds one sample's influence on a step, one class per mode behind one interface.

``FlatClipping`` (``clipping="whitened"``, the default, and the paper's ``"global"``): sample i's
whole gradient, each group g divided by its noise scale w_g (whitened), is clipped to C; its noise
has std sigma * w_g * C in group g. Changing one sample moves the whitened clipped sum by at most C:
one Gaussian mechanism of multiplier sigma whatever w is (w depends only on earlier releases).
"global" clips the unwhitened gradient instead: only as private as its least noisy group, it is
charged sigma * min_g w_g (the paper's mechanism).

``PerLayerClipping`` (``clipping="per_layer"``): group g (a weight matrix with its biases, or the
rest group) of sample i is clipped to C_g and gets noise of std s_g = sigma * w_g * K per
coordinate, K^2 = sum_h (C_h / w_h)^2, w the allocation's scales. Changing one example moves the
clipped sum by at most C_g in group g, so in coordinates scaled by 1 / s_g its move is at most
sqrt(sum_g C_g^2 / s_g^2) = 1 / sigma: one Gaussian mechanism of multiplier sigma, whatever C and w
are (as long as they depend only on earlier released outputs). At w = 1, s_g = sigma * sqrt(sum_h
C_h^2): Opacus's per-layer clipping. Equivalently, per-layer clipping of the whitened gradient
g_g / w_g to C_g / w_g with noise sigma * K: what the allocation sees.

Adaptive thresholds (Andrew et al. 2021, per group): each step also releases the
centred counts sum_i (1[||g_ig|| <= C_g] - 1/2) of every group, plus Gaussian noise
of std z_b * sqrt(G) / 2 (the count vector of one sample has norm sqrt(G) / 2), and
moves C_g <- C_g exp(-eta (b_g - gamma)), b_g the noisy unclipped fraction over the
expected batch. The gradient then gets sigma_g with sigma_g^-2 + z_b^-2 = sigma^-2:
the step is charged sigma. With ``fixed_total`` (the default) the moved thresholds are rescaled to keep
sqrt(sum_g C_g^2) = C: only their shares adapt (gamma drops out, every group ends up
clipping the same fraction of its samples) and the noise stays that of flat clipping at C.

The interface both implement (DPOptimizer reads nothing else of the clipping):
``factors(norms, group)`` the clip factors (of each sample's whole norm, or of several groups' norms), ``total`` C, ``noise_total(scales)`` K (group g's noise
std per coordinate is the gradient's multiplier * w_g * K), ``noise_multipliers(sigma)`` (the
gradient's multiplier, that of the clipping's own release), ``released`` (how many values that
release holds), ``release`` it, ``public_shares`` (what the allocation reads in place of a share
release, where the clipping fixes it), ``charged(sigma, scales)`` (what the accountant is charged),
``whitens``, ``exact_budget``, the settings a checkpoint must agree on and its state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class FlatClipping:
    """One threshold C for each sample's whole gradient: whitened (each group divided by its noise
    scale first; the default) or global (the paper's mechanism)."""

    released = 0  # no release of its own

    def __init__(self, max_grad_norm: float, whitened: bool = True):
        self.total, self.whitens = float(max_grad_norm), whitened
        self.exact_budget = whitened  # global: charged sigma * min w, past the budget by design (warned)

    def factors(self, norms: torch.Tensor, group: list | None = None) -> torch.Tensor:
        """Clip factors min(1, C / ||g_i||) from the samples' (whitened) norms."""
        return (self.total / (norms + 1e-6)).clamp(max=1.0)

    def noise_total(self, scales: torch.Tensor) -> float:
        return self.total

    def noise_multipliers(self, sigma: float) -> tuple[float, float]:
        return sigma, 0.0

    def charged(self, sigma: float, scales: torch.Tensor) -> float:
        """The multiplier the accountant is charged per step: sigma whitened; global clipping is only
        as private as its least noisy group."""
        return sigma if self.whitens else sigma * float(scales.min())

    def public_shares(self, scales: torch.Tensor, samples: float) -> None:
        """None: the allocation's share release says how the clipped energy splits."""
        return None

    def release(self, noise: torch.Tensor | None, z: float, expected_batch: float) -> None:
        pass

    def reset_counts(self) -> None:
        pass

    def privacy_settings(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class AdaptiveClipping:
    """Per-group thresholds moved by noisy counts of the samples under them (Andrew et al. 2021, per
    group). ``fixed_total`` (default): only their shares of the total C move, until every group clips
    the same fraction of its samples; the noise stays sigma * C, as under flat clipping. False: each
    C_g follows the ``target_quantile`` of its group's norms and the total floats (Andrew et al.'s
    rule; what each costs in accuracy: the README's per-layer clipping)."""
    target_quantile: float = 0.5  # gamma: the fraction of samples each group leaves unclipped (fixed_total=False)
    learning_rate: float = 0.2    # eta of the geometric update
    count_noise: float = 10.0     # z_b in units of sigma: the counts take 1 / count_noise^2 of the budget
    min_threshold: float = 1e-6   # C_g never falls below this (a group with zero gradients)
    fixed_total: bool = True      # rescale the moved thresholds to keep sqrt(sum_g C_g^2) = C

    def __post_init__(self):
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.count_noise > 1:
            raise ValueError(f"count_noise must be > 1 (the counts take 1/count_noise^2 of the budget), "
                             f"got {self.count_noise}")
        if not self.min_threshold > 0:
            raise ValueError(f"min_threshold must be > 0, got {self.min_threshold}")


REST = "<rest>"  # the name of the rest group in a thresholds dict


def initial_thresholds(max_grad_norm, group_names: list[str], has_rest: bool) -> torch.Tensor:
    """C_g per group, the rest group last (0 where it is empty), from a float C (equal thresholds
    C / sqrt(G)), a list (one per group in noise-group order, the rest group last where it has
    tensors) or a dict {group name or "<rest>": C_g}."""
    names = list(group_names) + ([REST] if has_rest else [])
    G = len(names)
    if isinstance(max_grad_norm, dict):
        unknown = sorted(set(max_grad_norm) - set(names))
        missing = [n for n in names if n not in max_grad_norm]
        if unknown or missing:
            raise ValueError(f"per-layer max_grad_norm: {'unknown groups ' + str(unknown[:3]) if unknown else ''}"
                             f"{'; ' if unknown and missing else ''}"
                             f"{'no threshold for ' + str(missing[:3]) if missing else ''}; the groups are "
                             f"{names[:4]}{' ...' if G > 4 else ''} (optimizer.group_names, and '{REST}' for the "
                             "norm weights and lone biases)")
        values = [float(max_grad_norm[n]) for n in names]
    elif isinstance(max_grad_norm, (list, tuple)):
        if len(max_grad_norm) != G:
            raise ValueError(f"per-layer max_grad_norm: {len(max_grad_norm)} thresholds for {G} noise groups "
                             f"({len(group_names)} matrices{' and the rest group' if has_rest else ''}); give "
                             "one per group in optimizer.group_names order, or a dict by group name")
        values = [float(v) for v in max_grad_norm]
    else:
        C = float(max_grad_norm)
        values = [C / math.sqrt(G)] * G if G else []
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"per-layer thresholds must be finite and > 0, got {values[:5]}")
    if not has_rest:
        values.append(0.0)
    return torch.tensor(values, dtype=torch.float64)


class PerLayerClipping:
    """The thresholds of every group (rest last), the clip factors of a group's samples, and,
    with adaptive thresholds, the counts each step releases."""

    whitens = exact_budget = True

    def __init__(self, max_grad_norm, group_names: list[str], has_rest: bool,
                 adaptive: AdaptiveClipping | None = None):
        # C_g per group column, the rest group last (0 where it is empty)
        self.thresholds = initial_thresholds(max_grad_norm, group_names, has_rest)
        self.has_rest, self.adaptive = has_rest, adaptive
        self.n_groups = len(self.thresholds)  # matrices + the rest column
        self.active = self.n_groups - (0 if has_rest else 1)  # groups with tensors: G
        self.released = 0 if adaptive is None else self.n_groups  # one count per group column
        self.counts = torch.zeros(self.n_groups, dtype=torch.float64)  # centred unclipped counts of the step
        self.last_released_counts: torch.Tensor | None = None
        self.initial_total = self.total  # what fixed_total holds

    @property
    def total(self) -> float:
        """C = sqrt(sum_g C_g^2), the per-sample sensitivity of the whole clipped gradient."""
        return float(self.thresholds.square().sum().sqrt())

    def noise_total(self, scales: torch.Tensor) -> float:
        """K = sqrt(sum_g (C_g / w_g)^2) for per-group scales w (rest last): s_g = sigma * w_g * K."""
        return float((self.thresholds / scales).square().sum().sqrt())

    def noise_multipliers(self, sigma: float) -> tuple[float, float]:
        """(gradient noise multiplier, count noise multiplier z_b) that together cost sigma."""
        if self.adaptive is None or sigma == 0:
            return sigma, 0.0
        k = self.adaptive.count_noise
        return sigma / (1 - 1 / k ** 2) ** 0.5, k * sigma

    def charged(self, sigma: float, scales: torch.Tensor) -> float:
        return sigma

    def public_shares(self, scales: torch.Tensor, samples: float) -> torch.Tensor:
        """What the allocation reads instead of a share release: each group's clipped whitened energy
        per sample bounded by its threshold, (C_g / w_g)^2 / K^2 (the thresholds are public)."""
        t = self.thresholds / scales
        return samples * t.square() / t.square().sum()

    def factors(self, norms: torch.Tensor, group: list) -> torch.Tensor:
        """Clip factors min(1, C_g / ||g_ig||) of the samples of groups ``group`` from their norms
        (len(group), B); counts the samples under each threshold where the thresholds adapt."""
        C = self.thresholds[group].to(device=norms.device, dtype=norms.dtype)[:, None]
        if self.adaptive is not None:
            under = (norms <= C).sum(1).double().cpu()
            self.counts[group] += under - 0.5 * norms.shape[1]
        return (C / (norms + 1e-6)).clamp(max=1.0)

    def release(self, noise: torch.Tensor | None, z_b: float, expected_batch: float) -> None:
        """The step's counts plus noise (``noise``: standard normals, one per group column), then the
        thresholds of the next step. No-op with fixed thresholds."""
        if self.adaptive is None:
            return
        a = self.adaptive
        counts = self.counts.clone()
        if noise is not None and z_b > 0:
            counts += z_b * math.sqrt(self.active) / 2 * noise.double()
        self.last_released_counts = counts
        unclipped = counts / expected_batch + 0.5
        moved = (self.thresholds * torch.exp(-a.learning_rate * (unclipped - a.target_quantile))).clamp_min(
            a.min_threshold)
        if a.fixed_total:
            moved = moved * (self.initial_total / float(moved[self.thresholds > 0].square().sum().sqrt()))
        self.thresholds = torch.where(self.thresholds > 0, moved, self.thresholds)  # an empty rest column stays 0
        self.counts.zero_()

    def reset_counts(self) -> None:
        self.counts.zero_()

    def privacy_settings(self) -> dict:
        """What a checkpoint must agree on: the thresholds (fixed) or how they adapt."""
        a = self.adaptive
        return {"per_layer_thresholds": self.thresholds.tolist() if a is None else "adaptive",
                "adaptive_clipping": None if a is None else vars(a).copy()}

    def state_dict(self) -> dict:
        return {"thresholds": self.thresholds.clone()}

    def load_state_dict(self, state: dict) -> None:
        t = state["thresholds"]
        if t.shape != self.thresholds.shape:
            raise ValueError(f"the checkpoint holds {t.numel()} per-layer thresholds, this model has "
                             f"{self.thresholds.numel()} groups")
        self.thresholds = t.clone().double()

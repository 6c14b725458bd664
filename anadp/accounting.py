"""Privacy accounting through Opacus's accountants (never re-implemented here).

Each optimizer step is one Poisson-subsampled Gaussian mechanism (q, z), z
the noise multiplier the step is charged: sigma under whitened clipping
(whatever the allocation), sigma * min_g w_g under the paper's global clipping.

Opacus is imported where an epsilon or a noise multiplier is computed, not at
``import anadp``: a step needs no accountant library (a bare GPU machine runs the
kernels and the step without it), the privacy figures do.
"""
from __future__ import annotations

import functools
import math
import warnings

ACCOUNTANTS = ("prv", "rdp")


def _opacus():
    """(accountant classes by name, get_noise_multiplier) from Opacus, with the fix where it is missing."""
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError as e:
        raise ImportError(f"epsilon and the noise multiplier are computed by Opacus's accountants, which cannot be "
                          f"imported here ({e}): `pip install opacus` (it needs opt_einsum too)") from e
    return {"rdp": RDPAccountant, "prv": PRVAccountant}, get_noise_multiplier


class BudgetExhaustedError(RuntimeError):
    """A step past the number of steps the noise multiplier was calibrated for."""


def calibrated_steps(epochs: float, sample_rate: float) -> int:
    """The steps a budget of ``epochs`` passes at ``sample_rate`` means: epochs / sample_rate, rounded
    where it is a whole number up to float rounding (Opacus's int() turns 4.9999999 into 4)."""
    steps = epochs / sample_rate
    return int(round(steps)) if abs(steps - round(steps)) <= 1e-9 * max(1.0, steps) else int(steps)


def _check(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {name!r}")


class Accountant:
    """History of (noise multiplier, sample rate, steps) and epsilon from Opacus."""

    def __init__(self, name: str = "prv"):
        _check(name)
        self.name = name
        self.history: list[tuple[float, float, int]] = []

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def get_epsilon(self, delta: float) -> float:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self.history:
            return 0.0
        if any(z <= 0 and q > 0 for z, q, _ in self.history):
            return math.inf  # a step without noise has no finite guarantee
        acc = _opacus()[0][self.name]()
        acc.history = list(self.history)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(acc.get_epsilon(delta=delta))

    def state_dict(self) -> dict:
        return {"name": self.name, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        _check(state["name"])
        self.name, self.history = state["name"], [tuple(h) for h in state["history"]]


def noise_multiplier_for(target_epsilon: float, target_delta: float, sample_rate: float, *,
                         epochs: float | None = None, steps: int | None = None, accountant: str = "prv") -> float:
    """The noise multiplier that Opacus's get_noise_multiplier finds for this budget
    (remembered: the search takes seconds, and studies ask for the same budget many times)."""
    return _noise_multiplier_for(float(target_epsilon), float(target_delta), float(sample_rate),
                                 None if epochs is None else float(epochs), steps, accountant)


@functools.lru_cache(maxsize=256)
def _noise_multiplier_for(target_epsilon: float, target_delta: float, sample_rate: float, epochs: float | None,
                          steps: int | None, accountant: str) -> float:
    _check(accountant)
    if target_epsilon <= 0 or not 0 < target_delta < 1:
        raise ValueError(f"need target_epsilon > 0 and 0 < target_delta < 1, got {target_epsilon}, {target_delta}")
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps to calibrate the noise to target_epsilon")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(_opacus()[1](target_epsilon=target_epsilon, target_delta=target_delta,
                                              sample_rate=sample_rate, epochs=epochs, steps=steps,
                                              accountant=accountant))
    except ValueError as e:
        raise ValueError(f"target epsilon {target_epsilon} at delta {target_delta} cannot be reached with sample "
                         f"rate {sample_rate:.4g} over {epochs if steps is None else steps} "
                         f"{'epochs' if steps is None else 'steps'}: {e}") from e


class PrivacyLedger:
    """What a run has spent and may spend: the accountant's history, and the budget the noise was
    calibrated for (``budget_steps`` steps at ``target_epsilon``; None: noise_multiplier given, no
    budget to keep). The optimizer charges it once per step and asks it before each step."""

    def __init__(self, accountant: str, noise_multiplier: float, sample_rate: float,
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 budget_steps: int | None = None):
        self.accountant = Accountant(accountant)
        self.noise_multiplier, self.sample_rate = noise_multiplier, sample_rate
        self.target_epsilon, self.target_delta, self.budget_steps = target_epsilon, target_delta, budget_steps

    def extended(self, noise_multiplier: float, steps: int) -> Accountant:
        """A copy of the accountant with ``steps`` more steps at ``noise_multiplier`` (none if steps <= 0)."""
        acc = Accountant(self.accountant.name)
        acc.history = list(self.accountant.history)
        if steps > 0:
            acc.history.append((noise_multiplier, self.sample_rate, steps))
        return acc

    @property
    def steps_left(self) -> int | None:
        return None if self.budget_steps is None else max(0, self.budget_steps - self.accountant.steps)

    def spent(self, delta: float) -> float:
        return self.accountant.get_epsilon(delta)

    def projected(self, delta: float, total_steps: int) -> float:
        """Epsilon after ``total_steps`` steps in all, the rest at the current noise multiplier."""
        return self.extended(self.noise_multiplier, total_steps - self.accountant.steps).get_epsilon(delta)

    def check(self, k: int, exact_budget: bool) -> None:
        """No step past the steps the noise was calibrated for, nor past target_epsilon: k > 1 Poisson
        batches under one draw are charged k releases at sigma / sqrt(k), more than k steps at sigma.
        ``exact_budget`` False: a mechanism that overspends by design (global clipping, warned)."""
        if self.budget_steps is None:
            return
        steps = self.accountant.steps + k
        spent = None
        if steps <= self.budget_steps:
            if k == 1 or not exact_budget:
                return
            spent = self.extended(self.noise_multiplier / math.sqrt(k), k).get_epsilon(self.target_delta)
            if spent <= self.target_epsilon * (1 + 1e-3):
                return
        if spent is None:
            spent = self.projected(self.target_delta, steps)
        raise BudgetExhaustedError(
            f"this step would be step {steps} of a run whose noise multiplier {self.noise_multiplier:.4g} was "
            f"calibrated for {self.budget_steps} steps (target epsilon {self.target_epsilon:g} at delta "
            f"{self.target_delta:g}): it would spend epsilon {spent:.3f}. Stop training here "
            "(optimizer.steps_left says how many are left), or call make_private again with the longer budget.")

    def charge(self, charged: float, k: int) -> None:
        """One accountant entry per logical batch. k > 1 full Poisson batches summed under one noise
        draw are k releases with noise charged/sqrt(k) each (post-processing of them)."""
        for _ in range(k):
            self.accountant.step(charged / math.sqrt(k), self.sample_rate)

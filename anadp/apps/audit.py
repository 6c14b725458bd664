"""Privacy auditing with one training run (Steinke, Nasr, Jagielski 2023).

m canaries, each put in the training set independently with probability 1/2;
train once; score every canary; guess "in" for the k highest scores and "out"
for the k lowest. If training is (eps, delta)-DP, the number of correct guesses
is stochastically dominated as in the paper's Theorem (randomized-response
accuracy e^eps / (1 + e^eps), plus a delta term), so observing v correct out of
r guesses rules out every eps whose p-value is below 1 - confidence: the
largest such eps is an empirical *lower bound* on the true epsilon.

The canaries here are white-box "Dirac" canaries: a linear model gets one
extra input coordinate per canary, used by no real example; canary c's loss is
``-scale * w . e_c``, so its gradient is a fixed direction of norm ``scale`` and
its score is how far w moved along e_c. A correct implementation keeps the
bound below the accountant's epsilon; a bug that skips clipping or noise makes
the canaries stand out and the bound exceeds it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..allocation import AllocationConfig
from ..api import make_private


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v correct of r guesses] under (eps, delta)-DP, m canaries (the paper's bound)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1 / (1 + math.exp(-eps))  # accuracy of eps-DP randomized response
    p = stats.binom.sf(v - 1, r, q)
    if delta > 0 and v > 0:
        # max over i >= 1 of P[v - i <= Bin(r, q) < v] / i, times 2 m delta
        below = np.cumsum(stats.binom.pmf(v - np.arange(1, v + 1), r, q))
        p += 2 * m * delta * float(np.max(below / np.arange(1, v + 1)))
    return min(float(p), 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest eps that v correct guesses of r rule out at this confidence (0 if none)."""
    beta = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return math.inf
    for _ in range(60):  # p_value increases with eps: bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return lo


@dataclass
class AuditResult:
    epsilon_lower_bound: float  # empirical, at `confidence`
    epsilon_accountant: float   # what the library reports for this run
    delta: float
    confidence: float
    canaries: int
    guesses: int
    correct: int
    noise_multiplier: float

    def table(self) -> str:
        return ("| canaries | guesses | correct | eps lower bound | eps accountant | delta | confidence |\n"
                "|---|---|---|---|---|---|---|\n"
                f"| {self.canaries} | {self.guesses} | {self.correct} | {self.epsilon_lower_bound:.3f} | "
                f"{self.epsilon_accountant:.3f} | {self.delta:g} | {self.confidence:g} |")


def run_audit(*, target_epsilon: float | None = 2.0, noise_multiplier: float | None = None, delta: float = 1e-5,
              canaries: int = 1000, real: int = 1000, features: int = 8, batch_size: int = 200, epochs: int = 10,
              lr: float = 0.5, max_grad_norm: float = 1.0, canary_scale: float = 1.0, guesses: int | None = None,
              confidence: float = 0.95, allocation: str = "anadp", clipping: str = "whitened",
              seed: int = 0) -> AuditResult:
    """Train a linear model with canaries through make_private and audit it."""
    g = torch.Generator().manual_seed(seed)
    m, d = canaries, features
    included = torch.rand(m, generator=g) < 0.5
    x_real = torch.cat([torch.randn(real, d, generator=g), torch.zeros(real, m)], 1)
    y_real = x_real[:, :d] @ torch.randn(d, generator=g)
    idx = included.nonzero().flatten()
    x_can = torch.zeros(len(idx), d + m)
    x_can[torch.arange(len(idx)), d + idx] = 1.0
    data = TensorDataset(torch.cat([x_real, x_can]), torch.cat([y_real, torch.zeros(len(idx))]),
                         torch.cat([torch.zeros(real, dtype=torch.bool), torch.ones(len(idx), dtype=torch.bool)]))
    torch.manual_seed(seed)
    model = nn.Linear(d + m, 1)
    w0 = model.weight.detach()[0, d:].clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(data, batch_size=batch_size)
    kw = dict(noise_multiplier=noise_multiplier) if noise_multiplier is not None else dict(
        target_epsilon=target_epsilon, target_delta=delta, epochs=epochs)
    model, optimizer, loader = make_private(model, optimizer, loader, max_grad_norm=max_grad_norm,
                                            allocation=allocation, clipping=clipping, seed=seed,
                                            allocation_config=AllocationConfig(warmup_steps=2), **kw)
    for _ in range(epochs):
        for x, y, is_canary in loader:
            optimizer.zero_grad()
            if len(x):
                pred = model(x)[:, 0]
                loss = torch.where(is_canary, -canary_scale * pred, (pred - y) ** 2)
                loss.mean().backward()
            optimizer.step()
    scores = (model.weight.detach()[0, d:] - w0).numpy()
    k = guesses if guesses is not None else m // 4
    order = np.argsort(-scores, kind="stable")
    guess_in, guess_out = order[:k], order[m - k:]
    inc = included.numpy()
    correct = int(inc[guess_in].sum() + (~inc[guess_out]).sum())
    return AuditResult(epsilon_lower_bound(m, 2 * k, correct, delta, confidence), optimizer.privacy_spent(delta),
                       delta, confidence, m, 2 * k, correct, optimizer.noise_multiplier)

"""One-run privacy audit: the bound itself, a sound run, and planted bugs it must catch."""
import math

import pytest
import torch

from anadp.apps.audit import epsilon_lower_bound, p_value, run_audit


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_perfect_guessing_closed_form(r):
    """delta = 0, v = r: P[Bin(r, q) >= r] = q^r = beta, so eps = log(q / (1 - q)), q = beta^(1/r)."""
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), rel=1e-9)
    assert epsilon_lower_bound(r, r, r, 1e-5, 0.95) < math.log(q / (1 - q))  # delta only loosens it


def test_p_value_behaves():
    assert p_value(100, 50, 25, 0.0, 0.0) > 0.5  # chance-level guessing is not evidence
    assert p_value(100, 50, 45, 1.0, 0.0) < p_value(100, 50, 45, 2.0, 0.0)
    assert epsilon_lower_bound(1000, 500, 250, 1e-5) == 0.0
    with pytest.raises(ValueError):
        p_value(10, 20, 5, 1.0, 0.0)


@pytest.mark.parametrize("target", [2.0, 8.0])
def test_sound_training_stays_below_the_accountant(target):
    res = run_audit(target_epsilon=target, seed=0)
    assert res.epsilon_accountant <= target + 1e-9
    assert res.epsilon_lower_bound < res.epsilon_accountant


def test_no_noise_is_caught():
    """sigma = 0: the included canaries separate perfectly; 500 correct guesses of 500 rule
    out every eps below 5.09 at 95% confidence (the closed form above, with delta=1e-5)."""
    with pytest.warns(UserWarning, match="no privacy"):
        res = run_audit(noise_multiplier=0.0, seed=0)
    assert res.correct == res.guesses == 500
    assert res.epsilon_lower_bound > 5.0


def test_planted_bug_skipping_noise_is_caught(monkeypatch):
    """The accountant is charged sigma but no noise is drawn: the audit exceeds the claim."""
    from anadp.backends import get
    for name in ("torch", "cpu"):  # whichever draws the noise on this machine: one tensor or many at a time, or
        # inside the fused update
        cls = type(get(name))
        monkeypatch.setattr(cls, "add_noise_", lambda self, out, key, std: None)
        monkeypatch.setattr(cls, "add_noise_multi_", lambda self, outs, keys, stds: None)
        if cls.fused_update:
            fused = cls.multi_tensor_update
            monkeypatch.setattr(cls, "multi_tensor_update", lambda self, *a, **kw: fused(self, *a, **{**kw, "has_noise": False}))
    res = run_audit(target_epsilon=2.0, seed=0)
    assert res.epsilon_accountant <= 2.0
    assert res.epsilon_lower_bound > 2 * res.epsilon_accountant


def test_audit_cli(capsys):
    from anadp.cli import main
    assert main(["audit", "--canaries", "200", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "| 200 | 100 |" in out and "is consistent with the reported epsilon" in out


def test_the_audit_is_reproducible_at_a_fixed_seed():
    """The README quotes what `python -m anadp audit` prints: the same seed gives the same run."""
    a, b = run_audit(target_epsilon=2.0, canaries=200, epochs=3, seed=1), run_audit(target_epsilon=2.0, canaries=200,
                                                                                      epochs=3, seed=1)
    assert (a.correct, a.guesses, a.epsilon_lower_bound) == (b.correct, b.guesses, b.epsilon_lower_bound)

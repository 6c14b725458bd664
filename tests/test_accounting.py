"""Accounting goes through Opacus's accountants; vectors from Opacus's own tests."""
import warnings

import pytest
from opacus.accountants.utils import get_noise_multiplier

import anadp
from anadp.accounting import Accountant, noise_multiplier_for
from models import make_setup


def test_rdp_vector():
    a = Accountant("rdp")
    for _ in range(2250):  # int(90 / 0.04)
        a.step(1.5, 0.04)
    assert a.history == [(1.5, 0.04, 2250)]
    assert a.get_epsilon(1e-5) == pytest.approx(7.32911117143, abs=1e-6)


def test_prv_vector():
    # Opacus's accountants_test uses int(90 // 0.04) = 2249 steps for PRV (float floor
    # division), which gives 6.7774; 2250 steps give 6.7791 (both with eps_error=0.01)
    a = Accountant("prv")
    a.history = [(1.5, 0.04, 2249)]
    assert a.get_epsilon(1e-5) == pytest.approx(6.777395712150674, abs=1e-6)
    a.history = [(1.5, 0.04, 2250)]
    assert a.get_epsilon(1e-5) == pytest.approx(6.7791, abs=1e-3)


@pytest.mark.parametrize("acc", ["rdp", "prv"])
def test_target_epsilon_matches_opacus(acc):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25, epochs=2,
                                   accountant=acc)
    assert noise_multiplier_for(3.0, 1e-5, 0.25, epochs=2, accountant=acc) == ref
    m, o, l = make_setup("sgd")  # 64 samples, batch 16: q = 0.25
    m, o, l = anadp.make_private(m, o, l, target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0,
                                 accountant=acc, seed=0)
    assert o.noise_multiplier == ref
    for _ in range(2):
        for x, y in l:
            o.zero_grad()
            if len(x):
                m(x).sum().backward()
            o.step()
    eps = o.privacy_spent(1e-5)
    assert 2.9 < eps <= 3.0 + 0.01  # Opacus's calibration tolerance


def test_unreachable_target_is_clear():
    with pytest.raises(ValueError, match="cannot be reached"):
        noise_multiplier_for(1e-3, 1e-5, 1.0, steps=100000, accountant="rdp")


def test_zero_noise_is_infinite_epsilon():
    a = Accountant("prv")
    a.step(0.0, 0.1)
    assert a.get_epsilon(1e-5) == float("inf")


def test_bad_arguments():
    with pytest.raises(ValueError, match="accountant"):
        Accountant("gdp2")
    with pytest.raises(ValueError, match="delta"):
        Accountant("rdp").get_epsilon(0)
    with pytest.raises(ValueError, match="exactly one"):
        noise_multiplier_for(1.0, 1e-5, 0.1)

"""bench/op_profile.py at smoke size: each method's ops and its time outside them add up to its wall time."""
import math

import pytest


def test_op_profile_rows():
    from bench.op_profile import METHODS, OUTSIDE, profile_steps, table
    from bench.suite import model_configs
    result = profile_steps(model_configs(True)[0], rounds=1)
    assert list(result) == METHODS
    for r in result.values():
        assert r["wall"] > 0 and r["ops"][OUTSIDE] >= 0
        assert all(math.isfinite(t) and t >= 0 for t in r["ops"].values())
        # one round: the ops' self times and what is outside them are the wall time (when it exceeds them)
        assert sum(r["ops"].values()) == pytest.approx(max(r["wall"], sum(t for k, t in r["ops"].items()
                                                                           if k != OUTSIDE)))
    # the DP steps run products the non-private one does not (per-sample norms): the profiler sees them
    assert result["anadp"]["ops"].get("bmm", 0) > 0 and result["nonprivate"]["ops"].get("bmm", 0) == 0
    text = table(result)
    assert all(f"**{m}**" in text for m in METHODS[1:]) and "**nonprivate**" not in text

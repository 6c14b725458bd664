"""ANADP importance and allocation on hand-made gradients."""
import pytest
import torch
import torch.nn.functional as F

import anadp
from anadp.allocation import AllocationConfig, NoiseAllocator, normalize_scales
from models import make_setup


def _params(*vals):
    return [torch.full((n,), v) for n, v in vals]


def test_important_group_gets_less_noise():
    # wide bounds so that no scale sits at a bound and the order is visible
    a = NoiseAllocator([4, 4, 4], config=AllocationConfig(warmup_steps=0, w_min=0.01, w_max=100))
    params = _params((4, 1.0), (4, 1.0), (4, 1.0))
    g = torch.Generator().manual_seed(0)
    for t in range(8):  # group 0: large |p*g| that moves (uncertainty); group 2 small
        grads = [torch.full((4,), 5.0 + torch.rand(1, generator=g).item() * 5),
                 torch.full((4,), 1.0 + torch.rand(1, generator=g).item()),
                 torch.full((4,), 0.1 + torch.rand(1, generator=g).item() * 0.1)]
        a.update(params, grads)
    w = a.scales
    assert w[0] < w[1] < w[2]


def test_normalization_is_exact_and_bounded():
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 1000, (50,), generator=g)
    u = torch.exp(torch.randn(50, generator=g, dtype=torch.float64) * 3)  # wide spread: bounds bind
    w = normalize_scales(u, sizes, 0.3, 3.0)
    d = sizes.double()
    assert abs(float((d * w ** 2).sum() / d.sum()) - 1) < 1e-12
    assert float(w.min()) >= 0.3 and float(w.max()) <= 3.0
    assert (w == 0.3).any() and (w == 3.0).any()  # both bounds were active
    order = torch.argsort(u)  # monotone in u
    assert (w[order].diff() >= 0).all()


def test_warmup_keeps_uniform():
    a = NoiseAllocator([3, 3], config=AllocationConfig(warmup_steps=4))
    params = _params((3, 1.0), (3, 1.0))
    for t in range(3):
        a.update(params, [torch.full((3,), 10.0 * (t + 1)), torch.full((3,), 0.1)])
        assert torch.equal(a.scales, torch.ones(2, dtype=torch.float64)), t
    a.update(params, [torch.full((3,), 40.0), torch.full((3,), 0.1)])
    assert not torch.equal(a.scales, torch.ones(2, dtype=torch.float64))


def test_uniform_mode_never_moves():
    a = NoiseAllocator([3, 3], mode="uniform", config=AllocationConfig(warmup_steps=0))
    for _ in range(5):
        a.update(_params((3, 1.0), (3, 1.0)), [torch.full((3,), 9.0), torch.full((3,), 0.1)])
    assert torch.equal(a.scales, torch.ones(2, dtype=torch.float64))


def test_bad_config():
    with pytest.raises(ValueError, match="w_min"):
        AllocationConfig(w_min=1.5)
    with pytest.raises(ValueError, match="allocation"):
        NoiseAllocator([1], mode="adaptive")


def test_allocation_reads_only_privatized_gradients():
    """Tamper with the raw per-sample records and the clipped sums after privatization:
    the noise scales do not change."""
    results = []
    for tamper in (False, True):
        m, o, l = make_setup("sgd")
        m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=0.5, seed=4,
                                     allocation_config=AllocationConfig(warmup_steps=0))
        for x, y in l:
            o.zero_grad()
            batch = None
            if len(x):
                F.cross_entropy(m(x), y).backward()
                batch = o.engine.take()  # the raw per-sample material of this batch
                o._accumulate(batch)
            grads = o.privatize()
            if tamper and batch is not None:
                for recs in batch.records.values():
                    for r in recs:
                        for attr in ("A", "G", "gs"):
                            if hasattr(r, attr):
                                setattr(r, attr, getattr(r, attr) * 1000)
                o._summed = [None if s is None else s * 1000 for s in o._summed]
            o.apply(grads)
        results.append(o.allocator.scales.clone())
    assert not torch.equal(results[0], torch.ones_like(results[0]))
    assert torch.equal(results[0], results[1])

"""DP optimizer: equality with Opacus, noise statistics, whitened clipping bound,
accumulation, checkpoints."""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import anadp
from helpers import per_sample_grads, rel_err
from models import make_setup


def train(model, optimizer, loader, steps):
    it = iter(loader)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_uniform_matches_opacus(opt):
    from opacus import PrivacyEngine
    m1, o1, l1 = make_setup(opt)
    m2, o2, l2 = make_setup(opt)
    assert torch.equal(flat(m1), flat(m2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m1, o1, l1 = PrivacyEngine().make_private(module=m1, optimizer=o1, data_loader=l1, noise_multiplier=0.0,
                                                  max_grad_norm=0.5, poisson_sampling=False,
                                                  grad_sample_mode="hooks")
        m2, o2, l2 = anadp.make_private(m2, o2, l2, noise_multiplier=0.0, max_grad_norm=0.5,
                                        allocation="uniform", poisson_sampling=False, seed=0)
    start = flat(m2).clone()
    train(m1, o1, l1, 5)
    train(m2, o2, l2, 5)
    assert rel_err(flat(m2), flat(m1._module)) < 1e-5
    assert rel_err(flat(m2) - start, flat(m1._module) - start) < 1e-4  # the updates themselves agree
    assert (flat(m2) - start).abs().max() > 1e-3  # and training moved the parameters


def _plant_scales(o, seed: int, lo: float = 0.3, span: float = 2.0) -> torch.Tensor:
    """Random group scales; returns the per-tensor scales they give."""
    g = torch.Generator().manual_seed(seed)
    o.allocator.group_scales = torch.rand(o.allocator.n_groups, generator=g, dtype=torch.float64) * span + lo
    return o.allocator.scales


def test_noise_std_per_group():
    """The paper's allocation (no share release, the raw noisy gradient to the optimizer):
    noisy - clean privatized gradients = sigma*C*w_g*z/B; per tensor the sample std
    of n = numel draws has standard error ~ std/sqrt(2n): |s - std| < 3 std/sqrt(2n)."""
    sigma, C = 1.3, 0.7
    outs = []
    for s in (0.0, sigma):
        m, o, l = make_setup("sgd")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m, o, l = anadp.make_private(m, o, l, noise_multiplier=s, max_grad_norm=C, poisson_sampling=False, seed=3,
                                         allocation="paper")
        w = _plant_scales(o, 1)
        x, y = next(iter(l))
        F.cross_entropy(m(x), y).backward()
        outs.append(o.privatize())
    B = o.expected_batch_size
    for i, (clean, noisy) in enumerate(zip(*outs)):
        noise = (noisy - clean).flatten()
        expect = sigma * C * float(w[i]) / B
        n = noise.numel()
        s = float(noise.std(unbiased=True))
        assert abs(s - expect) < 3 * expect / math.sqrt(2 * (n - 1)), (i, n, s, expect)
        assert abs(float(noise.mean())) < 3 * expect / math.sqrt(n) + 1e-12


def test_whitened_clipping_bound():
    """Every sample's contribution to the whitened sum, c_i * (g_{i,g} / w_g)_g, has norm <= C."""
    C = 0.05
    m, o, l = make_setup("sgd")
    ref_model = copy.deepcopy(m)
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=C, poisson_sampling=False, seed=0)
    w = _plant_scales(o, 2, 0.3, 2.7)
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    o.engine.flush()
    names = [o.engine.names[p] for p in o.params]
    gs = per_sample_grads(ref_model, x, lambda out, i: F.cross_entropy(out, y[i:i + 1], reduction="sum"), len(x))
    whitened = torch.stack([gs[n].flatten(1).double().pow(2).sum(1) / w[k] ** 2 for k, n in enumerate(names)]).sum(0)
    contrib = o.last_clip_factors.double() * whitened.sqrt()
    assert (contrib <= C + 1e-6).all()
    assert (o.last_clip_factors < 1).sum() >= len(x) // 2  # the bound was exercised, not vacuous
    assert rel_err(o.last_per_sample_norms, whitened.sqrt()) < 1e-4


def test_global_clipping_is_charged_min_w():
    m, o, l = make_setup("sgd")
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                 clipping="global", seed=0, allocation="paper")
    o.allocator.group_scales = torch.tensor([0.5] + [1.2] * (o.allocator.n_groups - 1), dtype=torch.float64)
    train(m, o, l, 1)
    assert o.accountant.history == [(0.5, 0.25, 1)]


def test_gradient_accumulation_split_logical_batch():
    """A logical batch split into physical chunks gives the same step as one pass."""
    res = []
    for M in (None, 5):
        m, o, l = make_setup("sgd")
        m, o, l = anadp.make_private(m, o, l, noise_multiplier=0.8, max_grad_norm=0.5, seed=11,
                                     max_physical_batch_size=M)
        for x, y in l:
            o.zero_grad()
            if len(x):
                F.cross_entropy(m(x), y).backward()
            o.step()
        res.append((flat(m), o.step_count, o.accountant.history))
    assert res[0][1] == res[1][1] == 4
    assert res[0][2] == res[1][2]
    assert rel_err(res[1][0], res[0][0]) < 1e-6


def test_manual_accumulation_is_charged_as_k_releases():
    m, o, l = make_setup("sgd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, o, l = anadp.make_private(m, o, l, noise_multiplier=2.0, max_grad_norm=1.0, poisson_sampling=False, seed=0)
    it = iter(l)
    for _ in range(2):
        x, y = next(it)
        F.cross_entropy(m(x), y).backward()
    o.step()
    assert o.accountant.history == [(2.0 / math.sqrt(2), 0.25, 2)]


def test_checkpoint_round_trip():
    def build():
        m, o, l = make_setup("adamw")  # sigma 0.05: anadp's statistics measurable, its scales move
        return anadp.make_private(m, o, l, noise_multiplier=0.05, max_grad_norm=0.5, seed=5,
                                  allocation_config=anadp.AllocationConfig(warmup_steps=2))

    def run(m, o, l, steps):
        done = 0
        while done < steps:
            for x, y in l:
                o.zero_grad()
                if len(x):
                    F.cross_entropy(m(x), y).backward()
                o.step()
                done += 1
                if done == steps:
                    break

    m, o, l = build()
    run(m, o, l, 6)
    a, oa, la = build()
    run(a, oa, la, 3)
    buf = io.BytesIO()  # through a real file format, loaded with weights_only
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b, ob, lb = build()
    b.load_state_dict(state["model"])
    ob.load_state_dict(state["opt"])
    run(b, ob, lb, 3)
    assert torch.equal(flat(b), flat(m))
    assert ob.accountant.history == o.accountant.history
    assert torch.equal(ob.allocator.scales, o.allocator.scales)
    assert not torch.equal(o.allocator.scales, torch.ones_like(o.allocator.scales))


def test_other_torch_optimizer_gets_noisy_grad():
    m, o, l = make_setup(lambda ps: torch.optim.Adagrad(ps, lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                     seed=0)
    before = flat(m).clone()
    train(m, o, l, 2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert not torch.equal(before, flat(m))


def test_noise_is_reproducible_and_seed_dependent():
    res = []
    for seed in (1, 1, 2):
        m, o, l = make_setup("sgd")
        m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, seed=seed)
        train(m, o, l, 3)
        res.append(flat(m))
    assert torch.equal(res[0], res[1]) and not torch.equal(res[0], res[2])


def test_secure_mode_rejects_seed_and_is_not_reproducible():
    m, o, l = make_setup("sgd")
    with pytest.raises(ValueError, match="secure_mode"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, seed=1, secure_mode=True)
    res = []
    for _ in range(2):
        m, o, l = make_setup("sgd")
        m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, secure_mode=True)
        assert o.seed is None
        train(m, o, l, 1)
        res.append(flat(m))
    assert not torch.equal(res[0], res[1])


def test_lr_scheduler_drives_the_wrapped_optimizer():
    m, o, l = make_setup("sgd")
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
    train(m, o, l, 2)
    sched.step()
    assert o.original_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert "DPOptimizer(sigma=1.0" in repr(o)

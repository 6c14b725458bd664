"""Noise allocations: groups, formulas, normalization and bounds on hand-made statistics;
what reaches the allocation in a training run; what the share release costs."""
import math

import pytest
import torch
import torch.nn.functional as F

import anadp
from anadp.accounting import Accountant
from anadp.allocation import ALLOCATIONS, AllocationConfig, NoiseAllocator, _normalize, noise_groups, normalize_scales
from helpers import rel_err
from models import make_setup

WIDE = dict(w_min=1e-3, w_max=1e3)  # bounds that do not bind, so that formulas are visible


def test_groups_are_matrices_and_their_biases():
    names = ["enc.0.q.lora_A.default.weight", "enc.0.q.lora_B.default.weight", "enc.0.norm.weight",
             "enc.0.norm.bias", "head.weight", "head.bias", "emb.weight", "lone_bias"]
    shapes = [torch.Size(s) for s in ([8, 16], [16, 8], [16], [16], [2, 16], [2], [100, 16], [3])]
    groups, group_names = noise_groups(names, shapes)
    assert group_names == ["enc.0.q.lora_A.default", "enc.0.q.lora_B.default", "head", "emb"]
    assert groups == [0, 1, -1, -1, 2, 2, 3, -1]  # LoRA factors apart, bias with its matrix, norms in the rest


def test_scales_are_per_group_and_the_rest_stays_at_one():
    a = NoiseAllocator([4, 2, 3, 5], mode="anadp", groups=[0, 0, -1, 1])
    a.group_scales = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert a.scales.tolist() == [0.5, 0.5, 1.0, 2.0]
    assert a.per_group(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [3.0, 4.0, 3.0]  # groups, then the rest


def test_paper_important_group_gets_less_noise():
    a = NoiseAllocator([4, 4, 4], mode="paper", config=AllocationConfig(warmup_steps=0, **WIDE))
    g = torch.Generator().manual_seed(0)
    for _ in range(8):  # group 0: large |p*g| that moves (uncertainty); group 2 small
        a.update(4 * torch.stack([5 + 5 * torch.rand(1, generator=g), 1 + torch.rand(1, generator=g),
                                  0.1 + 0.1 * torch.rand(1, generator=g)]).flatten())
    w = a.scales
    assert w[0] < w[1] < w[2]
    assert abs(float((a.sizes * w ** 2).sum() / a.sizes.sum()) - 1) < 1e-12  # noise energy of uniform DP


def test_normalization_is_exact_and_bounded():
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 1000, (50,), generator=g)
    u = torch.exp(torch.randn(50, generator=g, dtype=torch.float64) * 3)  # wide spread: bounds bind
    for exponent in (2.0, -2.0):
        w = _normalize(u, sizes, exponent, 0.3, 3.0)
        d = sizes.double()
        assert abs(float((d * w ** exponent).sum() / d.sum()) - 1) < 1e-12, exponent
        assert float(w.min()) >= 0.3 and float(w.max()) <= 3.0
        assert (w == 0.3).any() and (w == 3.0).any()  # both bounds were active
        order = torch.argsort(u)  # monotone in u
        assert (w[order].diff() >= 0).all()
    assert torch.equal(normalize_scales(u, sizes, 0.3, 3.0), _normalize(u, sizes, 2.0, 0.3, 3.0))


def _feed(a: NoiseAllocator, coherent, share, steps=30, noise_std=0.01, clip=1.0, denom=100.0, seed=0):
    """Statistics of a run whose groups have this coherent (whitened) gradient energy and
    per-sample share, with the noise and the per-sample diagonal that a real release holds."""
    g = torch.Generator().manual_seed(seed)
    d = a.sizes
    for _ in range(steps):
        grad_sq = (torch.tensor(coherent, dtype=torch.float64) + d * noise_std ** 2
                   + clip ** 2 * torch.tensor(share[:-1], dtype=torch.float64) / denom ** 2)
        shares = torch.tensor(share, dtype=torch.float64) * (1 + 0.01 * torch.randn(len(share), generator=g,
                                                                                    dtype=torch.float64))
        a.update(grad_sq, shares, noise_std=noise_std, clip=clip, denom=denom, samples=denom)


def test_anadp_with_sgd_is_the_coherence_rule():
    """SGD (phi linear): the maximum of the gain is at x_g ~ a_g / G_g^2 (Cauchy-Schwarz), i.e.
    w_g ~ share_g / a_g at w = 1: the group whose per-sample energy is mostly coherent signal
    gets the smallest w."""
    a = NoiseAllocator([100, 100, 100], mode="anadp", config=AllocationConfig(warmup_steps=30, power=1.0, **WIDE),
                       adaptive=False)
    coherent, share = [0.04, 0.01, 0.002], [40.0, 40.0, 10.0, 0.0]
    _feed(a, coherent, share, steps=29)
    assert torch.equal(a.group_scales, torch.ones(3, dtype=torch.float64))  # still warming up: w = 1 measured
    _feed(a, coherent, share, steps=1, seed=1)
    w = a.group_scales
    ratio = torch.tensor(share[:3], dtype=torch.float64) / torch.tensor(coherent, dtype=torch.float64)
    assert w[0] < w[1] < w[2]
    assert float((w / ratio).std() / (w / ratio).mean()) < 0.05  # proportional, up to the noisy shares


@pytest.mark.parametrize("adaptive", [False, True])
def test_anadp_scales_maximize_the_step_gain(adaptive):
    """The maximizer beats uniform and every nearby point within the bounds on the gain (the scales
    used are then this maximizer tempered: (w* / geometric mean)^power)."""
    a = NoiseAllocator([770, 3072, 3072, 3072], mode="anadp", config=AllocationConfig(warmup_steps=30),
                       adaptive=adaptive)
    # a head whose signal dominates its noise, and three noise-bound groups
    _feed(a, [0.5, 0.002, 0.0005, 0.0], [96.0, 12.8, 12.8, 6.4, 0.0], steps=30, noise_std=0.004, denom=128)
    w = a._best_for_step()
    lo, hi = -math.log(3.0), -math.log(0.3)
    gain = a.step_gain()
    shape = w.log() - w.log().mean()
    # (recomputed from a warm start at the tempered scales: the same maximum up to convergence)
    assert torch.allclose(a.group_scales, torch.exp(0.5 * shape).clamp(0.3, 3.0), rtol=0.05)
    best = float(gain(-w.log()))
    assert best > float(gain(torch.zeros(4, dtype=torch.float64)))
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        y = (-w.log() + 0.2 * torch.randn(4, generator=g, dtype=torch.float64)).clamp(lo, hi)
        assert float(gain(y)) <= best * (1 + 1e-3)  # the optimum is flat: within 0.1%


@pytest.mark.parametrize("adaptive", [False, True])
def test_step_gain_gradient_is_autograds(adaptive):
    """The maximizer's closed-form gradient equals autograd's through step_gain, at random points
    (one group at alpha = 0 included: its term and its gradient vanish)."""
    a = NoiseAllocator([770, 3072, 3072, 3072], mode="anadp", config=AllocationConfig(warmup_steps=30),
                       adaptive=adaptive)
    _feed(a, [0.5, 0.002, 0.0005, 0.0], [96.0, 12.8, 12.8, 6.4, 0.0], steps=30, noise_std=0.004, denom=128)
    gain, grad = a.step_gain(), a.step_gain_grad()
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        y = (torch.rand(4, generator=g, dtype=torch.float64) * 2.3 - 1.1).requires_grad_(True)
        ref, = torch.autograd.grad(gain(y), y)
        got = torch.from_numpy(grad(y.detach().numpy()))
        assert torch.isfinite(got).all()
        assert float((got - ref).norm() / ref.norm()) < 1e-10


@pytest.mark.parametrize("floor", [0.25, 1.0])
def test_corrected_adam_gain_is_its_steady_state_step_gain(floor):
    """Adam with the noise correction at floor f steps m / max(s, sqrt(f) n) per coordinate once
    its moments have settled (v_hat - phi_hat = s^2, s the signal it is fed), so a group whose true
    gradient is sqrt(alpha / d) per coordinate gains sqrt(alpha d) min(s / (sqrt(f) n), 1); anadp's
    gain at saturation f is the smooth form sqrt(alpha d) phi(s / (sqrt(f) n)), phi(r) = r / sqrt(1 + r^2),
    which lies between 1/sqrt(2) and 1 of it for every group. Adam's gain (saturation 1) is not
    that of a floor of 0.25: on noise-bound groups (these) it is about half of it (r against 2r)."""
    def allocator(saturation):
        a = NoiseAllocator([770, 3072, 3072, 3072], mode="anadp", config=AllocationConfig(warmup_steps=30),
                           saturation=saturation)
        _feed(a, [0.001, 0.002, 0.0005, 0.0001], [24.0, 12.8, 12.8, 6.4, 0.0], steps=30, noise_std=0.004, denom=128)
        return a

    a = allocator(floor)
    G2, alpha, d, _ = a._gain_terms()
    n = a.noise_var ** 0.5
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        log_x = torch.rand(4, generator=g, dtype=torch.float64) * 2.3 - 1.1
        x2 = torch.exp(2 * log_x)
        s = torch.sqrt(x2 * alpha / (d * ((x2 * G2[:-1]).sum() + G2[-1])))
        exact = float(((alpha * d).sqrt() * torch.clamp(s / (floor ** 0.5 * n), max=1.0)).sum())
        assert 2 ** -0.5 - 1e-9 <= float(a.step_gain()(log_x)) / exact <= 1 + 1e-9
        if floor < 1:
            assert float(allocator(1.0).step_gain()(log_x)) / exact < 0.6


def test_the_allocation_of_a_corrected_adam_saturates_at_its_floor():
    m, o, l = make_setup("adamw")
    _, o, _ = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=0.5, adam_noise_correction=0.3)
    assert o.allocator.saturation == 0.3 == o.noise_variance.floor
    m, o, l = make_setup("adamw")
    _, o, _ = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=0.5, adam_noise_correction=False)
    assert o.allocator.saturation == 1.0


def test_anadp_gives_a_saturated_group_more_noise_under_adam():
    """The same statistics: under SGD the coherent head gets the least noise; under Adam, whose
    step saturates once signal dominates noise, it gets more than the noise-bound groups."""
    scales = {}
    for adaptive in (False, True):
        a = NoiseAllocator([770, 3072, 3072], mode="anadp", config=AllocationConfig(warmup_steps=30),
                           adaptive=adaptive)
        _feed(a, [0.5, 0.002, 0.0005], [102.4, 12.8, 12.8, 0.0], steps=30, noise_std=0.004, denom=128)
        scales[adaptive] = a.group_scales
    assert scales[False][0] < scales[False][1]
    assert scales[True][0] > scales[True][1]


def test_clip_allocation_is_the_minimum_of_F():
    """w_g^2 ~ G_g / sqrt(d_g) minimizes F(w) = (sum G^2/w^2)(sum d w^2): check against random w."""
    sizes = [10, 1000, 300]
    a = NoiseAllocator(sizes, mode="clip", config=AllocationConfig(warmup_steps=0, stats_beta=0.0, **WIDE))
    G2 = torch.tensor([5.0, 1.0, 20.0], dtype=torch.float64)  # per-sample energy (raw = whitened at w = 1)
    a.update(None, torch.cat([G2, torch.zeros(1, dtype=torch.float64)]))
    w, d = a.group_scales, a.sizes

    def F_(w):
        return float((G2 / w ** 2).sum() * (d * w ** 2).sum())

    best = F_(w)
    assert best <= F_(torch.ones(3, dtype=torch.float64)) + 1e-9
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        assert best <= F_(w * torch.exp(0.3 * torch.randn(3, generator=g, dtype=torch.float64))) + 1e-9
    assert abs(float((d * w ** 2).sum() / d.sum()) - 1) < 1e-12


@pytest.mark.parametrize("mode", ALLOCATIONS)
def test_every_allocation_stays_in_its_bounds_on_random_statistics(mode):
    g = torch.Generator().manual_seed(3)
    cfg = AllocationConfig(warmup_steps=2)
    a = NoiseAllocator([50, 7, 300, 2, 90], mode=mode, config=cfg, groups=[0, 1, 2, -1, 3])
    for _ in range(20):
        stat = torch.rand(5, generator=g, dtype=torch.float64) * 10 ** (3 * torch.rand(5, generator=g))
        shares = torch.randn(5, generator=g, dtype=torch.float64) * 5 + 10  # noisy: some negative
        a.update(stat, shares, noise_std=0.05, clip=1.0, denom=64)
        w = a.scales
        assert torch.isfinite(w).all() and (w >= cfg.w_min).all() and (w <= cfg.w_max).all()
        assert w[3] == 1.0  # the rest group
    assert (a.group_scales != 1).any() or mode == "uniform"


def test_warmup_keeps_uniform():
    a = NoiseAllocator([3, 3], mode="paper", config=AllocationConfig(warmup_steps=4))
    for t in range(3):
        a.update(torch.tensor([30.0 * (t + 1), 0.3]))
        assert torch.equal(a.scales, torch.ones(2, dtype=torch.float64)), t
    a.update(torch.tensor([120.0, 0.3]))
    assert not torch.equal(a.scales, torch.ones(2, dtype=torch.float64))


def test_uniform_mode_never_moves():
    a = NoiseAllocator([3, 3], mode="uniform", config=AllocationConfig(warmup_steps=0))
    for _ in range(5):
        a.update(torch.tensor([27.0, 0.3]), torch.tensor([5.0, 1.0, 0.0]))
    assert torch.equal(a.scales, torch.ones(2, dtype=torch.float64))


def test_bad_config():
    with pytest.raises(ValueError, match="w_min"):
        AllocationConfig(w_min=1.5)
    with pytest.raises(ValueError, match="share_noise"):
        AllocationConfig(share_noise=1.0)
    with pytest.raises(ValueError, match="allocation"):
        NoiseAllocator([1], mode="adaptive")
    m, o, l = make_setup("sgd")
    with pytest.raises(ValueError, match="paper's mechanism"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, clipping="global", allocation="anadp")


def _run(mode, tamper=False, steps=None):
    m, o, l = make_setup("sgd")
    # little noise: the tiny model's statistics must be measurable for anadp's scales to move
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=0.05, max_grad_norm=0.5, seed=4, allocation=mode,
                                 allocation_config=AllocationConfig(warmup_steps=1))
    inputs = []
    for x, y in l:
        o.zero_grad()
        batch = None
        if len(x):
            F.cross_entropy(m(x), y).backward()
            batch = o.engine.take()  # the raw per-sample material of this batch
            o.accumulator.on_batch(batch)
        grads = o.privatize()
        if tamper and batch is not None:
            for recs in batch.records.values():
                for r in recs:
                    for attr in ("A", "G", "gs"):
                        if hasattr(r, attr):
                            setattr(r, attr, getattr(r, attr) * 1000)
            o.sums.summed = [None if s is None else s * 1000 for s in o.sums.summed]
            o.feed.share_sum = o.feed.share_sum * 1000
        o.apply(grads)
        inputs.append((o.last_allocation_input, o._released[1:]))
    return o, inputs


@pytest.mark.parametrize("mode", ["anadp", "paper", "clip"])
def test_allocation_reads_only_released_outputs(mode):
    """Tamper with the raw per-sample records, the clipped sums and the share sums after the
    release: the scales do not change. Then replay the released statistics alone through a
    fresh allocator: the same scales, so nothing else (no raw per-sample norm) reached it."""
    o, inputs = _run(mode)
    o_t, _ = _run(mode, tamper=True)
    w = o.allocator.group_scales
    assert not torch.equal(w, torch.ones_like(w))
    assert torch.equal(w, o_t.allocator.group_scales)
    fresh = NoiseAllocator(o.allocator.sizes.long().tolist(), mode, o.allocator.config, o.allocator.group_of.tolist(),
                           adaptive=o.allocator.adaptive)
    for (sums, shares, factors), (noise_std, denom, samples) in inputs:
        fresh.update(sums, shares, noise_std=noise_std, clip=o.max_grad_norm, denom=denom, samples=samples, **factors)
    assert torch.equal(fresh.group_scales, w)


def test_share_release_is_charged_out_of_sigma():
    """The gradient gets sigma_g, the shares sigma_b = share_noise * sigma, with
    sigma_g^-2 + sigma_b^-2 = sigma^-2: one Gaussian mechanism of multiplier sigma on the
    concatenated (sensitivity-1, sensitivity-1) release. Epsilon equals Opacus's accountant on
    that combined multiplier, the same as uniform DP-SGD's at sigma."""
    sigma = 1.1
    o, _ = _run("anadp")
    o.noise_multiplier = sigma
    sg, sb = o.gradient_noise_multiplier, o.share_noise_multiplier
    assert sb == pytest.approx(o.allocator.config.share_noise * sigma) and sg > sigma
    combined = (sg ** -2 + sb ** -2) ** -0.5
    assert combined == pytest.approx(sigma, rel=1e-12)
    assert o.accountant.history == [(0.05, o.sample_rate, o.accountant.steps)]  # charged sigma, as uniform
    from opacus.accountants import PRVAccountant
    ref = PRVAccountant()
    ref.history = [(combined, o.sample_rate, 20)]
    mine = Accountant("prv")
    mine.history = [(sigma, o.sample_rate, 20)]
    assert mine.get_epsilon(1e-5) == pytest.approx(float(ref.get_epsilon(1e-5)), rel=1e-9)


def test_released_shares_carry_exactly_their_noise():
    """released - exact share sums = sigma_b * z, z the share stream of that step: the noise that
    the accountant assumes is the noise that was added (sigma_b = share_noise * sigma)."""
    from anadp import backends, philox
    from anadp.tensors import SHARE_STREAM
    m, o, l = make_setup("sgd")
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=0.9, max_grad_norm=0.5, seed=7, poisson_sampling=False)
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    o.engine.flush()
    o.feed.fold()
    exact = o.feed.share_sum.clone()
    assert 0 < float(exact.sum()) <= len(x) + 1e-9  # each sample adds at most 1
    o.step()
    assert o.share_noise_backend.name == ("cpu" if backends.why_unavailable("cpu") is None else "torch")
    z = torch.zeros(exact.shape)  # the compiled CPU kernel where it is built
    o.share_noise_backend.add_noise_(z, philox.group_key(o.seed, 0, SHARE_STREAM), 1.0)
    sigma_b = 0.9 * o.allocator.config.share_noise
    assert torch.allclose(o.last_released_shares - exact, sigma_b * z.double(), atol=1e-12)
    # the same numbers as the torch stream, to its float tolerance (tests/test_cpu_kernel.py)
    assert torch.allclose(z, philox.gaussian(o.seed, 0, SHARE_STREAM, exact.shape), atol=1e-6, rtol=0)


def test_anadp_feeds_the_whitened_gradient():
    """The optimizer gets (clipped sum + sigma_g C w z) / (B w): noise sigma_g C / B in every group."""
    sigma, C = 1.3, 0.7
    outs = []
    for s in (0.0, sigma):
        m, o, l = make_setup("sgd")
        with pytest.warns(UserWarning) if s == 0 else _nothing():
            m, o, l = anadp.make_private(m, o, l, noise_multiplier=s, max_grad_norm=C, poisson_sampling=False, seed=3)
        o.allocator.group_scales = torch.linspace(0.4, 2.5, o.allocator.n_groups, dtype=torch.float64)
        x, y = next(iter(l))
        F.cross_entropy(m(x), y).backward()
        outs.append(o.privatize())
    expect = o.gradient_noise_multiplier * C / o.expected_batch_size
    noise = torch.cat([(noisy - clean).flatten() for clean, noisy in zip(*outs)])
    n = noise.numel()
    assert abs(float(noise.std()) - expect) < 3 * expect / math.sqrt(2 * (n - 1))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_first_moment_energy_is_unbiased_and_less_noisy_than_one_step():
    """Coherent energy from Adam's exp_avg (the factors of AllocationFeed.momentum_energy) against
    the square of the last noisy step, over 40 runs of 30 steps of u_t = S + N(0, 1) in d = 2000
    coordinates, ||S||^2 = 5: both unbiased (|mean - 5| < 4 standard errors), the first moment's
    spread at least 3x smaller (theory: sqrt(2d) vs sqrt(2d / 19) noise-noise terms)."""
    from types import SimpleNamespace

    from anadp.allocation_feed import AllocationFeed
    d, runs, steps = 2000, 40, 30
    S = torch.full((d,), 0.05, dtype=torch.float64)
    est_m, est_1 = [], []
    for r in range(runs):
        g = torch.Generator().manual_seed(r)
        p = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
        opt = torch.optim.Adam([p], betas=(0.9, 0.999))
        for t in range(steps):
            p.grad = S + torch.randn(d, generator=g, dtype=torch.float64)
            opt.step()
        stub = SimpleNamespace(optimizer=opt, tensors=SimpleNamespace(params=[p], tensor_sums=lambda v: v.double()),
                               allocator=SimpleNamespace(updates=steps - 1))
        sums, noise, signal = AllocationFeed.momentum_energy(stub)
        est_m.append(float((sums.sum() - noise * d) / signal))
        est_1.append(float(p.grad.pow(2).sum() - d))
    m, m1 = torch.tensor(est_m), torch.tensor(est_1)
    assert abs(float(m.mean()) - 5) < 4 * float(m.std()) / runs ** 0.5
    assert abs(float(m1.mean()) - 5) < 4 * float(m1.std()) / runs ** 0.5
    assert float(m.std()) * 3 < float(m1.std())


def test_pooling_shrinks_a_group_toward_its_kind():
    """Statistics of the same matrix in other layers pull a group's own: with pooling p, the
    statistic used is (1 - p) own + p kind mean."""
    a = NoiseAllocator([10] * 4, mode="anadp", config=AllocationConfig(pooling=0.75),
                       kinds=["l.*.q", "l.*.q", "l.*.v", "head"])
    pooled = a._pooled(torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64))
    assert pooled.tolist() == [0.25 * 1 + 0.75 * 2, 0.25 * 3 + 0.75 * 2, 5.0, 7.0]
    from anadp.allocation import kind_of
    assert kind_of("bert.encoder.layer.11.attention.self.query.lora_A.default") == \
        "bert.encoder.layer.*.attention.self.query.lora_A.default"


def test_coherence_is_shrunk_by_how_well_it_is_measured():
    """Empirical Bayes: two precisely measured groups keep their coherence; a third whose estimate
    is mostly noise is pulled to the precision-weighted common value; with nothing measurable,
    every group gets the common value (and anadp's w stays uniform)."""
    a = NoiseAllocator([10, 10, 10], mode="anadp")
    G2 = torch.ones(3, dtype=torch.float64)
    a.energy_bar = torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64)
    a.energy_var = torch.tensor([1e-6, 1e-6, 1e4], dtype=torch.float64)
    rho = a._coherence(G2)
    assert abs(float(rho[0]) - 1) < 1e-3 and abs(float(rho[1]) - 3) < 1e-3
    assert abs(float(rho[2]) - 2) < 0.05  # (1 + 3) / 2: the noisy 10 barely counts
    a.energy_var = torch.full((3,), 1e4, dtype=torch.float64)
    assert torch.allclose(a._coherence(G2), torch.full((3,), float(a.energy_bar.mean()), dtype=torch.float64))


@pytest.mark.parametrize("change", ["drop energy_var", "unknown setting"])
def test_allocation_state_from_another_version_is_a_clear_error(change):
    """A state that lacks a field this version keeps (saved before it existed), or carries a setting
    it does not know, cannot be continued exactly: refused with the reason, not a KeyError."""
    a = NoiseAllocator([4, 2, 3], mode="anadp", groups=[0, 0, 1])
    state = a.state_dict()
    b = NoiseAllocator([4, 2, 3], mode="anadp", groups=[0, 0, 1])
    b.load_state_dict(state)  # the same version round-trips
    assert torch.equal(b.group_scales, a.group_scales) and b.updates == a.updates
    if change == "drop energy_var":
        del state["energy_var"]
    else:
        state["config"] = {**state["config"], "future_knob": 1.0}
    with pytest.raises(ValueError, match="another version of anadp.*(energy_var|future_knob)|(energy_var|future_knob).*another"):
        b.load_state_dict(state)


@pytest.mark.parametrize("adaptive", [True, False])
def test_the_compiled_maximizer_equals_the_numpy_loop(adaptive):
    """csrc/cpu/gain.cpp runs _best_for_step's loop (the same operations; sums in another order):
    equal to rounding on random statistics, bounds hit included."""
    from anadp.backends import cpu
    if cpu.why_unavailable() is not None:
        pytest.skip(f"CPU kernel: {cpu.import_error}")
    g = torch.Generator().manual_seed(5)
    a = NoiseAllocator([50, 200, 80, 10, 300, 7], "anadp", AllocationConfig(warmup_steps=0), [0, 1, 2, 3, 4, -1],
                       adaptive=adaptive)
    a.share_bar = torch.rand(a.n_groups + 1, generator=g, dtype=torch.float64) + 0.1
    a.energy_bar = torch.rand(a.n_groups, generator=g, dtype=torch.float64) * 3
    a.energy_var = torch.rand(a.n_groups, generator=g, dtype=torch.float64) * 1e-3
    a.noise_var = 0.2
    a.group_scales = torch.rand(a.n_groups, generator=g, dtype=torch.float64) + 0.5
    compiled = a._best_for_step()
    a.compiled = False
    ref = a._best_for_step()
    assert rel_err(compiled, ref) < 1e-10 and float(ref.max() / ref.min()) > 1.5  # the maximizer moved w


def test_fixed_scales_weigh_a_group_in_the_clip_and_its_noise():
    """AllocationConfig.scales={"head": w}: each sample's clipped norm counts the head's gradient by 1 / w^2
    (norm^2 = sum_g ||g_g||^2 / w_g^2), the head's noise is w sigma C / B, uniform keeps w, epsilon is uniform's."""
    sigma, C, w = 1.2, 0.5, 0.25
    runs = {}
    for scales in (None, {"head": w}):
        for s in (0.0, sigma):
            m, o, l = make_setup("sgd")
            with pytest.warns(UserWarning) if s == 0 else _nothing():
                m, o, l = anadp.make_private(m, o, l, noise_multiplier=s, max_grad_norm=C, poisson_sampling=False, seed=3,
                                             allocation="uniform", allocation_config=AllocationConfig(scales=scales))
            x, y = next(iter(l))
            F.cross_entropy(m(x), y).backward()
            out = o.privatize()
            runs[(scales is None, s)] = (o, out, o.accumulator.last_per_sample_norms.double())
    o, _, norms = runs[(False, 0.0)]
    assert o.noise_scales["head"] == w and {v for k, v in o.noise_scales.items() if k != "head"} == {1.0}
    # the head's per-sample energy, by autograd one sample at a time
    m, _, l = make_setup("sgd")
    x, y = next(iter(l))
    head_sq = torch.tensor([sum(float(g.pow(2).sum()) for g in torch.autograd.grad(
        F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]) / len(x), [m.head.weight, m.head.bias])) for i in range(len(x))],
        dtype=torch.float64)
    plain = runs[(True, 0.0)][2]
    assert rel_err(norms.square(), plain.square() + (w ** -2 - 1) * head_sq * len(x) ** 2) < 1e-5
    # noise: w sigma_g C / B on the head's coordinates, sigma_g C / B elsewhere
    head = [i for i, p in enumerate(o.params) if o.tensors.names[p].startswith("head")]
    o_n, noisy, _ = runs[(False, sigma)]
    clean = runs[(False, 0.0)][1]
    unit = o_n.gradient_noise_multiplier * C / o_n.expected_batch_size
    for idx, expect in ((head, w * unit), ([i for i in range(len(clean)) if i not in head], unit)):
        noise = torch.cat([(noisy[i] - clean[i]).flatten() for i in idx])
        assert abs(float(noise.std()) - expect) < 4 * expect / math.sqrt(2 * (noise.numel() - 1))
    assert o_n.ledger.accountant.history == runs[(True, sigma)][0].ledger.accountant.history


def test_fixed_scales_are_checked():
    m, o, l = make_setup("sgd")
    with pytest.raises(ValueError, match="does not have: \\['nope'\\]"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, allocation_config=AllocationConfig(
            scales={"nope": 0.5}))
    m, o, l = make_setup("sgd")
    with pytest.raises(ValueError, match="clipping='whitened'"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, clipping="global", allocation="uniform",
                           allocation_config=AllocationConfig(scales={"head": 0.5}))
    with pytest.raises(ValueError, match="must be > 0"):
        AllocationConfig(scales={"head": 0.0})

"""Adam's noise correction (adam_noise_correction=True; anadp.adam_correction): the torch reference
against torch's Adam and against its formula, a replay from the released gradients alone, the
accountant unchanged, checkpoints, misuse. The kernels against the reference: test_backend.py."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import anadp
from anadp import adam_correction as AC
from helpers import rel_err
from models import make_setup


@pytest.mark.parametrize("opt", [torch.optim.Adam, torch.optim.AdamW])
def test_without_noise_variance_the_reference_is_torch_adam(opt):
    """noise_var = floor = 0: torch's own Adam / AdamW step (weight decay, bias corrections), 3 steps."""
    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]
    b = copy.deepcopy(a)
    oa, ob = opt(a, lr=0.01, weight_decay=0.1), opt(b, lr=0.01, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        oa.step()
        AC.adam_step_(ob, b, torch.zeros(2), torch.zeros(2))
    for p, q in zip(a, b):
        assert rel_err(q.detach(), p.detach()) < 1e-6


def test_the_reference_takes_the_noise_variance_out_of_v_hat():
    """One step from zero state: v_hat = g^2, so the update is lr * g / (sqrt(max(g^2 - phi, f phi)) + eps)
    per coordinate (the floor where g^2 < (1 + f) phi)."""
    p = torch.nn.Parameter(torch.zeros(6))
    g = torch.tensor([3.0, -2.0, 1.0, 0.5, -0.1, 0.0])
    p.grad = g.clone()
    opt = torch.optim.Adam([p], lr=0.1, eps=1e-8)
    phi, f = 1.5, 0.1
    AC.adam_step_(opt, [p], torch.tensor([phi]), torch.tensor([f * phi]))
    want = -0.1 * g / (torch.clamp(g * g - phi, min=f * phi).sqrt() + 1e-8)
    assert rel_err(p.detach(), want) < 1e-6
    assert (p.detach().abs()[:2] > 0.1).all()  # signal above the noise: larger steps than Adam's lr


def test_noise_variance_average_is_bias_corrected():
    """A constant phi is subtracted exactly from the first step on; a changing one as v sees it."""
    nv = AC.NoiseVariance(2)
    beta2 = torch.tensor([0.999, 0.9], dtype=torch.float64)
    for _ in range(3):
        assert torch.allclose(nv.advance(torch.tensor([2.0, 2.0], dtype=torch.float64), beta2),
                              torch.tensor([2.0, 2.0], dtype=torch.float64), rtol=1e-12)
    got = nv.advance(torch.tensor([0.0, 0.0], dtype=torch.float64), beta2)
    want = [2 * (1 - b ** 3) * b / (1 - b ** 4) for b in (0.999, 0.9)]  # the zero step averaged in
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12)


def _run(steps=4, record=False, backend="torch", **kw):
    m, o, l = make_setup("adamw")
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=0.5, seed=5, backend=backend,
                                 allocation_config=anadp.AllocationConfig(warmup_steps=1), **kw)
    released = []
    while o.step_count < steps:
        for x, y in l:
            o.zero_grad()
            scales = o.allocator.scales.clone()  # this step's, released by the last step's allocation
            F.cross_entropy(m(x), y).backward()
            o.step()
            if record:
                released.append(([p.grad.clone() for p in o.params], scales))
            if o.step_count == steps:
                break
    return m, o, released


def test_replayed_from_the_released_gradients_alone():
    """A plain AdamW replays the corrected run from the released gradients, the released scales and
    public constants (sigma, C, expected batch, beta2): it reads nothing else."""
    m, o, released = _run(record=True, adam_noise_correction=True)
    start, _, _ = make_setup("adamw")
    params = [p for p in start.parameters()]
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)  # make_setup("adamw")'s
    nv, beta2 = AC.NoiseVariance(len(params)), torch.full((len(params),), 0.999, dtype=torch.float64)
    # the gradient's noise: sigma_grad C w per coordinate of the sum (sigma_grad: sigma less the share
    # release's part), times the feed (1 / w under anadp's whitened feed), over the expected batch
    std, B = o.gradient_noise_multiplier * o.max_grad_norm, o.expected_batch_size
    for grads, w in released:
        for p, g in zip(params, grads):
            p.grad = g
        feed = 1 / w if o.allocator.whitened_feed else torch.ones_like(w)
        phi = nv.advance((std * w * feed / B) ** 2, beta2)
        AC.adam_step_(opt, params, phi, o.noise_variance.floor * phi)
    got = torch.cat([p.detach().flatten() for p in params])
    assert torch.equal(got, torch.cat([p.detach().flatten() for p in m.parameters()]))


def test_accountant_unchanged_and_the_step_changed():
    m1, o1, _ = _run(adam_noise_correction=True)
    m0, o0, _ = _run(adam_noise_correction=False)
    assert o1.accountant.history == o0.accountant.history and o1.privacy_spent(1e-5) == o0.privacy_spent(1e-5)
    a = torch.cat([p.detach().flatten() for p in m1.parameters()])
    b = torch.cat([p.detach().flatten() for p in m0.parameters()])
    assert rel_err(a, b) > 1e-3


def test_checkpoint_round_trip_is_bit_identical():
    m, o, _ = _run(steps=2, adam_noise_correction=0.2)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": o.state_dict()}, buf)
    full, o_full, _ = _run(steps=4, adam_noise_correction=0.2)
    m2, o2, l2 = make_setup("adamw")
    m2, o2, l2 = anadp.make_private(m2, o2, l2, noise_multiplier=1.0, max_grad_norm=0.5, seed=5, backend="torch",
                                    allocation_config=anadp.AllocationConfig(warmup_steps=1),
                                    adam_noise_correction=0.2)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    m2.load_state_dict(state["model"])
    o2.load_state_dict(state["opt"])
    while o2.step_count < 4:
        for x, y in l2:
            o2.zero_grad()
            F.cross_entropy(m2(x), y).backward()
            o2.step()
            if o2.step_count == 4:
                break
    for p, q in zip(m2.parameters(), full.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(o2.noise_variance.average, o_full.noise_variance.average)
    m3, o3, _ = make_setup("adamw")
    _, o3, _ = anadp.make_private(m3, o3, _, noise_multiplier=1.0, max_grad_norm=0.5, seed=5,
                                  allocation_config=anadp.AllocationConfig(warmup_steps=1), adam_noise_correction=False)
    with pytest.raises(ValueError, match="saved with adam_noise_correction"):
        o3.load_state_dict(state["opt"])
    m4, o4, _ = make_setup("adamw")
    _, o4, _ = anadp.make_private(m4, o4, _, noise_multiplier=1.0, max_grad_norm=0.5, seed=5,
                                  allocation_config=anadp.AllocationConfig(warmup_steps=1), adam_noise_correction=True)
    with pytest.raises(ValueError, match="has floor 0.2, this optimizer 1.0"):
        o4.load_state_dict(state["opt"])


def test_refused_where_there_is_no_adam():
    m, _, l = make_setup("sgd")
    with pytest.raises(ValueError, match="adam_noise_correction corrects Adam"):
        anadp.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), l, noise_multiplier=1.0, max_grad_norm=1.0,
                           adam_noise_correction=True)
    with pytest.raises(ValueError, match="amsgrad"):
        anadp.make_private(m, torch.optim.Adam(m.parameters(), amsgrad=True), l, noise_multiplier=1.0,
                           max_grad_norm=1.0, adam_noise_correction=True)
    with pytest.raises(ValueError, match="floor must be > 0"):
        anadp.make_private(m, torch.optim.Adam(m.parameters()), l, noise_multiplier=1.0, max_grad_norm=1.0,
                           adam_noise_correction=-1.0)


def test_none_is_on_where_it_can_run():
    """adam_noise_correction=None: on for Adam / AdamW as anadp's update implements them (floor 1),
    off for the rest (no error); False, the default, is DP-Adam as Opacus has it."""
    cases = [(lambda ps: torch.optim.AdamW(ps, lr=1e-3), True), (lambda ps: torch.optim.Adam(ps), True),
             (lambda ps: torch.optim.Adam(ps, amsgrad=True), False), (lambda ps: torch.optim.SGD(ps, lr=0.1), False)]
    for make_opt, on in cases:
        m, _, l = make_setup("sgd")
        _, o, _ = anadp.make_private(m, make_opt(m.parameters()), l, noise_multiplier=1.0, max_grad_norm=1.0,
                                     adam_noise_correction=None)
        assert (o.noise_variance is not None) == on, make_opt
        if on:
            assert o.noise_variance.floor == AC.DEFAULT_FLOOR
    m, _, l = make_setup("sgd")
    _, o, _ = anadp.make_private(m, torch.optim.AdamW(m.parameters()), l, noise_multiplier=1.0, max_grad_norm=1.0)
    assert o.noise_variance is None


def test_a_checkpoint_without_the_correction_says_how_to_load_it():
    """A run saved with the correction off loads only into an optimizer made the same way; the error
    names the argument."""
    m, o, _ = _run(steps=1, adam_noise_correction=False)
    state = o.state_dict()
    m2, o2, l2 = make_setup("adamw")
    _, o2, _ = anadp.make_private(m2, o2, l2, noise_multiplier=1.0, max_grad_norm=0.5, seed=5, backend="torch",
                                  allocation_config=anadp.AllocationConfig(warmup_steps=1), adam_noise_correction=True)
    with pytest.raises(ValueError, match="adam_noise_correction=False"):
        o2.load_state_dict(state)

"""Bad input and edge cases: each a clear error or a counted, reported behaviour."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import anadp
from helpers import per_sample_grads, rel_err
from models import TinyTransformerClassifier, make_data, make_setup


def private(opt="sgd", **kw):
    m, o, l = make_setup(opt, **{k: kw.pop(k) for k in ("batch_size", "n") if k in kw})
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("max_grad_norm", 1.0)
    kw.setdefault("seed", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anadp.make_private(m, o, l, **kw)


def test_unsupported_trainable_module_at_wrap_time():
    m = nn.Sequential(nn.Embedding(10, 4), nn.GRU(4, 4))
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(anadp.UnsupportedModuleError, match=r"module '1' of type torch\.nn\.modules\.rnn\.GRU.*DPLSTM"):
        anadp.make_private(m, o, DataLoader(make_data(), batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0)


def test_nan_loss_raises_by_default():
    m, o, l = private(poisson_sampling=False)
    x, y = next(iter(l))
    (F.cross_entropy(m(x), y) * float("nan")).backward()
    with pytest.raises(FloatingPointError, match="non-finite per-sample gradient in 16 of 16 samples"):
        o.step()


@pytest.mark.parametrize("clipping", ["whitened", "per_layer"])
def test_nan_in_an_earlier_physical_batch_raises_before_anything_is_released(clipping):
    """The check is read once a step (a host read), not once per physical batch: a NaN in the first of two
    chunks is still caught before the step is released (whitened: at step(); per-layer: in the last chunk's
    backward, before its first release), counted over the logical batch, and the parameters are unchanged."""
    m, o, l = private(poisson_sampling=False, max_physical_batch_size=8, clipping=clipping)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite per-sample gradient in 8 of 16 samples"):
        for k, (x, y) in enumerate(l):
            (F.cross_entropy(m(x), y) * (float("nan") if k == 0 else 1.0)).backward()
            o.step()
    assert k == 1
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))


def test_inf_sample_is_dropped_and_counted_with_skip():
    m, o, l = private(poisson_sampling=False, nonfinite="skip", noise_multiplier=0.0)
    ref_m, ref_o, ref_l = private(poisson_sampling=False, noise_multiplier=0.0)
    x, y = next(iter(l))
    w = torch.ones(len(x))
    w[3] = float("inf")  # one sample's loss (and gradient) is infinite
    with pytest.warns(UserWarning, match="1 of 16 samples"):
        (F.cross_entropy(m(x), y, reduction="none") * w).mean().backward()
        o.step()
    assert o.skipped_samples == 1
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # the step equals one over the 15 finite samples (same expected batch size)
    keep = torch.arange(len(x)) != 3
    xr, yr = next(iter(ref_l))  # the same first batch (no Poisson sampling), drawn from the reference's loader
    assert torch.equal(xr, x)
    F.cross_entropy(ref_m(xr[keep]), yr[keep]).backward()
    ref_o.step()
    flat = lambda mod: torch.cat([p.detach().flatten() for p in mod.parameters()])  # noqa: E731
    assert rel_err(flat(m), flat(ref_m)) < 1e-6


def test_empty_poisson_batches():
    """q = 1/8 over 8 samples: with this seed several batches are empty. Both a skipped
    forward and a forward/backward on the empty batch give a noise-only step."""
    m, o, l = private(n=8, batch_size=1, seed=3)
    sizes = []
    for epoch in range(2):
        for x, y in l:
            sizes.append(len(x))
            o.zero_grad()
            if len(x) or epoch == 1:
                F.cross_entropy(m(x), y).backward() if len(x) else m(x).sum().backward()
            o.step()
    assert sizes.count(0) >= 2 and any(sizes[:8]) and 0 in sizes[:8] and 0 in sizes[8:]
    assert o.accountant.steps == 16
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_batch_size_one_is_per_sample_clipping():
    m, o, l = make_setup("sgd", batch_size=1, n=4, lr=1.0)
    ref = copy.deepcopy(m)
    o.param_groups[0]["momentum"] = 0
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=0.0, max_grad_norm=1e-3, poisson_sampling=False, seed=0)
    x, y = next(iter(l))
    gs = per_sample_grads(ref, x, lambda out, i: F.cross_entropy(out, y[i:i + 1]), 1)
    norm = torch.cat([g.flatten() for g in gs.values()]).norm()
    assert norm > 1e-3  # clipping is active
    F.cross_entropy(m(x), y).backward()
    o.step()
    for n, p in m.named_parameters():
        assert rel_err(p.grad, gs[n][0] * 1e-3 / (norm + 1e-6)) < 1e-5, n


def test_frozen_parameters_untouched_and_unhooked():
    torch.manual_seed(0)
    m = TinyTransformerClassifier()
    m.emb.requires_grad_(False)
    o = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    m, o, l = anadp.make_private(m, o, DataLoader(make_data(), batch_size=16), noise_multiplier=1.0,
                                 max_grad_norm=1.0, seed=0)
    assert all(layer.module is not m.emb for layer in o.engine.layers)
    emb, head = m.emb.weight.clone(), m.head.weight.clone()
    for x, y in l:
        o.zero_grad()
        if len(x):
            F.cross_entropy(m(x), y).backward()
        o.step()
    assert torch.equal(emb, m.emb.weight) and m.emb.weight.grad is None
    assert not torch.equal(head, m.head.weight)


def test_parameters_on_different_devices():
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2, device="meta"))
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"several devices \(\['cpu', 'meta'\]\)"):
        anadp.make_private(m, o, DataLoader(make_data(), batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("kw,match", [
    (dict(noise_multiplier=-0.1), "noise_multiplier must be >= 0"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be > 0"),
    (dict(loss_reduction="avg"), "loss_reduction"),
    (dict(clipping="per_sample"), "clipping"),
    (dict(allocation="adaptive"), "allocation"),
    (dict(accountant="moments"), "accountant"),
    (dict(noise_multiplier=None), "either noise_multiplier or target_epsilon"),
    (dict(noise_multiplier=None, target_epsilon=1.0), "target_delta and epochs"),
    (dict(noise_multiplier=None, target_epsilon=1e-4, target_delta=1e-5, epochs=1, accountant="rdp"),
     "cannot be reached"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        private(**kw)


def test_zero_noise_warns_and_reports_infinite_epsilon():
    m, o, l = make_setup("sgd")
    with pytest.warns(UserWarning, match="no privacy"):
        m, o, l = anadp.make_private(m, o, l, noise_multiplier=0.0, max_grad_norm=1.0)
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    o.step()
    assert o.privacy_spent(1e-5) == float("inf")


def test_step_without_backward():
    m, o, l = private(poisson_sampling=False)
    with pytest.raises(RuntimeError, match="without a backward pass"):
        o.step()


def test_optimizer_with_foreign_parameters():
    m, _, l = make_setup("sgd")
    other = nn.Linear(3, 3)
    o = torch.optim.SGD(list(m.parameters()) + list(other.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="does not own"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("change", ["unfreeze", "replace", "freeze"])
def test_changing_the_model_after_wrapping(change):
    torch.manual_seed(0)
    m = TinyTransformerClassifier()
    m.emb.requires_grad_(False)
    o = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m, o, l = anadp.make_private(m, o, DataLoader(make_data(), batch_size=16), noise_multiplier=1.0,
                                 max_grad_norm=1.0, poisson_sampling=False, seed=0)
    if change == "unfreeze":
        m.emb.requires_grad_(True)
    elif change == "replace":
        m.head = nn.Linear(8, 3)
    else:
        m.fc1.requires_grad_(False)
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="changed after make_private"):
        o.step()


def test_a_forward_that_builds_module_lists_is_no_change_of_the_model():
    """Llama's forward slices its ModuleList (a new list that registers the layers): registrations outside the
    private model do not count as changes of it (each would make the step walk the model, and under torch.compile
    recompile the forward); a registration on the model does (test_changing_the_model_after_wrapping)."""
    from anadp import engine
    m = TinyTransformerClassifier()
    m, o, _ = anadp.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                                 DataLoader(make_data(), batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0,
                                 poisson_sampling=False, seed=0)
    before = engine._registrations
    nn.ModuleList([m.head])[:1]  # what Llama's forward does with its layers
    assert engine._registrations == before
    m.extra = nn.Linear(2, 2)
    assert engine._registrations > before


def test_half_precision_overflow_is_counted():
    """float16 activations overflow for one sample: it is dropped and counted, the step stays finite."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).half()
    with torch.no_grad():
        m[0].weight.fill_(0.5)
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(16, 4).half()
    x[5] = 6e4  # 4 * 0.5 * 6e4 overflows float16 (max 65504)
    data = torch.utils.data.TensorDataset(x, torch.zeros(16, dtype=torch.long))
    m, o, l = anadp.make_private(m, o, DataLoader(data, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0,
                                 poisson_sampling=False, seed=0, nonfinite="skip")
    xb, yb = next(iter(l))
    with pytest.warns(UserWarning, match="1 of 16 samples"):
        F.cross_entropy(m(xb).float(), yb).backward()
        o.step()
    assert o.skipped_samples == 1
    assert all(torch.isfinite(p).all() and p.dtype == torch.float16 for p in m.parameters())


def test_a_parameter_group_added_after_wrapping_is_refused_at_the_step():
    torch.manual_seed(0)
    m = TinyTransformerClassifier()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    m, o, l = anadp.make_private(m, o, DataLoader(make_data(), batch_size=16), noise_multiplier=1.0,
                                 max_grad_norm=1.0, poisson_sampling=False, seed=0)
    extra = nn.Parameter(torch.zeros(3))
    o.original_optimizer.add_param_group({"params": [extra]})
    x, y = next(iter(l))
    (F.cross_entropy(m(x), y) + extra.sum()).backward()
    with pytest.raises(RuntimeError, match="add_param_group"):
        o.step()
    assert torch.equal(extra.detach(), torch.zeros(3))


def test_a_second_forward_before_the_backward_is_named_as_such():
    """Two forwards with gradients, then the first one's backward: the error says so, not batch_first."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    m, o, l = anadp.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), DataLoader(data, batch_size=16),
                                 noise_multiplier=1.0, max_grad_norm=1.0, seed=0, poisson_sampling=False)
    x, y = next(iter(l))
    out = m(x)
    m(x[:5])  # an evaluation forward with gradients enabled
    with pytest.raises(anadp.BatchMismatchError, match="2 forwards with gradients enabled since the last backward"):
        F.cross_entropy(out, y).backward()

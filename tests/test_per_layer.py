"""Per-layer clipping (clipping="per_layer"): a float64 brute-force reference (per-sample autograd,
each noise group clipped to its own C_g), the noise of each group, the accountant, adaptive
thresholds, backends, resume, and misuse."""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import anadp
from anadp.clipping import AdaptiveClipping
from helpers import per_sample_grads, rel_err
from models import make_setup


# --- models of the engine tests, float64 ------------------------------------------------

def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    cfg = RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=20, num_labels=3, pad_token_id=1)
    return RobertaForSequenceClassification(cfg).double().eval(), "cls"


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    m = GPT2LMHeadModel(cfg).double().eval()
    assert m.lm_head.weight is m.transformer.wte.weight  # tied: complete after the embedding's backward
    return m, "lm"


def _lora():
    from peft import LoraConfig, get_peft_model
    m, kind = _roberta()
    m = get_peft_model(m, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                     modules_to_save=["classifier"]))
    with torch.no_grad():  # LoRA B starts at zero: make every factor's gradient non-trivial
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return m.double().eval(), kind


def _data(n=8, T=7, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for i in range(0, n, 3):  # some padded samples
        mask[i, T - 2 - i % 3:] = 0
        ids[i, T - 2 - i % 3:] = 1
    return ids, mask, torch.arange(n)


def _sample_loss(kind, R):
    """Per-sample loss of sample s: a fixed random projection of its logits (every group gets a
    gradient); the batch loss sums or averages them."""
    def loss(out, sid):
        logits = out.logits
        if kind == "lm":
            logits = logits[:, :-1]
        return (logits * R[sid].to(logits.dtype)).flatten(1).sum(1)
    return loss


def _reference_step(ref, opt_ref, samples, thresholds, group_of, feed, denom, kind, R):
    """One per-layer clipped DP step at noise 0 by per-sample autograd, in float64."""
    ids, mask, sid = samples
    loss = _sample_loss(kind, R)
    grads = per_sample_grads(ref, {"input_ids": ids, "attention_mask": mask}, lambda out, i: loss(out, sid[i:i + 1]).sum(), len(sid))
    names = list(grads)
    sq = {}
    for n in names:
        g = group_of[n]
        sq[g] = sq.get(g, 0) + grads[n].flatten(1).pow(2).sum(1)
    c = {g: (thresholds[g] / (s.sqrt() + 1e-6)).clamp(max=1.0) for g, s in sq.items()}
    params = dict(ref.named_parameters())
    for n in names:
        g = group_of[n]
        params[n].grad = torch.einsum("b,b...->...", c[g], grads[n]) * feed[g] / denom
    opt_ref.step()


def _call(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("make", [_roberta, _gpt2, _lora], ids=["roberta", "gpt2-tied", "lora"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("together", [True, False, "one-sample-at-a-time"],
                         ids=["groups-together", "each-group-alone", "alone-one-sample-at-a-time"])
def test_per_layer_step_equals_brute_force(make, reduction, opt, together, monkeypatch):
    """Two steps, two physical chunks per logical batch, unequal thresholds (a dict) and planted
    noise scales (anadp feeds grad_g / w_g): parameters equal the reference to ~1e-12, whether the
    complete groups are clipped together (these small models: all of them at the end of the
    backward) or each in its own layer's hook (CLIP_BATCH = 0, what large layers do: a weight kept
    as (A, G) then takes LinearRecord.one_pass, its per-sample gradients formed a chunk at a time,
    here also one sample at a time)."""
    one_pass = []
    if together is not True:
        from anadp.records import LinearRecord
        original = LinearRecord.one_pass
        monkeypatch.setattr(LinearRecord, "one_pass", lambda self, *a, **k: one_pass.append(1) or original(self, *a, **k))
        if together == "one-sample-at-a-time":
            monkeypatch.setattr(LinearRecord, "ONE_PASS_CHUNK", 1)
    torch.manual_seed(0)
    model, kind = make()
    ref = copy.deepcopy(model)
    start = torch.cat([p.detach().flatten() for p in ref.parameters()])
    ids, mask, sid = _data()
    T = ids.shape[1] - (1 if kind == "lm" else 0)
    out_dim = model.config.vocab_size if kind == "lm" else 3
    shape = (len(sid), T, out_dim) if kind == "lm" else (len(sid), out_dim)
    R = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    make_opt = ((lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9)) if opt == "sgd"
                else (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)))
    o = make_opt([p for p in model.parameters() if p.requires_grad])
    o_ref = make_opt([p for p in ref.parameters() if p.requires_grad])
    loader = DataLoader(TensorDataset(ids, mask, sid), batch_size=4)
    model, dp, loader = anadp.make_private(model, o, loader, noise_multiplier=0.0, max_grad_norm=1.0,
                                           clipping="per_layer", allocation="anadp", poisson_sampling=False,
                                           loss_reduction=reduction, seed=0, max_physical_batch_size=2,
                                           backend="torch")
    if together is not True:
        dp.accumulator.CLIP_BATCH = 0
    g = torch.Generator().manual_seed(2)
    names = dp.group_names + (["<rest>"] if dp.clip.has_rest else [])
    C = {n: float(v) for n, v in zip(names, torch.rand(len(names), generator=g, dtype=torch.float64) * 0.2 + 0.01)}
    planted = dp.clip.thresholds.clone()
    planted[:len(names)] = torch.tensor(list(C.values()), dtype=torch.float64)
    dp.clip.thresholds = planted
    dp.allocator.group_scales = torch.rand(dp.allocator.n_groups, generator=g, dtype=torch.float64) + 0.5
    dp.allocator.config.warmup_steps = 100  # the planted scales hold
    w = dp.allocator.scales
    pname = {p: n for n, p in model.named_parameters()}
    group_of, feed = {}, {}
    for i, p in enumerate(dp.params):
        col = dp.accumulator.col[i]
        group_of[pname[p]] = col
        feed[col] = 1.0 / float(w[i])
    thresholds = dict(enumerate(dp.clip.thresholds.tolist()))
    loss = _sample_loss(kind, R)
    dp.accumulator.RELEASE_BATCH = 1  # each layer released in its own hook
    chunk, steps, released_in_hooks = [], 0, 0
    for ids_b, mask_b, sid_b in loader:
        dp.zero_grad()
        per = loss(_call(model, ids_b, mask_b), sid_b)
        (per.sum() if reduction == "sum" else per.mean()).backward()
        if dp.accumulator.hook_plan is not None:  # the last chunk: every group released by the end of the backward
            dp.engine.flush()
            assert dp.accumulator.hook_plan.released == set(range(len(dp.params))) and not dp.engine._records
            released_in_hooks += 1
        chunk.append((ids_b, mask_b, sid_b))
        dp.step()
        if dp.stepped:
            samples = tuple(torch.cat(t) for t in zip(*chunk))
            denom = dp.expected_batch_size if reduction == "mean" else 1.0
            _reference_step(ref, o_ref, samples, thresholds, group_of, feed, denom, kind, R)
            chunk, steps = [], steps + 1
    assert steps == released_in_hooks == 2
    # LoRA's factors are narrow (r = 2): their per-sample gradients are formed in the backward, no (A, G) kept
    assert (len(one_pass) > 0) == (together is not True and make is not _lora)
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    want = torch.cat([p.detach().flatten() for p in ref.parameters()])
    assert rel_err(got - start, want - start) < 1e-10
    assert rel_err(got, want) < 1e-12


def _train(dp, model, loader, steps):
    it, done = iter(loader), 0
    while done < steps:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        dp.zero_grad()
        F.cross_entropy(model(x), y).backward()
        dp.step()
        done += int(dp.stepped)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_cpu_backend_in_the_hooks_equals_torch(opt, adaptive):
    """The cpu backend's fused noise + update in each layer's hook = the torch path (noise drawn)."""
    out = {}
    for backend in ("torch", "cpu"):
        m, o, l = make_setup(opt)
        m, dp, l = anadp.make_private(m, o, l, noise_multiplier=0.7, max_grad_norm=1.0, clipping="per_layer",
                                      seed=3, backend=backend, adaptive_clipping=adaptive,
                                      max_physical_batch_size=8)
        _train(dp, m, l, 6)
        out[backend] = (_flat(m), dp.clip.thresholds.clone(), dp.privacy_spent(1e-5))
    (a, ta, ea), (b, tb, eb) = out["torch"], out["cpu"]
    assert rel_err(b, a) < 1e-5
    assert rel_err(tb, ta) < 1e-6 and ea == eb
    if adaptive:
        assert not torch.allclose(ta, torch.full_like(ta, float(ta[0])))  # the thresholds moved apart


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_with_no_sample_clipped_it_is_whitened_uniform_dp(backend):
    """Thresholds no sample reaches (C_g = C / sqrt(G), K = C): per-layer and whitened clipping are then
    the same mechanism, sum of the gradients plus noise sigma C, drawn from the same streams: the runs
    agree bit for bit, noise on, over physical chunks and Adam's steps (the in-hook noise and update
    against step()'s)."""
    if backend == "cpu" and anadp.backends.why_unavailable("cpu", torch.device("cpu")) is not None:
        pytest.skip("the cpu backend's kernel is not built here")
    out = {}
    for clipping in ("whitened", "per_layer"):
        m, o, l = make_setup("adamw")
        m, dp, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1e4, clipping=clipping,
                                      allocation="uniform", seed=3, backend=backend, max_physical_batch_size=4)
        _train(dp, m, l, 5)
        assert dp.last_clip_factors is None or bool((dp.last_clip_factors == 1).all())
        out[clipping] = _flat(m)
    assert torch.equal(out["whitened"], out["per_layer"])
    m, _, _ = make_setup("adamw")
    assert rel_err(out["per_layer"], _flat(m)) > 1e-3  # the steps moved the parameters


def test_noise_of_each_group_has_std_sigma_w_K():
    """Zero gradients, SGD lr 1: the update is minus the noise over the batch, times the feed.
    Group g's noise std is sigma * w_g * K, K = sqrt(sum_h (C_h / w_h)^2) (paper: feed 1). Each
    group has n >= 1024 coordinates; the sample std's relative error is ~1/sqrt(2n) <= 2.2%:
    bound 5 standard errors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))
    x = torch.randn(64, 32)
    loader = DataLoader(TensorDataset(x), batch_size=16)
    o = torch.optim.SGD(model.parameters(), lr=1.0)
    sigma = 0.8
    model, dp, loader = anadp.make_private(model, o, loader, noise_multiplier=sigma, clipping="per_layer",
                                           max_grad_norm=[0.3, 0.5, 0.4], allocation="paper", seed=1)
    dp.allocator.group_scales = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    (xb,) = next(iter(loader))
    dp.zero_grad()
    (model(xb) * 0).sum().backward()
    dp.step()
    C = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)
    K = float((C / dp.allocator.group_scales).square().sum().sqrt())
    for i, (p, p0) in enumerate(zip(model.parameters(), before)):
        w = float(dp.allocator.scales[i])
        noise = (p0 - p.detach()).double() * dp.expected_batch_size
        want = sigma * w * K
        n = noise.numel()
        if n < 1024:
            continue  # biases: too few coordinates for a tight bound
        assert abs(float(noise.std()) / want - 1) < 5 / math.sqrt(2 * n), i


def test_accountant_is_charged_sigma_as_uniform_dp():
    """Per-layer clipping with fixed thresholds is charged the gradient's multiplier sigma; with
    adaptive thresholds the gradient gets sigma_g and the counts z_b with sigma_g^-2 + z_b^-2 =
    sigma^-2, and the accountant is charged sigma: both equal Opacus's accountant at sigma."""
    from opacus.accountants import PRVAccountant
    sigma, steps = 0.9, 5
    for adaptive in (False, True):
        m, o, l = make_setup("adamw")
        m, dp, l = anadp.make_private(m, o, l, noise_multiplier=sigma, max_grad_norm=1.0, clipping="per_layer",
                                      seed=0, adaptive_clipping=adaptive)
        _train(dp, m, l, steps)
        g, z = dp.gradient_noise_multiplier, dp.clip.noise_multipliers(sigma)[1]
        if adaptive:
            assert g > sigma and z > sigma
            assert math.isclose(g ** -2 + z ** -2, sigma ** -2, rel_tol=1e-12)
        else:
            assert g == sigma and z == 0
        ref = PRVAccountant()
        for _ in range(steps):
            ref.step(noise_multiplier=sigma, sample_rate=dp.sample_rate)
        assert dp.accountant.steps == steps
        assert math.isclose(dp.privacy_spent(1e-5), ref.get_epsilon(1e-5), rel_tol=1e-9)


@pytest.mark.parametrize("fixed_total", [False, True])
def test_adaptive_thresholds_follow_the_quantile_update(fixed_total):
    """sigma = 0 (no count noise): C_g <- C_g exp(-eta (b_g - gamma)), b_g the group's unclipped
    fraction over the expected batch, exactly (with fixed_total, then rescaled to the initial
    sqrt(sum_g C_g^2)); and a released count is one per group."""
    m, o, l = make_setup("sgd", batch_size=16)
    start = copy.deepcopy(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, dp, l = anadp.make_private(m, o, l, noise_multiplier=0.0, max_grad_norm=1.0, clipping="per_layer",
                                      seed=0, poisson_sampling=False,
                                      adaptive_clipping=AdaptiveClipping(target_quantile=0.3, learning_rate=0.5,
                                                                         fixed_total=fixed_total))
    x, y = next(iter(l))
    C0 = dp.clip.thresholds.clone()
    dp.zero_grad()
    F.cross_entropy(m(x), y).backward()
    dp.step()
    ref = per_sample_grads(start, x, lambda out, i: F.cross_entropy(out, y[i:i + 1]), len(y))
    pname = {p: n for n, p in m.named_parameters()}
    sq = torch.zeros(dp.clip.n_groups, len(y), dtype=torch.float64)
    for i, p in enumerate(dp.params):
        sq[dp.accumulator.col[i]] += ref[pname[p]].flatten(1).pow(2).sum(1).double()
    b = (sq.sqrt() <= C0[:, None]).double().sum(1) / dp.expected_batch_size
    want = (C0 * torch.exp(-0.5 * (b - 0.3))).clamp_min(1e-6)
    if fixed_total:
        want = torch.where(C0 > 0, want * C0.norm() / want[C0 > 0].norm(), want)
        assert math.isclose(dp.clip.total, float(C0.norm()), rel_tol=1e-12)
    assert rel_err(dp.clip.thresholds, want) < 1e-12
    assert dp.clip.last_released_counts.shape == (dp.clip.n_groups,)


def test_resume_is_bit_identical_with_adaptive_thresholds():
    def run(split):
        m, o, l = make_setup("adamw", seed=2)
        m, dp, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, clipping="per_layer",
                                      seed=5, adaptive_clipping=True, allocation="anadp",
                                      allocation_config=anadp.AllocationConfig(warmup_steps=2))
        if not split:
            _train(dp, m, l, 8)
            return _flat(m), dp.clip.thresholds
        _train(dp, m, l, 4)
        buf = io.BytesIO()
        torch.save({"model": m.state_dict(), "opt": dp.state_dict()}, buf)
        m2, o2, l2 = make_setup("adamw", seed=7)
        m2, dp2, l2 = anadp.make_private(m2, o2, l2, noise_multiplier=1.0, max_grad_norm=1.0, clipping="per_layer",
                                         seed=5, adaptive_clipping=True, allocation="anadp",
                                         allocation_config=anadp.AllocationConfig(warmup_steps=2))
        buf.seek(0)
        state = torch.load(buf, weights_only=False)
        m2.load_state_dict(state["model"])
        dp2.load_state_dict(state["opt"])
        _train(dp2, m2, l2, 4)
        return _flat(m2), dp2.clip.thresholds
    (a, ta), (b, tb) = run(False), run(True)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    # adaptive_clipping=True moves the shares of a fixed total (max_grad_norm = 1)
    assert math.isclose(float(ta.norm()), 1.0, rel_tol=1e-12) and float(ta[ta > 0].std()) > 0


def test_a_checkpoint_of_fixed_thresholds_refuses_other_thresholds():
    m, o, l = make_setup("sgd")
    m, dp, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, clipping="per_layer", seed=0)
    _train(dp, m, l, 1)
    state = dp.state_dict()
    m2, o2, l2 = make_setup("sgd")
    m2, dp2, l2 = anadp.make_private(m2, o2, l2, noise_multiplier=1.0, clipping="per_layer", seed=0,
                                     max_grad_norm={"emb": 0.5, "fc1": 0.5, "fc2": 0.5, "head": 0.5, "<rest>": 0.5})
    with pytest.raises(ValueError, match="other privacy settings"):
        dp2.load_state_dict(state)


def test_misuse_is_refused():
    m, o, l = make_setup("sgd")
    with pytest.raises(ValueError, match="5 noise groups"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=[1.0, 1.0], clipping="per_layer")
    m, o, l = make_setup("sgd")
    with pytest.raises(ValueError, match="unknown groups"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm={"nope": 1.0}, clipping="per_layer")
    m, o, l = make_setup("sgd")
    with pytest.raises(ValueError, match="use it with clipping='per_layer'"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, adaptive_clipping=True)
    m, o, l = make_setup("sgd")
    with pytest.raises(ValueError, match="allocation='clip'"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, clipping="per_layer",
                           allocation="clip")
    m, o, l = make_setup("sgd")
    m, dp, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, clipping="per_layer", seed=0)
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        dp.zero_grad()
    x, y = next(iter(l))
    with pytest.raises(RuntimeError, match="without optimizer.step"):
        F.cross_entropy(m(x), y).backward()


def test_nonfinite_samples_are_dropped_per_group():
    m, o, l = make_setup("sgd")
    m, dp, l = anadp.make_private(m, o, l, noise_multiplier=0.5, max_grad_norm=1.0, clipping="per_layer",
                                  seed=0, nonfinite="skip")
    x, y = next(iter(l))
    out = m(x)
    scale = torch.ones(len(y), 1)
    scale[3] = float("nan")
    with pytest.warns(UserWarning, match="dropped from the step"):
        F.cross_entropy(out * scale, y).backward()
        dp.step()
    assert dp.skipped_samples == 1
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_audit_stays_below_the_claim():
    from anadp.apps.audit import run_audit
    res = run_audit(target_epsilon=2.0, seed=0, clipping="per_layer")
    assert res.epsilon_accountant <= 2.0 + 1e-9
    assert res.epsilon_lower_bound < res.epsilon_accountant

"""Backend dispatch, and whole training runs on the Triton backend against the torch
backend (interpreted on the CPU without a GPU)."""
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from anadp import make_private
from anadp.allocation import AllocationConfig
from anadp.backends import BackendUnavailableError, resolve, why_unavailable
from helpers import rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_auto_on_the_cpu_is_the_compiled_kernel_and_the_environment_wins(monkeypatch):
    monkeypatch.delenv("ANADP_BACKEND", raising=False)
    assert resolve("auto", torch.device("cpu")) == ("cpu" if why_unavailable("cpu") is None else "torch")
    monkeypatch.setenv("ANADP_BACKEND", "torch")
    assert resolve("triton", torch.device("cpu")) == "torch"


def test_unavailable_backends_say_why(monkeypatch):
    monkeypatch.delenv("ANADP_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="triton kernels need CUDA tensors"):
        resolve("triton", torch.device("cpu"))
    if why_unavailable("cuda") is not None:
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
            resolve("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        resolve("tpu", torch.device("cpu"))
    monkeypatch.setenv("ANADP_BACKEND", "cuda")
    model = torch.nn.Linear(3, 2)
    dl = DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4)
    if why_unavailable("cuda", torch.device("cpu")) is not None:
        with pytest.raises(BackendUnavailableError, match="needs CUDA tensors|not built"):
            make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), dl, max_grad_norm=1.0,
                         noise_multiplier=1.0)


@pytest.fixture(autouse=True)
def every_kernel(monkeypatch):
    """These tests exercise each backend's kernels: all of them, whatever anadp.kernel_choice's measured
    table picks for the step (tested in test_kernel_choice.py)."""
    monkeypatch.setenv("ANADP_KERNELS", "all")


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=3))


def _gpt2():
    from transformers import GPT2Config, GPT2ForSequenceClassification
    return GPT2ForSequenceClassification(GPT2Config(
        vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1))


def _train(make, optimizer, steps=3, physical=None, autocast=False, allocation="anadp", keep_last_grad=False,
           sigma=0.05, **private):
    torch.manual_seed(0)
    model = make().to(DEV)
    X, Y = torch.randint(1, 50, (40, 7)), torch.randint(0, 3, (40,))
    dl = DataLoader(TensorDataset(X, Y), batch_size=10)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01) if optimizer == "adamw"
           else torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.01) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    # sigma 0.05: anadp's statistics measurable on these tiny models, so its scales move and are compared
    model, opt, dl = make_private(model, opt, dl, max_grad_norm=0.5, noise_multiplier=sigma, seed=3, allocation=allocation,
                                  allocation_config=AllocationConfig(warmup_steps=1), max_physical_batch_size=physical,
                                  **private)
    it = iter(dl)
    while opt.step_count < steps:
        x, y = next(it)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x.to(DEV)).logits, y.to(DEV))
        loss.backward()
        opt.step()
        if not (keep_last_grad and opt.step_count == steps):
            opt.zero_grad()
    return torch.cat([p.detach().float().flatten() for p in model.parameters()]), opt


@pytest.mark.parametrize("make,optimizer,allocation", [(_bert, "adamw", "anadp"), (_gpt2, "adamw", "paper"),
                                                       (_bert, "sgd", "anadp")])
def test_three_steps_on_triton_equal_torch(monkeypatch, make, optimizer, allocation):
    """The allocation on (warm-up 1 step, so the scales move and feed back), noise on; anadp reads
    grad^2 / the first moment, paper |p * grad| from the kernels."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ANADP_BACKEND", "torch")
    ref, o_ref = _train(make, optimizer, allocation=allocation)
    monkeypatch.setenv("ANADP_BACKEND", "triton")
    out, o = _train(make, optimizer, allocation=allocation)
    assert o.backend == "triton" and o._fused_update
    assert rel_err(out, ref) < 1e-5
    assert o.accountant.history == o_ref.accountant.history
    scales = torch.tensor(list(o.noise_scales.values()))
    # the scales come out of a numerical maximization, which magnifies the statistics' float rounding
    assert (scales != 1).any() and rel_err(scales, torch.tensor(list(o_ref.noise_scales.values()))) < 1e-4
    # the torch optimizer's state is torch's own: a torch-backend step can continue from it
    assert all(float(o.original_optimizer.state[p]["step"]) == 3 for p in o.params) if optimizer == "adamw" else True


@pytest.mark.parametrize("make,optimizer,allocation", [(_bert, "adamw", "anadp"), (_gpt2, "adamw", "paper"),
                                                       (_bert, "sgd", "anadp"), (_bert, "adamw", "uniform")])
def test_three_steps_on_cpu_equal_torch(monkeypatch, make, optimizer, allocation):
    """The cpu backend's compiled fused update (noise, scaling, statistic, optimizer in one call) is the
    torch path's arithmetic: parameters, accountant, scales and p.grad (the privatized gradient) agree."""
    if why_unavailable("cpu", torch.device("cpu")) is not None or DEV != "cpu":
        pytest.skip("the cpu backend's kernel is not built here, or the tensors are on a GPU")
    monkeypatch.setenv("ANADP_BACKEND", "torch")
    ref, o_ref = _train(make, optimizer, allocation=allocation, keep_last_grad=True)
    monkeypatch.setenv("ANADP_BACKEND", "cpu")
    out, o = _train(make, optimizer, allocation=allocation, keep_last_grad=True)
    assert o.backend == "cpu" and o._fused_update
    assert rel_err(out, ref) < 1e-6
    assert o.accountant.history == o_ref.accountant.history
    scales = torch.tensor(list(o.noise_scales.values()))
    assert rel_err(scales, torch.tensor(list(o_ref.noise_scales.values()))) < 1e-4
    assert (scales != 1).any() == (allocation != "uniform")
    grads = [p.grad for p in o.params]
    assert all(g is not None for g in grads)
    assert rel_err(torch.cat([g.flatten() for g in grads]), torch.cat([p.grad.flatten() for p in o_ref.params])) < 1e-5


@pytest.mark.parametrize("correction", [False, True])
def test_adam_with_l2_decay_on_cpu_equals_torch(monkeypatch, correction):
    """torch.optim.Adam (L2 weight decay: the update's other two branches, adam_as<false, *>), with and
    without the noise correction, in the cpu backend's SIMD update against the torch path; sigma 1, where
    the correction changes the step by far more than the backends differ."""
    if why_unavailable("cpu", torch.device("cpu")) is not None or DEV != "cpu":
        pytest.skip("the cpu backend's kernel is not built here, or the tensors are on a GPU")
    monkeypatch.setenv("ANADP_BACKEND", "torch")
    ref, _ = _train(_bert, "adam", sigma=1.0, adam_noise_correction=correction)
    other, _ = _train(_bert, "adam", sigma=1.0, adam_noise_correction=not correction)
    monkeypatch.setenv("ANADP_BACKEND", "cpu")
    out, o = _train(_bert, "adam", sigma=1.0, adam_noise_correction=correction)
    assert o.backend == "cpu" and o._fused_update and isinstance(o.original_optimizer, torch.optim.Adam)
    assert rel_err(out, ref) < 1e-5 and rel_err(other, ref) > 1e-3


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("make,optimizer", [(_gpt2, "adamw"), (_bert, "sgd")])
def test_per_layer_clipping_in_the_hooks_equals_torch(monkeypatch, backend, make, optimizer):
    """Per-layer clipping with adaptive thresholds, every layer released in its own hook (the kernel
    backends' noise + update inside the backward) against the torch path, two chunks per batch."""
    if backend == "triton":
        pytest.importorskip("triton")
    elif why_unavailable("cpu", torch.device("cpu")) is not None or DEV != "cpu":
        pytest.skip("the cpu backend's kernel is not built here, or the tensors are on a GPU")
    from anadp.per_layer import PerLayerAccumulator
    monkeypatch.setattr(PerLayerAccumulator, "RELEASE_BATCH", 1)
    kw = dict(clipping="per_layer", adaptive_clipping=True, physical=5)
    monkeypatch.setenv("ANADP_BACKEND", "torch")
    ref, o_ref = _train(make, optimizer, **kw)
    monkeypatch.setenv("ANADP_BACKEND", backend)
    out, o = _train(make, optimizer, **kw)
    assert o.backend == backend and o._fused_update
    assert rel_err(out, ref) < 1e-5
    assert o.accountant.history == o_ref.accountant.history
    assert rel_err(o.clip.thresholds, o_ref.clip.thresholds) < 1e-6


def test_bf16_autocast_on_triton_equals_torch(monkeypatch):
    """float32 weights, bf16 activations and output gradients: the 16-bit clipped sums of
    biases and norms join float32 accumulators on both backends (the fused step refused them)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ANADP_BACKEND", "torch")
    ref, _ = _train(_bert, "adamw", autocast=True)
    monkeypatch.setenv("ANADP_BACKEND", "triton")
    out, o = _train(_bert, "adamw", autocast=True)
    assert o._fused_update and all(p.dtype == torch.float32 for p in o.params)
    assert rel_err(out, ref) < 1e-5  # the same bf16 forward on both; only float32 sums differ in order


def test_split_logical_batches_use_the_prior_sum(monkeypatch):
    """Physical batches of 4 inside logical batches of ~10: the GEMM kernel adds the earlier chunks' sum."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ANADP_BACKEND", "torch")
    ref, _ = _train(_bert, "adamw", steps=2, physical=4)
    monkeypatch.setenv("ANADP_BACKEND", "triton")
    out, _ = _train(_bert, "adamw", steps=2, physical=4)
    assert rel_err(out, ref) < 1e-5


def test_optimizer_without_a_kernel_falls_back_with_a_warning(monkeypatch):
    pytest.importorskip("triton")
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).to(DEV)
    dl = DataLoader(TensorDataset(torch.randn(16, 5), torch.randint(0, 2, (16,))), batch_size=8)
    with pytest.warns(UserWarning, match="RMSprop.*the update runs in torch"):
        _, opt, _ = make_private(model, torch.optim.RMSprop(model.parameters()), dl, max_grad_norm=1.0,
                                 noise_multiplier=1.0, backend="triton")
    assert opt.norm_kernels is not None and not opt._fused_update
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, opt, _ = make_private(model, torch.optim.Adam(model.parameters()), dl, max_grad_norm=1.0,
                                 noise_multiplier=1.0, backend="torch")
    assert opt.norm_kernels is None and not opt._fused_update


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_checkpoint_of_a_fused_run_resumes_bit_identical(tmp_path, backend):
    """Optimizer state written by the kernels (float32 moments, step counters), allocation
    and noise counter survive a checkpoint: 2 steps + save + load + 2 steps == 4 steps."""
    pytest.importorskip("triton")
    from anadp import load_checkpoint, save_checkpoint

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(30, 8), torch.nn.Flatten(), torch.nn.Linear(40, 3)).to(DEV)
        dl = DataLoader(TensorDataset(torch.randint(0, 30, (60, 5)), torch.randint(0, 3, (60,))), batch_size=12)
        return make_private(model, torch.optim.AdamW(model.parameters(), lr=1e-2), dl, max_grad_norm=1.0,
                            noise_multiplier=1.0, seed=5, backend=backend,
                            allocation_config=AllocationConfig(warmup_steps=1))

    def run(model, opt, dl, steps):
        it = iter(dl)
        while opt.step_count < steps:
            x, y = next(it)
            torch.nn.functional.cross_entropy(model(x.to(DEV)), y.to(DEV)).backward()
            opt.step()
            opt.zero_grad()

    model, opt, dl = setup()
    run(model, opt, dl, 4)
    ref = torch.cat([p.detach().flatten() for p in model.parameters()])
    model, opt, dl = setup()
    run(model, opt, dl, 2)
    save_checkpoint(str(tmp_path / "ck.pt"), model, opt)
    model, opt, dl = setup()
    load_checkpoint(str(tmp_path / "ck.pt"), model, opt)
    assert opt._fused_update == (backend == "triton") and opt.step_count == 2
    run(model, opt, dl, 4)
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), ref)


def test_fused_step_launches_one_gemm_per_linear_weight_and_one_multi_tensor_kernel(monkeypatch):
    pytest.importorskip("triton")
    from anadp.kernels import fused_linear, multi_tensor
    calls = {"gemm": 0, "multi": 0}
    for K, name, key in ((fused_linear, "clipped_linear_update", "gemm"), (multi_tensor, "multi_tensor_update", "multi")):
        real = getattr(K, name)

        def counted(*a, _real=real, _key=key, **kw):
            calls[_key] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(K, name, counted)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2)).to(DEV)
    dl = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 2, (16,))), batch_size=8)
    model, opt, dl = make_private(model, torch.optim.Adam(model.parameters()), dl, max_grad_norm=1.0,
                                  noise_multiplier=1.0, backend="triton")
    x, y = next(iter(dl))
    torch.nn.functional.cross_entropy(model(x.to(DEV)), y.to(DEV)).backward()
    opt.step()
    # 2 Linear weights in the GEMM kernel; 2 biases + LayerNorm weight and bias in one multi-tensor launch
    assert calls == {"gemm": 2, "multi": 1}
    assert all(p.grad is None for p in model.parameters())  # the update never goes through .grad


def test_gpt2_lm_with_tied_head_on_triton_equals_torch(monkeypatch):
    """wte is both the token embedding and the LM head: two records, so its norm takes the
    cross term in torch and its update goes through the multi-tensor kernel."""
    pytest.importorskip("triton")
    from transformers import GPT2Config, GPT2LMHeadModel

    def run(backend):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                           bos_token_id=1, eos_token_id=1, loss_type="ForCausalLM")).to(DEV)
        dl = DataLoader(TensorDataset(torch.randint(1, 50, (40, 7))), batch_size=10)
        model, opt, dl = make_private(model, torch.optim.AdamW(model.parameters(), lr=1e-2), dl, max_grad_norm=0.5,
                                      noise_multiplier=1.0, seed=3, backend=backend,
                                      allocation_config=AllocationConfig(warmup_steps=1))
        it = iter(dl)
        while opt.step_count < 3:
            (x,) = next(it)
            model(input_ids=x.to(DEV), labels=x.to(DEV)).loss.backward()  # equal lengths: token mean = sample mean
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert rel_err(run("triton"), run("torch")) < 1e-5


def test_an_old_triton_is_refused_with_the_reason(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    assert "older than 3.6" in why_unavailable("triton", torch.device("cpu"))
    monkeypatch.setattr(triton, "__version__", "3.10.0+git1234")  # 3.10 > 3.6, not "3.1"
    assert why_unavailable("triton", torch.device("cpu")) is None


def test_info_lists_every_backend_and_why_not(capsys, monkeypatch):
    from anadp.cli import main
    monkeypatch.delenv("ANADP_BACKEND", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend torch   available" in out
    for name in ("triton", "cuda"):
        why = why_unavailable(name)
        assert f"backend {name:7s} " + ("available" if why is None else f"unavailable: {why}") in out
    assert f"auto on {'cuda' if torch.cuda.is_available() else 'cpu'}: " in out


def test_every_backend_implements_what_it_claims():
    """The registry's backends against the written interface: each capability it sets is a method
    it overrides; names match the registry."""
    from anadp import backends
    base = backends.Backend
    for name in backends.BACKENDS:
        b = backends.get(name)
        assert b.name == name and isinstance(b, base)
        claimed = {"add_noise_": True, "linear_sq_norms": b.norms, "embedding_sq_norms": b.norms,
                   "multi_tensor_update": b.fused_update, "clipped_linear_update": b.fused_gemm}
        for method, claims in claimed.items():
            overridden = getattr(type(b), method) is not getattr(base, method)
            assert overridden or (method == "add_noise_" and b.fused_update) or not claims, (name, method)


@pytest.mark.parametrize("backend", ["triton", "cpu", "cuda"])
@pytest.mark.parametrize("clipping", ["whitened", "per_layer"])
def test_adam_noise_correction_on_kernels_equals_torch(monkeypatch, backend, clipping):
    """Adam's noise correction (NOISE_VAR, VAR_FLOOR columns) in the fused kernels against the torch
    reference (anadp.adam_correction.adam_step_), at sigma 1 where it changes the step: the
    corrected run differs from the uncorrected one by far more than the backends differ."""
    if backend == "triton":
        pytest.importorskip("triton")
    elif backend == "cuda" and why_unavailable("cuda", torch.device(DEV)) is not None:
        pytest.skip(f"the cuda backend: {why_unavailable('cuda', torch.device(DEV))}")
    elif backend == "cpu" and (why_unavailable("cpu", torch.device("cpu")) is not None or DEV != "cpu"):
        pytest.skip("the cpu backend's kernel is not built here, or the tensors are on a GPU")
    kw = dict(sigma=1.0, adam_noise_correction=True, clipping=clipping)
    monkeypatch.setenv("ANADP_BACKEND", "torch")
    ref, o_ref = _train(_bert, "adamw", **kw)
    plain, _ = _train(_bert, "adamw", sigma=1.0, clipping=clipping, adam_noise_correction=False)
    monkeypatch.setenv("ANADP_BACKEND", backend)
    out, o = _train(_bert, "adamw", **kw)
    assert o.backend == backend and o._fused_update
    assert rel_err(out, ref) < 1e-5 and rel_err(plain, ref) > 1e-3
    assert torch.equal(o.noise_variance.average, o_ref.noise_variance.average)

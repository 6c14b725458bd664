"""Static shapes (make_private(static_shapes=True)): every chunk has max_physical_batch_size rows, the
Poisson batch's samples first and copies after them; the padded rows' gradients are zeroed, so the
steps and epsilon equal those of the unpadded run (float64)."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import anadp
from helpers import rel_err


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _run(static: bool, clipping: str, reduction: str, batch_size=6, M=4, steps=5, compile_=False, out=None):
    """``compile_``: the private model through torch.compile(fullgraph=True); ``out``: a dict that gets the optimizer."""
    model = _model()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 20, (40, 5), generator=g), torch.randint(0, 3, (40,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = anadp.make_private(model, opt, DataLoader(TensorDataset(ids, y), batch_size=batch_size),
                                                noise_multiplier=0.7, max_grad_norm=0.5, clipping=clipping,
                                                loss_reduction=reduction, max_physical_batch_size=M, seed=3,
                                                static_shapes=static, backend="torch")
    if out is not None:
        out["optimizer"] = opt
    forward = torch.compile(model, fullgraph=True) if compile_ else model
    sizes, real = [], []
    for k, (x, t) in enumerate(loader):
        if k == steps * 3:
            break
        sizes.append(len(x))
        real.append(loader.real_rows if static else len(x))
        # the loss over every row, padded ones included: the engine, not the loop, keeps them out of the step
        per = nn.functional.cross_entropy(forward(x).mean(1), t, reduction="none")
        (per.sum() if reduction == "sum" else per.mean()).backward()
        opt.step()
        opt.zero_grad()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return params, sizes, real, opt.privacy_spent(1e-5), opt.step_count


@pytest.mark.parametrize("clipping,reduction", [("whitened", "mean"), ("whitened", "sum"), ("per_layer", "mean")])
def test_padded_chunks_give_the_unpadded_steps_and_epsilon(clipping, reduction):
    ref, sizes, _, eps_ref, steps_ref = _run(False, clipping, reduction)
    out, padded, real, eps, steps = _run(True, clipping, reduction)
    assert set(padded) == {4} and real == sizes  # fixed shapes; the same samples
    assert min(real) < 4  # some chunks were padded (and a logical batch above 4 was split)
    assert steps == steps_ref and eps == eps_ref
    assert rel_err(out, ref) < 1e-12


@pytest.mark.skipif(not anadp.compiled.available(), reason=f"torch {torch.__version__}: no compiled private models")
def test_compiled_padded_chunks_give_the_unpadded_steps_and_epsilon():
    """Compiled, whitened clipping takes the flat path (anadp.flat), whose batch zeroes the padded rows of its
    per-sample gradients: the steps equal the eager unpadded run's (float64; the compiled graph's fusions round
    differently, ~1e-16)."""
    torch._dynamo.reset()
    ref, sizes, _, eps_ref, steps_ref = _run(False, "whitened", "mean")
    held = {}
    out, padded, real, eps, steps = _run(True, "whitened", "mean", compile_=True, out=held)
    assert held["optimizer"].engine.flat is not None  # the flat path served
    assert set(padded) == {4} and real == sizes and min(real) < 4
    assert steps == steps_ref and eps == eps_ref
    assert rel_err(out, ref) < 1e-12


def test_an_empty_poisson_batch_is_a_chunk_of_padding():
    """A tiny sample rate draws empty batches: each is a chunk of copies of the dataset's first sample,
    whose gradients are zeroed: the step is noise alone, as without padding."""
    ref, sizes, _, _, _ = _run(False, "whitened", "mean", batch_size=1, steps=4)
    out, padded, real, _, _ = _run(True, "whitened", "mean", batch_size=1, steps=4)
    assert 0 in real and set(padded) == {4} and real == sizes
    assert rel_err(out, ref) < 1e-12


def test_static_shapes_need_a_fixed_size_and_fixed_thresholds():
    model = _model()
    loader = DataLoader(TensorDataset(torch.zeros(8, 5, dtype=torch.long)), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="give max_physical_batch_size"):
        anadp.make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, static_shapes=True)
    with pytest.raises(ValueError, match="adaptive_clipping.*sensitivity"):
        anadp.make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, static_shapes=True,
                           max_physical_batch_size=4, clipping="per_layer", adaptive_clipping=True)

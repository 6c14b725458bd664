"""The flat path of a compiled private model (anadp.flat): under whitened and global clipping the compiled
backward adds every layer's per-sample gradients into one buffer per parameter, in the graph; the engine
hands the accumulator a FlatBatch. (That its noisy steps equal the eager ones: tests/test_compile.py, for
GPT-2, BERT and Llama, sequence-first, and with padded static-shape chunks in tests/test_static_shapes.py.)"""
import warnings

import pytest
import torch

import anadp
from anadp import compiled
from tests.zoo import batch, logits, make

pytestmark = pytest.mark.skipif(not compiled.available(), reason=f"torch {torch.__version__}: no compiled private "
                                "models (anadp.compiled.available)")


def _private(name="bert", B=4):
    model, kind = make(name, torch.float32)
    inputs = batch(kind, B=B, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(B)), batch_size=B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, loader = anadp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                                  noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                                  seed=0, allocation="uniform")
    return private, opt, loader, inputs


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_the_flat_batch_has_the_records_norms(name):
    """The per-sample squared norms of every parameter, read off the flat buffer of a compiled backward, equal the
    eager records' (float32, 1e-5): GPT-2's tied embedding and output layer add into one buffer, whose norm is
    that of the sum; no record is made."""
    torch._dynamo.reset()
    norms = []
    for compile_ in (False, True):
        private, opt, loader, inputs = _private(name)
        forward = torch.compile(private, fullgraph=True) if compile_ else private
        next(iter(loader))
        logits(forward(**inputs)).pow(2).mean().backward()
        if compile_:
            assert opt.engine.flat is not None and opt.engine.flat.written and not opt.engine._records
        sq = opt.engine.per_sample_sq_norms()
        norms.append(torch.stack([sq[p] for p in opt.engine.params]))
    eager, flat = norms
    assert float(eager.sum()) > 0
    assert float((flat - eager).norm() / eager.norm()) < 1e-5


def test_beyond_its_budget_the_record_ops_serve(monkeypatch):
    """A model whose B P numbers exceed FLAT_NUMBERS gets no buffer: the record ops take its backward, and its
    compiled steps still equal the eager ones (float32, 1e-6)."""
    from tests.test_compile import _steps
    monkeypatch.setattr(anadp.engine, "FLAT_NUMBERS", 1)
    torch._dynamo.reset()
    eager = _steps("bert", "whitened", compile_=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = _steps("bert", "whitened", compile_=True)
    assert float((comp - eager).norm() / eager.norm()) < 1e-6
    private, opt, loader, inputs = _private()
    forward = torch.compile(private, fullgraph=True)
    next(iter(loader))
    logits(forward(**inputs)).sum().backward()
    assert opt.engine.flat is None and opt.engine._records


def test_under_autocast_no_buffer_is_made():
    """The flat path keeps float32 sums: a compiled forward under autocast takes the record ops (their 16-bit
    arithmetic, docs/design.md) and makes no buffer, whose B P numbers it would never use."""
    torch._dynamo.reset()
    private, opt, loader, inputs = _private()
    forward = torch.compile(private, fullgraph=True)
    for _ in range(2):
        next(iter(loader))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = logits(forward(**inputs)).float().pow(2).mean()
        loss.backward()
        assert opt.engine._records and opt.engine.flat is None
        opt.step()
        opt.zero_grad()


def test_a_forward_without_its_backward_adds_no_batch():
    """A compiled forward whose backward never runs leaves the buffer unwritten (its tick has no gradient): the
    next forward's batch is the step's only one, so the step equals that of a run without the stray forward."""
    torch._dynamo.reset()
    out = []
    for stray in (False, True):
        private, opt, loader, inputs = _private()
        forward = torch.compile(private, fullgraph=True)
        next(iter(loader))
        if stray:
            forward(**inputs)
        logits(forward(**inputs)).pow(2).mean().backward()
        opt.step()
        assert not opt.engine.flat.written  # cleared once the accumulator is done with it
        out.append(torch.cat([p.detach().flatten() for p in private.parameters()]))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_non_finite_per_sample_gradient_in_the_buffer(policy):
    """The non-finite policy reads the flat batch as it reads records: "skip" drops the sample (its row of every
    buffer zeroed, counted, warned of) and the step stays finite; "raise" refuses the step and names a parameter."""
    torch._dynamo.reset()
    model, kind = make("bert", torch.float32)
    inputs = batch(kind, B=4, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(4)), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, loader = anadp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                                  noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                                  seed=0, nonfinite=policy)
    forward = torch.compile(private, fullgraph=True)
    next(iter(loader))
    logits(forward(**inputs)).pow(2).mean().backward()
    flat = opt.engine.flat
    assert flat is not None and flat.written
    flat.bufs[-1][2, 0] = float("inf")  # sample 2's gradient of the last block
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="1 of 4 samples"):
            opt.step()
        return
    with pytest.warns(UserWarning, match="1 of 4 samples"):
        opt.step()
    assert opt.skipped_samples == 1
    assert all(torch.isfinite(p).all() for p in private.parameters())

"""torch.compile of a private model (anadp.compiled): the hooked layers are custom ops, so that the compiler
traces the private forward and backward whole (``fullgraph=True``, inductor on the CPU), and noisy steps
of the compiled model equal the eager ones."""
import collections
import itertools
import warnings

import pytest
import torch

import anadp
from anadp import compiled
from anadp.layers import EmbeddingLayer, LinearLayer, NormLayer
from tests.zoo import batch, logits, make

pytestmark = pytest.mark.skipif(not compiled.available(), reason=f"torch {torch.__version__}: custom ops cannot "
                                "declare side effects (anadp.compiled.available)")


def _steps(name: str, clipping: str, compile_: bool, steps: int = 3, fullgraph: bool = True,
           autocast: torch.dtype | None = None) -> torch.Tensor:
    """The parameters after ``steps`` noisy DP-SGD steps of the tiny model ``name`` (physical chunks of 2 of
    a batch of 4: two forwards and backwards a step); ``autocast``: the forward and loss under CPU autocast."""
    model, kind = make(name, torch.float32)
    full = batch(kind, B=8, dtype=torch.float32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, loader = anadp.make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=0.1,
                                                  seed=0, poisson_sampling=False, allocation="uniform",
                                                  clipping=clipping, max_physical_batch_size=2)
    forward = torch.compile(private, fullgraph=fullgraph) if compile_ else private
    for (i,) in itertools.islice((b for _ in range(2) for b in loader), steps):
        inputs = {k: v[i] for k, v in full.items()}
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = logits(forward(**inputs)).float().pow(2).mean()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("clipping", ["whitened", "global", "per_layer"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_compiled_private_model_takes_the_eager_steps(name, clipping):
    """fullgraph=True (any graph break is an error): no graph break, and three noisy steps of two chunks each
    equal the eager model's (float32, 1e-6; the compiled graph's own fusions round differently, ~1e-9 here).
    The records keep copies of what the compiled backward hands them (its memory is reused once the op
    returns): without them Llama's per-sample norms were off by up to 100%."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager = _steps(name, clipping, compile_=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = _steps(name, clipping, compile_=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # compiled once, not once a step: the forward pre-hook (a frame of its own) and the forward, and under whitened
    # and global clipping the forward once more when the flat buffer appears (anadp.flat). Llama's forward slices
    # its ModuleList, which registers its layers in a new list; counted as a change of the model, that made dynamo
    # recompile every step (it guards on the count) until its recompile limit, then run eagerly
    assert 1 <= counters["stats"]["unique_graphs"] <= (2 if clipping == "per_layer" else 3), \
        counters["stats"]["unique_graphs"]
    start = torch.cat([p.detach().flatten() for p in make(name, torch.float32)[0].parameters()])
    assert float((eager - start).norm()) > 0
    assert float((comp - eager).norm() / eager.norm()) < 1e-6


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_compiled_private_model_under_autocast_takes_the_eager_steps(name):
    """bfloat16 autocast: the traced layers' casts are the ops' (16-bit GEMMs, float32 norms), so two noisy steps of
    the compiled model move the parameters as the eager ones do, to well within bfloat16's rounding (unit roundoff
    3.9e-3 of a value; measured: 1e-8 to 6e-5 of the update's norm); a float32 GEMM or a missing cast in one path
    would differ at bfloat16's own scale."""
    start = torch.cat([p.detach().flatten() for p in make(name, torch.float32)[0].parameters()])
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = _steps(name, "whitened", compile_=False, steps=2, autocast=torch.bfloat16)
        comp = _steps(name, "whitened", compile_=True, steps=2, autocast=torch.bfloat16)
    assert float((eager - start).norm()) > 0
    assert float((comp - eager).norm() / (eager - start).norm()) < 1e-3


def test_a_layer_without_an_op_runs_eagerly_inside_the_compiled_model():
    """ViT's patch embedding is a convolution, a layer with no op: it runs uncompiled inside the compiled model
    (compiled.eagerly; a graph break there, and the only kind: traced, its book-keeping broke the graph at item()
    and side effects, in 6 graphs), and the steps equal the eager ones (1e-6)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager = _steps("vit", "global", compile_=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = _steps("vit", "global", compile_=True, fullgraph=False)
    assert counters["graph_break"] and all("disable" in reason for reason in counters["graph_break"])
    assert float((comp - eager).norm() / eager.norm()) < 1e-6


def test_importing_anadp_does_not_import_dynamo():
    """compiled.eagerly makes its disabled wrapper only where dynamo traces (importing dynamo costs ~1 s)."""
    import subprocess
    import sys
    code = "import sys, anadp; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("clipping,flat", [("whitened", True), ("whitened", False), ("per_layer", False)])
def test_the_layers_are_the_ops_inside_the_compiled_graph(clipping, flat):
    """Nothing of the engine runs as traced Python (which would be replayed, or break the graph). On the flat path
    (anadp.flat; whitened clipping, the model within its budget) the backward holds no op of anadp's at all: the
    layers add their per-sample gradients into the buffer in the graph. Elsewhere (``flat`` False: a model the
    flat path does not take; per-layer clipping) it holds one record op per hooked layer call
    (anadp::record_backward for a Linear, whose input gradient is traced, and for an embedding;
    anadp::record_dense for a norm, whose input and per-sample gradients are traced). The forward holds the
    engine's book-keeping op and no other of anadp's: the layers' forwards are traced (no op, no Python), under
    per-layer clipping too (its groups are then clipped when the backward ends)."""
    from torch._dynamo.backends.common import aot_autograd
    model, kind = make("bert", torch.float32)
    inputs = batch(kind, B=4, dtype=torch.float32)
    private, opt, loader = anadp.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(4)), batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, clipping=clipping)
    if not flat:
        opt.engine.flat_layout = None  # as for a model beyond the flat path's budget: the record ops
    ops = {"forward": collections.Counter(), "backward": collections.Counter()}

    def counting(graph):
        def compiler(gm, example):
            for n in gm.graph.nodes:
                if n.op == "call_function":  # an effectful op is wrapped: with_effects(token, op, *args)
                    target = n.args[1] if n.target is torch.ops.higher_order.with_effects else n.target
                    ops[graph][str(target).removesuffix(".default")] += 1
            return gm.forward
        return compiler
    torch._dynamo.reset()
    forward = torch.compile(private, fullgraph=True,
                            backend=aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward")))
    next(iter(loader))  # the chunk of private data the backward runs on
    logits(forward(**inputs)).sum().backward()
    layers = opt.engine.layers  # BERT's layers are each called once
    linear = sum(isinstance(layer, LinearLayer) for layer in layers)
    norms = sum(isinstance(layer, NormLayer) for layer in layers)
    embeddings = sum(isinstance(layer, EmbeddingLayer) for layer in layers)
    assert linear > 5 and norms > 3 and embeddings > 0 and linear + norms + embeddings == len(layers)
    assert (opt.engine.flat is not None) == flat
    if flat:
        assert not [k for k in ops["backward"] if k.startswith("anadp.")]
        # the embeddings' per-sample rows, functionalized; each block's buffer written back once
        assert ops["backward"]["aten.index_put"] == embeddings
        assert ops["backward"]["aten.copy_"] == len(opt.engine.flat.bufs) == linear + norms + embeddings
    else:
        assert ops["backward"]["anadp.record_backward"] == linear + embeddings
        assert ops["backward"]["anadp.record_dense"] == norms
    assert {k: n for k, n in ops["forward"].items() if k.startswith("anadp.")} == {"anadp.begin_forward": 1}


def test_host_overhead_compiled_row_has_no_graph_break():
    """bench.host_overhead's compiled row (bench.run prints it) at smoke size: DP and non-private compiled, each
    step timed, and no graph break in the private forwards (a deterministic count)."""
    from bench.host_overhead import SMOKE_CONFIG, rows
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = rows(rounds=1, cfg=SMOKE_CONFIG, compile=True, methods=["nonprivate", "anadp_uniform", "anadp_per_layer"])
    assert [r["graph_breaks"] for r in out] == [0, 0, 0]
    assert all(r["seconds"] > 0 for r in out)


def test_a_private_model_nobody_holds_is_freed():
    """The ops' registry (anadp.compiled) holds the layers and the engine weakly: wrapping models in a loop
    does not keep them alive."""
    import gc

    from tests.models import make_setup
    gc.collect()
    before = len(compiled._OBJECTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            anadp.make_private(*make_setup(), noise_multiplier=1.0, max_grad_norm=1.0)
    gc.collect()
    assert len(compiled._OBJECTS) == before


def test_a_flattened_batch_under_compile_is_refused_by_name():
    """OPT's feed-forward flattens (B, T, d) into tokens: the proof that its rows are the samples' blocks reads
    autograd's graph, which a compiled model replaces, so under torch.compile the layer refuses it by name (not
    a batch-size mismatch at the backward, nor a tracing error)."""
    from anadp.layers import UnsupportedModuleError
    from anadp.engine import GradSampleEngine
    model, kind = make("opt", torch.float32)
    engine = GradSampleEngine(model, loss_reduction="sum")
    torch._dynamo.reset()
    with pytest.raises(UnsupportedModuleError, match="flattened batch .* inside torch.compile"):
        logits(torch.compile(model)(**batch(kind, B=4, dtype=torch.float32))).sum().backward()
    engine.remove()


@pytest.mark.parametrize("flat", [False, True])
def test_traced_probe_forms_the_clipped_sums(flat):
    """bench.host_overhead's traced probes (the bound a traced step would approach; per tensor, or ``flat`` on one
    matrix) compute DP-SGD's clipped sum: without noise, their compiled sums equal per-sample gradients formed one
    sample at a time, clipped and summed (float32, relative error 1e-5)."""
    from bench.host_overhead import SMOKE_CONFIG, traced_probe_step
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = traced_probe_step(SMOKE_CONFIG, sigma=0.0, clip=0.05, flat=flat)
        got = step.sums()
    model, params = step.model, list(step.model.parameters())
    want = [torch.zeros_like(q) for q in params]
    clipped = 0
    for i in range(len(step.labels)):
        out = model(**{k: v[i:i + 1] for k, v in step.inputs.items()})
        gs = torch.autograd.grad(torch.nn.functional.cross_entropy(out.logits, step.labels[i:i + 1]), params)
        norm = torch.sqrt(sum(g.square().sum() for g in gs))
        clipped += bool(norm > 0.05)
        for w, g in zip(want, gs):
            w += g * min(1.0, 0.05 / (norm.item() + 1e-6))
    assert clipped > 0  # the clip binds (else the test would not see clip factors)
    err = torch.sqrt(sum((a - b).square().sum() for a, b in zip(got, want))) / torch.sqrt(sum(b.square().sum() for b in want))
    assert err < 1e-5, err


class _SeqFirst(torch.nn.Module):
    """(T, B, d) in, (B, 2) out: a LayerNorm, an RMSNorm and Linears on a sequence-first batch."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc, self.rms = torch.nn.LayerNorm(6), torch.nn.Linear(6, 5), torch.nn.RMSNorm(5)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rms(torch.tanh(self.fc(self.ln(x))))).mean(0)


@pytest.mark.parametrize("clipping", ["whitened", "per_layer"])
def test_compiled_sequence_first_model_takes_the_eager_steps(clipping):
    """batch_first=False: the traced backwards move the batch first as the eager records do (the norms' per-sample
    gradients are formed in the graph), so three noisy steps equal the eager ones (float32, 1e-6); a token sum over
    the wrong axis would give per-sample gradients of another shape, or the wrong ones."""
    x = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(0))  # T = 3, B = 8
    y = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()

    def run(compile_):
        torch.manual_seed(0)
        model = _SeqFirst()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private, opt, loader = anadp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), loader,
                                                      noise_multiplier=1.0, max_grad_norm=0.1, seed=0,
                                                      poisson_sampling=False, allocation="uniform",
                                                      clipping=clipping, batch_first=False)
            forward = torch.compile(private, fullgraph=True) if compile_ else private
            for (i,) in itertools.islice((b for _ in range(2) for b in loader), 3):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(forward(x[:, i]), y[i]).backward()
                opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in _SeqFirst().parameters()])
    eager, comp = run(False), run(True)
    assert float((eager - start).norm()) > 0
    assert float((comp - eager).norm() / eager.norm()) < 1e-6

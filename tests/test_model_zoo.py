"""The model zoo: tiny Hugging Face models of every family in tests/zoo.py (decoders, encoders,
T5 and BART, a ViT, a mixture of experts, LoRA on a decoder), each trained privately and compared
with a float64 brute force (per-sample autograd, one sample at a time) on a batch with a padded
sample: per-sample norms, then one noise-free step under whitened and per-layer clipping with the
sum and the mean loss; a noisy step on each CPU backend; and the layers no registered layer covers
(anadp.generic), convolutions (anadp.conv), flattened batches and the refusals."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import anadp
from anadp.engine import BatchMismatchError, GradSampleEngine
from anadp.generic import GenericLayer

import zoo
from helpers import per_sample_grads, rel_err
from test_norms import check_norms

FAMILIES = list(zoo.FAMILIES) + ["llama+lora"]
B = 4


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


@pytest.mark.parametrize("name", FAMILIES)
def test_per_sample_norms_are_exact(name):
    model, kind = zoo.make(name)
    check_norms(model, zoo.batch(kind), B, torch.float64, out_of=zoo.logits)


def _loss_weights(model, inputs, seed=3):
    with torch.no_grad():
        shape = zoo.logits(model(**inputs)).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _groups(model, opt):
    """(group of each parameter name, threshold of each group, noise feed 1 / w_g of each group) of a
    per-layer clipped private optimizer."""
    pname = {p: n for n, p in model.named_parameters()}
    col = opt.accumulator.col
    return ({pname[p]: col[i] for i, p in enumerate(opt.params)}, dict(enumerate(opt.clip.thresholds.tolist())),
            {col[i]: 1.0 / float(w) for i, w in enumerate(opt.allocator.scales)})


def _reference_update(model, inputs, R, groups, thresholds, feed, denom, logits=zoo.logits, n=B):
    """-sum_i c_i g_i * feed / denom per parameter name: per-sample autograd in float64, each group
    clipped to its own threshold (one group: whitened uniform clipping)."""
    grads = per_sample_grads(model, inputs, lambda out, i: (logits(out) * R[i:i + 1]).sum(), n)
    sq = {}
    for n, g in grads.items():
        sq[groups[n]] = sq.get(groups[n], 0) + g.flatten(1).pow(2).sum(1)
    c = {k: (thresholds[k] / (s.sqrt() + 1e-6)).clamp(max=1.0) for k, s in sq.items()}
    return {n: -torch.einsum("b,b...->...", c[groups[n]], g) * feed[groups[n]] / denom for n, g in grads.items()}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("clipping,reduction", [("whitened", "sum"), ("whitened", "mean"), ("per_layer", "sum"),
                                                ("per_layer", "mean")])
def test_a_private_step_equals_the_brute_force(name, clipping, reduction):
    """SGD (lr 1) at noise 0, clip norm below most samples' norms: the parameter change equals the
    clipped per-sample sum of the brute force to float64 rounding (1e-9 relative)."""
    model, kind = zoo.make(name)
    inputs = zoo.batch(kind)
    ref = copy.deepcopy(model)
    R = _loss_weights(model, inputs)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    keys = list(inputs)
    loader = DataLoader(TensorDataset(*inputs.values(), R), batch_size=B)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model, opt, loader = anadp.make_private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=0.05,
                                            allocation="uniform", clipping=clipping, poisson_sampling=False,
                                            loss_reduction=reduction, backend="torch", seed=0)
    for *xs, r in loader:
        per = (zoo.logits(model(**dict(zip(keys, xs)))) * r).flatten(1).sum(1)
        (per.sum() if reduction == "sum" else per.mean()).backward()
        opt.step()
    if clipping == "per_layer":
        groups, thresholds, feed = _groups(model, opt)
    else:
        groups, thresholds, feed = {n: 0 for n in names}, {0: 0.05}, {0: 1.0}
    want = _reference_update(ref, inputs, R, groups, thresholds, feed, B if reduction == "mean" else 1.0)
    params = dict(model.named_parameters())
    got = torch.cat([(params[n].detach() - before[n]).flatten() for n in names])
    assert rel_err(got, torch.cat([want[n].flatten() for n in names])) < zoo.STEP_TOLERANCE.get(name, 1e-9)


@pytest.mark.parametrize("name", ["gemma", "t5", "vit", "mixtral", "opt", "bart", "falcon", "mamba", "deepseek_v3"])
def test_a_noisy_step_is_the_same_on_each_backend(name):
    """One noisy step (float32) on each backend that runs here (torch, cpu, triton under TRITON_INTERPRET):
    the same noise stream and the same update."""
    import os
    backends = ["torch", "cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    out = {}
    for backend in backends:
        model, kind = zoo.make(name, torch.float32)
        inputs = zoo.batch(kind, dtype=torch.float32)
        keys = list(inputs)
        loader = DataLoader(TensorDataset(*inputs.values()), batch_size=B)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model, opt, loader = anadp.make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                                poisson_sampling=False, backend=backend, seed=5)
        assert opt.backend == backend
        for xs in loader:
            zoo.logits(model(**dict(zip(keys, xs)))).float().pow(2).mean().backward()
            opt.step()
        out[backend] = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert torch.isfinite(out["torch"]).all()
    for backend in backends[1:]:
        assert rel_err(out[backend], out["torch"]) < 1e-5, backend


# --- layers no registered layer covers: the generic path -------------------------------------

class LearnedScale(nn.Module):
    """A custom layer with a raw learned scale."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.scale


class RootParameter(nn.Module):
    """F.linear with a root nn.Parameter, then a Linear."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 6) / 3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(F.linear(x, self.w)))


class DoubledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward (not the parent's math)."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias) + self.weight.sum()


class SameLinear(nn.Linear):
    """An nn.Linear subclass whose forward is the parent's math written out (as Falcon's FalconLinear)."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class TokensGroupNorm(nn.Module):
    """nn.GroupNorm over the features of (B, T, d) tokens."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 6)

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def _mixed(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), LearnedScale(), DoubledLinear(6, 6), SameLinear(6, 6), nn.Tanh(),
                         TokensGroupNorm(), nn.Linear(6, 2)).double()


def test_peer_suite_cases_are_exact():
    """The peer suite's custom learned scale, custom F.linear + root Parameter, and nn.Linear subclass with
    its own forward: exact, sum and mean loss. The subclass whose forward is the parent's math is taken as a
    Linear; the one that is not, by the generic path."""
    x = torch.randn(B, 7, 6, dtype=torch.float64)
    check_norms(_mixed(), x, B, torch.float64)
    check_norms(RootParameter().double(), x, B, torch.float64)
    engine = GradSampleEngine(_mixed())
    kinds = {layer.name: type(layer).__name__ for layer in engine.layers}
    assert kinds["1"] == kinds["2"] == kinds["5.norm"] == "GenericLayer" and kinds["3"] == "LinearLayer"
    engine.remove()


def test_generic_path_under_per_layer_clipping_and_chunks():
    """A noise-free step of the generic model, per-layer clipping, two physical chunks: equal to the brute force."""
    model = _mixed()
    ref = copy.deepcopy(model)
    x, R = torch.randn(8, 7, 6, dtype=torch.float64), torch.randn(8, 7, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt, loader = anadp.make_private(model, opt, DataLoader(TensorDataset(x, R), batch_size=8),
                                            noise_multiplier=0.0, max_grad_norm=0.1, clipping="per_layer",
                                            allocation="uniform", poisson_sampling=False, loss_reduction="sum",
                                            max_physical_batch_size=4, seed=0)
    for xb, rb in loader:
        (model(xb) * rb).sum().backward()
        opt.step()
    want = _reference_update(ref, x, R, *_groups(model, opt), 1.0, logits=lambda out: out, n=8)
    want = torch.cat([want[n].flatten() for n in names])
    got = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert rel_err(got, want) < 1e-9


class BatchMean(nn.Module):
    """Mixes samples: subtracts the batch mean."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.w


def test_a_module_that_mixes_samples_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(6, 6), BatchMean()).double()
    engine = GradSampleEngine(model)
    with pytest.raises(anadp.UnsupportedModuleError, match=r"'1'.*mixes the samples.*LayerNorm / GroupNorm"):
        model(torch.randn(B, 6, dtype=torch.float64))
    engine.remove()


def test_recurrent_layers_are_refused_with_the_fix():
    with pytest.raises(anadp.UnsupportedModuleError, match="recurrent.*DPLSTM"):
        GradSampleEngine(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)))


def test_an_embedding_with_a_shared_index_is_refused_with_the_fix():
    class SharedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bias = nn.Linear(5, 5), nn.Embedding(9, 5)

        def forward(self, x):  # an index without the batch dimension, broadcast over the batch
            return self.fc(x) + self.bias(torch.arange(x.shape[1]))

    model = SharedBias()
    GradSampleEngine(model)
    with pytest.raises(anadp.UnsupportedModuleError, match=r"'bias'.*without the batch dimension.*Index it per sample"):
        model(torch.randn(B, 7, 5))


def test_generic_path_warns_where_its_per_sample_gradients_are_large(monkeypatch):
    import anadp.generic
    monkeypatch.setattr(anadp.generic, "_WARN_NUMBERS", 10)
    model = nn.Sequential(LearnedScale())
    GradSampleEngine(model)
    with pytest.warns(UserWarning, match=r"generic path: .* numbers"):
        model(torch.randn(B, 6))


def test_generic_path_falls_back_to_a_loop_where_vmap_cannot_run():
    class Routed(nn.Module):  # a data-dependent number of rows: vmap cannot batch nonzero
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6, dtype=torch.float64))

        def forward(self, x):
            rows = (x.sum(-1) > 0).nonzero()
            out = torch.zeros_like(x)
            out[rows[:, 0], rows[:, 1]] = x[rows[:, 0], rows[:, 1]] @ self.w
            return out

    model = nn.Sequential(Routed(), nn.Linear(6, 2)).double()
    check_norms(model, torch.randn(B, 7, 6, dtype=torch.float64), B, torch.float64)
    engine = GradSampleEngine(model)
    model(torch.randn(B, 7, 6, dtype=torch.float64))
    assert [[r[2] for r in layer.readings.values()] for layer in engine.layers if isinstance(layer, GenericLayer)] \
        == [["loop"]]


class PositionScale(nn.Module):
    """Scales each token by a learned row of its position, the positions passed in shared by the batch (T,)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(16, 6, dtype=torch.float64))

    def forward(self, x, positions):
        return x * self.table[positions]


class WithPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale, self.head = PositionScale(), nn.Linear(6, 2).double()

    def forward(self, x):
        return self.head(self.scale(x, torch.arange(x.shape[1])))


def test_a_shared_input_whose_size_is_the_batch_is_not_split():
    """The positions (T,) are shared; when T = B they read as batched by their shape: the earlier reading
    (shared) is checked and kept, and the step stays exact."""
    torch.manual_seed(0)
    model = WithPositions()
    check_norms(model, torch.randn(B, 7, 6, dtype=torch.float64), B, torch.float64)  # T = 7: shared
    engine = GradSampleEngine(model)
    model(torch.randn(B, 7, 6, dtype=torch.float64))
    model(torch.randn(B, B, 6, dtype=torch.float64))  # T = B
    layer = next(lay for lay in engine.layers if isinstance(lay, GenericLayer))
    assert all(chosen[0] == (0,) for chosen in layer.readings.values())  # x alone carries the batch
    engine.remove()
    check_norms(WithPositions(), torch.randn(B, B, 6, dtype=torch.float64), B, torch.float64)


# --- convolutions ---------------------------------------------------------------------------

@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(3, 8, 4, stride=4),                      # a patch embedding: ghost norms
    lambda: nn.Conv2d(3, 4, 3, padding=1, dilation=1),         # per-sample gradients formed
    lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False),
    lambda: nn.Conv2d(4, 4, 3, groups=2),                      # the generic path
    lambda: nn.Conv1d(3, 5, 3, stride=2, padding=2),
], ids=["patches", "same", "asymmetric", "grouped", "conv1d"])
def test_convolutions_are_exact(conv):
    torch.manual_seed(0)
    c = conv().double()
    x = torch.randn(B, c.in_channels, 8, dtype=torch.float64) if isinstance(c, nn.Conv1d) else \
        torch.randn(B, c.in_channels, 8, 8, dtype=torch.float64)
    model = nn.Sequential(c, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3).double())
    model(x)  # materializes the lazy head
    check_norms(model, x, B, torch.float64)


def test_a_patch_convolution_keeps_its_activations_not_per_sample_gradients():
    """ghost norms where they are cheaper: the record of a non-overlapping patch embedding keeps (A, G)."""
    from anadp.records import ConvRecord
    model = nn.Sequential(nn.Conv2d(3, 64, 4, stride=4), nn.Flatten(), nn.Linear(256, 2)).double()
    engine = GradSampleEngine(model)
    model(torch.randn(B, 3, 8, 8, dtype=torch.float64)).sum().backward()
    assert isinstance(engine._records[model[0].weight][0], ConvRecord)


# --- flattened batches -----------------------------------------------------------------------

class FlatFeedForward(nn.Module):
    """(B, T, d) flattened to (B T, d) for a LayerNorm and two Linear layers (OPT's feed-forward)."""

    def __init__(self, permute=False):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(6), nn.Linear(6, 8), nn.Linear(8, 6)
        self.permute = permute

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        if self.permute:  # rows no longer in blocks of one sample: must not be taken for a batch
            h = h.flip(0)
        return (h + self.fc2(torch.relu(self.fc1(self.norm(h))))).view(shape)


def test_a_flattened_batch_is_exact_and_a_permuted_one_is_refused():
    x = torch.randn(B, 5, 6, dtype=torch.float64)
    torch.manual_seed(0)
    check_norms(FlatFeedForward().double(), x, B, torch.float64)
    model = FlatFeedForward(permute=True).double()
    GradSampleEngine(model)
    with pytest.raises(BatchMismatchError):
        model(x).sum().backward()


class WritesInPlace(nn.Module):
    """Writes into an embedding's and a Linear's outputs in place (h[:, 0] = ..., h.mul_())."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(9, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, idx):
        e = self.emb(idx)
        e[:, 0] = 0.5
        h = self.fc(e)
        h[:, 1] += 1.0
        h.mul_(2)
        return self.head(torch.relu_(h))


def test_writing_into_a_layer_output_in_place_is_exact():
    torch.manual_seed(0)
    check_norms(WritesInPlace().double(), torch.randint(0, 9, (B, 6)), B, torch.float64)

"""What a careless user does: each misuse either fails with a clear error or is handled honestly.
Every test here failed (or crashed differently) before its fix."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import anadp
from models import make_setup


def _private(**kw):
    m, o, l = make_setup("sgd")
    kw = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 0} | kw
    return (*anadp.make_private(m, o, l, **kw), l)


def test_two_backward_passes_on_one_batch_are_refused():
    """The same samples twice in one step have sensitivity 2C; charging them as two Poisson
    releases at sigma / sqrt(2) would report epsilon 6.04 where the truth is ~7.96."""
    m, o, l, _ = _private()
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    F.cross_entropy(m(x), y).backward()  # a second forward/backward on the same batch
    with pytest.raises(RuntimeError, match="second backward pass on the same batch"):
        o.step()
    assert o.accountant.steps == 0  # nothing was charged, nothing released


def test_different_batches_under_one_step_stay_allowed():
    m, o, l, _ = _private()
    it = iter(l)
    for _ in range(2):
        x, y = next(it)
        F.cross_entropy(m(x), y).backward()
    o.step()  # k = 2 different Poisson batches under one noise draw: 2 releases at sigma / sqrt(2)
    assert o.accountant.history == [(1.0 / 2 ** 0.5, o.sample_rate, 2)]


def test_training_on_the_original_loader_is_refused():
    m, o, l, original = _private()
    x, y = next(iter(original))  # the loop kept the old name
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="did not come from the private data loader"):
        o.step()


def test_a_batch_reused_in_the_next_step_is_refused():
    m, o, l, _ = _private()
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    o.step()
    o.zero_grad()
    F.cross_entropy(m(x), y).backward()  # the same batch again, without drawing a new one
    with pytest.raises(RuntimeError, match="second backward pass"):
        o.step()


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)
        self.bn.requires_grad_(False)  # what the unsupported-layer error used to suggest

    def forward(self, x):
        return self.head(self.bn(self.fc(x)))


def _bn_setup():
    torch.manual_seed(0)
    m = _WithBatchNorm()
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    return m, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1), DataLoader(data, batch_size=8)


def test_a_frozen_batchnorm_in_train_mode_is_refused():
    m, o, l = _bn_setup()
    with pytest.raises(ValueError, match="'bn' .*train mode.*eval mode"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0)


def test_batchnorm_in_eval_mode_trains_and_train_mode_later_is_refused():
    m, o, l = _bn_setup()
    m.bn.eval()
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    stats = m.bn.running_mean.clone()
    for x, y in l:
        if len(x):
            F.cross_entropy(m(x), y).backward()
        o.step()
        o.zero_grad()
    assert torch.equal(m.bn.running_mean, stats)  # no batch statistics leaked into the buffers
    m.train()  # an epoch loop's model.train() puts the batch norm back into train mode
    x, y = next(iter(l))
    with pytest.raises(ValueError, match="train mode"):
        m(x)

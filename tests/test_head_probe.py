"""bench/head_probe.py: the DP linear probe's closed-form clipped gradients, and that its rate matters."""
import torch
import torch.nn.functional as F


def test_clipped_sums_equal_autograd_per_sample_gradients():
    from bench.head_probe import clipped_sums
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    w = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    want = [torch.zeros_like(w), torch.zeros_like(b)]
    for i in range(6):
        gw, gb = torch.autograd.grad(F.cross_entropy((x[i:i + 1] @ w + b), y[i:i + 1]), [w, b])
        c = min(1.0, 0.5 / float(torch.cat([gw.flatten(), gb]).norm()))
        want[0] += c * gw
        want[1] += c * gb
    err = torch.softmax(x @ w + b, -1).detach() - F.one_hot(y, 2).double()
    got = clipped_sums(x, err, 0.5)
    for a, e in zip(got, want):
        assert float((a - e).norm() / e.norm()) < 1e-12


def test_probe_learns_separable_features_and_its_rate_matters():
    # two well-separated classes: with no noise and a working rate the head learns them; at a rate 1e-4 over
    # 20 steps its weights move at most 20 * 1e-4 per coordinate (Adam), too little to leave the initial prediction
    from bench.head_probe import dp_probe
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (600,), generator=g)
    x = torch.randn(600, 8, generator=g) + 3.0 * (2 * y[:, None] - 1) * torch.eye(8)[0]
    xv, yv = x[400:], y[400:]
    fast = dp_probe(x[:400], y[:400], xv, yv, batch=100, steps=20, sigma=0.0, lr=0.1, seed=0)
    slow = dp_probe(x[:400], y[:400], xv, yv, batch=100, steps=20, sigma=0.0, lr=1e-4, seed=0)
    assert fast > 0.95 and slow < 0.8, (fast, slow)

"""`import anadp` and a private step without Opacus (a bare GPU machine has torch and triton only):
the accountant's library is needed where epsilon is computed, and its absence is a clear error there."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("opacus", "opt_einsum"):
                raise ImportError("hidden: " + name)
    sys.meta_path.insert(0, Block())
    import torch
    import anadp
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = anadp.make_private(model, opt, torch.utils.data.DataLoader(data, batch_size=8),
                                            noise_multiplier=1.0, max_grad_norm=1.0, seed=0, backend="torch")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "the step changed nothing"
    assert not any(m.startswith("opacus") for m in sys.modules)
    try:
        opt.privacy_spent(1e-5)
    except ImportError as e:
        assert "pip install opacus" in str(e), e
        print("OK")
""")


def test_step_without_opacus_and_a_clear_error_for_epsilon():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr

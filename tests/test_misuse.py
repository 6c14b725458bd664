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


def test_loaders_that_cannot_be_poisson_sampled_are_clear_errors():
    m, o, _ = make_setup("sgd")
    data = TensorDataset(torch.randn(16, 8), torch.randint(0, 2, (16,)))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    with pytest.raises(ValueError, match="batch_size=None"):
        anadp.make_private(m, o, DataLoader(data, batch_size=None), noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="IterableDataset"):
        anadp.make_private(m, o, DataLoader(Stream(), batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0)


def test_zero_epochs_is_a_clear_error():
    m, o, l = make_setup("sgd")
    with pytest.raises(ValueError, match="epochs must be > 0"):
        anadp.make_private(m, o, l, target_epsilon=3.0, target_delta=1e-5, epochs=0, max_grad_norm=1.0)


@pytest.mark.parametrize("argv,what", [
    (["demo", "--epochs", "0"], "--epochs: must be > 0"),
    (["audit", "--epsilon", "0"], "--epsilon: must be > 0"),
    (["demo", "--delta", "1.5"], "--delta: must be in (0, 1)"),
    (["finetune", "--epochs", "zero"], "--epochs: 'zero' is not a whole number"),
])
def test_bad_cli_arguments_are_one_line_and_exit_2(argv, what, capsys):
    from anadp.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert what in err and "Traceback" not in err


@pytest.mark.parametrize("model", ["/nonexistent", "gpt2"])
def test_finetune_with_a_model_that_is_not_a_local_directory(model, capsys):
    """No network: 'gpt2' is not looked up on the Hub; one line, exit status 2."""
    from anadp.cli import main
    assert main(["finetune", "--model", model, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "never downloads models" in err


def test_help_describes_every_option_with_its_default(capsys):
    from anadp.cli import build_parser, main
    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, parser in sub.choices.items():
        undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
        assert not undocumented, (name, undocumented)
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "(default: 3)" in capsys.readouterr().out  # --epochs
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(None: 5e-4 with LoRA" in out and "5e-5 with --no-lora) (default" not in out  # said once, not twice


def test_stepped_says_which_step_calls_updated_with_physical_batches():
    """Logical batches of ~16 in physical chunks of 4: step() runs per chunk, updates per
    logical batch; a scheduler stepped on optimizer.stepped decays once per update."""
    m, o, l, _ = _private(max_physical_batch_size=4)
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
    calls = 0
    for x, y in l:
        o.zero_grad()
        if len(x):
            F.cross_entropy(m(x), y).backward()
        o.step()
        calls += 1
        if o.stepped:
            sched.step()
    assert o.step_count == len(l) == 4 and calls > o.step_count
    assert o.original_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 4)


def test_reading_the_scales_inside_the_warmup_warns():
    m, o, l, _ = _private(allocation_config=anadp.AllocationConfig(warmup_steps=10))
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    o.step()
    with pytest.warns(UserWarning, match="warm-up: w = 1 for the first 10 steps \\(1 taken\\)") as seen:
        scales = o.noise_scales
    assert len(seen) == 1  # one read, one warning
    assert set(scales.values()) == {1.0}
    assert list(scales) == ["emb", "fc1", "fc2", "head"]  # keyed by noise group: the modules holding a matrix


def _embedding_setup(**emb):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 4, **emb), nn.Flatten(), nn.Linear(12, 2))
    data = TensorDataset(torch.randint(0, 10, (32, 3)), torch.randint(0, 2, (32,)))
    return m, torch.optim.SGD(m.parameters(), lr=0.1), DataLoader(data, batch_size=8)


@pytest.mark.parametrize("option,why", [({"scale_grad_by_freq": True}, "count in the whole batch"),
                                        ({"max_norm": 1.0}, "renormalizes the looked-up rows in place")])
def test_embedding_options_that_break_per_sample_gradients_are_refused_at_wrap_time(option, why):
    """scale_grad_by_freq was ignored (relative error 0.28); max_norm was refused only at the first forward."""
    m, o, l = _embedding_setup(**option)
    with pytest.raises(anadp.UnsupportedModuleError, match=f"module '0'.*{why}.*use "):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0)


class _WithInstanceNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.norm, self.fc = nn.Embedding(10, 4), nn.InstanceNorm1d(4, track_running_stats=True), \
            nn.Linear(12, 2)

    def forward(self, idx):
        return self.fc(self.norm(self.emb(idx).transpose(1, 2)).flatten(1))


def test_running_statistics_of_private_batches_are_refused():
    """InstanceNorm1d(track_running_stats=True) has no parameters: it wrote running_mean / running_var,
    averages of the private batch without noise, into the state_dict."""
    torch.manual_seed(0)
    m = _WithInstanceNorm()
    data = TensorDataset(torch.randint(0, 10, (32, 3)), torch.randint(0, 2, (32,)))
    o, l = torch.optim.SGD(m.parameters(), lr=0.1), DataLoader(data, batch_size=8)
    with pytest.raises(anadp.UnsupportedModuleError, match=r"'norm'.*track_running_stats=True.*running_mean"):
        anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0)
    m.norm.eval()  # normalizes with the (public, fixed) running statistics: nothing is written
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    o.step()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    m.train()
    with pytest.raises(anadp.UnsupportedModuleError, match="track_running_stats"):
        m(x)


class _RunningAverage(nn.Module):
    """A custom module that keeps a running average of its input in a buffer."""

    def __init__(self, replace=False):
        super().__init__()
        self.emb, self.fc, self.replace = nn.Embedding(10, 4), nn.Linear(12, 2), replace
        self.register_buffer("avg", torch.zeros(12))

    def forward(self, idx):
        h = self.emb(idx).flatten(1)
        if self.training:
            if self.replace:
                self.avg = 0.9 * self.avg + 0.1 * h.detach().mean(0)
            else:
                self.avg.mul_(0.9).add_(h.detach().mean(0), alpha=0.1)
        return self.fc(h)


@pytest.mark.parametrize("replace", [False, True], ids=["in-place", "replaced"])
def test_a_buffer_written_by_a_private_forward_is_refused_at_the_step(replace):
    torch.manual_seed(0)
    m = _RunningAverage(replace)
    data = TensorDataset(torch.randint(0, 10, (32, 3)), torch.randint(0, 2, (32,)))
    m, o, l = anadp.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), DataLoader(data, batch_size=8),
                                 noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="buffer 'avg' was written during a private forward"):
        o.step()
    m.eval()
    o.zero_grad()
    with torch.no_grad():
        m(x)  # an evaluation forward may write (public use); nothing private was recorded


def _budget_run(**kw):
    m, o, l = make_setup("sgd", n=64, batch_size=16)  # 4 batches per epoch: 8 steps in 2 epochs
    return anadp.make_private(m, o, l, target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0, seed=0,
                              **kw)


def test_no_step_past_the_budget_the_noise_was_calibrated_for():
    m, o, l = _budget_run()
    assert o.budget_steps == 8 == o.steps_left
    for epoch in range(2):
        for x, y in l:
            if len(x):
                F.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad()
    assert o.steps_left == 0 and o.privacy_spent(1e-5) <= 3.0
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(anadp.BudgetExhaustedError, match=r"step 9 of a run .* calibrated for 8 steps .*target "
                                                         r"epsilon 3 .*spend epsilon 3\.\d+"):
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters())) and o.accountant.steps == 8


def test_budget_steps_are_not_lost_to_float_rounding():
    """Opacus's int(epochs / sample_rate) turns 4.999999 into 4: the last step of a run would be refused."""
    from anadp.accounting import calibrated_steps
    assert calibrated_steps(3 / 5, 1 / 5) == 3 and int((3 / 5) / (1 / 5)) == 2
    assert calibrated_steps(2.5, 1 / 4) == 10 and calibrated_steps(2.6, 1 / 4) == 10


@pytest.mark.parametrize("change", [{"allocation": "uniform"}, {"target_epsilon": 4.0}, {"max_grad_norm": 0.5}])
def test_a_checkpoint_does_not_load_into_other_privacy_settings(tmp_path, change):
    """load_checkpoint replaced the optimizer's settings by the checkpoint's (sigma 0.763 became 1.282)."""
    m, o, l = _budget_run()
    x, y = next(iter(l))
    F.cross_entropy(m(x), y).backward()
    o.step()
    anadp.save_checkpoint(str(tmp_path / "c.pt"), m, o)
    kw = {"target_epsilon": 3.0, "max_grad_norm": 1.0} | change
    m2, o2, _ = make_setup("sgd", n=64, batch_size=16)
    m2, o2, _ = anadp.make_private(m2, o2, _, target_delta=1e-5, epochs=2, seed=0, **kw)
    key = next(iter(change)) if "target_epsilon" not in change else "noise_multiplier"
    with pytest.raises(ValueError, match=f"other privacy settings.*{key}: checkpoint"):
        anadp.load_checkpoint(str(tmp_path / "c.pt"), m2, o2)
    m3, o3, _ = _budget_run()
    anadp.load_checkpoint(str(tmp_path / "c.pt"), m3, o3)  # the same settings load
    assert o3.step_count == 1


def test_the_hf_integration_without_transformers_says_what_to_install():
    import subprocess
    import sys
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import anadp.integrations.transformers\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'anadp[hf]'" in out.stdout, out.stdout + out.stderr

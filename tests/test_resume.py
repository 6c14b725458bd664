"""Kill-and-resume, in subprocesses: bit-identical to the uninterrupted run, also
when the process dies while writing a checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

JOB = os.path.join(os.path.dirname(__file__), "resume_job.py")


def run(tmp_path, name, *flags, expect=0):
    ckpt, out = tmp_path / f"{name}.pt", tmp_path / f"{name}-out.pt"
    proc = subprocess.run([sys.executable, JOB, "--ckpt", str(ckpt), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stderr[-2000:]
    return ckpt, out


def load(out):
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    _, out = run(tmp_path_factory.mktemp("ref"), "ref")
    return load(out)


def same(a, b):
    return (all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])) and a["history"] == b["history"]
            and torch.equal(a["scales"], b["scales"]))


def test_killed_mid_epoch_resumes_bit_identical(tmp_path, reference):
    ckpt, _ = run(tmp_path, "job", "--kill-after", "6", expect=9)  # step 6: mid second epoch
    assert torch.load(ckpt, weights_only=True)["optimizer"]["step_count"] == 6
    _, out = run(tmp_path, "job")
    assert same(load(out), reference)
    assert not torch.equal(reference["scales"], torch.ones_like(reference["scales"]))


def test_killed_run_with_dropout_resumes_bit_identical(tmp_path):
    """Dropout draws from torch's RNG: the checkpoint holds its state (and CUDA's)."""
    _, out = run(tmp_path, "ref", "--dropout", "0.3")
    reference = load(out)
    run(tmp_path, "job", "--dropout", "0.3", "--kill-after", "6", expect=9)
    _, out = run(tmp_path, "job", "--dropout", "0.3")
    assert same(load(out), reference)


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, reference):
    ckpt, _ = run(tmp_path, "job", "--crash-in-save", "5", expect=3)
    assert torch.load(ckpt, weights_only=True)["optimizer"]["step_count"] == 4  # the torn write never landed
    _, out = run(tmp_path, "job")
    assert same(load(out), reference)


def test_loader_resumes_the_rest_of_the_epoch():
    import anadp
    from models import make_setup
    m, o, l = make_setup("sgd")
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=1.0, max_grad_norm=1.0, seed=1)
    it = iter(l)
    next(it), next(it)
    state = l.state_dict()
    rest = [b[0] for b in it]  # the two batches left in this epoch
    m2, o2, l2 = make_setup("sgd")
    m2, o2, l2 = anadp.make_private(m2, o2, l2, noise_multiplier=1.0, max_grad_norm=1.0, seed=2)
    l2.load_state_dict(state)
    resumed = [b[0] for b in l2]
    assert state["position"] == 2 and len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(rest, resumed))
    assert len(list(l2)) == 4  # the next epoch is whole again

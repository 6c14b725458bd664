"""The CUDA extension (csrc/). Its kernels are compared with the torch backend in
test_kernels.py (the ``k`` fixture) wherever the extension is built and a GPU is
there; here: the Philox stream bit for bit, from a host build of csrc/philox.cuh
(any machine with nvcc) and from the device (GPU), and training on the cuda backend."""
import os
import shutil
import subprocess

import pytest
import torch

from anadp import philox
from anadp.backends import why_unavailable
from helpers import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_WHY = why_unavailable("cuda", torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
needs_cuda_backend = pytest.mark.skipif(CUDA_WHY is not None, reason=f"cuda backend: {CUDA_WHY}")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_csrc_philox_built_for_the_host_equals_torch(tmp_path):
    exe = tmp_path / "philox_words"
    subprocess.run(["nvcc", "-std=c++17", "-o", str(exe), os.path.join(ROOT, "tests", "cuda", "philox_words.cu")],
                   check=True, capture_output=True, timeout=300)
    for key, base in ((philox.group_key(123, 7, 5), 0), (2**64 - 5, 2**32 - 100)):
        out = subprocess.run([str(exe), str(key), str(base), "300"], check=True, capture_output=True, text=True).stdout
        rows = torch.tensor([[float(v) for v in line.split()] for line in out.splitlines()], dtype=torch.float64)
        counters = base + torch.arange(300)
        for k, word in enumerate(philox.randint4x(key, counters)):
            assert torch.equal(rows[:, k].long(), word), f"uint32 word {k} differs"
        z = torch.stack(philox.randn4x(key, counters), dim=1)
        assert (rows[:, 4:8].float() - z).abs().max() < 1e-6
        scattered = 4 * base + 1 + 5 * torch.arange(300)
        assert (rows[:, 8].float() - philox.randn(key, scattered)).abs().max() < 1e-6


@needs_cuda_backend
def test_device_philox_words_bit_equal():
    from anadp.backends import cuda as cuda_ops
    key = philox.group_key(2**64 - 1, 2**40, 3)
    offsets = torch.cat([torch.arange(5000), 2**32 + torch.arange(100)]).cuda()
    words = cuda_ops.philox_randint(key, offsets).cpu().long() % 2**32
    ref = philox.randint4x(key, offsets.cpu())
    assert torch.equal(words[0], ref[0]) and torch.equal(words[1], ref[1])


@needs_cuda_backend
def test_training_on_the_cuda_backend_equals_torch(monkeypatch):
    from test_backend import _bert, _train
    monkeypatch.setenv("ANADP_BACKEND", "torch")
    ref, _ = _train(_bert, "adamw")
    monkeypatch.setenv("ANADP_BACKEND", "cuda")
    out, o = _train(_bert, "adamw")
    assert o.backend == "cuda" and o._fused_update and not o._fused_gemm
    assert rel_err(out, ref) < 1e-5

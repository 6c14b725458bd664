"""The package as users install it: a wheel built from this tree, installed into a fresh
environment outside it, imported from elsewhere, one DP step on the cpu backend with the
compiled noise kernel built from the sources inside the installed package."""
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP = textwrap.dedent("""
    import os, sys, warnings
    warnings.simplefilter("error")  # a fall-back to the torch-op noise warns: fail on it
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import anadp
    from anadp.backends import cpu
    assert anadp.__file__.startswith(os.environ["ENV_DIR"]), anadp.__file__
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    data = TensorDataset(torch.randint(0, 10, (64, 3)), torch.randint(0, 2, (64,)))
    model, opt, loader = anadp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                            DataLoader(data, batch_size=16), noise_multiplier=1.0,
                                            max_grad_norm=1.0, allocation="uniform", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.backend == "cpu", opt.backend
    assert cpu.why_unavailable() is None, cpu.import_error
    assert cpu._ext.__file__.startswith(os.environ["ANADP_CACHE_DIR"]), cpu._ext.__file__
    assert all(s.startswith(os.environ["ENV_DIR"]) for s in cpu._SOURCES), cpu._SOURCES
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    print("step ok", opt.step_count)
""")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), ROOT], capture_output=True, text=True, env=dict(os.environ,
                                                                                          ANADP_BUILD_CUDA="0"))
    assert run.returncode == 0, run.stdout + run.stderr
    (path,) = out.glob("anadp-*.whl")
    return path


def test_wheel_holds_every_package_and_the_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ["anadp/__init__.py", "anadp/backends/__init__.py", "anadp/backends/cpu.py",
                 "anadp/integrations/transformers.py", "anadp/kernels/fused_linear.py", "anadp/csrc/cpu/noise.cpp",
                 "anadp/csrc/philox.cuh"]:
        assert need in names, f"{need} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_wheel_installed_elsewhere_imports_and_steps_with_the_compiled_kernel(wheel, tmp_path):
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, opacus, ...) from this environment, appended after the fresh one's own
    # site-packages (a plain path: this environment's editable anadp is not reachable through it)
    with open(os.path.join(purelib, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "ANADP_BACKEND")}
    env.update(ENV_DIR=str(env_dir), ANADP_CACHE_DIR=str(tmp_path / "cache"),
               PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                    if not p.startswith(sys.prefix)))  # not activated: no ninja on PATH
    run = subprocess.run([str(py), "-c", STEP], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "step ok 1" in run.stdout, run.stdout + run.stderr
    assert "compiling the CPU kernels" in run.stderr  # a fresh cache: the compile is announced
    again = subprocess.run([str(py), "-c", STEP], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "compiling" not in again.stderr, again.stdout + again.stderr  # cached
    version = subprocess.run([str(env_dir / "bin" / "anadp"), "--version"], cwd=work, env=env, capture_output=True,
                             text=True)
    assert version.returncode == 0 and version.stdout.strip().startswith("anadp 0."), version.stdout + version.stderr

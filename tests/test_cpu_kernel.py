"""The compiled CPU kernels (csrc/cpu/): the noise against the torch Philox stream."""
import shutil

import pytest
import torch

from anadp import philox
from anadp.backends import cpu as cpu_ops, get

KEYS = [philox.group_key(0, 0, 0), philox.group_key(3, 5, 7), philox.group_key(2**64 - 5, 2**40, 2**31), 2**64 - 1, 1]


def test_kernel_is_built_where_a_compiler_is():
    """No silent fall-back: with a C++ compiler here, the kernel must load."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert cpu_ops.why_unavailable() is None


needs_kernel = pytest.mark.skipif(cpu_ops.why_unavailable() is not None, reason=f"CPU kernel: {cpu_ops.import_error}")


@needs_kernel
@pytest.mark.parametrize("key", KEYS)
def test_words_are_bit_equal_to_the_torch_stream(key):
    counters = torch.cat([torch.arange(3000), 2**32 - 2 + torch.arange(5), 2**40 + torch.arange(7)])
    words = cpu_ops.philox_words(key, counters)
    ref = philox.randint4x(key, counters)
    assert words.shape == (4, len(counters)) and all(torch.equal(words[k], ref[k]) for k in range(4))


@needs_kernel
@pytest.mark.parametrize("seed,step,group", [(0, 0, 0), (3, 5, 7), (2**64 - 5, 11, 2**31)])
def test_floats_match_the_torch_stream(seed, step, group):
    """|kernel - torch| <= 1e-6 max(1, |z|) over 2**20 draws (both run log, cos and sin in float32, the
    kernel with glibc's vector functions, torch with SLEEF: a few ulp apart, measured <= 3.5e-7)."""
    n = 1 << 20
    out = torch.zeros(n)
    assert cpu_ops.add_gaussian_(out, philox.group_key(seed, step, group), 1.0)
    ref = philox.gaussian(seed, step, group, (n,))
    assert torch.isfinite(out).all()
    assert float(((out - ref).abs() / ref.abs().clamp_min(1)).max()) <= 1e-6


@needs_kernel
def test_offsets_past_2_32_and_chunked_calls_equal_one_call():
    key = philox.group_key(9, 1, 2)
    whole = torch.zeros(3000)
    cpu_ops.add_gaussian_(whole, key, 1.0, offset0=2**32 - 1000)
    parts = torch.zeros(3000)
    cpu_ops.add_gaussian_(parts[:1701], key, 1.0, offset0=2**32 - 1000)  # the second part starts mid-counter
    cpu_ops.add_gaussian_(parts[1701:], key, 1.0, offset0=2**32 + 701)
    assert torch.equal(whole, parts)
    ref = philox.randn(key, torch.arange(2**32 - 1000, 2**32 + 2000))
    assert float((whole - ref).abs().max()) < 1e-5


@needs_kernel
def test_add_is_in_place_and_scaled():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    before = g.clone()
    get("cpu").add_noise_(g, philox.group_key(1, 2, 3), 0.25)
    assert torch.allclose(g, before + 0.25 * philox.gaussian(1, 2, 3, (1000,)), atol=1e-6)
    assert not cpu_ops.add_gaussian_(torch.zeros(4, dtype=torch.float64), 1, 1.0)  # other dtypes: the torch path
    assert float(torch.tensor(1e-40) * 1.0) != 0.0  # loading the kernel did not turn on flush-to-zero


def test_without_a_compiler_the_torch_path_runs_after_one_warning(tmp_path):
    """A failing build (here: CXX is /bin/false, an empty kernel cache) warns once, says why,
    and the noise is still the stream."""
    import os
    import subprocess
    import sys
    code = ("import warnings, torch\n"
            "from anadp import philox\n"
            "from anadp.backends import cpu as cpu_ops, resolve\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    backend = resolve('auto', torch.device('cpu'))\n"
            "    a = torch.zeros(100); cpu_ops.CpuBackend().add_noise_(a, philox.group_key(1, 2, 3), 1.0)\n"
            "    b = torch.zeros(100); cpu_ops.CpuBackend().add_noise_(b, philox.group_key(1, 2, 3), 1.0)\n"
            "msgs = [str(x.message) for x in w if 'CPU kernels' in str(x.message)]\n"
            "assert len(msgs) == 1 and 'could not be built' in msgs[0], msgs\n"
            "assert cpu_ops.why_unavailable() is not None and backend == 'torch'\n"
            "assert torch.equal(a, philox.gaussian(1, 2, 3, (100,))) and torch.equal(a, b)\n")
    env = dict(os.environ, CXX="/bin/false", ANADP_CACHE_DIR=str(tmp_path))  # an empty cache: a build
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_each_environment_builds_into_its_own_folder(monkeypatch, tmp_path):
    """Two environments sharing one folder rebuilt the kernel at every switch (~19 s, no message)."""
    import sys
    monkeypatch.setenv("ANADP_CACHE_DIR", str(tmp_path))
    here = cpu_ops.build_directory()
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-other-env")
    there = cpu_ops.build_directory()
    assert here != there and here.startswith(str(tmp_path)) and there.startswith(str(tmp_path))


@pytest.mark.parametrize("mixed", [False, True], ids=["float32: one kernel call", "with float64: per tensor"])
def test_one_call_for_many_tensors_draws_each_tensors_own_stream(mixed):
    """add_noise_multi_ (one kernel call for a step's tensors) equals add_noise_ tensor by tensor, bit
    for bit; a float64 tensor among them sends the list through the per-tensor path."""
    backend = get("cpu")
    shapes = [(3, 5), (17,), (4, 4, 4), (1,)]
    dtypes = [torch.float32, torch.float32, torch.float64 if mixed else torch.float32, torch.float32]
    keys, stds = [philox.group_key(9, 2, g) for g in range(4)], [0.5, 1.0, 2.0, 3.0]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g, dtype=d) for s, d in zip(shapes, dtypes)]
    many = [t.clone() for t in start]
    backend.add_noise_multi_(many, keys, stds)
    for t, k, s, got in zip(start, keys, stds, many):
        one = t.clone()
        backend.add_noise_(one, k, s)
        assert torch.equal(one, got) and not torch.equal(one, t)


def test_compiled_group_keys_equal_the_python_derivation():
    from anadp import philox
    from anadp.backends import cpu
    if not cpu.available():
        pytest.skip(f"cpu kernel: {cpu.why_unavailable()}")
    groups = [0, 1, 7, 2**31, 2**32 - 1]
    for seed in (0, 5, 2**63 + 11, 2**64 - 1):
        for step in (0, 3, 2**33 + 1, 2**64 - 1):
            assert cpu.group_keys(seed, step, groups) == philox.group_keys(seed, step, groups)
    with pytest.raises(ValueError):
        cpu.group_keys(2**64, 0, groups)


@pytest.mark.parametrize("name", ["cpu", "torch"])
def test_noise_of_a_shard_is_its_rows_of_the_whole_tensors_noise(name):
    """add_noise_from_ (an FSDP2 shard: rows a..b of a tensor) draws the whole tensor's noise at those
    rows' element indices: equal to the slice of add_noise_ on the whole tensor (odd start and
    length, so the four-per-call Philox blocks are cut in the middle)."""
    if name == "cpu" and cpu_ops.why_unavailable() is not None:
        pytest.skip(f"cpu kernel: {cpu_ops.why_unavailable()}")
    backend, key = get(name), philox.group_key(4, 1, 6)
    base = torch.randn(13, 7, generator=torch.Generator().manual_seed(0))
    whole = base.clone()
    backend.add_noise_(whole, key, 0.7)
    for a, b in [(0, 5), (5, 10), (10, 13)]:
        shard = base[a:b].clone()
        backend.add_noise_from_(shard, key, 0.7, a * 7)
        err = float((shard - whole[a:b]).norm() / whole[a:b].norm())
        assert err < 1e-6 and not torch.equal(shard, base[a:b]), (a, b, err)


def test_a_killed_builds_lock_is_removed_and_a_live_one_kept(tmp_path):
    import os
    import time

    from anadp.backends import cpu
    lock = tmp_path / "lock"
    lock.write_text("")
    cpu._remove_stale_lock(str(tmp_path))
    assert lock.exists()  # a build in progress: wait on it
    old = time.time() - cpu.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale build lock"):
        cpu._remove_stale_lock(str(tmp_path))
    assert not lock.exists()
    cpu._remove_stale_lock(str(tmp_path))  # none: nothing to do

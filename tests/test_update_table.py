"""Host side of the fused update (shared by the triton and cuda backends) and of the
CUDA build: tile tables, hyperparameter rows, argument checks, dtype codes, the
setup.py decision and the cuda backend's error without the extension."""
import importlib.util
import math
import os

import pytest
import torch

from anadp.backends import cuda as cuda_ops
from anadp import update_table as U

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_chunk_table_covers_every_element_once():
    sizes = [0, 5, 64, 65, 130]
    tensor, start = U.tile_table(sizes, tile=64)
    assert tensor.dtype == torch.int32 and start.dtype == torch.int64
    seen = {i: torch.zeros(n, dtype=torch.int64) for i, n in enumerate(sizes)}
    for t, s in zip(tensor.tolist(), start.tolist()):
        seen[t][s:s + 64] += 1
    assert all(bool((v == 1).all()) for v in seen.values())
    assert tensor.tolist() == [1, 2, 3, 3, 4, 4, 4] and start.tolist() == [0, 0, 0, 64, 0, 64, 128]
    for bad in (0, 6):  # a tile's start must be a multiple of 4: four elements share one Philox call
        with pytest.raises(ValueError):
            U.tile_table([3], tile=bad)


def test_tables_hold_pointers_sizes_and_key_bits():
    ps = [torch.zeros(3), torch.zeros(2, 2)]
    gs = [torch.ones(3), torch.ones(2, 2)]
    t = U.tables(ps, gs, [None, torch.zeros(2, 2)], [None, None], [5, 2**64 - 1], tile=4)
    assert t.p_addr.tolist() == [p.data_ptr() for p in ps] and t.g_addr.tolist() == [g.data_ptr() for g in gs]
    assert t.m_addr[0] == ps[0].data_ptr()  # no state: the parameter's own pointer, never read
    assert t.numel.tolist() == [3, 4] and t.keys.tolist() == [5, -1]
    assert t.tile_tensor.tolist() == [0, 1]


@pytest.mark.parametrize("cls,kw", [(torch.optim.Adam, {"weight_decay": 0.1}), (torch.optim.AdamW, {}),
                                    (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.2, "nesterov": False})])
def test_hyper_rows_follow_torch(cls, kw):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = cls([p], lr=0.01, **kw)
    for step in (1, 2, 3):
        m, v, first = U.ensure_state(opt, p)
        row = U.hyper_row(opt, p, first, noise_std=0.5, inv_denom=0.25)
        assert row[U.LR] == 0.01 and row[U.NOISE_STD] == 0.5 and row[U.INV_DENOM] == 0.25
        if cls is torch.optim.SGD:
            assert first == (step == 1) and row[U.FIRST] == float(step == 1)
            assert row[U.ONE_MINUS_BETA1] == 1 - 0.2 and m.dtype == torch.float32 and v is None
        else:
            b1, b2 = opt.param_groups[0]["betas"]
            assert math.isclose(row[U.STEP_SIZE], 0.01 / (1 - b1 ** step))
            assert math.isclose(row[U.BC2_SQRT], math.sqrt(1 - b2 ** step))
            assert row[U.FLAG] == float(cls is torch.optim.AdamW)
            assert row[U.DECAY] == 1 - 0.01 * opt.param_groups[0]["weight_decay"]
        U.finish_step(opt, [p])
    if cls is not torch.optim.SGD:
        assert float(opt.state[p]["step"]) == 3


def test_half_precision_parameters_get_float32_state():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = torch.optim.Adam([p])
    opt.state[p] = {"step": torch.tensor(2.0), "exp_avg": torch.ones(4, dtype=torch.bfloat16),
                    "exp_avg_sq": torch.ones(4, dtype=torch.bfloat16)}  # e.g. from a torch-backend checkpoint
    m, v, _ = U.ensure_state(opt, p)
    assert m.dtype == v.dtype == torch.float32 and bool((m == 1).all())


def test_unsupported_optimizers_are_named():
    p = torch.nn.Parameter(torch.zeros(2))
    assert U.unsupported_reason(torch.optim.Adam([p])) is None
    assert "RMSprop" in U.unsupported_reason(torch.optim.RMSprop([p]))
    assert "amsgrad=True" in U.unsupported_reason(torch.optim.Adam([p], amsgrad=True))
    assert "maximize=True" in U.unsupported_reason(torch.optim.SGD([p], lr=0.1, maximize=True))


def test_update_argument_checks_and_dtype_codes():
    p32, p16 = torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)
    g = torch.zeros(3)
    assert U.check_update_args([p32], [g], [None], [None], U.SGD) == 0
    assert U.check_update_args([p16], [g], [g], [g.clone()], U.ADAM) == 1
    assert U.check_update_args([p16.half()], [g], [None], [None], U.SGD) == 2
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        U.check_update_args([p32.double()], [g], [None], [None], U.SGD)
    with pytest.raises(ValueError, match="kind"):
        U.check_update_args([p32], [g], [None], [None], 7)
    with pytest.raises(ValueError, match="grads must be contiguous float32"):
        U.check_update_args([p32], [g.double()], [None], [None], U.SGD)
    with pytest.raises(ValueError, match="same length"):
        U.check_update_args([p32], [g, g], [None], [None], U.SGD)
    with pytest.raises(ValueError, match="contiguous"):
        U.check_update_args([torch.zeros(3, 2).t()], [torch.zeros(2, 3)], [None], [None], U.SGD)


def test_cuda_backend_without_the_extension_says_how_to_build_it():
    if cuda_ops.import_error is None:
        pytest.skip("the extension is built here")
    assert "ANADP_BUILD_CUDA=1" in cuda_ops.import_error
    with pytest.raises(RuntimeError, match="not built"):
        cuda_ops.multi_tensor_update([torch.zeros(3)], [torch.zeros(3)], [None], [None], [1],
                                     torch.zeros(1, U.N_COLS), kind=U.SGD)


def _setup_module():
    spec = importlib.util.spec_from_file_location("anadp_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    import setuptools
    real, setuptools.setup = setuptools.setup, lambda **kw: None  # load the decision logic, build nothing
    try:
        spec.loader.exec_module(mod)
    finally:
        setuptools.setup = real
    return mod


def test_setup_builds_the_extension_only_where_cuda_is_usable(monkeypatch):
    if torch.version.cuda is not None and torch.cuda.is_available():
        pytest.skip("a CUDA machine builds the extension")
    monkeypatch.delenv("ANADP_BUILD_CUDA", raising=False)
    mod = _setup_module()
    assert mod.cuda_extension() == ([], {})
    monkeypatch.setenv("ANADP_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="cannot be built"):
        mod.cuda_extension()
    monkeypatch.setenv("ANADP_BUILD_CUDA", "0")
    assert mod.cuda_extension() == ([], {})


def test_the_cuda_sources_mirror_the_table():
    """csrc/update_math.h restates the columns, optimizer kinds and statistics of anadp.update_table
    for the C++ side (the CUDA and CPU kernels; the Triton side imports them): the same names in the
    same order."""
    import os
    import re
    src = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc",
                            "update_math.h")).read()
    cols = re.search(r"enum Col \{([^}]*)\}", src).group(1).replace("\n", " ")
    names = [c.strip() for c in cols.split(",") if c.strip()]
    table = sorted((v, k) for k, v in vars(U).items() if isinstance(v, int) and k.isupper() and k not in
                   ("SGD", "ADAM", "N_COLS", "DEFAULT_TILE"))
    assert names == [k for _, k in table] + ["N_COLS"]
    assert re.search(r"enum Kind \{ SGD = (\d), ADAM = (\d) \}", src).groups() == (str(U.SGD), str(U.ADAM))
    mt = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc",
                           "multi_tensor_update.cu")).read()
    assert "const bool sq = stat == 1;" in mt and U.STATS.index("grad_sq") == 1

"""Every kernel against its torch reference, on small awkward shapes (not
multiples of any block size). The Triton kernels run under TRITON_INTERPRET=1 on
CPU tensors without a GPU (see conftest.py), on CUDA with one; the CUDA
extension's kernels (same interface, ``anadp.backends.cuda``) run where it is built
and a GPU is there, and are skipped, with the reason, elsewhere.

Outputs that are only written (norms, sensitivity partials) are filled with NaN
before the launch; in-place updates (parameters, moments) are checked element
by element against torch, and with noise on every element an element left
unwritten keeps its old value and fails the comparison.
"""
import math

import pytest
import torch

from helpers import rel_err

triton = pytest.importorskip("triton")
from anadp import philox  # noqa: E402
from anadp import update_table as U  # noqa: E402
from anadp.kernels.fused_linear import n_tiles  # noqa: E402
from anadp.kernels.fused_linear import clipped_linear_update  # noqa: E402
from anadp.backends import get as backend_kernels  # noqa: E402
from anadp.backends import why_unavailable  # noqa: E402
from anadp.records import EmbeddingRecord, LinearRecord  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["triton", "cuda"])
def k(request):
    """The kernels of one backend with a multi-tensor update on CUDA tensors."""
    why = why_unavailable(request.param, torch.device(DEV))
    if why is not None:
        pytest.skip(f"{request.param} backend: {why}")
    return backend_kernels(request.param)


@pytest.fixture(params=["triton", "cuda", "cpu"])
def u(request):
    """The backends with a multi-tensor update (the cpu backend's is compiled C++, per tensor)."""
    why = why_unavailable(request.param, torch.device(DEV))
    if why is not None:
        pytest.skip(f"{request.param} backend: {why}")
    return backend_kernels(request.param)


@pytest.fixture()
def nk():
    """The backend with per-sample norm kernels: triton (the cuda backend's scalar-loop kernel was deleted)."""
    why = why_unavailable("triton", torch.device(DEV))
    if why is not None:
        pytest.skip(f"triton backend: {why}")
    return backend_kernels("triton")


SHAPES = [(3, 7, 19, 33), (3, 1, 19, 33), (2, 40, 5, 6), (1, 3, 70, 3)]


def nan(*shape):
    return torch.full(shape, float("nan"), device=DEV)


@pytest.mark.parametrize("B,T,d,p", SHAPES)
@pytest.mark.parametrize("ghost", [True, False])
def test_linear_norms(nk, B, T, d, p, ghost):
    g = torch.Generator().manual_seed(B * T + d)
    A, G = torch.randn(B, T, d, generator=g).to(DEV), torch.randn(B, T, p, generator=g).to(DEV)
    out, out_bias = nan(B), nan(B)
    nk.linear_sq_norms(A, G, out=out, out_bias=out_bias, ghost=ghost)
    assert rel_err(out, LinearRecord(A, G).sq_norm()) < 1e-5
    assert rel_err(out_bias, G.sum(1).pow(2).sum(1)) < 1e-5


def test_linear_norms_bf16_and_cost_rule(nk):
    g = torch.Generator().manual_seed(1)
    A, G = torch.randn(3, 7, 19, generator=g).to(DEV), torch.randn(3, 7, 33, generator=g).to(DEV)
    ref = LinearRecord(A, G).sq_norm()
    w, _ = nk.linear_sq_norms(A.bfloat16(), G.bfloat16())  # ghost=None: the torch backend's rule
    assert rel_err(w, ref) < 1e-2
    A2, G2 = A[:, :1].contiguous(), G[:, :1].contiguous()
    assert rel_err(nk.linear_sq_norms(A2, G2)[0], LinearRecord(A2, G2).sq_norm()) < 1e-5


def test_embedding_norms_repeated_rows_and_padding(nk):
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 5, (3, 37), generator=g).to(DEV)  # many repeats, T > one tile
    rec = EmbeddingRecord(idx, torch.randn(3, 37, 19, generator=g).to(DEV), 5, padding_idx=2)
    out = nan(3)
    nk.embedding_sq_norms(rec.idx, rec.G, out=out)
    assert rel_err(out, rec.sq_norm()) < 1e-5


def _torch_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, foreach=True)
    if kind == "nesterov":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    if kind == "plain_sgd":
        return torch.optim.SGD(params, lr=0.1, foreach=True)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, weight_decay=0.1, foreach=True)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)


def _kernel_state(opt, p, std, inv_denom):
    m, v, first = U.ensure_state(opt, p)
    row = torch.tensor(U.hyper_row(opt, p, first, std, inv_denom), dtype=torch.float32, device=DEV)
    return m, v, row


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "plain_sgd", "adam", "adamw"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("B,T,d,p", [(3, 7, 19, 83), (5, 9, 70, 33)])
def test_clipped_linear_update(kind, transposed, B, T, d, p):
    """Two steps of the clipped GEMM + noise + update kernel (the second with an earlier
    physical batch's clipped sum as prior) against clipped_sum + Philox noise + torch's optimizer.
    Shapes: p over two 64-wide tiles; d over two tiles with B*T = 45 rows over two 32-row steps."""
    std, inv = 0.7, 1 / 3.5
    g = torch.Generator().manual_seed(3)
    A, G = torch.randn(B, T, d, generator=g).to(DEV), torch.randn(B, T, p, generator=g).to(DEV)
    c = torch.rand(B, generator=g).to(DEV)
    W0 = torch.randn((d, p) if transposed else (p, d), generator=g).to(DEV)
    prior = torch.randn(W0.shape, generator=g).to(DEV)
    ref, out = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt_ref, opt = _torch_optimizer(kind, [ref]), _torch_optimizer(kind, [out])
    for step in range(2):
        key = philox.group_key(11, step, 4)
        pri = prior if step == 1 else None
        grad = LinearRecord(A, G, transposed).clipped_sum(c) + (0 if pri is None else pri)
        grad = (grad + std * philox.gaussian(11, step, 4, W0.shape, device=DEV)) * inv
        stat = U.STATS[step]  # each statistic once: |p * grad| (p before the update), then grad^2
        sens_ref = (ref.detach() * grad).abs().sum() if stat == "abs_p_grad" else grad.pow(2).sum()
        ref.grad = grad
        opt_ref.step()
        m, v, row = _kernel_state(opt, out, std, inv)
        sens = clipped_linear_update(A, G, c, out.data, kind=U.optimizer_kind(opt), row=row, key=key, m=m, v=v, prior=pri,
                                     transposed=transposed, sens=nan(n_tiles(p, d)), stat=stat)
        U.finish_step(opt, [out])
        assert rel_err(sens.sum(), sens_ref) < 1e-5
        assert rel_err(out, ref) < 1e-5
        for k, s in opt_ref.state[ref].items():
            assert rel_err(opt.state[out][k], s) < 1e-5, k


def test_clipped_linear_update_bf16_weights_fp32_state():
    B, T, d, p = 3, 7, 19, 33
    g = torch.Generator().manual_seed(4)
    A, G = torch.randn(B, T, d, generator=g).to(DEV), torch.randn(B, T, p, generator=g).to(DEV)
    c = torch.rand(B, generator=g).to(DEV)
    W0 = torch.randn(p, d, generator=g).to(DEV)
    ref, out = torch.nn.Parameter(W0.bfloat16().float()), torch.nn.Parameter(W0.bfloat16())
    opt_ref, opt = _torch_optimizer("adamw", [ref]), _torch_optimizer("adamw", [out])
    grad = (LinearRecord(A, G).clipped_sum(c) + 0.5 * philox.gaussian(0, 0, 0, W0.shape, device=DEV)) / 3
    ref.grad = grad
    opt_ref.step()
    m, v, row = _kernel_state(opt, out, 0.5, 1 / 3)
    clipped_linear_update(A.bfloat16(), G.bfloat16(), c, out.data, kind=U.ADAM, row=row, key=philox.group_key(0, 0, 0),
                          m=m, v=v)
    assert out.dtype == torch.bfloat16 and opt.state[out]["exp_avg"].dtype == torch.float32
    assert rel_err(out.float(), ref) < 1e-2
    assert rel_err(opt.state[out]["exp_avg"], opt_ref.state[ref]["exp_avg"]) < 1e-2


def test_clipped_linear_update_bf16_records_round_the_scaled_operand():
    """bf16 records: the kernel's GEMM reads c g rounded to bf16 (one tensor-core GEMM; the clip factors
    absorb that rounding, records.rounding_slack), the same sum as the torch reference of that rounding,
    and not the float32-scaled one (which differs by ~2^-9)."""
    B, T, d, p = 3, 7, 19, 33
    g = torch.Generator().manual_seed(6)
    A = torch.randn(B, T, d, generator=g).to(DEV).bfloat16()
    G = torch.randn(B, T, p, generator=g).to(DEV).bfloat16()
    c = torch.rand(B, generator=g).to(DEV)
    W = torch.zeros(p, d, device=DEV)
    row = torch.zeros(U.N_COLS, device=DEV)
    row[U.LR], row[U.INV_DENOM] = 1.0, 1.0  # plain SGD, lr 1, no noise: W becomes -sum
    clipped_linear_update(A, G, c, W, kind=U.SGD, row=row, key=1, has_noise=False)
    rounded = (G.float() * c[:, None, None]).bfloat16().float().flatten(0, 1).t() @ A.float().flatten(0, 1)
    exact = (G.float() * c[:, None, None]).flatten(0, 1).t() @ A.float().flatten(0, 1)
    assert rel_err(-W, rounded) < 1e-6 and rel_err(-W, exact) > 1e-4


SIZES = [(33,), (7, 19), (1,), (3, 100)]


@pytest.mark.parametrize("kind", ["nesterov", "plain_sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multi_tensor_update(u, kind, dtype):
    """One launch over tensors of awkward sizes, tiles of 64 elements (tensors span several)."""
    g = torch.Generator().manual_seed(5)
    inits = [torch.randn(s, generator=g).to(DEV) for s in SIZES]
    sums = [torch.randn(s, generator=g).to(DEV) for s in SIZES]
    stds, inv = [0.3, 1.1, 2.0, 0.0], 0.25
    refs = [torch.nn.Parameter(x.to(dtype).float().clone()) for x in inits]  # same start; the kernel rounds each step
    outs = [torch.nn.Parameter(x.to(dtype).clone()) for x in inits]
    opt_ref, opt = _torch_optimizer(kind, refs), _torch_optimizer(kind, outs)
    for step in range(2):
        keys = [philox.group_key(9, step, i) for i in range(len(SIZES))]
        stat = U.STATS[step]  # each statistic once
        sens_ref = []
        for i, (r, s) in enumerate(zip(refs, sums)):
            r.grad = (s + stds[i] * philox.gaussian(9, step, i, s.shape, device=DEV)) * inv
            sens_ref.append((r.detach() * r.grad).abs().sum() if stat == "abs_p_grad" else r.grad.pow(2).sum())
        opt_ref.step()
        states = [_kernel_state(opt, o, stds[i], inv) for i, o in enumerate(outs)]
        tiles = sum(-(-o.numel() // 64) for o in outs)
        sens, owner = u.multi_tensor_update(outs, sums, [s[0] for s in states], [s[1] for s in states], keys,
                                          torch.stack([s[2] for s in states]), kind=U.optimizer_kind(opt), tile=64,
                                          sens=nan(tiles), stat=stat)
        U.finish_step(opt, outs)
        per_tensor = torch.zeros(len(outs), dtype=torch.float64, device=DEV).index_add_(0, owner.long(), sens.double())
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(per_tensor, torch.stack(sens_ref)) < tol
        for r, o in zip(refs, outs):
            assert rel_err(o.float(), r) < tol
            for name, s in opt_ref.state[r].items():
                assert rel_err(opt.state[o][name], s) < tol, name


def _noise_through_multi_tensor(k, shape, tile, seed, step, group, offset=0):
    """z from the kernel: plain SGD with lr 1 on a zero gradient turns p into p - z. ``offset``: the
    parameter and its gradient start that many elements into their storage (unaligned for offset 1)."""
    n = math.prod(shape)
    p = torch.zeros(n + offset, device=DEV)[offset:].view(shape)
    grad = torch.zeros(n + offset, device=DEV)[offset:].view(shape)
    assert (p.data_ptr() % 16 != 0) == (offset % 4 != 0)  # torch's own allocations are aligned
    row = torch.zeros(1, U.N_COLS, device=DEV)
    row[0, U.LR], row[0, U.NOISE_STD], row[0, U.INV_DENOM] = 1.0, 1.0, 1.0
    k.multi_tensor_update([p], [grad], [None], [None], [philox.group_key(seed, step, group)], row, kind=U.SGD,
                          tile=tile)
    return -p


def test_unaligned_tensors_get_the_same_update(k):
    """A parameter 4 bytes into its storage: no 16-byte alignment, so the launcher gives no vector hint
    (ALIGN 1, scalar loads); the numbers are the aligned launch's, whole blocks and the tail alike."""
    shape = (37, 29)
    aligned = _noise_through_multi_tensor(k, shape, 1024, 2**64 - 5, 3, 7)
    unaligned = _noise_through_multi_tensor(k, shape, 1024, 2**64 - 5, 3, 7, offset=1)
    assert torch.equal(aligned, unaligned) and float(aligned.abs().sum()) > 0


def test_multi_tensor_noise_is_the_torch_stream_whatever_the_chunking(u):
    ref = philox.gaussian(2**64 - 5, 3, 7, (37, 29), device=DEV)  # a key above 2**63 too
    for tile in (64, 1024, 1 << 16):
        assert (_noise_through_multi_tensor(u, (37, 29), tile, 2**64 - 5, 3, 7) - ref).abs().max() < 1e-6


def test_cpu_multi_tensor_update_stores_the_privatized_gradient():
    """store_grad: the grads hold (clipped sum + std z) * inv afterwards, what the torch path puts in p.grad."""
    why = why_unavailable("cpu", torch.device("cpu"))
    if why is not None:
        pytest.skip(f"cpu backend: {why}")
    g = torch.Generator().manual_seed(6)
    sums = [torch.randn(s, generator=g) for s in SIZES]
    params = [torch.randn(s, generator=g) for s in SIZES]
    keys = [philox.group_key(4, 2, i) for i in range(len(SIZES))]
    rows = torch.zeros(len(SIZES), U.N_COLS)
    rows[:, U.LR], rows[:, U.NOISE_STD], rows[:, U.INV_DENOM] = 0.1, torch.tensor([0.3, 1.1, 2.0, 0.0]), 0.25
    ref = [(s + float(rows[i, U.NOISE_STD]) * philox.gaussian_of_key(keys[i], s.shape)) * 0.25 for i, s in enumerate(sums)]
    grads = [s.clone() for s in sums]
    backend_kernels("cpu").multi_tensor_update(params, grads, [None] * 4, [None] * 4, keys, rows, kind=U.SGD,
                                               store_grad=True)
    for out, r in zip(grads, ref):
        assert rel_err(out, r) < 1e-6


def test_gemm_epilogue_noise_is_the_torch_stream():
    """c = 0, so the update is the noise alone; W stored (19, 33) (Conv1D layout)."""
    W = torch.zeros(19, 33, device=DEV)
    row = torch.zeros(U.N_COLS, device=DEV)
    row[U.LR], row[U.NOISE_STD], row[U.INV_DENOM] = 1.0, 1.0, 1.0
    clipped_linear_update(torch.randn(3, 7, 19, device=DEV), torch.randn(3, 7, 33, device=DEV), torch.zeros(3, device=DEV),
                          W, kind=U.SGD, row=row, key=philox.group_key(1, 2, 3), transposed=True)
    assert (-W - philox.gaussian(1, 2, 3, (19, 33), device=DEV)).abs().max() < 1e-6


def test_kernel_input_errors(k):
    A, G = torch.randn(3, 7, 19, device=DEV), torch.randn(3, 7, 33, device=DEV)
    if k.norms:
        with pytest.raises(ValueError, match="same B, T"):
            k.linear_sq_norms(A, G[:2])
    row = torch.zeros(1, U.N_COLS, device=DEV)
    with pytest.raises(ValueError, match="Adam needs both moments"):
        k.multi_tensor_update([torch.zeros(3, device=DEV)], [torch.zeros(3, device=DEV)], [None], [None], [1], row,
                              kind=U.ADAM)
    with pytest.raises(TypeError, match="one parameter dtype"):
        k.multi_tensor_update([torch.zeros(3, device=DEV), torch.zeros(3, device=DEV).half()],
                              [torch.zeros(3, device=DEV)] * 2, [None] * 2, [None] * 2, [1, 2], row, kind=U.SGD)


def test_gemm_input_errors():
    A, G = torch.randn(3, 7, 19, device=DEV), torch.randn(3, 7, 33, device=DEV)
    row = torch.zeros(U.N_COLS, device=DEV)
    with pytest.raises(ValueError, match="does not match"):
        clipped_linear_update(A, G, torch.ones(3, device=DEV), torch.zeros(19, 33, device=DEV), kind=U.SGD, row=row, key=1)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        clipped_linear_update(A, G, torch.ones(3, device=DEV), torch.zeros(33, 19, dtype=torch.float64, device=DEV),
                              kind=U.SGD, row=row, key=1)
    with pytest.raises(ValueError, match="Adam needs both moments"):
        clipped_linear_update(A, G, torch.ones(3, device=DEV), torch.zeros(33, 19, device=DEV), kind=U.ADAM, row=row,
                              key=1, m=torch.zeros(33, 19, device=DEV))

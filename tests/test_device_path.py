"""The GPU step's dispatch, read on the CPU (bench/device_path.py emulates the device path under bf16
autocast): the step's matrix products run in 16 bits with float32 accumulation, and it dispatches
no more ops than the non-private step allows; records read the 16-bit input autocast's GEMM read."""
import pytest
import torch
from torch import nn

from anadp.engine import GradSampleEngine


def test_autocast_record_keeps_the_16bit_input_that_the_gemm_read():
    """A float32 input (after a LayerNorm) that the autocast Linear read in bf16: the weight's
    per-sample gradient is G^T bf16(A), so the record holds bf16(A) (upcast off the native device)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32))  # T = 4: the ghost norm, (A, G) kept
    x = torch.randn(3, 4, 32)
    engine = GradSampleEngine(m, loss_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    (y.float() ** 2).sum().backward()
    rec = engine.take().records[m[1].weight][0]
    engine.remove()
    h = m[0](x).detach()
    assert h.dtype == torch.float32 and rec.A.dtype == torch.float32  # the CPU keeps records in float32
    assert torch.equal(rec.A, h.to(torch.bfloat16).float()) and not torch.equal(rec.A, h)


def test_device_path_gemms_are_16bit_and_its_ops_within_budget():
    """Compute-free BERT-base shape (12 layers), bf16 autocast: the DP steps run no float32 GEMM
    (reductions over the samples, matrix-vector or by a 0/1 matrix, are not GEMMs) and dispatch at
    most 1.3x the non-private step's aten ops (deterministic counts)."""
    from bench.device_path import rows
    out = {r["method"]: r for r in rows()}
    assert out["nonprivate"]["gemm_flops_16bit"] > 0
    for method in ("anadp_uniform", "anadp", "anadp_per_layer"):
        r = out[method]
        assert r["ops_x_nonprivate"] <= 1.3, (method, r["ops"], out["nonprivate"]["ops"])
        assert r["gemm_flops_16bit"] > out["nonprivate"]["gemm_flops_16bit"]  # the norms' and sums' GEMMs
        assert r["gemm_flops_float32"] == 0, (method, r["float32_gemms"])


def test_device_path_at_bert_base_widths_stacks_the_records_within_budget():
    """BERT-base's widths (768, FFN 3072, T = 256; 2 layers, B = 2), where the records keep (A, G) and take
    ghost norms: on the device path the Linear records of one shape are stacked (stacks._STACK_MAX_NATIVE),
    so the whitened DP steps dispatch at most 1.3x the non-private step's ops on the device (the ANADP
    allocation's host-side ops apart) and still run no float32 GEMM. Unstacked they dispatched ~1.6x."""
    from bench.device_path import WIDE, rows
    out = {r["method"]: r for r in rows(WIDE)}
    for method, bound in (("anadp_uniform", 1.3), ("anadp", 1.3), ("anadp_per_layer", 1.4)):
        # per-layer clipping clips groups as they complete in the backward, up to
        # PerLayerAccumulator.CLIP_BATCH_NATIVE numbers together (was one by one: 1.88x)
        r = out[method]
        assert r["ops_x_nonprivate"] <= bound, (method, r["ops"], out["nonprivate"]["ops"])
        assert r["gemm_flops_float32"] == 0, (method, r["float32_gemms"])
    assert out["anadp"]["host_ops"] > 0 and out["anadp_uniform"]["host_ops"] == 0


def _native(monkeypatch):
    from anadp import records as R
    monkeypatch.setattr(R, "NATIVE_16BIT_DEVICES", {"cuda", "cpu"})  # the CPU stands in for a GPU


def test_one_gemm_clipped_sum_never_exceeds_C(monkeypatch):
    """Adversarial: every token of a sample the same (the rounding errors of c g_t add up coherently,
    relative error up to 2^-8). Each sample's contribution through the one-GEMM clipped sum, with the
    clip factor C / (||g_i|| + slack_i), is at most C (to float32's own rounding of the last
    operations, 1e-6 relative, as in any float32 DP step); with C / ||g_i|| alone, some exceed it by
    up to 2^-8 (so the slack is what keeps the sensitivity)."""
    from anadp.records import LinearRecord
    _native(monkeypatch)
    g = torch.Generator().manual_seed(3)
    B, T, d, p, C = 64, 32, 24, 40, 1.0
    a = torch.randn(B, 1, d, generator=g).expand(B, T, d).to(torch.bfloat16)
    gr = (torch.randn(B, 1, p, generator=g) * 10 ** torch.rand(B, 1, 1, generator=g)).expand(B, T, p)
    rec = LinearRecord(a.contiguous(), gr.to(torch.bfloat16).contiguous())
    norms = rec.sq_norm().sqrt()
    slack = rec.rounding_slack()
    assert slack is not None and bool((slack > 0).all())
    over = {}
    for name, factors in (("slack", C / (norms + slack)), ("plain", C / norms)):
        sizes = torch.stack([LinearRecord(rec.A[i:i + 1], rec.G[i:i + 1]).clipped_sum(factors[i:i + 1]).double().norm()
                             for i in range(B)])
        over[name] = int((sizes > C * (1 + 1e-6)).sum())
        if name == "slack":
            assert float(sizes.max()) > C * (1 - 2 ** -6)  # tight, not loose
    assert over["slack"] == 0 and over["plain"] > 0, over


@pytest.mark.parametrize("clipping", ["whitened", "per_layer"])
def test_the_accumulator_absorbs_the_rounding_in_the_clip_factors(monkeypatch, clipping):
    """The whitened and the per-layer step under bf16 autocast, device path emulated, noise 0: every sample's released
    contribution (batches of one sample) is at most C, though its gradient norm is far above C."""
    import anadp
    _native(monkeypatch)
    torch.manual_seed(5)
    d, p, T, C = 64, 64, 8, 0.5  # T (p + d) < p d: the ghost norm, (A, G) kept, the one-GEMM clipped sum
    model = nn.Sequential(nn.Linear(d, p, bias=False))
    data = torch.utils.data.TensorDataset(torch.randn(1, 1, d).expand(40, T, d).contiguous() *
                                          torch.linspace(1, 50, 40)[:, None, None])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    w = torch.randn(p)
    model, opt, loader = anadp.make_private(model, opt, torch.utils.data.DataLoader(data, batch_size=1),
                                            noise_multiplier=0.0, max_grad_norm=C, allocation="uniform", seed=0,
                                            poisson_sampling=False, loss_reduction="sum", backend="torch",
                                            clipping=clipping)
    sizes = []
    for (x,) in loader:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        (y.float() * w).sum().backward()
        grads = opt.privatize()
        opt.apply(grads)
        sizes.append(float(torch.cat([g.double().flatten() for g in grads]).norm()) * opt.expected_batch_size)
        assert float(opt.last_per_sample_norms.max()) > 10 * C
    assert max(sizes) <= C * (1 + 1e-6) and max(sizes) > 0.99 * C  # float32's own last roundings: 1e-6

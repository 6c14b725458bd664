"""Philox 4x32-10 noise stream: published answers, chunk independence, Triton equality."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from anadp import philox

M = philox.MASK32
# Random123 known-answer vectors for philox4x32_10 (kat_vectors): counter, key -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,out", KAT)
def test_known_answers(ctr, key, out):
    assert philox.philox4x32_int(ctr, key) == out
    words = philox.philox4x32(*[torch.tensor([c]) for c in ctr], *key)
    assert tuple(int(w) for w in words) == out


def test_stream_independent_of_chunking_and_keyed_by_step_and_group():
    a = philox.gaussian(7, 3, 2, (5, 1001), chunk=1 << 16)
    b = philox.gaussian(7, 3, 2, (5, 1001), chunk=97)
    assert torch.equal(a, b)
    assert not torch.equal(a, philox.gaussian(7, 4, 2, (5, 1001)))
    assert not torch.equal(a, philox.gaussian(7, 3, 1, (5, 1001)))
    assert not torch.equal(a, philox.gaussian(8, 3, 2, (5, 1001)))
    # N(0, 1): mean and std within 4 standard errors over n = 5005 draws
    n = a.numel()
    assert abs(float(a.mean())) < 4 / n ** 0.5
    assert abs(float(a.std()) - 1) < 4 / (2 * n) ** 0.5


def test_matches_triton_randn4x():
    """Same uint32 words as tl.randint4x and the same floats as tl.randn4x (interpreter), and the
    kernels' two ways to read the stream (anadp.kernels.update.gaussian for scattered elements,
    gaussian_block for contiguous blocks, four elements per Philox call) give its elements, whatever
    the block size, with int32 offsets and with the int64 offsets the kernels use (also past 2**32)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from anadp.philox import randint4x, randn, randn4x, group_key
        from anadp.kernels.update import gaussian, gaussian_block

        @triton.jit
        def k(out_i, out_n, out_g, out_b, key, base, n, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            ctr = base + i
            m = i < n
            i1, i2, i3, i4 = tl.randint4x(key, ctr)
            tl.store(out_i + i, i1.to(tl.int32, bitcast=True), mask=m)
            tl.store(out_i + n + i, i2.to(tl.int32, bitcast=True), mask=m)
            tl.store(out_i + 2 * n + i, i3.to(tl.int32, bitcast=True), mask=m)
            tl.store(out_i + 3 * n + i, i4.to(tl.int32, bitcast=True), mask=m)
            z1, z2, z3, z4 = tl.randn4x(key, ctr)
            tl.store(out_n + i, z1, mask=m)
            tl.store(out_n + n + i, z2, mask=m)
            tl.store(out_n + 2 * n + i, z3, mask=m)
            tl.store(out_n + 3 * n + i, z4, mask=m)
            # elements of the stream: scattered (e = 4 base + 3 i + 1) and one contiguous block per program
            tl.store(out_g + i, gaussian(key, 4 * base + 3 * i + 1), mask=m)
            e0 = 4 * base + tl.program_id(0) * 4 * BLOCK
            tl.store(out_b + tl.program_id(0) * 4 * BLOCK + tl.arange(0, 4 * BLOCK), gaussian_block(key, e0, 4 * BLOCK))

        n, key = 1000, group_key(123, 7, 5)
        for base in (0, 2**31 + 3, 2**32 + 5):
            for BLOCK in (16, 128, 1024):
                if base == 2**31 + 3 and BLOCK != 128:
                    continue
                grid = triton.cdiv(n, BLOCK)
                oi = torch.full((4 * n,), -1, dtype=torch.int32)
                on = torch.full((4 * n,), float("nan"))
                og = torch.full((n,), float("nan"))
                ob = torch.full((4 * BLOCK * grid,), float("nan"))
                # a Python int base < 2**31 is an int32 kernel argument, larger ones are int64
                k[(grid,)](oi, on, og, ob, key, base, n, BLOCK=BLOCK)
                ctr = base + torch.arange(n)
                ref = torch.cat(randint4x(key, ctr))
                ref = torch.where(ref >= 2**31, ref - 2**32, ref).to(torch.int32)
                assert torch.equal(oi, ref), f"uint32 words differ (base {base}, BLOCK {BLOCK})"
                err = (on - torch.cat(randn4x(key, ctr))).abs().max().item()
                assert err < 1e-6, err
                err_g = (og - randn(key, 4 * base + 3 * torch.arange(n) + 1)).abs().max().item()
                err_b = (ob - randn(key, 4 * base + torch.arange(ob.numel()))).abs().max().item()
                assert err_g < 1e-6 and err_b < 1e-6, (err_g, err_b)
        print("ok", err)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


def test_four_gaussians_per_call_are_independent_standard_normals():
    """The stream's elements 4j .. 4j + 3 come from one Philox call (two Box-Muller pairs): over
    n = 2**16 counters each component has mean 0 and variance 1 and the six pairwise correlations
    are 0, each within 4.5 standard errors (1/sqrt(n) for means and correlations, sqrt(2/n) for
    variances); and element e is component e % 4 of counter e // 4."""
    key, n = philox.group_key(5, 1, 9), 1 << 16
    z = torch.stack(philox.randn4x(key, torch.arange(n))).double()
    se = n ** -0.5
    assert (z.mean(1).abs() < 4.5 * se).all()
    assert ((z.var(1) - 1).abs() < 4.5 * (2 / n) ** 0.5).all()
    corr = torch.corrcoef(z)
    assert (corr[torch.triu_indices(4, 4, 1).unbind()].abs() < 4.5 * se).all()
    e = torch.tensor([0, 1, 2, 3, 4, 7, 4 * 999 + 2])
    assert torch.equal(philox.randn(key, e), z.float().t().flatten()[e])


def test_wrapping_product_equals_split_product():
    x = torch.randint(0, 2**32, (10000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    x[:2] = torch.tensor([0, M])
    for a in (philox.ROUND_A, philox.ROUND_B):
        hi_w, lo_w = philox._mul_hi_lo_wrap(a, x)
        hi_s, lo_s = philox._mul_hi_lo_split(a, x)
        ref = [(a * int(v)) for v in x[:50]]
        assert [int(h) for h in hi_s[:50]] == [r >> 32 for r in ref]
        assert [int(lo) for lo in lo_s[:50]] == [r & M for r in ref]
        if philox._mul_hi_lo is philox._mul_hi_lo_wrap:
            assert torch.equal(hi_w, hi_s) and torch.equal(lo_w, lo_s)

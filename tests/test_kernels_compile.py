"""The Triton kernels compile for real GPUs (sm_80, sm_90: Triton's whole pipeline down
to a cubin with its bundled ptxas), checked on a machine without one: the interpreter
runs the kernels' arithmetic in the other tests, this catches what only the compiler sees."""
import os
import subprocess
import sys

import pytest


def test_triton_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "anadp.kernels.aot_check", "--arch", "80", "90"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.startswith("ok"), (run.stdout + run.stderr)[-3000:]


PTX = """
import re, sys
from anadp.kernels.aot_check import compile_for, multi_tensor_variants
for align in (True, False):
    for fn, sig, consts in multi_tensor_variants(False, align):
        ptx = compile_for(fn, sig, consts, 90).asm["ptx"]
        print(align, consts["P_DTYPE"], consts["KIND"], ",".join(sorted(set(re.findall(r"(?:ld|st)[.]global[.]v[24]", ptx)))))
"""


def test_the_multi_tensor_update_loads_and_stores_vectors_on_sm90():
    """The update kernel's whole blocks read and write 16-byte vectors (ld/st.global.v4 in the sm_90
    PTX) where the launcher's addresses are aligned (ALIGN), and scalars without that hint: the noise +
    update moves at copy bandwidth only with vectors (44% of it with scalar loads on an H200)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", PTX], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [(line.split(" ") + [""])[:4] for line in run.stdout.strip().splitlines()]
    assert len(lines) == 8
    for align, dtype, kind, vectors in lines:
        if align == "True":
            assert "ld.global.v4" in vectors and "st.global.v4" in vectors, (dtype, kind, vectors)
        else:
            assert vectors == "", (dtype, kind, vectors)


MMA = """
import re
from anadp.kernels.aot_check import compile_for, variants
for fn, sig, consts in variants(False):
    if fn.__name__ in ("_ghost_norm_kernel", "_instantiated_norm_kernel", "_clipped_linear_update_kernel"):
        ptx = compile_for(fn, sig, consts, 90).asm["ptx"]
        print(fn.__name__, sig.get("G"), int(bool(re.search(r"\\b(wgmma[.]mma_async|mma[.]sync)", ptx))))
"""


def test_the_gemm_shaped_kernels_use_tensor_cores_on_16bit_records():
    """Every GEMM-shaped Triton kernel (the norms' Gram and per-sample products, the clipped GEMM) runs
    its 16-bit variants' dots on tensor cores (mma / wgmma in the sm_90 PTX); float32 records keep exact
    float32 products, as torch's float32 GEMMs do with TF32 off."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", MMA], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split(" ") for line in run.stdout.strip().splitlines()]
    assert {name for name, _, _ in rows} == {"_ghost_norm_kernel", "_instantiated_norm_kernel",
                                             "_clipped_linear_update_kernel"}
    for name, dtype, mma in rows:
        assert mma == ("0" if dtype == "*fp32" else "1"), (name, dtype)

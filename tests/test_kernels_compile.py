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

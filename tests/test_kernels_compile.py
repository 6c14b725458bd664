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

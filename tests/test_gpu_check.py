"""bench/gpu_check.sh --dry-run: the GPU check script runs end to end on the CPU
(interpreter, tiny sizes), so that it cannot rot between device runs."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HIDE = """
import importlib.abc, sys
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("opacus", "opt_einsum"):
            raise ImportError("hidden by the test: " + name)
sys.meta_path.insert(0, _Hide())
"""


def _env_without_opacus(tmp_path) -> dict:
    """The environment of a bare GPU machine as far as Opacus goes: importing it fails."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE)
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("ANADP_BACKEND", None)
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_stops_at_its_deadline(tmp_path):
    env = dict(_env_without_opacus(tmp_path), DEADLINE_S="1")
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0  # every stage cut to the 1 s left: none can finish
    last = run.stdout.strip().splitlines()[-1]
    assert "after" in last and int(last.split("after ")[1].split(" s")[0]) <= 10, run.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip("triton")
    env = _env_without_opacus(tmp_path)
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    steps = {(r["workload"], r["precision"], r["method"]): r for r in result["steps"]}
    workloads = {r["workload"] for r in result["steps"]}
    assert len(workloads) == 6  # BERT full and LoRA, Llama-like LoRA and full, BERT full compiled, and as CUDA graphs
    for w in workloads:  # the CUDA-graph workload times non-private and uniform only
        for method in ("nonprivate", "anadp uniform") + (("anadp ANADP",) if "reduce-overhead" not in w else ()):
            row = steps[(w, "bf16 autocast", method)]
            assert row["seconds"] > 0 and row["time_ratio"] > 0, row
    assert steps[("bert-tiny, full", "float32", "anadp ANADP, triton, every kernel")]["seconds"] > 0
    kernels = {r["kernel"].split(",")[0] + "," + r["kernel"].split(",")[1]: r for r in result["kernels"]}
    assert kernels["noise + Adam update, triton"]["GB/s"] > 0
    assert "passed" in (tmp_path / "gpu-tests.log").read_text()
    assert "| anadp ANADP |" in (tmp_path / "gpu-check.md").read_text()
    assert any(k.startswith("clipped sum (torch.mm) + triton") for k in (r["kernel"] for r in result["kernels"]))
    assert "skipped: opacus is not installed" in json.dumps(result["steps"])  # Opacus hidden: its rows only

"""GPU step benchmark and kernel rows; bench/gpu_check.sh runs it.

    python -m bench.gpu_step [--dry-run] [--out DIR]

Workloads (random weights, the same data and initial weights for every method), each in one run:
BERT-base full fine-tuning (hidden 768, 12 layers, B=32, T=256) in float32 and under bf16 autocast;
BERT-base with LoRA (r = 8 on query and value, PEFT) in both precisions; a Llama-like decoder
(hidden 2048, 16 layers, T = 1024, B = 4) under bf16 autocast with LoRA (r = 16 on q/k/v/o) and with
full fine-tuning; BERT-base full under bf16 autocast with the forward through torch.compile (non-private,
uniform and ANADP, each compiled), and in mode "reduce-overhead" (CUDA graphs; non-private and uniform: where
inductor cannot capture the private graph, whose ops run Python, it says so and runs it uncaptured). Methods: non-private; anadp ANADP (whitened and per-layer clipping) and uniform on
the default backend (triton on a
GPU: its multi-tensor noise + update, the norms and clipped sums in cuBLAS where kernel_choice says
so); Opacus ghost clipping when opacus is installed; for BERT-base full also anadp ANADP on the cuda
backend with every kernel (ANADP_KERNELS=all) and Opacus hooks. Median step time over --steps after
warm-up steps, peak memory (torch.cuda.max_memory_allocated), ratios to non-private of the same
workload and precision. TF32 stays off (torch's default), so float32 GEMMs are true float32.

Kernels: the multi-tensor noise + Adam update over N float32 elements (28 bytes per element: p, grad,
m, v read; p, m, v written) against a device-to-device copy (8 bytes per element); the per-sample norms
and the clipped GEMM against their cuBLAS formulations (torch.bmm Gram matrices; torch.mm of the
clip-scaled output gradient, then the multi-tensor update) at BERT-base's widest layer, float32 and bf16:
the rows kernel_choice's table is made from.

Profile: one step of non-private and of anadp ANADP (default backend) per precision on BERT-base full
under torch.profiler, the kernels that take the most GPU time (gpu-profile.txt).

--dry-run: tiny sizes on the CPU (Triton interpreter), so that CI keeps it working.
Writes gpu-check.json and gpu-check.md under --out.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time
import warnings

import torch

from bench.suite import Config, build, make_step

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, steps: int, warmup: int, slow: float = 1.0) -> float:
    """Median seconds of fn over ``steps`` calls after ``warmup``; a method whose first call
    takes over ``slow`` seconds gets 1 warm-up and 3 timed calls (the torch backend on the GPU
    took ~4 s a step: its full count cost the first H200 run its time limit)."""
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    if time.perf_counter() - t > slow:
        steps, warmup = min(steps, 3), 1
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(steps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _available(backend: str) -> str | None:
    from anadp.backends import why_unavailable
    return why_unavailable(backend, DEV)


# (label, bench.suite method, backend or None for the default, environment during the row)
CORE = [("nonprivate", "nonprivate", None, {}), ("anadp ANADP", "anadp", None, {}),
        ("anadp uniform", "anadp_uniform", None, {}), ("anadp ANADP per-layer", "anadp_per_layer", None, {}),
        ("opacus ghost", "opacus_ghost", None, {})]
EXTRA = [("anadp ANADP, cuda, every kernel", "anadp", "cuda", {"ANADP_KERNELS": "all"}),
         ("anadp ANADP, triton, every kernel", "anadp", "triton", {"ANADP_KERNELS": "all"}),
         ("opacus hooks", "opacus_hooks", None, {})]
# the model's forward through torch.compile (anadp.compiled: the hooked layers as custom ops), against non-private
# compiled the same way
COMPILED = [("nonprivate", "nonprivate", None, {}), ("anadp uniform", "anadp_uniform", None, {}),
            ("anadp ANADP", "anadp", None, {})]
PRECISIONS = {"float32": None, "bf16 autocast": torch.bfloat16}
PROFILED = ("nonprivate", "anadp ANADP")


def workloads(dry_run: bool) -> list[dict]:
    """The step table's workloads, most important first (rows are written as they finish)."""
    if dry_run:
        bert, llama = Config("bert-tiny", "bert", 4, 16, 32, 1, 200), Config("llama-tiny", "llama", 2, 16, 64, 1, 200)
    else:
        bert = Config("bert-base-like 768x12 B=32 T=256", "bert", 32, 256, 768, 12)
        llama = Config("llama-like 2048x16 B=4 T=1024", "llama", 4, 1024, 2048, 16, 32000)
    return [
        {"name": f"{bert.name}, full", "cfg": bert, "lora": None, "precisions": ["bf16 autocast", "float32"],
         "methods": CORE, "profile": True},
        {"name": f"{bert.name}, LoRA r=8 q/v", "cfg": bert, "lora": (8, ["query", "value"]),
         "precisions": ["bf16 autocast", "float32"], "methods": CORE},
        {"name": f"{llama.name}, LoRA r=16 q/k/v/o", "cfg": llama, "lora": (16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
         "precisions": ["bf16 autocast"], "methods": CORE},
        {"name": f"{llama.name}, full", "cfg": llama, "lora": None, "precisions": ["bf16 autocast"], "methods": CORE},
        {"name": f"{bert.name}, full, torch.compile", "cfg": bert, "lora": None, "precisions": ["bf16 autocast"],
         "methods": COMPILED, "compile": True},
        {"name": f"{bert.name}, full, torch.compile reduce-overhead (CUDA graphs)", "cfg": bert, "lora": None,
         "precisions": ["bf16 autocast"], "methods": COMPILED[:2], "compile": "reduce-overhead"},
        {"name": f"{bert.name}, full", "cfg": bert, "lora": None, "precisions": ["bf16 autocast", "float32"],
         "methods": EXTRA},
    ]


def _with_lora(model, lora):
    """PEFT LoRA on the target modules (the classifier head trained too, as PEFT's SEQ_CLS does)."""
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model
    r, targets = lora
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets,
                                            task_type="SEQ_CLS"))


def _profile(step, title: str) -> str:
    """The kernels of one step that take the most GPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync()
    key = "self_cuda_time_total" if DEV.type == "cuda" else "self_cpu_time_total"
    return f"## {title}\n\n" + prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70) + "\n"


def step_rows(workload: dict, steps: int, warmup: int, rows: list, checkpoint=None,
              profiles: list | None = None) -> list[dict]:
    """Every method of one workload at each of its precisions, appended to ``rows``;
    ``checkpoint(rows)`` after each row (partial results survive a timeout)."""
    import copy
    try:
        base_model, inputs, labels = build(workload["cfg"])
        base_model = _with_lora(base_model, workload["lora"]).to(DEV)
    except Exception as e:  # noqa: BLE001 - a workload that cannot be built (no peft) is a result
        rows.append({"workload": workload["name"], "method": "all", "precision": "",
                     "error": f"skipped: {type(e).__name__}: {str(e)[:160]}"})
        return rows
    inputs, labels = {k: v.to(DEV) for k, v in inputs.items()}, labels.to(DEV)
    for precision in workload["precisions"]:
        dtype = PRECISIONS[precision]
        for name, method, backend, env in workload["methods"]:
            row = {"workload": workload["name"], "method": name, "precision": precision}
            model = step = None
            saved = {k: os.environ.get(k) for k in env}
            if backend is not None and _available(backend):
                row["error"] = f"skipped: {_available(backend)}"
            elif method.startswith("opacus") and not _has_opacus():
                row["error"] = "skipped: opacus is not installed"
            else:
                try:
                    os.environ.update(env)
                    model = copy.deepcopy(base_model)  # the same initial weights for every method
                    if DEV.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    step, _ = make_step(method, model, inputs, labels, backend=backend or "auto", autocast=dtype,
                                        compile=workload.get("compile", False))
                    row["seconds"] = _timed(step, steps, warmup)
                    row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if DEV.type == "cuda" else None
                    if profiles is not None and workload.get("profile") and name in PROFILED:
                        profiles.append(_profile(step, f"{name}, {precision}, {workload['name']}"))
                except Exception as e:  # noqa: BLE001 - a method that cannot run is a result
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
                    model = step = None
                    gc.collect()  # hooks make reference cycles: free the last method's model before the next
                    if DEV.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
            _ratios(rows)
            if checkpoint:
                checkpoint(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    for r in rows:
        base = next((b for b in rows if b["method"] == "nonprivate" and b["precision"] == r["precision"]
                     and b["workload"] == r["workload"] and "seconds" in b), None)
        if base and "seconds" in r:
            r["time_ratio"] = r["seconds"] / base["seconds"]
            if base.get("peak_mb") and r.get("peak_mb"):
                r["memory_ratio"] = r["peak_mb"] / base["peak_mb"]


def _has_opacus() -> bool:
    try:
        import opacus  # noqa: F401
        return True
    except ImportError:
        return False


def _per_backend(rows: list, name: str, timed) -> None:
    """One row per kernel backend: timed(kernels module) -> row fields, or why it is skipped."""
    from anadp.backends import get as kernels
    for backend in ("triton", "cuda"):
        why = _available(backend)
        label = name.format(backend=backend)
        rows.append({"kernel": label, "error": f"skipped: {why}"} if why else {"kernel": label, **timed(kernels(backend))})


def kernel_rows(n: int, steps: int, warmup: int, norm_shape) -> list[dict]:
    from anadp import philox
    from anadp import update_table as U
    from anadp.records import LinearRecord
    src, dst = torch.randn(n, device=DEV), torch.empty(n, device=DEV)
    t = _timed(lambda: dst.copy_(src), steps, warmup)
    copy_bw = 8 * n / t
    rows = [{"kernel": f"device copy, {n} float32", "seconds": t, "GB/s": copy_bw / 1e9}]
    p, grad = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    row = torch.tensor([_adam_row()], dtype=torch.float32, device=DEV)
    key = philox.group_key(0, 0, 0)

    def update(k):
        t = _timed(lambda: k.multi_tensor_update([p], [grad], [m], [v], [key], row, kind=U.ADAM), steps, warmup)
        return {"seconds": t, "GB/s": 28 * n / t / 1e9, "of_copy": 28 * n / t / copy_bw}

    _per_backend(rows, f"noise + Adam update, {{backend}}, {n} float32", update)
    B, T, d, pp = norm_shape
    A, G = torch.randn(B, T, d, device=DEV), torch.randn(B, T, pp, device=DEV)
    W = torch.randn(pp, d, device=DEV)
    A2, G2 = A.reshape(B * T, d), G.reshape(B * T, pp)
    shape = f"B={B} T={T} d={d} p={pp}, float32"
    fwd = _timed(lambda: A2 @ W.t(), steps, warmup)
    wgrad = _timed(lambda: G2.t() @ A2, steps, warmup)
    rows.append({"kernel": f"layer forward GEMM x W^T, torch, {shape}", "seconds": fwd, "of_gemm": fwd / wgrad})
    rows.append({"kernel": f"layer weight-gradient GEMM G^T A, torch, {shape}", "seconds": wgrad, "of_gemm": 1.0})
    t = _timed(LinearRecord(A, G).sq_norm, steps, warmup)
    rows.append({"kernel": f"per-sample norms, torch backend, {shape}", "seconds": t, "of_gemm": t / wgrad})

    def norms(k):
        if not k.norms:
            return {"error": "skipped: no norm kernel in this backend"}
        t = _timed(lambda: k.linear_sq_norms(A, G), steps, warmup)
        return {"seconds": t, "of_gemm": t / wgrad}

    _per_backend(rows, f"per-sample norms, {{backend}}, {shape}", norms)
    c = torch.rand(B, device=DEV)
    Wm, Wv = torch.zeros_like(W), torch.zeros_like(W)
    adam_row = torch.tensor(_adam_row(), dtype=torch.float32, device=DEV)

    def gemm(k):
        if not k.fused_gemm:
            return {"error": "skipped: no clipped GEMM kernel in this backend"}
        t = _timed(lambda: k.clipped_linear_update(A, G, c, W, kind=U.ADAM, row=adam_row, key=key, m=Wm, v=Wv),
                   steps, warmup)
        return {"seconds": t, "of_gemm": t / wgrad}

    _per_backend(rows, f"clipped GEMM + noise + Adam, {{backend}}, {shape}", gemm)

    def cublas_clipped(k):  # the formulation the step uses by default: torch.mm, then the multi-tensor update
        def run():
            rec.clipped_sum(c)
            k.multi_tensor_update([W], [Wg], [Wm], [Wv], [key], adam_row[None], kind=U.ADAM)
        t = _timed(run, steps, warmup)
        return {"seconds": t, "of_gemm": t / wgrad}

    rec, Wg = LinearRecord(A, G), torch.zeros_like(W)
    _per_backend(rows, f"clipped sum (torch.mm) + {{backend}} noise + Adam, {shape}", cublas_clipped)
    # bf16 (autocast) inputs: the torch backend's 16-bit GEMMs (records.gemm32) against the bf16 weight-gradient GEMM
    A16, G16 = A.bfloat16(), G.bfloat16()
    shape16 = shape.replace("float32", "bf16")
    wgrad16 = _timed(lambda: G16.reshape(B * T, pp).t() @ A16.reshape(B * T, d), steps, warmup)
    rows.append({"kernel": f"layer weight-gradient GEMM G^T A, torch, {shape16}", "seconds": wgrad16, "of_gemm": 1.0})
    rec16 = LinearRecord(A16, G16)
    # a Linear after a LayerNorm under autocast: a float32 input, a bf16 output gradient (the record reads A in bf16)
    mixed = LinearRecord(A, G16)
    shape_mixed = shape.replace("float32", "A float32 (after a LayerNorm), G bf16")
    for label, fn, where in (("per-sample norms, torch backend", rec16.sq_norm, shape16),
                             ("clipped sum, torch backend (1 bf16 GEMM)", lambda: rec16.clipped_sum(c), shape16),
                             ("rounding slack of the clipped sum", rec16.rounding_slack, shape16),
                             ("record of a mixed-dtype Linear", lambda: LinearRecord(A, G16), shape_mixed),
                             ("per-sample norms, torch backend", mixed.sq_norm, shape_mixed),
                             ("clipped sum, torch backend (1 bf16 GEMM)", lambda: mixed.clipped_sum(c), shape_mixed)):
        t = _timed(fn, steps, warmup)
        rows.append({"kernel": f"{label}, {where}", "seconds": t, "of_gemm": t / wgrad16})

    def norms16(k):
        if not k.norms:
            return {"error": "skipped: no norm kernel in this backend"}
        t = _timed(lambda: k.linear_sq_norms(A16, G16), steps, warmup)
        return {"seconds": t, "of_gemm": t / wgrad16}

    _per_backend(rows, f"per-sample norms, {{backend}}, {shape16}", norms16)
    return rows


def _adam_row() -> list[float]:
    """A mid-training Adam row (step 10, lr 1e-3, sigma*C = 1, B = 32)."""
    from anadp import update_table as U
    row = [0.0] * U.N_COLS
    row[U.LR], row[U.BETA1], row[U.BETA2], row[U.EPS] = 1e-3, 0.9, 0.999, 1e-8
    row[U.ONE_MINUS_BETA1], row[U.ONE_MINUS_BETA2], row[U.DECAY] = 0.1, 0.001, 1.0
    row[U.STEP_SIZE], row[U.BC2_SQRT] = 1e-3 / (1 - 0.9 ** 10), (1 - 0.999 ** 10) ** 0.5
    row[U.NOISE_STD], row[U.INV_DENOM] = 1.0, 1 / 32
    return row


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    lines = [f"# GPU check — {result['device']}, {result['date']}", "", f"Step: {result['config']}", "",
             "| workload | precision | method | s/step | x non-private | peak MB | x non-private mem | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r.get('workload', '')} | {r['precision']} | {r['method']} | {_fmt(r.get('seconds'), '.4f')} | "
                     f"{_fmt(r.get('time_ratio'), '.2f')} | {_fmt(r.get('peak_mb'), '.0f')} | "
                     f"{_fmt(r.get('memory_ratio'), '.2f')} | {r.get('error', '')} |")
    lines += ["", "| kernel | seconds | GB/s | of copy bandwidth | x weight-gradient GEMM | note |",
              "|---|---|---|---|---|---|"]
    for r in result.get("kernels", []):
        lines.append(f"| {r['kernel']} | {_fmt(r.get('seconds'), '.6f')} | {_fmt(r.get('GB/s'), '.1f')} | "
                     f"{_fmt(r.get('of_copy'), '.2f')} | {_fmt(r.get('of_gemm'), '.2f')} | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def _write(out: str, result: dict) -> str:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu-check.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(out, "gpu-check.md"), "w") as f:
        f.write(md)
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook")  # Opacus and HF models, every step
    if args.dry_run:
        n, norm_shape, steps, warmup = 4096, (2, 16, 32, 48), 2, 1
    else:
        n, norm_shape, steps, warmup = 1 << 26, (32, 256, 768, 3072), 10, 3
    steps = args.steps or steps
    device = torch.cuda.get_device_name() if DEV.type == "cuda" else f"{platform.machine()} CPU (dry run)"
    result = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "config": "AdamW, sigma 1, C 1, random weights", "dry_run": args.dry_run, "steps": []}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        pass
    profiles: list[str] = []
    t0 = time.perf_counter()
    result["kernels"] = kernel_rows(n, steps, warmup, norm_shape)
    _write(args.out, result)
    print(f"kernels done in {time.perf_counter() - t0:.0f} s", flush=True)

    def checkpoint(rows):
        result["steps"] = rows
        _write(args.out, result)
        print(f"{time.perf_counter() - t0:6.0f} s  {rows[-1]}", flush=True)

    rows: list = []
    for workload in workloads(args.dry_run):
        step_rows(workload, steps, warmup, rows, checkpoint, profiles)
    with open(os.path.join(args.out, "gpu-profile.txt"), "w") as f:
        f.write("\n".join(profiles))
    print(_write(args.out, result))


if __name__ == "__main__":
    main()

"""The GPU step's dispatch, read on the CPU: the compute-free BERT-base shape (bench.host_overhead's)
under bf16 autocast with the device path emulated, DP against non-private in one run.

Emulated: 16-bit records kept as they are and their GEMMs taking 16-bit inputs with float32
accumulation and output (``torch.mm / bmm(..., out_dtype=torch.float32)``, cuBLAS's; the CPU has no
such kernel, so this mode computes it in float32 and counts it as 16-bit). Counted: the aten ops a
step dispatches below autograd (each a launch on a GPU; the ANADP allocation's, which works on host
copies of the released statistics, counted apart), and every matrix product with its operands'
dtype and flops, so that a float32 GEMM on the device path shows, with its shape.

    python -m bench.device_path            # table: bench/results/device-path-<date>.md with --out
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.host_overhead import CONFIG, SMOKE_CONFIG
from bench.suite import Config, build, make_step

# BERT-base's widths (768, FFN 3072) and sequence (T = 256), 2 layers, B = 2: the records' real choices
# (ghost norms, kept (A, G), one GEMM each), which the compute-free width 16 does not make
WIDE = Config("bert-base widths, 2 layers, B=2 T=256", "bert", 2, 256, 768, 2, 1000)

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)
# matrix products: (operand positions, flops of the call)
_GEMMS = {
    "mm": ((0, 1), lambda a, b: 2 * a.shape[0] * a.shape[1] * b.shape[1]),
    "bmm": ((0, 1), lambda a, b: 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]),
    "addmm": ((1, 2), lambda a, b: 2 * a.shape[0] * a.shape[1] * b.shape[1]),
    "baddbmm": ((1, 2), lambda a, b: 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]),
}


# anadp's code that runs on host copies of the released statistics (allocation_feed reads them back)
_HOST_SIDE = ("anadp/allocation.py",)


class DevicePath(TorchDispatchMode):
    """Counts ops and matrix products; serves ``mm.dtype`` / ``bmm.dtype`` (16-bit inputs, float32
    accumulation and output) on the CPU as the device would."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.host_ops = 0  # of them, the allocation's (anadp/allocation.py works on host copies: no launch)
        self.gemms: list = []  # (op, operand dtypes, shapes, flops, "16-bit" | "float32")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        f = sys._getframe(1)
        while f is not None and not f.f_code.co_filename.endswith(_HOST_SIDE):
            f = f.f_back
        self.host_ops += f is not None
        if name in _GEMMS:
            (i, j), flops = _GEMMS[name]
            a, b = args[i], args[j]
            # a product with a vector side (one row or column: weighted sums over the samples, the norms'
            # whitening) is a reduction, not a GEMM; the GEMMs must be 16-bit with float32 accumulation;
            # a 0/1 matrix (per-layer clipping's group sums of the squared norms) selects and adds rows
            vector = a.shape[-2] == 1 or b.shape[-1] == 1 or bool(((a == 0) | (a == 1)).all())
            kind = "vector" if vector else "16-bit" if a.dtype in HALF and b.dtype in HALF else "float32"
            self.gemms.append((name, (a.dtype, b.dtype), (tuple(a.shape), tuple(b.shape)), flops(a, b), kind))
            if func in (aten.mm.dtype, aten.bmm.dtype):  # out_dtype float32: cuBLAS's 16-bit GEMM
                return func.overloadpacket.default(a.float(), b.float())
        return func(*args, **kwargs)


def emulated(fn):
    """Run ``fn`` with the CPU taken for a device whose GEMMs take 16-bit inputs (records.NATIVE_16BIT_DEVICES)."""
    from anadp import records
    saved, out_dtype = set(records.NATIVE_16BIT_DEVICES), records._OUT_DTYPE
    records.NATIVE_16BIT_DEVICES.add("cpu")
    records._OUT_DTYPE = True  # an earlier refusal of out_dtype on the CPU (outside this mode) is forgotten
    try:
        return fn()
    finally:
        records.NATIVE_16BIT_DEVICES.clear()
        records.NATIVE_16BIT_DEVICES.update(saved)
        records._OUT_DTYPE = out_dtype


def measure(method: str, cfg=CONFIG, dtype=torch.bfloat16) -> dict:
    """One step's ops and matrix products (after two warm-up steps) of ``method`` under autocast."""
    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, inputs, labels = build(cfg)
            step, _ = make_step(method, model, inputs, labels, autocast=dtype, backend="cpu")
            with DevicePath():  # warm-up, under the mode too: its 16-bit GEMMs exist only here
                step()
                step()
            with DevicePath() as mode:
                step()
        return mode
    mode = emulated(run)
    flops = collections.Counter()
    for *_, f, kind in mode.gemms:
        flops[kind] += f
    f32 = collections.Counter((g[0], g[1], g[2]) for g in mode.gemms if g[4] == "float32")
    return {"method": method, "ops": sum(mode.ops.values()) - mode.host_ops, "host_ops": mode.host_ops,
            "gemms": len(mode.gemms),
            "gemm_flops_16bit": flops["16-bit"], "gemm_flops_float32": flops["float32"],
            "vector_flops": flops["vector"],
            "float32_gemms": [f"{op} {dt} {sh} x{n}" for (op, dt, sh), n in f32.most_common()],
            "top_ops": dict(mode.ops.most_common(10))}


def rows(cfg=CONFIG, methods=("nonprivate", "anadp_uniform", "anadp", "anadp_per_layer")) -> list[dict]:
    out = [measure(m, cfg) for m in methods]
    for r in out:
        r["ops_x_nonprivate"] = r["ops"] / out[0]["ops"]
    return out


def table(rows: list[dict], cfg=CONFIG) -> str:
    lines = [f"| {cfg.name}, bf16 autocast, device path emulated | aten ops on the device | x non-private | "
             "host-side ops (allocation) | matrix products | "
             "16-bit GEMM MFLOP | float32 GEMM MFLOP | reductions (matrix-vector, 0/1) MFLOP |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ops']} | {r['ops_x_nonprivate']:.2f} | {r['host_ops']} | {r['gemms']} | "
                     f"{r['gemm_flops_16bit'] / 1e6:.2f} | {r['gemm_flops_float32'] / 1e6:.2f} | "
                     f"{r['vector_flops'] / 1e6:.3f} |")
    for r in rows:
        if r["float32_gemms"]:
            lines += ["", f"float32 matrix products of {r['method']}: " + "; ".join(r["float32_gemms"][:12])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="2 layers instead of 12")
    ap.add_argument("--wide", action="store_true", help="also BERT-base's widths, 2 layers (a minute on a CPU)")
    ap.add_argument("--out", help="folder to write device-path-<date>.md into")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = SMOKE_CONFIG if args.smoke else CONFIG
    text = table(rows(cfg), cfg)
    if args.wide:
        text += "\n" + table(rows(WIDE), WIDE)
    print(text)
    if args.out:
        path = os.path.join(args.out, f"device-path-{datetime.date.today().isoformat()}.md")
        with open(path, "w") as f:
            f.write(f"# python -m bench.device_path{' --smoke' if args.smoke else ''}{' --wide' if args.wide else ''} "
                    f"({datetime.datetime.now().isoformat(timespec='minutes')}, torch {torch.__version__})\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

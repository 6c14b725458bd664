"""Compile every Triton kernel for real GPUs on a machine without one.

    python -m anadp.kernels.aot_check [--arch 80 90]

Each kernel variant the launchers can ask for (optimizer kind, noise, prior,
parameter dtype) goes through Triton's full pipeline to a cubin (ptxas included)
for each architecture, so a kernel that only works in the interpreter fails here.
Run without TRITON_INTERPRET (tests/test_kernels_compile.py does this in a subprocess).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time


def variants(everything: bool = False):
    """(kernel, signature, constexprs): every variant the launchers use, or (default) a set
    that takes every value of every constexpr switch and dtype at least once, in pairs."""
    from . import fused_linear, norms
    sizes = {n: "i32" for n in ("T", "d", "p", "n_i", "R")}
    strides = {n: "i64" for n in ("stride_ab", "stride_at", "stride_gb", "stride_gt", "stride_ib", "stride_it",
                                  "stride_ar", "stride_gr", "stride_wp", "stride_wd")}

    def sig(fn, ptrs: dict, consts: dict):
        types = {**sizes, **strides, **ptrs}
        return fn, {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}, consts

    for dt in ("fp32", "bf16"):
        p = {"A": f"*{dt}", "G": f"*{dt}", "W_OUT": "*fp32", "B_OUT": "*fp32"}
        yield sig(norms._ghost_norm_kernel, p, {"BT": 32, "BK": 64, "DOT16": dt != "fp32"})
        yield sig(norms._instantiated_norm_kernel, p, {"BP": 64, "BD": 64, "BT": 32, "DOT16": dt != "fp32"})
    yield sig(norms._embedding_norm_kernel, {"IDX": "*i64", "G": "*fp32", "OUT": "*fp32"}, {"BT": 32, "BK": 64})
    # (weight dtype, records' dtype, kind, prior, noise, stat)
    gemm = [("fp32", "fp32", 0, False, True, 0), ("fp32", "fp32", 1, True, True, 1), ("bf16", "fp32", 1, False, False, 0),
            ("fp16", "fp32", 0, True, False, 1), ("bf16", "bf16", 0, True, True, 1), ("fp32", "bf16", 1, False, True, 0)]
    for dt, rec, kind, prior, noise, stat in (itertools.product(("fp32", "bf16", "fp16"), ("fp32", "bf16"), (0, 1),
                                                                (False, True), (False, True), (0, 1))
                                              if everything else gemm):
        p = {"A": f"*{rec}", "G": f"*{rec}", "C": "*fp32", "W": f"*{dt}", "M": "*fp32", "V": "*fp32", "PRIOR": "*fp32",
             "KEYS": "*i64", "ROW": "*fp32", "SENS": "*fp32"}
        yield sig(fused_linear._clipped_linear_update_kernel, p,
                  {"KIND": kind, "HAS_PRIOR": prior, "HAS_NOISE": noise, "STAT": stat, "BP": 64, "BD": 64, "BK": 32,
                   "DOT16": rec != "fp32"})
    yield from multi_tensor_variants(everything)


def multi_tensor_variants(everything: bool = False, align: bool = True):
    """The multi-tensor update's variants (``align``: addresses 16-byte aligned, the launcher's usual case)."""
    import triton.language as tl

    from . import multi_tensor
    names = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16"}
    multi = [(tl.float32, 0, True, 0), (tl.float32, 1, False, 1), (tl.bfloat16, 1, True, 1), (tl.float16, 0, False, 0)]
    fn = multi_tensor._multi_tensor_update_kernel
    for dt, kind, noise, stat in (itertools.product((tl.float32, tl.bfloat16, tl.float16), (0, 1), (False, True), (0, 1))
                                  if everything else multi):
        types = {"TILE_TENSOR": "*i32", "TILE_START": "*i64", "P_OFF": "*i64", "G_OFF": "*i64", "M_OFF": "*i64",
                 "V_OFF": "*i64", "NUMEL": "*i64", "KEYS": "*i64", "ROWS": "*fp32", "SENS": "*fp32",
                 "P_BASE": f"*{names[dt]}", "G_BASE": "*fp32", "M_BASE": "*fp32", "V_BASE": "*fp32"}
        consts = {"P_DTYPE": dt, "KIND": kind, "HAS_NOISE": noise, "STAT": stat, "TILE": 1 << 16, "BLOCK": 1024,
                  "ALIGN": (16 // (4 if dt == tl.float32 else 2)) if align else 1}
        yield fn, {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}, consts


def compile_for(fn, signature: dict, consts: dict, arch: int):
    """Triton's full pipeline for sm_``arch``, every pointer argument 16-byte aligned (what the launcher's
    tensors are, and what Triton's JIT specializes on at run time)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items() if t.startswith("*")}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    ap.add_argument("--all", action="store_true", help="every variant (every constexpr combination; a few minutes on 2 cores)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    count, t0 = 0, time.time()
    for arch in args.arch:
        for fn, signature, consts in variants(args.all):
            compiled = compile_for(fn, signature, consts, arch)
            if not compiled.asm.get("cubin"):
                sys.exit(f"{fn.__name__} {consts}: no cubin for sm_{arch}")
            count += 1
    print(f"ok  {count} Triton kernel variants compiled to cubin for sm_{', sm_'.join(map(str, args.arch))} "
          f"in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

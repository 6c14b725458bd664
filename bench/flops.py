"""Floating-point operations of one training step, per method, on the whole-model rows of bench.run:
what a step must compute whatever the machine's load (torch.utils.flop_counter counts the matrix
products; elementwise work and the noise are not counted). A DP step's excess over non-private is
its per-sample norms' products: the ghost norms' Gram matrices where the engine keeps (A, G), none
where it forms per-sample gradients (records.ghost_is_cheaper).

    python -m bench.flops            # table -> bench/results/flops-<date>.md
    python -m bench.flops --smoke    # tiny models (CI)

anadp runs its torch backend here: every product is an aten op the counter sees (the kernel
backends run the same products in their own kernels).
"""
from __future__ import annotations

import argparse
import datetime
import os
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.suite import build, make_step, model_configs

METHODS = ["nonprivate", "opacus_ghost", "anadp", "anadp_per_layer"]


def step_flops(cfg, method: str) -> dict:
    """Matrix-product flops of one step (after a first, uncounted one), in total and by aten op."""
    model, inputs, labels = build(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step, _ = make_step(method, model, inputs, labels, backend="torch")  # only anadp reads it
        step()
        counter = FlopCounterMode(display=False)
        with counter:
            step()
    by_op = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"config": cfg.name, "method": method, "flops": counter.get_total_flops(), "by_op": by_op}


def rows(smoke: bool, methods=METHODS) -> list[dict]:
    out = []
    for cfg in model_configs(smoke):
        base = None
        for method in methods:
            r = step_flops(cfg, method)
            base = r["flops"] if method == "nonprivate" else base
            r["x_nonprivate"] = r["flops"] / base if base else None
            out.append(r)
    return out


def table(rs: list[dict]) -> str:
    lines = ["| config | method | GFLOP/step | x non-private | bmm GFLOP (per-sample norms, clipped sums) |",
             "|---|---|---|---|---|"]
    for r in rs:
        x = f"{r['x_nonprivate']:.3f}" if r["x_nonprivate"] else ""
        lines.append(f"| {r['config']} | {r['method']} | {r['flops'] / 1e9:.2f} | {x} | "
                     f"{r['by_op'].get('bmm', 0) / 1e9:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    rs = rows(args.smoke)
    text = table(rs)
    print(text, end="")
    if not args.smoke:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"flops-{datetime.date.today()}.md")
        with open(path, "w") as f:
            f.write(f"# Matrix-product flops of one training step ({datetime.date.today()}, "
                    f"`python -m bench.flops`, torch {torch.__version__})\n\n{text}")
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

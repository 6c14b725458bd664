"""Where a step's time goes: self CPU time per aten op of one training step, per method, next to
non-private's, on one whole-model row of bench.run (one thread, the methods' steps interleaved
round by round so that a change in the machine's load hits each alike). What is not inside an aten
op (Python, autograd's hooks, anadp's compiled kernels, which are not aten ops) is the step's wall
time less the ops' sum.

    python -m bench.op_profile                   # BERT-like row -> bench/results/op-profile-<date>.md
    python -m bench.op_profile --config 1        # the GPT-2-like row (indices of bench.suite.model_configs)
    python -m bench.op_profile --smoke           # tiny model (CI)
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import statistics
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from bench.suite import build, make_step, model_configs

METHODS = ["nonprivate", "anadp", "anadp_per_layer"]
OUTSIDE = "(outside aten ops)"


def _profiled(step) -> tuple[float, dict]:
    """(wall seconds, {aten op: self CPU seconds}) of one call of ``step``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    ops: dict = collections.defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            ops[e.key[6:]] += e.self_cpu_time_total / 1e6
    return wall, dict(ops)


def profile_steps(cfg, methods=METHODS, rounds: int = 5) -> dict:
    """{method: {"wall": median wall seconds, "ops": {op: median seconds}}} over ``rounds`` profiled
    steps of each method (after one unprofiled step), the methods interleaved."""
    steps = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in methods:
            model, inputs, labels = build(cfg)
            steps[m], _ = make_step(m, model, inputs, labels)
            steps[m]()
        seen = {m: [] for m in methods}
        for _ in range(rounds):
            for m in methods:
                seen[m].append(_profiled(steps[m]))
    out = {}
    for m, runs in seen.items():
        names = {k for _, ops in runs for k in ops}
        ops = {k: statistics.median(o.get(k, 0.0) for _, o in runs) for k in names}
        wall = statistics.median(w for w, _ in runs)
        ops[OUTSIDE] = max(0.0, wall - sum(ops.values()))
        out[m] = {"wall": wall, "ops": ops}
    return out


def table(result: dict, top: int = 12) -> str:
    """Per method: its wall time against non-private's, and the ops that make the difference
    (largest excess first), in ms and as a share of non-private's step."""
    base = result["nonprivate"]
    lines = []
    for m, r in result.items():
        if m == "nonprivate":
            continue
        lines += [f"**{m}**: {r['wall'] * 1e3:.0f} ms against non-private's {base['wall'] * 1e3:.0f} ms "
                  f"({r['wall'] / base['wall']:.3f}x)", "",
                  "| op | non-private ms | " + m + " ms | excess ms | excess / non-private step |",
                  "|---|---|---|---|---|"]
        names = set(r["ops"]) | set(base["ops"])
        diff = {k: r["ops"].get(k, 0.0) - base["ops"].get(k, 0.0) for k in names}
        shown = sorted(names, key=lambda k: -abs(diff[k]))[:top]
        for k in shown:
            lines.append(f"| {k} | {base['ops'].get(k, 0.0) * 1e3:.1f} | {r['ops'].get(k, 0.0) * 1e3:.1f} | "
                         f"{diff[k] * 1e3:+.1f} | {diff[k] / base['wall']:+.3f} |")
        rest = sum(diff[k] for k in names if k not in shown)
        lines += [f"| (other ops) | | | {rest * 1e3:+.1f} | {rest / base['wall']:+.3f} |", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--config", type=int, default=0, help="row of bench.suite.model_configs (0: BERT-like)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = model_configs(args.smoke)[args.config]
    text = table(profile_steps(cfg, rounds=1 if args.smoke else args.rounds))
    print(text)
    if not args.smoke:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"op-profile-{datetime.date.today()}.md")
        with open(path, "a") as f:
            f.write(f"## Self CPU time per aten op of one step, {cfg.name} ({datetime.date.today()}, "
                    f"`python -m bench.op_profile --config {args.config} --rounds {args.rounds} --threads "
                    f"{args.threads}`, torch {torch.__version__}; medians over the rounds)\n\n{text}\n")
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

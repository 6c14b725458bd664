"""The generic per-sample gradient (anadp.generic) in a benchmark row: a ViT-like model, whose
embeddings (cls_token, position embeddings, the patch convolution) take the generic path, against
non-private training and Opacus in the same run (each method in its own process, median step time
and peak resident memory above the process's start, as bench.run).

    python -m bench.generic_path                # ViT-like 256 x 4, B = 32, 64 x 64 images (a few minutes)
    python -m bench.generic_path --smoke        # tiny (CI)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

from bench.run import measure
from bench.suite import vit_config

METHODS = ["nonprivate", "opacus_hooks", "opacus_ghost", "anadp_uniform", "anadp_per_layer"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    cfg = vit_config(args.smoke)
    rows = []
    for method in METHODS:
        r = measure(cfg, method, 2 if args.smoke else args.rounds, isolate=not args.smoke)  # smoke: in process
        rows.append({"method": method, **r})
        print(method, r, flush=True)
    base = next((r for r in rows if r["method"] == "nonprivate" and "seconds" in r), None)
    lines = [f"# The generic path in a ViT-like model, {datetime.date.today()}", "",
             f"`python -m bench.generic_path{' --smoke' if args.smoke else ''}`: {cfg}; AdamW, the same batch for "
             "every method, each in its own process; median of the timed steps; peak RSS above the process start.", "",
             "| method | step s | x non-private | peak MB | x non-private |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error'][:90]} | | | |")
            continue
        xs = r["seconds"] / base["seconds"] if base else float("nan")
        xm = (r["peak_mb"] / base["peak_mb"]) if base and base.get("peak_mb") and r.get("peak_mb") else float("nan")
        peak = r.get("peak_mb") or float("nan")
        lines.append(f"| {r['method']} | {r['seconds']:.3f} | {xs:.2f} | {peak:.0f} | {xm:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"generic-path-vit-{datetime.date.today()}{args.tag}")
        with open(stem + ".md", "w") as f:
            f.write(text)
        with open(stem + ".json", "w") as f:
            json.dump({"config": cfg.__dict__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

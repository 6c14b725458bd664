"""Command line: ``python -m anadp demo`` (also the ``anadp`` console script)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from .demo import DemoConfig, format_table, run_demo


def _demo(args) -> int:
    cfg = DemoConfig(epsilon=args.epsilon, delta=args.delta, epochs=args.epochs, train_size=args.train_size,
                     test_size=args.test_size, batch_size=args.batch_size, seed=args.seed,
                     methods=tuple(args.methods))
    print(f"anadp demo: {cfg.train_size} generated training sequences, target epsilon {cfg.epsilon} at delta "
          f"{cfg.delta}, {cfg.epochs} epochs", file=sys.stderr)
    rows = run_demo(cfg, progress=not args.no_progress)
    print(format_table(rows))
    for r in rows:
        if "noise_scales" in r and r["method"] == "anadp":
            w = r["noise_scales"]
            lo, hi = min(w, key=w.get), max(w, key=w.get)
            print(f"\nANADP noise scales after training: least noise {w[lo]:.2f} ({lo}), most {w[hi]:.2f} ({hi})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args) | {"methods": list(cfg.methods)},
                       "rows": [r | {"epsilon": None if math.isinf(r["epsilon"]) else r["epsilon"]} for r in rows]},
                      f, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="anadp", description="DP fine-tuning with adaptive noise allocation")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="uniform DP vs ANADP at the same epsilon on a small transformer (no network)")
    defaults = DemoConfig()
    d.add_argument("--epsilon", type=float, default=defaults.epsilon)
    d.add_argument("--delta", type=float, default=defaults.delta)
    d.add_argument("--epochs", type=int, default=defaults.epochs)
    d.add_argument("--train-size", type=int, default=defaults.train_size)
    d.add_argument("--test-size", type=int, default=defaults.test_size)
    d.add_argument("--batch-size", type=int, default=defaults.batch_size)
    d.add_argument("--seed", type=int, default=defaults.seed)
    d.add_argument("--methods", nargs="+", default=list(defaults.methods),
                   choices=["nonprivate", "uniform", "anadp"])
    d.add_argument("--json", help="also write the rows to this JSON file")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    return {"demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

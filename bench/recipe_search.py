"""Recipe search for DP fine-tuning: screen hyperparameters on a validation split carved from the
training split (the test split is never read), one cheap proxy run per candidate.

    python -m bench.recipe_search --out bench/results --tag -screen1      # the screen (CPU hours)
    python -m bench.recipe_search --smoke                                 # tiny, for CI

The search's own privacy cost is not accounted (as in Li et al. 2022 and most of the literature):
the chosen recipe's epsilon covers the final run only.

Each candidate is a name and FinetuneConfig overrides on the mode's defaults (finetune.py). Results
go to recipe-search-<date><tag>.json (every run; --resume skips runs already there) and .md (the
candidates by validation accuracy), rewritten after every run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict, replace

import torch
from torch.utils.data import TensorDataset

from anadp.apps.finetune import FinetuneConfig, prepare, train_one

# name -> (mode, method, overrides); the proxy (--max-len, one seed, one epsilon) is set on the command line.
# The first screen ran before warm-up + linear decay became the default: its candidates name the constant rate.
CONSTANT = {"warmup": 0.0, "decay": "none"}
CANDIDATES = {
    "lora-base": ("lora", "uniform", CONSTANT),
    "lora-c0.1": ("lora", "uniform", {"max_grad_norm": 0.1, **CONSTANT}),
    "lora-decay": ("lora", "uniform", {"warmup": 0.1, "decay": "linear"}),
    "lora-b512": ("lora", "uniform", {"batch_size": 512, "dp_lr": 2e-2, **CONSTANT}),
    "lora-b512-e6-decay": ("lora", "uniform", {"batch_size": 512, "epochs": 6, "dp_lr": 2e-2,
                                               "warmup": 0.1, "decay": "linear"}),
    "lora-lr3e-3": ("lora", "uniform", {"dp_lr": 3e-3, **CONSTANT}),
    "lora-lr3e-2-decay": ("lora", "uniform", {"dp_lr": 3e-2, "warmup": 0.1, "decay": "linear"}),
    "lora-all-linear": ("lora", "uniform", {"lora_targets": ("query", "key", "value", "dense"), **CONSTANT}),
    "lora-r16": ("lora", "uniform", {"lora_r": 16, **CONSTANT}),
    "lora-nonprivate": ("lora", "nonprivate", CONSTANT),
    # after the first screen (warm-up + linear decay +10 points on the proxy): decay with each other lever
    "lora-decay-c0.1": ("lora", "uniform", {"max_grad_norm": 0.1, "warmup": 0.1, "decay": "linear"}),
    "lora-decay-lr2e-2": ("lora", "uniform", {"dp_lr": 2e-2, "warmup": 0.1, "decay": "linear"}),
    "lora-decay-all-linear": ("lora", "uniform", {"lora_targets": ("query", "key", "value", "dense"),
                                                  "warmup": 0.1, "decay": "linear"}),
    "lora-decay-b256": ("lora", "uniform", {"batch_size": 256, "dp_lr": 1.5e-2, "warmup": 0.1, "decay": "linear"}),
    "full-decay": ("full", "uniform", {"warmup": 0.1, "decay": "linear"}),
    "full-base": ("full", "uniform", CONSTANT),
    "full-c0.1-decay": ("full", "uniform", {"max_grad_norm": 0.1, "warmup": 0.1, "decay": "linear"}),
    "full-lr5e-4-e6": ("full", "uniform", {"dp_lr": 5e-4, "epochs": 6, "warmup": 0.1, "decay": "linear"}),
    "full-nonprivate": ("full", "nonprivate", CONSTANT),
    # after full-decay (0.550: expected batch 1024 is ~25 steps on this data set): more, smaller steps
    "full-b256-decay": ("full", "uniform", {"batch_size": 256, "dp_lr": 1e-3, "warmup": 0.1, "decay": "linear"}),
    "full-b256-lr3e-3-decay": ("full", "uniform", {"batch_size": 256, "dp_lr": 3e-3, "warmup": 0.1,
                                                   "decay": "linear"}),
    # after full-b256-decay (0.550 again: the constant prediction): a lower rate
    "full-b256-lr3e-4-decay": ("full", "uniform", {"batch_size": 256, "dp_lr": 3e-4, "warmup": 0.1,
                                                   "decay": "linear"}),
    # after every full run ended at the constant prediction: fewer noisy coordinates (the word embeddings are half
    # of the 22.7M parameters), and BitFit (biases, norms, head: Bu et al. 2022's DP-BiTFiT)
    "full-noemb-decay": ("full", "uniform", {"freeze": ("pooler", "embeddings"), "warmup": 0.1, "decay": "linear"}),
    "full-noemb-lr5e-4-decay": ("full", "uniform", {"freeze": ("pooler", "embeddings"), "dp_lr": 5e-4,
                                                    "warmup": 0.1, "decay": "linear"}),
    "bitfit-decay": ("full", "uniform", {"train_only": ("bias", "LayerNorm", "classifier"), "dp_lr": 1e-2,
                                         "warmup": 0.1, "decay": "linear"}),
    "bitfit-b256-decay": ("full", "uniform", {"train_only": ("bias", "LayerNorm", "classifier"), "dp_lr": 1e-2,
                                              "batch_size": 256, "warmup": 0.1, "decay": "linear"}),
    "full-noemb-b256-lr1e-4-decay": ("full", "uniform", {"freeze": ("pooler", "embeddings"), "dp_lr": 1e-4,
                                                         "batch_size": 256, "warmup": 0.1, "decay": "linear"}),
    # after bitfit-b256-decay learned (0.698; at batch 1024, 27 steps, the constant prediction): more steps
    "bitfit-b128": ("full", "uniform", {"train_only": ("bias", "LayerNorm", "classifier"), "dp_lr": 1e-2,
                                        "batch_size": 128}),
    "bitfit-b256-e6": ("full", "uniform", {"train_only": ("bias", "LayerNorm", "classifier"), "dp_lr": 1e-2,
                                           "batch_size": 256, "epochs": 6}),
    # full fine-tuning under whitened clipping: the head's share of a clipped 22M-number gradient is small, its
    # noise the same as every coordinate's; per-layer clipping gives each group its own threshold
    "full-perlayer-b256": ("full", "per_layer", {"batch_size": 256, "dp_lr": 5e-4}),
    "full-perlayer-shares-b256": ("full", "per_layer-shares", {"batch_size": 256, "dp_lr": 5e-4}),
    # a DP linear probe on the frozen model's pooled features leaves the constant prediction in 30 steps only at
    # rate ~0.1 (1e-2 and 2e-3, the full and LoRA rates, stay there): the head at its own rate
    "full-head1e-1-decay": ("full", "uniform", {"head_lr": 0.1, "warmup": 0.1, "decay": "linear"}),
    "full-head1e-1-lr5e-4-decay": ("full", "uniform", {"head_lr": 0.1, "dp_lr": 5e-4, "warmup": 0.1,
                                                       "decay": "linear"}),
    "full-b256-head1e-1-lr5e-4-decay": ("full", "uniform", {"head_lr": 0.1, "dp_lr": 5e-4, "batch_size": 256,
                                                            "warmup": 0.1, "decay": "linear"}),
    # after full-head1e-1-decay (0.550 again): the body's noisy steps, not the head, hold full fine-tuning back
    "full-head1e-1-lr1e-4-decay": ("full", "uniform", {"head_lr": 0.1, "dp_lr": 1e-4, "warmup": 0.1,
                                                       "decay": "linear"}),
    "full-head1e-1-lr2e-5-decay": ("full", "uniform", {"head_lr": 0.1, "dp_lr": 2e-5, "warmup": 0.1,
                                                       "decay": "linear"}),
    "probe-head1e-1-decay": ("full", "uniform", {"train_only": ("classifier",), "dp_lr": 0.1, "warmup": 0.1,
                                                 "decay": "linear"}),
    # after full fine-tuning with the head at 0.1 stayed at the constant prediction, whatever the body's rate: the same
    # head, alone and beside a body at rate 1e-9, on a 3000-sample training part (--train-size 3000), batch 256
    "probe-b256-head1e-1-decay": ("full", "uniform", {"train_only": ("classifier",), "dp_lr": 0.1,
                                                      "batch_size": 256, "warmup": 0.1, "decay": "linear"}),
    "full-b256-head1e-1-lr1e-9-decay": ("full", "uniform", {"head_lr": 0.1, "dp_lr": 1e-9, "batch_size": 256,
                                                            "warmup": 0.1, "decay": "linear"}),
    "full-b256-head1e-1-lr1e-9-perlayer-shares": ("full", "per_layer-shares", {
        "head_lr": 0.1, "dp_lr": 1e-9, "batch_size": 256, "warmup": 0.1, "decay": "linear"}),
    # the mechanism (a head at rate 0.1 grows, the body's per-sample gradients through it grow ~10x and take the
    # whitened clip from it): does anadp's allocation, which can weigh the groups in the clip, find it?
    "full-b256-head1e-1-lr5e-4-decay-anadp": ("full", "anadp", {"head_lr": 0.1, "dp_lr": 5e-4, "batch_size": 256,
                                                                "warmup": 0.1, "decay": "linear"}),
    # it does not (w stays ~1); a fixed w for the head, chosen before the data (AllocationConfig.scales)
    "full-b256-head1e-1-lr5e-4-w0.1-decay": ("full", "uniform", {"head_lr": 0.1, "head_scale": 0.1, "dp_lr": 5e-4,
                                                                 "batch_size": 256, "warmup": 0.1, "decay": "linear"}),
    "full-b256-head1e-1-lr5e-4-w0.3-decay": ("full", "uniform", {"head_lr": 0.1, "head_scale": 0.3, "dp_lr": 5e-4,
                                                                 "batch_size": 256, "warmup": 0.1, "decay": "linear"}),
    # without noise the frozen-body run still ends at the constant prediction at C = 1 and 5 and learns at C = 20:
    # every sample clipped is the cause. w = 0.1 for the head with C = 10 is w = 10 for the body with C = 1: the
    # body counts 1/100 in each norm (gets 10x the noise), the samples stay under C, the head's noise is sigma
    "full-b256-head1e-1-lr1e-9-w0.1-c10-decay": ("full", "uniform", {
        "head_lr": 0.1, "head_scale": 0.1, "max_grad_norm": 10.0, "dp_lr": 1e-9, "batch_size": 256,
        "warmup": 0.1, "decay": "linear"}),
    "full-b256-head1e-1-lr5e-4-w0.1-c10-decay": ("full", "uniform", {
        "head_lr": 0.1, "head_scale": 0.1, "max_grad_norm": 10.0, "dp_lr": 5e-4, "batch_size": 256,
        "warmup": 0.1, "decay": "linear"}),
    "lora-head1e-1-decay": ("lora", "uniform", {"head_lr": 0.1, "warmup": 0.1, "decay": "linear"}),
    "lora-head3e-2-decay": ("lora", "uniform", {"head_lr": 3e-2, "warmup": 0.1, "decay": "linear"}),
    # the default MiniLM-L6 was trained to give the masked mean of its token states, normalized, as the sentence
    # embedding; the BERT pooler on [CLS] under AutoModelForSequenceClassification's head was not. A linear probe
    # on the frozen features: 0.747 on the mean against 0.697 on the pooler, and 0.747 under DP at epsilon 3
    # (bench/results/head-probe-2026-12-06-features.md): the head on the mean (pooling="mean", sentence_head.py)
    "lora-mean-decay": ("lora", "uniform", {"pooling": "mean", "head_lr": None, "warmup": 0.1, "decay": "linear"}),
    "lora-mean-head1e-1-decay": ("lora", "uniform", {"pooling": "mean", "head_lr": 0.1, "warmup": 0.1,
                                                     "decay": "linear"}),
    "lora-mean-nonprivate": ("lora", "nonprivate", {"pooling": "mean", "warmup": 0.1, "decay": "linear"}),
    "full-mean-decay": ("full", "uniform", {"pooling": "mean", "head_lr": None, "warmup": 0.1, "decay": "linear"}),
    "full-mean-head1e-1-decay": ("full", "uniform", {"pooling": "mean", "head_lr": 0.1, "warmup": 0.1,
                                                     "decay": "linear"}),
    "full-mean-b256-head1e-1-lr5e-4-decay": ("full", "uniform", {"pooling": "mean", "head_lr": 0.1, "dp_lr": 5e-4,
                                                                 "batch_size": 256, "warmup": 0.1, "decay": "linear"}),
    "full-mean-nonprivate": ("full", "nonprivate", {"pooling": "mean", "warmup": 0.1, "decay": "linear"}),
    # full fine-tuning at epsilon 8 ended 5.9 points behind non-private in 30 steps of 1024 (--epsilon 8): a faster
    # rate, or twice the steps at half the batch
    "full-mean-head1e-1-lr4e-3-decay": ("full", "uniform", {"pooling": "mean", "head_lr": 0.1, "dp_lr": 4e-3,
                                                            "warmup": 0.1, "decay": "linear"}),
    "full-mean-b512-head1e-1-decay": ("full", "uniform", {"pooling": "mean", "head_lr": 0.1, "batch_size": 512,
                                                          "warmup": 0.1, "decay": "linear"}),
}
# The candidates screened before pooling="auto" and head_lr=0.1 became the defaults read BERT's pooler, the head at
# the body's rate unless they say otherwise: pinned, so that each name keeps the run it names.
BEFORE_MEAN = {"pooling": "cls", "head_lr": None}
CANDIDATES = {name: (mode, method, overrides if "pooling" in overrides else {**BEFORE_MEAN, **overrides})
              for name, (mode, method, overrides) in CANDIDATES.items()}


def carve(train: TensorDataset, fraction: float, seed: int = 1234) -> tuple[TensorDataset, TensorDataset]:
    """(training part, validation part): a fixed random split of the training split."""
    n = len(train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(n * fraction)
    val, rest = perm[:k], perm[k:]
    return (TensorDataset(*(t[rest] for t in train.tensors)), TensorDataset(*(t[val] for t in train.tensors)))


def markdown(result: dict) -> str:
    lines = [f"# Recipe search, {result['date']}", "", result["description"], "",
             "| candidate | mode | method | epsilon | seed | validation accuracy | steps | wall s | overrides |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = sorted((r for r in result["rows"] if "accuracy" in r), key=lambda r: -r["accuracy"])
    for r in rows:
        eps = "inf" if r.get("epsilon") is None else f"{r['epsilon']:.2f}"
        lines.append(f"| {r['candidate']} | {r['mode']} | {r['method']} | {eps} | {r['seed']} | {r['accuracy']:.4f} | "
                     f"{r['steps']} | {r['wall_seconds']:.0f} | {json.dumps(r['overrides'])} |")
    failed = [r for r in result["rows"] if "error" in r]
    if failed:
        lines += ["", f"{len(failed)} runs failed; first: {failed[0]['candidate']}: {failed[0]['error']}"]
    hours = sum(r.get("wall_seconds", 0) for r in result["rows"]) / 3600
    lines += ["", f"Cost: {hours:.2f} CPU-core hours of training ({len(result['rows'])} runs)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--seed", type=int, nargs="+", default=[0])
    ap.add_argument("--max-len", type=int, default=32, help="the proxy's truncation (the benchmark's: 64)")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--train-size", type=int, default=None, help="the first N of the carved training part (a quicker proxy)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="local model directory (default: the packaged MiniLM-L6)")
    ap.add_argument("--resume", help="a search JSON whose finished runs are kept")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI): 2 steps a run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(model=args.model, max_len=args.max_len)
    if args.smoke:
        cfg = replace(cfg, train_size=120, test_size=8, max_steps=2, batch_size=32, physical_batch_size=16)
    data = prepare(cfg)
    train, val = carve(data["train"], args.val_fraction)
    if args.train_size:
        train = TensorDataset(*(t[:args.train_size] for t in train.tensors))
    delta = 1 / len(train) ** 1.1
    date = datetime.date.today().isoformat()
    stem = os.path.join(args.out, f"recipe-search-{date}{'-smoke' if args.smoke else ''}{args.tag}")
    result = {"date": date, "torch": torch.__version__, "rows": [],
              "description": (f"{data['source']}: {len(train)} train / {len(val)} validation (carved from the "
                              f"training split, seed 1234; the test split is not read); proxy: max_len "
                              f"{cfg.max_len}; target epsilon {args.epsilon:g}, delta {delta:.2e}; "
                              f"{args.threads} thread(s). Not accounted: the search's own privacy cost."),
              "base_config": asdict(cfg)}
    if args.resume:
        with open(args.resume) as f:
            result["rows"] = [r for r in json.load(f)["rows"] if "accuracy" in r]
    have = {(r["candidate"], r["seed"]) for r in result["rows"]}
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    def save():
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(result))

    for seed in args.seed:
        for name in args.candidates:
            if (name, seed) in have:
                continue
            mode, method, over = CANDIDATES[name]
            run_cfg = replace(cfg, lora=mode == "lora", **over)
            try:
                row = train_one(run_cfg, method, args.epsilon, seed, train, val, delta, data["model_path"],
                                progress=False)
            except Exception as e:  # noqa: BLE001 - a failed candidate is a result, not the end of the search
                row = {"method": method, "seed": seed, "error": f"{type(e).__name__}: {e}"[:300]}
            row.pop("noise_scales", None)
            row.update(candidate=name, mode=mode, overrides={k: list(v) if isinstance(v, tuple) else v
                                                             for k, v in over.items()})
            result["rows"].append(row)
            save()
            print(f"{time.time() - t0:7.0f} s  {name} seed={seed} val acc={row.get('accuracy', row.get('error'))}",
                  flush=True)
    save()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

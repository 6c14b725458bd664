"""Quick step-time probe: non-private AdamW vs anadp (uniform, ANADP) on a BERT-like
classifier built locally (random weights). A first measurement for the benchmark
issue; the full suite with Opacus comparisons and plots is bench/run.py's job.

    python bench/step_time.py [--hidden 256 --layers 4 --batch 32 --seq 128 --steps 6]
"""
import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import anadp


def build(args):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                     max_position_embeddings=512, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def time_steps(model, optimizer, batches, steps):
    times = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        t = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(input_ids=x).logits, y).backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # the first step warms up


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    n = args.batch * 4
    data = TensorDataset(torch.randint(0, 30522, (n, args.seq), generator=g), torch.randint(0, 2, (n,), generator=g))
    batches = list(DataLoader(data, batch_size=args.batch))
    rows = {}
    for method in ("nonprivate", "uniform", "anadp"):
        model = build(args)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if method != "nonprivate":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, opt, _ = anadp.make_private(model, opt, DataLoader(data, batch_size=args.batch),
                                                   noise_multiplier=1.0, max_grad_norm=1.0, allocation=method,
                                                   poisson_sampling=False, seed=0)
        rows[method] = time_steps(model, opt, batches, args.steps)
    params = sum(p.numel() for p in build(args).parameters())
    print(f"BERT-like hidden={args.hidden} layers={args.layers} params={params / 1e6:.1f}M B={args.batch} "
          f"T={args.seq}, {torch.get_num_threads()} threads, median of {args.steps - 1} steps")
    print("| method | s/step | x non-private |\n|---|---|---|")
    for m, t in rows.items():
        print(f"| {m} | {t:.3f} | {t / rows['nonprivate']:.2f} |")


if __name__ == "__main__":
    main()

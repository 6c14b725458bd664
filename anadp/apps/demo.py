"""The main job: train a small transformer classifier non-privately, with uniform DP (DP-Adam as
Opacus has it) and with make_private's defaults (ANADP) at the same (epsilon, delta), on generated
data; print a table.

The data (no download): sequences of neutral tokens with a few sentiment tokens
planted; the label says whether positive tokens outnumber negative ones, and 5%
of labels are flipped. A small pre-LN transformer (learned positions broadcast
over the batch, as in BERT) reads it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..api import make_private
from .methods import DEFAULT, method_setup


@dataclass
class DemoConfig:
    epsilon: float = 3.0
    delta: float = 1e-5
    epochs: int = 3
    train_size: int = 20000
    test_size: int = 1000
    batch_size: int = 1000
    seq_len: int = 32
    vocab: int = 200
    d_model: int = 32
    layers: int = 1
    lr: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 0
    methods: tuple = ("nonprivate", "uniform", DEFAULT)  # uniform: DP-Adam as Opacus has it


def make_sentiment_data(n: int, cfg: DemoConfig, generator: torch.Generator) -> TensorDataset:
    """Tokens 0..19 positive, 20..39 negative, the rest neutral; balanced labels."""
    T, V = cfg.seq_len, cfg.vocab
    x = torch.randint(40, V, (n, T), generator=generator)
    y = (torch.rand(n, generator=generator) < 0.5).long()
    major = torch.randint(2, 6, (n,), generator=generator)  # words of the label's sentiment
    minor = (torch.rand(n, generator=generator) * (major - 1)).long()  # fewer of the other one
    k = torch.stack([torch.where(y == 1, major, minor), torch.where(y == 1, minor, major)], 1)
    for i in range(n):
        pos = torch.randperm(T, generator=generator)[: int(k[i].sum())]
        words = torch.cat([torch.randint(0, 20, (int(k[i, 0]),), generator=generator),
                           torch.randint(20, 40, (int(k[i, 1]),), generator=generator)])
        x[i, pos] = words
    flip = torch.rand(n, generator=generator) < 0.05
    return TensorDataset(x, torch.where(flip, 1 - y, y))


class Block(nn.Module):
    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        B, T, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        h = h + self.proj(a)
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class TransformerClassifier(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d: int, layers: int, n_classes: int = 2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, n_classes)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)[None]  # (1, T), broadcast over the batch
        h = self.tok(idx) + self.pos(pos)
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h).mean(1))


@torch.no_grad()
def accuracy(model, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    acc = float((model(x).argmax(-1) == y).float().mean())
    model.train()
    return acc


def train_one(method: str, cfg: DemoConfig, train, test, progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    model = TransformerClassifier(cfg.vocab, cfg.seq_len, cfg.d_model, cfg.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    dp = method != "nonprivate"
    if dp:
        model, optimizer, loader = make_private(
            model, optimizer, loader, target_epsilon=cfg.epsilon, target_delta=cfg.delta, epochs=cfg.epochs,
            max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, **method_setup(method))
    steps = cfg.epochs * len(loader)
    bar = tqdm(total=steps, desc=f"{method:>10}", disable=not progress, leave=True)
    t0, done = time.perf_counter(), 0
    for _ in range(cfg.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            if len(x):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            optimizer.step()
            if dp and done % 10 == 0:  # the PRV accountant takes ~0.2 s: not every step
                bar.set_postfix(loss=f"{loss.item():.3f}", eps=f"{optimizer.privacy_spent(cfg.delta):.2f}")
            done += 1
            bar.update(1)
    seconds = (time.perf_counter() - t0) / max(done, 1)
    bar.close()
    row = {"method": method, "epsilon": optimizer.privacy_spent(cfg.delta) if dp else math.inf,
           "delta": cfg.delta if dp else 0.0, "accuracy": accuracy(model, test), "seconds_per_step": seconds,
           "steps": done}
    if dp:
        row["noise_multiplier"] = optimizer.noise_multiplier
        row["noise_scales"] = optimizer.noise_scales
    return row


def run_demo(cfg: DemoConfig | None = None, progress: bool = True) -> list[dict]:
    cfg = cfg or DemoConfig()
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    train = make_sentiment_data(cfg.train_size, cfg, g)
    test = make_sentiment_data(cfg.test_size, cfg, g)
    return [train_one(m, cfg, train, test, progress) for m in cfg.methods]


def format_table(rows: list[dict]) -> str:
    lines = ["| method | epsilon | delta | accuracy | seconds/step |", "|---|---|---|---|---|"]
    for r in rows:
        eps = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.3f}"
        delta = f"{r['delta']:.0e}" if r["delta"] else "-"
        lines.append(f"| {r['method']} | {eps} | {delta} | {r['accuracy']:.4f} | {r['seconds_per_step']:.4f} |")
    return "\n".join(lines)

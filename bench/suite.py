"""The benchmark suite: configurations, the five methods, and one timed step.

Methods (same torch optimizer, AdamW, same data, in the same process):
  nonprivate      plain training
  opacus_hooks    Opacus GradSampleModule, grad_sample_mode="hooks"
  opacus_ghost    Opacus ghost clipping (grad_sample_mode="ghost", DPLossFastGradientClipping)
  anadp_uniform   anadp, allocation="uniform"
  anadp           anadp, allocation="anadp"
  anadp_per_layer anadp, allocation="anadp", clipping="per_layer" (clipped, noised and updated in the backward)

Opacus workaround (the smallest its docs need): Hugging Face BERT and GPT-2 build
position_ids (and BERT token_type_ids) of batch 1 that are broadcast over the batch,
which Opacus's per-sample hooks cannot split, and its ghost clipping needs them
contiguous; every method is therefore given explicit contiguous (B, T) tensors
(the same input for all, harmless to anadp).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

METHODS = ["nonprivate", "opacus_hooks", "opacus_ghost", "anadp_uniform", "anadp", "anadp_per_layer"]


@dataclass
class Config:
    name: str
    kind: str           # linear | seqlinear | embedding | layernorm | bert | gpt2 | llama | vit (seq: image side)
    batch: int
    seq: int = 1
    width: int = 512
    layers: int = 2
    vocab: int = 30522


def layer_configs(smoke: bool) -> list[Config]:
    if smoke:
        return [Config("linear-512 B=8", "linear", 8, width=32), Config("seqlinear T=16", "seqlinear", 4, 16, 32),
                Config("embedding", "embedding", 4, 16, 32, vocab=500), Config("layernorm", "layernorm", 4, 16, 32)]
    return ([Config(f"linear-512 B={b}", "linear", b) for b in (16, 64, 256, 512)]
            + [Config(f"seqlinear-768 T={t}", "seqlinear", 8, t, 768) for t in (128, 512, 2048)]
            + [Config("embedding-30k x768", "embedding", 16, 128, 768), Config("layernorm-768", "layernorm", 16, 128, 768)])


def model_configs(smoke: bool) -> list[Config]:
    if smoke:
        return [Config("bert-tiny", "bert", 4, 16, 32, 1, 200), Config("gpt2-tiny", "gpt2", 4, 16, 32, 1, 200),
                Config("llama-tiny", "llama", 4, 16, 32, 1, 200)]
    # CPU-sized: widths/depths reduced so a configuration takes seconds (BERT-base is 768 x 12)
    return [Config("bert-like 256x4", "bert", 32, 128, 256, 4), Config("gpt2-like 256x4", "gpt2", 16, 256, 256, 4, 50257),
            Config("llama-like 256x4", "llama", 16, 256, 256, 4, 32000)]


def vit_config(smoke: bool) -> Config:
    """A ViT-like model (64 x 64 images, 8 x 8 patches: 64 tokens + [CLS]): its embeddings (cls_token, position
    embeddings and the patch convolution) take anadp's generic path (anadp.generic)."""
    return Config("vit-tiny", "vit", 4, 16, 32, 1) if smoke else Config("vit-like 256x4", "vit", 32, 64, 256, 4)


class _Head(nn.Module):
    """A layer under test plus the smallest head that gives a loss per sample."""

    def __init__(self, layer: nn.Module, out: int):
        super().__init__()
        self.layer, self.head = layer, nn.Linear(out, 2)

    def forward(self, x):
        h = self.layer(x)
        return self.head(h.mean(1) if h.dim() == 3 else h)


def build(cfg: Config, seed: int = 0):
    """(model, inputs: dict, labels) for a configuration."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    B, T, d = cfg.batch, cfg.seq, cfg.width
    y = torch.randint(0, 2, (B,), generator=g)
    if cfg.kind == "linear":
        return _Head(nn.Linear(d, d), d), {"x": torch.randn(B, d, generator=g)}, y
    if cfg.kind == "seqlinear":
        return _Head(nn.Linear(d, d), d), {"x": torch.randn(B, T, d, generator=g)}, y
    if cfg.kind == "embedding":
        return _Head(nn.Embedding(cfg.vocab, d), d), {"x": torch.randint(0, cfg.vocab, (B, T), generator=g)}, y
    if cfg.kind == "layernorm":
        return _Head(nn.LayerNorm(d), d), {"x": torch.randn(B, T, d, generator=g)}, y
    if cfg.kind == "vit":
        from transformers import ViTConfig, ViTForImageClassification
        m = ViTForImageClassification(ViTConfig(
            hidden_size=d, num_hidden_layers=cfg.layers, num_attention_heads=max(1, d // 64), intermediate_size=4 * d,
            image_size=T, patch_size=max(2, T // 8), num_labels=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
        return m, {"pixel_values": torch.randn(B, 3, T, T, generator=g)}, y
    ids = torch.randint(1, cfg.vocab, (B, T), generator=g)
    pos = torch.arange(T)[None].expand(B, T).contiguous()  # see the module docstring (Opacus workaround)
    heads = max(1, d // 64)
    if cfg.kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification
        m = BertForSequenceClassification(BertConfig(
            vocab_size=cfg.vocab, hidden_size=d, num_hidden_layers=cfg.layers, num_attention_heads=heads,
            intermediate_size=4 * d, max_position_embeddings=max(512, T), hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
    elif cfg.kind == "gpt2":
        from transformers import GPT2Config, GPT2ForSequenceClassification
        m = GPT2ForSequenceClassification(GPT2Config(
            vocab_size=cfg.vocab, n_embd=d, n_layer=cfg.layers, n_head=heads, n_positions=max(1024, T),
            pad_token_id=0, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        from transformers import LlamaConfig, LlamaForSequenceClassification
        m = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=cfg.vocab, hidden_size=d, intermediate_size=int(2.75 * d), num_hidden_layers=cfg.layers,
            num_attention_heads=heads, num_key_value_heads=heads, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    inputs = {"input_ids": ids, "position_ids": pos}
    if cfg.kind == "bert":  # BERT's default token_type_ids are a broadcast buffer too
        inputs["token_type_ids"] = torch.zeros(B, T, dtype=torch.long)
    return m, inputs, y


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def make_step(method: str, model: nn.Module, inputs: dict, labels: torch.Tensor, *, sigma: float = 1.0,
              clip: float = 1.0, seed: int = 0, optimizer: str = "adamw", backend: str = "auto",
              autocast: torch.dtype | None = None, poisson_sampling: bool = False, compile: bool | str = False):
    """A closure doing one full training step (forward, backward, clip, noise, update), and the
    (wrapped) model; the closure's ``optimizer`` is the optimizer it steps. ``autocast``: run the
    forward and the loss under torch.autocast with that dtype. ``poisson_sampling``: what anadp's
    loader is made with (distributed runs need it; the closure feeds the same batch either way).
    ``compile``: the (wrapped) model's forward through torch.compile (inductor; a string: its mode, e.g.
    "reduce-overhead", CUDA graphs). After each call ``step.phases`` holds the host seconds of its forward
    (with the loss), backward and ``optimizer.step()``."""
    B = len(labels)
    # the multi-tensor (foreach) update for every method: torch's default on a GPU, and what anadp sets
    # on the CPU too (the for-loop default there would charge the non-private step ~200 small ops more)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1.0, foreach=True))
    loader = DataLoader(TensorDataset(labels), batch_size=B)  # only its length and size matter
    criterion = nn.CrossEntropyLoss()
    call = (lambda m: m(**inputs)) if "x" not in inputs else (lambda m: m(inputs["x"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method.startswith("opacus"):
            from opacus import PrivacyEngine
            mode = method.split("_")[1]
            kw = {"criterion": criterion} if mode == "ghost" else {}
            res = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                                               max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode, **kw)
            model, opt = res[0], res[1]
            if mode == "ghost":
                criterion = res[2]
        elif method.startswith("anadp"):
            import anadp
            # no warm-up: the allocation runs in every timed step (by default it starts at step 10)
            model, opt, _ = anadp.make_private(model, opt, loader, noise_multiplier=sigma, max_grad_norm=clip,
                                               allocation="uniform" if method == "anadp_uniform" else "anadp",
                                               clipping="per_layer" if method == "anadp_per_layer" else "whitened",
                                               allocation_config=anadp.AllocationConfig(warmup_steps=0),
                                               poisson_sampling=poisson_sampling, seed=seed, backend=backend,
                                               adam_noise_correction=False)
        elif method != "nonprivate":
            raise ValueError(method)

    forward = torch.compile(model, mode=compile if isinstance(compile, str) else None) if compile else model
    chunks = getattr(getattr(opt, "engine", None), "chunks", None)
    begin = chunks.begin if chunks is not None else lambda: None

    def step():
        begin()  # anadp: the harness hands out the (same) batch as a fresh chunk of private data
        opt.zero_grad()
        t0 = time.perf_counter()
        with torch.autocast(labels.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = criterion(_logits(call(forward)), labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        step.phases = (t1 - t0, t2 - t1, time.perf_counter() - t2)  # host seconds (a device runs on behind)

    step.optimizer = opt
    return step, model


def flat_params(model: nn.Module) -> torch.Tensor:
    m = getattr(model, "_module", model)
    return torch.cat([p.detach().flatten() for p in m.parameters()])

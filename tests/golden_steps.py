"""Fingerprints of a few noisy DP steps in every configuration that runs on the CPU, through the
public API only, so that the same file runs on any commit: a refactoring must leave every
fingerprint unchanged (tests/test_bit_identical.py compares this tree with the last commit
before the refactoring, both run here).

    python tests/golden_steps.py OUT.json    # writes {scenario: sha256 of the run's state}
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

STEPS = 4


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=20, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _loss(kind, model, x):
    out = model(input_ids=x)
    if kind == "gpt2":
        return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    return F.cross_entropy(out.logits, x[:, 0] % 3)


# name -> (model, optimizer, make_private keyword arguments)
SCENARIOS = {
    "whitened-anadp-adamw-torch": ("gpt2", "adamw", dict(backend="torch")),
    "whitened-anadp-adamw-cpu": ("gpt2", "adamw", dict(backend="cpu")),
    "whitened-uniform-sgd-cpu": ("bert", "sgd", dict(allocation="uniform", backend="cpu")),
    "whitened-uniform-sgd-torch-sum": ("bert", "sgd", dict(allocation="uniform", backend="torch",
                                                           loss_reduction="sum")),
    "whitened-clip-adam-torch": ("bert", "adam", dict(allocation="clip", backend="torch")),
    "whitened-paper-adamw-cpu": ("gpt2", "adamw", dict(allocation="paper", backend="cpu")),
    "global-paper-adamw-torch": ("gpt2", "adamw", dict(allocation="paper", clipping="global", backend="torch")),
    "whitened-anadp-adamw-cpu-chunks": ("gpt2", "adamw", dict(backend="cpu", max_physical_batch_size=5)),
    "whitened-anadp-sgd-torch-chunks": ("bert", "sgd", dict(backend="torch", max_physical_batch_size=5)),
    "whitened-anadp-adamw-cpu-correction": ("bert", "adamw", dict(backend="cpu", adam_noise_correction=True)),
    "whitened-uniform-adamw-torch-correction": ("gpt2", "adamw", dict(allocation="uniform", backend="torch",
                                                                      adam_noise_correction=True)),
    "per_layer-uniform-adamw-cpu": ("gpt2", "adamw", dict(allocation="uniform", clipping="per_layer",
                                                          backend="cpu")),
    "per_layer-anadp-sgd-torch": ("bert", "sgd", dict(clipping="per_layer", backend="torch")),
    "per_layer-anadp-adamw-cpu-adaptive": ("bert", "adamw", dict(clipping="per_layer", backend="cpu",
                                                                 adaptive_clipping=True)),
    "per_layer-uniform-adamw-torch-chunks": ("gpt2", "adamw", dict(allocation="uniform", clipping="per_layer",
                                                                   backend="torch", max_physical_batch_size=5)),
    "per_layer-anadp-adamw-cpu-chunks-adaptive": ("bert", "adamw", dict(clipping="per_layer", backend="cpu",
                                                                        max_physical_batch_size=5,
                                                                        adaptive_clipping=True)),
}


def _digest(*objs) -> str:
    buf = io.BytesIO()
    torch.save(objs, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _without_later_defaults(obj):
    """The state with the settings added after BASE dropped where they hold their default (which is BASE's
    behaviour): AllocationConfig.scales (2026-12-06). The fingerprint is of the steps, not of the format."""
    if isinstance(obj, dict):
        return {k: _without_later_defaults(v) for k, v in obj.items() if not (k == "scales" and v is None)}
    return obj


def run(name: str) -> str:
    import anadp
    kind, opt_name, kw = SCENARIOS[name]
    model = _gpt2() if kind == "gpt2" else _bert()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(2, 40, (96, 8), generator=g))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"adamw": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
           "adam": lambda: torch.optim.Adam(params, lr=1e-2, weight_decay=0.01),
           "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9)}[opt_name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kw.get("allocation", "anadp") != "uniform":  # the allocation moves after the first step
            kw = dict(kw, allocation_config=anadp.AllocationConfig(warmup_steps=1))
        model, opt, loader = anadp.make_private(model, opt, DataLoader(data, batch_size=16), noise_multiplier=0.3,
                                                max_grad_norm=1.0, seed=7, **kw)
        seen, steps = [], 0
        for (x,) in loader:
            opt.zero_grad()
            if len(x):
                _loss(kind, model, x).backward()
            opt.step()
            seen.append(len(x))
            steps += opt.stepped  # False after a physical chunk that is not its logical batch's last
            if steps == STEPS:
                break
        state = _without_later_defaults(opt.state_dict())
        state.pop("rng", None)
        return _digest([p.detach() for p in model.parameters()], state, opt.noise_scales, seen,
                       opt.privacy_spent(1e-5))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    out = {name: run(name) for name in SCENARIOS}
    with open(argv[0], "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

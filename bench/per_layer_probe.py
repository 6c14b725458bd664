"""Probe: what each clipping clips over the first steps of the LoRA fine-tune (epsilon 3, seed 0):
per-layer thresholds (total K, the head's, the smallest, the released unclipped fractions), or the
whitened per-sample norms of the last physical chunk.

    PYTHONPATH=. python -m bench.per_layer_probe per_layer-adaptive 40   # or: uniform 12
"""
from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from anadp import make_private
from anadp.apps.finetune import FinetuneConfig, by_length, expected_batch, learning_rate, load_model, prepare, trim
from anadp.apps.methods import method_setup


def probe(method: str, steps: int) -> None:
    torch.set_num_threads(1)
    cfg = FinetuneConfig(lora=True)
    d = prepare(cfg)
    torch.manual_seed(0)
    model = load_model(d["model_path"], 2, True, cfg.lora_r)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate(cfg, True), weight_decay=0.0)
    loader = DataLoader(d["train"], batch_size=expected_batch(cfg), collate_fn=by_length)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        model, opt, loader = make_private(model, opt, loader, target_epsilon=3.0, target_delta=d["delta"],
                                          epochs=cfg.epochs, max_grad_norm=cfg.max_grad_norm, seed=0,
                                          max_physical_batch_size=cfg.physical_batch_size, **method_setup(method))
    print(f"{method}: {len(opt.group_names)} groups, sigma {opt.noise_multiplier:.4f}, "
          f"gradient sigma {opt.gradient_noise_multiplier:.4f}")
    done = 0
    while done < steps:
        for ids, mask, y in loader:
            opt.zero_grad()
            ids, mask = trim(ids, mask, "cpu")
            F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y).backward()
            opt.step()
            if not opt.stepped:  # more physical chunks of this logical batch
                continue
            done += 1
            n = opt.last_per_sample_norms  # of the last chunk (per-layer: every group together)
            if opt.max_grad_norms is not None:  # per-layer clipping
                t, counts = opt.clip.thresholds, opt.clip.last_released_counts
                line = (f"K {opt.clip.total:.3f}  C head {float(t[-2]):.3f}  C min {float(t[t > 0].min()):.4f}")
                if counts is not None:
                    frac = counts / opt.expected_batch_size + 0.5
                    line += f"  unclipped: mean {float(frac.mean()):.2f}, head {float(frac[-2]):.2f}"
                if n is not None:
                    line += f"  norms: median {float(n.median()):.3f}"
            else:
                line = f"whitened norms: median {float(n.median()):.3f}, min {float(n.min()):.3f}"
            print(f"step {done:3d}  {line}", flush=True)
            if done >= steps:
                break


if __name__ == "__main__":
    probe(sys.argv[1] if len(sys.argv) > 1 else "per_layer-adaptive", int(sys.argv[2]) if len(sys.argv) > 2 else 40)

"""One fine-tuning run with a fixed, data-independent allocation (or per-group learning rates):
what a given w would do, without the statistics that choose it. A fixed w costs no privacy.

    python -m bench.allocation_probe '{"head": 2.0}'              # the classifier's w, LoRA at 1
    python -m bench.allocation_probe '{"A": 0.5, "B": 0.5, "head": 0.5}'
    python -m bench.allocation_probe '{"lrA": 0.3}'               # LoRA A at 0.3x the learning rate

Keys: head, A, B (w of the classifier and of the LoRA factors), lr, lrA, lrB, lrH (learning rate
and per-kind factors), seed, eps, train, epochs, batch, C. Prints one JSON line with the accuracy.
"""
import json
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from anadp import make_private
from anadp.apps.finetune import FinetuneConfig, accuracy, by_length, load_model, prepare, trim


def main(argv=None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    warnings.simplefilter("ignore")
    d = prepare(FinetuneConfig(train_size=spec.get("train", 3000)))
    seed = spec.get("seed", 0)
    torch.manual_seed(seed)
    model = load_model(d["model_path"], 2, True, 8)
    lr = spec.get("lr", 1e-2)
    kinds = {"A": [], "B": [], "H": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            kinds["A" if "lora_A" in n else "B" if "lora_B" in n else "H"].append(p)
    opt = torch.optim.AdamW([{"params": kinds[k], "lr": lr * spec.get("lr" + k, 1.0)} for k in "ABH"], lr=lr,
                            weight_decay=0)
    loader = DataLoader(d["train"], batch_size=spec.get("batch", 64), collate_fn=by_length)
    epochs = spec.get("epochs", 3)
    model, opt, loader = make_private(model, opt, loader, target_epsilon=spec.get("eps", 3.0), target_delta=d["delta"],
                                      epochs=epochs, max_grad_norm=spec.get("C", 1.0), allocation="uniform",
                                      seed=seed, max_physical_batch_size=64)
    w = opt.allocator.group_scales  # uniform never moves them: the planted w stays
    for g, name in enumerate(opt.group_names):
        w[g] = spec.get("head" if "classifier" in name else "A" if "lora_A" in name else "B", 1.0)
    total = epochs * len(loader)
    while opt.step_count < total:
        for ids, mask, y in loader:
            opt.zero_grad()
            if len(y):
                ids, mask = trim(ids, mask, "cpu")
                F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y).backward()
            opt.step()
            if opt.step_count >= total:
                break
    print(json.dumps(spec | {"accuracy": accuracy(model, d["test"]), "epsilon": opt.privacy_spent(d["delta"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

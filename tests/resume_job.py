"""A training job for the kill-and-resume test: checkpoints every step, can be
killed after a step or crash half-way through writing a checkpoint."""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import anadp  # noqa: E402
from models import make_setup  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--ckpt", required=True)
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--kill-after", type=int, default=-1)
p.add_argument("--crash-in-save", type=int, default=-1)
p.add_argument("--dropout", type=float, default=0.0)
args = p.parse_args()

m, o, l = make_setup("adamw", dropout=args.dropout)  # 64 samples, batch 16: 4 logical batches per epoch
# sigma 0.05: anadp's statistics measurable on this tiny model, so its scales move and must resume too
m, o, l = anadp.make_private(m, o, l, noise_multiplier=0.05, max_grad_norm=0.5, seed=7, max_physical_batch_size=6,
                             allocation_config=anadp.AllocationConfig(warmup_steps=2))
if os.path.exists(args.ckpt):
    anadp.load_checkpoint(args.ckpt, m, o)

while o.step_count < args.steps:
    for x, y in l:
        o.zero_grad()
        if len(x):
            F.cross_entropy(m(x), y).backward()
        o.step()
        if not o.stepped:  # more chunks of this logical batch to come
            continue
        if o.step_count == args.crash_in_save:
            def torn_write(obj, f):  # the process dies half-way through the write
                f.write(b"\x80\x02partial")
                f.flush()
                os._exit(3)
            torch.save = torn_write
        anadp.save_checkpoint(args.ckpt, m, o)
        if o.step_count == args.kill_after:
            os._exit(9)
        if o.step_count == args.steps:
            break

torch.save({"params": [p.detach() for p in m.parameters()], "history": o.accountant.history,
            "scales": o.allocator.scales}, args.out)

"""Host overhead of a training step: a compute-free model of BERT-base's shape (12 layers, width
16, B = 2, T = 8) on one thread, so that a step's time is op dispatch and Python. Reports each
method's step time against non-private and the aten ops one step dispatches (deterministic: the
count a GPU step would launch, less the ops that are views).

    python -m bench.host_overhead            # table; bench.run writes it with its other rows
    python -m bench.host_overhead --compile  # the same with torch.compile'd forwards, and the graph breaks

``traced_probe`` (compiled only) is not anadp: a DP step whose per-sample algebra is traced whole, the
per-sample gradients by torch.func (vmap of grad), their norms, clip factors, clipped sums and Gaussian noise
in one compiled graph, then the same foreach AdamW. It measures what a step costs the host when no Python runs
per layer, the bound a traced anadp step would approach (docs/results.md, "the compiled step"). ``traced_flat_probe``:
the same with its per-sample algebra on one (B, P) matrix (one norm, one product, one noise draw), the form of
anadp's flat path (anadp.flat): per-tensor kernels cost the per-tensor probe ~0.15x of the step.
"""
from __future__ import annotations

import collections
import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.suite import Config, build, make_step

METHODS = ["nonprivate", "anadp_uniform", "anadp", "anadp_per_layer"]
PROBES = ("traced_probe", "traced_flat_probe")  # not anadp (the module docstring)
CONFIG = Config("bert-base shape, width 16, B=2 T=8", "bert", 2, 8, 16, 12, 100)
SMOKE_CONFIG = Config("bert 2 layers, width 16, B=2 T=8", "bert", 2, 8, 16, 2, 100)


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched below autograd (what a device would run)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def op_counts(step) -> collections.Counter:
    """aten ops of one call of ``step``, by name."""
    with _CountOps() as mode:
        step()
    return mode.ops


def graph_breaks(method: str, cfg: Config = CONFIG) -> int:
    """Graph breaks of torch.compile in the (wrapped) model's forward (dynamo's counter; not explain's count of
    graphs less one, which counts the private model's forward pre-hook, compiled as a frame of its own)."""
    from torch._dynamo.utils import counters
    model, inputs, labels = build(cfg)
    _, wrapped = make_step(method, model, inputs, labels)
    torch._dynamo.reset()
    counters.clear()
    torch.compile(wrapped)(**inputs)
    return sum(counters["graph_break"].values())


def traced_probe_step(cfg: Config, sigma: float = 1.0, clip: float = 1.0, flat: bool = False):
    """One step of the traced DP probe (see the module docstring) on ``build(cfg)``'s model; ``flat``: its
    per-sample algebra on one (B, P) matrix of every tensor's per-sample gradients side by side (one norm, one
    clipped sum, one noise draw, split into the tensors) instead of per tensor."""
    from torch.func import functional_call, grad, vmap
    model, inputs, labels = build(cfg)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def loss_one(p, x, y):
        out = functional_call(model, (p, buffers), (), {k: v[None] for k, v in x.items()})
        return torch.nn.functional.cross_entropy(getattr(out, "logits", out), y[None])

    def noisy_clipped_sums(p, x, y):
        ps = vmap(grad(loss_one), in_dims=(None, 0, 0))(p, x, y)
        if flat:
            G = torch.cat([ps[k].flatten(1) for k in p], 1)
            c = (clip / (G.square().sum(1).sqrt() + 1e-6)).clamp(max=1.0)
            s = c @ G
            s = s + sigma * clip * torch.randn_like(s)
            return [t.view(p[k].shape) for k, t in zip(p, s.split([p[k].numel() for k in p]))]
        sq = sum(g.flatten(1).square().sum(1) for g in ps.values())
        c = (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        return [torch.tensordot(c, ps[k], dims=1) + sigma * clip * torch.randn_like(p[k]) for k in p]

    compiled = torch.compile(noisy_clipped_sums, fullgraph=True)
    plist = list(params.values())

    def sums():
        return compiled({k: v.detach() for k, v in params.items()}, inputs, labels)

    def step():
        opt.zero_grad()
        for q, g in zip(plist, sums()):
            q.grad = g
        opt.step()
    step.sums = sums  # (the test's)
    step.model, step.inputs, step.labels = model, inputs, labels
    return step


def rows(rounds: int = 20, cfg: Config = CONFIG, compile: bool = False, methods=METHODS) -> list[dict]:
    """Each method's median host time of a step on one thread, the methods' steps interleaved
    (the shared machine's speed drifts: each method sees the same drift), after 3 warm-up steps;
    and the ops one step dispatches. ``compile``: forwards through torch.compile."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps = {}
            for method in methods:
                if method in PROBES:
                    steps[method] = traced_probe_step(cfg, flat=method == "traced_flat_probe")
                else:
                    model, inputs, labels = build(cfg)
                    steps[method] = make_step(method, model, inputs, labels, compile=compile)[0]
                for _ in range(3):
                    steps[method]()
            times, phases = {m: [] for m in methods}, {m: [] for m in methods}
            for _ in range(rounds):
                for method, step in steps.items():
                    t = time.perf_counter()
                    step()
                    times[method].append(time.perf_counter() - t)
                    if hasattr(step, "phases"):
                        phases[method].append(step.phases)
            # (the probe's compiled graph does not run under a dispatch mode: its ops are not counted)
            ops = {m: op_counts(step) for m, step in steps.items() if m not in PROBES}
    finally:
        torch.set_num_threads(threads)
    out = [{"config": cfg.name + (", compiled" if compile else ""), "method": m,
            "seconds": statistics.median(times[m]), "ops": sum(ops[m].values()) if m in ops else None,
            "top_ops": dict(ops[m].most_common(8)) if m in ops else None,
            # medians of the forward's, backward's and optimizer.step()'s host time (where the step reports them)
            "phases": [statistics.median(p[i] for p in phases[m]) for i in range(3)] if phases[m] else None}
           for m in methods]
    if compile:
        for r in out:
            r["graph_breaks"] = graph_breaks(r["method"], cfg) if r["method"] not in PROBES else 0  # fullgraph
    for r in out:
        r["x_nonprivate"] = r["seconds"] / out[0]["seconds"]
        r["ops_x_nonprivate"] = r["ops"] / out[0]["ops"] if r["ops"] is not None else None
    return out


def table(rows: list[dict]) -> str:
    breaks = "graph_breaks" in rows[0]
    lines = ["| host overhead (compute-free) | method | ms/step | x non-private | forward / backward / step ms | aten ops "
             "| ops x non-private |" + (" graph breaks (forward) |" if breaks else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if breaks else "")]
    for k, r in enumerate(rows):
        split = " / ".join(f"{t * 1e3:.1f}" for t in r["phases"]) if r.get("phases") else "-"
        lines.append(f"| {r['config'] if k == 0 else ''} | {r['method']} | {r['seconds'] * 1e3:.1f} | "
                     f"{r['x_nonprivate']:.2f} | {split} | {r['ops'] if r['ops'] is not None else '-'} | "
                     f"{format(r['ops_x_nonprivate'], '.2f') if r['ops'] is not None else '-'} |"
                     + (f" {r['graph_breaks']} |" if breaks else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    compiled = "--compile" in sys.argv[1:]
    print(table(rows(compile=compiled, methods=["nonprivate", "anadp_uniform", "anadp_per_layer", *PROBES]
                     if compiled else METHODS)))

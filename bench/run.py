"""Benchmark runner: step time and peak memory of every method on every configuration.

    python -m bench.run            # full CPU run -> bench/results/<machine>-<date>.{json,md,png}
    python -m bench.run --smoke    # tiny sizes, checks rows and equal updates (CI)

Timing: median over --rounds steps after one warm-up step, all methods in the
same process (--smoke); in the full run each (configuration, method) is timed in
a fresh subprocess. Memory (full run only): a second fresh subprocess runs two
steps and reports the growth of its peak RSS (ru_maxrss) from just before the
first step to the end: optimizer state, activations, per-sample buffers and
noise. It runs with MALLOC_MMAP_THRESHOLD_=65536, so that glibc maps every
tensor of 64 KiB or more on its own and returns it when freed: the peak RSS is
then the peak of live memory, as torch.cuda.max_memory_allocated is on CUDA,
instead of depending on what the default heap happens to retain after a free
(which moved one method's figure by 10-30% from run to run here). Timing runs
with the default allocator.

Whole-model rows are timed --repeats times (3), the methods interleaved (non-private,
Opacus hooks, Opacus ghost, anadp uniform, anadp, then again), and each method keeps its
fastest repeat: the shared machine's speed drifts by ~5% over minutes, and interleaving
exposes every method to the same drift (one pass per method had ANADP / non-private move
from 1.17 to 1.23 on an unchanged row between runs).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench import fsdp, host_overhead
from bench.suite import METHODS, build, flat_params, layer_configs, make_step, model_configs


def time_one(cfg, method, rounds):
    model, inputs, labels = build(cfg)
    step, _ = make_step(method, model, inputs, labels)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return statistics.median(times), peak_mb


def _in_subprocess(cfg, method, rounds, env=None) -> dict:
    code = ("import json,sys; from bench.suite import Config; from bench.run import time_one; "
            f"cfg=Config(**{cfg.__dict__!r});\n"
            f"try:\n t,m=time_one(cfg,{method!r},{rounds}); print(json.dumps({{'seconds':t,'peak_mb':m}}))\n"
            "except Exception as e:\n print(json.dumps({'error': type(e).__name__+': '+str(e)[:160]}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env={**os.environ, **(env or {})})
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": out.stderr.strip().splitlines()[-1][:200]}


def measure(cfg, method, rounds, isolate, memory=True):
    """{'seconds', 'peak_mb'} or {'error'}; each in a subprocess when isolate (see the module docstring)."""
    if not isolate:
        try:
            t, _ = time_one(cfg, method, rounds)
            return {"seconds": t, "peak_mb": None}
        except Exception as e:  # noqa: BLE001 - a method that cannot run this model is a result
            return {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    timed = _in_subprocess(cfg, method, rounds)
    if "error" in timed:
        return timed
    if not memory:
        return {"seconds": timed["seconds"]}
    mem = _in_subprocess(cfg, method, 1, {"MALLOC_MMAP_THRESHOLD_": "65536"})
    return {"seconds": timed["seconds"], "peak_mb": mem.get("peak_mb")}


def same_update(cfg, sigma):
    """Parameter change after one step, per DP method, from the same start and data."""
    model, inputs, labels = build(cfg)
    start = flat_params(model).clone()
    out = {}
    for method in METHODS[1:]:
        m = copy.deepcopy(model)
        try:
            # SGD: the update is the privatized gradient itself (Adam's first step would hide the clipping)
            step, wrapped = make_step(method, m, inputs, labels, sigma=sigma, optimizer="sgd")
            step()
            out[method] = flat_params(wrapped) - start
        except Exception:  # noqa: BLE001
            out[method] = None
    return out


def run(smoke: bool, rounds: int, isolate: bool, methods=METHODS, progress=True, repeats: int = 1,
        models_only: bool = False):
    """Every method on every configuration (``models_only``: the whole-model rows alone); whole-model
    rows ``repeats`` times, interleaved, each method's fastest repeat kept (see the module docstring)."""
    rows = []
    layers, models = ([] if models_only else layer_configs(smoke)), model_configs(smoke)
    plan = [(cfg, 1) for cfg in layers] + [(cfg, repeats) for cfg in models]
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(n for _, n in plan) * len(methods), disable=not progress)
    except ImportError:
        bar = None
    for cfg, n in plan:
        got = {m: {"config": cfg.name, "kind": cfg.kind, "batch": cfg.batch, "seq": cfg.seq, "method": m}
               for m in methods}
        for rep in range(n):
            for method in methods:
                r = got[method]
                if "error" not in r:
                    res = measure(cfg, method, rounds, isolate, memory=rep == 0)
                    if "error" in res or res["seconds"] < r.get("seconds", float("inf")):
                        r.update(res)
                    r["repeats"] = rep + 1
                if bar:
                    bar.set_postfix_str(f"{cfg.name} {method}")
                    bar.update(1)
        rows += got.values()
    if bar:
        bar.close()
    base = {r["config"]: r for r in rows if r["method"] == "nonprivate"}
    for r in rows:
        b = base[r["config"]]
        if "seconds" in r and "seconds" in b:
            r["x_nonprivate"] = r["seconds"] / b["seconds"]
            if r.get("peak_mb") and b.get("peak_mb"):
                r["mem_x_nonprivate"] = r["peak_mb"] / b["peak_mb"]
        for op in ("opacus_hooks", "opacus_ghost"):
            o = next((x for x in rows if x["config"] == r["config"] and x["method"] == op), None)
            if o and "seconds" in o and "seconds" in r:
                r[f"speedup_vs_{op}"] = o["seconds"] / r["seconds"]
    return rows


def noise_rows(n: int, rounds: int) -> list[dict]:
    """Gaussian draws per second: the cpu backend's compiled Philox kernel, the same stream in
    torch ops (the torch backend), and torch.randn (a different, non-counter-based stream)."""
    from anadp import philox
    from anadp.backends import get, why_unavailable
    out = torch.zeros(n)
    key = philox.group_key(0, 0, 0)
    ways = [("cpu backend kernel (Philox stream)", lambda: get("cpu").add_noise_(out, key, 1.0), why_unavailable("cpu")),
            ("torch backend ops (Philox stream)", lambda: get("torch").add_noise_(out, key, 1.0), None),
            ("torch.randn (reference speed)", lambda: torch.randn(n, out=out), None)]
    rows = []
    for name, fn, why in ways:
        if why is not None:
            rows.append({"noise": name, "error": why})
            continue
        fn()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rows.append({"noise": name, "elements": n, "seconds": statistics.median(times),
                     "M_per_s": n / statistics.median(times) / 1e6})
    return rows


def noise_table(rows) -> str:
    lines = ["| noise | elements | seconds | M draws/s |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['noise']} | error: {r['error']} | | |" if "error" in r else
                     f"| {r['noise']} | {r['elements']} | {r['seconds']:.4f} | {r['M_per_s']:.0f} |")
    return "\n".join(lines)


def table(rows) -> str:
    head = ("| config | method | s/step | x non-private | faster than Opacus hooks | faster than Opacus ghost "
            "| peak MB | mem x non-private |\n|---|---|---|---|---|---|---|---|")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['method']} | error: {r['error'][:70]} | | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['method']} | {r['seconds']:.4f} | {f(r.get('x_nonprivate'), '.2f')} | "
                     f"{f(r.get('speedup_vs_opacus_hooks'), '.2f')} | {f(r.get('speedup_vs_opacus_ghost'), '.2f')} | "
                     f"{f(r.get('peak_mb'), '.0f')} | {f(r.get('mem_x_nonprivate'), '.2f')} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}  # one colour per method in every panel
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, kind, key, label in [(axes[0], "linear", "batch", "batch size B (Linear 512x512)"),
                                 (axes[1], "seqlinear", "seq", "sequence length T (Linear 768x768, B=8)")]:
        for method in METHODS:
            pts = sorted((r[key], r["seconds"]) for r in rows if r["kind"] == kind and r["method"] == method
                         and "seconds" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, color=colors[method])
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="seconds per step")
        xs = sorted({r[key] for r in rows if r["kind"] == kind})
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(xs))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(x) for x in xs]))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    configs = [r["config"] for r in rows if r["method"] == "nonprivate"]
    width = 0.8 / (len(METHODS) - 1)
    for k, method in enumerate(METHODS[1:]):
        vals = [next((r.get("x_nonprivate", 0) for r in rows if r["config"] == c and r["method"] == method), 0)
                for c in configs]
        axes[2].bar([i + k * width for i in range(len(configs))], vals, width, label=method, color=colors[method])
    axes[2].axhline(1, color="k", lw=0.8)
    axes[2].set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], configs, rotation=60, ha="right",
                       fontsize=7)
    axes[2].set(yscale="log", ylabel="step time / non-private")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rounds", type=int, default=None, help="timed steps per measurement (median)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timings of the whole-model rows, fastest kept (default 3; --smoke 1)")
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--models-only", action="store_true", help="only the whole-model rows (and the host row)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to time")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot of an earlier run")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f)["rows"], args.replot[:-len(".json")] + ".png")
        return None
    rounds = args.rounds or (2 if args.smoke else 5)
    repeats = args.repeats or (1 if args.smoke else 3)
    methods = [m for m in METHODS if m in args.methods or m == "nonprivate"]
    rows = run(args.smoke, rounds, isolate=not args.smoke, methods=methods, repeats=repeats,
               models_only=args.models_only)
    noise = [] if args.models_only else noise_rows(1 << (16 if args.smoke else 24), rounds)
    host_cfg = host_overhead.SMOKE_CONFIG if args.smoke else host_overhead.CONFIG
    host = host_overhead.rows(rounds=2 if args.smoke else 20, cfg=host_cfg)
    # the same model compiled (torch.compile, fullgraph-able: anadp.compiled), DP against non-private compiled
    host_compiled = host_overhead.rows(rounds=2 if args.smoke else 20, cfg=host_cfg, compile=True,
                                       methods=["nonprivate", "anadp_uniform", "anadp_per_layer"])
    sharded = fsdp.rows(rounds=1 if args.smoke else rounds, repeats=1 if args.smoke else repeats,
                        cfg=fsdp.SMOKE_CONFIG if args.smoke else fsdp.CONFIG)
    machine = f"{platform.machine()}-{os.cpu_count()}cpu" + ("-smoke" if args.smoke else "")
    stem = os.path.join(args.out, f"{machine}-{datetime.date.today().isoformat()}{args.tag}")
    os.makedirs(args.out, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "rounds": rounds, "repeats": repeats,
            "command": "python -m bench.run" + (" --smoke" if args.smoke else "") + (f" --tag={args.tag}" if args.tag else "")
            + (" --models-only" if args.models_only else "")
            + (f" --methods {' '.join(args.methods)}" if methods != METHODS else ""), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "noise": noise, "host_overhead": host,
                   "host_overhead_compiled": host_compiled, "fsdp": sharded}, f, indent=1)
    md = f"# {meta['command']} — {meta['date']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads\n\n"
    with open(stem + ".md", "w") as f:
        f.write(md + table(rows) + "\n\n" + noise_table(noise) + "\n\n" + host_overhead.table(host) + "\n\n"
                + host_overhead.table(host_compiled) + "\n\n" + fsdp.table(sharded) + "\n")
    plot(rows, stem + ".png")
    print(table(rows))
    print()
    print(noise_table(noise))
    print()
    print(host_overhead.table(host))
    print()
    print(host_overhead.table(host_compiled))
    print()
    print(fsdp.table(sharded))
    print(f"\nwrote {stem}.json, .md, .png")
    return rows


if __name__ == "__main__":
    main()

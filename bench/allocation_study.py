"""Allocation study: uniform DP against every noise allocation, on the fine-tuning benchmark.

    python -m bench.allocation_study                      # full grid on the CPU (hours)
    python -m bench.allocation_study --device cuda --workers 8   # the same on a GPU (minutes)
    python -m bench.allocation_study --smoke --model DIR  # tiny, for CI

Grid: LoRA and full fine-tuning x epsilon 1, 3, 8 x seeds 0, 1, 2 x methods uniform,
anadp, clip, paper and paper-global (the paper's mechanism: one global clip, charged
sigma * min_g w_g, so its epsilon ends above the target; the table shows what it spent),
per-layer clipping (per_layer[-anadp][-adaptive|-shares]) and Adam's noise correction
(uniform-bc, anadp-bc), plus non-private per mode and seed. Runs are paired: a seed fixes the head's
initialization, the Poisson batches and the noise stream of every method.

Writes allocation-study-<date>.json (every run), .md (mean ± std per cell and the paired
difference to uniform, mean ± standard error) and .png (accuracy vs epsilon, and the
heat map of the default's noise scales) under --out, rewritten after every run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, replace

import torch
from torch.utils.data import TensorDataset

from anadp.apps.finetune import (POOLINGS, FinetuneConfig, expected_batch, heatmap, learning_rate, pooling_of, prepare,
                                 summarize, train_one)
from anadp.apps.methods import METHODS as ALL_METHODS, uses_anadp

METHODS = ["uniform"] + [m for m in ALL_METHODS if m not in ("nonprivate", "uniform")]  # the baseline first
MODES = {"lora": dict(lora=True), "full": dict(lora=False)}  # rates and batches: finetune's defaults per mode

_W: dict = {}  # per worker: the prepared data


def _init(cfg: FinetuneConfig, data: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _W.update(cfg=cfg, data=data)


def _run(job: tuple) -> dict:
    mode, method, eps, seed = job
    cfg = replace(_W["cfg"], **MODES[mode])
    d = _W["data"]
    try:
        row = train_one(cfg, method, eps, seed, d["train"], d["test"], d["delta"], d["model_path"], progress=False)
    except Exception as e:  # noqa: BLE001 - one failed cell is a result, not the end of the study
        row = {"method": method, "target_epsilon": eps if method != "nonprivate" else None, "seed": seed,
               "error": f"{type(e).__name__}: {e}"[:300]}
    row["mode"] = mode
    return row


def jobs(modes, epsilons, seeds, methods, nonprivate: bool = True) -> list[tuple]:
    """Most telling first, so that a study stopped early holds complete paired cells: per mode,
    non-private (unless ``nonprivate`` is False), then uniform and the default (the first two
    methods) at each epsilon in the order given, then the other methods; seeds innermost."""
    out = []
    for mode in modes:
        out += [(mode, "nonprivate", math.inf, seed) for seed in seeds] if nonprivate else []
        for tier in (methods[:2], methods[2:]):
            out += [(mode, m, eps, seed) for eps in epsilons for m in tier for seed in seeds]
    return out


# what a run's outcome depends on beyond (mode, method, epsilon, seed): a resumed study must agree on each that its
# runs read (non-private runs read no DP field, DP runs not the non-private rate)
RECIPE = ("epochs", "lr", "batch_size", "dp_lr", "head_lr", "head_scale", "max_grad_norm", "weight_decay", "warmup",
          "decay", "pooling", "lora_r", "lora_targets", "max_len")
DP_ONLY = ("batch_size", "dp_lr", "head_lr", "head_scale", "max_grad_norm")
BEFORE = {"pooling": "cls", "head_lr": None, "head_scale": None, "warmup": 0.0, "decay": "none"}  # before the field
# the DP runs' expected batch per mode before runs recorded their own (2026-12-07), when full fine-tuning's default
# moved from 1024 to 512: a run's batch as it resolved it is what its outcome depends on, not the config's None
BATCH_BEFORE = {"lora": 128, "full": 1024}


def run_batch(config: dict, row: dict) -> int:
    """The expected batch a DP run of a study with ``config`` was made with."""
    return row.get("batch_size") or config.get("batch_size") or BATCH_BEFORE[row["mode"]]


def recipe_differences(made: dict, now: dict, dp: bool, model_path: str) -> str:
    """"field: theirs -> ours" for each recipe field that a DP run (``dp``) or a non-private one reads where a
    study's config and this one differ; the pooling as that run resolves it (finetune.pooling_of)."""
    def value(cfg, k):
        v = cfg.get(k, BEFORE.get(k))
        return pooling_of(model_path, v, dp) if k == "pooling" else list(v) if isinstance(v, tuple) else v
    known = [k for k in RECIPE if (k in made or k in BEFORE) and k not in (("lr",) if dp else DP_ONLY)]
    return ", ".join(f"{k}: {value(made, k)!r} -> {value(now, k)!r}" for k in known
                     if value(made, k) != value(now, k))


def summary(rows: list[dict]) -> list[dict]:
    """finetune.summarize per mode: mean ± std per (method, epsilon), paired difference to uniform."""
    ok = [r for r in rows if "accuracy" in r]
    return [s | {"mode": mode} for mode in dict.fromkeys(r["mode"] for r in ok)
            for s in summarize([r for r in ok if r["mode"] == mode])]


def markdown(result: dict) -> str:
    summ = result["summary"]
    methods = [m for m in METHODS if any(s["method"] == m for s in summ)]
    lines = [f"# Allocation study, {result['date']}", "", result["description"], "",
             "Accuracy (mean ± std over seeds); for each allocation, the paired difference to uniform DP in points "
             "(mean ± standard error over seeds), or its accuracy where no uniform run pairs with it. paper-global's "
             "epsilon is what it spent.", "",
             "| mode | epsilon | non-private | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    by = {(s["mode"], s["target_epsilon"], s["method"]): s for s in summ}
    for mode in MODES:
        nonpriv = by.get((mode, None, "nonprivate"))
        for eps in sorted({s["target_epsilon"] for s in summ if s["mode"] == mode and s["target_epsilon"]}):
            cells = []
            for m in methods:
                s = by.get((mode, eps, m))
                if s is None:
                    cells.append("")
                elif m == "uniform" or "vs_uniform_mean" not in s:  # no uniform run to pair with
                    cells.append(f"{s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f}")
                else:
                    spent = f" (eps {s['epsilon']:.1f})" if m == "paper-global" and s["epsilon"] else ""
                    cells.append(f"{100 * s['vs_uniform_mean']:+.2f} ± "
                                 f"{100 * s.get('vs_uniform_se', 0):.2f}{spent}")
            np_cell = f"{nonpriv['accuracy_mean']:.4f} ± {nonpriv['accuracy_std']:.4f}" if nonpriv else ""
            lines.append(f"| {mode} | {eps:g} | {np_cell} | " + " | ".join(cells) + " |")
    failed = [r for r in result["rows"] if "error" in r]
    if failed:
        lines += ["", f"{len(failed)} runs failed; first: {failed[0]['error']}"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summ = result["summary"]
    modes = [m for m in MODES if any(s["mode"] == m for s in summ)]
    fig, axes = plt.subplots(2, max(len(modes), 1), figsize=(6.5 * max(len(modes), 1), 8.5), squeeze=False)
    for j, mode in enumerate(modes):
        ax = axes[0][j]
        for m in ["nonprivate"] + METHODS:
            ss = sorted((s for s in summ if s["mode"] == mode and s["method"] == m), key=lambda s: s["target_epsilon"] or 0)
            if not ss:
                continue
            if m == "nonprivate":
                ax.axhline(ss[0]["accuracy_mean"], color="k", ls="--", label="non-private")
                continue
            ax.errorbar([s["target_epsilon"] for s in ss], [s["accuracy_mean"] for s in ss],
                        yerr=[s["accuracy_std"] for s in ss],
                        marker="o", capsize=3, label=m)
        ax.set(xscale="log", xlabel="target epsilon", ylabel="test accuracy", title=f"{mode}: accuracy vs epsilon")
        ax.legend(fontsize=8)
        runs = [r for r in result["rows"] if r.get("mode") == mode and uses_anadp(r["method"]) and r.get("noise_scales")]
        ax = axes[1][j]
        if runs:
            r = max(runs, key=lambda r: (r["target_epsilon"], -r["seed"]))
            im = heatmap(ax, r["noise_scales"], f"{mode}: anadp w_g, eps {r['target_epsilon']:g}, seed {r['seed']} "
                         f"(w = 1 for {r.get('warmup_steps', 10)} steps)")
            if im is not None:
                fig.colorbar(im, ax=ax)
        else:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="bench/results", help="output directory")
    ap.add_argument("--device", default="cpu", help="torch device of the runs")
    ap.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--model", default=None, help="local model directory (default: the packaged MiniLM-L6)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--no-nonprivate", action="store_true",
                    help="skip the non-private runs (the paired differences do not need them)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--backend", default="auto", help="anadp backend (auto, torch, cpu, triton, cuda)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="expected logical batch (default per mode: finetune.expected_batch)")
    ap.add_argument("--epochs", type=int, default=FinetuneConfig.epochs)
    ap.add_argument("--dp-lr", type=float, default=None, help="DP learning rate (default: the mode's)")
    ap.add_argument("--head-lr", type=float, default=FinetuneConfig.head_lr, help="DP rate of the head")
    ap.add_argument("--head-scale", type=float, default=FinetuneConfig.head_scale, help="DP: the head's w")
    ap.add_argument("--pooling", choices=POOLINGS, default=FinetuneConfig.pooling,
                    help="the head's input (finetune --pooling)")
    ap.add_argument("--warmup", type=float, default=FinetuneConfig.warmup)
    ap.add_argument("--decay", choices=["linear", "none"], default=FinetuneConfig.decay)
    ap.add_argument("--tag", default="", help="appended to the output file names")
    ap.add_argument("--physical-batch-size", type=int, default=FinetuneConfig.physical_batch_size,
                    help="physical chunk of a logical batch (results do not depend on it beyond rounding)")
    ap.add_argument("--save-prepared", help="write the tokenized data and delta to this file and stop")
    ap.add_argument("--prepared", help="read the tokenized data from a --save-prepared file (a machine without "
                                       "the data and tokenizer packages)")
    ap.add_argument("--resume", nargs="+", default=[],
                    help="study JSONs whose finished runs of this grid are kept and not run again (the first of a run "
                         "wins); with --budget-s 0, only merges them into one table")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI): 2 steps a run")
    args = ap.parse_args(argv)
    cfg = FinetuneConfig(model=args.model, device=args.device, backend=args.backend, batch_size=args.batch_size,
                         epochs=args.epochs, physical_batch_size=args.physical_batch_size, dp_lr=args.dp_lr,
                         head_lr=args.head_lr, head_scale=args.head_scale, pooling=args.pooling, warmup=args.warmup,
                         decay=args.decay)
    if args.smoke:
        cfg = replace(cfg, train_size=96, test_size=32, max_steps=2, batch_size=32, physical_batch_size=16)
    if args.prepared:
        data = torch.load(args.prepared)
        data["model_path"] = args.model or data["model_path"]
        data["train"], data["test"] = (TensorDataset(*(t.long() for t in data[k])) for k in ("train", "test"))
    else:
        data = prepare(cfg)
    if args.save_prepared:
        torch.save({k: ([t.to(torch.int32) for t in v.tensors] if k in ("train", "test") else v)
                    for k, v in data.items()}, args.save_prepared)
        return 0
    todo = jobs(args.modes, args.epsilon, args.seed, args.methods, nonprivate=not args.no_nonprivate)
    date = datetime.date.today().isoformat()
    stem = os.path.join(args.out, f"allocation-study-{date}{'-smoke' if args.smoke else ''}{args.tag}")
    kept, have, grid = [], set(), set(todo)
    for path in args.resume:  # runs of this grid already made: kept, not run again
        with open(path) as f:
            made = json.load(f)
        config = made.get("config", {})
        judged = []  # (run, the recipe fields it was made with that differ from this study's); a run's own resolved
        for r in made["rows"]:  # pooling and batch (their defaults depend on the kind of run) beat the config's
            if "accuracy" in r:
                theirs = config | ({"pooling": r["pooling"]} if "pooling" in r else {}) | {
                    "batch_size": run_batch(config, r)}
                ours = asdict(cfg) | {"batch_size": expected_batch(replace(cfg, **MODES[r["mode"]]))}
                judged.append((r, recipe_differences(theirs, ours, r["method"] != "nonprivate", data["model_path"])))
        mine = [r for r, d in judged if not d]
        left = {("DP" if r["method"] != "nonprivate" else "non-private"): d for r, d in judged if d}
        if not mine:  # a study that shares no run with this one: a mistake, not a merge
            raise SystemExit(f"{path} was run with another recipe ({'; '.join(f'{k}: {d}' for k, d in left.items())}"
                             "): its runs would not pair with this study's; pass the same options, or leave it out of "
                             "--resume")
        for kind, d in left.items():  # its other kind of run may still pair (non-private runs read no DP field)
            print(f"--resume {path}: its {kind} runs are left out, made with another recipe ({d})", file=sys.stderr)
        for r in mine:
            key = (r["mode"], r["method"], r["target_epsilon"] or math.inf, r["seed"])
            if key not in have and key in grid:  # a DP run carries its batch: a merged study's config may not
                kept.append(r | {"batch_size": run_batch(config, r)} if r["method"] != "nonprivate" else r)
                have.add(key)
    todo = [j for j in todo if j not in have]
    os.makedirs(args.out, exist_ok=True)
    result = {"date": date, "device": args.device, "torch": torch.__version__, "config": asdict(cfg) | {
        "model": data["model_path"], "train_size": len(data["train"]), "test_size": len(data["test"]),
        "delta": data["delta"], "modes": MODES},
        "description": (f"{data['source']}, {len(data['train'])} train / {len(data['test'])} test, model "
                        f"{'/'.join(data['model_path'].rstrip('/').split('/')[-2:])}; {cfg.epochs} epochs, AdamW, "
                        f"C = {cfg.max_grad_norm}; expected batch and DP lr: "
                        + ", ".join(f"{m} {expected_batch(c)}, {learning_rate(c, True):g}"
                                    for m, c in ((m, replace(cfg, **v)) for m, v in MODES.items()))
                        + f"; device {args.device}."),
        "rows": [], "summary": []}
    for row in kept:
        result["rows"].append(row)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    t0 = time.time()

    def over_budget() -> bool:
        return args.budget_s is not None and time.time() - t0 >= args.budget_s

    def save():
        result["summary"] = summary(result["rows"])
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(result))

    def record(row):
        result["rows"].append(row)
        save()
        print(f"{time.time() - t0:7.0f} s  {len(result['rows']) - len(kept)}/{len(todo)}  {row.get('mode')} {row['method']} "
              f"eps={row.get('target_epsilon')} seed={row['seed']} acc={row.get('accuracy', row.get('error'))}",
              flush=True)

    if args.workers == 1:
        _init(cfg, data, threads)
        for job in todo:
            if over_budget():
                break
            record(_run(job))
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.workers, initializer=_init, initargs=(cfg, data, threads)) as pool:
            # at most one run per worker handed out at a time, so that the budget stops new runs only
            # (a run in flight finishes: terminating it would throw its work away)
            queue, running = list(todo), []
            while queue or running:
                while queue and len(running) < args.workers and not over_budget():
                    running.append(pool.apply_async(_run, (queue.pop(0),)))
                if not running:
                    break
                done = next((p for p in running if p.ready()), None)
                if done is None:
                    time.sleep(1.0)
                    continue
                running.remove(done)
                record(done.get())
    save()
    plot(result, stem + ".png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

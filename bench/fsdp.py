"""FSDP2 on 2 CPU processes (gloo): the step time of non-private training and of anadp, each rank a
GPT-2-like model with fully_shard on every block and the root, and one process doing one rank's
work (half the batch, one thread) without FSDP; all ratios from one run, the methods interleaved.
The CPU stands in for GPUs: it shows what anadp adds to a sharded step (the reduce-scatter of the
clipped sums, each rank's noise of its rows, the allocation's statistics summed over shards), not
GPU speed.

    python -m bench.fsdp     # table -> bench/results/<machine>-<date>-fsdp.{json,md}; bench.run has the row too
"""
from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
import warnings

import torch

from bench.suite import Config, build, make_step

METHODS = ["nonprivate", "anadp"]
CONFIG = Config("gpt2-like 256x4, B=16 (8 per rank) T=128", "gpt2", 16, 128, 256, 4, 50257)
SMOKE_CONFIG = Config("gpt2-tiny, B=4 T=16", "gpt2", 4, 16, 32, 1, 200)
WORLD = 2


def _steps(cfg: Config, rank: int, world: int, shard: bool) -> dict:
    """method -> one training step closure on this rank's share of the batch."""
    steps = {}
    for method in METHODS:
        model, inputs, labels = build(cfg)  # the same initialization on every rank
        per = cfg.batch // world
        part = slice(rank * per, (rank + 1) * per)
        inputs, labels = {k: v[part] for k, v in inputs.items()}, labels[part]
        if shard:
            from torch.distributed.fsdp import fully_shard
            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
        steps[method] = make_step(method, model, inputs, labels, poisson_sampling=shard)[0]
    return steps


def _time(steps: dict, rounds: int, repeats: int, sync=lambda: None) -> dict:
    """method -> fastest of ``repeats`` medians of ``rounds`` steps, the methods interleaved, after
    two warm-up steps each."""
    for step in steps.values():
        for _ in range(2):
            step()
    best = {m: float("inf") for m in steps}
    for _ in range(repeats):
        for m, step in steps.items():
            times = []
            for _ in range(rounds):
                sync()
                t = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t)
            best[m] = min(best[m], statistics.median(times))
    return best


def _worker(rank, port, out, cfg, rounds, repeats):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = _time(_steps(cfg, rank, WORLD, shard=True), rounds, repeats, sync=dist.barrier)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def rows(rounds: int = 5, repeats: int = 3, cfg: Config = CONFIG) -> list[dict]:
    """[FSDP2 on 2 processes, one process with one rank's work]: each method's step time and anadp's
    ratio to non-private."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_worker, args=(port, out, cfg, rounds, repeats), nprocs=WORLD, join=True)
        sharded = torch.load(out, weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            single = _time(_steps(cfg, 0, WORLD, shard=False), rounds, repeats)
    finally:
        torch.set_num_threads(threads)
    return [{"setting": f"FSDP2, {WORLD} gloo processes x 1 thread", "config": cfg.name, **sharded,
             "ratio": sharded["anadp"] / sharded["nonprivate"]},
            {"setting": "1 process x 1 thread, one rank's half batch", "config": cfg.name, **single,
             "ratio": single["anadp"] / single["nonprivate"]}]


def table(rows: list[dict]) -> str:
    out = ["| setting | config | non-private s/step | anadp s/step | anadp / non-private |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['setting']} | {r['config']} | {r['nonprivate']:.4f} | {r['anadp']:.4f} | {r['ratio']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    import datetime
    import json
    import platform
    found = rows()
    stem = os.path.join(os.path.dirname(__file__), "results",
                        f"{platform.machine()}-{os.cpu_count()}cpu-{datetime.date.today().isoformat()}-fsdp")
    meta = {"command": "python -m bench.fsdp", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": platform.platform(), "torch": torch.__version__}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": found}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# {meta['command']} — {meta['date']}, {meta['machine']}, torch {meta['torch']}\n\n"
                + table(found) + "\n")
    print(table(found))
    print(f"wrote {stem}.json, .md")


if __name__ == "__main__":
    main()

"""DDP on torch.distributed (gloo, 2 processes) equals the single-process run."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import anadp  # noqa: E402
from models import make_setup  # noqa: E402


def train(steps=3, **kw):
    m, o, l = make_setup("adamw")
    # sigma 0.05: anadp's statistics measurable on this tiny model, so its scales move and are compared
    m, o, l = anadp.make_private(m, o, l, noise_multiplier=0.05, max_grad_norm=0.5, seed=5,
                                 allocation_config=anadp.AllocationConfig(warmup_steps=1), **kw)
    while o.step_count < steps:
        for x, y in l:
            o.zero_grad()
            if len(x):
                F.cross_entropy(m(x), y).backward()
            o.step()
            if o.step_count == steps:
                break
    return m, o


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m, o = train()
        torch.save({"params": [p.detach() for p in m.parameters()], "scales": o.allocator.scales,
                    "history": o.accountant.history, "distributed": o.distributed}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_single_process(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    m, o = train()
    ref = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert all(r["distributed"] for r in ranks) and not o.distributed
    for r in ranks:
        got = torch.cat([p.flatten() for p in r["params"]])
        assert float((got - ref).norm() / ref.norm()) < 1e-6
        assert r["history"] == o.accountant.history
    assert torch.equal(ranks[0]["scales"], ranks[1]["scales"])  # ANADP identical on both ranks
    assert torch.allclose(ranks[0]["scales"], o.allocator.scales, rtol=1e-6)
    assert not torch.equal(o.allocator.scales, torch.ones_like(o.allocator.scales))


def test_ranks_run_the_same_number_of_chunks_none_empty():
    """With max_physical_batch_size, every rank yields as many chunks as the rank with the largest
    share (FSDP's collectives need all ranks in every forward), its share split evenly, so no chunk is
    empty (Hugging Face GPT-2 cannot take a batch of 0) and none exceeds the size; together the ranks'
    chunks are the single-process Poisson batch."""
    from torch.utils.data import DataLoader, TensorDataset
    from types import SimpleNamespace
    from anadp.chunks import ChunkProtocol
    from anadp.data import DPDataLoader
    data = TensorDataset(torch.arange(200))
    loaders = [DPDataLoader(DataLoader(data, batch_size=20), poisson_sampling=True, max_physical_batch_size=4,
                            generator=torch.Generator().manual_seed(7), rank=r, world_size=w)
               for r, w in ((0, 2), (1, 2), (0, 1))]

    per_rank = []
    for loader in loaders:
        loader.engine = SimpleNamespace(chunks=ChunkProtocol())  # what the loader tells the engine
        batches, cur = [], []
        for (x,) in loader:
            cur.append(x.tolist())
            if loader.engine.chunks.ends_logical:
                batches.append(cur)
                cur = []
        per_rank.append(batches)
    single = [sum(b, []) for b in per_rank.pop()]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single)
    for a, b, whole in zip(*per_rank, single):
        assert len(a) == len(b) and all(0 < len(c) <= 4 for c in a + b)
        assert sorted(sum(a, []) + sum(b, [])) == sorted(whole)

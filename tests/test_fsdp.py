"""FSDP2 (fully_shard) and DDP-wrapped models on 2 gloo ranks equal the single-process run;
a 2-rank run killed and resumed from a DCP checkpoint is bit-identical; misuse across ranks.

Two spawns of 2 processes serve every test (module fixture): the first runs the scenarios, an
uninterrupted run and the first half of an interrupted one, whose processes then exit; the second
resumes it from the checkpoint."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import anadp

pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

STEPS = 3
SIGMA = 0.05  # small enough that anadp's statistics move its scales on these tiny models, compared below


def _gpt2(dropout=0.0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout)
    m = GPT2LMHeadModel(cfg)
    return m, list(m.transformer.h)


def _roberta_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=20, num_labels=3, pad_token_id=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    m = get_peft_model(RobertaForSequenceClassification(cfg), LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    return m, list(m.base_model.model.roberta.encoder.layer)


def _loss(kind, m, x):
    out = m(input_ids=x)
    if kind == "gpt2":
        return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    return F.cross_entropy(out.logits, x[:, 0] % 3)


def _build(kind, wrap, allocation="anadp", dropout=0.0, **kw):
    m, units = _gpt2(dropout) if kind == "gpt2" else _roberta_lora()
    if wrap in ("fsdp", "fsdp-bf16"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        extra = {"mp_policy": policy} if wrap == "fsdp-bf16" else {}
        for u in units:
            fully_shard(u, **extra)
        fully_shard(m, **extra)
    elif wrap == "ddp":
        m = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, 40, (48, 8), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(ids), batch_size=12)
    m, o, l = anadp.make_private(m, opt, loader, noise_multiplier=SIGMA, max_grad_norm=1.0, seed=5,
                                 allocation=allocation, allocation_config=anadp.AllocationConfig(warmup_steps=1), **kw)
    return m, o, l


def _train(kind, m, o, l, steps):
    """Every rank runs each chunk's forward and backward, an empty one too: FSDP's collectives need all."""
    while o.step_count < steps:
        for (x,) in l:
            o.zero_grad()
            _loss(kind, m, x).backward()
            o.step()
            if o.step_count == steps:
                break


def _result(m, o) -> dict:
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in m.parameters() if p.requires_grad]
    return {"params": torch.cat([p.flatten() for p in full]), "history": list(o.accountant.history),
            "scales": o.allocator.scales.clone(), "epsilon": o.privacy_spent(1e-5)}


SCENARIOS = {  # name: (model, wrapper, allocation, make_private's other arguments)
    "fsdp-gpt2-uniform": ("gpt2", "fsdp", "uniform", {}),
    "fsdp-gpt2-bc": ("gpt2", "fsdp", "uniform", {"adam_noise_correction": True}),  # Adam's noise correction
    "fsdp-gpt2-anadp": ("gpt2", "fsdp", "anadp", {}),
    "fsdp-lora-uniform": ("lora", "fsdp", "uniform", {}),
    "fsdp-lora-anadp": ("lora", "fsdp", "anadp", {}),
    "fsdp-gpt2-per_layer": ("gpt2", "fsdp", "anadp", {"clipping": "per_layer"}),
    "ddp-gpt2-uniform": ("gpt2", "ddp", "uniform", {}),
    "ddp-gpt2-anadp": ("gpt2", "ddp", "anadp", {}),
}
RESUME = dict(kind="gpt2", wrap="fsdp", dropout=0.1, max_physical_batch_size=4)  # dropout: each rank's RNG restored


def _first(rank, out):
    res = {}
    for name, (kind, wrap, allocation, kw) in SCENARIOS.items():
        m, o, l = _build(kind, wrap, allocation, **kw)
        _train(kind, m, o, l, STEPS)
        res[name] = _result(m, o)
    m, o, l = _build("gpt2", "fsdp-bf16")
    _train("gpt2", m, o, l, STEPS)
    res["bf16"] = _result(m, o)
    kw = dict(RESUME)
    kind = kw.pop("kind")
    m, o, l = _build(kind, **kw)  # uninterrupted
    _train(kind, m, o, l, 4)
    res["uninterrupted"] = _result(m, o)
    m, o, l = _build(kind, **kw)  # interrupted after 2 steps
    _train(kind, m, o, l, 2)
    anadp.save_distributed_checkpoint(f"{out}.dcp", m, o, note="half")
    m, o, l = _build("gpt2", "fsdp")  # resumed on one rank, below
    _train("gpt2", m, o, l, STEPS - 1)
    anadp.save_distributed_checkpoint(f"{out}.w2.dcp", m, o)
    try:  # other settings on rank 1
        anadp.make_private(*_tiny(), noise_multiplier=SIGMA * (1 + rank), max_grad_norm=1.0, seed=5)
    except ValueError as e:
        res["mismatch"] = str(e)
    m, units = _gpt2()  # sharded after make_private
    m, o, l = anadp.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), _tiny()[2], noise_multiplier=SIGMA,
                                 max_grad_norm=1.0, seed=5)
    fully_shard(m)
    try:
        for (x,) in l:
            _loss("gpt2", m, x).backward()
            o.step()
    except RuntimeError as e:
        res["sharded_after"] = str(e)
    torch.save(res, f"{out}.{rank}")


def _tiny():
    m = torch.nn.Linear(4, 2)
    data = DataLoader(TensorDataset(torch.randint(2, 40, (16, 8))), batch_size=4)
    return m, torch.optim.SGD(m.parameters(), lr=0.1), data


def _resume(rank, out):
    kw = dict(RESUME)
    kind = kw.pop("kind")
    m, o, l = _build(kind, **kw)
    extra = anadp.load_distributed_checkpoint(f"{out}.dcp", m, o)
    _train(kind, m, o, l, 4)
    torch.save({"resumed": _result(m, o), "extra": extra}, f"{out}.resumed.{rank}")


def _resume_on_one_rank(rank, out):
    m, o, l = _build("gpt2", "fsdp")
    anadp.load_distributed_checkpoint(f"{out}.w2.dcp", m, o)
    loaded = _result(m, o)
    _train("gpt2", m, o, l, STEPS)
    torch.save(_result(m, o) | {"loaded": loaded}, f"{out}.w1")


def _worker(rank, world, port, out, job):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    anadp.DPOptimizer.REDUCE_BUCKET = 300  # several reduce-scatter buckets per chunk, even on these tiny models
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        job(rank, out)
    finally:
        dist.destroy_process_group()


def _spawn(job, out, world=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, out, job), nprocs=world, join=True)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp") / "run")
    _spawn(_first, out)
    _spawn(_resume, out)
    _spawn(_resume_on_one_rank, out, world=1)
    return [torch.load(f"{out}.{r}", weights_only=True) | torch.load(f"{out}.resumed.{r}", weights_only=True)
            | {"one rank": torch.load(f"{out}.w1", weights_only=True)} for r in range(2)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_single_process(ranks, name):
    kind, _, allocation, kw = SCENARIOS[name]
    ref = _single(kind, allocation, **kw)
    start = _start(kind)
    assert float((ref["params"] - start).norm() / start.norm()) > 1e-3  # the steps moved the parameters
    for r in ranks:
        got = r[name]
        err = float((got["params"] - ref["params"]).norm() / ref["params"].norm())
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
        assert got["history"] == ref["history"] and got["epsilon"] == ref["epsilon"]
        assert torch.allclose(got["scales"], ref["scales"], rtol=1e-5)
    assert torch.equal(ranks[0][name]["scales"], ranks[1][name]["scales"])
    if allocation == "anadp":  # the allocation moved, identically on both ranks and as in one process
        assert not torch.equal(ref["scales"], torch.ones_like(ref["scales"]))


def test_fsdp_mixed_precision(ranks):
    """bf16 compute (MixedPrecisionPolicy), float32 shards: the parameters' change over the steps within
    bf16's rounding of the float32 run's (8 mantissa bits: ~0.4% per rounding; bound 10%, where a
    lost gradient or noise term would be off by ~100%)."""
    ref, start = _single("gpt2", "anadp"), _start("gpt2")
    for r in ranks:
        got = r["bf16"]
        assert got["history"] == ref["history"]
        err = float((got["params"] - ref["params"]).norm() / (ref["params"] - start).norm())
        assert err < 0.1, f"bf16 update off by {err:.3f} of the float32 update"


def _single(kind, allocation, **kw) -> dict:
    m, o, l = _build(kind, None, allocation, **kw)
    _train(kind, m, o, l, STEPS)
    assert not o.distributed
    return _result(m, o)


def _start(kind) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in _build(kind, None)[0].parameters() if p.requires_grad])


def test_resumed_from_dcp_bit_identical(ranks):
    for r in ranks:
        assert r["extra"] == {"note": "half"}
        assert torch.equal(r["resumed"]["params"], r["uninterrupted"]["params"])
        assert r["resumed"]["history"] == r["uninterrupted"]["history"]
        assert torch.equal(r["resumed"]["scales"], r["uninterrupted"]["scales"])


def test_resumed_at_another_world_size(ranks):
    """Saved by 2 ranks after STEPS - 1 steps, resumed on 1 (the checkpoint resharded): its last step
    draws the same batch and noise, so it ends where the 2-rank run does, up to float rounding."""
    got, ref = ranks[0]["one rank"], ranks[0]["fsdp-gpt2-anadp"]
    assert sum(n for _, _, n in got["loaded"]["history"]) == STEPS - 1  # one step left to take after the load
    assert not torch.equal(got["loaded"]["params"], _start("gpt2"))
    assert float((got["params"] - ref["params"]).norm() / ref["params"].norm()) < 1e-6
    assert got["history"] == ref["history"] and torch.allclose(got["scales"], ref["scales"], rtol=1e-5)


def test_misuse_across_ranks_refused(ranks):
    for r in ranks:  # every rank raises, none hangs
        assert "other settings on some ranks" in r["mismatch"] and "noise_multiplier" in r["mismatch"]
        assert "fully_shard after make_private" in r["sharded_after"]


def test_distributed_sampler_refused():
    from torch.utils.data import DistributedSampler
    m, opt, data = _tiny()
    loader = DataLoader(data.dataset, batch_size=4, sampler=DistributedSampler(data.dataset, num_replicas=2, rank=0))
    with pytest.raises(ValueError, match="DistributedSampler"):
        anadp.make_private(m, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0)

"""Host syncs in the private step: ops that read a device value back to the host (``.item()``,
``bool(t)``, ``unique``, ``nonzero``, ``torch.equal``, ...) stall a GPU step and cannot be captured in a
CUDA graph. Counted deterministically on the CPU by a dispatch mode, attributed to anadp's code (the
wrapped torch optimizer's own reads, the same as in non-private training, are not anadp's)."""
import contextlib
import os
import traceback
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import anadp
from anadp import compiled

SYNC_OPS = {"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero", "unique", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "masked_select"}
_ANADP = os.sep + "anadp" + os.sep
HOST = {"total", "noise_total"}  # anadp.clipping's properties of its host-side thresholds
_OPTIM = os.sep + os.path.join("torch", "optim") + os.sep


# a dispatch mode runs an op's body with the mode off: the bodies of anadp's ops (anadp.compiled), run under it
_OP_BODIES = {getattr(torch.ops.anadp, name).default: getattr(compiled, "_" + name)
              for name in ("record_backward", "record_dense", "begin_forward")} if compiled.available() else {}


class SyncCounter(TorchDispatchMode):
    """Counts sync ops whose innermost caller outside torch is anadp (a read inside torch.optim is the
    wrapped optimizer's own). Host-side code is not counted: anadp/allocation.py works on host copies of the
    released statistics (allocation_feed reads them back once per step), and the clipping thresholds are
    host tensors (``HOST``)."""

    def __init__(self):
        super().__init__()
        self.where: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = _OP_BODIES.get(func)
        if body is not None:  # an anadp op (a compiled model's): its body is anadp's code, counted too
            with self:
                return body(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in SYNC_OPS:
            for frame in reversed(traceback.extract_stack()[:-1]):
                if _OPTIM in frame.filename:
                    break
                if _ANADP in frame.filename:
                    if frame.filename.endswith("allocation.py") or (frame.filename.endswith("clipping.py")
                                                                      and frame.name in HOST):
                        break
                    self.where.append(f"{func.__name__} at {frame.filename.split(_ANADP)[-1]}:{frame.lineno}")
                    break
        return func(*args, **(kwargs or {}))


def _model(kind):
    import transformers as t
    if kind == "bert":
        cfg = t.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=48, num_labels=2)
        return t.BertForSequenceClassification(cfg)
    if kind == "gpt2":
        return t.GPT2ForSequenceClassification(t.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2,
                                                            pad_token_id=0))
    return t.LlamaForSequenceClassification(t.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                                          num_hidden_layers=2, num_attention_heads=2,
                                                          pad_token_id=0))


def _syncs(kind, clipping, steps=4, physical=None, compile_=False):
    """anadp's syncs (backward, optimizer.step()) of each step of a private ``kind`` model (batches of 8;
    ``physical``: in physical chunks of that many samples, their syncs summed over each step's chunks;
    ``compile_``: the model compiled with ``fullgraph=True``, its forward run outside the counter (a dispatch mode
    stops dynamo). No sync op can be inside its graphs: dynamo breaks the graph at a read of a tensor's value,
    an error under fullgraph=True.)"""
    torch.manual_seed(0)
    model = _model(kind)
    ids, y = torch.randint(1, 50, (8 * steps, 8)), torch.randint(0, 2, (8 * steps,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = anadp.make_private(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                                DataLoader(TensorDataset(ids, y), batch_size=8),
                                                noise_multiplier=1.0, max_grad_norm=1.0, clipping=clipping,
                                                poisson_sampling=False, backend="torch", seed=0,
                                                allocation_config=anadp.AllocationConfig(warmup_steps=0),
                                                max_physical_batch_size=physical)
    if compile_:
        torch._dynamo.reset()
    forward = torch.compile(model, fullgraph=True) if compile_ else model
    out, backward, step = [], SyncCounter(), SyncCounter()
    for x, t in loader:
        with contextlib.nullcontext() if compile_ else backward:
            loss = torch.nn.functional.cross_entropy(forward(input_ids=x).logits, t)
        with backward:
            loss.backward()
        with step:
            opt.step()
        if opt.stepped:
            opt.zero_grad()
            out.append((backward.where, step.where))
            backward, step = SyncCounter(), SyncCounter()
    assert len(out) == steps
    return out


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("clipping", ["whitened", "per_layer"])
def test_no_host_sync_in_forward_and_backward_and_one_in_the_step(kind, clipping):
    """Forward and backward: no sync of anadp's. optimizer.step() of one physical batch: at most 1 (the
    non-finite check of the batch's norms; per-layer clipping: of the norms clipped since the last release);
    the released statistics' read back is a copy, not counted here. The first step builds its tables."""
    for backward, step in _syncs(kind, clipping)[1:]:
        assert backward == [], backward
        assert len(step) <= 1, step


@pytest.mark.parametrize("clipping", ["whitened", "per_layer"])
def test_one_host_sync_a_step_however_many_physical_batches(clipping):
    """A logical batch of 8 in 4 physical chunks of 2: the non-finite check is counted on the device and read
    once, before the step is released (was once per chunk)."""
    for backward, step in _syncs("bert", clipping, steps=2, physical=2)[1:]:
        assert len(backward) + len(step) <= 1, (backward, step)


def test_per_layer_clipping_on_a_device_releases_in_few_batches(monkeypatch):
    """Per-layer clipping releases the clipped layers in the backward, each release after a finite check (a
    host read). RELEASE_BATCH = 1 and CLIP_BATCH = 0 (a release per layer, as a BERT-base's 110M numbers would be in batches of
    2^20): a read per layer in the backward. With the CPU taken for a device where each op is a launch, the
    release batch is RELEASE_BATCH_NATIVE (2^27): no read in the backward, one at the end."""
    from anadp import records
    from anadp.per_layer import PerLayerAccumulator
    monkeypatch.setattr(PerLayerAccumulator, "RELEASE_BATCH", 1)
    monkeypatch.setattr(PerLayerAccumulator, "CLIP_BATCH", 0)  # each group clipped in its own hook, as large ones
    monkeypatch.setattr(PerLayerAccumulator, "CLIP_BATCH_NATIVE", 0)
    per_layer = _syncs("bert", "per_layer", steps=2)[1]
    assert len(per_layer[0]) > 5
    monkeypatch.setattr(records, "NATIVE_16BIT_DEVICES", {"cuda", "cpu"})
    backward, step = _syncs("bert", "per_layer", steps=2)[1]
    assert backward == [] and len(step) <= 1, (backward, step)


@pytest.mark.skipif(not compiled.available(), reason=f"torch {torch.__version__}: no compiled private models")
@pytest.mark.parametrize("clipping", ["whitened", "per_layer"])
def test_compiled_step_syncs_no_more_than_the_eager_one(clipping):
    """torch.compile(fullgraph=True): no sync op in the bodies of anadp's ops in the backward (the records), at
    most one in optimizer.step(); none in the compiled graphs (fullgraph=True), which hold the layers' forwards
    under both clippings."""
    for backward, step in _syncs("bert", clipping, compile_=True)[1:]:
        assert backward == [], backward
        assert len(step) <= 1, step


@pytest.mark.skipif(not compiled.available(), reason=f"torch {torch.__version__}: no compiled private models")
def test_the_sync_counter_counts_inside_anadps_ops(monkeypatch):
    """The counter fails a compiled step whose records sync: a sync op added to the backward op's body is seen
    there, where a dispatch mode alone would run the body unseen."""
    from anadp.layers import LinearLayer
    op_record = LinearLayer.op_record

    def syncing(self, saved, g):
        torch.equal(g, g)
        return op_record(self, saved, g)
    monkeypatch.setattr(LinearLayer, "op_record", syncing)
    # per-layer clipping: its compiled backward files records through the ops (whitened clipping's flat path,
    # anadp.flat, calls no op there)
    backward, _ = _syncs("bert", "per_layer", steps=2, compile_=True)[1]
    assert backward and all(w.startswith("equal") for w in backward), backward

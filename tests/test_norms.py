"""Per-sample gradient norms of the engine against per-sample autograd (a loop)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anadp.engine import GradSampleEngine, UnsupportedModuleError
from anadp.records import DenseRecord, LinearRecord

from helpers import call, per_sample_grads, rel_err

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
DTYPES = [torch.float64, torch.float32]


def check_norms(model, batch, B, dtype, out_of=lambda o: o, seed=0):
    """Engine per-parameter and total per-sample norms vs the loop reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        probe = out_of(call(model, batch))
    Rw = torch.randn(probe.shape, generator=g, dtype=probe.dtype)

    def loss_fn(out, i):
        o = out_of(out)
        return (o * (Rw if i is None else Rw[i:i + 1])).sum()

    ref = per_sample_grads(model, batch, loss_fn, B)
    engine = GradSampleEngine(model, loss_reduction="sum")
    loss_fn(call(model, batch), None).backward()
    norms = engine.per_sample_sq_norms()
    recorded = set(engine.names[p] for p in norms)
    unused = set(ref) - recorded  # parameters the forward does not use (CLIP's post_layernorm under a head)
    assert recorded <= set(ref) and all(not ref[n].any() for n in unused), "every used parameter must be recorded"
    total = sum(norms.values())
    total_ref = sum(r.flatten(1).pow(2).sum(1) for r in ref.values())
    for p, sq in norms.items():
        r = ref[engine.names[p]].flatten(1).pow(2).sum(1)
        # attention key biases have an exactly-zero gradient (softmax shift invariance):
        # their float32 values are rounding noise, so only the absolute error is bounded
        floor = torch.maximum(r, 1e-6 * total_ref).double().norm()
        err = (sq.double() - r.double()).norm() / floor
        assert torch.isfinite(sq).all() and err < TOL[dtype], engine.names[p]
    assert rel_err(total.sqrt(), total_ref.sqrt()) < TOL[dtype]
    for p in engine.params:  # autograd never formed the weight gradient
        assert p.grad is None
    engine.remove()
    return norms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_2d(dtype, bias):
    torch.manual_seed(0)
    m = nn.Linear(19, 33, bias=bias).to(dtype)
    check_norms(m, torch.randn(5, 19, dtype=dtype), 5, dtype)


class _QKV(nn.Module):
    """Three projections of one input, as query, key and value."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.q(x) * self.k(x).tanh() + self.v(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_reading_one_input_share_its_gram_matrix(dtype, monkeypatch):
    # T = 10, d = p = 16: alone, ghost costs T(p+d) = 320 > pd = 256 (instantiate); with the input's
    # Gram matrix formed once for three layers, T(p + d/3) = 213 < 256 (ghost)
    assert not LinearRecord(torch.zeros(1, 10, 16), torch.zeros(1, 10, 16)).use_ghost()
    seen = []
    original = LinearRecord.use_ghost
    monkeypatch.setattr(LinearRecord, "use_ghost", lambda self: seen.append(self.sharers) or original(self))
    torch.manual_seed(3)
    check_norms(_QKV(16).to(dtype), torch.randn(3, 10, 16, dtype=dtype), 3, dtype)
    assert seen == [3, 3, 3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [7, 40])  # ghost (T(p+d) < pd) and instantiated paths
def test_linear_3d(dtype, T):
    torch.manual_seed(1)
    m = nn.Linear(19, 33).to(dtype)
    assert LinearRecord(torch.zeros(1, T, 19), torch.zeros(1, T, 33)).use_ghost() == (T == 7)
    check_norms(m, torch.randn(3, T, 19, dtype=dtype), 3, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_4d_input(dtype):
    torch.manual_seed(2)
    m = nn.Linear(6, 5).to(dtype)
    check_norms(m, torch.randn(3, 4, 2, 6, dtype=dtype), 3, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_repeated_and_padding(dtype):
    torch.manual_seed(3)
    m = nn.Embedding(11, 6, padding_idx=0).to(dtype)
    idx = torch.tensor([[1, 2, 1, 0, 5], [3, 3, 3, 3, 0], [0, 7, 10, 7, 9]])
    check_norms(m, idx, 3, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [
    lambda: nn.LayerNorm(8),
    lambda: nn.LayerNorm((3, 8)),
    lambda: nn.LayerNorm(8, bias=False),
    lambda: nn.RMSNorm(8),
])
def test_norm_layers(dtype, make):
    torch.manual_seed(4)
    m = make().to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    check_norms(m, torch.randn(4, 5, 3, 8, dtype=dtype), 4, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_llama_rmsnorm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(5)
    m = LlamaRMSNorm(8).to(dtype)
    with torch.no_grad():
        m.weight.normal_()
    check_norms(m, torch.randn(4, 6, 8, dtype=dtype), 4, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_conv1d(dtype):
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(6)
    m = Conv1D(33, 19).to(dtype)  # nf=33 outputs, nx=19 inputs
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    check_norms(m, torch.randn(3, 7, 19, dtype=dtype), 3, dtype)


class TiedLM(nn.Module):
    """Embedding tied to the output layer, used twice, plus a batch-1 position table."""

    def __init__(self, V=13, d=6, T=5):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])[None]  # (1, T): broadcast over the batch
        h = self.wte(idx) + self.wpe(pos)
        h = h + torch.tanh(self.fc(self.ln(h)))
        return self.head(h)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_weights_and_broadcast_positions(dtype):
    torch.manual_seed(7)
    m = TiedLM().to(dtype)
    norms = check_norms(m, torch.randint(0, 13, (4, 5)), 4, dtype)
    assert len(norms) == 6  # wte (tied), wpe, ln.weight, ln.bias, fc.weight, fc.bias


def test_module_applied_twice():
    torch.manual_seed(8)
    fc = nn.Linear(5, 5).double()
    m = nn.Sequential(fc, nn.Tanh(), fc)
    check_norms(m, torch.randn(3, 4, 5, dtype=torch.float64), 3, torch.float64)


# --- whole Hugging Face models, random weights, built locally from configs ------------

def _bert(dtype):
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(cfg).to(dtype).eval()


def _gpt2(dtype):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    m = GPT2LMHeadModel(cfg).to(dtype).eval()
    assert m.lm_head.weight is m.transformer.wte.weight
    return m


def _llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _lora_bert(dtype):
    from peft import LoraConfig, get_peft_model
    m = _bert(dtype)
    m = get_peft_model(m, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                     modules_to_save=["classifier"]))
    with torch.no_grad():  # LoRA B starts at zero; make every factor's gradient non-trivial
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return m.to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [_bert, _gpt2, _llama, _lora_bert], ids=["bert", "gpt2", "llama", "lora-bert"])
def test_hf_models(dtype, make):
    torch.manual_seed(9)
    m = make(dtype)
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # one padded sample
    norms = check_norms(m, {"input_ids": ids, "attention_mask": mask}, 3, dtype, out_of=lambda o: o.logits)
    if make is _lora_bert:
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
        assert len(norms) == len(trainable)


# --- wrap-time errors -----------------------------------------------------------------

def test_unsupported_module_is_named():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedModuleError, match=r"module '1' \(BatchNorm1d\) is in train mode"):
        GradSampleEngine(m)


class _HandTiedHead(nn.Module):
    """A tied output head written by hand: the embedding's weight used outside the embedding."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4, 4)

    def forward(self, idx):
        return F.linear(torch.tanh(self.fc(self.emb(idx))), self.emb.weight)


def test_a_hooked_parameter_used_outside_its_module_is_refused_at_backward():
    """Its per-sample gradient would miss that use (relative error 0.12 before this check)."""
    torch.manual_seed(0)
    m = _HandTiedHead()
    engine = GradSampleEngine(m, loss_reduction="sum")
    with pytest.raises(RuntimeError, match=r"parameter 'emb\.weight' got a gradient from a use outside its module"):
        m(torch.randint(0, 10, (3, 5))).sum().backward()
    engine.remove()
    m(torch.randint(0, 10, (3, 5))).sum().backward()  # unhooked: plain autograd again
    assert m.emb.weight.grad is not None


def test_frozen_unsupported_module_is_fine():
    """A frozen module anadp cannot differentiate per sample is fine, unless it mixes samples in
    train mode (tests/test_misuse.py): a frozen Conv1d, and a frozen batch norm in eval mode."""
    m = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4))
    m[1].requires_grad_(False)
    m[2].requires_grad_(False)
    m[2].eval()
    e = GradSampleEngine(m)
    assert e.params == [m[0].weight, m[0].bias]


def test_parameters_on_several_devices():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, device="meta"))
    with pytest.raises(ValueError, match="several devices"):
        GradSampleEngine(m)


def test_batch_first_mismatch():
    m = nn.Linear(4, 4)
    e = GradSampleEngine(m, batch_first=True)
    x = torch.randn(3, 4)

    class Transposer(nn.Module):  # a layer that sees the batch in dim 1
        def forward(self, x):
            return m(x.t().reshape(4, 3).t().reshape(3, 4)[None].expand(2, 3, 4))

    from anadp.engine import BatchMismatchError
    wrapper = Transposer()
    e._hook.remove()
    e._hook = wrapper.register_forward_pre_hook(e._pre_forward, with_kwargs=True)
    with pytest.raises(BatchMismatchError, match="batch_first"):
        wrapper(x).sum().backward()


def test_no_weight_gemm_in_backward():
    """Backward of a hooked Linear runs one GEMM (the input gradient), not two."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                       torch.ops.aten.matmul):
                self.n += 1
            return func(*args, **(kwargs or {}))

    def backward_gemms(model):
        x = torch.randn(4, 7, 19, requires_grad=True)
        loss = model(x).sum()
        with CountMM() as c:
            loss.backward()
        return c.n

    torch.manual_seed(0)
    plain = nn.Linear(19, 33)
    hooked = nn.Linear(19, 33)
    GradSampleEngine(hooked)
    assert backward_gemms(plain) == 2  # autograd: input and weight gradients
    assert backward_gemms(hooked) == 1


def test_norms_before_backward_is_a_clear_error():
    e = GradSampleEngine(nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match="no backward pass"):
        e.per_sample_sq_norms()


@pytest.mark.parametrize("T", [7, 40])  # ghost (T(p+d) < pd): (A, G) kept; else the per-sample gradient
@pytest.mark.parametrize("kernel_norms", [False, True])
def test_linear_record_kept_and_its_clipped_sum(T, kernel_norms):
    """The engine keeps a Linear's (A, G) where the ghost norm is cheaper, else forms the per-sample
    gradient in the backward hook (fewer numbers than A and G) unless a kernel backend reads (A, G);
    either way the norms and the clipped sum are the per-sample autograd ones."""
    torch.manual_seed(4)
    m = nn.Linear(19, 33).double()
    x = torch.randn(3, T, 19, dtype=torch.float64)
    R = torch.randn(3, T, 33, dtype=torch.float64)
    ref = per_sample_grads(m, x, lambda out, i: (out * (R if i is None else R[i:i + 1])).sum(), 3)
    engine = GradSampleEngine(m, loss_reduction="sum")
    engine.instantiate_linear = not kernel_norms
    (m(x) * R).sum().backward()
    batch = engine.take()
    rec = batch.records[m.weight][0]
    instantiated = T == 40 and not kernel_norms
    assert isinstance(rec, DenseRecord) == instantiated and isinstance(rec, LinearRecord) != instantiated
    if instantiated:
        assert rec.gs.numel() < 3 * T * (19 + 33)  # smaller than the A and G it replaces
    sq = batch.sq_norms()
    c = torch.rand(3, dtype=torch.float64)
    for name, p in m.named_parameters():
        assert rel_err(sq[p], ref[name].flatten(1).pow(2).sum(1)) < 1e-10
        assert rel_err(batch.clipped_sum(p, c), torch.einsum("b,b...->...", c, ref[name])) < 1e-10
    engine.remove()


@pytest.mark.parametrize("autocast", [False, True])
def test_norm_layer_saves_no_extra_activation(autocast):
    """The hooked LayerNorm runs torch's fused layer norm (its output is the module's, bit for bit),
    saves only its input and weight, not the normalized activation, and gives the input gradient of
    the module and the per-sample gradients of its weight and bias (xhat recomputed in float32 from
    the saved input), also under bfloat16 autocast."""
    torch.manual_seed(7)
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with torch.no_grad():
        m[1].weight.normal_()
        m[1].bias.normal_()
    x = torch.randn(4, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = m[0](x).detach().requires_grad_()
        plain = m[1](h)
    R = torch.randn(plain.shape)
    (plain.float() * R).sum().backward()
    want_gx, h.grad = h.grad, None
    engine = GradSampleEngine(m, loss_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m[1](h)
    assert torch.equal(out, plain) and out.dtype == plain.dtype
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0].data_ptr() == h.data_ptr() and saved[1] is m[1].weight
    (out.float() * R).sum().backward()
    assert rel_err(h.grad.float(), want_gx.float()) < 1e-6
    recs = engine.take().records
    xhat = torch.nn.functional.layer_norm(h.detach().float(), (8,))
    gout = R.to(out.dtype).float()  # the output gradient reaches the layer in the output's dtype
    assert rel_err(recs[m[1].weight][0].gs, (gout * xhat).sum(1)) < 1e-6
    assert rel_err(recs[m[1].bias][0].gs, gout.sum(1)) < 1e-6
    engine.remove()


@pytest.mark.parametrize("T,blocks", [(64, 4), (67, 4), (130, 3), (50, 4)])
def test_gram_strips_give_the_ghost_norm(T, blocks):
    """The upper block strips of the two Gram matrices (T = 67, 130: blocks of unequal size; T = 50:
    one strip) give the per-sample squared norm of sum_t g_t a_t^T."""
    from anadp.records import gram_strips, strips_inner
    g = torch.Generator().manual_seed(T)
    A = torch.randn(3, T, 5, generator=g, dtype=torch.float64)
    G = torch.randn(3, T, 7, generator=g, dtype=torch.float64)
    SA, SG = gram_strips(A, blocks), gram_strips(G, blocks)
    assert len(SA) == (blocks if T >= 64 else 1)
    assert sum(s[0].numel() for s in SA) < T * T or T < 64  # less than the whole Gram matrix
    want = torch.einsum("btp,btd->bpd", G, A).flatten(1).pow(2).sum(1)
    assert rel_err(strips_inner(SA, SG), want) < 1e-12


# --- torch's own attention: nn.MultiheadAttention and the Transformer layers --------------

class _Attend(nn.Module):
    """Batch-first input; the attention in its own layout and with its own masks; the output and,
    with need_weights, the attention weights (so that their gradient path is checked too)."""

    def __init__(self, mha, cross="", need_weights=False, causal=False, pad=False, **call):
        super().__init__()
        self.mha, self.cross, self.need_weights, self.causal, self.pad, self.call = mha, cross, need_weights, causal, \
            pad, call
        e = mha.embed_dim
        if cross:  # a second (and third) input for cross-attention, trained too
            self.kv = nn.Linear(e, mha.kdim)
        if cross == "qkv":
            self.v = nn.Linear(e, mha.vdim)

    def forward(self, x):
        q = k = v = x
        if self.cross:
            k = v = torch.tanh(self.kv(x))
        if self.cross == "qkv":
            v = torch.sin(self.v(x))
        if not self.mha.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v)) if self.cross else (x.transpose(0, 1),) * 3
        B, T = x.shape[:2]
        kw = dict(self.call)
        if self.causal:
            kw.update(attn_mask=torch.ones(T, T, dtype=torch.bool).triu(1), is_causal=True)
        if self.pad:
            kpm = torch.zeros(B, T, dtype=torch.bool)
            kpm[:, -2:] = x[:, -2:, 0] > 0  # padding that depends on the sample alone (the reference is a loop)
            kw["key_padding_mask"] = kpm
        out, w = self.mha(q, k, v, need_weights=self.need_weights, **kw)
        out = out if self.mha.batch_first else out.transpose(0, 1)
        return out if w is None else torch.cat([out.flatten(1), w.flatten(1)], 1)


MHA_CASES = {
    "self": (dict(), dict()),
    "self-seq-first-weights-pad": (dict(batch_first=False), dict(need_weights=True, pad=True)),
    "self-causal-per-head-weights": (dict(), dict(need_weights=True, causal=True, average_attn_weights=False)),
    "self-causal-sdpa-pad": (dict(), dict(causal=True, pad=True)),
    "cross-kv": (dict(), dict(cross="kv", pad=True)),
    "cross-qkv-no-bias": (dict(bias=False), dict(cross="qkv", need_weights=True)),
    "kdim-vdim": (dict(kdim=6, vdim=5), dict(cross="qkv")),
    "zero-attn": (dict(add_zero_attn=True), dict(cross="kv", need_weights=True, pad=True)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention(dtype, case):
    make, call = MHA_CASES[case]
    torch.manual_seed(11)
    batch_first = make.pop("batch_first", True)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **make)
    m = _Attend(mha, **call).to(dtype)
    x = torch.randn(3, 5, 8, dtype=dtype)
    with torch.no_grad():
        want = m(x)  # torch's own forward (no hooks)
    norms = check_norms(m, x, 3, dtype)
    names = {n for n, p in m.named_parameters()}
    assert "mha.out_proj.weight" in names and len(norms) == len(names)
    engine = GradSampleEngine(m)  # the hooked forward computes what torch's does
    with torch.enable_grad():
        got = m(x)
    assert rel_err(got, want) < TOL[dtype]
    engine.remove()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_and_decoder_layers(dtype, norm_first):
    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True,
                                                                        norm_first=norm_first), 2,
                                             enable_nested_tensor=False)
            self.dec = nn.TransformerDecoderLayer(8, 2, 12, dropout=0.0, batch_first=True, norm_first=norm_first)

        def forward(self, x):
            T = x.shape[1]
            pad = torch.zeros(x.shape[0], T, dtype=torch.bool)
            pad[:, -1] = x[:, -1, 0] > 0  # depends on the sample alone (the reference is a loop)
            mem = self.enc(x, src_key_padding_mask=pad)
            causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
            return self.dec(x, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)

    torch.manual_seed(12)
    m = EncDec().to(dtype)
    check_norms(m, torch.randn(3, 6, 8, dtype=dtype), 3, dtype)


def test_multihead_attention_with_bias_kv_is_refused_at_wrap_time():
    with pytest.raises(UnsupportedModuleError, match=r"add_bias_kv=True.*use add_bias_kv=False"):
        GradSampleEngine(nn.MultiheadAttention(8, 2, add_bias_kv=True))


def test_stacked_small_records_equal_the_per_record_algebra():
    """Small per-sample gradients of one shape are stacked (one norm reduction, one weighted sum for
    all): the same norms and clipped sums as each record's own."""
    from anadp import records as R
    torch.manual_seed(13)
    m = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.LayerNorm(6)) for _ in range(4)]).double()
    engine = GradSampleEngine(m, loss_reduction="sum")
    m(torch.randn(5, 3, 6, dtype=torch.float64)).pow(2).sum().backward()
    batch = engine.take()
    stacks = batch._dense_stacks()
    assert sum(len(keys) for keys, _ in stacks) == len(batch.records)  # every record here is small and shares a shape
    norms, c = batch.sq_norms(), torch.rand(5, dtype=torch.float64)
    sums = batch.clipped_sums(c, list(batch.records))
    for p, recs in batch.records.items():
        assert rel_err(norms[p], R.sq_norm(recs)) < 1e-12
        assert rel_err(sums[p], R.clipped_sum(recs, c)) < 1e-12 and sums[p].shape == p.shape
    engine.remove()


def test_stacked_small_linear_records_equal_the_per_record_algebra():
    """Small ghost-norm Linear records of one shape are stacked (two batched Gram products for their
    norms, one batched GEMM for their clipped sums; query, key and value share one input): the same
    norms and clipped sums as each record's own, for nn.Linear and the Conv1D layout."""
    from anadp import records as R
    from anadp import stacks as S
    torch.manual_seed(14)
    B, T, d, p = 3, 4, 16, 16  # ghost: T (p + d / 3) < p d
    A = torch.randn(B, T, d, dtype=torch.float64)
    recs = [R.LinearRecord(A, torch.randn(B, T, p, dtype=torch.float64), sharers=3) for _ in range(3)]
    recs += [R.LinearRecord(torch.randn(B, T, d, dtype=torch.float64), torch.randn(B, T, p, dtype=torch.float64),
                            transposed=t, sharers=3) for t in (True, True)]
    keys = [torch.nn.Parameter(torch.zeros(1)) for _ in recs]
    stacks = S.linear_stacks(dict(zip(keys, recs)))
    assert sorted(len(s.keys) for s in stacks) == [2, 3] and any(s.index is not None for s in stacks)
    c = torch.rand(B, dtype=torch.float64)
    of = {id(k): r for k, r in zip(keys, recs)}
    for st in stacks:
        for k, sq, s in zip(st.keys, st.sq_norms(), st.clipped_sums(c)):
            r = of[id(k)]
            assert rel_err(sq, r.sq_norm()) < 1e-12
            assert rel_err(s, r.clipped_sum(c)) < 1e-12 and s.shape == r.clipped_sum(c).shape


@pytest.mark.parametrize("model_kind", ["gpt2_tied", "transformer"])
def test_16bit_records_into_the_gemms_equal_the_upcast_records(monkeypatch, model_kind):
    """Under bf16 autocast, on a device whose GEMMs take 16-bit inputs with float32 accumulation
    (records.NATIVE_16BIT_DEVICES: CUDA; here the CPU stands in, its GEMMs emulated in float32 by
    records.gemm32), Linear records keep their bf16 input and output gradient and the norms and
    clipped sums equal the upcast records' to float32 rounding: the products of two bf16 values are
    exact in float32; the clipped sums, whose clip-scaled operand is rounded to bf16 for one GEMM, within
    bf16's rounding (2^-8; the clip factors absorb it: test_one_gemm_clipped_sum_never_exceeds_C)."""
    from anadp import records as R
    torch.manual_seed(16)
    if model_kind == "gpt2_tied":  # embedding and output head sharing one weight (GPT-2's wte / lm_head)
        emb, head = nn.Embedding(50, 64), nn.Linear(64, 50, bias=False)
        head.weight = emb.weight
        m = nn.Sequential(emb, nn.Linear(64, 64), nn.Tanh(), head)
        x = torch.randint(0, 50, (4, 9))
    else:
        # width 64, T = 9: ghost norms (A and G kept), and an instantiated 64 -> 5 head
        m = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 5))
        x = torch.randn(4, 9, 64)
    c = torch.rand(4, dtype=torch.float32)
    out = {}
    for native in (False, True):
        monkeypatch.setattr(R, "NATIVE_16BIT_DEVICES", {"cuda", "cpu"} if native else {"cuda"})
        engine = GradSampleEngine(m, loss_reduction="sum")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        (y.float() ** 2).sum().backward()
        batch = engine.take()
        kept = [r.A.dtype for recs in batch.records.values() for r in recs if isinstance(r, R.LinearRecord)]
        # a record keeps bf16 on a native device (a float32 input, which the autocast GEMM read in bf16,
        # as that bf16); elsewhere A and G are upcast
        assert (torch.bfloat16 in kept) == native and (native or set(kept) == {torch.float32})
        out[native] = (batch.sq_norms(), batch.clipped_sums(c, list(batch.records)))
        engine.remove()
    for p in out[False][0]:
        assert rel_err(out[True][0][p], out[False][0][p]) < 1e-6
        assert rel_err(out[True][1][p], out[False][1][p]) < 2.0 ** -8


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("samples_at_a_time", [1, 2, 5])
def test_one_pass_equals_norms_then_clipped_sum(dtype, tol, transposed, samples_at_a_time, monkeypatch):
    """LinearRecord.one_pass (per-layer clipping's weight: per-sample gradients a chunk at a time) gives
    the squared norms, clip factors and clipped sum of the per-sample gradients formed whole, for
    chunks that do and do not divide the batch (B = 5)."""
    g = torch.Generator().manual_seed(0)
    B, T, d, p = 5, 6, 7, 9
    A = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(dtype)
    G = torch.randn(B, T, p, generator=g, dtype=torch.float64).to(dtype)
    extra = torch.rand(B, generator=g, dtype=torch.float64).to(dtype)  # the bias's squared norms
    rec = LinearRecord(A, G, transposed=transposed)
    assert rec.one_pass_applies()
    monkeypatch.setattr(LinearRecord, "ONE_PASS_CHUNK", samples_at_a_time * p * d)
    gs = torch.einsum("btp,btd->bpd", G.double(), A.double())  # per-sample gradients, (B, p, d)
    sq_ref = gs.flatten(1).pow(2).sum(1) + extra.double()
    C = float(sq_ref.sqrt().median())  # some samples clipped, some not
    chunks = []

    def factors(sq):
        chunks.append(len(sq))
        return (C / sq.sqrt()).clamp(max=1.0) * 0.5

    sq, cs, s = rec.one_pass(factors, extra)
    cs_ref = (C / sq_ref.sqrt()).clamp(max=1.0) * 0.5
    s_ref = torch.einsum("b,bpd->pd", cs_ref, gs)
    assert chunks == [min(samples_at_a_time, B - i) for i in range(0, B, samples_at_a_time)]
    assert 0 < int((cs_ref < 0.5).sum()) < B
    assert rel_err(sq, sq_ref.to(dtype)) < tol and rel_err(cs, cs_ref.to(dtype)) < tol
    assert s.shape == ((d, p) if transposed else (p, d))
    assert rel_err(s, (s_ref.t() if transposed else s_ref).to(dtype)) < tol


def test_one_pass_applies_where_its_transient_is_bounded():
    """one_pass forms at least one sample's gradient: only where that is no larger than the record
    (A, G) it frees, and with a token axis (the CPU's 16-bit records are kept in float32)."""
    assert LinearRecord(torch.randn(4, 8, 16), torch.randn(4, 8, 16)).one_pass_applies()  # 256 <= 1024
    assert not LinearRecord(torch.randn(1, 8, 64), torch.randn(1, 8, 64)).one_pass_applies()  # 4096 > 1024
    assert not LinearRecord(torch.randn(4, 1, 16), torch.randn(4, 1, 16)).one_pass_applies()  # no token axis


def test_native_16bit_linear_stacks_come_in_chunks_equal_to_the_per_record_algebra(monkeypatch):
    """On a native 16-bit device (the CPU standing in) Linear records of one shape are stacked in chunks of
    at most stacks._STACK_MAX_NATIVE numbers (here small: 5 records -> chunks of 2 and 3): the same norms,
    rounding slack as each record's own (float32 accumulation of exact bf16 products, in another order: 1e-5), and
    one-GEMM clipped sums within their rounding bound of the exact sum: ||sum - exact|| <= sum_i c_i slack_i."""
    from anadp import records as R
    from anadp import stacks as S
    monkeypatch.setattr(R, "NATIVE_16BIT_DEVICES", {"cuda", "cpu"})
    torch.manual_seed(15)
    B, T, d, p = 3, 4, 16, 16
    monkeypatch.setattr(S, "_STACK_MAX_NATIVE", 3 * B * T * (d + p + 2 * T))
    A = torch.randn(B, T, d).to(torch.bfloat16)
    recs = [R.LinearRecord(A, torch.randn(B, T, p).to(torch.bfloat16), sharers=2) for _ in range(2)]
    recs += [R.LinearRecord(torch.randn(B, T, d).to(torch.bfloat16), torch.randn(B, T, p).to(torch.bfloat16),
                            sharers=1) for _ in range(3)]
    keys = [torch.nn.Parameter(torch.zeros(1)) for _ in recs]
    stacks = S.linear_stacks(dict(zip(keys, recs)))
    assert sorted(len(s.keys) for s in stacks) == [2, 3] and all(s.A.dtype == torch.bfloat16 for s in stacks)
    c = torch.rand(B)
    of = {id(k): r for k, r in zip(keys, recs)}
    seen = 0
    for st in stacks:
        for k, sq, sl, s in zip(st.keys, st.sq_norms(), st.rounding_slack(), st.clipped_sums(c)):
            r = of[id(k)]
            assert rel_err(sq, r.sq_norm()) < 1e-5 and rel_err(sl, r.rounding_slack()) < 1e-5
            exact = R.LinearRecord(r.A.double(), r.G.double()).clipped_sum(c.double())
            bound = float((c.double() * sl.double()).sum())
            assert 0 < float((s.double() - exact).norm()) <= bound and s.shape == exact.shape
            seen += 1
    assert seen == len(recs)

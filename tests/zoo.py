"""Tiny Hugging Face models of many families (random weights, built from configs, float64), each
with a batch that has a padded sample: the model zoo of tests/test_model_zoo.py."""
from __future__ import annotations

import torch

VOCAB, HIDDEN, T = 64, 32, 7

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=32)
_DECODER = dict(_COMMON, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)

# name -> (config class, config kwargs, model class, kind); kind: "lm" (causal LM), "cls" (sequence
# classification), "seq2seq" (encoder-decoder LM), "speech" (speech to text), "image" (image classification),
# "vlm" (image tokens in a causal LM's input)
FAMILIES = {
    "llama": ("LlamaConfig", _DECODER, "LlamaForCausalLM", "lm"),
    "mistral": ("MistralConfig", _DECODER, "MistralForCausalLM", "lm"),
    "qwen2": ("Qwen2Config", _DECODER, "Qwen2ForCausalLM", "lm"),
    "qwen3": ("Qwen3Config", dict(_DECODER, head_dim=8), "Qwen3ForCausalLM", "lm"),
    "phi": ("PhiConfig", dict(_COMMON, pad_token_id=0), "PhiForCausalLM", "lm"),
    "phi3": ("Phi3Config", dict(_DECODER, pad_token_id=0), "Phi3ForCausalLM", "lm"),
    "gemma": ("GemmaConfig", dict(_DECODER, head_dim=8), "GemmaForCausalLM", "lm"),
    "gemma2": ("Gemma2Config", dict(_DECODER, head_dim=8), "Gemma2ForCausalLM", "lm"),
    "gpt_neox": ("GPTNeoXConfig", dict(_COMMON, pad_token_id=0), "GPTNeoXForCausalLM", "lm"),
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4, pad_token_id=0),
              "BloomForCausalLM", "lm"),
    "gptj": ("GPTJConfig", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, rotary_dim=4, n_positions=32,
                                pad_token_id=0), "GPTJForCausalLM", "lm"),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=32),
             "GPT2LMHeadModel", "lm"),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=32),
                    "GPTBigCodeForCausalLM", "lm"),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                              ffn_dim=48, max_position_embeddings=32, word_embed_proj_dim=HIDDEN, pad_token_id=1),
            "OPTForCausalLM", "lm"),
    "falcon": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                    pad_token_id=0), "FalconForCausalLM", "lm"),
    "mixtral": ("MixtralConfig", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2), "MixtralForCausalLM", "lm"),
    "mamba": ("MambaConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, state_size=4, num_hidden_layers=2, expand=2,
                                  conv_kernel=3, pad_token_id=0, use_cache=False), "MambaForCausalLM", "lm"),
    "bert": ("BertConfig", dict(_COMMON, num_labels=3), "BertForSequenceClassification", "cls"),
    "roberta": ("RobertaConfig", dict(_COMMON, num_labels=3, pad_token_id=1), "RobertaForSequenceClassification",
                "cls"),
    "distilbert": ("DistilBertConfig", dict(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=48,
                                            max_position_embeddings=32, num_labels=3),
                   "DistilBertForSequenceClassification", "cls"),
    "albert": ("AlbertConfig", dict(_COMMON, embedding_size=16, num_labels=3), "AlbertForSequenceClassification",
               "cls"),
    "electra": ("ElectraConfig", dict(_COMMON, embedding_size=16, num_labels=3), "ElectraForSequenceClassification",
                "cls"),
    "deberta_v2": ("DebertaV2Config", dict(_COMMON, num_labels=3), "DebertaV2ForSequenceClassification", "cls"),
    "modernbert": ("ModernBertConfig", dict(_COMMON, num_labels=3, pad_token_id=0, global_attn_every_n_layers=2,
                                            local_attention=16), "ModernBertForSequenceClassification", "cls"),
    "t5": ("T5Config", dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                            relative_attention_num_buckets=8, relative_attention_max_distance=16,
                            decoder_start_token_id=0, pad_token_id=0), "T5ForConditionalGeneration", "seq2seq"),
    "bart": ("BartConfig", dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                decoder_ffn_dim=48, max_position_embeddings=32, scale_embedding=True, pad_token_id=1),
             "BartForConditionalGeneration", "seq2seq"),
    "whisper": ("WhisperConfig", dict(vocab_size=VOCAB, num_mel_bins=8, d_model=HIDDEN, encoder_layers=1,
                                      decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                                      encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=16,
                                      max_target_positions=32, pad_token_id=0, decoder_start_token_id=1),
                "WhisperForConditionalGeneration", "speech"),
    "clip_vision": ("CLIPConfig", dict(vision_config=dict(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
                                                          num_attention_heads=4, image_size=8, patch_size=4),
                                       num_labels=3), "CLIPForImageClassification", "image"),
    "vit": ("ViTConfig", dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                              image_size=8, patch_size=4, num_labels=3), "ViTForImageClassification", "image"),
}


_SMALL = dict(_COMMON, num_key_value_heads=4, pad_token_id=0)
_ENC_DEC = dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)
_VISION = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
               patch_size=4, num_labels=3)
# more families, each with something the ones above lack
FAMILIES.update({
    "qwen2_moe": ("Qwen2MoeConfig", dict(_SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=16), "Qwen2MoeForCausalLM", "lm"),
    "deepseek_v3": ("DeepseekV3Config", dict(_SMALL, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                             first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                             qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
                                             topk_group=1), "DeepseekV3ForCausalLM", "lm"),
    "mpt": ("MptConfig", dict(vocab_size=VOCAB, d_model=HIDDEN, n_layers=2, n_heads=4, max_seq_len=32, pad_token_id=0),
            "MptForCausalLM", "lm"),
    "gpt_neo": ("GPTNeoConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=4,
                                     attention_types=[[["global", "local"], 1]], max_position_embeddings=32,
                                     pad_token_id=0), "GPTNeoForCausalLM", "lm"),
    "mamba2": ("Mamba2Config", dict(vocab_size=VOCAB, hidden_size=HIDDEN, state_size=8, num_hidden_layers=2, expand=2,
                                    conv_kernel=3, head_dim=8, num_heads=8, n_groups=1, pad_token_id=0, use_cache=False,
                                    chunk_size=8), "Mamba2ForCausalLM", "lm"),
    "convbert": ("ConvBertConfig", dict(_COMMON, num_labels=3, embedding_size=HIDDEN), "ConvBertForSequenceClassification",
                 "cls"),
    "squeezebert": ("SqueezeBertConfig", dict(_COMMON, num_labels=3, embedding_size=HIDDEN, q_groups=2, k_groups=2,
                                              v_groups=2, post_attention_groups=2, intermediate_groups=2,
                                              output_groups=2), "SqueezeBertForSequenceClassification", "cls"),
    "umt5": ("UMT5Config", dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0),
             "UMT5ForConditionalGeneration", "seq2seq"),
    "m2m100": ("M2M100Config", dict(_ENC_DEC, pad_token_id=1), "M2M100ForConditionalGeneration", "seq2seq"),
    "beit": ("BeitConfig", dict(_VISION, use_relative_position_bias=True), "BeitForImageClassification", "image"),
    "convnext": ("ConvNextConfig", dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=8, num_labels=3),
                 "ConvNextForImageClassification", "image"),
    "llava": ("LlavaConfig", dict(vision_config={"model_type": "clip_vision_model", **{k: v for k, v in _VISION.items()
                                                                                    if k != "num_labels"}},
                                  text_config={"model_type": "llama", **_DECODER}, image_token_index=VOCAB - 1,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=5),
              "LlavaForConditionalGeneration", "vlm"),
    # a child whose output the batch shares (Swin's bias table, LongT5's local bias): taken with its parent
    "swin": ("SwinConfig", dict(image_size=8, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                window_size=2, num_labels=3), "SwinForImageClassification", "image"),
    "longt5": ("LongT5Config", dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                    relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0),
               "LongT5ForConditionalGeneration", "seq2seq"),
    # pooled attention inputs of B rows by chance (T' = B), shared by the batch
    "funnel": ("FunnelConfig", dict(vocab_size=VOCAB, d_model=HIDDEN, n_head=4, d_head=8, d_inner=48, block_sizes=[1, 1],
                                    num_labels=3), "FunnelForSequenceClassification", "cls"),
    "mpnet": ("MPNetConfig", dict(_COMMON, num_labels=3, pad_token_id=1), "MPNetForSequenceClassification", "cls"),
    "siglip": ("SiglipConfig", dict(vision_config={k: v for k, v in _VISION.items() if k != "num_labels"},
                                    num_labels=3), "SiglipForImageClassification", "image"),
})

# float64 agreement of a private step with the brute force; looser where the model computes in float32 itself
# (DeepSeek-V3's router casts to float32; Mamba-2's chunked scan, exp of cumulative sums, rounds differently on
# a batch and on one sample: 1e-9 in its forward already): the batched and per-sample forwards round differently
STEP_TOLERANCE = {"deepseek_v3": 1e-6, "mamba2": 1e-6}

def make(name: str, dtype=torch.float64, seed: int = 0):
    """(model in eval mode, kind): the family's tiny model with random weights (parameters that start at
    zero or one, such as LoRA B, are drawn too, so that every gradient is non-trivial)."""
    import transformers
    lora = name.endswith("+lora")
    cfg_name, kwargs, model_name, kind = FAMILIES[name.removesuffix("+lora")]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**kwargs)
    for c in [cfg] + [getattr(cfg, n) for n in getattr(cfg, "sub_configs", {}) if getattr(cfg, n, None) is not None]:
        if hasattr(c, "_attn_implementation"):
            c._attn_implementation = "eager"
    if hasattr(cfg, "_experts_implementation"):
        cfg._experts_implementation = "eager"  # torch._grouped_mm has no float64
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    model = getattr(transformers, model_name)(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
    return model.to(dtype).eval(), kind


def batch(kind: str, B: int = 4, dtype=torch.float64, seed: int = 1) -> dict:
    """Inputs of B samples; sample 1 is padded (mask 0 on its last tokens)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        return {"pixel_values": torch.randn(B, 3, 8, 8, generator=g, dtype=dtype)}
    if kind == "speech":  # 8 mel bins x 32 frames (the encoder's two convolutions halve them to 16 positions)
        return {"input_features": torch.randn(B, 8, 32, generator=g, dtype=dtype),
                "decoder_input_ids": torch.randint(2, VOCAB, (B, 5), generator=g)}
    ids = torch.randint(2, VOCAB - 1, (B, T + (5 if kind == "vlm" else 0)), generator=g)
    mask = torch.ones(*ids.shape, dtype=torch.long)
    if B > 1:
        mask[1, -3:] = 0
        ids[1, -3:] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "vlm":  # one 8 x 8 image a sample: its 5 features (4 patches and CLS) take tokens 1-5
        ids[:, 1:6] = VOCAB - 1
        out["pixel_values"] = torch.randn(B, 3, 8, 8, generator=g, dtype=dtype)
    if kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(2, VOCAB, (B, 5), generator=g)
    return out


def logits(out) -> torch.Tensor:
    return out.logits

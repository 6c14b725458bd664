"""A classification head on the sentence embedding a checkpoint was trained to give.

Sentence-transformers checkpoints (the default MiniLM-L6 among them) are trained with the mean of the
token states over the attention mask, then L2-normalized; the BERT pooler on the [CLS] token that
``AutoModelForSequenceClassification`` puts under its head is not part of that training. On the recipe
proxy a logistic regression on the frozen model's features reaches 0.747 on the mean-pooled normalized
embedding and 0.697 on the pooler's output, and a DP linear probe at epsilon 3 keeps 0.747 of it
(bench/results/head-probe-2026-12-06-features.md).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn


def checkpoint_pooling(path: str) -> str:
    """"mean" where the checkpoint's sentence-transformers config pools by the masked mean, else "cls"
    (the model's own head)."""
    try:
        with open(os.path.join(path, "1_Pooling", "config.json")) as f:
            return "mean" if json.load(f).get("pooling_mode_mean_tokens") else "cls"
    except FileNotFoundError:
        return "cls"


def mean_embedding(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The masked mean of token states ``h`` (B, T, d) over ``attention_mask`` (B, T), L2-normalized."""
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


class SentenceClassifier(nn.Module):
    """``body`` (a Hugging Face encoder), the masked mean of its last hidden states, L2-normalized, then
    ``classifier``: a Linear initialized as Hugging Face initializes a new head (normal, std
    ``initializer_range``; bias 0). Called as a sequence classification model: ``.logits``."""

    def __init__(self, body: nn.Module, num_labels: int):
        super().__init__()
        self.body = body
        self.config = body.config
        self.classifier = nn.Linear(body.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(body.config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return SequenceClassifierOutput(logits=self.classifier(mean_embedding(h, attention_mask)))

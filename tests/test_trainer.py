"""Hugging Face Trainer integration: same parameters as the plain make_private loop."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader

import anadp

transformers = pytest.importorskip("transformers")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def dataset(n=64, T=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (n, T), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long),
             "labels": int(ids[i, 0] % 2)} for i in range(n)]


@pytest.mark.parametrize("per_device,accum", [(16, 1), (5, 3)])  # (5, 3): logical 15 in chunks of 5
def test_trainer_equals_make_private_loop(tmp_path, per_device, accum):
    from transformers import TrainingArguments, default_data_collator

    from anadp.integrations.transformers import DPTrainer
    model = tiny_bert()
    ref = copy.deepcopy(model)
    ds = dataset()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accum, max_steps=3,
                             learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                             optim="adamw_torch")
    trainer = DPTrainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
                        noise_multiplier=1.0, dp_max_grad_norm=0.5, dp_seed=3)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "epsilon" in h]
    assert len(logged) >= 3 and logged[-1]["epsilon"] == trainer.dp_optimizer.privacy_spent(1e-5) > 0

    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    logical = per_device * accum
    ref, opt, loader = anadp.make_private(ref, opt, DataLoader(ds, batch_size=logical, collate_fn=default_data_collator),
                                          noise_multiplier=1.0, max_grad_norm=0.5, seed=3)
    it = iter(loader)
    while opt.step_count < 3:
        batch = next(it)
        opt.zero_grad()
        if len(batch["labels"]):
            ref(**batch).loss.backward()
        opt.step()
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    want = torch.cat([p.detach().flatten() for p in ref.parameters()])
    start = torch.cat([p.detach().flatten() for p in tiny_bert().parameters()])
    assert float((got - want).norm() / want.norm()) < 1e-6
    assert float((want - start).abs().max()) > 1e-3  # training moved the parameters
    assert trainer.dp_optimizer.step_count == 3 == trainer.state.global_step
    assert opt.accountant.history == trainer.dp_optimizer.accountant.history == [(1.0, 1 / len(loader), 3)]

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


# (5, 3): logical 15 in chunks of 5; True: Adam's noise correction passed through
@pytest.mark.parametrize("per_device,accum,correction", [(16, 1, False), (5, 3, False), (16, 1, True)])
def test_trainer_equals_make_private_loop(tmp_path, per_device, accum, correction):
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
                        noise_multiplier=1.0, dp_max_grad_norm=0.5, dp_seed=3, adam_noise_correction=correction)
    trainer.train()
    assert (trainer.dp_optimizer.noise_variance is not None) == correction
    logged = [h for h in trainer.state.log_history if "epsilon" in h]
    assert len(logged) >= 3 and logged[-1]["epsilon"] == trainer.dp_optimizer.privacy_spent(1e-5) > 0

    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    logical = per_device * accum
    ref, opt, loader = anadp.make_private(ref, opt, DataLoader(ds, batch_size=logical, collate_fn=default_data_collator),
                                          noise_multiplier=1.0, max_grad_norm=0.5, seed=3,
                                          adam_noise_correction=correction)
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


def _trainer(tmp_path, max_steps, **dp):
    from transformers import TrainingArguments, default_data_collator

    from anadp.integrations.transformers import DPTrainer
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             max_steps=max_steps, learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0,
                             logging_steps=1, report_to=[], save_strategy="steps", save_steps=2, use_cpu=True,
                             seed=0, disable_tqdm=True, optim="adamw_torch")
    dp = {"noise_multiplier": 1.0} | dp
    return DPTrainer(model=tiny_bert(), args=args, train_dataset=dataset(), data_collator=default_data_collator,
                     dp_max_grad_norm=0.5, dp_seed=3, **dp)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_trainer_resumes_from_a_checkpoint_with_its_defaults(tmp_path):
    """resume_from_checkpoint with the Trainer's defaults (data skipping on): the run continues
    exactly where the uninterrupted one went, mid-epoch (4 logical batches of 16 per epoch)."""
    full = _trainer(tmp_path / "full", 6)
    full.train()
    part = _trainer(tmp_path / "part", 6)
    part.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert part.dp_optimizer.step_count == 6 == part.state.global_step
    assert torch.equal(_flat(part.model), _flat(full.model))
    assert part.dp_optimizer.accountant.history == full.dp_optimizer.accountant.history
    assert all(h.get("grad_norm", 1.0) != 0.0 for h in full.state.log_history)  # no made-up zero gradient norm


def test_trainer_resume_with_more_steps_than_the_budget_was_calibrated_for(tmp_path):
    first = _trainer(tmp_path, 2, noise_multiplier=None, target_epsilon=3.0, target_delta=1e-5)
    first.train()
    longer = _trainer(tmp_path, 40, noise_multiplier=None, target_epsilon=3.0, target_delta=1e-5)
    # calibrated for 40 steps, its noise differs from the checkpoint's: refused when the optimizer's state loads
    with pytest.raises(ValueError, match=r"other privacy settings \(noise_multiplier: checkpoint 1\.06.*budget_steps: "
                                         r"checkpoint 2, this optimizer 40"):
        longer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_trainer_resume_of_a_finished_run_takes_no_step(tmp_path):
    """It took one more noisy step (global_step 6 of max_steps 5) and reported epsilon 3.082 for a
    target of 3.0."""
    first = _trainer(tmp_path, 4, noise_multiplier=None, target_epsilon=3.0, target_delta=1e-5)
    first.train()
    assert first.dp_optimizer.steps_left == 0 and first.dp_optimizer.privacy_spent(1e-5) <= 3.0
    again = _trainer(tmp_path, 4, noise_multiplier=None, target_epsilon=3.0, target_delta=1e-5)
    with pytest.raises(ValueError, match="has taken all 4 steps of the run .*no step left"):
        again.train(resume_from_checkpoint=True)
    assert again.dp_optimizer.step_count == 4 and again.dp_optimizer.accountant.steps == 4

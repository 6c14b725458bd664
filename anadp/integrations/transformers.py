"""A Hugging Face ``Trainer`` that trains with anadp.

    from anadp.integrations.transformers import DPTrainer
    trainer = DPTrainer(model=model, args=args, train_dataset=ds,
                        target_epsilon=3.0, target_delta=1e-5, dp_max_grad_norm=1.0)
    trainer.train()   # logs "epsilon" with every logging_steps

Batches are Poisson-sampled with expected size
``per_device_train_batch_size * gradient_accumulation_steps``: the logical
batch, one Trainer step and one noisy optimizer step each. Gradient
accumulation is mapped onto it: ``training_step`` runs the logical batch in
physical chunks of ``per_device_train_batch_size`` (the Trainer's own
accumulation counter is set to 1, so its global_step, scheduler and logging
count logical steps). The Trainer's own gradient clipping is turned off: the
DP clip is ``dp_max_grad_norm``.
"""
from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader
try:
    from transformers import Trainer
except ImportError as e:  # the hf extra is optional
    raise ImportError(f"anadp.integrations.transformers needs Hugging Face transformers ({e}): "
                      "pip install 'anadp[hf]'") from e

from ..api import make_private
from ..data import batch_size_of, split_batch


class DPTrainer(Trainer):
    def __init__(self, *args, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 target_delta: float | None = None, dp_max_grad_norm: float = 1.0, allocation: str = "anadp",
                 accountant: str = "prv", clipping: str = "whitened", dp_seed: int | None = None,
                 secure_mode: bool = False, adam_noise_correction: bool | float | None = False, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        if target_epsilon is not None and target_delta is None:
            raise ValueError("target_epsilon needs target_delta")
        self.target_delta = target_delta if target_delta is not None else 1e-5
        self.logical_batch_size = a.per_device_train_batch_size * a.gradient_accumulation_steps
        self.physical_batch_size = a.per_device_train_batch_size
        a.gradient_accumulation_steps = 1
        if a.max_grad_norm and a.max_grad_norm > 0:
            a.max_grad_norm = 0.0  # the DP clip replaces it (p.grad is only formed at the noisy step)
        # on resume the DP loader continues from its own saved position (the sampler's RNG and the batch
        # within the epoch, in the optimizer's state): the Trainer must not skip batches itself
        a.ignore_data_skip = True
        self._dp = dict(noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
                        target_delta=self.target_delta if target_epsilon is not None else None,
                        max_grad_norm=dp_max_grad_norm, allocation=allocation, accountant=accountant,
                        clipping=clipping, seed=dp_seed, secure_mode=secure_mode,
                        adam_noise_correction=adam_noise_correction)
        self.dp_optimizer = None
        self._dp_loader = None

    def get_train_dataloader(self):
        """The Poisson loader; wraps model and optimizer on first use (make_private needs all three)."""
        if self._dp_loader is None:
            plain = DataLoader(self.train_dataset, batch_size=self.logical_batch_size, collate_fn=self.data_collator,
                               num_workers=self.args.dataloader_num_workers)
            self.create_optimizer()
            kw = dict(self._dp)
            if kw["target_epsilon"] is not None:
                if self.args.max_steps and self.args.max_steps > 0:
                    kw["epochs"] = self.args.max_steps / len(plain)
                else:
                    kw["epochs"] = self.args.num_train_epochs
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing`")
                _, self.dp_optimizer, self._dp_loader = make_private(self.model, self.optimizer, plain, **kw)
            self.optimizer = self.dp_optimizer
        return self._dp_loader

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward/backward of one logical batch in physical chunks; the engine is told which
        chunk ends it, so the optimizer clips every chunk and adds noise once."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        B = batch_size_of(inputs)
        total = torch.zeros((), device=self.args.device)
        chunks = split_batch(inputs, self.physical_batch_size)  # empty batch: no forward, a noise-only step
        for chunk in self.dp_optimizer.engine.chunks.hand_out(chunks):  # distinct samples: one backward each
            loss = self.compute_loss(model, chunk)  # mean over the chunk: what the engine expects
            self.accelerator.backward(loss)
            total = total + loss.detach() * (batch_size_of(chunk) / B)
        return total

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Restore as the Trainer does (the optimizer's state loads only into the same privacy settings:
        the same budget); then refuse a finished run, where the Trainer would take one more step."""
        super()._load_optimizer_and_scheduler(checkpoint)
        opt = self.dp_optimizer
        if checkpoint is None or opt is None or opt.steps_left is None or opt.steps_left > 0:
            return
        raise ValueError(
            f"the checkpoint has taken all {opt.budget_steps} steps of the run (epsilon "
            f"{opt.privacy_spent(self.target_delta):.3f} of the target {opt.target_epsilon:g}): there is no step left "
            "to resume, and one more would spend past the budget.")

    def log(self, logs: dict, *args, **kwargs) -> None:
        logs.pop("grad_norm", None)  # the Trainer's clip is off: its norm would be a made-up 0.0
        if self.dp_optimizer is not None:
            logs["epsilon"] = self.dp_optimizer.privacy_spent(self.target_delta)
        super().log(logs, *args, **kwargs)

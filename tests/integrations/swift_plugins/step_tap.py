"""Test-only ms-swift plugin: keep what the first optimizer step of ``swift sft`` computed, for bit-identity tests.

Each micro-batch's loss (what ``training_step`` returned) and every parameter's gradient as the optimizer is about
to use it are written to the safetensors file ``$HSM_TEST_STEP_TAP`` (``loss.K`` and ``grad.NAME``; the metadata's
``compute_loss_func`` names the trainer's loss hook class): by rank 0, or by every rank when the path holds
``{rank}`` (replaced by the rank).
Only values are copied: ms-swift's trainer, the model and hsm's plugin run unchanged.
"""

import os

import torch
import transformers
from safetensors.torch import save_file
from transformers.trainer_callback import CallbackHandler

_losses: list[torch.Tensor] = []
_loss_hook: list[str] = []
_training_step = transformers.Trainer.training_step
_pre_optimizer_step = CallbackHandler.on_pre_optimizer_step


def training_step(self, model, inputs, *args, **kwargs):
    loss = _training_step(self, model, inputs, *args, **kwargs)
    _losses.append(loss.detach().clone())
    _loss_hook.append(type(self.compute_loss_func).__name__)
    return loss


def on_pre_optimizer_step(self, args, state, control):
    path = os.environ["HSM_TEST_STEP_TAP"]
    if state.global_step == 0 and (args.process_index == 0 or "{rank}" in path):
        tensors = {f"loss.{k}": loss.reshape(1) for k, loss in enumerate(_losses)}
        model = self.model.module if hasattr(self.model, "module") else self.model
        tensors.update({f"grad.{name}": p.grad.detach().clone().contiguous() for name, p in model.named_parameters()
                        if p.grad is not None})
        save_file(tensors, path.replace("{rank}", str(args.process_index)),
                  metadata={"compute_loss_func": ",".join(set(_loss_hook))})
    return _pre_optimizer_step(self, args, state, control)


transformers.Trainer.training_step = training_step
CallbackHandler.on_pre_optimizer_step = on_pre_optimizer_step

"""What one optimizer step computed, kept for bit-identity tests: each micro-batch's loss and every gradient.

:func:`tapped` subclasses any ``transformers.Trainer`` class (the plain one, TRL's, ms-swift's, or one with hsm's
mixin) so that ``trainer.step_losses`` holds what ``training_step`` returned for each micro-batch and
``trainer.step_grads`` every parameter's gradient as the optimizer was about to use it. Nothing else changes: the
tap only copies values, so a plain run and an hsm run are compared through the same lens.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

__all__ = ["tapped", "in_order", "save_step", "assert_same_step"]


class _GradTap(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.trainer.step_grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()
                                        if p.grad is not None})


def tapped(base: type) -> type:
    """``base`` (a Trainer class) recording ``step_losses`` (per micro-batch) and ``step_grads`` (per optimizer step)."""

    class Tapped(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_losses: list[torch.Tensor] = []
            self.step_grads: list[dict[str, torch.Tensor]] = []
            self.add_callback(_GradTap(self))

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_losses.append(loss.detach().clone())
            return loss

    Tapped.__name__ = Tapped.__qualname__ = f"Tapped{base.__name__}"
    return Tapped


def in_order(base: type) -> type:
    """``base`` (a Trainer class) reading its train dataset in order: a test feeds it the rows hsm's schedule drew,
    in the order drawn (on several ranks, accelerate deals the batches round robin)."""

    class InOrder(base):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    InOrder.__name__ = InOrder.__qualname__ = f"InOrder{base.__name__}"
    return InOrder


def save_step(trainer, path) -> None:
    """A tapped trainer's step as safetensors (``loss.K`` per micro-batch, ``grad.S.NAME`` per optimizer step), for
    a test in another process to compare with ``torch.equal``."""
    from safetensors.torch import save_file

    tensors = {f"loss.{k}": loss.reshape(1) for k, loss in enumerate(trainer.step_losses)}
    tensors.update({f"grad.{s}.{name}": grad.contiguous() for s, grads in enumerate(trainer.step_grads)
                    for name, grad in grads.items()})
    save_file(tensors, str(path))


def assert_same_step(plain, hsm) -> None:
    """Bit-identity: every micro-batch loss and every parameter's gradient ``torch.equal`` between two tapped runs."""
    assert plain.step_losses and len(plain.step_losses) == len(hsm.step_losses)
    for k, (a, b) in enumerate(zip(plain.step_losses, hsm.step_losses)):
        assert torch.equal(a, b), f"micro-batch {k}: loss {a.item()!r} (plain) != {b.item()!r} (hsm)"
    assert plain.step_grads and len(plain.step_grads) == len(hsm.step_grads)
    for a, b in zip(plain.step_grads, hsm.step_grads):
        assert a.keys() == b.keys() and a
        differ = [name for name in a if not torch.equal(a[name], b[name])]
        assert not differ, f"{len(differ)} of {len(a)} gradients differ, e.g. {differ[:3]}"

"""Trainer integration: the mixins and the trainer factory.

A trainer holds one :class:`hsm.train.session.MiningSession` (``trainer.mining``) and makes one call
per step into it. :class:`FusionSamplerMixin` trains on the session's schedule (the only change when
mining is off); :class:`HsmTrainerMixin` also computes the training loss through the Trainer's own
``compute_loss_func`` hook, so the Trainer keeps applying its own gradient-accumulation and
cross-device token averaging to it: the training loss is the one the plain Trainer computes, and
the per-sample statistics come from the same cross-entropy pass.
"""

from __future__ import annotations

from transformers import Trainer

from hsm.train.session import MiningSession, SessionCallback
from hsm.train.stats import causal_lm_loss

__all__ = ["FusionSamplerMixin", "HsmTrainerMixin", "make_trainer_class"]


class FusionSamplerMixin:
    """Trains on the session's schedule; the only change when mining is off.

    It keeps the batch's metadata out of ``model(**inputs)`` always, claims the run when ``train``
    starts and releases it when training ends (:meth:`MiningSession.start` / :meth:`MiningSession.finish`).
    """

    mining: MiningSession

    def use_session(self, session: MiningSession) -> None:
        """Train on ``session`` (held as ``self.mining``); its callback drives the epochs."""
        self.mining = session
        session.trainer = self
        self.add_callback(SessionCallback(session))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        resume = self.mining.start(resume_from_checkpoint)
        try:
            return super().train(resume, *args, **kwargs)
        finally:
            self.mining.finish()

    def _get_train_sampler(self, train_dataset=None):
        return self.mining.sampler

    def _prepare_inputs(self, inputs):
        # Every path to model(**inputs) (training_step, prediction_step) prepares its inputs here.
        self.mining.hold(inputs, training=self.model.training)
        return super()._prepare_inputs(inputs)


class HsmTrainerMixin(FusionSamplerMixin):
    """Logs per-sample loss/token accuracy while training on the plan-driven schedule.

    ``use_session(session)`` (what ``hsm train`` uses) routes the training loss through hsm's
    ``compute_loss_func``; ``use_session(session, owns_loss=False)`` leaves a trainer with its own
    loss alone, and its ``compute_loss`` hands each micro-batch to :meth:`MiningSession.record`.
    """

    def use_session(self, session: MiningSession, *, owns_loss: bool = True) -> None:
        """Train on ``session``; with ``owns_loss`` (and mining on) hsm computes the training loss."""
        if owns_loss and session.is_mining:
            if self.compute_loss_func is not None:
                raise ValueError("hsm computes the training loss itself; this Trainer already has a compute_loss_func "
                                 "(pass owns_loss=False and call trainer.mining.record from your compute_loss)")
            self.compute_loss_func = self._mining_loss
        super().use_session(session)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.mining.loss_meta = self.mining.take(inputs)
        # The plain Trainer counts tokens across devices (and later multiplies the loss by the
        # number of processes) only for a model that accepts loss kwargs. Qwen-VL does not: its
        # loss is each rank's own per-token mean. Hand our loss what the plain Trainer would have
        # handed the model, so the loss and the gradients are the plain Trainer's on any world size.
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _mining_loss(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        meta = self.mining.take_loss_meta()
        supervised = meta.supervised_index if meta is not None else None
        # The model's own loss, op for op (bit-identical loss and gradients), and the statistics from its pass.
        loss, losses, mask, correct = causal_lm_loss(logits, labels, num_items_in_batch, supervised)
        # Tell training_step whether that is already scaled for gradient accumulation (as it infers for the plain model).
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if self.model.training and meta is not None:
            self.mining.record(meta, losses, mask, correct)
        return loss


def make_trainer_class(base: type[Trainer] = Trainer, *, mining: bool) -> type[Trainer]:
    """``base`` with the hsm mixin (mining on) or only the fusion sampler (mining off)."""
    mixin = HsmTrainerMixin if mining else FusionSamplerMixin
    return type(f"Hsm{base.__name__}" if mining else f"Fusion{base.__name__}", (mixin, base), {})

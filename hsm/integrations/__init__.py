"""hsm inside other trainers: TRL's ``SFTTrainer`` (:mod:`hsm.integrations.trl`) and ms-swift's ``swift sft``
(:mod:`hsm.integrations.swift`), each one module on :func:`hsm.integrations.common.attach`, which wraps the
trainer's rows (:mod:`~hsm.integrations.slots`) and collator (:mod:`~hsm.integrations.collator`) and hands it a
:class:`hsm.train.session.MiningSession`. Each depends on the core; the core never imports them."""

__all__: list[str] = []

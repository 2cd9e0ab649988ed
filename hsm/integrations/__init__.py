"""hsm inside other trainers: TRL's ``SFTTrainer`` (:mod:`hsm.integrations.trl`) and ms-swift's ``swift sft``
(:mod:`hsm.integrations.swift`). Each depends on the core; the core never imports them."""

__all__: list[str] = []

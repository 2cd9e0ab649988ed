"""Data: records to model inputs and the per-epoch schedule.

records (JSONL, COCO import) -> answer (the answer text, both directions) ->
encoding (template, token roles) -> augment -> fusion (the target plus source
datasets) -> schedule (the epoch's order from the plan) -> sampler (this rank's
batches); ``synth`` makes the synthetic corpora.
"""

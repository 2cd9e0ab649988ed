"""Data: records to model inputs and the per-epoch schedule.

records (JSONL, COCO import in ``coco``, their images read with a bound in ``images``) -> answer (the answer text, both directions) ->
encoding (template, token roles) -> augment -> fusion (the target plus source datasets)
-> schedule (the epoch's order from the plan: ``draws`` counts each sample's and source's
draws, ``shuffles`` lays them out in a uniformly random order chunk by chunk, ``mixer``
interleaves hard and regular pools in dynamic mode) -> sampler (this rank's batches);
``synth`` makes the synthetic corpora; ``lengths`` checks encoded lengths.
"""

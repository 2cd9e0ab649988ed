"""Training: the Trainer side of mining.

distributed (the one torch.distributed importer) -> stats (per-sample statistics from
the logits) -> ``event_sync`` (ship parts to rank 0) -> ``model`` (tiny demo model, real
checkpoints, LoRA) -> ``startup`` (the run's lock and used-folder refusal) -> ``session``
(the one object a trainer holds: sampler, event writer, epoch-end planning; with
``telemetry`` and ``run_files``) -> ``trainer`` (the mixins that hand it each step).
"""

"""Training: the Trainer side of mining.

distributed (the one torch.distributed importer) -> stats (per-sample statistics from
the logits) -> event writing and ``event_sync`` (ship parts to rank 0) -> ``model``
(tiny demo model, real checkpoints, LoRA) -> ``trainer`` (the mixin and callbacks that
plan between epochs).
"""

"""``custom.detection_eval``: ``hsm eval`` from inside training.

Every epoch (or every N optimizer steps) the callback generates on the selected
validation sets with the model being trained, writes the same files as
``hsm eval run`` under ``OUTPUT_DIR/eval/step=S/`` and logs ``eval/<dataset>/<metric>``
through the Trainer's log (TensorBoard and any other reporter).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from hsm.train import distributed
from hsm.config import DetectionEvalConfig, FusionConfig
from hsm.eval.evaluate import evaluate_model, scalar_logs, select_datasets

__all__ = ["DetectionEvalCallback", "should_evaluate"]


def should_evaluate(every: str | int, global_step: int, *, epoch_end: bool) -> bool:
    """``every: epoch`` fires at epoch ends; ``every: N`` at step ends with ``global_step % N == 0``."""
    if every == "epoch":
        return epoch_end
    return not epoch_end and global_step > 0 and global_step % int(every) == 0


class DetectionEvalCallback(TrainerCallback):
    """Runs :func:`hsm.eval.evaluate.evaluate_model` on the Trainer's model on schedule."""

    def __init__(self, trainer, config: DetectionEvalConfig, fusion: FusionConfig, processor, coord_format: str):
        self.trainer = trainer
        self.config = config
        self.fusion = fusion
        self.processor = processor
        self.coord_format = coord_format
        self.datasets = select_datasets(fusion, config.datasets)  # fails before training, not after epoch 1
        self.last_step = -1

    def on_step_end(self, args, state, control, **kwargs):
        if should_evaluate(self.config.every, state.global_step, epoch_end=False):
            self.evaluate(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if should_evaluate(self.config.every, state.global_step, epoch_end=True):
            self.evaluate(args, state)

    def evaluate(self, args, state) -> dict[str, dict]:
        if state.global_step == self.last_step:
            return {}
        self.last_step = state.global_step
        out_dir = Path(args.output_dir) / "eval" / f"step={state.global_step}"
        results = evaluate_model(
            self.trainer.model, self.processor, self.fusion, self.datasets, out_dir, self.coord_format,
            max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size,
            max_samples=self.config.max_samples,
        )
        if distributed.on_main(distributed.current_world()) and results:
            self.trainer.log(scalar_logs(results))
        distributed.barrier()
        return results
